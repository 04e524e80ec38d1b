/* sample: see sample.h. Candidates are kept as (logit, id) pairs; top-k uses a partial sort
 * (quickselect) so the common top_k=40 costs O(n_vocab), and only the survivors get sorted.
 * Ties are broken by the lower id everywhere, so results never depend on sort stability. */
#include "sample.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

void sample_params_default(sample_params *sp) {
    memset(sp, 0, sizeof *sp);
    sp->temperature = 0.8f;
    sp->top_k = 40;
    sp->top_p = 0.95f;
    sp->min_p = 0.05f;
    sp->repeat_penalty = 1.0f;
    sp->repeat_last_n = 64;
    sp->seed = 0;
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void sample_rng_seed(sample_rng *r, uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&x);
}

static uint64_t rng_next(sample_rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double sample_rng_uniform(sample_rng *r) { return (double)(rng_next(r) >> 11) * 0x1.0p-53; }

/* a before b: higher logit first, then lower id */
static int cand_before(const sample_cand *a, const sample_cand *b) {
    return a->logit > b->logit || (a->logit == b->logit && a->id < b->id);
}

static int cand_cmp(const void *pa, const void *pb) {
    const sample_cand *a = pa, *b = pb;
    if (cand_before(a, b)) return -1;
    if (cand_before(b, a)) return 1;
    return 0;
}

/* Moves the k best candidates to c[0..k) (unordered). */
static void select_top(sample_cand *c, int n, int k) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        sample_cand pivot = c[(lo + hi) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (cand_before(&c[i], &pivot)) i++;
            while (cand_before(&pivot, &c[j])) j--;
            if (i <= j) { sample_cand t = c[i]; c[i] = c[j]; c[j] = t; i++; j--; }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else break;
    }
}

static bool repeat_penalizes(const sample_params *sp) { return sp->repeat_penalty != 1.0f && sp->repeat_penalty > 0; }
static bool presence_penalizes(const sample_params *sp) { return sp->presence_penalty != 0 || sp->frequency_penalty != 0; }
bool sample_penalizes(const sample_params *sp) { return repeat_penalizes(sp) || presence_penalizes(sp); }

static void apply_penalties(float *logits, int n_vocab, const sample_params *sp, const int32_t *hist, int n_hist) {
    bool rep = repeat_penalizes(sp);
    bool pres = presence_penalizes(sp);
    if (!rep && !pres) return;
    int start = 0;
    if (rep && sp->repeat_last_n > 0 && n_hist > sp->repeat_last_n) start = n_hist - sp->repeat_last_n;
    /* Count occurrences with a tiny open-addressing map over the window (no n_vocab array). */
    int cap = 16;
    while (cap < 2 * (n_hist - start + 1)) cap <<= 1;
    int32_t *keys = malloc((size_t)cap * sizeof(int32_t));
    int *cnt = calloc((size_t)cap, sizeof(int));
    if (!keys || !cnt) { free(keys); free(cnt); return; }
    for (int i = 0; i < cap; i++) keys[i] = -1;
    for (int i = start; i < n_hist; i++) {
        int32_t id = hist[i];
        if (id < 0 || id >= n_vocab) continue;
        unsigned h = ((unsigned)id * 2654435761u) & (unsigned)(cap - 1);
        while (keys[h] != -1 && keys[h] != id) h = (h + 1) & (unsigned)(cap - 1);
        keys[h] = id;
        cnt[h]++;
    }
    for (int h = 0; h < cap; h++) {
        if (keys[h] < 0) continue;
        float *l = &logits[keys[h]];
        if (rep) *l = *l > 0 ? *l / sp->repeat_penalty : *l * sp->repeat_penalty;
        if (pres) *l -= (float)cnt[h] * sp->frequency_penalty + sp->presence_penalty;
    }
    free(keys);
    free(cnt);
}

void sample_penalize(float *logits, int n_vocab, const sample_params *sp, const int32_t *history,
                     int n_history) {
    apply_penalties(logits, n_vocab, sp, history, n_history);
}

