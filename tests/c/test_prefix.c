/* Prefix index tests: insert / match / split, token-granular divergence, namespaces, refcount
 * accounting, TTL with a driven clock, eviction order under memory pressure, blocks held by
 * sequences surviving pressure, copy on write after a match, a randomized comparison with a
 * brute-force longest-common-prefix model (checking the KV data each match hands back), and a
 * lookup micro-benchmark (printed, not asserted).
 *
 * The "model" here is a stand-in for the forward pass: position p of a sequence with tokens t
 * gets, in every layer, K and V, values derived from (p, hash of t[0..p]). So a block handed
 * back by a match holds the right data exactly when it was computed for the same prefix. */
#include <check.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "kv.h"
#include "prefix.h"

#define NL 2
#define KD 4
#define BLOCK_BYTES ((size_t)NL * 2 * KV_BLOCK * KD * sizeof(kv_elem))
#define B KV_BLOCK

static void init_pool(kv_pool *p, int n_blocks) {
    char err[256];
    ck_assert_int_eq(kv_pool_init(p, NL, KD, BLOCK_BYTES * (size_t)n_blocks, err, sizeof err), 0);
    ck_assert_int_eq(p->n_blocks, n_blocks);
}

static uint32_t prefix_hash(const int32_t *t, int pos) {   /* hash of t[0..pos] inclusive */
    uint32_t h = 2166136261u;
    for (int i = 0; i <= pos; i++) h = (h ^ (uint32_t)t[i]) * 16777619u;
    return h;
}
static kv_elem val(uint32_t h, int pos, int l, int kv, int j) {
    uint32_t x = h ^ (uint32_t)(pos * 0x9e3779b1u) ^ (uint32_t)((l * 8 + kv * 4 + j) * 0x85ebca6bu);
    x ^= x >> 15;
    x *= 0x2c1b3c6du;
    x ^= x >> 12;
    return (kv_elem)x;
}
/* Computes positions [s->n_tokens, n) of tokens t (prepare may reclaim from the index). */
static int compute(kv_pool *p, kv_seq *s, const int32_t *t, int n) {
    if (kv_seq_prepare(p, s, n)) return -1;
    for (int pos = s->n_tokens; pos < n; pos++) {
        uint32_t h = prefix_hash(t, pos);
        int32_t b = s->blocks[pos / B];
        for (int l = 0; l < NL; l++)
            for (int j = 0; j < KD; j++) {
                kv_k(p, b, l)[(pos % B) * KD + j] = val(h, pos, l, 0, j);
                kv_v(p, b, l)[(pos % B) * KD + j] = val(h, pos, l, 1, j);
            }
    }
    s->n_tokens = n;
    return 0;
}
/* Whether s holds the right data for t[0..n). */
static bool data_ok(const kv_pool *p, const kv_seq *s, const int32_t *t, int n) {
    if (s->n_tokens < n || s->n_blocks < (n + B - 1) / B) return false;
    for (int pos = 0; pos < n; pos++) {
        uint32_t h = prefix_hash(t, pos);
        int32_t b = s->blocks[pos / B];
        if (b < 0 || b >= p->n_blocks || p->refcnt[b] <= 0) return false;
        for (int l = 0; l < NL; l++)
            for (int j = 0; j < KD; j++)
                if (kv_k(p, b, l)[(pos % B) * KD + j] != val(h, pos, l, 0, j) ||
                    kv_v(p, b, l)[(pos % B) * KD + j] != val(h, pos, l, 1, j))
                    return false;
    }
    return true;
}

static void check_index(const prefix_index *px) {
    char err[256];
    int rc = prefix_check(px, err, sizeof err);
    if (rc) ck_abort_msg("prefix_check: %s", err);
}

/* Computes t[0..n) from scratch into a fresh sequence and caches it. */
static int cache_prompt(kv_pool *p, prefix_index *px, const char *ns, const int32_t *t, int n, int kind,
                        double ttl, double now) {
    kv_seq s = {0};
    ck_assert_int_eq(compute(p, &s, t, n), 0);
    int added = prefix_insert(px, ns, t, n, &s, kind, ttl, now);
    kv_seq_release(p, &s);
    return added;
}

/* Matches and checks the data handed back; returns m. */
static int match_check(kv_pool *p, prefix_index *px, const char *ns, const int32_t *t, int n, double now) {
    kv_seq s = {0};
    int m = prefix_match(px, ns, t, n, now, &s);
    ck_assert_int_ge(m, 0);
    ck_assert_int_eq(s.n_tokens, m);
    ck_assert_int_eq(s.n_blocks, (m + B - 1) / B);
    ck_assert(data_ok(p, &s, t, m));
    kv_seq_release(p, &s);
    return m;
}

static void seq_tokens(int32_t *t, int n, int seed) {
    for (int i = 0; i < n; i++) t[i] = 1000 + (seed * 131 + i * 17) % 977;
}

