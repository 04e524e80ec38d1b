/* grammar + jsonschema: the matcher's semantics on hand-built grammars, the token mask against a
 * brute-force check of every token, and compiled schemas accepting exactly what they should. */
#include "grammar.h"
#include "jsonschema.h"
#include <check.h>
#include <stdlib.h>
#include <string.h>

/* "complete", "prefix" or "rejected" */
static const char *judge(grammar *g, const char *s) {
    const int st = grammar_advance(g, grammar_start(g), s, strlen(s));
    ck_assert_int_ge(st, 0);
    return st == GRAMMAR_DEAD ? "rejected" : grammar_accepting(g, st) ? "complete" : "prefix";
}

static grammar *schema(const char *text, char *err, size_t errlen) {
    cJSON *j = cJSON_Parse(text);
    ck_assert_ptr_nonnull(j);
    grammar *g = jsonschema_compile(j, err, errlen);
    cJSON_Delete(j);
    return g;
}

static void expect(grammar *g, const char *s, const char *want) {
    const char *got = judge(g, s);
    ck_assert_msg(!strcmp(got, want), "'%s': %s, expected %s", s, got, want);
}

START_TEST(alternatives_and_references) {
    /* root ::= "ab" | "a" c ; c ::= "c" | "d" c */
    gbuild *b = gb_new();
    const int root = gb_rule(b), c = gb_rule(b);
    gb_alt(b, c);
    gb_lit(b, "c", 1);
    gb_alt(b, c);
    gb_lit(b, "d", 1);
    gb_ref(b, c);
    gb_alt(b, root);
    gb_lit(b, "ab", 2);
    gb_alt(b, root);
    gb_lit(b, "a", 1);
    gb_ref(b, c);
    char err[128];
    grammar *g = gb_finish(b, root, err, sizeof err);
    ck_assert_ptr_nonnull(g);
    expect(g, "", "prefix");
    expect(g, "a", "prefix");
    expect(g, "ab", "complete");
    expect(g, "ac", "complete");
    expect(g, "adddc", "complete");
    expect(g, "addd", "prefix");
    expect(g, "abc", "rejected");
    expect(g, "b", "rejected");
    ck_assert(!grammar_can_continue(g, grammar_advance(g, grammar_start(g), "ab", 2)));
    grammar_unref(g);
}
END_TEST

START_TEST(repetition_bounds_and_tail_calls) {
    gbuild *b = gb_new();
    const int x = gb_rule(b);
    gb_alt(b, x);
    gb_lit(b, "x", 1);
    const int r = gb_repeat(b, x, 2, 4), star = gb_repeat(b, x, 0, -1);
    const int root = gb_rule(b);
    gb_alt(b, root);
    gb_lit(b, "<", 1);
    gb_ref(b, r);
    gb_lit(b, "|", 1);
    gb_ref(b, star);
    gb_lit(b, ">", 1);
    char err[128];
    grammar *g = gb_finish(b, root, err, sizeof err);
    ck_assert_ptr_nonnull(g);
    expect(g, "<x|", "rejected");
    expect(g, "<xx|>", "complete");
    expect(g, "<xxxx|>", "complete");
    expect(g, "<xxxxx", "rejected");
    /* a long run through the star: tail calls keep the stacks from growing */
    int st = grammar_advance(g, grammar_start(g), "<xx|", 4);
    for (int i = 0; i < 100000; i++) st = grammar_step(g, st, 'x');
    ck_assert_int_gt(st, 0);
    st = grammar_step(g, st, '>');
    ck_assert(grammar_accepting(g, st));
    grammar_stats gs;
    grammar_get_stats(g, &gs);
    ck_assert_int_lt(gs.stacks, 64);
    ck_assert_int_lt(gs.states, 64);
    grammar_unref(g);
}
END_TEST

