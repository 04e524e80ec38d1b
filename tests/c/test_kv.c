/* KV block pool tests: sizing, alloc/ref/unref, sequences (prepare/truncate/release), copy on
 * write, the reclaim hook, and the memory layout the model relies on. */
#include <check.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kv.h"

#define NL 2
#define KD 4
#define BLOCK_BYTES ((size_t)NL * 2 * KV_BLOCK * KD * sizeof(kv_elem))

static void init_pool(kv_pool *p, int n_blocks) {
    char err[256];
    ck_assert_int_eq(kv_pool_init(p, NL, KD, BLOCK_BYTES * (size_t)n_blocks + 17, err, sizeof err), 0);
    ck_assert_int_eq(p->n_blocks, n_blocks);
}

/* Every element of position pos (all layers, K and V) gets a value derived from (tag, pos). */
static kv_elem val(int tag, int pos, int layer, int kv, int j) {
    return (kv_elem)(1 + ((tag * 7919 + pos * 97 + layer * 13 + kv * 5 + j) & 0x7fff));   /* never 0 */
}
static void write_pos(kv_pool *p, const kv_seq *s, int pos, int tag) {
    int32_t b = s->blocks[pos / KV_BLOCK];
    for (int l = 0; l < NL; l++)
        for (int j = 0; j < KD; j++) {
            kv_k(p, b, l)[(pos % KV_BLOCK) * KD + j] = val(tag, pos, l, 0, j);
            kv_v(p, b, l)[(pos % KV_BLOCK) * KD + j] = val(tag, pos, l, 1, j);
        }
}
static bool check_pos(const kv_pool *p, const kv_seq *s, int pos, int tag) {
    int32_t b = s->blocks[pos / KV_BLOCK];
    for (int l = 0; l < NL; l++)
        for (int j = 0; j < KD; j++)
            if (kv_k(p, b, l)[(pos % KV_BLOCK) * KD + j] != val(tag, pos, l, 0, j) ||
                kv_v(p, b, l)[(pos % KV_BLOCK) * KD + j] != val(tag, pos, l, 1, j))
                return false;
    return true;
}
/* Appends positions [s->n_tokens, n) written with tag. */
static int compute(kv_pool *p, kv_seq *s, int n, int tag) {
    if (kv_seq_prepare(p, s, n)) return -1;
    for (int pos = s->n_tokens; pos < n; pos++) write_pos(p, s, pos, tag);
    s->n_tokens = n;
    return 0;
}

START_TEST(init_sizes_and_errors) {
    kv_pool p;
    char err[256] = "";
    ck_assert_int_eq(kv_pool_init(&p, NL, KD, BLOCK_BYTES * 2 - 1, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "at least 2"));
    ck_assert_ptr_null(p.data);
    ck_assert_int_eq(kv_pool_init(&p, 0, KD, 1 << 20, err, sizeof err), -1);
    ck_assert_int_eq(kv_pool_init(&p, NL, -3, 1 << 20, err, sizeof err), -1);
    ck_assert_int_eq(kv_pool_init(&p, 1 << 30, 1 << 30, SIZE_MAX, err, sizeof err), -1); /* overflow */
    ck_assert_int_eq(kv_pool_init(&p, NL, KD, BLOCK_BYTES * 2, err, sizeof err), 0);
    ck_assert_int_eq(p.n_blocks, 2);
    ck_assert_uint_eq(p.block_floats, (size_t)NL * 2 * KV_BLOCK * KD);
    ck_assert_int_eq(kv_blocks_used(&p), 0);
    kv_pool_free(&p);
    init_pool(&p, 10);
    kv_pool_free(&p);
}
END_TEST

START_TEST(layout_regions_disjoint) {
    kv_pool p;
    init_pool(&p, 3);
    /* Each (block, layer, K|V) region is KV_BLOCK*KD floats, all disjoint and inside data. */
    size_t region = (size_t)KV_BLOCK * KD;
    for (int b = 0; b < 3; b++)
        for (int l = 0; l < NL; l++) {
            ck_assert_ptr_eq(kv_v(&p, b, l), kv_k(&p, b, l) + region);
            if (l + 1 < NL) ck_assert_ptr_eq(kv_k(&p, b, l + 1), kv_v(&p, b, l) + region);
            ck_assert(kv_v(&p, b, l) + region <= p.data + 3 * p.block_floats);
        }
    ck_assert_ptr_eq(kv_k(&p, 1, 0), p.data + p.block_floats);
    kv_pool_free(&p);
}
END_TEST

