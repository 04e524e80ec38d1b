/* gpu_engine_check MODEL [N]: on the CUDA backend, caching changes speed, never answers. For a
 * random prompt it compares the last-position logits (memcmp) and the greedy text of
 *   - a cold run with the cache off,
 *   - runs whose prefix (1 token, inside a block, on a block edge, half, all but one) came from
 *     the cache, each with prefill chunks of 7 and 512 tokens,
 *   - a run batched with four other requests arriving one step apart,
 *   - a run whose prefix block is shared and copied on write,
 *   - greedy and sampled requests batched together with the greedy rows' argmax found on the
 *     GPU (their logits left there) and on the host (PCACHE_GPU_ARGMAX=0): the same texts.
 * N (default 70) is the prompt's length; past 1024 the attention's segments (k_flash) come into
 * play, and prefixes ending on and next to segment edges are checked too.
 * Prints one line per check and "N passed, N failed"; exits non-zero on a failure. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "engine.h"
#include "gpu.h"

typedef struct { int done; finish_reason why; char text[4096]; size_t n; } result;
static void on_text(void *u, const char *t, size_t n) {
    result *r = u;
    if (r->n + n < sizeof r->text) { memcpy(r->text + r->n, t, n); r->n += n; r->text[r->n] = 0; }
}
static void on_done(void *u, finish_reason why, const engine_usage *us, const char *err) {
    result *r = u;
    (void)us;
    r->done = 1;
    r->why = why;
    if (err) fprintf(stderr, "engine: %s\n", err);
}

static int passed, failed;
static void check(int ok, const char *what) {
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    if (ok) passed++; else failed++;
}

static engine *make(const char *path, int chunk, bool cache) {
    engine_opts o = { .model_path = path, .kv_mem_bytes = 256u << 20, .cache_enabled = cache, .n_threads = 1,
                      .max_batch_tokens = chunk, .device = "cuda" };
    engine *e;
    char err[512];
    if (engine_create(&e, &o, err, sizeof err)) { fprintf(stderr, "%s\n", err); exit(2); }
    return e;
}

/* temperature 0: greedy; else sampled with that temperature and a fixed seed */
static int submit_t(engine *e, const int32_t *ids, int n, float *logits, result *r, float temperature) {
    memset(r, 0, sizeof *r);
    engine_request q = { .prompt = ids, .n_prompt = n, .max_tokens = 12, .ignore_eos = true, .prompt_logits = logits,
                         .on_text = on_text, .on_done = on_done, .user = r };
    sample_params_default(&q.sp);
    q.sp.temperature = temperature;
    q.sp.seed = 7;
    char err[256];
    int id = engine_submit(e, &q, err, sizeof err);
    if (id < 0) { fprintf(stderr, "submit: %s\n", err); exit(2); }
    return id;
}
static int submit(engine *e, const int32_t *ids, int n, float *logits, result *r) { return submit_t(e, ids, n, logits, r, 0); }

/* Six requests staggered a step apart, greedy and sampled in turn, none asking for prompt
 * logits (so the greedy rows' logits may stay on the GPU): their texts into out. */
static void mixed_batch(const char *path, const int32_t *ids, int N, int nv, result out[6]) {
    engine *e = make(path, 64, true);
    int32_t *alt[6];
    for (int j = 0; j < 6; j++) {
        alt[j] = malloc(sizeof(int32_t) * N);
        for (int i = 0; i < N; i++) alt[j][i] = (ids[i] + 29 * j) % nv;
        submit_t(e, alt[j], N - 5 * j, NULL, &out[j], j % 2 ? 0.9f : 0.0f);
        engine_step(e);
    }
    for (int g = 0; g < 10000 && engine_step(e) > 0; g++) {}
    engine_free(e);
    for (int j = 0; j < 6; j++) free(alt[j]);
}