START_TEST(insert_and_exact_match) {
    kv_pool p;
    init_pool(&p, 32);
    prefix_index *px = prefix_create(&p);
    ck_assert_ptr_nonnull(px);
    ck_assert(p.reclaim != NULL);
    int32_t t[40];
    seq_tokens(t, 40, 1);
    ck_assert_int_eq(match_check(&p, px, "", t, 40, 0), 0);
    ck_assert_int_eq(cache_prompt(&p, px, "", t, 40, PREFIX_AUTO, 300, 0), 40);
    ck_assert_int_eq(kv_blocks_used(&p), 3);                /* only the index holds them */
    ck_assert_int_eq(match_check(&p, px, "", t, 40, 1), 40);
    ck_assert_int_eq(match_check(&p, px, "", t, 39, 1), 39); /* engine asks n_prompt - 1 */
    ck_assert_int_eq(match_check(&p, px, "", t, 16, 1), 16);
    ck_assert_int_eq(match_check(&p, px, NULL, t, 40, 1), 40); /* NULL namespace = "" */
    ck_assert_int_eq(cache_prompt(&p, px, "", t, 40, PREFIX_AUTO, 300, 2), 0); /* already cached */
    /* peek: the match's length, no references, no lookup counted (the stats below) */
    int32_t u[40];
    memcpy(u, t, sizeof u);
    u[20] = 7;
    ck_assert_int_eq(prefix_peek(px, "", t, 40), 40);
    ck_assert_int_eq(prefix_peek(px, NULL, t, 23), 23);
    ck_assert_int_eq(prefix_peek(px, "", u, 40), 20);
    ck_assert_int_eq(prefix_peek(px, "other", t, 40), 0);
    ck_assert_int_eq(kv_blocks_used(&p), 3);
    prefix_stats st;
    prefix_get_stats(px, &st);
    ck_assert_int_eq(st.entries, 1);
    ck_assert_int_eq(st.nodes, 1);
    ck_assert_int_eq(st.cached_tokens, 40);
    ck_assert_int_eq(st.blocks_held, 3);
    ck_assert_int_eq(st.blocks_index_only, 3);
    ck_assert_uint_eq(st.lookups, 5);
    ck_assert_uint_eq(st.hits, 4);
    ck_assert_uint_eq(st.misses, 1);
    ck_assert_uint_eq(st.tokens_saved, 40 + 39 + 16 + 40);
    ck_assert_uint_eq(st.tokens_inserted, 40);
    check_index(px);
    prefix_free(px);
    ck_assert(p.reclaim == NULL);
    ck_assert_int_eq(kv_blocks_used(&p), 0);
    kv_pool_free(&p);
}
END_TEST

START_TEST(partial_match_splits_and_shares) {
    kv_pool p;
    init_pool(&p, 32);
    prefix_index *px = prefix_create(&p);
    int32_t a[40], b[50];
    seq_tokens(a, 40, 1);
    memcpy(b, a, 25 * sizeof *b);
    seq_tokens(b + 25, 25, 2);                              /* diverges at 25 */
    ck_assert_int_eq(cache_prompt(&p, px, "", a, 40, PREFIX_AUTO, 300, 0), 40);
    ck_assert_int_eq(match_check(&p, px, "", b, 50, 1), 25); /* inside the node, no split */
    prefix_stats st;
    prefix_get_stats(px, &st);
    ck_assert_int_eq(st.nodes, 1);
    /* Insert b through a sequence that reused the match (as the engine does). */
    kv_seq s = {0};
    ck_assert_int_eq(prefix_match(px, "", b, 49, 1, &s), 25);
    int32_t shared1 = s.blocks[1];
    ck_assert_int_eq(compute(&p, &s, b, 50), 0);            /* copy on write of block 1 */
    ck_assert_int_ne(s.blocks[1], shared1);
    ck_assert_int_eq(prefix_insert(px, "", b, 50, &s, PREFIX_AUTO, 300, 2), 25);
    kv_seq_release(&p, &s);
    prefix_get_stats(px, &st);
    ck_assert_int_eq(st.nodes, 3);                          /* [0,25) with kids [25,40), [25,50) */
    ck_assert_int_eq(st.entries, 2);
    ck_assert_int_eq(st.cached_tokens, 65);
    ck_assert_int_eq(st.blocks_held, 3 + 3);                /* a: 0,1,2; b: its own 1,2,3 */
    check_index(px);
    ck_assert_int_eq(match_check(&p, px, "", a, 40, 3), 40);
    ck_assert_int_eq(match_check(&p, px, "", b, 50, 3), 50);
    ck_assert_int_eq(match_check(&p, px, "", b, 30, 3), 30);
    ck_assert_int_eq(match_check(&p, px, "", a, 25, 3), 25);
    /* A prefix ending exactly inside an existing node: split, no tokens added. */
    ck_assert_int_eq(cache_prompt(&p, px, "", a, 10, PREFIX_EXPLICIT, 3600, 4), 0);
    prefix_get_stats(px, &st);
    ck_assert_int_eq(st.nodes, 4);
    ck_assert_int_eq(st.entries, 3);
    ck_assert_int_eq(st.entries_explicit, 1);
    check_index(px);
    ck_assert_int_eq(match_check(&p, px, "", a, 40, 5), 40);
    ck_assert_int_eq(match_check(&p, px, "", b, 50, 5), 50);
    prefix_free(px);
    ck_assert_int_eq(kv_blocks_used(&p), 0);
    kv_pool_free(&p);
}
END_TEST

START_TEST(one_changed_token_invalidates_the_rest) {
    kv_pool p;
    init_pool(&p, 32);
    prefix_index *px = prefix_create(&p);
    int32_t a[50], q[50];
    seq_tokens(a, 50, 3);
    ck_assert_int_eq(cache_prompt(&p, px, "", a, 50, PREFIX_AUTO, 300, 0), 50);
    for (int at = 0; at < 50; at += 7) {
        memcpy(q, a, sizeof q);
        q[at] = 7;                                          /* one different token */
        ck_assert_int_eq(match_check(&p, px, "", q, 50, 1), at);
    }
    /* no minimum length: a 1-token cached prefix matches */
    int32_t one[3] = { 42, 1, 2 };
    ck_assert_int_eq(cache_prompt(&p, px, "", one, 1, PREFIX_AUTO, 300, 1), 1);
    ck_assert_int_eq(match_check(&p, px, "", one, 3, 2), 1);
    ck_assert_int_eq(match_check(&p, px, "", one, 1, 2), 1);
    ck_assert_int_eq(match_check(&p, px, "", one, 0, 2), 0);
    check_index(px);
    prefix_free(px);
    ck_assert_int_eq(kv_blocks_used(&p), 0);
    kv_pool_free(&p);
}
END_TEST

