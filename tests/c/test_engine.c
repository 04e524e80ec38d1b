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
#include "kv.h"
#include "util.h"
#include "engine_harness.h"

static double fake_now;
static double fake_clock(void *ctx) { (void)ctx; return fake_now; }

static const char *model_path(void) { return default_model_path(); }

static engine *make_engine(size_t kv_mem, int max_batch, bool cache) {
    engine_opts o = { .model_path = model_path(), .kv_mem_bytes = kv_mem, .cache_enabled = cache,
                      .n_threads = 2, .max_batch_tokens = max_batch, .clock = fake_clock };
    engine *e;
    char err[512];
    if (engine_create(&e, &o, err, sizeof err)) { fprintf(stderr, "%s\n", err); return NULL; }
    return e;
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

/* ---- admission, preemption, logprobs (issue 8) ---- */

static engine_request greedy_req(const int32_t *ids, int n, int max_tokens, result *r) {
    engine_request q = { .prompt = ids, .n_prompt = n, .max_tokens = max_tokens, .ignore_eos = true,
                         .on_text = on_text, .on_done = on_done, .user = r };
    sample_params_default(&q.sp);
    q.sp.temperature = 0;
    return q;
}

/* A pool that holds two of these sequences, not five: requests queue, running ones are
 * preempted when their decode needs blocks, and every text (greedy and seeded sampling) is
 * the one the request gives alone. */
START_TEST(preemption_is_transparent) {
    fake_now = 1;
    enum { NQ = 5, GEN = 40 };
    engine *e = make_engine(10 * 368640u, 64, true);   /* 10 blocks = 160 tokens */
    ck_assert_ptr_nonnull(e);
    const char *qs[NQ] = { "The capital of France is Paris, and the capital of Italy is",
                           "def fibonacci(n):\n    if n < 2:\n        return n\n",
                           "Once upon a time, in a small village by the sea, there lived",
                           "1, 2, 3, 5, 8, 13, 21, 34, 55, 89,",
                           "<|im_start|>user\nWrite a haiku about autumn.<|im_end|>\n<|im_start|>assistant\n" };
    result alone[NQ], together[NQ];
    int32_t *ids[NQ];
    int n[NQ];
    char err[256];
    for (int i = 0; i < NQ; i++) {
        n[i] = encode(e, qs[i], &ids[i]);
        ck_assert_int_le(n[i] + GEN, 160);
        engine *solo = make_engine(64u << 20, 512, false);
        memset(&alone[i], 0, sizeof alone[i]);
        engine_request q = greedy_req(ids[i], n[i], GEN, &alone[i]);
        if (i == 2) { q.sp.temperature = 0.9f; q.sp.seed = 1234; }   /* one seeded sampler */
        ck_assert_int_ge(engine_submit(solo, &q, err, sizeof err), 0);
        while (!alone[i].done) engine_step(solo);
        ck_assert_int_eq(alone[i].why, FINISH_LENGTH);
        engine_free(solo);
    }
    memset(together, 0, sizeof together);
    for (int i = 0; i < NQ; i++) {
        engine_request q = greedy_req(ids[i], n[i], GEN, &together[i]);
        if (i == 2) { q.sp.temperature = 0.9f; q.sp.seed = 1234; }
        ck_assert_int_ge(engine_submit(e, &q, err, sizeof err), 0);
    }
    engine_stats st;
    int max_queued = 0;
    for (int guard = 0; guard < 5000 && engine_step(e) > 0; guard++) {
        engine_get_stats(e, &st);
        if (st.queued_seqs > max_queued) max_queued = st.queued_seqs;
        ck_assert_int_le(st.kv_blocks_used, st.kv_blocks_total);
    }
    for (int i = 0; i < NQ; i++) {
        ck_assert_msg(together[i].done, "request %d never finished", i);
        ck_assert_int_eq(together[i].why, FINISH_LENGTH);
        ck_assert_int_eq(together[i].u.completion_tokens, GEN);
        ck_assert_msg(strcmp(together[i].text, alone[i].text) == 0, "request %d: '%s' vs alone '%s'", i,
                      together[i].text, alone[i].text);
        free(ids[i]);
    }
    engine_get_stats(e, &st);
    ck_assert_int_gt(st.preemptions, 0);
    ck_assert_int_gt(max_queued, 0);
    ck_assert_int_eq(st.active_seqs, 0);
    ck_assert_int_eq(st.queued_seqs, 0);
    engine_free(e);
}
END_TEST

/* What can never fit is refused at submit; what has no max_tokens ends at the pool. */
START_TEST(pool_limits) {
    fake_now = 1;
    engine *e = make_engine(10 * 368640u, 64, true);   /* 160 tokens */
    ck_assert_ptr_nonnull(e);
    int32_t *ids;
    int n = encode(e, PROMPT, &ids);
    ck_assert_int_lt(n, 100);
    result r;
    memset(&r, 0, sizeof r);
    char err[256] = "";
    engine_request q = greedy_req(ids, n, 200, &r);
    ck_assert_int_eq(engine_submit(e, &q, err, sizeof err), -1);
    ck_assert_msg(strstr(err, "--kv-mem"), "%s", err);
    q.max_tokens = 8192;   /* beyond the context (8192) too */
    ck_assert_int_eq(engine_submit(e, &q, err, sizeof err), -1);
    ck_assert_msg(strstr(err, "context"), "%s", err);
    q.max_tokens = 0;      /* no limit: runs until the pool is full */
    ck_assert_int_ge(engine_submit(e, &q, err, sizeof err), 0);
    for (int guard = 0; guard < 1000 && !r.done; guard++) engine_step(e);
    ck_assert(r.done);
    ck_assert_int_eq(r.why, FINISH_LENGTH);
    ck_assert_int_ge(n + r.u.completion_tokens, 160 - KV_BLOCK);
    ck_assert_int_le(n + r.u.completion_tokens, 160 + 1);
    free(ids);
    engine_free(e);
}
END_TEST

typedef struct { engine_token_info ti[64]; int n; } lp_log;
static void on_token(void *user, const engine_token_info *ti) {
    lp_log *l = user;
    if (l->n < 64) l->ti[l->n++] = *ti;
}
typedef struct { result r; lp_log lp; } lp_result;
static void lp_on_text(void *u, const char *t, size_t n) { on_text(&((lp_result *)u)->r, t, n); }
static void lp_on_done(void *u, finish_reason w, const engine_usage *us, const char *err) {
    on_done(&((lp_result *)u)->r, w, us, err);
}
static void lp_on_token(void *u, const engine_token_info *ti) { on_token(&((lp_result *)u)->lp, ti); }

/* logprobs are log-softmax of the logits the sampler saw; logit_bias moves the choice. */
START_TEST(logprobs_and_logit_bias) {
    engine *e = make_engine(64u << 20, 512, true);
    ck_assert_ptr_nonnull(e);
    int32_t *ids;
    int n = encode(e, PROMPT, &ids);
    int nv = 49152;
    float *lg = malloc(sizeof(float) * nv);
    lp_result a;
    memset(&a, 0, sizeof a);
    engine_request q = { .prompt = ids, .n_prompt = n, .max_tokens = 6, .logprobs = 5, .prompt_logits = lg,
                         .on_text = lp_on_text, .on_done = lp_on_done, .on_token = lp_on_token, .user = &a };
    sample_params_default(&q.sp);
    q.sp.temperature = 0;
    char err[256];
    ck_assert_int_ge(engine_submit(e, &q, err, sizeof err), 0);
    while (!a.r.done) engine_step(e);
    ck_assert_int_eq(a.lp.n, a.r.u.completion_tokens);
    ck_assert_int_gt(a.lp.n, 0);
    /* first token against the prompt logits, in double */
    double mx = lg[0], sum = 0;
    for (int i = 1; i < nv; i++) if (lg[i] > mx) mx = lg[i];
    for (int i = 0; i < nv; i++) sum += exp((double)lg[i] - mx);
    const engine_token_info *t0 = &a.lp.ti[0];
    ck_assert_int_eq(t0->n_top, 5);
    ck_assert_int_eq(t0->top[0].token, t0->token);           /* greedy: the best one */
    ck_assert(fabs(t0->logprob - ((double)lg[t0->token] - mx - log(sum))) < 1e-5);
    for (int k = 0; k < 5; k++) {
        ck_assert(fabs(t0->top[k].logprob - ((double)lg[t0->top[k].token] - mx - log(sum))) < 1e-5);
        if (k) ck_assert(t0->top[k].logprob <= t0->top[k - 1].logprob);
    }
    for (int i = 0; i < a.lp.n; i++) ck_assert(a.lp.ti[i].logprob <= 0);
    /* without logprobs or prompt logits the step takes the argmax alone (greedy_only): the
     * same tokens as the sampler's pass over the whole row */
    result g;
    run_req(e, ids, n, NULL, 6, NULL, NULL, 0, 0, &g);
    ck_assert_int_eq(g.u.completion_tokens, a.r.u.completion_tokens);
    ck_assert_str_eq(g.text, a.r.text);
    /* bias the runner-up by +100: it is chosen, with logprob ~0 */
    int32_t second = t0->top[1].token;
    engine_logit_bias b = { second, 100 };
    lp_result c;
    memset(&c, 0, sizeof c);
    q.user = &c;
    q.logit_bias = &b;
    q.n_logit_bias = 1;
    q.max_tokens = 1;
    q.prompt_logits = NULL;
    ck_assert_int_ge(engine_submit(e, &q, err, sizeof err), 0);
    while (!c.r.done) engine_step(e);
    ck_assert_int_eq(c.lp.n, 1);
    ck_assert_int_eq(c.lp.ti[0].token, second);
    ck_assert(c.lp.ti[0].logprob > -1e-3f);
    engine_logit_bias bad = { nv, 1 };
    q.logit_bias = &bad;
    ck_assert_int_eq(engine_submit(e, &q, err, sizeof err), -1);
    free(lg);
    free(ids);
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
    tcase_add_test(tc, preemption_is_transparent);
    tcase_add_test(tc, pool_limits);
    tcase_add_test(tc, logprobs_and_logit_bias);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