START_TEST(alloc_ref_unref) {
    kv_pool p;
    init_pool(&p, 4);
    int32_t b[4];
    for (int i = 0; i < 4; i++) {
        b[i] = kv_block_alloc(&p);
        ck_assert_int_ge(b[i], 0);
        ck_assert_int_eq(p.refcnt[b[i]], 1);
        for (int j = 0; j < i; j++) ck_assert_int_ne(b[i], b[j]);
    }
    ck_assert_int_eq(kv_blocks_used(&p), 4);
    ck_assert_int_eq(kv_block_alloc(&p), -1);           /* exhausted, no reclaim hook */
    kv_block_ref(&p, b[2]);
    kv_block_unref(&p, b[2]);
    ck_assert_int_eq(p.refcnt[b[2]], 1);
    ck_assert_int_eq(kv_blocks_used(&p), 4);
    kv_block_unref(&p, b[2]);
    ck_assert_int_eq(kv_blocks_used(&p), 3);
    ck_assert_int_eq(kv_block_alloc(&p), b[2]);         /* LIFO reuse */
    /* bad input is ignored, not a crash and not a double free */
    kv_block_unref(&p, -1);
    kv_block_unref(&p, 99);
    kv_block_ref(&p, 99);
    for (int i = 0; i < 4; i++) kv_block_unref(&p, b[i]);
    kv_block_unref(&p, b[0]);                           /* already free */
    kv_block_ref(&p, b[0]);                             /* ref of a free block: ignored */
    ck_assert_int_eq(p.refcnt[b[0]], 0);
    ck_assert_int_eq(kv_blocks_used(&p), 0);
    ck_assert_int_eq(p.n_free, 4);
    kv_pool_free(&p);
}
END_TEST

START_TEST(seq_prepare_truncate_release) {
    kv_pool p;
    init_pool(&p, 8);
    kv_seq s = {0};
    ck_assert_int_eq(kv_seq_prepare(&p, &s, 0), 0);
    ck_assert_int_eq(s.n_blocks, 0);
    ck_assert_int_eq(compute(&p, &s, 1, 1), 0);
    ck_assert_int_eq(s.n_blocks, 1);
    ck_assert_int_eq(compute(&p, &s, 16, 1), 0);
    ck_assert_int_eq(s.n_blocks, 1);
    ck_assert_int_eq(compute(&p, &s, 17, 1), 0);
    ck_assert_int_eq(s.n_blocks, 2);
    ck_assert_int_eq(compute(&p, &s, 100, 1), 0);
    ck_assert_int_eq(s.n_blocks, 7);
    for (int pos = 0; pos < 100; pos++) ck_assert(check_pos(&p, &s, pos, 1));
    /* more than the pool: fails, sequence unchanged */
    int32_t before[7];
    memcpy(before, s.blocks, sizeof before);
    ck_assert_int_eq(kv_seq_prepare(&p, &s, 200), -1);
    ck_assert_int_eq(s.n_blocks, 7);
    ck_assert_int_eq(s.n_tokens, 100);
    ck_assert_int_eq(memcmp(before, s.blocks, sizeof before), 0);
    ck_assert_int_eq(kv_blocks_used(&p), 7);
    kv_seq_truncate(&p, &s, 33);
    ck_assert_int_eq(s.n_blocks, 3);
    ck_assert_int_eq(s.n_tokens, 33);
    ck_assert_int_eq(kv_blocks_used(&p), 3);
    kv_seq_truncate(&p, &s, 32);
    ck_assert_int_eq(s.n_blocks, 2);
    kv_seq_truncate(&p, &s, -5);
    ck_assert_int_eq(s.n_blocks, 0);
    ck_assert_int_eq(s.n_tokens, 0);
    ck_assert_int_eq(compute(&p, &s, 40, 2), 0);
    kv_seq_release(&p, &s);
    ck_assert_int_eq(s.n_blocks, 0);
    ck_assert_ptr_null(s.blocks);
    kv_seq_release(&p, &s);                             /* twice is fine */
    ck_assert_int_eq(kv_blocks_used(&p), 0);
    kv_pool_free(&p);
}
END_TEST

/* A shares its blocks with B (as a prefix-cache match does); B writes inside the shared
 * partial block: B gets a copy, A's data is untouched. */
START_TEST(copy_on_write_partial_block) {
    kv_pool p;
    init_pool(&p, 8);
    kv_seq a = {0}, b = {0};
    ck_assert_int_eq(compute(&p, &a, 20, 1), 0);        /* 2 blocks, the second holds 4 slots */
    b.blocks = malloc(2 * sizeof *b.blocks);
    b.cap_blocks = 2;
    for (int i = 0; i < 2; i++) { b.blocks[i] = a.blocks[i]; kv_block_ref(&p, a.blocks[i]); }
    b.n_blocks = 2;
    b.n_tokens = 20;
    ck_assert_int_eq(kv_blocks_used(&p), 2);
    ck_assert_int_eq(compute(&p, &b, 25, 2), 0);        /* writes positions 20..24 */
    ck_assert_int_eq(b.blocks[0], a.blocks[0]);          /* full block stays shared */
    ck_assert_int_ne(b.blocks[1], a.blocks[1]);          /* partial block copied */
    ck_assert_int_eq(p.refcnt[a.blocks[0]], 2);
    ck_assert_int_eq(p.refcnt[a.blocks[1]], 1);
    ck_assert_int_eq(p.refcnt[b.blocks[1]], 1);
    for (int pos = 0; pos < 20; pos++) {
        ck_assert(check_pos(&p, &a, pos, 1));
        ck_assert(check_pos(&p, &b, pos, 1));            /* copied slots, all layers, K and V */
    }
    for (int pos = 20; pos < 25; pos++) ck_assert(check_pos(&p, &b, pos, 2));
    /* A's block 1 slots 4.. were never written by B */
    for (int l = 0; l < NL; l++)
        for (int i = 4 * KD; i < KV_BLOCK * KD; i++) ck_assert(kv_k(&p, a.blocks[1], l)[i] == 0);
    /* A appends too: its block is now private, no copy */
    int32_t a1 = a.blocks[1];
    ck_assert_int_eq(compute(&p, &a, 22, 3), 0);
    ck_assert_int_eq(a.blocks[1], a1);
    ck_assert_int_eq(kv_blocks_used(&p), 3);
    kv_seq_release(&p, &a);
    kv_seq_release(&p, &b);
    ck_assert_int_eq(kv_blocks_used(&p), 0);
    kv_pool_free(&p);
}
END_TEST