START_TEST(bad_grammars_refused) {
    char err[128];
    gbuild *b = gb_new();
    const int r = gb_rule(b);   /* no alternative */
    ck_assert_ptr_null(gb_finish(b, r, err, sizeof err));
    b = gb_new();                /* left recursion: r ::= r "a" | "b" */
    const int l = gb_rule(b);
    gb_alt(b, l);
    gb_ref(b, l);
    gb_lit(b, "a", 1);
    gb_alt(b, l);
    gb_lit(b, "b", 1);
    ck_assert_ptr_null(gb_finish(b, l, err, sizeof err));
    ck_assert_ptr_nonnull(strstr(err, "recursive"));
}
END_TEST

/* a small vocabulary: every token's mask bit must equal "its bytes keep the state alive" */
static const char *const VOCAB[] = { "{", "}", "\"", "\":", "a", "ab", "\"a", "1", "12", "-", " ", "\n", ",", "true", "tr",
                                     "null", "\xc3\xa9", "\xc3", "\xa9", ", \"", "]", "[", "", "\\", "\\n", "\\u00e9", "x\"}" };
#define NV ((int)(sizeof VOCAB / sizeof VOCAB[0]))
static const char *vpiece(void *user, int32_t id, size_t *len) {
    (void)user;
    *len = strlen(VOCAB[id]);
    return VOCAB[id];
}

START_TEST(mask_equals_brute_force) {
    char err[256];
    grammar *g = schema("{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"string\",\"maxLength\":3},"
                        "\"b\":{\"type\":[\"integer\",\"null\"]},\"c\":{\"enum\":[true,\"x\"]}},\"required\":[\"a\"]}",
                        err, sizeof err);
    ck_assert_msg(g != NULL, "%s", err);
    vocab_trie *t = vocab_trie_build(NV, vpiece, NULL);
    ck_assert_ptr_nonnull(t);
    const char *prefixes[] = { "", "{", "{\"", "{\"a\":\"", "{\"a\":\"ab", "{\"a\":\"abc", "{\"a\":\"\\", "{\"a\":\"\xc3",
                               "{\"a\":\"x\"", "{\"a\":\"x\",", "{\"a\":\"x\", \"b\":", "{\"a\":\"x\", \"b\":1", "{\"a\":\"x\",\"c\":tr",
                               "{\"a\":\"x\"}" };
    for (size_t p = 0; p < sizeof prefixes / sizeof *prefixes; p++) {
        const int st = grammar_advance(g, grammar_start(g), prefixes[p], strlen(prefixes[p]));
        ck_assert_msg(st > 0, "prefix '%s' dead", prefixes[p]);
        const uint64_t *m = grammar_mask(g, t, st);
        ck_assert_ptr_nonnull(m);
        for (int i = 0; i < NV; i++) {
            const size_t n = strlen(VOCAB[i]);
            const bool alive = n > 0 && grammar_advance(g, st, VOCAB[i], n) > 0;
            ck_assert_msg(alive == (bool)(m[i >> 6] >> (i & 63) & 1), "prefix '%s' token '%s': mask %d, brute force %d",
                          prefixes[p], VOCAB[i], !alive, alive);
        }
        ck_assert_ptr_eq(grammar_mask(g, t, st), m);   /* cached */
    }
    vocab_trie_free(t);
    grammar_unref(g);
}
END_TEST

START_TEST(object_properties) {
    char err[256];
    grammar *g = schema("{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"integer\"},\"b\":{\"type\":\"string\"},"
                        "\"c\":{\"type\":\"boolean\"}},\"required\":[\"a\",\"c\"],\"additionalProperties\":false}", err, sizeof err);
    ck_assert_msg(g != NULL, "%s", err);
    expect(g, "{\"a\":1,\"c\":true}", "complete");
    expect(g, "{\"a\": -12, \"b\": \"x y\", \"c\": false}", "complete");
    expect(g, "{\n  \"a\": 0,\n  \"c\": true\n}", "complete");
    expect(g, "{\"a\":1}", "rejected");              /* c required */
    expect(g, "{\"c\":true,\"a\":1}", "rejected");   /* schema order */
    expect(g, "{\"a\":01,\"c\":true}", "rejected");  /* JSON numbers */
    expect(g, "{\"a\":1,\"d\":1}", "rejected");      /* not listed */
    expect(g, "{\"a\":1,\"c\":true}   ", "rejected"); /* whitespace is bounded */
    grammar_unref(g);
    g = schema("{\"type\":\"object\",\"properties\":{\"x\":{\"type\":\"number\"},\"y\":{\"type\":\"null\"}}}", err, sizeof err);
    ck_assert_msg(g != NULL, "%s", err);
    expect(g, "{}", "complete");   /* nothing required */
    expect(g, "{\"y\":null}", "complete");
    expect(g, "{\"x\":1.5e-3,\"y\":null}", "complete");
    expect(g, "{,\"y\":null}", "rejected");
    expect(g, "{\"x\":1.}", "rejected");
    grammar_unref(g);
}
END_TEST