int32_t sample_token(float *logits, int n_vocab, const sample_params *sp, sample_rng *rng,
                     const int32_t *history, int n_history, sample_cand *c) {
    apply_penalties(logits, n_vocab, sp, history, n_history);
    return sample_pick(logits, n_vocab, sp, rng, c);
}

float sample_logprobs(const float *logits, int n_vocab, int32_t chosen, int n_top, int32_t *top_id,
                      float *top_lp, sample_cand *c) {
    float mx = logits[0];
    for (int i = 1; i < n_vocab; i++)
        if (logits[i] > mx) mx = logits[i];
    double sum = 0;
    for (int i = 0; i < n_vocab; i++) sum += exp((double)logits[i] - mx);
    double lse = mx + log(sum);
    if (n_top > n_vocab) n_top = n_vocab;
    if (n_top > 0) {
        for (int i = 0; i < n_vocab; i++) { c[i].logit = logits[i]; c[i].id = i; }
        if (n_top < n_vocab) select_top(c, n_vocab, n_top);
        qsort(c, (size_t)n_top, sizeof *c, cand_cmp);
        for (int i = 0; i < n_top; i++) {
            top_id[i] = c[i].id;
            top_lp[i] = (float)((double)c[i].logit - lse);
        }
    }
    return (float)((double)logits[chosen] - lse);
}

int32_t sample_argmax(const float *logits, int n_vocab) {
    /* the maximum in eight lanes (vectorizes), then its first position; the same answer as a
     * scan with a strict > */
    float m8[8];
    int i = 0;
    for (int k = 0; k < 8; k++) m8[k] = -INFINITY;
    for (; i + 8 <= n_vocab; i += 8)
        for (int k = 0; k < 8; k++) m8[k] = logits[i + k] > m8[k] ? logits[i + k] : m8[k];
    float mx = -INFINITY;
    for (int k = 0; k < 8; k++) mx = m8[k] > mx ? m8[k] : mx;
    for (; i < n_vocab; i++) mx = logits[i] > mx ? logits[i] : mx;
    for (i = 0; i < n_vocab; i++)
        if (logits[i] == mx) return i;
    return 0;   /* all NaN */
}

bool sample_is_greedy(const sample_params *sp) { return sp->temperature <= 0 || sp->top_k == 1; }

int32_t sample_pick(const float *logits, int n_vocab, const sample_params *sp, sample_rng *rng,
                    sample_cand *c) {
    if (sample_is_greedy(sp)) return sample_argmax(logits, n_vocab);
    int n = n_vocab;
    for (int i = 0; i < n; i++) { c[i].logit = logits[i]; c[i].id = i; }
    if (sp->top_k > 0 && sp->top_k < n) {
        select_top(c, n, sp->top_k);
        n = sp->top_k;
    }
    qsort(c, (size_t)n, sizeof *c, cand_cmp);
    /* temperature + softmax (probabilities stored in .logit from here on) */
    float mx = c[0].logit;
    double sum = 0;
    for (int i = 0; i < n; i++) {
        float p = expf((c[i].logit - mx) / sp->temperature);
        c[i].logit = p;
        sum += p;
    }
    for (int i = 0; i < n; i++) c[i].logit = (float)(c[i].logit / sum);
    if (sp->top_p > 0 && sp->top_p < 1) {
        double cum = 0;
        int keep = n;
        for (int i = 0; i < n; i++) {
            cum += c[i].logit;
            if (cum >= sp->top_p) { keep = i + 1; break; }
        }
        n = keep;
    }
    if (sp->min_p > 0) {
        float thr = c[0].logit * sp->min_p;
        int keep = 1;
        while (keep < n && c[keep].logit >= thr) keep++;
        n = keep;
    }
    double total = 0;
    for (int i = 0; i < n; i++) total += c[i].logit;
    double u = sample_rng_uniform(rng) * total, acc = 0;
    for (int i = 0; i < n; i++) {
        acc += c[i].logit;
        if (u < acc) return c[i].id;
    }
    return c[n - 1].id;
}
