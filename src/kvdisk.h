/* kvdisk: the disk tier's block store (issue 11). One directory per model and KV layout under
 * --cache-dir, one file per cached block (kvfile records), named by the block's chain hash. The
 * store keeps an in-memory table of what it holds (chain hash -> size, expiry, last use), built
 * at open by reading and verifying every record: expired, corrupt, truncated or foreign files
 * are deleted and counted, so after a crash (kill -9 mid-write included) only fully written,
 * checksummed blocks are ever served. Writes go to a temporary name, are flushed with fsync and
 * then renamed into place, so a record is either whole or absent. The store stays within its
 * byte bound, eating chains from their ends: a block is evicted only while no held block
 * continues its chain (a lookup walks from a chain's first block, so a document's start is
 * worth more than its end), expired blocks first, then orphans, then the least recently used.
 *
 * Expiry: a record carries its expiry and ttl. A use of a held block (its prefix cached again:
 * kvdisk_touch, or kvdisk_put of a block held with at least that kind and ttl) extends it to at
 * least now + ttl, as a hit refreshes a pool entry, without rewriting the record: the file's
 * modification time is set to now, and a record lives until max(expiry, mtime + ttl). (Copying
 * the directory without keeping times therefore restarts the records' lifetimes.)
 *
 * Synchronous: one thread (the engine's I/O thread) puts, gets and clears; kvdisk_has and
 * kvdisk_get_stats may be called from another thread meanwhile and never wait for I/O. Time is
 * passed in (Unix seconds), so tests drive the clock. */
#ifndef PCACHE_KVDISK_H
#define PCACHE_KVDISK_H
#include <stddef.h>
#include <stdint.h>
#include "kvfile.h"

typedef struct kvdisk kvdisk;

typedef struct kvdisk_stats {
    uint64_t blocks, bytes;               /* held now */
    uint64_t writes, write_errors;
    uint64_t lookups, hits, misses;       /* kvdisk_get */
    uint64_t bad_files;                   /* refused records (corrupt, truncated, foreign), deleted */
    uint64_t expired, evicted;            /* deleted by expiry; by the size bound */
    uint64_t temporaries;                 /* temporary files of unfinished writes (deleted at open) */
} kvdisk_stats;

/* Opens (creating it if needed) the store for one model fingerprint and KV layout under dir,
 * bounded to max_bytes, scanning what an earlier process left. Returns 0, or -1 with err. */
int kvdisk_open(kvdisk **out, const char *dir, uint64_t model_fp, uint32_t n_layer, uint32_t kv_dim, uint64_t max_bytes,
                double now, char *err, size_t errlen);
void kvdisk_close(kvdisk *d);

/* Read-only: the statistics of the store under dir for this model and layout (blocks, bytes,
 * bad_files, expired, temporaries), verifying every record as kvdisk_open does but creating,
 * deleting and changing nothing (a running server's files included). No store: all zero.
 * Returns 0, or -1 with err. */
int kvdisk_scan(const char *dir, uint64_t model_fp, uint32_t n_layer, uint32_t kv_dim, double now, kvdisk_stats *out,
                char *err, size_t errlen);

/* Stores a block (m's model and layout must be the store's). A record of the same chain held
 * live with at least m's kind and ttl is kept and only used (expiry at least now + its ttl and
 * at least m's expiry; no rewrite); otherwise the block is (re)written. Evicts to stay within
 * the bound (a block larger than the bound is not stored). Returns 0, or -1 with err (nothing
 * changed). */
int kvdisk_put(kvdisk *d, const kvfile_meta *m, const void *kv, double now, char *err, size_t errlen);

/* Whether a live record of this chain hash is held (no I/O). */
int kvdisk_has(const kvdisk *d, uint64_t chain, double now);
/* Whether a live record of this chain is held with at least this kind and ttl (no I/O). */
int kvdisk_covers(const kvdisk *d, uint64_t chain, int kind, double ttl, double now);
/* A use of a held live block at now: expiry at least now + its ttl, kept in the file's time.
 * Returns 1, or 0 when not held. */
int kvdisk_touch(kvdisk *d, uint64_t chain, double now);

/* Reads the block of chain hash `chain` into kv (kv_block_bytes of the layout) and its
 * metadata into m (m->expiry: the effective expiry, with the uses since it was written), if it is held, unexpired, verifies, and belongs to namespace ns (NULL = "")
 * with exactly these n tokens. Returns 1 on a hit, 0 on a miss (a bad file is deleted and
 * counted), -1 with err on an I/O error other than a missing file. */
int kvdisk_get(kvdisk *d, uint64_t chain, const char *ns, const int32_t *tokens, int n, double now, kvfile_meta *m,
               void *kv, char *err, size_t errlen);

/* Deletes every record (pcache cache clear). Returns the number deleted. */
int kvdisk_clear(kvdisk *d);
void kvdisk_get_stats(const kvdisk *d, kvdisk_stats *out);
/* The store's directory (for messages and tools). */
const char *kvdisk_path(const kvdisk *d);
#endif
