/* Engine tests on the real model: the prompt cache is transparent (bit-identical logits and
 * greedy text whatever was cached and however the prompt was chunked or batched), usage
 * accounting, namespaces, TTL with a driven clock, and memory pressure. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "engine.h"
#include "util.h"

static double fake_now;
static double fake_clock(void *ctx) { (void)ctx; return fake_now; }

typedef struct {
    bool done;
    finish_reason why;
    engine_usage u;
    char text[4096];
    size_t n;
} result;

static void on_text(void *user, const char *t, size_t n) {
    result *r = user;
    if (r->n + n < sizeof r->text) { memcpy(r->text + r->n, t, n); r->n += n; r->text[r->n] = 0; }
}
static void on_done(void *user, finish_reason why, const engine_usage *u, const char *err) {
    result *r = user;
    r->done = true;
    r->why = why;
    r->u = *u;
    if (err) fprintf(stderr, "engine error: %s\n", err);
}

static const char *model_path(void) { return default_model_path(); }

static engine *make_engine(size_t kv_mem, int max_batch, bool cache) {
    engine_opts o = { .model_path = model_path(), .kv_mem_bytes = kv_mem, .cache_enabled = cache,
                      .n_threads = 2, .max_batch_tokens = max_batch, .clock = fake_clock };
    engine *e;
    char err[512];
    if (engine_create(&e, &o, err, sizeof err)) { fprintf(stderr, "%s\n", err); return NULL; }
    return e;
}

static int encode(engine *e, const char *text, int32_t **ids) {
    char err[256];
    return tokenizer_encode(engine_tok(e), text, strlen(text), false, true, ids, err, sizeof err);
}

/* Submits and runs to completion (alone). */
static void run_req(engine *e, const int32_t *ids, int n, const char *ns, int max_tokens, float *logits,
                    const int *bps, int n_bps, double bp_ttl, result *r) {
    memset(r, 0, sizeof *r);
    engine_request q = { .ns = ns, .prompt = ids, .n_prompt = n, .max_tokens = max_tokens,
                         .prompt_logits = logits, .on_text = on_text, .on_done = on_done, .user = r };
    sample_params_default(&q.sp);
    q.sp.temperature = 0;
    for (int i = 0; i < n_bps; i++) { q.breakpoints[i].pos = bps[i]; q.breakpoints[i].ttl_s = bp_ttl; }
    q.n_breakpoints = n_bps;
    char err[256];
    ck_assert_int_ge(engine_submit(e, &q, err, sizeof err), 0);
    while (!r->done) engine_step(e);
    ck_assert_int_ne(r->why, FINISH_ERROR);
}

static const char *PROMPT =
    "<|im_start|>system\nYou are a helpful assistant who answers briefly.<|im_end|>\n"
    "<|im_start|>user\nList three facts about the planet Mars, its moons and its color.<|im_end|>\n"
    "<|im_start|>assistant\n";

START_TEST(cache_is_transparent) {
    if (access(model_path(), R_OK) != 0) { ck_abort_msg("model missing: %s", model_path()); }
    engine *cold = make_engine(64u << 20, 512, false);
    ck_assert_ptr_nonnull(cold);
    int32_t *ids;
    int n = encode(cold, PROMPT, &ids);
    ck_assert_int_gt(n, 33);
    int nv = 49152;
    float *ref = malloc(sizeof(float) * nv), *got = malloc(sizeof(float) * nv);
    result r0, r;
    run_req(cold, ids, n, NULL, 24, ref, NULL, 0, 0, &r0);
    ck_assert_int_eq(r0.u.cached_tokens, 0);
    ck_assert_int_gt((int)r0.n, 0);
    engine_free(cold);

    /* Every split point class: 1 token, inside a block, on a block edge, all but one. */
    int splits[] = { 1, 5, 16, 17, 32, n / 2, n - 1 };
    for (size_t k = 0; k < sizeof splits / sizeof splits[0]; k++) {
        for (int chunk = 7; chunk <= 512; chunk += 505) {
            engine *e = make_engine(64u << 20, chunk, true);
            result warm;
            run_req(e, ids, splits[k], NULL, 1, NULL, NULL, 0, 0, &warm);  /* caches the prefix */
            run_req(e, ids, n, NULL, 24, got, NULL, 0, 0, &r);
            ck_assert_int_eq(r.u.cached_tokens, splits[k] < n ? splits[k] : n - 1);
            ck_assert_msg(memcmp(ref, got, sizeof(float) * nv) == 0, "logits differ (split %d, chunk %d)", splits[k], chunk);
            ck_assert_str_eq(r.text, r0.text);
            /* and a third time: the whole prompt is cached now */
            run_req(e, ids, n, NULL, 24, got, NULL, 0, 0, &r);
            ck_assert_int_eq(r.u.cached_tokens, n - 1);
            ck_assert(memcmp(ref, got, sizeof(float) * nv) == 0);
            ck_assert_str_eq(r.text, r0.text);
            engine_free(e);
        }
    }
    /* One changed token invalidates everything after it. */
    engine *e = make_engine(64u << 20, 512, true);
    run_req(e, ids, n, NULL, 1, NULL, NULL, 0, 0, &r);
    int32_t *alt = malloc(sizeof(int32_t) * n);
    memcpy(alt, ids, sizeof(int32_t) * n);
    alt[20] = alt[20] == 100 ? 101 : 100;
    run_req(e, alt, n, NULL, 1, NULL, NULL, 0, 0, &r);
    ck_assert_int_eq(r.u.cached_tokens, 20);
    engine_free(e);
    free(alt);
    free(ids);
    free(ref);
    free(got);
}
END_TEST

