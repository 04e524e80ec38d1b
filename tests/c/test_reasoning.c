/* reasoning: the <think> splitter. Each case is checked fed whole, fed a byte at a time and fed
 * in two and three pieces split at every possible boundary: the released reasoning and content
 * are always prefixes of the expected ones (nothing is released that a later byte would have to
 * take back, e.g. a partial "</thi"), and at the end equal them. */
#include "reasoning.h"
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    bool inside;          /* the prompt ends inside the block */
    const char *text;
    const char *reasoning, *content;
} rcase;

static const rcase cases[] = {
    /* the usual shapes */
    { false, "<think>\nLet me see.\n</think>\n\nParis.", "Let me see.", "Paris." },
    { false, "  \n<think>a b</think>c", "a b", "c" },
    { false, "<think>\n\n</think>\n\nHi there", "", "Hi there" },
    { true, "\nThe user asks.\n</think>\n\nAnswer.", "The user asks.", "Answer." },
    { true, "<think>\nx\n</think>y", "x", "y" },
    /* no </think> ever: all reasoning if started inside or opened, all content if never opened */
    { true, "thinking and thinking", "thinking and thinking", "" },
    { true, "cut off mid-tag </thi", "cut off mid-tag </thi", "" },
    { false, "<think>never closed\n", "never closed", "" },
    { false, "no tags at all", "", "no tags at all" },
    { false, "", "", "" },
    { false, " \n ", "", " \n " },
    { false, "<thi", "", "<thi" },
    { false, "<think", "", "<think" },
    /* text before <think>: no block (the tags are content) */
    { false, "Hi <think>x</think>y", "", "Hi <think>x</think>y" },
    { false, "x<think>y</think>", "", "x<think>y</think>" },
    { false, "</think>z", "", "</think>z" },
    /* nested and duplicate tags: the block ends at the first </think>; later tags are content */
    { false, "<think>a<think>b</think>c</think>d", "a<think>b", "c</think>d" },
    { false, "<think></think><think>x</think>", "", "<think>x</think>" },
    { false, "<think><think>x</think>", "<think>x", "" },
    { true, "a</think></think>b", "a", "</think>b" },
    { true, "a</think>\n\n</think>", "a", "</think>" },
    /* near misses of the closing tag stay reasoning */
    { true, "a </b> <//think> </ think></thinkx>", "a </b> <//think> </ think></thinkx>", "" },
    { true, "a</think", "a</think", "" },
    /* whitespace: trimmed around the reasoning and before the content, kept inside them */
    { true, "  a \n\n b  \t</think>  c \n d  ", "a \n\n b", "c \n d  " },
    { true, "\n\n", "", "" },
    /* UTF-8 in all parts */
    { false, "<think>é≈😀</think>😀x", "é≈😀", "😀x" },
};
#define N_CASES (sizeof cases / sizeof cases[0])

static void check_prefixes(const rcase *c, const reasoning_parser *p, const char *how) {
    const size_t nr = strlen(c->reasoning), nc = strlen(c->content);
    ck_assert_msg(p->n_reasoning <= nr && !memcmp(p->reasoning ? p->reasoning : "", c->reasoning, p->n_reasoning),
                  "'%s' (%s): reasoning released early: '%.*s'", c->text, how, (int)p->n_reasoning, p->reasoning);
    ck_assert_msg(p->n_content <= nc && !memcmp(p->content ? p->content : "", c->content, p->n_content),
                  "'%s' (%s): content released early: '%.*s'", c->text, how, (int)p->n_content, p->content);
}

static void check_final(const rcase *c, const reasoning_parser *p, const char *how) {
    ck_assert_msg(p->n_reasoning == strlen(c->reasoning) && p->n_content == strlen(c->content),
                  "'%s' (%s): got reasoning '%.*s' content '%.*s', want '%s' / '%s'", c->text, how, (int)p->n_reasoning,
                  p->reasoning ? p->reasoning : "", (int)p->n_content, p->content ? p->content : "", c->reasoning, c->content);
    check_prefixes(c, p, how);
    ck_assert_uint_eq(p->fed, strlen(c->text));
}

/* Feeds c->text cut at the given points (ascending), then the final (empty) feed. */
static void run_cuts(const rcase *c, const size_t *cuts, int n_cuts, const char *how) {
    reasoning_parser p;
    reasoning_init(&p, c->inside);
    const size_t len = strlen(c->text);
    size_t at = 0;
    for (int k = 0; k <= n_cuts; k++) {
        const size_t to = k < n_cuts ? cuts[k] : len;
        ck_assert(reasoning_feed(&p, c->text + at, to - at, false));
        check_prefixes(c, &p, how);
        at = to;
    }
    ck_assert(reasoning_feed(&p, "", 0, true));
    check_final(c, &p, how);
    reasoning_free(&p);
}