START_TEST(namespaces_are_isolated) {
    kv_pool p;
    init_pool(&p, 64);
    prefix_index *px = prefix_create(&p);
    int32_t a[20];
    seq_tokens(a, 20, 4);
    ck_assert_int_eq(cache_prompt(&p, px, "tenant-a", a, 20, PREFIX_AUTO, 300, 0), 20);
    ck_assert_int_eq(match_check(&p, px, "tenant-b", a, 20, 1), 0);
    ck_assert_int_eq(match_check(&p, px, "", a, 20, 1), 0);
    ck_assert_int_eq(match_check(&p, px, "tenant-a", a, 20, 1), 20);
    /* the same tokens in another namespace are stored and counted as new */
    ck_assert_int_eq(cache_prompt(&p, px, "tenant-b", a, 20, PREFIX_AUTO, 300, 1), 20);
    /* many namespaces (hash table growth) */
    char name[32];
    for (int i = 0; i < 40; i++) {
        snprintf(name, sizeof name, "ns%d", i);
        int32_t t[3] = { i, i + 1, i + 2 };
        ck_assert_int_eq(cache_prompt(&p, px, name, t, 3, PREFIX_AUTO, 300, 1), 3);
    }
    for (int i = 0; i < 40; i++) {
        snprintf(name, sizeof name, "ns%d", i);
        int32_t t[3] = { i, i + 1, i + 2 };
        ck_assert_int_eq(match_check(&p, px, name, t, 3, 2), 3);
        snprintf(name, sizeof name, "ns%d", (i + 1) % 40);
        ck_assert_int_eq(match_check(&p, px, name, t, 3, 2), 0);
    }
    prefix_stats st;
    prefix_get_stats(px, &st);
    ck_assert_int_eq(st.namespaces, 42);
    check_index(px);
    ck_assert_int_eq(prefix_clear_ns(px, "tenant-a"), 1);
    ck_assert_int_eq(match_check(&p, px, "tenant-a", a, 20, 3), 0);
    ck_assert_int_eq(match_check(&p, px, "tenant-b", a, 20, 3), 20);
    prefix_get_stats(px, &st);
    ck_assert_int_eq(st.namespaces, 41);
    check_index(px);
    prefix_free(px);
    ck_assert_int_eq(kv_blocks_used(&p), 0);
    kv_pool_free(&p);
}
END_TEST

START_TEST(refcounts_all_blocks_return) {
    kv_pool p;
    init_pool(&p, 64);
    prefix_index *px = prefix_create(&p);
    int32_t t[8][70];
    kv_seq held[8] = {{0}};
    for (int i = 0; i < 8; i++) {
        seq_tokens(t[i], 70, i % 3);                        /* prompts 0,3,6 etc. coincide */
        t[i][20 + i * 5] = -i;                              /* then diverge at different points */
        int m = prefix_match(px, "", t[i], 69, i, &held[i]);
        ck_assert_int_ge(m, 0);
        ck_assert_int_eq(compute(&p, &held[i], t[i], 70), 0);
        ck_assert_int_ge(prefix_insert(px, "", t[i], 70, &held[i], PREFIX_AUTO, 300, i), 0);
        check_index(px);
    }
    for (int i = 0; i < 8; i++) ck_assert(data_ok(&p, &held[i], t[i], 70));
    /* the pool's refcount of each block = sequence holders + index holders */
    for (int i = 0; i < 8; i++) kv_seq_release(&p, &held[i]);
    prefix_stats st;
    prefix_get_stats(px, &st);
    ck_assert_int_eq(kv_blocks_used(&p), st.blocks_held);
    ck_assert_int_eq(st.blocks_index_only, st.blocks_held);
    ck_assert_int_eq(prefix_evict(px, 1000, 10), st.blocks_held);   /* evicts all, frees all */
    ck_assert_int_eq(kv_blocks_used(&p), 0);
    prefix_get_stats(px, &st);
    ck_assert_int_eq(st.entries, 0);
    ck_assert_int_eq(st.nodes, 0);
    ck_assert_int_eq(st.namespaces, 0);
    check_index(px);
    prefix_free(px);
    kv_pool_free(&p);
}
END_TEST