START_TEST(strings_arrays_enums) {
    char err[256];
    grammar *g = schema("{\"type\":\"array\",\"items\":{\"type\":\"string\",\"minLength\":1,\"maxLength\":3},\"minItems\":1,\"maxItems\":2}", err, sizeof err);
    ck_assert_msg(g != NULL, "%s", err);
    expect(g, "[\"a\"]", "complete");
    expect(g, "[\"abc\", \"\\n\\u00e9\xc3\xa9\"]", "complete");   /* escapes and UTF-8 count one character each */
    expect(g, "[]", "rejected");
    expect(g, "[\"\"]", "rejected");
    expect(g, "[\"abcd\"]", "rejected");
    expect(g, "[\"a\",\"b\",\"c\"]", "rejected");
    expect(g, "[\"\xff\"]", "rejected");      /* not UTF-8 */
    expect(g, "[\"\x01\"]", "rejected");      /* control characters must be escaped */
    expect(g, "[\"\\x\"]", "rejected");
    grammar_unref(g);
    g = schema("{\"anyOf\":[{\"enum\":[\"red\",\"green\",3]},{\"const\":{\"k\":[1,null]}},{\"type\":\"integer\",\"minimum\":0}]}", err, sizeof err);
    ck_assert_msg(g != NULL, "%s", err);
    expect(g, "\"green\"", "complete");
    expect(g, "3", "complete");   /* enum and integer both */
    expect(g, "{\"k\":[1,null]}", "complete");
    expect(g, "\"blue\"", "rejected");
    expect(g, "-1", "rejected");
    grammar_unref(g);
    g = schema("{\"type\":\"string\",\"format\":\"date-time\"}", err, sizeof err);
    ck_assert_msg(g != NULL, "%s", err);
    expect(g, "\"2026-12-01T04:22:39Z\"", "complete");
    expect(g, "\"2026-13-01T04:22:39Z\"", "rejected");
    grammar_unref(g);
}
END_TEST

START_TEST(recursion_and_refs) {
    char err[256];
    grammar *g = schema("{\"$defs\":{\"node\":{\"type\":\"object\",\"properties\":{\"v\":{\"type\":\"integer\"},"
                        "\"kids\":{\"type\":\"array\",\"items\":{\"$ref\":\"#/$defs/node\"}}},\"required\":[\"v\"]}},"
                        "\"$ref\":\"#/$defs/node\"}", err, sizeof err);
    ck_assert_msg(g != NULL, "%s", err);
    expect(g, "{\"v\":1,\"kids\":[{\"v\":2},{\"v\":3,\"kids\":[{\"v\":4,\"kids\":[]}]}]}", "complete");
    expect(g, "{\"v\":1,\"kids\":[{\"kids\":[]}]}", "rejected");
    grammar_unref(g);
    g = schema("{\"type\":\"object\",\"properties\":{\"next\":{\"anyOf\":[{\"$ref\":\"#\"},{\"type\":\"null\"}]}},\"required\":[\"next\"]}", err, sizeof err);
    ck_assert_msg(g != NULL, "%s", err);
    expect(g, "{\"next\":{\"next\":{\"next\":null}}}", "complete");
    grammar_unref(g);
}
END_TEST

