/* kvindex: see kvindex.h. */
#include "kvindex.h"
#include <stdlib.h>
#include <string.h>

typedef struct owner {
    uint64_t id;
    uint64_t *keys;       /* 0 = empty slot; the chain hash 0 lives in has_zero / zero_exp */
    uint32_t *exp;
    size_t cap, n;        /* cap: a power of two (or 0); n counts has_zero too */
    bool has_zero;
    uint32_t zero_exp;
    uint64_t used;        /* x->tick at the last update (least recently updated goes first) */
} owner;

struct kvindex {
    owner *o;
    int n_o, max_o;
    size_t max_chains;
    uint64_t dropped, tick;
};

static uint64_t mix64(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}

kvindex *kvindex_new(size_t max_chains, int max_owners) {
    kvindex *x = calloc(1, sizeof *x);
    if (!x) return NULL;
    x->max_chains = max_chains ? max_chains : 1;
    x->max_o = max_owners > 0 ? max_owners : 1;
    if (!(x->o = calloc((size_t)x->max_o, sizeof *x->o))) { free(x); return NULL; }
    return x;
}

static void owner_clear(owner *o) {
    free(o->keys);
    free(o->exp);
    uint64_t id = o->id, used = o->used;
    memset(o, 0, sizeof *o);
    o->id = id;
    o->used = used;
}

void kvindex_free(kvindex *x) {
    if (!x) return;
    for (int i = 0; i < x->n_o; i++) owner_clear(&x->o[i]);
    free(x->o);
    free(x);
}

static owner *find(const kvindex *x, uint64_t id) {
    for (int i = 0; i < x->n_o; i++)
        if (x->o[i].id == id) return &x->o[i];
    return NULL;
}

/* The owner, created when missing (the least recently updated one is dropped at max_owners). */
static owner *get(kvindex *x, uint64_t id) {
    owner *o = find(x, id);
    if (!o) {
        if (x->n_o == x->max_o) {
            int lru = 0;
            for (int i = 1; i < x->n_o; i++)
                if (x->o[i].used < x->o[lru].used) lru = i;
            owner_clear(&x->o[lru]);
            x->o[lru] = x->o[--x->n_o];
        }
        o = &x->o[x->n_o++];
        memset(o, 0, sizeof *o);
        o->id = id;
    }
    o->used = ++x->tick;
    return o;
}

static size_t slot_of(const owner *o, uint64_t k) {
    size_t mask = o->cap - 1, i = (size_t)mix64(k) & mask;
    while (o->keys[i] && o->keys[i] != k) i = (i + 1) & mask;
    return i;
}

static int rehash(owner *o, size_t cap, uint32_t drop_before) {
    uint64_t *keys = calloc(cap, sizeof *keys);
    uint32_t *exp = calloc(cap, sizeof *exp);
    if (!keys || !exp) { free(keys); free(exp); return -1; }
    uint64_t *ok = o->keys;
    uint32_t *oe = o->exp;
    size_t ocap = o->cap;
    o->keys = keys;
    o->exp = exp;
    o->cap = cap;
    o->n = 0;
    if (o->has_zero && o->zero_exp && o->zero_exp <= drop_before) o->has_zero = false;
    if (o->has_zero) o->n = 1;
    for (size_t i = 0; i < ocap; i++) {
        if (!ok[i] || (oe[i] && oe[i] <= drop_before)) continue;
        size_t j = slot_of(o, ok[i]);
        keys[j] = ok[i];
        exp[j] = oe[i];
        o->n++;
    }
    free(ok);
    free(oe);
    return 0;
}

int kvindex_store(kvindex *x, uint64_t id, const uint64_t *chains, int n, uint32_t expiry, uint32_t now) {
    if (n <= 0) return 0;
    owner *o = get(x, id);
    int refused = 0;
    for (int c = 0; c < n; c++) {
        const uint64_t k = chains[c];
        if (!k) {
            if (!o->has_zero) {
                if (o->n >= x->max_chains) { refused++; continue; }
                o->has_zero = true;
                o->n++;
            }
            o->zero_exp = expiry;
            continue;
        }
        if (o->cap) {
            size_t i = slot_of(o, k);
            if (o->keys[i]) { o->exp[i] = expiry; continue; }
        }
        if (o->n >= x->max_chains) {
            if (o->cap && rehash(o, o->cap, now) < 0) return -1;   /* drop the expired ones */
            if (o->n >= x->max_chains) { refused++; continue; }
        }
        if ((o->n + 1) * 10 > o->cap * 7) {
            size_t cap = o->cap ? o->cap * 2 : 64;
            if (rehash(o, cap, 0) < 0) return -1;
        }
        size_t i = slot_of(o, k);
        o->keys[i] = k;
        o->exp[i] = expiry;
        o->n++;
    }
    x->dropped += (uint64_t)refused;
    return refused;
}

