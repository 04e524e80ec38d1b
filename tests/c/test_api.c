/* test_api: request parsing, breakpoint mapping and response formatting of src/api.c. */
#include "api.h"
#include <check.h>
#include <math.h>
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int parse(api_kind k, const char *body, api_request *r, api_error *e) {
    memset(e, 0, sizeof *e);
    return api_parse(k, body, strlen(body), r, e);
}

/* Expects a 400 whose message mentions `needle`. */
static void expect_bad(api_kind k, const char *body, int status, const char *needle) {
    api_request r;
    api_error e;
    int rc = parse(k, body, &r, &e);
    ck_assert_msg(rc < 0, "accepted: %s", body);
    ck_assert_int_eq(e.status, status);
    if (needle) ck_assert_msg(strstr(e.message, needle) || strstr(e.param, needle), "'%s' not in '%s' (param '%s') for %s", needle, e.message, e.param, body);
    api_request_free(&r);
}

/* A ChatML-ish template for tests: "<s>" + "[role]content|" per message + "[assistant]". */
static char *tmpl(void *ctx, const chat_msg *m, int n, const char *const *tools, int n_tools, bool gen) {
    (void)ctx; (void)tools; (void)n_tools;
    size_t cap = 16;
    for (int i = 0; i < n; i++) cap += strlen(m[i].role) + strlen(m[i].content) + 4;
    cap += 16;
    char *s = malloc(cap);
    strcpy(s, "<s>");
    for (int i = 0; i < n; i++) { strcat(s, "["); strcat(s, m[i].role); strcat(s, "]"); strcat(s, m[i].content); strcat(s, "|"); }
    if (gen) strcat(s, "[assistant]");
    return s;
}
/* A template that trims content (so marker placement cannot be verified at a trailing space). */
static char *tmpl_trim(void *ctx, const chat_msg *m, int n, const char *const *tools, int n_tools, bool gen) {
    (void)ctx;
    chat_msg mm[16] = {{0}};
    char *bufs[16];
    for (int i = 0; i < n && i < 16; i++) {
        size_t l = strlen(m[i].content);
        bufs[i] = strdup(m[i].content);
        while (l && bufs[i][l - 1] == ' ') bufs[i][--l] = 0;
        mm[i].role = m[i].role;
        mm[i].content = bufs[i];
    }
    char *s = tmpl(ctx, mm, n, tools, n_tools, gen);
    for (int i = 0; i < n && i < 16; i++) free(bufs[i]);
    return s;
}

START_TEST(openai_chat_valid) {
    api_request r;
    api_error e;
    const char *b = "{\"model\":\"m\",\"messages\":[{\"role\":\"developer\",\"content\":\"sys\"},"
                    "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},{\"type\":\"text\",\"text\":\"b\"}]},"
                    "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"c1\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\\\":1}\"}}]},"
                    "{\"role\":\"tool\",\"tool_call_id\":\"c1\",\"content\":\"42\"}],"
                    "\"temperature\":0,\"top_p\":0.5,\"top_k\":7,\"min_p\":0.1,\"seed\":123,\"max_completion_tokens\":9,"
                    "\"stop\":[\"x\",\"yy\"],\"presence_penalty\":0.5,\"frequency_penalty\":-1,\"stream\":true,"
                    "\"stream_options\":{\"include_usage\":true},\"prompt_cache_key\":\"pk\",\"unknown_field\":[1,2]}";
    ck_assert_int_eq(parse(API_OPENAI_CHAT, b, &r, &e), 0);
    ck_assert_str_eq(r.model, "m");
    ck_assert_int_eq(r.n_msgs, 4);
    ck_assert_str_eq(r.msgs[0].role, "system");
    ck_assert_str_eq(r.msgs[1].content, "ab");
    ck_assert_int_eq(r.msgs[2].n_calls, 1);
    ck_assert_str_eq(r.msgs[2].calls[0].id, "c1");
    ck_assert_str_eq(r.msgs[2].calls[0].name, "f");
    ck_assert_str_eq(r.msgs[2].calls[0].arguments, "{\"a\":1}");
    ck_assert_str_eq(r.msgs[3].role, "tool");
    ck_assert_str_eq(r.msgs[3].content, "42");
    ck_assert_float_eq(r.sp.temperature, 0);
    ck_assert_float_eq_tol(r.sp.top_p, 0.5, 1e-6);
    ck_assert_int_eq(r.sp.top_k, 7);
    ck_assert_float_eq_tol(r.sp.min_p, 0.1, 1e-6);
    ck_assert_float_eq_tol(r.sp.presence_penalty, 0.5, 1e-6);
    ck_assert_float_eq_tol(r.sp.frequency_penalty, -1, 1e-6);
    ck_assert(r.has_seed);
    ck_assert_uint_eq(r.sp.seed, 123);
    ck_assert_int_eq(r.max_tokens, 9);
    ck_assert_int_eq(r.n_stop, 2);
    ck_assert_str_eq(r.stop[1], "yy");
    ck_assert(r.stream && r.include_usage);
    ck_assert_str_eq(r.cache_key, "pk");
    api_request_free(&r);

    ck_assert_int_eq(parse(API_OPENAI_CHAT, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"stop\":\"END\"}", &r, &e), 0);
    ck_assert_int_eq(r.n_stop, 1);
    ck_assert_str_eq(r.stop[0], "END");
    ck_assert_int_eq(r.max_tokens, -1);
    ck_assert(!r.stream && !r.has_seed);
    api_request_free(&r);
}
END_TEST

START_TEST(openai_chat_invalid) {
    expect_bad(API_OPENAI_CHAT, "{\"model\":\"m\",\"messages\":[", 400, "not valid JSON");
    expect_bad(API_OPENAI_CHAT, "{\"model\":\"m\",\"messages\":[]} x", 400, "trailing");
    expect_bad(API_OPENAI_CHAT, "[1,2]", 400, "JSON object");
    expect_bad(API_OPENAI_CHAT, "", 400, "empty");
    expect_bad(API_OPENAI_CHAT, "{\"model\":5,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 400, "model");
    expect_bad(API_OPENAI_CHAT, "{\"model\":\"m\"}", 400, "messages");
    expect_bad(API_OPENAI_CHAT, "{\"model\":\"m\",\"messages\":{}}", 400, "messages");
    expect_bad(API_OPENAI_CHAT, "{\"model\":\"m\",\"messages\":[]}", 400, "messages");
    expect_bad(API_OPENAI_CHAT, "{\"model\":\"m\",\"messages\":[\"hi\"]}", 400, "messages[0]");
    expect_bad(API_OPENAI_CHAT, "{\"model\":\"m\",\"messages\":[{\"role\":\"wizard\",\"content\":\"hi\"}]}", 400, "role");
    expect_bad(API_OPENAI_CHAT, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":5}]}", 400, "messages[0]");
    expect_bad(API_OPENAI_CHAT, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}]}", 400, "not supported");
    const char *base = "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],";
    char b[512];
    struct { const char *field, *needle; } cases[] = {
        { "\"temperature\":\"hot\"}", "temperature" }, { "\"temperature\":3}", "temperature" },
        { "\"top_p\":1.5}", "top_p" }, { "\"max_tokens\":\"10\"}", "max_tokens" }, { "\"max_tokens\":0}", "max_tokens" },
        { "\"max_tokens\":2.5}", "max_tokens" }, { "\"stop\":5}", "stop" }, { "\"stop\":[\"a\",1]}", "stop" },
        { "\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}", "stop" }, { "\"stream\":\"yes\"}", "stream" },
        { "\"stream_options\":{\"include_usage\":true}}", "stream_options" }, { "\"n\":2}", "n" },
        { "\"seed\":1.5}", "seed" }, { "\"prompt_cache_key\":7}", "prompt_cache_key" },
        { "\"presence_penalty\":9}", "presence_penalty" }, { "\"max_tokens\":1e400}", "max_tokens" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(b, sizeof b, "%s%s", base, cases[i].field);
        expect_bad(API_OPENAI_CHAT, b, 400, cases[i].needle);
    }
    /* NUL inside the body */
    api_request r;
    api_error e;
    ck_assert_int_lt(api_parse(API_OPENAI_CHAT, "{\"model\":\"m\0\"}", 14, &r, &e), 0);
    ck_assert_int_eq(e.status, 400);
}
END_TEST

START_TEST(openai_completion) {
    api_request r;
    api_error e;
    ck_assert_int_eq(parse(API_OPENAI_COMPLETION, "{\"model\":\"m\",\"prompt\":\"Once upon\",\"max_tokens\":3}", &r, &e), 0);
    ck_assert_str_eq(r.prompt, "Once upon");
    ck_assert_int_eq(r.max_tokens, 3);
    char *p; size_t n; api_bp bps[4]; int nb;
    ck_assert_int_eq(api_render(&r, tmpl, NULL, &p, &n, bps, &nb, &e), 0);
    ck_assert_str_eq(p, "Once upon");
    ck_assert_int_eq(nb, 0);
    free(p);
    api_request_free(&r);
    ck_assert_int_eq(parse(API_OPENAI_COMPLETION, "{\"model\":\"m\",\"prompt\":[\"x\"]}", &r, &e), 0);
    ck_assert_str_eq(r.prompt, "x");
    api_request_free(&r);
    expect_bad(API_OPENAI_COMPLETION, "{\"model\":\"m\"}", 400, "prompt");
    expect_bad(API_OPENAI_COMPLETION, "{\"model\":\"m\",\"prompt\":[\"a\",\"b\"]}", 400, "batch");
}
END_TEST

