/* Sampler and thread pool tests. */
#include <check.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include "sample.h"
#include "threadpool.h"
#include "util.h"

#define NV 100

static void fill_logits(float *l) {
    for (int i = 0; i < NV; i++) l[i] = (float)((i * 37) % NV) / 10.0f;  /* max at i with i*37%100==99 */
}

static int argmax(const float *l) {
    int b = 0;
    for (int i = 1; i < NV; i++) if (l[i] > l[b]) b = i;
    return b;
}

START_TEST(greedy_is_argmax) {
    float l[NV], copy[NV];
    sample_cand c[NV];
    fill_logits(l);
    memcpy(copy, l, sizeof l);
    sample_params sp;
    sample_params_default(&sp);
    sp.temperature = 0;
    sample_rng r;
    sample_rng_seed(&r, 1);
    ck_assert_int_eq(sample_token(l, NV, &sp, &r, NULL, 0, c), argmax(copy));
}
END_TEST

/* sample_argmax, the contract the GPU's k_argmax keeps too: the first index of the largest,
 * NaNs never win, -0 equals +0, a row of -inf gives its first index, a row of NaNs 0; odd
 * lengths (the eight-lane pass and its tail). */
START_TEST(argmax_ties_nan_and_infinities) {
    float l[NV];
    for (int n = 1; n <= NV; n += 7) {
        for (int i = 0; i < n; i++) l[i] = (float)((i * 37) % 11);
        int want = 0;
        for (int i = 1; i < n; i++) if (l[i] > l[want]) want = i;
        ck_assert_int_eq(sample_argmax(l, n), want);   /* ties: the first */
    }
    for (int i = 0; i < NV; i++) l[i] = NAN;
    ck_assert_int_eq(sample_argmax(l, NV), 0);
    l[63] = -1.0f;
    l[90] = 2.0f;
    l[95] = 2.0f;
    ck_assert_int_eq(sample_argmax(l, NV), 90);
    for (int i = 0; i < NV; i++) l[i] = -INFINITY;
    l[3] = NAN;
    ck_assert_int_eq(sample_argmax(l, NV), 0);
    l[0] = NAN;
    ck_assert_int_eq(sample_argmax(l, NV), 1);
    for (int i = 0; i < NV; i++) l[i] = -1.0f;
    l[41] = -0.0f;
    l[17] = 0.0f;
    l[80] = -0.0f;
    ck_assert_int_eq(sample_argmax(l, NV), 17);
    sample_params sp;
    sample_params_default(&sp);
    ck_assert(!sample_is_greedy(&sp) || sp.top_k == 1);
    sp.temperature = 0;
    ck_assert(sample_is_greedy(&sp));
    sp.temperature = 0.7f;
    sp.top_k = 1;
    ck_assert(sample_is_greedy(&sp));
}
END_TEST

START_TEST(top_k_one_is_greedy_and_top_k_restricts) {
    float l[NV];
    sample_cand c[NV];
    sample_params sp;
    sample_params_default(&sp);
    sp.temperature = 5.0f;  /* flat: without top-k anything could come out */
    sp.top_p = 1; sp.min_p = 0;
    sp.top_k = 3;
    sample_rng r;
    sample_rng_seed(&r, 7);
    fill_logits(l);
    float sorted[NV];
    memcpy(sorted, l, sizeof l);
    /* the third-highest logit */
    for (int i = 0; i < NV; i++) for (int j = i + 1; j < NV; j++) if (sorted[j] > sorted[i]) { float t = sorted[i]; sorted[i] = sorted[j]; sorted[j] = t; }
    int seen[NV] = {0};
    for (int it = 0; it < 2000; it++) {
        fill_logits(l);
        int32_t t = sample_token(l, NV, &sp, &r, NULL, 0, c);
        fill_logits(l);
        ck_assert_msg(l[t] >= sorted[2], "token %d outside the top 3", t);
        seen[t]++;
    }
    int distinct = 0;
    for (int i = 0; i < NV; i++) distinct += seen[i] > 0;
    ck_assert_int_eq(distinct, 3);
}
END_TEST

START_TEST(same_seed_same_tokens) {
    float l[NV];
    sample_cand c[NV];
    sample_params sp;
    sample_params_default(&sp);
    sp.temperature = 1.5f; sp.top_k = 0; sp.top_p = 1; sp.min_p = 0;
    int32_t a[64], b[64];
    for (int run = 0; run < 2; run++) {
        sample_rng r;
        sample_rng_seed(&r, 1234);
        for (int i = 0; i < 64; i++) { fill_logits(l); (run ? b : a)[i] = sample_token(l, NV, &sp, &r, NULL, 0, c); }
    }
    ck_assert_mem_eq(a, b, sizeof a);
    sample_rng r;
    sample_rng_seed(&r, 999);
    int diff = 0;
    for (int i = 0; i < 64; i++) { fill_logits(l); diff += sample_token(l, NV, &sp, &r, NULL, 0, c) != a[i]; }
    ck_assert_int_gt(diff, 0);
}
END_TEST

