/* Router logic tests (no network): the KV index built from events (store, evict, hello/clear
 * resets, bye, other models' entries skipped, entry parsing), expiring predictions, a
 * randomized comparison of the hash sets with a brute-force list, and the routing choice
 * (longest prefix, ties to the least loaded, the load threshold, affinity by rendezvous
 * hashing and its stability when a replica goes, the baselines, nothing healthy). */
#include <check.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "kv.h"
#include "kvevent.h"
#include "kvindex.h"
#include "routing.h"

static const uint64_t FP = 0x1234567890abcdefull;

/* The chains of a prompt of n tokens whose token i is seed * 1000 + i. */
static int chains_of(int seed, int n, const char *ns, uint64_t *out) {
    int32_t t[4096];
    for (int i = 0; i < n; i++) t[i] = seed * 1000 + i;
    return kvevent_prompt_chains(FP, 30, 192, ns, t, n, out, 256);
}

/* An entry from field strings, as the events thread gets it from XREAD. */
static int parse(kvevent_entry *e, const char *v, const char *inst, const char *fp, const char *layout, const char *op,
                 const char *chains) {
    const char *names[6] = { "v", "inst", "fp", "layout", "op", "chains" };
    const char *values[6] = { v, inst, fp, layout, op, chains };
    return kvevent_entry_parse(names, values, chains ? 6 : 5, e);
}

static void store_event(kvindex *x, uint64_t inst, const uint64_t *c, int n) {
    char insts[17], fps[17], list[256 * 17];
    kvevent_hex64(inst, insts);
    kvevent_hex64(FP, fps);
    ck_assert_int_ge(kvevent_format_chains(c, n, list, sizeof list), 0);
    static kvevent_entry e;
    ck_assert_int_eq(parse(&e, "1", insts, fps, "30x192", "store", list), 0);
    ck_assert_int_eq(kvindex_apply(x, &e, FP, 30, 192), 0);
}

START_TEST(index_from_events) {
    kvindex *x = kvindex_new(1 << 16, 16);
    uint64_t a[64], b[64];
    int na = chains_of(1, 100, "", a), nb = chains_of(2, 64, "", b);
    ck_assert_int_eq(na, 6);
    ck_assert_int_eq(nb, 4);
    store_event(x, 7, a, 4);   /* the first 4 blocks of a */
    ck_assert_int_eq(kvindex_match(x, 7, a, na, 1), 4);
    ck_assert_int_eq(kvindex_match(x, 7, b, nb, 1), 0);
    ck_assert_int_eq(kvindex_match(x, 8, a, na, 1), 0);   /* another instance holds nothing */
    ck_assert_uint_eq(kvindex_count(x, 7), 4);
    /* a block evicted in the middle cuts the leading run there */
    static kvevent_entry e;
    char list[64];
    kvevent_format_chains(&a[2], 1, list, sizeof list);
    ck_assert_int_eq(parse(&e, "1", "0000000000000007", "1234567890abcdef", "30x192", "evict", list), 0);
    ck_assert_int_eq(kvindex_apply(x, &e, FP, 30, 192), 0);
    ck_assert_int_eq(kvindex_match(x, 7, a, na, 1), 2);
    ck_assert_uint_eq(kvindex_count(x, 7), 3);
    /* stores are idempotent */
    store_event(x, 7, a, 6);
    store_event(x, 7, a, 6);
    ck_assert_int_eq(kvindex_match(x, 7, a, na, 1), 6);
    ck_assert_uint_eq(kvindex_count(x, 7), 6);
    /* hello resets that instance only */
    store_event(x, 9, b, nb);
    ck_assert_int_eq(parse(&e, "1", "0000000000000007", "1234567890abcdef", "30x192", "hello", NULL), 0);
    ck_assert_int_eq(kvindex_apply(x, &e, FP, 30, 192), 0);
    ck_assert_int_eq(kvindex_match(x, 7, a, na, 1), 0);
    ck_assert_int_eq(kvindex_match(x, 9, b, nb, 1), 4);
    /* clear too */
    store_event(x, 7, a, 6);
    ck_assert_int_eq(parse(&e, "1", "0000000000000007", "1234567890abcdef", "30x192", "clear", NULL), 0);
    ck_assert_int_eq(kvindex_apply(x, &e, FP, 30, 192), 0);
    ck_assert_int_eq(kvindex_match(x, 7, a, na, 1), 0);
    /* bye forgets it */
    ck_assert_int_eq(parse(&e, "1", "0000000000000009", "1234567890abcdef", "30x192", "bye", NULL), 0);
    ck_assert_int_eq(kvindex_apply(x, &e, FP, 30, 192), 0);
    ck_assert_int_eq(kvindex_match(x, 9, b, nb, 1), 0);
    ck_assert_uint_eq(kvindex_count(x, 9), 0);
    /* another model's or layout's entries are skipped */
    kvevent_format_chains(a, 6, list, sizeof list);
    ck_assert_int_eq(parse(&e, "1", "0000000000000007", "1234567890abcdee", "30x192", "store", list), 0);
    ck_assert_int_eq(kvindex_apply(x, &e, FP, 30, 192), 1);
    ck_assert_int_eq(parse(&e, "1", "0000000000000007", "1234567890abcdef", "30x64", "store", list), 0);
    ck_assert_int_eq(kvindex_apply(x, &e, FP, 30, 192), 1);
    ck_assert_int_eq(kvindex_match(x, 7, a, na, 1), 0);
    kvindex_free(x);
}
END_TEST