START_TEST(ttl_with_driven_clock) {
    kv_pool p;
    init_pool(&p, 32);
    prefix_index *px = prefix_create(&p);
    int32_t a[20], b[20];
    seq_tokens(a, 20, 5);
    seq_tokens(b, 20, 6);
    ck_assert_int_eq(cache_prompt(&p, px, "", a, 20, PREFIX_AUTO, 300, 1000), 20);
    ck_assert_int_eq(cache_prompt(&p, px, "", b, 20, PREFIX_AUTO, 300, 1000), 20);
    ck_assert_int_eq(match_check(&p, px, "", a, 20, 1299.5), 20);   /* hit refreshes a to 1599.5 */
    ck_assert_int_eq(match_check(&p, px, "", b, 20, 1300), 0);      /* b expired at exactly 1300 */
    ck_assert_int_eq(kv_blocks_used(&p), 2);
    ck_assert_int_eq(match_check(&p, px, "", a, 20, 1599.4), 20);   /* refreshed to 1899.4 */
    ck_assert_int_eq(prefix_expire(px, 1899.3), 0);
    ck_assert_int_eq(prefix_expire(px, 1899.4), 1);
    ck_assert_int_eq(kv_blocks_used(&p), 0);
    prefix_stats st;
    prefix_get_stats(px, &st);
    ck_assert_uint_eq(st.evicted_expired, 2);
    ck_assert_uint_eq(st.evictions, 2);
    ck_assert_int_eq(st.entries, 0);
    /* A hit that ends inside an entry's node (the engine asks n_prompt - 1) refreshes it too;
     * a shorter entry on the path is refreshed as well. */
    ck_assert_int_eq(cache_prompt(&p, px, "", a, 20, PREFIX_AUTO, 300, 2000), 20);
    ck_assert_int_eq(cache_prompt(&p, px, "", a, 8, PREFIX_EXPLICIT, 300, 2000), 0);
    ck_assert_int_eq(match_check(&p, px, "", a, 19, 2200), 19);
    ck_assert_int_eq(match_check(&p, px, "", a, 20, 2400), 20);  /* without that refresh: 8 */
    ck_assert_int_eq(prefix_expire(px, 2699), 0);
    ck_assert_int_eq(prefix_expire(px, 2700), 2);
    /* Explicit 1h entry: upgrade of an existing automatic one keeps the longer ttl. */
    ck_assert_int_eq(cache_prompt(&p, px, "", a, 20, PREFIX_AUTO, 300, 3000), 20);
    ck_assert_int_eq(cache_prompt(&p, px, "", a, 20, PREFIX_EXPLICIT, 3600, 3000), 0);
    ck_assert_int_eq(cache_prompt(&p, px, "", a, 20, PREFIX_AUTO, 300, 3001), 0);  /* no downgrade */
    prefix_get_stats(px, &st);
    ck_assert_int_eq(st.entries_explicit, 1);
    ck_assert_int_eq(st.entries_auto, 0);
    ck_assert_int_eq(match_check(&p, px, "", a, 20, 6000), 20);
    ck_assert_int_eq(match_check(&p, px, "", a, 20, 9600), 0);
    check_index(px);
    prefix_free(px);
    ck_assert_int_eq(kv_blocks_used(&p), 0);
    kv_pool_free(&p);
}
END_TEST

/* Pool of 8 blocks; three 2-block prompts cached; a new sequence needs blocks: expired first,
 * then least recently used automatic, then explicit by earliest expiry. */
START_TEST(eviction_order_under_pressure) {
    kv_pool p;
    init_pool(&p, 8);
    prefix_index *px = prefix_create(&p);
    int32_t e1[32], e2[32], a1[32], a2[32], x[80];
    seq_tokens(e1, 32, 10);
    seq_tokens(e2, 32, 11);
    seq_tokens(a1, 32, 12);
    seq_tokens(a2, 32, 13);
    seq_tokens(x, 80, 14);
    ck_assert_int_eq(cache_prompt(&p, px, "", e1, 32, PREFIX_EXPLICIT, 3600, 0), 32);
    ck_assert_int_eq(cache_prompt(&p, px, "", e2, 32, PREFIX_EXPLICIT, 600, 0), 32);
    ck_assert_int_eq(cache_prompt(&p, px, "", a1, 32, PREFIX_AUTO, 300, 0), 32);
    ck_assert_int_eq(cache_prompt(&p, px, "", a2, 32, PREFIX_AUTO, 300, 1), 32);
    ck_assert_int_eq(kv_blocks_used(&p), 8);
    ck_assert_int_eq(match_check(&p, px, "", a1, 32, 10), 32);    /* a1 now more recent than a2 */
    kv_seq s = {0};
    ck_assert_int_eq(compute(&p, &s, x, 32), 0);                 /* needs 2: evicts a2 only */
    ck_assert_int_eq(match_check(&p, px, "", a2, 32, 10), 0);
    ck_assert_int_eq(match_check(&p, px, "", a1, 32, 10), 32);
    ck_assert_int_eq(match_check(&p, px, "", e1, 32, 10), 32);
    ck_assert_int_eq(match_check(&p, px, "", e2, 32, 10), 32);
    ck_assert_int_eq(compute(&p, &s, x, 33), 0);                 /* 1 more: evicts a1 */
    ck_assert_int_eq(match_check(&p, px, "", a1, 32, 11), 0);
    ck_assert_int_eq(match_check(&p, px, "", e2, 32, 11), 32);
    ck_assert_int_eq(compute(&p, &s, x, 64), 0);                 /* a1 freed 2: one is still free */
    ck_assert_int_eq(match_check(&p, px, "", e2, 32, 11), 32);
    ck_assert_int_eq(compute(&p, &s, x, 80), 0);                 /* 1 more: explicit, earliest expiry: e2 */
    ck_assert_int_eq(match_check(&p, px, "", e2, 32, 12), 0);
    ck_assert_int_eq(match_check(&p, px, "", e1, 32, 12), 32);
    prefix_stats st;
    prefix_get_stats(px, &st);
    ck_assert_uint_eq(st.evicted_auto_lru, 2);
    ck_assert_uint_eq(st.evicted_explicit, 1);
    ck_assert_uint_eq(st.evicted_expired, 0);
    ck_assert_uint_eq(st.reclaim_calls, 3);
    ck_assert_uint_eq(st.reclaim_short, 0);
    kv_seq_release(&p, &s);
    /* Expired entries go before any live one, even one used more recently. (e1 expired at
     * 3600 and is dropped by the next insert's expiry check.) */
    ck_assert_int_eq(cache_prompt(&p, px, "", a1, 32, PREFIX_AUTO, 300, 5000), 32);
    ck_assert_int_eq(cache_prompt(&p, px, "", a2, 32, PREFIX_AUTO, 10, 5000), 32);
    ck_assert_int_eq(match_check(&p, px, "", a2, 32, 5005), 32);  /* a2 expires at 5015 */
    ck_assert_int_eq(prefix_evict(px, 1, 5020), 2);               /* a2 (expired), not a1 */
    ck_assert_int_eq(match_check(&p, px, "", e1, 32, 5020), 0);
    ck_assert_int_eq(match_check(&p, px, "", a1, 32, 5020), 32);
    check_index(px);
    prefix_free(px);
    ck_assert_int_eq(kv_blocks_used(&p), 0);
    kv_pool_free(&p);
}
END_TEST