/* `model` is optional in the parser (the server decides what a missing one means). */
START_TEST(model_optional) {
    api_request r;
    api_error e;
    ck_assert_int_eq(parse(API_OPENAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", &r, &e), 0);
    ck_assert_ptr_null(r.model);
    api_request_free(&r);
    ck_assert_int_eq(parse(API_ANTHROPIC_MESSAGES, "{\"max_tokens\":2,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", &r, &e), 0);
    ck_assert_ptr_null(r.model);
    api_request_free(&r);
    ck_assert_int_eq(parse(API_OPENAI_CHAT, "{\"model\":\"gpt-4o-mini\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", &r, &e), 0);
    ck_assert_str_eq(r.model, "gpt-4o-mini");
    api_request_free(&r);
}
END_TEST

/* Completions' prompt as token ids: one array of integers (or an array holding one). */
START_TEST(completion_token_ids) {
    api_request r;
    api_error e;
    ck_assert_int_eq(parse(API_OPENAI_COMPLETION, "{\"prompt\":[1,2,3]}", &r, &e), 0);
    ck_assert_ptr_null(r.prompt);
    ck_assert_int_eq(r.n_prompt_ids, 3);
    ck_assert_int_eq(r.prompt_ids[0], 1);
    ck_assert_int_eq(r.prompt_ids[2], 3);
    api_request_free(&r);
    ck_assert_int_eq(parse(API_OPENAI_COMPLETION, "{\"prompt\":[[7, 0]]}", &r, &e), 0);
    ck_assert_int_eq(r.n_prompt_ids, 2);
    ck_assert_int_eq(r.prompt_ids[0], 7);
    ck_assert_int_eq(r.prompt_ids[1], 0);
    api_request_free(&r);
    ck_assert_int_eq(parse(API_OPENAI_COMPLETION, "{\"prompt\":[5]}", &r, &e), 0);
    ck_assert_int_eq(r.n_prompt_ids, 1);
    api_request_free(&r);
    expect_bad(API_OPENAI_COMPLETION, "{\"prompt\":[]}", 400, "empty");
    expect_bad(API_OPENAI_COMPLETION, "{\"prompt\":[[]]}", 400, "empty");
    expect_bad(API_OPENAI_COMPLETION, "{\"prompt\":[1,2.5]}", 400, "prompt[1]");
    expect_bad(API_OPENAI_COMPLETION, "{\"prompt\":[1,2.5]}", 400, "not an integer");
    expect_bad(API_OPENAI_COMPLETION, "{\"prompt\":[1,-2]}", 400, "out of range");
    expect_bad(API_OPENAI_COMPLETION, "{\"prompt\":[1,3e12]}", 400, "out of range");
    expect_bad(API_OPENAI_COMPLETION, "{\"prompt\":[1,\"a\"]}", 400, "prompt[1]");
    expect_bad(API_OPENAI_COMPLETION, "{\"prompt\":[1,[2,3]]}", 400, "nested");
    expect_bad(API_OPENAI_COMPLETION, "{\"prompt\":[[[1]]]}", 400, "nested");
    expect_bad(API_OPENAI_COMPLETION, "{\"prompt\":[1,null]}", 400, "prompt[1]");
    expect_bad(API_OPENAI_COMPLETION, "{\"prompt\":[[1,2],[3,4]]}", 400, "batch");
    expect_bad(API_OPENAI_COMPLETION, "{\"prompt\":[\"a\",[3,4]]}", 400, "batch");
    expect_bad(API_OPENAI_COMPLETION, "{\"prompt\":5}", 400, "token ids");
}
END_TEST

START_TEST(anthropic_valid_and_breakpoints) {
    api_request r;
    api_error e;
    const char *b =
        "{\"model\":\"m\",\"max_tokens\":16,\"stop_sequences\":[\"\\n\\nHuman:\"],\"temperature\":0.2,\"top_k\":5,"
        "\"tools\":[{\"name\":\"get_weather\",\"description\":\"d\",\"input_schema\":{\"type\":\"object\"},"
        "\"cache_control\":{\"type\":\"ephemeral\",\"ttl\":\"1h\"}}],"
        "\"system\":[{\"type\":\"text\",\"text\":\"SYS1\"},{\"type\":\"text\",\"text\":\"SYS2\",\"cache_control\":{\"type\":\"ephemeral\"}}],"
        "\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"DOC\",\"cache_control\":{\"type\":\"ephemeral\",\"ttl\":\"5m\"}},"
        "{\"type\":\"text\",\"text\":\"Q?\"}]},{\"role\":\"assistant\",\"content\":\"A\"},{\"role\":\"user\",\"content\":\"more\"}]}";
    ck_assert_int_eq(parse(API_ANTHROPIC_MESSAGES, b, &r, &e), 0);
    ck_assert_int_eq(r.n_breakpoints, 3);
    ck_assert_int_eq(r.max_tokens, 16);
    ck_assert_int_eq(r.sp.top_k, 5);
    ck_assert_int_eq(r.n_stop, 1);
    ck_assert_int_eq(r.n_msgs, 4); /* system + 3 */
    ck_assert_str_eq(r.msgs[0].role, "system");
    const char *sys = r.msgs[0].content;
    ck_assert_str_eq(sys, "SYS1\nSYS2");
    /* the tool, in OpenAI's form (what chat templates render), without cache_control */
    ck_assert_int_eq(r.n_tools, 1);
    ck_assert_str_eq(r.tools[0].name, "get_weather");
    ck_assert_str_eq(r.tools[0].json, "{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"description\":\"d\",\"parameters\":{\"type\":\"object\"}}}");
    ck_assert_str_eq(r.tools[0].parameters, "{\"type\":\"object\"}");
    ck_assert_int_eq(r.msgs[0].n_bp, 1);
    ck_assert_int_eq(strncmp(sys + r.msgs[0].bp[0].off - 4, "SYS2", 4), 0);
    /* the tools' breakpoint: where the first turn's text starts (tools are rendered before it) */
    ck_assert_int_eq(r.msgs[1].n_bp, 2);
    ck_assert_int_eq((int)r.msgs[1].bp[0].off, 0);
    ck_assert_int_eq(r.msgs[1].bp[0].ttl_s, 3600);
    ck_assert_int_eq((int)r.msgs[1].bp[1].off, 3);

    char *p; size_t n; api_bp bps[4]; int nb = -1;
    ck_assert_int_eq(api_render(&r, tmpl, NULL, &p, &n, bps, &nb, &e), 0);
    ck_assert_int_eq(nb, 3);
    ck_assert_uint_eq(n, strlen(p));
    /* each offset ends exactly where its block ends in the rendered prompt */
    ck_assert_int_eq(strncmp(p + bps[0].off - 4, "SYS2", 4), 0);
    ck_assert_int_eq(strncmp(p + bps[1].off - 6, "[user]", 6), 0);
    ck_assert_int_eq(strncmp(p + bps[2].off - 3, "DOC", 3), 0);
    ck_assert(bps[0].off < bps[1].off && bps[1].off < bps[2].off);
    ck_assert_int_eq((int)bps[1].ttl_s, 3600);
    ck_assert_int_eq((int)bps[2].ttl_s, 300);
    ck_assert_ptr_null(strstr(p, "\x1f"));
    /* the same request without cache_control renders to the same prompt */
    api_request r2;
    const char *b2 =
        "{\"model\":\"m\",\"max_tokens\":16,\"stop_sequences\":[\"\\n\\nHuman:\"],"
        "\"tools\":[{\"name\":\"get_weather\",\"description\":\"d\",\"input_schema\":{\"type\":\"object\"}}],"
        "\"system\":[{\"type\":\"text\",\"text\":\"SYS1\"},{\"type\":\"text\",\"text\":\"SYS2\"}],"
        "\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"DOC\"},"
        "{\"type\":\"text\",\"text\":\"Q?\"}]},{\"role\":\"assistant\",\"content\":\"A\"},{\"role\":\"user\",\"content\":\"more\"}]}";
    ck_assert_int_eq(parse(API_ANTHROPIC_MESSAGES, b2, &r2, &e), 0);
    char *p2; size_t n2; int nb2;
    ck_assert_int_eq(api_render(&r2, tmpl, NULL, &p2, &n2, bps, &nb2, &e), 0);
    ck_assert_int_eq(nb2, 0);
    ck_assert_str_eq(p, p2);
    free(p); free(p2);
    api_request_free(&r);
    api_request_free(&r2);
}
END_TEST

START_TEST(anthropic_render_fallback_and_prefill) {
    api_request r;
    api_error e;
    /* trailing space before the breakpoint: a trimming template breaks marker verification */
    const char *b = "{\"model\":\"m\",\"max_tokens\":4,\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"abc \","
                    "\"cache_control\":{\"type\":\"ephemeral\"}}]},{\"role\":\"assistant\",\"content\":\"x\"},{\"role\":\"user\",\"content\":\"q\"}]}";
    ck_assert_int_eq(parse(API_ANTHROPIC_MESSAGES, b, &r, &e), 0);
    char *p; size_t n; api_bp bps[4]; int nb;
    ck_assert_int_eq(api_render(&r, tmpl_trim, NULL, &p, &n, bps, &nb, &e), 0);
    ck_assert_int_eq(nb, 1);
    /* fallback: the end of the rendered first message */
    ck_assert_int_eq(strncmp(p, "<s>[user]abc|", bps[0].off), 0);
    ck_assert_uint_eq(bps[0].off, strlen("<s>[user]abc|"));
    free(p);
    api_request_free(&r);
    /* assistant prefill: the prompt ends with the assistant's text after the generation prompt */
    ck_assert_int_eq(parse(API_ANTHROPIC_MESSAGES, "{\"model\":\"m\",\"max_tokens\":4,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"Sure:\"}]}", &r, &e), 0);
    ck_assert(r.assistant_prefill);
    ck_assert_int_eq(api_render(&r, tmpl, NULL, &p, &n, bps, &nb, &e), 0);
    ck_assert_str_eq(p, "<s>[user]hi|[assistant]Sure:");
    free(p);
    api_request_free(&r);
}
END_TEST

START_TEST(anthropic_invalid) {
    const char *five =
        "{\"model\":\"m\",\"max_tokens\":4,\"system\":[{\"type\":\"text\",\"text\":\"a\",\"cache_control\":{\"type\":\"ephemeral\"}},"
        "{\"type\":\"text\",\"text\":\"b\",\"cache_control\":{\"type\":\"ephemeral\"}}],\"messages\":[{\"role\":\"user\",\"content\":["
        "{\"type\":\"text\",\"text\":\"c\",\"cache_control\":{\"type\":\"ephemeral\"}},{\"type\":\"text\",\"text\":\"d\",\"cache_control\":{\"type\":\"ephemeral\"}},"
        "{\"type\":\"text\",\"text\":\"e\",\"cache_control\":{\"type\":\"ephemeral\"}}]}]}";
    expect_bad(API_ANTHROPIC_MESSAGES, five, 400, "maximum of 4 blocks");
    expect_bad(API_ANTHROPIC_MESSAGES, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 400, "max_tokens");
    expect_bad(API_ANTHROPIC_MESSAGES, "{\"model\":\"m\",\"max_tokens\":\"4\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 400, "max_tokens");
    expect_bad(API_ANTHROPIC_MESSAGES, "{\"model\":\"m\",\"max_tokens\":4,\"messages\":[{\"role\":\"system\",\"content\":\"hi\"}]}", 400, "role");
    expect_bad(API_ANTHROPIC_MESSAGES, "{\"model\":\"m\",\"max_tokens\":4,\"messages\":[{\"role\":\"user\",\"content\":7}]}", 400, "content");
    expect_bad(API_ANTHROPIC_MESSAGES, "{\"model\":\"m\",\"max_tokens\":4,\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image\"}]}]}", 400, "not supported");
    expect_bad(API_ANTHROPIC_MESSAGES, "{\"model\":\"m\",\"max_tokens\":4,\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\"}]}]}", 400, "text");
    expect_bad(API_ANTHROPIC_MESSAGES, "{\"model\":\"m\",\"max_tokens\":4,\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\",\"cache_control\":{\"type\":\"persistent\"}}]}]}", 400, "ephemeral");
    expect_bad(API_ANTHROPIC_MESSAGES, "{\"model\":\"m\",\"max_tokens\":4,\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\",\"cache_control\":{\"type\":\"ephemeral\",\"ttl\":\"2h\"}}]}]}", 400, "ttl");
    expect_bad(API_ANTHROPIC_MESSAGES, "{\"model\":\"m\",\"max_tokens\":4,\"system\":[{\"type\":\"text\",\"text\":\"a\",\"cache_control\":{\"type\":\"ephemeral\"}}],\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\",\"cache_control\":{\"type\":\"ephemeral\",\"ttl\":\"1h\"}}]}]}", 400, "1h");
    expect_bad(API_ANTHROPIC_MESSAGES, "{\"model\":\"m\",\"max_tokens\":4,\"system\":5,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 400, "system");
    expect_bad(API_ANTHROPIC_MESSAGES, "{\"model\":\"m\",\"max_tokens\":4,\"tools\":{},\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 400, "tools");
    expect_bad(API_ANTHROPIC_MESSAGES, "{\"model\":\"m\",\"max_tokens\":4,\"tools\":[{\"description\":\"x\"}],\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 400, "name");
    expect_bad(API_ANTHROPIC_MESSAGES, "{\"model\":\"m\",\"max_tokens\":4,\"stop_sequences\":\"x\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 400, "stop_sequences");
    expect_bad(API_ANTHROPIC_MESSAGES, "{\"model\":\"m\",\"max_tokens\":4,\"temperature\":1.5,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 400, "temperature");
    expect_bad(API_ANTHROPIC_MESSAGES, "{\"model\":\"m\",\"max_tokens\":4,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"x \"}]}", 400, "trailing whitespace");
    /* top-level cache_control: a breakpoint at the end of the last message */
    {
        api_request r0;
        api_error e0;
        ck_assert_int_eq(parse(API_ANTHROPIC_MESSAGES, "{\"model\":\"m\",\"max_tokens\":4,\"cache_control\":{\"type\":\"ephemeral\",\"ttl\":\"1h\"},"
                               "\"messages\":[{\"role\":\"user\",\"content\":\"hello\"}]}", &r0, &e0), 0);
        ck_assert_int_eq(r0.n_breakpoints, 1);
        ck_assert_int_eq(r0.msgs[0].n_bp, 1);
        ck_assert_uint_eq(r0.msgs[0].bp[0].off, 5);
        ck_assert_int_eq((int)r0.msgs[0].bp[0].ttl_s, 3600);
        api_request_free(&r0);
    }
    /* count_tokens needs no max_tokens */
    api_request r;
    api_error e;
    ck_assert_int_eq(parse(API_ANTHROPIC_COUNT_TOKENS, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", &r, &e), 0);
    api_request_free(&r);
}
END_TEST

START_TEST(byte_to_token) {
    size_t ends[] = { 0, 3, 5, 5, 9 }; /* BOS (0 bytes), then pieces */
    ck_assert_int_eq(api_byte_to_token(ends, 5, 0), 1);
    ck_assert_int_eq(api_byte_to_token(ends, 5, 2), 1);  /* inside token 1: not included */
    ck_assert_int_eq(api_byte_to_token(ends, 5, 3), 2);
    ck_assert_int_eq(api_byte_to_token(ends, 5, 5), 4);
    ck_assert_int_eq(api_byte_to_token(ends, 5, 8), 4);
    ck_assert_int_eq(api_byte_to_token(ends, 5, 9), 5);
    ck_assert_int_eq(api_byte_to_token(ends, 5, 100), 5);
    ck_assert_int_eq(api_byte_to_token(ends, 0, 3), 0);
}
END_TEST

static cJSON *parse_json(char *s) {
    ck_assert_ptr_nonnull(s);
    cJSON *o = cJSON_Parse(s);
    ck_assert_msg(o != NULL, "not JSON: %s", s);
    free(s);
    return o;
}
static int num(const cJSON *o, const char *path) {
    char buf[128];
    snprintf(buf, sizeof buf, "%s", path);
    const cJSON *v = o;
    for (char *t = strtok(buf, "."); t; t = strtok(NULL, ".")) v = cJSON_GetObjectItemCaseSensitive(v, t);
    ck_assert_msg(cJSON_IsNumber(v), "no number at %s", path);
    return v->valueint;
}

START_TEST(usage_shapes) {
    engine_usage u = { .prompt_tokens = 100, .cached_tokens = 60, .cache_write_5m = 25, .cache_write_1h = 5, .completion_tokens = 7 };
    cJSON *o = parse_json(api_format_usage_openai(&u));
    ck_assert_int_eq(num(o, "prompt_tokens"), 100);
    ck_assert_int_eq(num(o, "completion_tokens"), 7);
    ck_assert_int_eq(num(o, "total_tokens"), 107);
    ck_assert_int_eq(num(o, "prompt_tokens_details.cached_tokens"), 60);
    cJSON_Delete(o);
    o = parse_json(api_format_usage_anthropic(&u));
    ck_assert_int_eq(num(o, "input_tokens"), 10);  /* 100 - 60 read - 30 written */
    ck_assert_int_eq(num(o, "cache_read_input_tokens"), 60);
    ck_assert_int_eq(num(o, "cache_creation_input_tokens"), 30);
    ck_assert_int_eq(num(o, "cache_creation.ephemeral_5m_input_tokens"), 25);
    ck_assert_int_eq(num(o, "cache_creation.ephemeral_1h_input_tokens"), 5);
    ck_assert_int_eq(num(o, "output_tokens"), 7);
    cJSON_Delete(o);
}
END_TEST

START_TEST(response_shapes) {
    api_request r;
    api_error e;
    engine_usage u = { .prompt_tokens = 10, .cached_tokens = 4, .completion_tokens = 3, .stop_matched = 1 };
    api_result res = { .id = "id1", .created = 1234, .model = "mod", .text = "hi \"there\"", .text_len = 10, .why = FINISH_STOP, .stop_matched = 1, .usage = &u };
    ck_assert_int_eq(parse(API_OPENAI_CHAT, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", &r, &e), 0);
    cJSON *o = parse_json(api_format_response(&r, &res));
    ck_assert_str_eq(cJSON_GetObjectItem(o, "object")->valuestring, "chat.completion");
    ck_assert_str_eq(cJSON_GetObjectItem(o, "id")->valuestring, "id1");
    ck_assert_int_eq(num(o, "created"), 1234);
    cJSON *c0 = cJSON_GetArrayItem(cJSON_GetObjectItem(o, "choices"), 0);
    ck_assert_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(c0, "message"), "content")->valuestring, "hi \"there\"");
    ck_assert_str_eq(cJSON_GetObjectItem(c0, "finish_reason")->valuestring, "stop");
    ck_assert_int_eq(num(o, "usage.prompt_tokens_details.cached_tokens"), 4);
    cJSON_Delete(o);
    /* stream end with include_usage: finish chunk, usage chunk with empty choices, [DONE] */
    r.include_usage = true;
    res.why = FINISH_LENGTH;
    char *s = api_format_stream_end(&r, &res);
    ck_assert_ptr_nonnull(strstr(s, "\"finish_reason\":\"length\""));
    ck_assert_ptr_nonnull(strstr(s, "\"choices\":[],\"usage\":{"));
    size_t L = strlen(s);
    ck_assert_str_eq(s + L - strlen("data: [DONE]\n\n"), "data: [DONE]\n\n");
    free(s);
    s = api_format_stream_delta(&r, &res, "ab\ncd", 5);
    ck_assert_int_eq(strncmp(s, "data: {", 7), 0);
    ck_assert_ptr_nonnull(strstr(s, "\"content\":\"ab\\ncd\""));
    ck_assert_str_eq(s + strlen(s) - 2, "\n\n");
    free(s);
    api_request_free(&r);

    ck_assert_int_eq(parse(API_ANTHROPIC_MESSAGES, "{\"model\":\"m\",\"max_tokens\":3,\"stop_sequences\":[\"STOP\"],\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", &r, &e), 0);
    res.why = FINISH_STOP;
    o = parse_json(api_format_response(&r, &res));
    ck_assert_str_eq(cJSON_GetObjectItem(o, "type")->valuestring, "message");
    ck_assert_str_eq(cJSON_GetObjectItem(o, "stop_reason")->valuestring, "stop_sequence");
    ck_assert_str_eq(cJSON_GetObjectItem(o, "stop_sequence")->valuestring, "STOP");
    ck_assert_int_eq(num(o, "usage.cache_read_input_tokens"), 4);
    ck_assert_int_eq(num(o, "usage.input_tokens"), 6);
    cJSON_Delete(o);
    res.stop_matched = 0;
    o = parse_json(api_format_response(&r, &res));
    ck_assert_str_eq(cJSON_GetObjectItem(o, "stop_reason")->valuestring, "end_turn");
    ck_assert(cJSON_IsNull(cJSON_GetObjectItem(o, "stop_sequence")));
    cJSON_Delete(o);
    /* event order of a whole Anthropic stream */
    char *a = api_format_stream_start(&r, &res, 10), *d = api_format_stream_delta(&r, &res, "x", 1), *z = api_format_stream_end(&r, &res);
    size_t cap = strlen(a) + strlen(d) + strlen(z) + 1;
    char *all = malloc(cap);
    snprintf(all, cap, "%s%s%s", a, d, z);
    const char *order[] = { "event: message_start", "event: content_block_start", "event: ping", "event: content_block_delta",
                            "event: content_block_stop", "event: message_delta", "event: message_stop" };
    const char *at = all;
    for (size_t i = 0; i < 7; i++) {
        const char *q = strstr(at, order[i]);
        ck_assert_msg(q != NULL, "missing or out of order: %s", order[i]);
        at = q + 1;
    }
    free(a); free(d); free(z); free(all);
    api_request_free(&r);
}
END_TEST

START_TEST(error_shapes) {
    api_error e;
    api_error_set(&e, 404, "invalid_request_error", "model", "model_not_found", "no %s", "x");
    cJSON *o = parse_json(api_format_error(false, &e));
    cJSON *er = cJSON_GetObjectItem(o, "error");
    ck_assert_str_eq(cJSON_GetObjectItem(er, "message")->valuestring, "no x");
    ck_assert_str_eq(cJSON_GetObjectItem(er, "type")->valuestring, "invalid_request_error");
    ck_assert_str_eq(cJSON_GetObjectItem(er, "param")->valuestring, "model");
    ck_assert_str_eq(cJSON_GetObjectItem(er, "code")->valuestring, "model_not_found");
    cJSON_Delete(o);
    api_error_set(&e, 401, "authentication_error", NULL, NULL, "bad key");
    o = parse_json(api_format_error(true, &e));
    ck_assert_str_eq(cJSON_GetObjectItem(o, "type")->valuestring, "error");
    ck_assert_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(o, "error"), "type")->valuestring, "authentication_error");
    cJSON_Delete(o);
}
END_TEST

/* ---- issue 8: every parameter honoured or refused ---- */
START_TEST(params_honoured) {
    api_request r;
    api_error e;
    const char *b = "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":true,"
                    "\"top_logprobs\":7,\"logit_bias\":{\"12\":-100,\"7\":2.5},\"cache_salt\":\"abc\","
                    "\"ignore_eos\":true,\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}],"
                    "\"tool_choice\":\"auto\",\"response_format\":{\"type\":\"text\"},\"n\":1}";
    ck_assert_int_eq(parse(API_OPENAI_CHAT, b, &r, &e), 0);
    ck_assert_int_eq(r.logprobs, 7);
    ck_assert_int_eq(r.n_logit_bias, 2);
    ck_assert(r.logit_bias[0].token == 12 && r.logit_bias[0].bias == -100.0f);
    ck_assert(r.logit_bias[1].token == 7 && r.logit_bias[1].bias == 2.5f);
    ck_assert_str_eq(r.cache_salt, "abc");
    ck_assert(r.ignore_eos);
    api_request_free(&r);
    ck_assert_int_eq(parse(API_OPENAI_CHAT, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", &r, &e), 0);
    ck_assert_int_eq(r.logprobs, -1);
    ck_assert_int_eq(r.n_logit_bias, 0);
    ck_assert_ptr_null(r.cache_salt);
    api_request_free(&r);
    ck_assert_int_eq(parse(API_OPENAI_CHAT, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":true}", &r, &e), 0);
    ck_assert_int_eq(r.logprobs, 0);
    api_request_free(&r);
    ck_assert_int_eq(parse(API_OPENAI_COMPLETION, "{\"model\":\"m\",\"prompt\":\"x\",\"logprobs\":3}", &r, &e), 0);
    ck_assert_int_eq(r.logprobs, 3);
    api_request_free(&r);
    ck_assert_int_eq(parse(API_ANTHROPIC_MESSAGES, "{\"model\":\"m\",\"max_tokens\":3,\"cache_salt\":\"t\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                                                   "\"tool_choice\":{\"type\":\"auto\"},\"thinking\":{\"type\":\"disabled\"}}", &r, &e), 0);
    ck_assert_str_eq(r.cache_salt, "t");
    ck_assert_int_eq(r.logprobs, -1);
    api_request_free(&r);
}
END_TEST

#define CHAT_X "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
START_TEST(responses_parsed_as_chat) {
    api_request r;
    api_error e;
    const char *body = "{\"model\":\"m\",\"instructions\":\"Be brief.\",\"input\":[{\"role\":\"user\",\"content\":[{\"type\":\"input_text\",\"text\":\"a\"},"
                       "{\"type\":\"input_text\",\"text\":\"b\"}]},{\"type\":\"function_call\",\"call_id\":\"call_1\",\"name\":\"f\",\"arguments\":\"{}\"},"
                       "{\"type\":\"function_call_output\",\"call_id\":\"call_1\",\"output\":\"42\"}],\"max_output_tokens\":7,\"store\":false,"
                       "\"previous_response_id\":\"resp_x\",\"tools\":[{\"type\":\"function\",\"name\":\"f\",\"parameters\":{\"type\":\"object\"}}],"
                       "\"tool_choice\":{\"type\":\"function\",\"name\":\"f\"}}";
    ck_assert_int_eq(api_parse(API_OPENAI_RESPONSES, body, strlen(body), &r, &e), 0);
    ck_assert_int_eq(r.kind, API_OPENAI_RESPONSES);
    ck_assert_int_eq(r.n_msgs, 4);   /* system, user, assistant (the call), tool */
    ck_assert_str_eq(r.msgs[0].role, "system");
    ck_assert_str_eq(r.msgs[0].content, "Be brief.");
    ck_assert_str_eq(r.msgs[1].content, "ab");
    ck_assert_str_eq(r.msgs[2].role, "assistant");
    ck_assert_int_eq(r.msgs[2].n_calls, 1);
    ck_assert_str_eq(r.msgs[2].calls[0].id, "call_1");
    ck_assert_str_eq(r.msgs[3].role, "tool");
    ck_assert_str_eq(r.msgs[3].content, "42");
    ck_assert_int_eq(r.max_tokens, 7);
    ck_assert(!r.store);
    ck_assert_str_eq(r.prev_id, "resp_x");
    ck_assert_int_eq(r.n_tools, 1);
    ck_assert_int_eq(r.tool_choice, API_TOOL_NAMED);
    ck_assert_ptr_nonnull(strstr(r.items, "function_call_output"));
    api_request_free(&r);
    /* a stored conversation goes between the instructions and the new input */
    const char *b2 = "{\"instructions\":\"I\",\"input\":\"next\",\"text\":{\"format\":{\"type\":\"json_object\"}}}";
    ck_assert_int_eq(api_parse_responses(b2, strlen(b2), "[{\"type\":\"message\",\"role\":\"user\",\"content\":\"first\"},"
                                                       "{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"reply\"}]", &r, &e), 0);
    ck_assert_int_eq(r.n_msgs, 4);
    ck_assert_str_eq(r.msgs[0].content, "I");
    ck_assert_str_eq(r.msgs[1].content, "first");
    ck_assert_str_eq(r.msgs[2].content, "reply");
    ck_assert_str_eq(r.msgs[3].content, "next");
    ck_assert_int_eq(r.format, API_FORMAT_JSON_OBJECT);
    ck_assert(r.store);
    ck_assert_ptr_nonnull(strstr(r.items, "\"first\""));
    ck_assert_ptr_nonnull(strstr(r.items, "\"next\""));
    api_request_free(&r);
    const char *bad[] = { "{\"input\":[{\"type\":\"web_search_call\"}]}", "{\"input\":\"x\",\"background\":true}", "{\"input\":3}", "{}",
                          "{\"input\":\"x\",\"tools\":[{\"type\":\"file_search\"}]}", "{\"input\":[]}" };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        ck_assert_msg(api_parse(API_OPENAI_RESPONSES, bad[i], strlen(bad[i]), &r, &e) < 0, "accepted %s", bad[i]);
        ck_assert_int_eq(e.status, 400);
        api_request_free(&r);
    }
}
END_TEST

START_TEST(response_format_parsed) {
    api_request r;
    api_error e;
    ck_assert_int_eq(parse(API_OPENAI_CHAT, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                                            "\"response_format\":{\"type\":\"json_object\"}}", &r, &e), 0);
    ck_assert_int_eq(r.format, API_FORMAT_JSON_OBJECT);
    ck_assert_ptr_null(r.schema);
    api_request_free(&r);
    ck_assert_int_eq(parse(API_OPENAI_CHAT, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                                            "\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"p\",\"strict\":true,"
                                            "\"schema\":{\"type\":\"object\", \"properties\": {\"a\":{\"type\":\"integer\"}}}}}}", &r, &e), 0);
    ck_assert_int_eq(r.format, API_FORMAT_JSON_SCHEMA);
    ck_assert_str_eq(r.schema, "{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"integer\"}}}");   /* compact text */
    api_request_free(&r);
    ck_assert_int_eq(parse(API_OPENAI_CHAT, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                                            "\"response_format\":{\"type\":\"text\"}}", &r, &e), 0);
    ck_assert_int_eq(r.format, API_FORMAT_TEXT);
    api_request_free(&r);
}
END_TEST

#define COMP_X "{\"model\":\"m\",\"prompt\":\"x\","
#define ANTH_X "{\"model\":\"m\",\"max_tokens\":3,\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
START_TEST(params_refused) {
    struct { api_kind k; const char *body, *param; } cases[] = {
        { API_OPENAI_CHAT, CHAT_X "\"n\":3}", "n" },
        { API_OPENAI_CHAT, CHAT_X "\"top_logprobs\":2}", "top_logprobs" },
        { API_OPENAI_CHAT, CHAT_X "\"logprobs\":true,\"top_logprobs\":21}", "top_logprobs" },
        { API_OPENAI_CHAT, CHAT_X "\"logit_bias\":{\"-1\":2}}", "logit_bias" },
        { API_OPENAI_CHAT, CHAT_X "\"logit_bias\":{\"x\":2}}", "logit_bias" },
        { API_OPENAI_CHAT, CHAT_X "\"logit_bias\":{\"5\":101}}", "logit_bias" },
        { API_OPENAI_CHAT, CHAT_X "\"logit_bias\":{\"5\":\"1\"}}", "logit_bias" },
        { API_OPENAI_CHAT, CHAT_X "\"logit_bias\":[1]}", "logit_bias" },
        { API_OPENAI_CHAT, CHAT_X "\"response_format\":{\"type\":\"xml\"}}", "response_format" },
        { API_OPENAI_CHAT, CHAT_X "\"response_format\":{\"type\":\"json_schema\"}}", "response_format" },
        { API_OPENAI_CHAT, CHAT_X "\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"schema\":3}}}", "response_format" },
        { API_OPENAI_CHAT, CHAT_X "\"tool_choice\":\"required\"}", "tool_choice" },
        { API_OPENAI_CHAT, CHAT_X "\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"f\"}}}", "tool_choice" },
        { API_OPENAI_CHAT, CHAT_X "\"function_call\":{\"name\":\"f\"}}", "function_call" },
        { API_OPENAI_CHAT, CHAT_X "\"audio\":{\"voice\":\"x\"}}", "audio" },
        { API_OPENAI_CHAT, CHAT_X "\"modalities\":[\"audio\"]}", "modalities" },
        { API_OPENAI_CHAT, CHAT_X "\"prediction\":{\"type\":\"content\"}}", "prediction" },
        { API_OPENAI_CHAT, CHAT_X "\"web_search_options\":{}}", "web_search_options" },
        { API_OPENAI_CHAT, CHAT_X "\"cache_salt\":5}", "cache_salt" },
        { API_OPENAI_COMPLETION, COMP_X "\"best_of\":2}", "best_of" },
        { API_OPENAI_COMPLETION, COMP_X "\"echo\":true}", "echo" },
        { API_OPENAI_COMPLETION, COMP_X "\"suffix\":\"y\"}", "suffix" },
        { API_OPENAI_COMPLETION, COMP_X "\"logprobs\":6}", "logprobs" },
        { API_ANTHROPIC_MESSAGES, ANTH_X "\"tool_choice\":{\"type\":\"any\"}}", "tool_choice" },
        { API_ANTHROPIC_MESSAGES, ANTH_X "\"tool_choice\":{\"type\":\"tool\",\"name\":\"f\"}}", "tool_choice" },
        { API_ANTHROPIC_MESSAGES, ANTH_X "\"thinking\":{\"type\":\"sometimes\"}}", "thinking" },
        { API_ANTHROPIC_MESSAGES, ANTH_X "\"thinking\":true}", "thinking" },
        { API_OPENAI_CHAT, CHAT_X "\"reasoning_format\":\"deepseek-legacy\"}", "deepseek-legacy" },
        { API_OPENAI_CHAT, CHAT_X "\"reasoning_format\":\"bogus\"}", "reasoning_format" },
        { API_OPENAI_CHAT, CHAT_X "\"reasoning_format\":1}", "reasoning_format" },
        { API_OPENAI_CHAT, CHAT_X "\"chat_template_kwargs\":{\"enable_thinking\":\"no\"}}", "enable_thinking" },
        { API_OPENAI_CHAT, CHAT_X "\"chat_template_kwargs\":{\"custom_flag\":1}}", "custom_flag" },
        { API_OPENAI_CHAT, CHAT_X "\"chat_template_kwargs\":[]}", "chat_template_kwargs" },
        { API_ANTHROPIC_MESSAGES, ANTH_X "\"mcp_servers\":[{\"url\":\"x\"}]}", "mcp_servers" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        api_request r;
        api_error e;
        ck_assert_msg(parse(cases[i].k, cases[i].body, &r, &e) < 0, "accepted: %s", cases[i].body);
        ck_assert_int_eq(e.status, 400);
        ck_assert_msg(!strcmp(e.param, cases[i].param) || strstr(e.message, cases[i].param), "param '%s' / '%s' for %s", e.param, e.message, cases[i].body);
        api_request_free(&r);
    }
    char salt[300];
    memset(salt, 'a', sizeof salt - 1);
    salt[sizeof salt - 1] = 0;
    char body[512];
    snprintf(body, sizeof body, CHAT_X "\"cache_salt\":\"%s\"}", salt);
    expect_bad(API_OPENAI_CHAT, body, 400, "cache_salt");
}
END_TEST

START_TEST(utf8_strict) {
    const char *bad[] = { "\xe9", "\xc0\xaf", "\xe0\x80\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xe2\x82",
                          "\xf0\x9f\x98", "\x80", "\xff", "\xf8\x88\x80\x80\x80" };
    const char *good[] = { "caf\xc3\xa9", "\xe2\x98\x83", "\xf0\x9f\x98\x80", "\xef\xbf\xbd", "\xf4\x8f\xbf\xbf", "\xed\x9f\xbf" };
    char body[256];
    api_request r;
    api_error e;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(body, sizeof body, COMP_X "\"stop\":\"%s\"}", bad[i]);
        ck_assert_msg(parse(API_OPENAI_COMPLETION, body, &r, &e) < 0, "accepted bad UTF-8 #%zu", i);
        ck_assert(strstr(e.message, "UTF-8"));
        api_request_free(&r);
    }
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        snprintf(body, sizeof body, COMP_X "\"stop\":\"%s\"}", good[i]);
        ck_assert_msg(parse(API_OPENAI_COMPLETION, body, &r, &e) == 0, "refused good UTF-8 #%zu: %s", i, e.message);
        api_request_free(&r);
    }
    /* \u0000 would cut a C string short: refused; an escaped backslash before u0000 is text */
    ck_assert(parse(API_OPENAI_COMPLETION, "{\"model\":\"m\",\"prompt\":\"a\\u0000b\"}", &r, &e) < 0);
    api_request_free(&r);
    ck_assert(parse(API_OPENAI_COMPLETION, "{\"model\":\"m\",\"prompt\":\"a\\\\u0000b\"}", &r, &e) == 0);
    ck_assert_str_eq(r.prompt, "a\\u0000b");
    api_request_free(&r);
    /* a lone surrogate escape: cJSON refuses it */
    ck_assert(parse(API_OPENAI_COMPLETION, "{\"model\":\"m\",\"prompt\":\"\\ud800\"}", &r, &e) < 0);
    api_request_free(&r);
}
END_TEST

static const char *fake_piece(void *ctx, int32_t id, size_t *len) {
    (void)ctx;
    static const char *p[] = { "Hello", " wor", "ld", "\xe2\x82", "\xac" };   /* a euro sign split */
    *len = strlen(p[id % 5]);
    return p[id % 5];
}

START_TEST(logprobs_shapes) {
    engine_token_info t[5];
    memset(t, 0, sizeof t);
    for (int i = 0; i < 5; i++) {
        t[i].token = i;
        t[i].logprob = -0.5f * (float)i;
        t[i].n_top = 2;
        t[i].top[0].token = i; t[i].top[0].logprob = t[i].logprob;
        t[i].top[1].token = (i + 1) % 5; t[i].top[1].logprob = t[i].logprob - 1;
    }
    engine_usage u = { .prompt_tokens = 3, .completion_tokens = 5 };
    api_result res = { .id = "x", .model = "m", .text = "Hello world\xe2\x82\xac", .text_len = 14, .why = FINISH_LENGTH,
                       .usage = &u, .lps = t, .n_lps = 5, .tok_text = fake_piece };
    api_request r;
    api_error e;
    ck_assert_int_eq(parse(API_OPENAI_CHAT, CHAT_X "\"logprobs\":true,\"top_logprobs\":2}", &r, &e), 0);
    char *js = api_format_response(&r, &res);
    cJSON *o = cJSON_Parse(js);
    ck_assert_ptr_nonnull(o);
    cJSON *content = cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(o, "choices"), 0), "logprobs"), "content");
    ck_assert_int_eq(cJSON_GetArraySize(content), 5);
    cJSON *e1 = cJSON_GetArrayItem(content, 1);
    ck_assert_str_eq(cJSON_GetObjectItem(e1, "token")->valuestring, " wor");
    ck_assert(fabs(cJSON_GetObjectItem(e1, "logprob")->valuedouble + 0.5) < 1e-6);
    ck_assert_int_eq(cJSON_GetArraySize(cJSON_GetObjectItem(e1, "bytes")), 4);
    ck_assert_int_eq(cJSON_GetArraySize(cJSON_GetObjectItem(e1, "top_logprobs")), 2);
    cJSON *e3 = cJSON_GetArrayItem(content, 3);                 /* partial character */
    ck_assert_str_eq(cJSON_GetObjectItem(e3, "token")->valuestring, "\xef\xbf\xbd\xef\xbf\xbd");
    ck_assert_int_eq(cJSON_GetArrayItem(cJSON_GetObjectItem(e3, "bytes"), 0)->valueint, 0xe2);
    cJSON_Delete(o);
    free(js);
    /* streamed: a delta carries its tokens */
    res.n_lps = 2;
    js = api_format_stream_delta(&r, &res, "Hello wor", 9);
    ck_assert(strstr(js, "\"logprobs\":{\"content\":[{\"token\":\"Hello\""));
    free(js);
    js = api_format_stream_end(&r, &res);
    ck_assert(strstr(js, "\"logprobs\":null"));
    free(js);
    api_request_free(&r);
    /* completions */
    ck_assert_int_eq(parse(API_OPENAI_COMPLETION, COMP_X "\"logprobs\":2}", &r, &e), 0);
    res.n_lps = 5;
    js = api_format_response(&r, &res);
    o = cJSON_Parse(js);
    cJSON *lp = cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(o, "choices"), 0), "logprobs");
    ck_assert_int_eq(cJSON_GetArraySize(cJSON_GetObjectItem(lp, "tokens")), 5);
    ck_assert_int_eq(cJSON_GetArrayItem(cJSON_GetObjectItem(lp, "text_offset"), 2)->valueint, 9);
    ck_assert_int_eq(cJSON_GetArrayItem(cJSON_GetObjectItem(lp, "text_offset"), 4)->valueint, 13);
    ck_assert_int_eq(cJSON_GetArraySize(cJSON_GetArrayItem(cJSON_GetObjectItem(lp, "top_logprobs"), 0)), 2);
    ck_assert(fabs(cJSON_GetArrayItem(cJSON_GetObjectItem(lp, "token_logprobs"), 2)->valuedouble + 1.0) < 1e-6);
    cJSON_Delete(o);
    free(js);
    res.lps = t + 2;
    res.n_lps = 1;
    res.text_offset0 = 9;
    js = api_format_stream_delta(&r, &res, "ld", 2);
    ck_assert(strstr(js, "\"text_offset\":[9]"));
    free(js);
    api_request_free(&r);
    /* off: null, as before */
    ck_assert_int_eq(parse(API_OPENAI_CHAT, CHAT_X "\"max_tokens\":2}", &r, &e), 0);
    js = api_format_response(&r, &res);
    ck_assert(strstr(js, "\"logprobs\":null"));
    free(js);
    api_request_free(&r);
}
END_TEST


/* ---- issue 13: tool calls ---- */
#include "toolcall.h"
#include "jsonschema.h"

#define WEATHER_TOOL "{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"description\":\"Weather\"," \
    "\"parameters\":{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\"},\"unit\":{\"type\":\"string\",\"enum\":[\"c\",\"f\"]}}," \
    "\"required\":[\"city\",\"unit\"],\"additionalProperties\":false},\"strict\":true}}"

START_TEST(tools_parsed) {
    api_request r;
    api_error e;
    ck_assert_int_eq(parse(API_OPENAI_CHAT, CHAT_X "\"tools\":[" WEATHER_TOOL ",{\"type\":\"function\",\"function\":{\"name\":\"now\"}}],"
                                             "\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"now\"}},\"parallel_tool_calls\":false}", &r, &e), 0);
    ck_assert_int_eq(r.n_tools, 2);
    ck_assert(r.tools[0].strict && !r.tools[1].strict);
    ck_assert_ptr_nonnull(strstr(r.tools[0].parameters, "\"enum\""));
    ck_assert_ptr_null(r.tools[1].parameters);
    ck_assert_str_eq(r.tools[0].json, WEATHER_TOOL);   /* rendered as the client sent it */
    ck_assert_int_eq(r.tool_choice, API_TOOL_NAMED);
    ck_assert_str_eq(r.tool_name, "now");
    ck_assert(!r.parallel_tool_calls && api_tools_active(&r));
    api_request_free(&r);
    ck_assert_int_eq(parse(API_OPENAI_CHAT, CHAT_X "\"tools\":[" WEATHER_TOOL "],\"tool_choice\":\"none\"}", &r, &e), 0);
    ck_assert(r.tool_choice == API_TOOL_NONE && !api_tools_active(&r) && r.parallel_tool_calls);
    api_request_free(&r);
    /* Anthropic: tools in OpenAI form; a conversation with tool_use and tool_result */
    ck_assert_int_eq(parse(API_ANTHROPIC_MESSAGES,
        "{\"model\":\"m\",\"max_tokens\":9,\"tools\":[{\"name\":\"get_weather\",\"input_schema\":{\"type\":\"object\"}}],"
        "\"tool_choice\":{\"type\":\"any\",\"disable_parallel_tool_use\":true},\"messages\":["
        "{\"role\":\"user\",\"content\":\"Paris?\"},"
        "{\"role\":\"assistant\",\"content\":[{\"type\":\"text\",\"text\":\"Let me look.\"},{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"get_weather\",\"input\":{\"city\":\"Paris\"}}]},"
        "{\"role\":\"user\",\"content\":[{\"type\":\"tool_result\",\"tool_use_id\":\"toolu_1\",\"content\":[{\"type\":\"text\",\"text\":\"21C\"}]},{\"type\":\"text\",\"text\":\"thanks\"}]}]}", &r, &e), 0);
    ck_assert_int_eq(r.tool_choice, API_TOOL_REQUIRED);
    ck_assert(!r.parallel_tool_calls);
    ck_assert_str_eq(r.tools[0].json, "{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"parameters\":{\"type\":\"object\"}}}");
    ck_assert_int_eq(r.n_msgs, 4);
    ck_assert_str_eq(r.msgs[1].role, "assistant");
    ck_assert_str_eq(r.msgs[1].content, "Let me look.");
    ck_assert_int_eq(r.msgs[1].n_calls, 1);
    ck_assert_str_eq(r.msgs[1].calls[0].arguments, "{\"city\":\"Paris\"}");
    ck_assert(!r.assistant_prefill);
    ck_assert_str_eq(r.msgs[2].role, "tool");
    ck_assert_str_eq(r.msgs[2].content, "21C");
    ck_assert_str_eq(r.msgs[3].role, "user");
    ck_assert_str_eq(r.msgs[3].content, "thanks");
    api_request_free(&r);
    /* errors, named */
    expect_bad(API_OPENAI_CHAT, CHAT_X "\"tools\":[" WEATHER_TOOL "],\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"nope\"}}}", 400, "nope");
    expect_bad(API_OPENAI_CHAT, CHAT_X "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"a b\"}}]}", 400, "name");
    expect_bad(API_OPENAI_CHAT, CHAT_X "\"tools\":[{\"type\":\"custom\",\"custom\":{\"name\":\"a\"}}]}", 400, "tools[0]");
    expect_bad(API_OPENAI_CHAT, CHAT_X "\"tools\":[" WEATHER_TOOL "," WEATHER_TOOL "]}", 400, "twice");
    expect_bad(API_OPENAI_CHAT, CHAT_X "\"tools\":[" WEATHER_TOOL "],\"response_format\":{\"type\":\"json_object\"}}", 400, "response_format");
    expect_bad(API_ANTHROPIC_MESSAGES, ANTH_X "\"tools\":[{\"type\":\"web_search_20250305\",\"name\":\"web_search\"}]}", 400, "server tool");
    expect_bad(API_ANTHROPIC_MESSAGES, "{\"model\":\"m\",\"max_tokens\":3,\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"tool_use\",\"id\":\"a\",\"name\":\"b\",\"input\":{}}]}]}", 400, "assistant");
}
END_TEST

static void feed_all(toolcall_parser *p, const char *s, bool bytewise) {
    size_t n = strlen(s);
    if (bytewise) for (size_t i = 0; i < n; i++) ck_assert(toolcall_feed(p, s + i, 1, false));
    else ck_assert(toolcall_feed(p, s, n, false));
    ck_assert(toolcall_feed(p, "", 0, true));
}

START_TEST(toolcall_parse) {
    for (int bytewise = 0; bytewise < 2; bytewise++) {
        toolcall_parser p;
        toolcall_parser_init(&p, TOOLFMT_HERMES);
        feed_all(&p, "I will check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"n\": [1, {\"x\": \"}\"}]}}\n</tool_call>\n"
                     "<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>\n", bytewise);
        ck_assert_str_eq(p.content, "I will check.\n");
        ck_assert_int_eq(p.n_calls, 2);
        ck_assert_str_eq(p.calls[0].name, "get_weather");
        ck_assert_str_eq(p.calls[0].arguments, "{\"city\": \"Paris\", \"n\": [1, {\"x\": \"}\"}]}");   /* as written */
        ck_assert_uint_eq(p.calls[0].at, 14);
        ck_assert_str_eq(p.calls[1].arguments, "{}");
        toolcall_parser_free(&p);
        /* text that only looks like a call stays content, byte for byte */
        const char *bad = "a <tool b <tool_call>\n{not json}\n</tool_call> c <tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}";
        toolcall_parser_init(&p, TOOLFMT_HERMES);
        feed_all(&p, bad, bytewise);
        ck_assert_int_eq(p.n_calls, 1);   /* the unclosed last one parses (cut off after its JSON) */
        ck_assert_str_eq(p.content, "a <tool b <tool_call>\n{not json}\n</tool_call> c ");
        toolcall_parser_free(&p);
        toolcall_parser_init(&p, TOOLFMT_HERMES);
        feed_all(&p, "x <tool_call>\n{\"name\": \"f\", \"argu", bytewise);
        ck_assert_int_eq(p.n_calls, 0);
        ck_assert_str_eq(p.content, "x <tool_call>\n{\"name\": \"f\", \"argu");
        toolcall_parser_free(&p);
        /* Llama 3: the whole reply is the call, else it is text */
        toolcall_parser_init(&p, TOOLFMT_LLAMA3);
        feed_all(&p, " {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}", bytewise);
        ck_assert_int_eq(p.n_calls, 1);
        ck_assert_str_eq(p.calls[0].arguments, "{\"city\": \"Oslo\"}");
        ck_assert_ptr_null(p.content);
        toolcall_parser_free(&p);
        toolcall_parser_init(&p, TOOLFMT_LLAMA3);
        feed_all(&p, "It is {\"name\": \"x\"}", bytewise);
        ck_assert_int_eq(p.n_calls, 0);
        ck_assert_str_eq(p.content, "It is {\"name\": \"x\"}");
        toolcall_parser_free(&p);
    }
}
END_TEST

static bool accepts(grammar *g, const char *s) {
    int st = grammar_advance(g, grammar_start(g), s, strlen(s));
    return st > 0 && grammar_accepting(g, st);
}

START_TEST(toolcall_grammars) {
    cJSON *schema = cJSON_Parse("{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\"}},\"required\":[\"city\"],\"additionalProperties\":false}");
    toolcall_tool tools[2] = { { "get_weather", schema }, { "now", NULL } };
    char err[256];
    grammar *g = toolcall_grammar(TOOLFMT_HERMES, tools, 2, TOOLCALL_FORCED, true, err, sizeof err);
    ck_assert_msg(g != NULL, "%s", err);
    const char *call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    ck_assert(accepts(g, call));
    ck_assert(accepts(g, "<tool_call>\n{\"name\": \"now\", \"arguments\": {\"anything\": [1]}}\n</tool_call>"));
    char two[512];
    snprintf(two, sizeof two, "%s\n%s", call, call);
    ck_assert(accepts(g, two));
    ck_assert(!accepts(g, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"town\": \"Paris\"}}\n</tool_call>"));
    ck_assert(!accepts(g, "<tool_call>\n{\"name\": \"other\", \"arguments\": {}}\n</tool_call>"));
    ck_assert(!accepts(g, "Sure! "));
    grammar_unref(g);
    /* one call only */
    g = toolcall_grammar(TOOLFMT_HERMES, tools, 1, TOOLCALL_FORCED, false, err, sizeof err);
    ck_assert(accepts(g, call) && !accepts(g, two));
    grammar_unref(g);
    /* lazy: any text without the marker, then constrained calls */
    g = toolcall_grammar(TOOLFMT_HERMES, tools, 1, TOOLCALL_LAZY, true, err, sizeof err);
    ck_assert(accepts(g, ""));
    ck_assert(accepts(g, "Hello <tool <tool_cal> world"));
    char lazy[512];
    snprintf(lazy, sizeof lazy, "Let me see. <tool%s", call);
    ck_assert(accepts(g, lazy));
    ck_assert(!accepts(g, "x <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_call>"));
    ck_assert(!accepts(g, "x <tool_call> free text"));
    grammar_unref(g);
    /* Llama 3 */
    g = toolcall_grammar(TOOLFMT_LLAMA3, tools, 1, TOOLCALL_LAZY, false, err, sizeof err);
    ck_assert(accepts(g, "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}"));
    ck_assert(accepts(g, "plain text {"));
    ck_assert(!accepts(g, "{\"name\": \"get_weather\", \"parameters\": {}}"));
    grammar_unref(g);
    /* a strict schema beyond the subset: the error names the tool and keyword */
    cJSON *bad = cJSON_Parse("{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"string\",\"pattern\":\"x\"}}}");
    toolcall_tool bt = { "f", bad };
    ck_assert_ptr_null(toolcall_grammar(TOOLFMT_HERMES, &bt, 1, TOOLCALL_FORCED, false, err, sizeof err));
    ck_assert_ptr_nonnull(strstr(err, "'f'"));
    ck_assert_ptr_nonnull(strstr(err, "pattern"));
    cJSON_Delete(bad);
    cJSON_Delete(schema);
}
END_TEST

START_TEST(toolcall_render) {
    /* Python's json.dumps(ensure_ascii=False) forms */
    cJSON *v = cJSON_Parse("{\"a\":[1,2.5,\"\\u00e9\\n\\u0001\"],\"b\":{},\"c\":[],\"d\":{\"e\":null,\"f\":true}}");
    char *s = toolcall_pyjson(v, -1);
    ck_assert_str_eq(s, "{\"a\": [1, 2.5, \"\xc3\xa9\\n\\u0001\"], \"b\": {}, \"c\": [], \"d\": {\"e\": null, \"f\": true}}");
    free(s);
    s = toolcall_pyjson(v, 4);
    ck_assert_str_eq(s, "{\n    \"a\": [\n        1,\n        2.5,\n        \"\xc3\xa9\\n\\u0001\"\n    ],\n    \"b\": {},\n    \"c\": [],\n"
                        "    \"d\": {\n        \"e\": null,\n        \"f\": true\n    }\n}");
    free(s);
    cJSON_Delete(v);
    /* ChatML (Qwen's words) */
    chat_tool_call call = { "get_weather", "{\"city\":\"Paris\"}" };
    chat_msg m[] = { { .role = "system", .content = "S" }, { .role = "user", .content = "Q" },
                     { .role = "assistant", .content = "", .tool_calls = &call, .n_tool_calls = 1 },
                     { .role = "tool", .content = "21" }, { .role = "tool", .content = "22" } };
    const char *tools[] = { "{\"type\":\"function\",\"function\":{\"name\":\"get_weather\"}}" };
    s = chat_apply_tools(CHAT_TMPL_CHATML, NULL, m, 5, tools, 1, true);
    ck_assert_str_eq(s, "<|im_start|>system\nS\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
                        "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\"}}\n</tools>\n\n"
                        "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
                        "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
                        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n"
                        "<|im_start|>user\n<tool_response>\n21\n</tool_response>\n<tool_response>\n22\n</tool_response><|im_end|>\n<|im_start|>assistant\n");
    free(s);
    /* Llama 3.1: tools in the first user message, the call as JSON, results in ipython turns */
    s = chat_apply_tools(CHAT_TMPL_LLAMA3, NULL, m, 4, tools, 1, true);
    ck_assert_str_eq(s, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: December 2023\n"
                        "Today Date: 26 Jul 2024\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                        "Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\n"
                        "Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n"
                        "{\n    \"type\": \"function\",\n    \"function\": {\n        \"name\": \"get_weather\"\n    }\n}\n\nQ<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}<|eot_id|>"
                        "<|start_header_id|>ipython<|end_header_id|>\n\n\"21\"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
    free(s);
    /* without tools or tool turns: the plain template */
    char *a = chat_apply_tools(CHAT_TMPL_CHATML, NULL, m, 2, NULL, 0, true), *b = chat_apply(CHAT_TMPL_CHATML, NULL, m, 2, true);
    ck_assert_str_eq(a, b);
    free(a); free(b);
}
END_TEST

START_TEST(toolcall_responses) {
    api_request r;
    api_error e;
    engine_usage u = { .prompt_tokens = 5, .completion_tokens = 7 };
    api_tool_call calls[] = { { "call_1", "get_weather", "{\"city\": \"Paris\"}" } };
    for (int k = 0; k < 2; k++) {
        ck_assert_int_eq(parse(k ? API_ANTHROPIC_MESSAGES : API_OPENAI_CHAT,
                               k ? ANTH_X "\"tools\":[{\"name\":\"get_weather\",\"input_schema\":{\"type\":\"object\"}}]}"
                                 : CHAT_X "\"tools\":[" WEATHER_TOOL "]}", &r, &e), 0);
        api_result res = { .id = "x", .model = "m", .text = "", .text_len = 0, .why = FINISH_STOP, .usage = &u, .calls = calls, .n_calls = 1 };
        char *js = api_format_response(&r, &res);
        cJSON *o = cJSON_Parse(js);
        if (!k) {
            cJSON *c0 = cJSON_GetArrayItem(cJSON_GetObjectItem(o, "choices"), 0), *msg = cJSON_GetObjectItem(c0, "message");
            ck_assert_str_eq(cJSON_GetObjectItem(c0, "finish_reason")->valuestring, "tool_calls");
            ck_assert(cJSON_IsNull(cJSON_GetObjectItem(msg, "content")));
            cJSON *tc = cJSON_GetArrayItem(cJSON_GetObjectItem(msg, "tool_calls"), 0);
            ck_assert_str_eq(cJSON_GetObjectItem(tc, "id")->valuestring, "call_1");
            ck_assert_str_eq(cJSON_GetObjectItem(tc, "type")->valuestring, "function");
            ck_assert_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(tc, "function"), "arguments")->valuestring, "{\"city\": \"Paris\"}");
        } else {
            ck_assert_str_eq(cJSON_GetObjectItem(o, "stop_reason")->valuestring, "tool_use");
            cJSON *content = cJSON_GetObjectItem(o, "content");
            ck_assert_int_eq(cJSON_GetArraySize(content), 1);   /* no empty text block */
            cJSON *blk = cJSON_GetArrayItem(content, 0);
            ck_assert_str_eq(cJSON_GetObjectItem(blk, "type")->valuestring, "tool_use");
            ck_assert_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(blk, "input"), "city")->valuestring, "Paris");
        }
        cJSON_Delete(o);
        free(js);
        /* streaming: text, then the call, then the end */
        api_stream st = { 0 };
        char *a = api_format_stream_start(&r, &res, 5), *b = api_format_stream_text(&r, &res, &st, "Hi", 2);
        char *c = api_format_stream_call(&r, &res, &st, &calls[0]), *d = api_format_stream_finish(&r, &res, &st);
        if (k) {
            ck_assert_ptr_null(strstr(a, "content_block_start"));
            ck_assert_ptr_nonnull(strstr(b, "\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\""));
            ck_assert_ptr_nonnull(strstr(c, "\"content_block_stop\",\"index\":0"));
            ck_assert_ptr_nonnull(strstr(c, "\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"call_1\",\"name\":\"get_weather\",\"input\":{}}"));
            ck_assert_ptr_nonnull(strstr(c, "\"input_json_delta\",\"partial_json\":\"{\\\"city\\\": \\\"Paris\\\"}\""));
            ck_assert_ptr_null(strstr(d, "content_block_stop"));
            ck_assert_ptr_nonnull(strstr(d, "\"stop_reason\":\"tool_use\""));
        } else {
            ck_assert_ptr_nonnull(strstr(c, "\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]"));
            ck_assert_ptr_nonnull(strstr(c, "\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\": \\\"Paris\\\"}\"}}]"));
            ck_assert_ptr_nonnull(strstr(d, "\"finish_reason\":\"tool_calls\""));
        }
        free(a); free(b); free(c); free(d);
        api_request_free(&r);
    }
    char id[40];
    api_tool_call_id(id, true, 12345, 678);
    ck_assert_int_eq(strncmp(id, "toolu_", 6), 0);
    ck_assert_uint_eq(strlen(id), 30);
}
END_TEST