START_TEST(namespaces_name_other_blocks) {
    uint64_t a[8], b[8], c[8];
    chains_of(1, 64, "", a);
    chains_of(1, 64, "k0123456789abcdef", b);
    chains_of(1, 64, "k0123456789abcdee", c);
    kvindex *x = kvindex_new(1024, 4);
    ck_assert_int_eq(kvindex_store(x, 1, a, 4, 0, 1), 0);
    ck_assert_int_eq(kvindex_match(x, 1, a, 4, 1), 4);
    ck_assert_int_eq(kvindex_match(x, 1, b, 4, 1), 0);
    ck_assert_int_eq(kvindex_store(x, 1, b, 4, 0, 1), 0);
    ck_assert_int_eq(kvindex_match(x, 1, c, 4, 1), 0);
    kvindex_free(x);
}
END_TEST

START_TEST(entry_parsing) {
    static kvevent_entry e;
    const char *I = "00000000000000aa", *F = "1234567890abcdef";
    ck_assert_int_eq(parse(&e, "2", I, F, "30x192", "store", ""), 1);            /* another version: skip */
    ck_assert_int_eq(parse(&e, "1", "aa", F, "30x192", "store", ""), -1);        /* short instance */
    ck_assert_int_eq(parse(&e, "1", I, F, "30", "store", ""), -1);               /* bad layout */
    ck_assert_int_eq(parse(&e, "1", I, F, "30x", "store", ""), -1);
    ck_assert_int_eq(parse(&e, "1", I, F, "0x192", "store", ""), -1);
    /* the layout strictly as written (fuzz_cluster: strtoul took a sign, spaces and leading
     * zeros, and "-18446744073709551586" wrapped around to 30) */
    const char *lenient[] = { " 30x192", "+30x192", "030x192", "30x0192", "30x 192", "30x+192", "-18446744073709551586x192",
                              "30x192 ", "1048577x192", "30x16777217", "4294967326x192" };
    for (size_t i = 0; i < sizeof lenient / sizeof *lenient; i++)
        ck_assert_msg(parse(&e, "1", I, F, lenient[i], "hello", NULL) == -1, "accepted layout '%s'", lenient[i]);
    ck_assert_int_eq(parse(&e, "1", I, F, "1048576x16777216", "hello", NULL), 0);
    ck_assert(e.n_layer == 1u << 20 && e.kv_dim == 1u << 24);
    ck_assert_int_eq(parse(&e, "1", I, F, "30x192", "stash", ""), -1);           /* bad op */
    ck_assert_int_eq(parse(&e, "1", I, F, "30x192", "store", NULL), -1);         /* store without chains */
    ck_assert_int_eq(parse(&e, "1", I, F, "30x192", "store", "0123"), -1);       /* bad chain */
    ck_assert_int_eq(parse(&e, "1", I, F, "30x192", "store", "0123456789abcdef 0123456789abcde"), -1);
    ck_assert_int_eq(parse(&e, "1", I, F, "30x192", "store", "0123456789abcdef fedcba9876543210"), 0);
    ck_assert_int_eq(e.n_chains, 2);
    ck_assert(e.chains[1] == 0xfedcba9876543210ull);
    ck_assert(e.inst == 0xaa && e.fp == FP && e.n_layer == 30 && e.kv_dim == 192 && e.op == KVEV_STORE);
    const char *names[2] = { "v", "op" }, *values[2] = { "1", "hello" };
    ck_assert_int_eq(kvevent_entry_parse(names, values, 2, &e), -1);           /* no instance */
    ck_assert_int_eq(kvevent_entry_parse(names, values, 0, &e), -1);           /* nothing */
}
END_TEST

