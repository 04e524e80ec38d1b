/* fuzz_api: libFuzzer harness for the OpenAI / Anthropic request parsers (src/api.c).
 * The first byte picks the endpoint; the rest is the body. Accepted requests are also rendered
 * (with a small stand-in chat template) and formatted, so breakpoint mapping and the response
 * writers see every shape the parsers let through. Build and run: scripts/fuzz-api.sh SECONDS. */
#include "api.h"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char *tmpl(void *ctx, const chat_msg *m, int n, bool gen) {
    (void)ctx;
    size_t cap = 64;
    for (int i = 0; i < n; i++) cap += strlen(m[i].role) + strlen(m[i].content) + 32;
    char *s = malloc(cap), *p = s;
    p += sprintf(p, "<s>");
    for (int i = 0; i < n; i++) p += sprintf(p, "<|im_start|>%s\n%s<|im_end|>\n", m[i].role, m[i].content);
    if (gen) sprintf(p, "<|im_start|>assistant\n");
    return s;
}

/* Stand-in token texts, one of them part of a UTF-8 character. */
static const char *piece(void *ctx, int32_t id, size_t *len) {
    (void)ctx;
    static const char *p[] = { "out", "\xe2\x82", "\xac", "", "\"q\\" };
    *len = strlen(p[(uint32_t)id % 5]);
    return p[(uint32_t)id % 5];
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    api_kind kind = (api_kind)(data[0] % 5);   /* every api_kind, the Responses API included */
    api_request r;
    api_error e;
    if (api_parse(kind, (const char *)data + 1, size - 1, &r, &e) < 0) {
        if (e.status < 400 || e.status > 599) abort();
        free(api_format_error(api_is_anthropic(kind), &e));
        return 0;
    }
    char *prompt = NULL;
    size_t len = 0;
    api_bp bps[ENGINE_MAX_BREAKPOINTS];
    int nb = 0;
    if (api_render(&r, tmpl, NULL, &prompt, &len, bps, &nb, &e) == 0) {
        if (nb < 0 || nb > ENGINE_MAX_BREAKPOINTS) abort();
        for (int i = 0; i < nb; i++) {
            if (bps[i].off > len) abort();
            if (i && bps[i].off < bps[i - 1].off) abort();
        }
        /* token ends: one token per 3 bytes */
        size_t ends[64];
        int nt = 0;
        for (size_t o = 3; o <= len && nt < 64; o += 3) ends[nt++] = o;
        for (int i = 0; i < nb; i++) {
            int pos = api_byte_to_token(ends, nt, bps[i].off);
            if (pos < 0 || pos > nt) abort();
        }
        free(prompt);
    }
    engine_usage u = { .prompt_tokens = 10, .cached_tokens = 3, .cache_write_5m = 2, .completion_tokens = 4, .stop_matched = r.n_stop ? 1 : 0 };
    engine_token_info lps[3];
    memset(lps, 0, sizeof lps);
    for (int i = 0; i < 3; i++) {
        lps[i].token = i + (size > 1 ? data[1] : 0);
        lps[i].logprob = -(float)i;
        lps[i].n_top = r.logprobs > 0 ? r.logprobs : 0;
        for (int k = 0; k < lps[i].n_top; k++) { lps[i].top[k].token = k; lps[i].top[k].logprob = -(float)k; }
    }
    api_result res = { .id = "id", .created = 1, .model = "m", .text = "out\xe2\x82\xac", .text_len = 6, .why = FINISH_STOP,
                       .stop_matched = u.stop_matched, .usage = &u, .lps = lps, .n_lps = 3, .tok_text = piece };
    if (r.logprobs > ENGINE_MAX_TOP_LOGPROBS) abort();
    for (int i = 0; i < r.n_logit_bias; i++)
        if (r.logit_bias[i].token < 0 || !(r.logit_bias[i].bias >= -100 && r.logit_bias[i].bias <= 100)) abort();
    free(api_format_response(&r, &res));
    free(api_format_stream_start(&r, &res, 10));
    free(api_format_stream_delta(&r, &res, "d", 1));
    free(api_format_stream_end(&r, &res));
    /* a thinking model's reply (as the server marks it), whole and streamed with its blocks */
    r.think = size > 1 && (data[1] & 1);
    res.reasoning = "why\xe2\x82\xac";
    res.reasoning_len = r.think ? 6 : 0;
    res.reasoning_tokens = r.think ? 2 : 0;
    api_stream st = { 0 };
    free(api_format_response(&r, &res));
    free(api_format_stream_start(&r, &res, 10));
    free(api_format_stream_reasoning(&r, &res, &st));
    free(api_format_stream_text(&r, &res, &st, "t", 1));
    free(api_format_stream_finish(&r, &res, &st));
    api_request_free(&r);
    return 0;
}