/* Thinking models: what requests say (reasoning_format, enable_thinking, Anthropic thinking,
 * Responses reasoning) and how reasoning is returned in each API, whole and streamed. */
START_TEST(reasoning_requests) {
    api_request r;
    api_error e;
    ck_assert_int_eq(parse(API_OPENAI_CHAT, CHAT_X "\"reasoning_format\":\"none\"}", &r, &e), 0);
    ck_assert_int_eq(r.reasoning_format, API_REASONING_NONE);
    ck_assert(!r.no_thinking && !r.want_thinking && !r.think);
    api_request_free(&r);
    ck_assert_int_eq(parse(API_OPENAI_CHAT, CHAT_X "\"reasoning_format\":\"deepseek\",\"chat_template_kwargs\":{\"enable_thinking\":false}}", &r, &e), 0);
    ck_assert_int_eq(r.reasoning_format, API_REASONING_SPLIT);
    ck_assert(r.no_thinking);
    api_request_free(&r);
    ck_assert_int_eq(parse(API_OPENAI_CHAT, CHAT_X "\"reasoning_format\":\"auto\",\"chat_template_kwargs\":{\"enable_thinking\":true}}", &r, &e), 0);
    ck_assert(!r.no_thinking);
    api_request_free(&r);
    /* Anthropic: enabled (budget not used) / adaptive ask for reasoning; disabled turns it off */
    ck_assert_int_eq(parse(API_ANTHROPIC_MESSAGES, ANTH_X "\"thinking\":{\"type\":\"enabled\",\"budget_tokens\":1024}}", &r, &e), 0);
    ck_assert_str_eq(r.want_thinking, "thinking");
    api_request_free(&r);
    ck_assert_int_eq(parse(API_ANTHROPIC_MESSAGES, ANTH_X "\"thinking\":{\"type\":\"disabled\"}}", &r, &e), 0);
    ck_assert(r.no_thinking && !r.want_thinking);
    api_request_free(&r);
    /* Responses: effort asks for reasoning ("none" turns it off); reasoning items in the input
     * (an earlier turn's) are accepted and left out of the prompt */
    ck_assert_int_eq(parse(API_OPENAI_RESPONSES, "{\"input\":\"x\",\"reasoning\":{\"effort\":\"high\",\"summary\":\"auto\"}}", &r, &e), 0);
    ck_assert_str_eq(r.want_thinking, "reasoning");
    api_request_free(&r);
    ck_assert_int_eq(parse(API_OPENAI_RESPONSES, "{\"input\":\"x\",\"reasoning\":{\"effort\":\"none\"}}", &r, &e), 0);
    ck_assert(r.no_thinking && !r.want_thinking);
    api_request_free(&r);
    expect_bad(API_OPENAI_RESPONSES, "{\"input\":\"x\",\"reasoning\":{\"effort\":\"max\"}}", 400, "reasoning.effort");
    ck_assert_int_eq(parse(API_OPENAI_RESPONSES, "{\"input\":[{\"role\":\"user\",\"content\":\"q\"},"
                                                 "{\"type\":\"reasoning\",\"id\":\"rs_1\",\"summary\":[],\"content\":[{\"type\":\"reasoning_text\",\"text\":\"hm\"}]},"
                                                 "{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"a\"},"
                                                 "{\"role\":\"user\",\"content\":\"next\"}]}", &r, &e), 0);
    ck_assert_int_eq(r.n_msgs, 3);
    ck_assert_str_eq(r.msgs[1].content, "a");
    ck_assert_ptr_null(strstr(r.items, "hm"));
    api_request_free(&r);
}
END_TEST