START_TEST(predictions_expire_and_bound) {
    kvindex *x = kvindex_new(8, 2);
    uint64_t a[16];
    for (int i = 0; i < 16; i++) a[i] = 1000 + (uint64_t)i;
    ck_assert_int_eq(kvindex_store(x, 0, a, 4, 10, 1), 0);   /* expires at 10 */
    ck_assert_int_eq(kvindex_match(x, 0, a, 4, 9), 4);
    ck_assert_int_eq(kvindex_match(x, 0, a, 4, 10), 0);
    ck_assert_int_eq(kvindex_store(x, 0, a, 2, 20, 9), 0);   /* a refresh */
    ck_assert_int_eq(kvindex_match(x, 0, a, 4, 15), 2);
    ck_assert_int_eq(kvindex_store(x, 0, a + 4, 4, 30, 12), 0);   /* 8: full */
    ck_assert_uint_eq(kvindex_count(x, 0), 8);
    ck_assert_int_eq(kvindex_store(x, 0, a + 8, 2, 30, 9), 2);    /* at 9 nothing has expired: refused */
    ck_assert_uint_eq(kvindex_dropped(x), 2);
    ck_assert_int_eq(kvindex_store(x, 0, a + 8, 2, 30, 16), 0);   /* at 16, a[2..3] (expired at 10) make room */
    ck_assert_uint_eq(kvindex_count(x, 0), 8);
    /* owners beyond max_owners: the least recently updated goes */
    ck_assert_int_eq(kvindex_store(x, 1, a, 1, 0, 1), 0);
    ck_assert_int_eq(kvindex_store(x, 0, a, 1, 0, 1), 0);
    ck_assert_int_eq(kvindex_store(x, 2, a, 1, 0, 1), 0);
    ck_assert_uint_eq(kvindex_count(x, 1), 0);
    ck_assert_uint_eq(kvindex_count(x, 0), 8);
    /* the chain hash 0 is a key like any other */
    uint64_t z[2] = { 0, 5 };
    ck_assert_int_eq(kvindex_store(x, 3, z, 2, 0, 1), 0);
    ck_assert_int_eq(kvindex_match(x, 3, z, 2, 1), 2);
    kvindex_evict(x, 3, z, 1);
    ck_assert_int_eq(kvindex_match(x, 3, z, 2, 1), 0);
    ck_assert_uint_eq(kvindex_count(x, 3), 1);
    kvindex_free(x);
}
END_TEST

/* The hash sets against a plain list, over random stores and evicts (collisions forced by a
 * small key range: probe runs, wrap-around and backward-shift deletion all get exercised). */