START_TEST(min_p_and_top_p_cut) {
    float l[NV];
    sample_cand c[NV];
    sample_params sp;
    sample_params_default(&sp);
    sp.temperature = 1; sp.top_k = 0; sp.top_p = 1; sp.min_p = 0.5f;
    sample_rng r;
    sample_rng_seed(&r, 3);
    /* two strong tokens, the rest far below half their probability */
    for (int it = 0; it < 500; it++) {
        for (int i = 0; i < NV; i++) l[i] = 0;
        l[10] = 10; l[20] = 9.9f;
        int32_t t = sample_token(l, NV, &sp, &r, NULL, 0, c);
        ck_assert(t == 10 || t == 20);
    }
    sp.min_p = 0; sp.top_p = 0.5f;
    for (int it = 0; it < 500; it++) {
        for (int i = 0; i < NV; i++) l[i] = 0;
        l[10] = 10; l[20] = 9.0f;  /* p(10) ~ 0.73 > 0.5: only 10 survives */
        ck_assert_int_eq(sample_token(l, NV, &sp, &r, NULL, 0, c), 10);
    }
}
END_TEST

START_TEST(penalties_change_choice) {
    float l[NV];
    sample_cand c[NV];
    sample_params sp;
    sample_params_default(&sp);
    sp.temperature = 0;
    sample_rng r;
    sample_rng_seed(&r, 3);
    int32_t hist[] = { 5, 5, 5 };
    for (int i = 0; i < NV; i++) l[i] = 0;
    l[5] = 2.0f; l[6] = 1.5f;
    sp.repeat_penalty = 1.5f;  /* 2.0 / 1.5 = 1.33 < 1.5 */
    ck_assert_int_eq(sample_token(l, NV, &sp, &r, hist, 3, c), 6);
    for (int i = 0; i < NV; i++) l[i] = 0;
    l[5] = 2.0f; l[6] = 1.5f;
    sp.repeat_penalty = 1.0f;
    sp.frequency_penalty = 0.1f;  /* 2.0 - 0.3 = 1.7 > 1.5 */
    ck_assert_int_eq(sample_token(l, NV, &sp, &r, hist, 3, c), 5);
    for (int i = 0; i < NV; i++) l[i] = 0;
    l[5] = 2.0f; l[6] = 1.5f;
    sp.presence_penalty = 0.3f;  /* 2.0 - 0.3 - 0.3 = 1.4 < 1.5 */
    ck_assert_int_eq(sample_token(l, NV, &sp, &r, hist, 3, c), 6);
}
END_TEST

typedef struct { atomic_int hits[64]; atomic_long sum; } tp_ctx;
static void tp_job(void *p, int ith, int nth) {
    tp_ctx *c = p;
    atomic_fetch_add(&c->hits[ith], 1);
    atomic_fetch_add(&c->sum, (long)ith + nth * 1000);
}

START_TEST(threadpool_runs_every_share_once) {
    for (int n = 1; n <= 4; n++) {
        threadpool *tp = tp_create(n);
        ck_assert_ptr_nonnull(tp);
        for (int rep = 0; rep < 1000; rep++) {
            tp_ctx c;
            memset(&c, 0, sizeof c);
            tp_run(tp, tp_job, &c);
            for (int i = 0; i < n; i++) ck_assert_int_eq(atomic_load(&c.hits[i]), 1);
            ck_assert_int_eq(atomic_load(&c.sum), (long)n * (n - 1) / 2 + (long)n * n * 1000);
        }
        tp_free(tp);
    }
}
END_TEST

START_TEST(parse_size_and_duration) {
    size_t s;
    ck_assert_int_eq(parse_size("512M", &s), 0); ck_assert_uint_eq(s, 512u << 20);
    ck_assert_int_eq(parse_size("1G", &s), 0); ck_assert_uint_eq(s, 1u << 30);
    ck_assert_int_eq(parse_size("64KiB", &s), 0); ck_assert_uint_eq(s, 65536);
    ck_assert_int_eq(parse_size("100", &s), 0); ck_assert_uint_eq(s, 100);
    ck_assert_int_eq(parse_size("x", &s), -1);
    ck_assert_int_eq(parse_size("-5M", &s), -1);
    ck_assert_int_eq(parse_size("5Q", &s), -1);
    double d;
    ck_assert_int_eq(parse_duration("5m", &d), 0); ck_assert(d == 300);
    ck_assert_int_eq(parse_duration("1h", &d), 0); ck_assert(d == 3600);
    ck_assert_int_eq(parse_duration("30", &d), 0); ck_assert(d == 30);
    ck_assert_int_eq(parse_duration("1y", &d), -1);
    ck_assert_int_eq(parse_duration("", &d), -1);
}
END_TEST

int main(void) {
    Suite *s = suite_create("sample");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, greedy_is_argmax);
    tcase_add_test(tc, argmax_ties_nan_and_infinities);
    tcase_add_test(tc, top_k_one_is_greedy_and_top_k_restricts);
    tcase_add_test(tc, same_seed_same_tokens);
    tcase_add_test(tc, min_p_and_top_p_cut);
    tcase_add_test(tc, penalties_change_choice);
    tcase_add_test(tc, threadpool_runs_every_share_once);
    tcase_add_test(tc, parse_size_and_duration);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
