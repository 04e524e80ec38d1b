/* kv: the paged KV block pool (see kv.h for the memory layout, which the model relies on).
 *
 * Design
 * - One allocation of n_blocks fixed-size blocks, n_blocks = floor(budget / block_bytes): the
 *   budget is a hard cap, never grown. The bookkeeping (refcounts, free list) is outside it.
 * - Blocks are refcounted. Holders are sequences (their block tables) and the prefix index
 *   (its nodes). A block returns to the free list exactly when its count reaches zero, so
 *   nothing that someone still holds can ever be handed out again: "never evict a block in
 *   use" is a property of the pool, not something the evictor has to check.
 * - The free list is a stack (LIFO): a just-freed block is reused first while it is still in
 *   the CPU cache. Blocks start out zeroed (calloc: the OS maps zero pages lazily, so a large
 *   budget costs nothing until used).
 * - When the free list runs dry, the pool asks its reclaim hook (the prefix index) to drop
 *   cache entries; kv_seq_prepare asks once for everything it needs rather than block by block.
 * - Copy on write: a block with refcount > 1 is read-only. kv_seq_prepare, before handing out
 *   positions inside an existing block, copies a shared block (its valid slots, every layer, K
 *   and V) into a fresh private one. The copy is decided after reclaim ran, since eviction may
 *   have dropped the other holders and made the copy unnecessary.
 * - Bad input (unknown block ids, unref of a free block) is ignored rather than crashing; the
 *   pool's invariants are checked by tests/c/test_kv.c.
 */
#include "kv.h"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int kv_pool_init(kv_pool *p, int n_layer, int kv_dim, size_t mem_bytes, char *err, size_t errlen) {
    memset(p, 0, sizeof *p);
    if (n_layer <= 0 || kv_dim <= 0) {
        snprintf(err, errlen, "kv: bad shape (n_layer %d, kv_dim %d)", n_layer, kv_dim);
        return -1;
    }
    /* block_floats = n_layer * 2 * KV_BLOCK * kv_dim, overflow-checked. */
    size_t per_layer = (size_t)2 * KV_BLOCK * (size_t)kv_dim;
    if ((size_t)n_layer > SIZE_MAX / sizeof(kv_elem) / per_layer) {
        snprintf(err, errlen, "kv: block size overflows (n_layer %d, kv_dim %d)", n_layer, kv_dim);
        return -1;
    }
    size_t block_floats = (size_t)n_layer * per_layer;
    size_t block_bytes = block_floats * sizeof(kv_elem);
    size_t n = mem_bytes / block_bytes;
    if (n < 2) {
        snprintf(err, errlen,
                 "kv: --kv-mem %zu bytes holds %zu KV blocks of %zu bytes (%d tokens, %d layers x kv_dim %d); "
                 "at least 2 are needed: raise --kv-mem to %zu or more",
                 mem_bytes, n, block_bytes, KV_BLOCK, n_layer, kv_dim, 2 * block_bytes);
        return -1;
    }
    if (n > INT32_MAX - 1) n = INT32_MAX - 1;
    p->n_layer = n_layer;
    p->kv_dim = kv_dim;
    p->block_floats = block_floats;
    p->n_blocks = (int)n;
    p->data = calloc(n, block_bytes);             /* n * block_bytes <= mem_bytes: no overflow */
    p->refcnt = calloc(n, sizeof *p->refcnt);
    p->free_list = malloc(n * sizeof *p->free_list);
    if (!p->data || !p->refcnt || !p->free_list) {
        kv_pool_free(p);
        snprintf(err, errlen, "kv: out of memory allocating %zu KV blocks (%zu bytes)", n, n * block_bytes);
        return -1;
    }
    /* Touch every page now: the pool is resident from the start, so the process's memory does
     * not creep up as blocks are first used (a server's RSS is flat after start-up), and a pool
     * the machine cannot back shows at start, not mid-run. calloc's zero pages are only mapped;
     * a volatile write per page makes them real (memset after calloc may be optimized away). */
    for (size_t off = 0; off < n * block_bytes; off += 4096) ((volatile char *)p->data)[off] = 0;
    /* Stack with block 0 on top: blocks are handed out in increasing order from a fresh pool. */
    for (size_t i = 0; i < n; i++) p->free_list[i] = (int32_t)(n - 1 - i);
    p->n_free = (int)n;
    return 0;
}

int kv_pool_init_external(kv_pool *p, int n_layer, int kv_dim, int n_blocks,
                          void (*copy_block)(void *ctx, int32_t dst, int32_t src, int n_slots), void *ctx,
                          char *err, size_t errlen) {
    memset(p, 0, sizeof *p);
    if (n_layer <= 0 || kv_dim <= 0 || n_blocks < 2 || !copy_block) {
        snprintf(err, errlen, "kv: bad external pool (n_layer %d, kv_dim %d, %d blocks)", n_layer, kv_dim, n_blocks);
        return -1;
    }
    p->n_layer = n_layer;
    p->kv_dim = kv_dim;
    p->block_floats = (size_t)n_layer * 2 * KV_BLOCK * (size_t)kv_dim;
    p->n_blocks = n_blocks;
    p->copy_block = copy_block;
    p->copy_ctx = ctx;
    p->refcnt = calloc((size_t)n_blocks, sizeof *p->refcnt);
    p->free_list = malloc((size_t)n_blocks * sizeof *p->free_list);
    if (!p->refcnt || !p->free_list) {
        kv_pool_free(p);
        snprintf(err, errlen, "kv: out of memory for %d block records", n_blocks);
        return -1;
    }
    for (int i = 0; i < n_blocks; i++) p->free_list[i] = n_blocks - 1 - i;
    p->n_free = n_blocks;
    return 0;
}