START_TEST(unsupported_keywords_named) {
    struct { const char *schema, *word; } bad[] = {
        { "{\"type\":\"string\",\"pattern\":\"a+\"}", "pattern" },
        { "{\"type\":\"integer\",\"maximum\":3}", "maximum" },
        { "{\"type\":\"integer\",\"minimum\":5}", "minimum" },
        { "{\"oneOf\":[{\"type\":\"string\"}]}", "oneOf" },
        { "{\"allOf\":[{\"type\":\"string\"}]}", "allOf" },
        { "{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"string\",\"format\":\"email\"}}}", "email" },
        { "{\"type\":\"object\",\"properties\":{\"a\":{\"not\":{}}}}", "not" },
        { "{\"type\":\"object\",\"required\":[\"z\"]}", "z" },
        { "{\"type\":\"wat\"}", "wat" },
        { "{\"$ref\":\"#/$defs/missing\"}", "missing" },
        { "{\"$ref\":\"http://example.com/s.json\"}", "example.com" },
        { "false", "false" },
        { "{\"type\":\"array\",\"maxItems\":-1}", "maxItems" },
        { "{\"type\":\"string\",\"maxLength\":1000000}", "maxLength" },
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char err[256] = "";
        grammar *g = schema(bad[i].schema, err, sizeof err);
        ck_assert_msg(g == NULL, "accepted %s", bad[i].schema);
        ck_assert_msg(strstr(err, bad[i].word) != NULL, "'%s' does not name '%s'", err, bad[i].word);
    }
    /* annotations are fine */
    char err[256];
    grammar *g = schema("{\"title\":\"t\",\"description\":\"d\",\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"string\","
                        "\"description\":\"x\",\"examples\":[\"q\"]}},\"required\":[\"a\"],\"additionalProperties\":false,\"$schema\":\"s\"}",
                        err, sizeof err);
    ck_assert_msg(g != NULL, "%s", err);
    grammar_unref(g);
}
END_TEST

START_TEST(any_object_and_cache) {
    char err[256];
    grammar *g = jsonschema_any_object(err, sizeof err);
    ck_assert_ptr_nonnull(g);
    expect(g, "{}", "complete");
    expect(g, "{\"a\": [1, {\"b\": null}, \"s\", true, -0.5e+10]}", "complete");
    expect(g, "[]", "rejected");
    expect(g, "\"s\"", "rejected");
    grammar_unref(g);
    schema_cache *c = schema_cache_new(2);
    grammar *a = schema_cache_get(c, "{\"type\":\"integer\"}", err, sizeof err);
    grammar *a2 = schema_cache_get(c, "{\"type\":\"integer\"}", err, sizeof err);
    ck_assert_ptr_nonnull(a);
    ck_assert_ptr_eq(a, a2);   /* one grammar per schema text */
    grammar *o = schema_cache_get(c, NULL, err, sizeof err), *s = schema_cache_get(c, "{\"type\":\"string\"}", err, sizeof err);
    ck_assert_ptr_nonnull(o);
    ck_assert_ptr_nonnull(s);
    ck_assert_ptr_null(schema_cache_get(c, "{\"type\":3}", err, sizeof err));
    ck_assert_ptr_null(schema_cache_get(c, "{", err, sizeof err));
    grammar *a3 = schema_cache_get(c, "{\"type\":\"integer\"}", err, sizeof err);   /* evicted (cap 2), compiled again */
    ck_assert_ptr_nonnull(a3);
    ck_assert_ptr_ne(a3, a);
    expect(a, "12", "complete");   /* a reference outlives eviction */
    grammar_unref(a), grammar_unref(a2), grammar_unref(a3), grammar_unref(o), grammar_unref(s);
    schema_cache_free(c);
}
END_TEST

int main(void) {
    Suite *s = suite_create("grammar");
    TCase *tc = tcase_create("grammar");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, alternatives_and_references);
    tcase_add_test(tc, repetition_bounds_and_tail_calls);
    tcase_add_test(tc, bad_grammars_refused);
    tcase_add_test(tc, mask_equals_brute_force);
    tcase_add_test(tc, object_properties);
    tcase_add_test(tc, strings_arrays_enums);
    tcase_add_test(tc, recursion_and_refs);
    tcase_add_test(tc, unsupported_keywords_named);
    tcase_add_test(tc, any_object_and_cache);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
