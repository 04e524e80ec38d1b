/* engine_harness: what the engine tests on the real model share: a request's result (text,
 * finish reason, usage) filled by its callbacks, tokenizing a prompt, and running one greedy
 * request alone to completion. Header-only, for the test programs (Check). */
#ifndef PCACHE_ENGINE_HARNESS_H
#define PCACHE_ENGINE_HARNESS_H
#include <check.h>
#include <stdio.h>
#include <string.h>
#include "engine.h"

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

static int encode(engine *e, const char *text, int32_t **ids) {
    char err[256];
    return tokenizer_encode(engine_tok(e), text, strlen(text), false, true, ids, err, sizeof err);
}

/* Submits a greedy request (cache breakpoints at bps[0..n_bps), each for bp_ttl seconds) and
 * runs it alone to completion. */
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
#endif