/* Blocks a running sequence holds survive any pressure with their data intact; eviction
 * reports that it could not free enough. */
START_TEST(held_blocks_survive_pressure) {
    kv_pool p;
    init_pool(&p, 6);
    prefix_index *px = prefix_create(&p);
    int32_t h[40], o[40];
    seq_tokens(h, 40, 20);
    seq_tokens(o, 40, 21);
    kv_seq held = {0};
    ck_assert_int_eq(compute(&p, &held, h, 40), 0);              /* 3 blocks */
    ck_assert_int_eq(prefix_insert(px, "", h, 40, &held, PREFIX_AUTO, 300, 0), 40);
    ck_assert_int_eq(cache_prompt(&p, px, "", o, 40, PREFIX_AUTO, 300, 1), 40); /* 3 more: full */
    ck_assert_int_eq(kv_blocks_used(&p), 6);
    int32_t big[200];
    seq_tokens(big, 200, 22);
    kv_seq s = {0};
    ck_assert_int_eq(compute(&p, &s, big, 200), -1);             /* 13 blocks: impossible */
    ck_assert_int_eq(s.n_blocks, 0);
    prefix_stats st;
    prefix_get_stats(px, &st);
    ck_assert_int_eq(st.entries, 0);                             /* everything evicted ... */
    ck_assert_uint_eq(st.reclaim_short, 1);                      /* ... and it said so */
    ck_assert(data_ok(&p, &held, h, 40));                        /* held blocks untouched */
    ck_assert_int_eq(kv_blocks_used(&p), 3);
    ck_assert_int_eq(compute(&p, &s, big, 48), 0);               /* the 3 free ones */
    ck_assert_int_eq(kv_block_alloc(&p), -1);
    ck_assert(data_ok(&p, &held, h, 40));
    ck_assert(data_ok(&p, &s, big, 48));
    ck_assert_int_eq(prefix_evict(px, 1, 10), 0);
    kv_seq_release(&p, &s);
    kv_seq_release(&p, &held);
    ck_assert_int_eq(kv_blocks_used(&p), 0);
    check_index(px);
    prefix_free(px);
    kv_pool_free(&p);
}
END_TEST

/* Two sequences match the same cached partial block and append different tokens. */
START_TEST(copy_on_write_after_match) {
    kv_pool p;
    init_pool(&p, 16);
    prefix_index *px = prefix_create(&p);
    int32_t a[30], b[30], c[30];
    seq_tokens(a, 30, 30);
    memcpy(b, a, sizeof b);
    memcpy(c, a, sizeof c);
    b[20] = 1;
    c[20] = 2;
    ck_assert_int_eq(cache_prompt(&p, px, "", a, 20, PREFIX_AUTO, 300, 0), 20);
    kv_seq sb = {0}, sc = {0};
    ck_assert_int_eq(prefix_match(px, "", b, 29, 1, &sb), 20);
    ck_assert_int_eq(prefix_match(px, "", c, 29, 1, &sc), 20);
    ck_assert_int_eq(sb.blocks[1], sc.blocks[1]);
    int32_t cached1 = sb.blocks[1];
    ck_assert_int_eq(p.refcnt[cached1], 3);
    ck_assert_int_eq(compute(&p, &sb, b, 30), 0);
    ck_assert_int_eq(compute(&p, &sc, c, 30), 0);
    ck_assert_int_ne(sb.blocks[1], cached1);
    ck_assert_int_ne(sc.blocks[1], cached1);
    ck_assert_int_ne(sb.blocks[1], sc.blocks[1]);
    ck_assert_int_eq(sb.blocks[0], sc.blocks[0]);                /* the full block stays shared */
    ck_assert_int_eq(p.refcnt[cached1], 1);                      /* only the index now */
    ck_assert(data_ok(&p, &sb, b, 30));
    ck_assert(data_ok(&p, &sc, c, 30));
    ck_assert_int_eq(match_check(&p, px, "", a, 20, 2), 20);     /* cached data unchanged */
    kv_seq_release(&p, &sb);
    kv_seq_release(&p, &sc);
    prefix_free(px);
    ck_assert_int_eq(kv_blocks_used(&p), 0);
    kv_pool_free(&p);
}
END_TEST