static void run(engine *e, const int32_t *ids, int n, float *logits, result *r) {
    submit(e, ids, n, logits, r);
    while (!r->done) engine_step(e);
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: gpu_engine_check MODEL [N]\n"); return 2; }
    const int N = argc > 2 ? atoi(argv[2]) : 70;
    if (N < 40) { fprintf(stderr, "N must be at least 40\n"); return 2; }
    char why[200];
    if (!gpu_available(why, sizeof why)) { fprintf(stderr, "no GPU: %s\n", why); return 2; }
    engine *cold = make(argv[1], 512, false);
    const int nv = tokenizer_n_vocab(engine_tok(cold));
    int32_t *ids = malloc(sizeof(int32_t) * N), *fork = malloc(sizeof(int32_t) * N);
    uint64_t st = 99;
    for (int i = 0; i < N; i++) { st = st * 6364136223846793005ull + 1; ids[i] = (int32_t)((st >> 33) % (uint64_t)nv); }
    float *ref = malloc(sizeof(float) * nv), *got = malloc(sizeof(float) * nv);
    result r0, r;
    run(cold, ids, N, ref, &r0);
    engine_free(cold);
    char what[160];
    int splits[10] = { 1, 5, 16, 17, N / 2, N - 1 }, n_splits = 6;
    for (int edge = 1024; edge <= 2048 && n_splits < 10; edge += 1024)   /* segment edges */
        if (edge + 1 < N) { splits[n_splits++] = edge; splits[n_splits++] = edge + 1; }
    for (int k = 0; k < n_splits; k++)
        for (int chunk = 7; chunk <= 512; chunk += 505) {
            engine *e = make(argv[1], chunk, true);
            result w;
            run(e, ids, splits[k], NULL, &w);
            run(e, ids, N, got, &r);
            snprintf(what, sizeof what, "prefix of %d from the cache, chunks of %d: logits bit-identical, same text", splits[k], chunk);
            check(!memcmp(ref, got, sizeof(float) * nv) && !strcmp(r.text, r0.text), what);
            engine_free(e);
        }
    /* batched with others, staggered */
    {
        engine *e = make(argv[1], 64, true);
        result others[4];
        int32_t *altj[4];
        for (int j = 0; j < 4; j++) {
            altj[j] = malloc(sizeof(int32_t) * N);
            for (int i = 0; i < N; i++) altj[j][i] = (ids[i] + 17 * (j + 1)) % nv;
            submit(e, altj[j], N - 10 * j, NULL, &others[j]);
            engine_step(e);
        }
        submit(e, ids, N, got, &r);
        for (int g = 0; g < 10000 && engine_step(e) > 0; g++) {}
        check(!memcmp(ref, got, sizeof(float) * nv) && !strcmp(r.text, r0.text),
              "batched with four other requests: logits bit-identical, same text");
        engine_free(e);
        for (int j = 0; j < 4; j++) free(altj[j]);
    }
    /* copy on write: a cached prefix ending inside a block, then two requests that extend it */
    {
        engine *e = make(argv[1], 512, true);
        result w, a, b;
        run(e, ids, 21, NULL, &w);
        memcpy(fork, ids, sizeof(int32_t) * N);
        fork[25] = (fork[25] + 1) % nv;
        submit(e, fork, N, NULL, &a);
        submit(e, ids, N, got, &b);
        for (int g = 0; g < 10000 && engine_step(e) > 0; g++) {}
        check(!memcmp(ref, got, sizeof(float) * nv) && !strcmp(b.text, r0.text),
              "a shared partial block copied on write by two sequences: logits bit-identical");
        engine_free(e);
    }
    /* greedy rows' argmax on the GPU (the default) or on the host */
    {
        result on[6], off[6];
        mixed_batch(argv[1], ids, N, nv, on);
        setenv("PCACHE_GPU_ARGMAX", "0", 1);
        mixed_batch(argv[1], ids, N, nv, off);
        engine *e = make(argv[1], 512, false);
        run(e, ids, N, NULL, &r);
        engine_free(e);
        unsetenv("PCACHE_GPU_ARGMAX");
        int same = 1;
        for (int j = 0; j < 6; j++) same &= on[j].why == FINISH_LENGTH && off[j].why == FINISH_LENGTH && !strcmp(on[j].text, off[j].text);
        check(same, "greedy and sampled requests batched: the same texts with the greedy argmax on the GPU or the host");
        check(!strcmp(r.text, r0.text), "a greedy run with the argmax on the host: the same text");
    }
    free(ref);
    free(got);
    free(ids);
    free(fork);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