START_TEST(randomized_against_list) {
    srand(42 + (unsigned)_i);
    kvindex *x = kvindex_new(100000, 4);
    static uint64_t ref[4096];
    static uint8_t in[4096];
    memset(in, 0, sizeof in);
    for (int step = 0; step < 20000; step++) {
        uint64_t k = (uint64_t)(rand() % 4096);
        ref[k] = k * 0x9e3779b97f4a7c15ull;   /* spread keys, 0 included */
        if (rand() % 3) { kvindex_store(x, 5, &ref[k], 1, 0, 1); in[k] = 1; }
        else { kvindex_evict(x, 5, &ref[k], 1); in[k] = 0; }
        if (step % 1000 == 999) {
            size_t n = 0;
            for (int i = 0; i < 4096; i++) {
                n += in[i];
                uint64_t v = (uint64_t)i * 0x9e3779b97f4a7c15ull;
                ck_assert_int_eq(kvindex_match(x, 5, &v, 1, 1), in[i]);
            }
            ck_assert_uint_eq(kvindex_count(x, 5), n);
        }
    }
    kvindex_free(x);
}
END_TEST

static int choose(route_policy p, const route_cand *c, int n, uint64_t affinity, int threshold, uint64_t rr, route_reason *why) {
    route_params rp = { .policy = p, .threshold = threshold, .min_match = 1, .affinity = affinity, .rr = rr };
    return route_choose(&rp, c, n, why);
}

static route_cand cand(bool healthy, int load, int match, uint64_t id) { return (route_cand){ healthy, load, match, id }; }

START_TEST(choose_longest_prefix) {
    route_reason why;
    route_cand c[3] = { cand(true, 0, 2, 11), cand(true, 1, 5, 22), cand(true, 0, 3, 33) };
    ck_assert_int_eq(choose(ROUTE_CACHE, c, 3, 7, 4, 0, &why), 1);
    ck_assert_int_eq(why, RR_PREFIX);
    /* equal prefixes: the least loaded */
    c[0].match = 5;
    c[0].load = 3;
    c[2].match = 5;
    c[2].load = 2;
    ck_assert_int_eq(choose(ROUTE_CACHE, c, 3, 7, 4, 0, &why), 1);
    c[1].load = 2;   /* equal loads too: the affinity order decides, the same way every time */
    int p = choose(ROUTE_CACHE, c, 3, 7, 4, 0, &why);
    ck_assert(p == 1 || p == 2);
    for (uint64_t rr = 0; rr < 10; rr++) ck_assert_int_eq(choose(ROUTE_CACHE, c, 3, 7, 4, rr, &why), p);
    /* an unhealthy holder is skipped */
    c[0] = cand(false, 0, 9, 11);
    ck_assert_int_ne(choose(ROUTE_CACHE, c, 3, 7, 4, 0, &why), 0);
    /* a prefix shorter than min_match does not count: affinity decides */
    route_cand d[3] = { cand(true, 0, 2, 11), cand(true, 0, 0, 22), cand(true, 0, 0, 33) };
    route_params rp = { .policy = ROUTE_CACHE, .threshold = 4, .min_match = 3 };
    int by_affinity[3] = { 0 };
    for (rp.affinity = 0; rp.affinity < 300; rp.affinity++) {
        by_affinity[route_choose(&rp, d, 3, &why)]++;
        ck_assert_int_eq(why, RR_AFFINITY);
    }
    ck_assert(by_affinity[0] && by_affinity[1] && by_affinity[2]);
    d[0].match = 3;
    ck_assert_int_eq(route_choose(&rp, d, 3, &why), 0);
    ck_assert_int_eq(why, RR_PREFIX);
}
END_TEST