START_TEST(whole_text) {
    for (size_t i = 0; i < N_CASES; i++) {
        const rcase *c = &cases[i];
        reasoning_parser p;
        reasoning_init(&p, c->inside);
        ck_assert(reasoning_feed(&p, c->text, strlen(c->text), true));
        check_final(c, &p, "whole");
        reasoning_free(&p);
    }
}
END_TEST

START_TEST(every_boundary) {
    for (size_t i = 0; i < N_CASES; i++) {
        const rcase *c = &cases[i];
        const size_t len = strlen(c->text);
        char how[64];
        /* a byte at a time */
        size_t *all = malloc((len + 1) * sizeof *all);
        for (size_t k = 0; k < len; k++) all[k] = k + 1;
        run_cuts(c, all, len > 0 ? (int)len - 1 : 0, "bytewise");
        free(all);
        /* two and three pieces, every boundary */
        for (size_t a = 0; a <= len; a++) {
            snprintf(how, sizeof how, "cut at %zu", a);
            run_cuts(c, &a, 1, how);
            for (size_t b = a; b <= len; b++) {
                const size_t cuts[2] = { a, b };
                snprintf(how, sizeof how, "cut at %zu and %zu", a, b);
                run_cuts(c, cuts, 2, how);
            }
        }
    }
}
END_TEST

START_TEST(holds_back_partial_tags) {
    reasoning_parser p;
    reasoning_init(&p, true);
    ck_assert(reasoning_feed(&p, "abc</thi", 8, false));
    ck_assert_str_eq(p.reasoning, "abc");
    ck_assert_uint_eq(p.n_content, 0);
    ck_assert(reasoning_feed(&p, "nk>", 3, false));   /* "</think>" complete: not reasoning */
    ck_assert_str_eq(p.reasoning, "abc");
    ck_assert(reasoning_feed(&p, "\n\n", 2, false));  /* whitespace before the content: dropped */
    ck_assert_uint_eq(p.n_content, 0);
    ck_assert(reasoning_feed(&p, "Yes", 3, false));
    ck_assert_str_eq(p.content, "Yes");
    reasoning_free(&p);

    /* whitespace in the reasoning is held until it is known not to end it */
    reasoning_init(&p, false);
    ck_assert(reasoning_feed(&p, "<think>a \n", 10, false));
    ck_assert_str_eq(p.reasoning, "a");
    ck_assert(reasoning_feed(&p, "b", 1, false));
    ck_assert_str_eq(p.reasoning, "a \nb");
    reasoning_free(&p);

    /* a partial opening tag at the start is held; a mismatch releases it all as content */
    reasoning_init(&p, false);
    ck_assert(reasoning_feed(&p, " <thin", 6, false));
    ck_assert_uint_eq(p.n_content + p.n_reasoning, 0);
    ck_assert(reasoning_feed(&p, "g", 1, false));
    ck_assert_str_eq(p.content, " <thing");
    reasoning_free(&p);
}
END_TEST

START_TEST(reasoning_end_offsets) {
    reasoning_parser p;
    reasoning_init(&p, false);
    ck_assert(reasoning_feed(&p, "<think>ab", 9, false));
    ck_assert_uint_eq(p.reasoning_end, 9);            /* open: all of it so far */
    ck_assert(reasoning_feed(&p, "</think>\n\ncd", 12, true));
    ck_assert_uint_eq(p.reasoning_end, 17);           /* up to the end of </think> */
    reasoning_free(&p);

    reasoning_init(&p, false);
    ck_assert(reasoning_feed(&p, "plain <think>x</think>", 22, true));
    ck_assert_uint_eq(p.reasoning_end, 0);            /* no block */
    reasoning_free(&p);

    reasoning_init(&p, true);
    ck_assert(reasoning_feed(&p, "still thinking", 14, true));
    ck_assert_uint_eq(p.reasoning_end, 14);
    reasoning_free(&p);
}
END_TEST

int main(void) {
    Suite *s = suite_create("reasoning");
    TCase *tc = tcase_create("reasoning");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, whole_text);
    tcase_add_test(tc, every_boundary);
    tcase_add_test(tc, holds_back_partial_tags);
    tcase_add_test(tc, reasoning_end_offsets);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