START_TEST(bad_arguments) {
    kv_pool p;
    init_pool(&p, 8);
    prefix_index *px = prefix_create(&p);
    int32_t a[20];
    seq_tokens(a, 20, 40);
    kv_seq s = {0};
    ck_assert_int_eq(compute(&p, &s, a, 10), 0);
    ck_assert_int_eq(prefix_insert(px, "", a, 11, &s, PREFIX_AUTO, 300, 0), -1);   /* n > computed */
    ck_assert_int_eq(prefix_insert(px, "", a, 10, &s, 7, 300, 0), -1);
    ck_assert_int_eq(prefix_insert(px, "", a, 10, &s, PREFIX_AUTO, 0, 0), -1);
    ck_assert_int_eq(prefix_insert(px, "", a, 10, &s, PREFIX_AUTO, -1, 0), -1);
    ck_assert_int_eq(prefix_insert(px, "", NULL, 10, &s, PREFIX_AUTO, 300, 0), -1);
    ck_assert_int_eq(prefix_insert(px, "", a, -1, &s, PREFIX_AUTO, 300, 0), -1);
    ck_assert_int_eq(prefix_insert(px, "", a, 0, &s, PREFIX_AUTO, 300, 0), 0);
    ck_assert_int_eq(prefix_match(px, "", a, 10, 0, &s), -1);                      /* out not empty */
    ck_assert_int_eq(prefix_match(px, "", NULL, 10, 0, NULL), -1);
    ck_assert_int_eq(prefix_match(px, "", a, -3, 0, NULL), -1);
    prefix_stats st;
    prefix_get_stats(px, &st);
    ck_assert_int_eq(st.entries, 0);
    ck_assert_int_eq(st.namespaces, 0);
    ck_assert_ptr_null(prefix_create(NULL));
    prefix_free(NULL);
    kv_seq_release(&p, &s);
    check_index(px);
    prefix_free(px);
    kv_pool_free(&p);
}
END_TEST

/* ---- randomized comparison with a brute-force model ---- */

#define MAXLEN 80
#define NSTEM 6
typedef struct {
    int ns;
    int32_t t[MAXLEN];
    int n, kind;
    double ttl, expiry, last_use;
    bool seen;
} ment;

typedef struct {
    ment *e;
    int n, cap;
} model;

static const char *NS[2] = { "", "tenant" };

static int lcp(const int32_t *a, int na, const int32_t *b, int nb) {
    int i = 0;
    while (i < na && i < nb && a[i] == b[i]) i++;
    return i;
}
static int model_best(const model *m, int ns, const int32_t *t, int n) {
    int best = 0;
    for (int i = 0; i < m->n; i++)
        if (m->e[i].ns == ns) {
            int l = lcp(m->e[i].t, m->e[i].n, t, n);
            if (l > best) best = l;
        }
    return best;
}
static void model_expire(model *m, double now) {
    int j = 0;
    for (int i = 0; i < m->n; i++)
        if (m->e[i].expiry > now) m->e[j++] = m->e[i];
    m->n = j;
}
static ment *model_find(model *m, int ns, const int32_t *t, int n) {
    for (int i = 0; i < m->n; i++)
        if (m->e[i].ns == ns && m->e[i].n == n && !memcmp(m->e[i].t, t, (size_t)n * sizeof *t)) return &m->e[i];
    return NULL;
}
static void model_insert(model *m, int ns, const int32_t *t, int n, int kind, double ttl, double now) {
    ment *e = model_find(m, ns, t, n);
    if (e) {
        if (kind > e->kind) e->kind = kind;
        if (ttl > e->ttl) e->ttl = ttl;
        e->last_use = now;
        if (now + e->ttl > e->expiry) e->expiry = now + e->ttl;
        return;
    }
    if (m->n == m->cap) {
        m->cap = m->cap ? m->cap * 2 : 64;
        m->e = realloc(m->e, (size_t)m->cap * sizeof *m->e);
        ck_assert_ptr_nonnull(m->e);
    }
    e = &m->e[m->n++];
    memset(e, 0, sizeof *e);
    e->ns = ns;
    memcpy(e->t, t, (size_t)n * sizeof *t);
    e->n = n;
    e->kind = kind;
    e->ttl = ttl;
    e->expiry = now + ttl;
    e->last_use = now;
}

typedef struct { int cls; double key; } mprio;
static mprio mprio_of(const ment *e, double now) {
    if (e->expiry <= now) return (mprio){ 0, e->expiry };
    if (e->kind == PREFIX_AUTO) return (mprio){ 1, e->last_use };
    return (mprio){ 2, e->expiry };
}
static bool mprio_le(mprio a, mprio b) { return a.cls != b.cls ? a.cls < b.cls : a.key <= b.key; }

typedef struct {
    model *m;
    double now;
    int ns;             /* namespace of that query */
    const int32_t *q;   /* the query of a match just done (NULL: no refresh allowed) */
    int qm;
    int errors;
    char msg[256];
} sync_ctx;

static int sync_visit(void *user, const prefix_entry_info *ie) {
    sync_ctx *c = user;
    int ns = !strcmp(ie->ns, NS[0]) ? 0 : !strcmp(ie->ns, NS[1]) ? 1 : -1;
    ment *e = ns < 0 || ie->n_tokens > MAXLEN ? NULL : model_find(c->m, ns, ie->tokens, ie->n_tokens);
    if (!e) { snprintf(c->msg, sizeof c->msg, "index has an entry the model does not (n=%d)", ie->n_tokens); return 1; }
    if (e->seen) { snprintf(c->msg, sizeof c->msg, "duplicate entry"); return 1; }
    e->seen = true;
    if (ie->kind != e->kind || ie->ttl != e->ttl) { snprintf(c->msg, sizeof c->msg, "kind/ttl differ"); return 1; }
    bool must = c->q && e->ns == c->ns && e->n <= c->qm && lcp(e->t, e->n, c->q, c->qm) >= e->n;   /* on the matched path */
    double rexp = c->now + e->ttl > e->expiry ? c->now + e->ttl : e->expiry;
    bool same = ie->expiry == e->expiry && ie->last_use == e->last_use;
    bool refreshed = ie->expiry == rexp && ie->last_use == c->now;
    if (must && !refreshed) { snprintf(c->msg, sizeof c->msg, "entry on the matched path not refreshed"); return 1; }
    if (!same && !(c->q && refreshed)) { snprintf(c->msg, sizeof c->msg, "expiry/last use changed unexpectedly"); return 1; }
    e->expiry = ie->expiry;
    e->last_use = ie->last_use;
    return 0;
}

