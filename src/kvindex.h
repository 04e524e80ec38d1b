/* kvindex: which KV blocks each cache owner holds, for the router (issue 14).
 *
 * An owner is a 64-bit id: a replica instance (kvevent.h's inst) for the index built from the
 * KV events stream, or a replica slot for the router's own predictions (what it sent where).
 * Each owner has a set of chain hashes (kvevent.h: a chain hash names a block by model,
 * layout, namespace and every token up to the block's end), each with an expiry (0: until an
 * evict says otherwise). A request's score at an owner is how many of its leading chain hashes
 * the owner holds: since a chain hash covers the whole prefix, holding chain b means the owner
 * computed tokens [0, 16 (b + 1)).
 *
 * The sets are open-addressing hash tables (linear probing, backward-shift deletion), so a
 * lookup is a couple of cache misses and the memory is 12 bytes a block plus slack. Each owner
 * is bounded (max_chains): past it, expired entries are dropped, then further stores are
 * ignored (counted); an index that stops growing only costs routing quality, never memory.
 * The owners are a small array scanned linearly (a cluster has a handful of replicas; an
 * entry stream from many more owners drops the least recently updated at max_owners).
 *
 * Not thread-safe: the router wraps it in a read-write lock. Times are the caller's clock in
 * whole seconds (any monotonic counter that never is 0 for a live entry). */
#ifndef PCACHE_KVINDEX_H
#define PCACHE_KVINDEX_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "kvevent.h"

typedef struct kvindex kvindex;

kvindex *kvindex_new(size_t max_chains, int max_owners);
void kvindex_free(kvindex *x);

/* Adds chains to owner's set (expiry 0 = never; a later store sets the expiry again). When
 * the owner is full, its entries expired by now are dropped first. Returns how many could not
 * be added (the owner is at max_chains), 0 normally, -1 out of memory. */
int kvindex_store(kvindex *x, uint64_t owner, const uint64_t *chains, int n, uint32_t expiry, uint32_t now);
/* Removes chains from owner's set (absent ones are ignored). */
void kvindex_evict(kvindex *x, uint64_t owner, const uint64_t *chains, int n);
/* Empties owner's set (hello, clear). */
void kvindex_reset(kvindex *x, uint64_t owner);
/* Forgets owner (bye; a replica whose instance changed). */
void kvindex_drop(kvindex *x, uint64_t owner);
/* How many of chains[0..n) owner holds from the start (an expired entry, expiry <= now, is not
 * held). */
int kvindex_match(const kvindex *x, uint64_t owner, const uint64_t *chains, int n, uint32_t now);
/* Chains in owner's set (expired ones included until dropped). */
size_t kvindex_count(const kvindex *x, uint64_t owner);
/* Stores ignored so far because an owner was full. */
uint64_t kvindex_dropped(const kvindex *x);

/* One KV events stream entry, parsed (kvevent.h's fields). */
typedef struct kvevent_entry {
    uint64_t inst, fp;
    uint32_t n_layer, kv_dim;
    int op;                              /* KVEV_* */
    int n_chains;
    uint64_t chains[KVEVENT_MAX_CHAINS];
} kvevent_entry;
/* Parses an entry's fields (n name/value pairs: names[i], values[i]). Returns 0, 1 when the
 * entry is of another version (to skip), -1 when malformed. Unknown fields are ignored. */
int kvevent_entry_parse(const char *const *names, const char *const *values, int n, kvevent_entry *out);
/* Applies an entry to an index of instances: store/evict/clear/hello/bye; entries of another
 * model fingerprint or layout than (fp, n_layer, kv_dim) are ignored (returns 1), else 0. */
int kvindex_apply(kvindex *x, const kvevent_entry *e, uint64_t fp, uint32_t n_layer, uint32_t kv_dim);
#endif
