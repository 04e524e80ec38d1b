/* kvhost: the host-RAM tier's block store (issue 11): a bounded set of KV blocks in RAM (page-
 * locked on the GPU backend, so a promotion is one DMA), keyed by chain hash, with the same
 * metadata as a disk record; namespace and tokens are compared on every hit, expired blocks are
 * never served, and the least recently used block makes room. It sits between the KV pool and
 * the disk: filled by the engine's write-through, searched before the disk.
 *
 * Thread-safe (one mutex): the engine's I/O thread puts and gets, the engine thread asks
 * kvhost_has. Time is passed in (Unix seconds). */
#ifndef PCACHE_KVHOST_H
#define PCACHE_KVHOST_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "kvfile.h"

typedef struct kvhost kvhost;

typedef struct kvhost_stats {
    uint64_t blocks, bytes, capacity_blocks;
    uint64_t puts, lookups, hits, misses, evicted, expired;
} kvhost_stats;

/* A store of up to max_bytes / kv_block_bytes blocks (at least one, else an error). pinned: in
 * page-locked memory (gpu_host_alloc). */
int kvhost_create(kvhost **out, uint32_t n_layer, uint32_t kv_dim, uint64_t max_bytes, bool pinned, char *err,
                  size_t errlen);
void kvhost_free(kvhost *h);
/* Stores the block of record m with values kv, evicting when full: a block only while no held
 * block continues its chain, expired first, then orphans, then least recently used (a chain is
 * eaten from its end). A block already held, live, with at least m's kind and ttl is only
 * refreshed (a use now: expiry at least now + its ttl, and at least m's expiry). */
void kvhost_put(kvhost *h, const kvfile_meta *m, const void *kv, double now);
int kvhost_has(kvhost *h, uint64_t chain, double now);
/* Whether a live block of this chain is held with at least this kind and ttl. */
int kvhost_covers(kvhost *h, uint64_t chain, int kind, double ttl, double now);
/* A use of a held live block at now (its prefix was cached again): expiry at least now + its
 * ttl. Returns 1, or 0 when not held. */
int kvhost_touch(kvhost *h, uint64_t chain, double now);
/* On a hit (as kvhost_get) hands the held block's bytes to sink(ctx, bytes) under the store's
 * lock instead of copying them out: a promotion on the GPU backend copies straight from the
 * page-locked arena into the pool (one DMA, no bounce buffer). Returns 1 (hit, sink returned 0),
 * 0 (miss) or -1 (sink failed: not counted as a hit). */
int kvhost_get_with(kvhost *h, uint64_t chain, const char *ns, const int32_t *tokens, int n, double now,
                    int (*sink)(void *ctx, const void *kv), void *ctx, kvfile_meta *out);
/* Copies the block into kv (and its record into *m, when m is not NULL) when it is held, live,
 * of namespace ns (NULL = "") with exactly these n tokens. Returns 1 (hit) or 0. */
int kvhost_get(kvhost *h, uint64_t chain, const char *ns, const int32_t *tokens, int n, double now, void *kv,
               kvfile_meta *m);
void kvhost_get_stats(kvhost *h, kvhost_stats *out);
#endif