START_TEST(choose_load_threshold) {
    route_reason why;
    route_cand c[3] = { cand(true, 6, 8, 11), cand(true, 2, 0, 22), cand(true, 3, 1, 33) };
    ck_assert_int_eq(choose(ROUTE_CACHE, c, 3, 7, 4, 0, &why), 0);   /* 6 <= 2 + 4 */
    ck_assert_int_eq(why, RR_PREFIX);
    c[0].load = 7;                                                            /* 7 > 2 + 4 */
    ck_assert_int_eq(choose(ROUTE_CACHE, c, 3, 7, 4, 0, &why), 1);
    ck_assert_int_eq(why, RR_LOAD);
    c[2].load = 2;   /* equally least loaded: the longer prefix */
    ck_assert_int_eq(choose(ROUTE_CACHE, c, 3, 7, 4, 0, &why), 2);
    ck_assert_int_eq(choose(ROUTE_CACHE, c, 3, 7, 0, 0, &why), 2);    /* threshold 0 */
    c[0].load = 2;
    ck_assert_int_eq(choose(ROUTE_CACHE, c, 3, 7, 0, 0, &why), 0);
}
END_TEST

START_TEST(choose_affinity) {
    route_reason why;
    route_cand c[4] = { cand(true, 0, 0, 101), cand(true, 0, 0, 202), cand(true, 0, 0, 303), cand(true, 0, 0, 404) };
    int hits[4] = { 0 };
    int first[1000];
    for (uint64_t a = 0; a < 1000; a++) {
        int p = choose(ROUTE_CACHE, c, 4, a * 0x9e3779b97f4a7c15ull, 4, a, &why);
        ck_assert_int_eq(why, RR_AFFINITY);
        ck_assert_int_eq(choose(ROUTE_CACHE, c, 4, a * 0x9e3779b97f4a7c15ull, 4, a + 1, &why), p);   /* stable */
        first[a] = p;
        hits[p]++;
    }
    for (int i = 0; i < 4; i++) ck_assert_int_gt(hits[i], 180);   /* roughly even: 250 each */
    /* a replica goes: only its keys move */
    c[2].healthy = false;
    for (uint64_t a = 0; a < 1000; a++) {
        int p = choose(ROUTE_CACHE, c, 4, a * 0x9e3779b97f4a7c15ull, 4, 0, &why);
        ck_assert_int_ne(p, 2);
        if (first[a] != 2) ck_assert_int_eq(p, first[a]);
    }
    /* the affinity replica overloaded: the least loaded */
    c[2].healthy = true;
    uint64_t a = 0;
    while (choose(ROUTE_CACHE, c, 4, a, 4, 0, &why) != 3) a++;
    c[3].load = 5;
    ck_assert_int_ne(choose(ROUTE_CACHE, c, 4, a, 4, 0, &why), 3);
    ck_assert_int_eq(why, RR_LOAD);
    /* affinity keys: prompt_cache_key first, then the namespace, then the prompt */
    int32_t t1[3] = { 1, 2, 3 }, t2[3] = { 1, 2, 4 };
    ck_assert(route_affinity("", NULL, t1, 3) != route_affinity("", NULL, t2, 3));
    ck_assert(route_affinity("", NULL, t1, 3) == route_affinity("", NULL, t1, 3));
    ck_assert(route_affinity("", "user-1", t1, 3) == route_affinity("", "user-1", t2, 3));
    ck_assert(route_affinity("", "user-1", t1, 3) != route_affinity("", "user-2", t1, 3));
    ck_assert(route_affinity("kabc", NULL, t1, 3) == route_affinity("kabc", NULL, t2, 3));
    ck_assert(route_affinity("kabc", NULL, t1, 3) != route_affinity("kabd", NULL, t1, 3));
    ck_assert(route_affinity("kabc", "x", t1, 3) != route_affinity("kabd", "x", t1, 3));
}
END_TEST

