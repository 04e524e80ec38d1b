/* kvtier: the KV cache tiers below the pool (issue 11), host RAM (kvhost) and disk (kvdisk), and
 * the engine's one I/O thread that moves blocks between them and the pool.
 *
 * The engine thread never waits for I/O. It queues work and collects results:
 *   - write-through: a block the prefix index newly caches is queued (kvtier_write) with its
 *     record metadata; the engine takes a reference on the block so that the I/O thread can read
 *     its bytes without a copy (a block with refcount > 1 is never written: copy on write), and
 *     drops it when the write is reported done (kvtier_poll: pool refcounts are engine-thread
 *     only). The queue is bounded: when it is full the block is not written, and counted.
 *   - promotion: a read job (kvtier_read) lists the chain of blocks a lookup found in a lower
 *     tier and the fresh pool blocks to load them into; the I/O thread reads and verifies each
 *     (host RAM first, then disk) straight into its pool block, stops at the first one that is
 *     missing or bad, and reports how many tokens loaded. Reads go before queued writes.
 *   - lookups (kvtier_has) read the tiers' in-memory tables under their locks, never a file.
 *
 * Time is Unix seconds, passed in by the engine (which derives it from its own clock, so tests
 * drive it). */
#ifndef PCACHE_KVTIER_H
#define PCACHE_KVTIER_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "kv.h"
#include "kvfile.h"

typedef struct kvtier kvtier;

typedef struct kvtier_opts {
    kv_pool *pool;
    uint64_t model_fp;
    const char *dir;          /* disk tier under this cache directory; NULL: none */
    uint64_t disk_bytes;      /* its bound */
    uint64_t host_bytes;      /* host-RAM tier bound; 0: none */
    bool host_pinned;         /* host tier in page-locked memory (GPU backend) */
    int queue_blocks;         /* write queue bound (blocks held for writing); 0 = 256 */
    double now;               /* Unix seconds, for opening the disk store */
} kvtier_opts;

enum { KVTIER_NONE = 0, KVTIER_HOST = 1, KVTIER_DISK = 2, KVTIER_N = 3 };

typedef struct kvtier_level_stats {
    uint64_t blocks, bytes;             /* held now */
    uint64_t promotions;                /* blocks loaded from this tier into the pool */
    uint64_t tokens_served;             /* their valid tokens */
    uint64_t demotions;                 /* blocks written into this tier */
    uint64_t write_errors;
    uint64_t bad_files;                 /* refused records (checksum, truncated, foreign) */
    uint64_t expired, evicted;
    uint64_t read_n, write_n;           /* latency: count and sum of seconds per block */
    double read_s, write_s;
} kvtier_level_stats;

typedef struct kvtier_stats {
    kvtier_level_stats tier[KVTIER_N];  /* [KVTIER_HOST], [KVTIER_DISK] */
    uint64_t writes_queued, writes_dropped;
    uint64_t read_jobs;
    int queue_depth;                    /* blocks held for writing now */
} kvtier_stats;

/* One block of a read job: where it goes and what it must be; and, once loaded, the lifetime
 * of its record (so the promoted entry keeps its kind and remaining TTL). */
typedef struct kvtier_item {
    uint64_t chain;
    int32_t block;                      /* pool block to load into (the engine's reference) */
    int n_tokens;
    int32_t tokens[KV_BLOCK];
    int kind;                           /* out: PREFIX_AUTO / PREFIX_EXPLICIT */
    double ttl, expiry;                 /* out: seconds; Unix seconds */
} kvtier_item;

/* Reports a finished read job: n_tokens valid tokens loaded, from items[0] on (the items are
 * the job's, with their out fields filled; valid during the call). */
typedef void (*kvtier_done_fn)(void *ctx, int id, int n_tokens, const kvtier_item *items, int n_items);

int kvtier_create(kvtier **out, const kvtier_opts *o, char *err, size_t errlen);
/* Finishes queued reads and writes, stops the thread and drops the block references it held.
 * NULL ok. The pool must still be alive. */
void kvtier_free(kvtier *t);

/* Queues block (holding the KV of record m) for writing into every tier: takes a reference on
 * it. Returns 0, or -1 when the queue is full (dropped and counted, no reference taken). */
int kvtier_write(kvtier *t, const kvfile_meta *m, int32_t block, double now);

/* The tier that holds a live block of this chain hash (KVTIER_HOST before KVTIER_DISK), or
 * KVTIER_NONE. No I/O. */
int kvtier_has(kvtier *t, uint64_t chain, double now);
/* Whether every tier holds a live block of this chain with at least this kind and ttl, so a
 * prefix cached again needs only kvtier_touch, not a write. No I/O. */
bool kvtier_covers(kvtier *t, uint64_t chain, int kind, double ttl, double now);
/* Queues a use of these held blocks at now (their prefix was cached again): each lives at
 * least its ttl from now, on disk too (no rewrite: kvdisk.h). Returns 0 or -1 (out of memory:
 * nothing queued). */
int kvtier_touch(kvtier *t, const uint64_t *chains, int n, double now);

/* Queues a read job (items copied) for namespace ns: block by block into the pool until one is
 * missing or bad. Its completion is reported by kvtier_poll with the same id. Returns 0 or -1
 * (out of memory: nothing queued). */
int kvtier_read(kvtier *t, int id, const char *ns, const kvtier_item *items, int n, double now);

/* Engine thread: drops the references of finished writes and calls done for each finished
 * read job, oldest first. */
void kvtier_poll(kvtier *t, kvtier_done_fn done, void *ctx);
/* Waits up to max_s seconds for a completion to poll (returns at once when one is there). */
void kvtier_wait(kvtier *t, double max_s);
/* Waits until every queued read and write is done (tests, shutdown); then polls. */
void kvtier_sync(kvtier *t, kvtier_done_fn done, void *ctx);
/* Tests: while paused the thread takes no new work (so a test can fill the queue). */
void kvtier_pause(kvtier *t, bool paused);

void kvtier_get_stats(kvtier *t, kvtier_stats *out);
/* The disk store's directory, or NULL. */
const char *kvtier_disk_path(const kvtier *t);
#endif