void kv_pool_free(kv_pool *p) {
    free(p->data);
    free(p->refcnt);
    free(p->free_list);
    memset(p, 0, sizeof *p);
}

static bool valid_block(const kv_pool *p, int32_t b) { return b >= 0 && b < p->n_blocks; }

int kv_block_read(const kv_pool *p, int32_t block, void *dst) {
    if (!valid_block(p, block)) return -1;
    if (p->read_block) return p->read_block(p->io_ctx, block, dst);
    memcpy(dst, kv_k(p, block, 0), p->block_floats * sizeof(kv_elem));
    return 0;
}

int kv_block_write(kv_pool *p, int32_t block, const void *src) {
    if (!valid_block(p, block)) return -1;
    if (p->write_block) return p->write_block(p->io_ctx, block, src);
    memcpy(kv_k(p, block, 0), src, p->block_floats * sizeof(kv_elem));
    return 0;
}

static int32_t pop_free(kv_pool *p) {
    int32_t b = p->free_list[--p->n_free];
    p->refcnt[b] = 1;
    return b;
}

int32_t kv_block_alloc(kv_pool *p) {
    if (p->n_free == 0 && p->reclaim) p->reclaim(p->reclaim_ctx, 1);
    if (p->n_free == 0) return -1;
    return pop_free(p);
}

void kv_block_ref(kv_pool *p, int32_t b) {
    if (valid_block(p, b) && p->refcnt[b] > 0 && p->refcnt[b] < INT32_MAX) p->refcnt[b]++;
}

void kv_block_unref(kv_pool *p, int32_t b) {
    if (!valid_block(p, b) || p->refcnt[b] <= 0) return;
    if (--p->refcnt[b] == 0) p->free_list[p->n_free++] = b;
}

int kv_blocks_used(const kv_pool *p) { return p->n_blocks - p->n_free; }

/* Copies the first n_slots slots of every layer's K and V from block src to block dst. */
static void copy_block(kv_pool *p, int32_t dst, int32_t src, int n_slots) {
    if (n_slots <= 0) return;
    if (p->copy_block) { p->copy_block(p->copy_ctx, dst, src, n_slots); return; }
    size_t bytes = (size_t)n_slots * (size_t)p->kv_dim * sizeof(kv_elem);
    for (int l = 0; l < p->n_layer; l++) {
        memcpy(kv_k(p, dst, l), kv_k(p, src, l), bytes);
        memcpy(kv_v(p, dst, l), kv_v(p, src, l), bytes);
    }
}

/* Blocks of the table at index >= first_written that are shared (will need a copy). */
static int count_shared(const kv_pool *p, const kv_seq *s, int first_written) {
    int n = 0;
    for (int i = first_written; i < s->n_blocks; i++)
        if (p->refcnt[s->blocks[i]] > 1) n++;
    return n;
}

int kv_seq_prepare(kv_pool *p, kv_seq *s, int n_total) {
    if (s->n_tokens < 0 || n_total < 0) return -1;
    if (n_total <= s->n_tokens) return 0;
    if (n_total > INT32_MAX - KV_BLOCK) return -1;
    int want_blocks = (n_total + KV_BLOCK - 1) / KV_BLOCK;
    int n_new = want_blocks > s->n_blocks ? want_blocks - s->n_blocks : 0;
    if (want_blocks > s->cap_blocks) {
        int cap = s->cap_blocks ? s->cap_blocks : 4;
        while (cap < want_blocks) cap = cap > INT32_MAX / 2 ? want_blocks : cap * 2;
        int32_t *nb = realloc(s->blocks, (size_t)cap * sizeof *nb);
        if (!nb) return -1;
        s->blocks = nb;
        s->cap_blocks = cap;
    }
    /* Existing blocks that will be written: the one holding position n_tokens and after. */
    int first_written = s->n_tokens / KV_BLOCK;
    int n_cow = count_shared(p, s, first_written);
    if (p->n_free < n_new + n_cow && p->reclaim) {
        p->reclaim(p->reclaim_ctx, n_new + n_cow - p->n_free);
        n_cow = count_shared(p, s, first_written);   /* eviction may have dropped other holders */
    }
    if (p->n_free < n_new + n_cow) return -1;
    for (int i = first_written; i < s->n_blocks; i++) {
        int32_t old = s->blocks[i];
        if (p->refcnt[old] <= 1) continue;
        int32_t b = pop_free(p);
        int valid = s->n_tokens - i * KV_BLOCK;
        copy_block(p, b, old, valid < KV_BLOCK ? valid : KV_BLOCK);
        kv_block_unref(p, old);
        s->blocks[i] = b;
    }
    for (int i = 0; i < n_new; i++) s->blocks[s->n_blocks++] = pop_free(p);
    return 0;
}

void kv_seq_truncate(kv_pool *p, kv_seq *s, int n) {
    if (n < 0) n = 0;
    int keep = (int)(((int64_t)n + KV_BLOCK - 1) / KV_BLOCK);
    while (s->n_blocks > keep) kv_block_unref(p, s->blocks[--s->n_blocks]);
    if (s->n_tokens > n) s->n_tokens = n;
}

void kv_seq_release(kv_pool *p, kv_seq *s) {
    for (int i = 0; i < s->n_blocks; i++) kv_block_unref(p, s->blocks[i]);
    free(s->blocks);
    memset(s, 0, sizeof *s);
}