/* Reconciles the model with the index after an operation at time now: every index entry is a
 * model entry (refreshed only if allowed), and the model entries the index dropped were the
 * lowest-priority ones (never an entry ranked above a survivor). */
static void sync(model *m, prefix_index *px, double now, int ns, const int32_t *q, int qm) {
    for (int i = 0; i < m->n; i++) m->e[i].seen = false;
    sync_ctx c = { .m = m, .now = now, .ns = ns, .q = q, .qm = qm };
    int rc = prefix_visit(px, sync_visit, &c);
    if (rc) ck_abort_msg("sync: %s", c.msg);
    mprio worst_gone = { -1, 0 };
    bool any_gone = false;
    for (int i = 0; i < m->n; i++)
        if (!m->e[i].seen) {
            mprio pr = mprio_of(&m->e[i], now);
            if (!any_gone || mprio_le(worst_gone, pr)) worst_gone = pr;
            any_gone = true;
        }
    if (any_gone)
        for (int i = 0; i < m->n; i++)
            if (m->e[i].seen && !mprio_le(worst_gone, mprio_of(&m->e[i], now)))
                ck_abort_msg("evicted an entry (cls %d key %g) ranked above a survivor (cls %d key %g)",
                             worst_gone.cls, worst_gone.key, mprio_of(&m->e[i], now).cls, mprio_of(&m->e[i], now).key);
    int j = 0;
    for (int i = 0; i < m->n; i++)
        if (m->e[i].seen) m->e[j++] = m->e[i];
    m->n = j;
}

static uint64_t rng_state;
static uint32_t rnd(uint32_t n) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(rng_state >> 33) % n;
}

typedef struct { kv_seq s; int32_t t[MAXLEN]; int n; } held_seq;

#define NHELD 4
START_TEST(randomized_against_brute_force) {   /* _i: the seed */
    kv_pool p;
    init_pool(&p, 24);   /* small enough that held sequences sometimes fill it */
    prefix_index *px = prefix_create(&p);
    model m = {0};
    rng_state = 12345 + (uint64_t)_i * 7777;
    int32_t stems[NSTEM][MAXLEN];
    for (int i = 0; i < NSTEM; i++)
        for (int j = 0; j < MAXLEN; j++) stems[i][j] = (int32_t)rnd(3);
    held_seq held[NHELD];
    memset(held, 0, sizeof held);
    double now = 0;
    int n_match = 0, n_hit = 0, n_insert = 0, n_evict = 0, n_full = 0;
    for (int op = 0; op < 6000; op++) {
        now += rnd(100) < 3 ? 250 + rnd(400) : rnd(20);
        int kind = (int)rnd(10);
        if (kind < 7) {
            /* a request: match, compute the rest, cache (explicit breakpoint sometimes) */
            int ns = rnd(4) == 0 ? 1 : 0;
            int32_t t[MAXLEN];
            int n = 1 + (int)rnd(MAXLEN);
            if (m.n > 0 && rnd(3) == 0) {                   /* extend or cut a cached one */
                ment *e = &m.e[rnd((uint32_t)m.n)];
                int keep = (int)rnd((uint32_t)e->n + 1);
                memcpy(t, e->t, (size_t)keep * sizeof *t);
                for (int i = keep; i < n; i++) t[i] = (int32_t)rnd(3);
                if (keep > n) n = keep;
            } else {
                const int32_t *st = stems[rnd(NSTEM)];
                int keep = (int)rnd((uint32_t)n + 1);
                memcpy(t, st, (size_t)n * sizeof *t);
                for (int i = keep; i < n; i++) t[i] = (int32_t)rnd(3);
                if (rnd(4) == 0) t[rnd((uint32_t)n)] = 3;   /* one changed token */
            }
            int q = rnd(2) ? n - 1 : n;
            model_expire(&m, now);
            int expect = model_best(&m, ns, t, q);
            kv_seq s = {0};
            int got = prefix_match(px, NS[ns], t, q, now, &s);
            if (got != expect) ck_abort_msg("op %d: match %d, brute force %d (n=%d)", op, got, expect, q);
            ck_assert(data_ok(&p, &s, t, got));
            n_match++;
            if (got > 0) n_hit++;
            sync(&m, px, now, ns, t, got);
            if (compute(&p, &s, t, n) != 0) {
                n_full++;
                sync(&m, px, now, 0, NULL, 0);
                kv_seq_release(&p, &s);
                continue;
            }
            sync(&m, px, now, 0, NULL, 0);
            if (rnd(4) == 0) {
                int bp = 1 + (int)rnd((uint32_t)n);
                double ttl = rnd(2) ? 300 : 3600;
                int want = bp - model_best(&m, ns, t, bp);
                ck_assert_int_eq(prefix_insert(px, NS[ns], t, bp, &s, PREFIX_EXPLICIT, ttl, now), want);
                model_insert(&m, ns, t, bp, PREFIX_EXPLICIT, ttl, now);
                sync(&m, px, now, 0, NULL, 0);
            }
            int want = n - model_best(&m, ns, t, n);
            ck_assert_int_eq(prefix_insert(px, NS[ns], t, n, &s, PREFIX_AUTO, 300, now), want);
            model_insert(&m, ns, t, n, PREFIX_AUTO, 300, now);
            sync(&m, px, now, 0, NULL, 0);
            n_insert++;
            int slot = (int)rnd(2 * NHELD);
            if (slot < NHELD) {                                  /* keep it running for a while */
                kv_seq_release(&p, &held[slot].s);
                held[slot].s = s;
                memcpy(held[slot].t, t, (size_t)n * sizeof *t);
                held[slot].n = n;
            } else {
                kv_seq_release(&p, &s);
            }
        } else if (kind == 7) {
            prefix_evict(px, 1 + (int)rnd(6), now);
            sync(&m, px, now, 0, NULL, 0);
            n_evict++;
        } else if (kind == 8) {
            prefix_expire(px, now);
            model_expire(&m, now);
            sync(&m, px, now, 0, NULL, 0);
        } else {
            int slot = (int)rnd(NHELD);
            kv_seq_release(&p, &held[slot].s);
            held[slot].n = 0;
        }
        for (int i = 0; i < NHELD; i++) ck_assert(data_ok(&p, &held[i].s, held[i].t, held[i].n));
        if (op % 50 == 0) check_index(px);
    }
    check_index(px);
    prefix_stats st;
    prefix_get_stats(px, &st);
    printf("randomized (seed %d): %d matches (%d hits), %d inserts, %d evict calls, %d pool-full, %llu evictions, "
           "%d entries left, %d nodes\n", _i, n_match, n_hit, n_insert, n_evict, n_full,
           (unsigned long long)st.evictions, st.entries, st.nodes);
    /* the run must have exercised what it claims to */
    ck_assert_int_gt(n_hit, n_match / 4);
    ck_assert_int_lt(n_hit, n_match);
    ck_assert_uint_gt(st.evicted_auto_lru, 50);
    ck_assert_uint_gt(st.evicted_expired, 50);
    ck_assert_uint_gt(st.evicted_explicit, 0);
    for (int i = 0; i < NHELD; i++) kv_seq_release(&p, &held[i].s);
    ck_assert_int_eq(kv_blocks_used(&p), st.blocks_held);
    prefix_free(px);
    ck_assert_int_eq(kv_blocks_used(&p), 0);
    free(m.e);
    kv_pool_free(&p);
}
END_TEST