/* Concatenates and frees the events. */
static char *cat_free(char **parts, int n) {
    size_t cap = 1;
    for (int i = 0; i < n; i++) { ck_assert_ptr_nonnull(parts[i]); cap += strlen(parts[i]); }
    char *all = malloc(cap);
    all[0] = 0;
    for (int i = 0; i < n; i++) { strcat(all, parts[i]); free(parts[i]); }
    return all;
}

static void expect_order(const char *all, const char *const *order, int n) {
    const char *at = all;
    for (int i = 0; i < n; i++) {
        const char *q = strstr(at, order[i]);
        ck_assert_msg(q != NULL, "missing or out of order: %s in\n%s", order[i], all);
        at = q + strlen(order[i]);
    }
}

START_TEST(reasoning_responses) {
    api_request r;
    api_error e;
    engine_usage u = { .prompt_tokens = 5, .completion_tokens = 9 };
    api_result res = { .id = "resp_abc", .model = "m", .text = "Paris.", .text_len = 6, .why = FINISH_STOP, .usage = &u,
                       .reasoning = "Think \"hard\".", .reasoning_len = 13, .reasoning_tokens = 4 };
    /* OpenAI chat: message.reasoning_content, usage's reasoning_tokens */
    ck_assert_int_eq(parse(API_OPENAI_CHAT, CHAT_X "\"stream\":true,\"stream_options\":{\"include_usage\":true}}", &r, &e), 0);
    r.think = true;
    cJSON *o = parse_json(api_format_response(&r, &res));
    cJSON *msg = cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(o, "choices"), 0), "message");
    ck_assert_str_eq(cJSON_GetObjectItem(msg, "reasoning_content")->valuestring, "Think \"hard\".");
    ck_assert_str_eq(cJSON_GetObjectItem(msg, "content")->valuestring, "Paris.");
    ck_assert_int_eq(num(o, "usage.completion_tokens_details.reasoning_tokens"), 4);
    ck_assert_int_eq(num(o, "usage.completion_tokens"), 9);
    cJSON_Delete(o);
    api_result none = res;
    none.reasoning_len = 0;
    o = parse_json(api_format_response(&r, &none));
    msg = cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(o, "choices"), 0), "message");
    ck_assert(cJSON_IsNull(cJSON_GetObjectItem(msg, "reasoning_content")));
    cJSON_Delete(o);
    r.think = false;   /* not a thinking model: no such field */
    o = parse_json(api_format_response(&r, &none));
    msg = cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(o, "choices"), 0), "message");
    ck_assert_ptr_null(cJSON_GetObjectItem(msg, "reasoning_content"));
    cJSON_Delete(o);
    r.think = true;
    {   /* streamed: delta.reasoning_content chunks, then delta.content */
        api_stream st = { 0 };
        api_result part = res;
        part.reasoning_len = 5;
        char *ev[5];
        ev[0] = api_format_stream_reasoning(&r, &part, &st);
        ev[1] = api_format_stream_reasoning(&r, &part, &st);   /* nothing new: "" */
        ck_assert_str_eq(ev[1], "");
        ev[2] = api_format_stream_reasoning(&r, &res, &st);
        ev[3] = api_format_stream_text(&r, &res, &st, "Paris.", 6);
        ev[4] = api_format_stream_finish(&r, &res, &st);
        ck_assert_ptr_nonnull(strstr(ev[0], "\"delta\":{\"reasoning_content\":\"Think\"}"));
        ck_assert_ptr_nonnull(strstr(ev[2], "\"delta\":{\"reasoning_content\":\" \\\"hard\\\".\"}"));
        ck_assert_ptr_nonnull(strstr(ev[3], "\"delta\":{\"content\":\"Paris.\"}"));
        ck_assert_ptr_nonnull(strstr(ev[4], "\"reasoning_tokens\":4"));
        free(cat_free(ev, 5));
    }
    api_request_free(&r);

    /* Anthropic: a thinking block (empty signature) before the text block */
    ck_assert_int_eq(parse(API_ANTHROPIC_MESSAGES, ANTH_X "\"thinking\":{\"type\":\"enabled\",\"budget_tokens\":2000}}", &r, &e), 0);
    r.think = true;
    o = parse_json(api_format_response(&r, &res));
    cJSON *content = cJSON_GetObjectItem(o, "content");
    ck_assert_int_eq(cJSON_GetArraySize(content), 2);
    cJSON *b0 = cJSON_GetArrayItem(content, 0), *b1 = cJSON_GetArrayItem(content, 1);
    ck_assert_str_eq(cJSON_GetObjectItem(b0, "type")->valuestring, "thinking");
    ck_assert_str_eq(cJSON_GetObjectItem(b0, "thinking")->valuestring, "Think \"hard\".");
    ck_assert_str_eq(cJSON_GetObjectItem(b0, "signature")->valuestring, "");
    ck_assert_str_eq(cJSON_GetObjectItem(b1, "type")->valuestring, "text");
    ck_assert_str_eq(cJSON_GetObjectItem(b1, "text")->valuestring, "Paris.");
    cJSON_Delete(o);
    api_result only = res;   /* cut off while thinking: the thinking block alone */
    only.text_len = 0;
    o = parse_json(api_format_response(&r, &only));
    ck_assert_int_eq(cJSON_GetArraySize(cJSON_GetObjectItem(o, "content")), 1);
    cJSON_Delete(o);
    {
        api_stream st = { 0 };
        char *ev[4];
        ev[0] = api_format_stream_start(&r, &res, 5);
        ck_assert_ptr_null(strstr(ev[0], "content_block_start"));
        ev[1] = api_format_stream_reasoning(&r, &res, &st);
        ev[2] = api_format_stream_text(&r, &res, &st, "Paris.", 6);
        ev[3] = api_format_stream_finish(&r, &res, &st);
        char *all = cat_free(ev, 4);
        const char *order[] = {
            "event: message_start", "event: ping",
            "\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\",\"signature\":\"\"}",
            "\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"Think \\\"hard\\\".\"}",
            "\"content_block_stop\",\"index\":0",
            "\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"text\",\"text\":\"\"}",
            "\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"Paris.\"}",
            "\"content_block_stop\",\"index\":1", "event: message_delta", "event: message_stop" };
        expect_order(all, order, 10);
        ck_assert_ptr_null(strstr(all, "\"index\":2"));
        free(all);
        /* thinking only: no text block at all */
        api_stream st2 = { 0 };
        ev[0] = api_format_stream_reasoning(&r, &only, &st2);
        ev[1] = api_format_stream_finish(&r, &only, &st2);
        all = cat_free(ev, 2);
        ck_assert_ptr_null(strstr(all, "\"type\":\"text\""));
        ck_assert_ptr_nonnull(strstr(all, "\"content_block_stop\",\"index\":0"));
        free(all);
    }
    api_request_free(&r);

    /* Responses: a reasoning item (reasoning_text content, empty summary) before the message */
    ck_assert_int_eq(parse(API_OPENAI_RESPONSES, "{\"input\":\"x\",\"stream\":true}", &r, &e), 0);
    r.think = true;
    o = parse_json(api_format_response(&r, &res));
    cJSON *out = cJSON_GetObjectItem(o, "output");
    ck_assert_int_eq(cJSON_GetArraySize(out), 2);
    cJSON *it = cJSON_GetArrayItem(out, 0);
    ck_assert_str_eq(cJSON_GetObjectItem(it, "type")->valuestring, "reasoning");
    ck_assert_str_eq(cJSON_GetObjectItem(it, "id")->valuestring, "rs_abc");
    ck_assert_int_eq(cJSON_GetArraySize(cJSON_GetObjectItem(it, "summary")), 0);
    cJSON *rt = cJSON_GetArrayItem(cJSON_GetObjectItem(it, "content"), 0);
    ck_assert_str_eq(cJSON_GetObjectItem(rt, "type")->valuestring, "reasoning_text");
    ck_assert_str_eq(cJSON_GetObjectItem(rt, "text")->valuestring, "Think \"hard\".");
    ck_assert_str_eq(cJSON_GetObjectItem(cJSON_GetArrayItem(out, 1), "type")->valuestring, "message");
    ck_assert_int_eq(num(o, "usage.output_tokens_details.reasoning_tokens"), 4);
    cJSON_Delete(o);
    {
        api_stream st = { 0 };
        api_tool_call call = { "call_1", "f", "{}" };
        char *ev[6];
        ev[0] = api_format_stream_start(&r, &res, 5);
        ev[1] = api_format_stream_reasoning(&r, &res, &st);
        ev[2] = api_format_stream_text(&r, &res, &st, "Paris.", 6);
        ev[3] = api_format_stream_call(&r, &res, &st, &call);
        api_result fin = res;
        fin.calls = &call;
        fin.n_calls = 1;
        ev[4] = api_format_stream_finish(&r, &fin, &st);
        char *items = api_responses_output_items(&r, &fin, st.msg_item);
        ev[5] = strdup("");
        char *all = cat_free(ev, 6);
        const char *order[] = {
            "\"response.output_item.added\",\"sequence_number\":2,\"output_index\":0,\"item\":{\"id\":\"rs_abc\",\"type\":\"reasoning\"",
            "\"response.content_part.added\",\"sequence_number\":3,\"item_id\":\"rs_abc\",\"output_index\":0,\"content_index\":0,\"part\":{\"type\":\"reasoning_text\"",
            "\"response.reasoning_text.delta\",\"sequence_number\":4,\"item_id\":\"rs_abc\",\"output_index\":0,\"content_index\":0,\"delta\":\"Think",
            "\"response.reasoning_text.done\"", "\"text\":\"Think \\\"hard\\\".\"",
            "\"response.content_part.done\"", "\"response.output_item.done\"", "\"status\":\"completed\"",
            "\"response.output_item.added\"", "\"output_index\":1,\"item\":{\"id\":\"msg_abc\"",
            "\"response.output_text.delta\"",
            "\"response.output_item.added\"", "\"output_index\":2,\"item\":{\"id\":\"fc_1\"",
            "\"response.output_text.done\"", "\"response.completed\"" };
        expect_order(all, order, 15);
        free(all);
        /* the stored items (and the final response) list them in the streamed order */
        cJSON *arr = parse_json(items);
        ck_assert_int_eq(cJSON_GetArraySize(arr), 3);
        ck_assert_str_eq(cJSON_GetObjectItem(cJSON_GetArrayItem(arr, 0), "type")->valuestring, "reasoning");
        ck_assert_str_eq(cJSON_GetObjectItem(cJSON_GetArrayItem(arr, 1), "type")->valuestring, "message");
        ck_assert_str_eq(cJSON_GetObjectItem(cJSON_GetArrayItem(arr, 2), "type")->valuestring, "function_call");
        cJSON_Delete(arr);
    }
    api_request_free(&r);
}
END_TEST