/* A full shared block is never copied when appending starts at a block boundary. */
START_TEST(no_copy_at_block_boundary) {
    kv_pool p;
    init_pool(&p, 4);
    kv_seq a = {0}, b = {0};
    ck_assert_int_eq(compute(&p, &a, 16, 1), 0);
    b.blocks = malloc(sizeof *b.blocks);
    b.cap_blocks = 1;
    b.blocks[0] = a.blocks[0];
    kv_block_ref(&p, a.blocks[0]);
    b.n_blocks = 1;
    b.n_tokens = 16;
    ck_assert_int_eq(compute(&p, &b, 17, 2), 0);
    ck_assert_int_eq(b.blocks[0], a.blocks[0]);
    ck_assert_int_eq(kv_blocks_used(&p), 2);
    kv_seq_release(&p, &a);
    kv_seq_release(&p, &b);
    ck_assert_int_eq(kv_blocks_used(&p), 0);
    kv_pool_free(&p);
}
END_TEST

/* The reclaim hook: asked for what is missing, and copy on write re-decided after it ran. */
typedef struct { kv_pool *p; int calls, last_needed; int32_t held[8]; int n_held; } hook;
static int reclaim_hook(void *ctx, int n) {
    hook *h = ctx;
    h->calls++;
    h->last_needed = n;
    int f = 0;
    while (h->n_held > 0 && f < n) {
        int before = h->p->n_free;
        kv_block_unref(h->p, h->held[--h->n_held]);
        f += h->p->n_free - before;
    }
    return f;
}

START_TEST(reclaim_hook_called) {
    kv_pool p;
    init_pool(&p, 4);
    hook h = { .p = &p };
    p.reclaim = reclaim_hook;
    p.reclaim_ctx = &h;
    for (int i = 0; i < 3; i++) h.held[h.n_held++] = kv_block_alloc(&p);
    ck_assert_int_eq(h.calls, 0);
    kv_seq s = {0};
    ck_assert_int_eq(compute(&p, &s, 40, 1), 0);        /* needs 3, 1 free: asks for 2 */
    ck_assert_int_eq(h.calls, 1);
    ck_assert_int_eq(h.last_needed, 2);
    ck_assert_int_eq(h.n_held, 1);
    ck_assert_int_ge(kv_block_alloc(&p), 0);            /* hook frees the last held block */
    ck_assert_int_eq(h.calls, 2);
    ck_assert_int_eq(kv_block_alloc(&p), -1);           /* nothing left anywhere */
    kv_seq_release(&p, &s);
    kv_pool_free(&p);

    /* Copy on write decided after reclaim: the other holder was the hook, which dropped it. */

    init_pool(&p, 2);
    hook h2 = { .p = &p };
    p.reclaim = reclaim_hook;
    p.reclaim_ctx = &h2;
    kv_seq a = {0};
    ck_assert_int_eq(compute(&p, &a, 20, 1), 0);        /* both blocks used */
    kv_block_ref(&p, a.blocks[1]);                      /* the "index" shares the partial block */
    h2.held[h2.n_held++] = a.blocks[1];
    int32_t a1 = a.blocks[1];
    ck_assert_int_eq(compute(&p, &a, 21, 2), 0);        /* needs a copy: hook drops the share */
    ck_assert_int_eq(h2.calls, 1);
    ck_assert_int_eq(a.blocks[1], a1);                  /* no copy was needed after all */
    ck_assert_int_eq(p.refcnt[a1], 1);
    for (int pos = 0; pos < 20; pos++) ck_assert(check_pos(&p, &a, pos, 1));
    kv_seq_release(&p, &a);
    ck_assert_int_eq(kv_blocks_used(&p), 0);
    kv_pool_free(&p);
}
END_TEST

int main(void) {
    Suite *s = suite_create("kv");
    TCase *tc = tcase_create("pool");
    tcase_add_test(tc, init_sizes_and_errors);
    tcase_add_test(tc, layout_regions_disjoint);
    tcase_add_test(tc, alloc_ref_unref);
    tcase_add_test(tc, seq_prepare_truncate_release);
    tcase_add_test(tc, copy_on_write_partial_block);
    tcase_add_test(tc, no_copy_at_block_boundary);
    tcase_add_test(tc, reclaim_hook_called);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