START_TEST(choose_baselines) {
    route_reason why;
    route_cand c[3] = { cand(true, 5, 9, 11), cand(false, 0, 0, 22), cand(true, 1, 0, 33) };
    ck_assert_int_eq(choose(ROUTE_ROUND_ROBIN, c, 3, 0, 4, 0, &why), 0);
    ck_assert_int_eq(why, RR_ROUND_ROBIN);
    ck_assert_int_eq(choose(ROUTE_ROUND_ROBIN, c, 3, 0, 4, 1, &why), 2);
    ck_assert_int_eq(choose(ROUTE_ROUND_ROBIN, c, 3, 0, 4, 2, &why), 0);
    ck_assert_int_eq(choose(ROUTE_LEAST_LOADED, c, 3, 0, 4, 0, &why), 2);
    ck_assert_int_eq(why, RR_LEAST_LOADED);
    c[0].load = 1;   /* equal: the counter rotates them */
    int seen[3] = { 0 };
    for (uint64_t rr = 0; rr < 6; rr++) seen[choose(ROUTE_LEAST_LOADED, c, 3, 0, 4, rr, &why)]++;
    ck_assert(seen[0] > 0 && seen[2] > 0 && seen[1] == 0);
    c[0].healthy = c[2].healthy = false;
    ck_assert_int_eq(choose(ROUTE_CACHE, c, 3, 0, 4, 0, &why), -1);
    ck_assert_int_eq(choose(ROUTE_ROUND_ROBIN, c, 3, 0, 4, 0, &why), -1);
    ck_assert_int_eq(choose(ROUTE_LEAST_LOADED, c, 3, 0, 4, 0, &why), -1);
    ck_assert_int_eq(route_policy_parse("round-robin"), ROUTE_ROUND_ROBIN);
    ck_assert_int_eq(route_policy_parse("cache"), ROUTE_CACHE);
    ck_assert_int_eq(route_policy_parse("random"), -1);
    ck_assert_str_eq(route_reason_name(RR_PREFIX), "prefix");
}
END_TEST

START_TEST(replica_urls) {
    char out[64], err[200];
    const char *good[][2] = { { "http://127.0.0.1:8080", "http://127.0.0.1:8080" },
                              { "http://replica1:8080/", "http://replica1:8080" },
                              { "http://my_host.svc-1", "http://my_host.svc-1" },
                              { "http://[::1]:9000//", "http://[::1]:9000" },
                              { "http://h:1/base/", "http://h:1/base" },
                              { "http://h/", "http://h" } };
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
        ck_assert_msg(route_replica_url(good[i][0], out, sizeof out, err, sizeof err) == 0, "refused '%s': %s", good[i][0], err);
        ck_assert_str_eq(out, good[i][1]);
    }
    /* what the former check (http:// and a length) let through: no host, user info (then a
     * /metrics label), quotes and newlines (a broken label), queries the paths end up after */
    const char *bad[] = { NULL, "", "https://h:1", "http://", "http:///", "http://:8080", "http://h:", "http://h:0", "http://h:65536",
                          "http://h:123456", "http://h:8o", "http://user:pw@h:1", "http://h\":1", "http://h:1/a\nb", "http://h :1",
                          "http://h:1?x=1", "http://h:1/#f", "http://[::1", "http://[]:1", "http://[::1]x:1", "http://[g::1]:1",
                          "http://h%41:1", "http://h:1/\x7f" };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        err[0] = 0;
        ck_assert_msg(route_replica_url(bad[i], out, sizeof out, err, sizeof err) == -1, "accepted '%s'", bad[i] ? bad[i] : "(null)");
        ck_assert(err[0]);
    }
    /* too long for the buffer: refused, never truncated */
    ck_assert_int_eq(route_replica_url("http://a-rather-long-replica-host-name.example:8080/with/a/path", out, 32, err, sizeof err), -1);
}
END_TEST

int main(void) {
    Suite *s = suite_create("router");
    TCase *tc = tcase_create("logic");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, index_from_events);
    tcase_add_test(tc, namespaces_name_other_blocks);
    tcase_add_test(tc, entry_parsing);
    tcase_add_test(tc, predictions_expire_and_bound);
    tcase_add_loop_test(tc, randomized_against_list, 0, 3);
    tcase_add_test(tc, choose_longest_prefix);
    tcase_add_test(tc, choose_load_threshold);
    tcase_add_test(tc, choose_affinity);
    tcase_add_test(tc, choose_baselines);
    tcase_add_test(tc, replica_urls);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