int main(void) {
    Suite *s = suite_create("api");
    TCase *tc = tcase_create("api");
    tcase_add_test(tc, openai_chat_valid);
    tcase_add_test(tc, openai_chat_invalid);
    tcase_add_test(tc, openai_completion);
    tcase_add_test(tc, model_optional);
    tcase_add_test(tc, completion_token_ids);
    tcase_add_test(tc, anthropic_valid_and_breakpoints);
    tcase_add_test(tc, anthropic_render_fallback_and_prefill);
    tcase_add_test(tc, anthropic_invalid);
    tcase_add_test(tc, byte_to_token);
    tcase_add_test(tc, usage_shapes);
    tcase_add_test(tc, response_shapes);
    tcase_add_test(tc, error_shapes);
    tcase_add_test(tc, params_honoured);
    tcase_add_test(tc, params_refused);
    tcase_add_test(tc, response_format_parsed);
    tcase_add_test(tc, responses_parsed_as_chat);
    tcase_add_test(tc, utf8_strict);
    tcase_add_test(tc, logprobs_shapes);
    tcase_add_test(tc, tools_parsed);
    tcase_add_test(tc, toolcall_parse);
    tcase_add_test(tc, toolcall_grammars);
    tcase_add_test(tc, toolcall_render);
    tcase_add_test(tc, toolcall_responses);
    tcase_add_test(tc, reasoning_requests);
    tcase_add_test(tc, reasoning_responses);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? 1 : 0;
}
