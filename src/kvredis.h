/* kvredis: a replica's side of the cluster (issue 14): its KV events on the Redis stream and the
 * shared KV tier in Redis, over one connection owned by one thread. The formats are kvevent.h's.
 *
 * The engine thread never waits for Redis. It queues work and collects results, as with the
 * local tiers (kvtier.h):
 *   - events (kvredis_publish): small entries in a bounded queue; the thread sends them in
 *     order, pipelined. When the queue is full, or Redis is down, an event is dropped and
 *     counted, and the engine is told (kvredis_take_resync / kvredis_generation) to publish its
 *     whole state again: a hello (which makes routers forget this instance's blocks) and a store
 *     of every block it holds.
 *   - write-through (kvredis_write): a block newly cached goes to Redis as its kvfile record
 *     (checksummed) under kvevent_block_key with PX = the entry's remaining lifetime; the engine
 *     takes a reference on the block for the thread (a block with refcount > 1 is never
 *     written: copy on write) and drops it at kvredis_poll. Bounded: a full queue, or Redis
 *     down, drops the block (counted); Redis's maxmemory policy bounds the store.
 *   - touches (kvredis_touch): a prefix cached again extends its records' lifetimes
 *     (PEXPIRE ... GT: never shortens a longer one another replica set).
 *   - reads (kvredis_read): a job lists the full blocks after a local miss and the pool blocks
 *     to load them into; the thread GETs them (pipelined, a window at a time), verifies each
 *     (kvfile_decode: magic, sizes, checksum, chain; then model fingerprint, layout, namespace,
 *     chain hash, tokens) straight into its pool block, stops at the first missing or bad one,
 *     and reports how many tokens loaded. Reads go first, then events, touches, writes.
 * Connection: redis_connect with timeouts (a command that times out counts as an error and the
 * connection is dropped); while down, the thread retries with backoff (redis.h) and everything
 * queued is failed or dropped at once, so the engine runs on its local caches; every (re)connect
 * publishes hello first.
 *
 * Estimates for the engine's fetch-or-compute decision (kvredis_fetch_pays): the round trip
 * (PING at connect, then jobs that found nothing) and the time per block of the reads that
 * found blocks, as moving averages. */
#ifndef PCACHE_KVREDIS_H
#define PCACHE_KVREDIS_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "kv.h"
#include "kvfile.h"
#include "kvtier.h"
#include "redis.h"

typedef struct kvredis kvredis;

typedef struct kvredis_opts {
    redis_url url;
    kv_pool *pool;
    uint64_t model_fp;
    uint64_t instance;        /* the process's instance id (kvevent.h's inst) */
    double timeout_s;         /* connect and command timeout; 0 = 1 s */
    double max_backoff_s;     /* longest wait between reconnect attempts; 0 = 5 s */
    int write_queue;          /* blocks held for writing; 0 = 128 */
    int event_queue;          /* event entries waiting; 0 = 1024 */
} kvredis_opts;

typedef struct kvredis_stats {
    bool connected;
    uint64_t connects;                    /* successful connects (the first one included) */
    uint64_t errors;                      /* failed connects, commands and error replies */
    uint64_t events_published, events_dropped;
    uint64_t blocks_written, bytes_written, writes_dropped;
    uint64_t touches;
    uint64_t read_jobs;
    uint64_t blocks_read, bytes_read;     /* verified blocks loaded into the pool */
    uint64_t read_hits, read_misses;      /* per GET of a job: found (and good) / absent */
    uint64_t bad_records;                 /* refused: checksum, size, model, layout, namespace, chain, tokens */
    double rtt_s, block_s;                /* current estimates */
    int write_queue_depth, event_queue_depth;
} kvredis_stats;

/* Starts the thread (which connects in the background: Redis need not be up). Returns 0, or -1
 * with err (out of memory, no thread). */
int kvredis_create(kvredis **out, const kvredis_opts *o, char *err, size_t errlen);
/* Queues bye, sends what events are queued (while Redis answers), drops queued writes, stops
 * the thread and drops its block references. NULL ok. The pool must still be alive. */
void kvredis_free(kvredis *r);

bool kvredis_connected(kvredis *r);
/* Counts successful (re)connects; each one published a hello, so the engine publishes a store
 * of everything it holds when it sees the count change. */
uint64_t kvredis_generation(kvredis *r);
/* True once after events were dropped while connected (full queue, an error reply): the
 * engine publishes hello and its whole state again. */
bool kvredis_take_resync(kvredis *r);

/* Queues an event (KVEV_*) with n chain hashes (store, evict), split into entries of at most
 * KVEVENT_MAX_CHAINS. Returns 0, or -1 when (some of) it was dropped (counted). */
int kvredis_publish(kvredis *r, int op, const uint64_t *chains, int n);
/* Queues block (holding the KV of record m) for writing: takes a reference on it. Returns 0, or
 * -1 when dropped (queue full, Redis down, expired; no reference taken). now: Unix seconds. */
int kvredis_write(kvredis *r, const kvfile_meta *m, int32_t block, double now);
/* Queues extending these blocks' records to live at least ttl_s from now. */
int kvredis_touch(kvredis *r, const uint64_t *chains, int n, double ttl_s);
/* Queues a read job (items copied: full blocks, in chain order) for namespace ns. Reported by
 * kvredis_poll with the same id (0 tokens at once when Redis is down). Returns 0 or -1. */
int kvredis_read(kvredis *r, int id, const char *ns, const kvtier_item *items, int n, double now);
/* Engine thread: drops the references of finished writes and calls done for each finished read
 * job, oldest first. */
void kvredis_poll(kvredis *r, kvtier_done_fn done, void *ctx);
/* Waits up to max_s for a completion (returns at once when there is one or nothing is queued). */
void kvredis_wait(kvredis *r, double max_s);
/* Waits until nothing is queued or in flight, then polls (tests, benchmarks). */
void kvredis_sync(kvredis *r, kvtier_done_fn done, void *ctx);

void kvredis_get_stats(kvredis *r, kvredis_stats *out);

/* The fetch-or-compute rule: fetch n_blocks full blocks from Redis when one round trip plus
 * their transfer costs less than computing their tokens at prefill_tok_s seconds a token (the
 * engine's measured prefill rate; <= 0: not measured yet, fetch). A miss costs only the round
 * trip. On a CPU a block's transfer is ~100x cheaper than its 16 tokens' prefill; on a GPU with
 * a slow network recomputing can win. */
bool kvredis_fetch_pays(double rtt_s, double block_s, int n_blocks, double prefill_tok_s);

/* A set of chain hashes (open addressing, linear probing, backward-shift deletion): the blocks
 * a replica has announced. Not thread-safe. */
typedef struct chainset {
    uint64_t *keys;           /* 0 = empty; the hash 0 is kept in has_zero */
    size_t cap, n;
    bool has_zero;
} chainset;
void chainset_free(chainset *s);
bool chainset_has(const chainset *s, uint64_t h);
/* Returns 1 when added, 0 when already there, -1 when out of memory. */
int chainset_add(chainset *s, uint64_t h);
/* Returns 1 when removed, 0 when absent. */
int chainset_del(chainset *s, uint64_t h);
void chainset_clear(chainset *s);
size_t chainset_size(const chainset *s);
/* Copies up to cap members into out (any order) starting after position *pos (start with 0);
 * returns how many, 0 at the end. */
size_t chainset_list(const chainset *s, size_t *pos, uint64_t *out, size_t cap);
#endif
