/* kv: the paged KV block pool shared by all sequences.
 *
 * Memory is one array of fixed-size blocks carved out of a byte budget (--kv-mem). A block
 * holds KV_BLOCK tokens for every layer, laid out [layer][K|V][slot][kv_dim] in fp16, as
 * llama.cpp stores its KV cache: half the memory of f32 (twice the cached tokens per byte) and
 * the same rounding as the peer we are compared with. Cached and recomputed values are still
 * bit-identical: the rounding is a pure function of the computed value. Blocks are
 * refcounted: a sequence's block table and the prefix index each hold references; a block
 * shared by several holders is never written: a writer first copies it (copy on write).
 */
#ifndef PCACHE_KV_H
#define PCACHE_KV_H
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#define KV_BLOCK 16

typedef uint16_t kv_elem; /* IEEE fp16 bits */

typedef struct kv_pool {
    int n_layer;
    int kv_dim;          /* n_kv_heads * head_dim */
    int n_blocks;
    size_t block_floats; /* elements per block: n_layer * 2 * KV_BLOCK * kv_dim */
    kv_elem *data;
    int32_t *refcnt;     /* per block; 0 = free */
    int32_t *free_list;  /* stack of free block ids */
    int n_free;
    /* Called by kv_block_alloc when no block is free: should release at least one block
     * (e.g. evict prefix-index entries) and return how many it freed. */
    int (*reclaim)(void *ctx, int n_needed);
    void *reclaim_ctx;
    /* External storage (a GPU backend's device memory): data is NULL here, and copy on write
     * calls copy_block(ctx, dst, src, n_slots) instead of copying host memory. */
    void (*copy_block)(void *ctx, int32_t dst, int32_t src, int n_slots);
    void *copy_ctx;
    /* Reading and writing one whole block's bytes in the host layout ([layer][K|V][slot][kv_dim]
     * fp16, kv_block_bytes), for the cache tiers below the pool; NULL: the block is host memory
     * (data). Called from the engine's I/O thread, for blocks no one writes meanwhile. */
    int (*read_block)(void *ctx, int32_t block, void *dst);          /* 0, or -1 on failure */
    int (*write_block)(void *ctx, int32_t block, const void *src);
    void *io_ctx;
} kv_pool;

static inline kv_elem *kv_k(const kv_pool *p, int32_t block, int layer) {
    return p->data + (size_t)block * p->block_floats + (size_t)(layer * 2 + 0) * KV_BLOCK * p->kv_dim;
}
static inline kv_elem *kv_v(const kv_pool *p, int32_t block, int layer) {
    return p->data + (size_t)block * p->block_floats + (size_t)(layer * 2 + 1) * KV_BLOCK * p->kv_dim;
}

/* A sequence's view of its KV: block table covering positions [0, n_tokens). */
typedef struct kv_seq {
    int32_t *blocks;
    int n_blocks, cap_blocks;
    int n_tokens;        /* positions whose K/V are valid */
} kv_seq;

int kv_pool_init(kv_pool *p, int n_layer, int kv_dim, size_t mem_bytes, char *err, size_t errlen);
/* The same bookkeeping over n_blocks blocks stored elsewhere (see copy_block). */
int kv_pool_init_external(kv_pool *p, int n_layer, int kv_dim, int n_blocks,
                          void (*copy_block)(void *ctx, int32_t dst, int32_t src, int n_slots), void *ctx,
                          char *err, size_t errlen);
/* Bytes of one block: n_layer * 2 * KV_BLOCK * kv_dim fp16 values. */
static inline size_t kv_block_bytes(int n_layer, int kv_dim) {
    return (size_t)n_layer * 2 * KV_BLOCK * (size_t)kv_dim * sizeof(kv_elem);
}
void kv_pool_free(kv_pool *p);
/* A block's bytes to or from host memory (kv_block_bytes of them): the hooks above, or memcpy. */
int kv_block_read(const kv_pool *p, int32_t block, void *dst);     /* 0, or -1 */
int kv_block_write(kv_pool *p, int32_t block, const void *src);
int32_t kv_block_alloc(kv_pool *p);       /* refcnt 1, or -1 when none can be had */
void kv_block_ref(kv_pool *p, int32_t b);
void kv_block_unref(kv_pool *p, int32_t b);
int kv_blocks_used(const kv_pool *p);

/* Makes positions [seq->n_tokens, n_total) writable: appends fresh blocks and copies a shared
 * partially-filled last block (copy on write). Returns 0, or -1 if the pool is exhausted (the
 * sequence is left unchanged in that case). */
int kv_seq_prepare(kv_pool *p, kv_seq *seq, int n_total);
/* Drops positions >= n (unref blocks no longer needed). */
void kv_seq_truncate(kv_pool *p, kv_seq *seq, int n);
void kv_seq_release(kv_pool *p, kv_seq *seq);   /* unrefs everything, leaves an empty seq */
#endif