/* Several requests batched together give the same text as each alone. */
START_TEST(batching_is_transparent) {
    engine *e = make_engine(64u << 20, 64, true);
    ck_assert_ptr_nonnull(e);
    const char *qs[] = { "The capital of France is", "def fibonacci(n):", "Once upon a time, in a land",
                         "1, 2, 3, 4, 5,", "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n" };
    enum { NQ = 5 };
    result alone[NQ], together[NQ];
    int32_t *ids[NQ];
    int n[NQ];
    for (int i = 0; i < NQ; i++) {
        n[i] = encode(e, qs[i], &ids[i]);
        engine *solo = make_engine(64u << 20, 512, false);
        run_req(solo, ids[i], n[i], NULL, 16, NULL, NULL, 0, 0, &alone[i]);
        engine_free(solo);
    }
    memset(together, 0, sizeof together);
    char err[256];
    for (int i = 0; i < NQ; i++) {
        engine_request q = { .prompt = ids[i], .n_prompt = n[i], .max_tokens = 16,
                             .on_text = on_text, .on_done = on_done, .user = &together[i] };
        sample_params_default(&q.sp);
        q.sp.temperature = 0;
        ck_assert_int_ge(engine_submit(e, &q, err, sizeof err), 0);
        engine_step(e);  /* staggered arrivals: later requests join a running batch */
    }
    for (int guard = 0; guard < 1000 && engine_step(e) > 0; guard++) {}
    for (int i = 0; i < NQ; i++) {
        ck_assert(together[i].done);
        ck_assert_str_eq(together[i].text, alone[i].text);
        free(ids[i]);
    }
    engine_free(e);
}
END_TEST

START_TEST(namespaces_ttl_and_accounting) {
    fake_now = 1000;
    engine *e = make_engine(64u << 20, 512, true);
    ck_assert_ptr_nonnull(e);
    int32_t *ids;
    int n = encode(e, PROMPT, &ids);
    result r;
    int bp = 30;
    run_req(e, ids, n, "tenant-a", 1, NULL, &bp, 1, 3600, &r);
    ck_assert_int_eq(r.u.cached_tokens, 0);
    ck_assert_int_eq(r.u.cache_write_1h, 30);
    ck_assert_int_eq(r.u.cache_write_auto, n - 30);
    run_req(e, ids, n, "tenant-b", 1, NULL, NULL, 0, 0, &r);
    ck_assert_int_eq(r.u.cached_tokens, 0);   /* another tenant never hits a's entries */
    run_req(e, ids, n, "tenant-a", 1, NULL, NULL, 0, 0, &r);
    ck_assert_int_eq(r.u.cached_tokens, n - 1);
    /* 10 minutes later the automatic entries (5 min TTL) are gone, the 1h breakpoint stays */
    fake_now += 600;
    run_req(e, ids, n, "tenant-a", 1, NULL, NULL, 0, 0, &r);
    ck_assert_int_eq(r.u.cached_tokens, 30);
    fake_now += 3601;
    run_req(e, ids, n, "tenant-a", 1, NULL, NULL, 0, 0, &r);
    ck_assert_int_eq(r.u.cached_tokens, 0);
    engine_stats st;
    engine_get_stats(e, &st);
    ck_assert_int_eq(st.requests, 5);
    free(ids);
    engine_free(e);
}
END_TEST

/* A pool far smaller than the traffic: entries are evicted, answers stay right. */
START_TEST(memory_pressure) {
    fake_now = 1;
    /* one block = 30 layers * 2 (K,V) * 16 tokens * 192 * 2 bytes (fp16) = 368640; 10 blocks */
    engine *e = make_engine(10 * 368640u, 512, true);
    ck_assert_ptr_nonnull(e);
    engine *ref = make_engine(64u << 20, 512, false);
    char text[256];
    for (int i = 0; i < 12; i++) {
        snprintf(text, sizeof text, "Request %d: tell me something about the number %d and its square.", i, i * 7);
        int32_t *ids;
        int n = encode(e, text, &ids);
        result a, b;
        run_req(e, ids, n, NULL, 8, NULL, NULL, 0, 0, &a);
        run_req(ref, ids, n, NULL, 8, NULL, NULL, 0, 0, &b);
        ck_assert_str_eq(a.text, b.text);
        free(ids);
    }
    engine_stats st;
    engine_get_stats(e, &st);
    ck_assert_int_gt(st.evictions, 0);
    ck_assert_int_le(st.kv_blocks_used, st.kv_blocks_total);
    engine_free(ref);
    engine_free(e);
}
END_TEST

int main(void) {
    Suite *s = suite_create("engine");
    TCase *tc = tcase_create("engine");
    tcase_set_timeout(tc, 900);
    tcase_add_test(tc, cache_is_transparent);
    tcase_add_test(tc, batching_is_transparent);
    tcase_add_test(tc, namespaces_ttl_and_accounting);
    tcase_add_test(tc, memory_pressure);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