/* ---- micro-benchmark: lookup of a 2000-token cached prompt ---- */

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

START_TEST(bench_lookup_2000) {
    kv_pool p;
    init_pool(&p, 600);
    prefix_index *px = prefix_create(&p);
    enum { N = 2000 };
    static int32_t t[N];
    for (int i = 0; i < N; i++) t[i] = (int32_t)((i * 7919) % 49152);
    /* a realistic tree: 50 other conversations sharing the first 500 tokens (system prompt) */
    for (int k = 0; k < 50; k++) {
        int32_t u[600];
        memcpy(u, t, 500 * sizeof *u);
        for (int i = 500; i < 600; i++) u[i] = (int32_t)((k * 31 + i) % 49152);
        ck_assert_int_eq(cache_prompt(&p, px, "", u, 600, PREFIX_AUTO, 300, 0), k == 0 ? 600 : 100);
    }
    ck_assert_int_ge(cache_prompt(&p, px, "", t, N, PREFIX_AUTO, 300, 0), N - 500);
    int iters = 20000;
    double t0 = mono();
    long sum = 0;
    for (int i = 0; i < iters; i++) {
        kv_seq s = {0};
        sum += prefix_match(px, "", t, N - 1, 1, &s);
        kv_seq_release(&p, &s);
    }
    double us = (mono() - t0) / iters * 1e6;
    ck_assert_int_eq(sum, (long)iters * (N - 1));
    kv_seq s = {0};
    ck_assert_int_eq(prefix_insert(px, "", t, N, &s, PREFIX_AUTO, 300, 1), -1);
    ck_assert_int_eq(prefix_match(px, "", t, N, 1, &s), N);
    t0 = mono();
    for (int i = 0; i < 1000; i++) prefix_insert(px, "", t, N, &s, PREFIX_AUTO, 300, 1);    /* re-insert: refresh */
    double us_ins = (mono() - t0) / 1000 * 1e6;
    kv_seq_release(&p, &s);
    printf("bench: prefix_match of a 2000-token cached prompt (+ release): %.2f us; re-insert: %.2f us\n", us, us_ins);
    prefix_free(px);
    kv_pool_free(&p);
}
END_TEST

int main(void) {
    Suite *s = suite_create("prefix");
    TCase *tc = tcase_create("index");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, insert_and_exact_match);
    tcase_add_test(tc, partial_match_splits_and_shares);
    tcase_add_test(tc, one_changed_token_invalidates_the_rest);
    tcase_add_test(tc, namespaces_are_isolated);
    tcase_add_test(tc, refcounts_all_blocks_return);
    tcase_add_test(tc, ttl_with_driven_clock);
    tcase_add_test(tc, eviction_order_under_pressure);
    tcase_add_test(tc, held_blocks_survive_pressure);
    tcase_add_test(tc, copy_on_write_after_match);
    tcase_add_test(tc, bad_arguments);
    tcase_add_loop_test(tc, randomized_against_brute_force, 0, 3);
    tcase_add_test(tc, bench_lookup_2000);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