/* Removes slot i, shifting later entries of the same probe run back (no tombstones). */
static void remove_at(owner *o, size_t i) {
    size_t mask = o->cap - 1, j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (!o->keys[j]) break;
        size_t h = (size_t)mix64(o->keys[j]) & mask;
        /* entry j may move to i unless its home h lies cyclically in (i, j] */
        bool stays = i <= j ? (i < h && h <= j) : (i < h || h <= j);
        if (stays) continue;
        o->keys[i] = o->keys[j];
        o->exp[i] = o->exp[j];
        i = j;
    }
    o->keys[i] = 0;
    o->exp[i] = 0;
    o->n--;
}

void kvindex_evict(kvindex *x, uint64_t id, const uint64_t *chains, int n) {
    owner *o = find(x, id);
    if (!o) return;
    o->used = ++x->tick;
    for (int c = 0; c < n; c++) {
        if (!chains[c]) {
            if (o->has_zero) { o->has_zero = false; o->n--; }
            continue;
        }
        if (!o->cap) continue;
        size_t i = slot_of(o, chains[c]);
        if (o->keys[i]) remove_at(o, i);
    }
}

void kvindex_reset(kvindex *x, uint64_t id) {
    owner *o = get(x, id);
    owner_clear(o);
}

void kvindex_drop(kvindex *x, uint64_t id) {
    owner *o = find(x, id);
    if (!o) return;
    owner_clear(o);
    *o = x->o[--x->n_o];
}

static bool held(const owner *o, uint64_t k, uint32_t now) {
    if (!k) return o->has_zero && (!o->zero_exp || o->zero_exp > now);
    if (!o->cap) return false;
    size_t i = slot_of(o, k);
    return o->keys[i] && (!o->exp[i] || o->exp[i] > now);
}

int kvindex_match(const kvindex *x, uint64_t id, const uint64_t *chains, int n, uint32_t now) {
    const owner *o = find(x, id);
    if (!o) return 0;
    int m = 0;
    while (m < n && held(o, chains[m], now)) m++;
    return m;
}

size_t kvindex_count(const kvindex *x, uint64_t id) {
    const owner *o = find(x, id);
    return o ? o->n : 0;
}

uint64_t kvindex_dropped(const kvindex *x) { return x->dropped; }

/* ------------------------------------------------------------------------------ events */
/* A decimal number in [1, max] at s, strictly as the writer prints it (digits, no sign, space
 * or leading zero: strtoul would take " +030"). Returns the end, or NULL. */
static const char *decimal(const char *s, uint32_t max, uint32_t *out) {
    uint64_t v = 0;
    const char *p = s;
    for (; *p >= '0' && *p <= '9' && p - s < 9; p++) v = v * 10 + (uint64_t)(*p - '0');
    if (p == s || *s == '0' || (*p >= '0' && *p <= '9') || v > max) return NULL;
    *out = (uint32_t)v;
    return p;
}

int kvevent_entry_parse(const char *const *names, const char *const *values, int n, kvevent_entry *out) {
    memset(out, 0, sizeof *out);
    out->op = -1;
    const char *v = NULL, *inst = NULL, *fp = NULL, *layout = NULL, *op = NULL, *chains = NULL;
    for (int i = 0; i < n; i++) {
        if (!names[i] || !values[i]) return -1;
        if (!strcmp(names[i], "v")) v = values[i];
        else if (!strcmp(names[i], "inst")) inst = values[i];
        else if (!strcmp(names[i], "fp")) fp = values[i];
        else if (!strcmp(names[i], "layout")) layout = values[i];
        else if (!strcmp(names[i], "op")) op = values[i];
        else if (!strcmp(names[i], "chains")) chains = values[i];
    }
    if (!v) return -1;
    if (strcmp(v, KVEVENT_VERSION)) return 1;
    if (!inst || kvevent_parse_hex64(inst, &out->inst) < 0) return -1;
    if (!fp || kvevent_parse_hex64(fp, &out->fp) < 0) return -1;
    if ((out->op = kvevent_op_parse(op)) < 0) return -1;
    const char *kd = layout ? decimal(layout, 1u << 20, &out->n_layer) : NULL;
    if (!kd || *kd != 'x' || !(kd = decimal(kd + 1, 1u << 24, &out->kv_dim)) || *kd) return -1;
    if (out->op == KVEV_STORE || out->op == KVEV_EVICT) {
        if (!chains || (out->n_chains = kvevent_parse_chains(chains, out->chains, KVEVENT_MAX_CHAINS)) < 0) return -1;
    }
    return 0;
}

int kvindex_apply(kvindex *x, const kvevent_entry *e, uint64_t fp, uint32_t n_layer, uint32_t kv_dim) {
    if (e->fp != fp || e->n_layer != n_layer || e->kv_dim != kv_dim) return 1;
    switch (e->op) {
    case KVEV_HELLO: case KVEV_CLEAR: kvindex_reset(x, e->inst); break;
    case KVEV_BYE: kvindex_drop(x, e->inst); break;
    case KVEV_STORE: kvindex_store(x, e->inst, e->chains, e->n_chains, 0, 0); break;
    case KVEV_EVICT: kvindex_evict(x, e->inst, e->chains, e->n_chains); break;
    default: return 1;
    }
    return 0;
}
