/* prefix: the cross-request prompt cache index over the paged KV pool.
 *
 * One token-granular radix tree per cache namespace (tenant). A cached path [0, n) of token ids
 * holds references to the KV blocks covering those positions; a lookup returns the longest
 * cached prefix (any length, no minimum) and gives the caller's kv_seq references to its
 * blocks. Entries (AUTO: a whole prompt after its request; EXPLICIT: a cache_control
 * breakpoint) keep their path alive until their TTL passes or memory pressure evicts them.
 * The index is also the pool's reclaim hook. Not thread-safe (the engine thread owns it).
 * See prefix.c for the design and trade-offs.
 *
 * Time is passed in by the caller (seconds, any monotonic origin), so tests drive the clock.
 * The reclaim hook, called from inside kv_block_alloc / kv_seq_prepare, has no time
 * argument: it uses the latest `now` the index was given by any call.
 */
#ifndef PCACHE_PREFIX_H
#define PCACHE_PREFIX_H
#include <stdint.h>
#include "kv.h"

enum { PREFIX_AUTO = 0, PREFIX_EXPLICIT = 1 };

typedef struct prefix_index prefix_index;

typedef struct prefix_stats {
    /* current state */
    int namespaces;
    int entries, entries_auto, entries_explicit;
    int nodes;
    int64_t cached_tokens;        /* tokens stored in the trees (sum over nodes) */
    int blocks_held;              /* distinct pool blocks the index references */
    int blocks_index_only;        /* of those, blocks no sequence holds (what eviction can free) */
    /* counters since creation */
    uint64_t lookups, hits, misses;     /* hit: a lookup that matched >= 1 token */
    uint64_t tokens_looked_up;          /* sum of n over lookups */
    uint64_t tokens_saved;              /* sum of matched tokens (prefill avoided) */
    uint64_t tokens_inserted;           /* tokens newly added to the index */
    uint64_t evictions;                 /* entries removed, all reasons: the sum of the three */
    uint64_t evicted_expired;           /* TTL passed (periodic expiry or under pressure) */
    uint64_t evicted_auto_lru;          /* memory pressure, least recently used AUTO */
    uint64_t evicted_explicit;          /* memory pressure, EXPLICIT by earliest expiry */
    uint64_t blocks_reclaimed;          /* blocks returned to the pool by evictions */
    uint64_t reclaim_calls, reclaim_short; /* pool reclaim requests; those that freed too few */
} prefix_stats;

/* Creates an index over pool and installs itself as pool->reclaim. NULL when out of memory.
 * The pool must outlive the index. */
prefix_index *prefix_create(kv_pool *pool);
/* Drops every entry (unrefs every block it holds) and uninstalls the reclaim hook. NULL ok. */
void prefix_free(prefix_index *px);

/* Longest cached prefix of tokens[0, n) in namespace ns (NULL = ""), among live entries.
 * out_seq must be empty (n_blocks == 0 and n_tokens == 0); on return it holds references to
 * the ceil(m / KV_BLOCK) blocks covering [0, m) and n_tokens = m, and the caller owns those
 * references (kv_seq_release). A partially filled last block is shared with the index, so the
 * caller's next kv_seq_prepare copies it before writing. Refreshes (expiry = now + ttl, last
 * use = now) the entries on the matched path: those ending at or before m, and the entry of
 * the node the match ends inside. Returns m (0 .. n), or -1 on bad arguments / no memory
 * (out_seq then unchanged). */
int prefix_match(prefix_index *px, const char *ns, const int32_t *tokens, int n, double now, kv_seq *out_seq);

/* The length prefix_match would return now, without taking references, refreshing entries or
 * counting a lookup (entries past their expiry that no call has removed yet still count: a
 * prefix_match may then find less). 0 on bad arguments. */
int prefix_peek(const prefix_index *px, const char *ns, const int32_t *tokens, int n);

/* Caches [0, n) of seq (which must hold at least n valid positions for exactly these tokens)
 * under namespace ns with an entry of `kind` (PREFIX_AUTO / PREFIX_EXPLICIT) ending at n,
 * expiring at now + ttl_s. Shares the existing tree where tokens match and takes references
 * to seq's blocks only for the new part. An existing entry at n is upgraded: kind EXPLICIT
 * wins over AUTO, the longer ttl wins, expiry = max(old, now + ttl_s). Returns the number of
 * tokens newly added to the index (0 when [0, n) was already cached: cache_creation
 * accounting), or -1 on bad arguments / no memory (the index is then unchanged). n <= 0: 0. */
int prefix_insert(prefix_index *px, const char *ns, const int32_t *tokens, int n, const kv_seq *seq,
                  int kind, double ttl_s, double now);

/* prefix_insert with the entry's expiry given (> now) instead of now + ttl_s (ttl_s is still
 * what a hit refreshes it by): an entry promoted from a lower tier keeps the remaining lifetime
 * of its record. An existing entry's expiry becomes the later of the two. */
int prefix_insert_until(prefix_index *px, const char *ns, const int32_t *tokens, int n, const kv_seq *seq,
                        int kind, double ttl_s, double expiry, double now);

/* Removes entries whose expiry <= now and frees the paths only they kept. Returns the number
 * of entries removed. Cheap when nothing is due (a min-expiry bound skips the scan). */
int prefix_expire(prefix_index *px, double now);

/* Memory pressure: removes entries until at least n_blocks blocks went back to the pool:
 * expired entries first, then AUTO entries least recently used first, then EXPLICIT ones by
 * earliest expiry. Blocks still held by a sequence stay allocated (their refcount keeps them),
 * so removing an entry may free fewer blocks than it referenced. Returns the number of blocks
 * freed (< n_blocks means the index could not free enough: it is then empty). */
int prefix_evict(prefix_index *px, int n_blocks, double now);

/* Drops every entry of namespace ns (NULL = ""), e.g. a tenant's cache reset. Returns the
 * number of entries removed. */
int prefix_clear_ns(prefix_index *px, const char *ns);

void prefix_get_stats(const prefix_index *px, prefix_stats *out);

/* One cache entry as seen by prefix_visit (for an inspect endpoint and tests). */
typedef struct prefix_entry_info {
    const char *ns;
    const int32_t *tokens;        /* the cached prefix [0, n_tokens); valid during the call */
    int n_tokens;
    int kind;                     /* PREFIX_AUTO / PREFIX_EXPLICIT */
    double ttl, expiry, last_use;
} prefix_entry_info;
/* Calls fn for every entry (unspecified order; fn must not modify the index). Stops at the
 * first nonzero return of fn and returns it; 0 when all were visited; -1 when out of memory. */
int prefix_visit(const prefix_index *px, int (*fn)(void *user, const prefix_entry_info *e), void *user);

/* Self-check of the index invariants (tree shape, block references, entry table). Returns 0,
 * or -1 with a description in err. For tests; O(size of the index + pool). */
int prefix_check(const prefix_index *px, char *err, size_t errlen);
#endif
