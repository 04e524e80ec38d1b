/* kvevent: the cluster's KV events (issue 14), the one format replicas publish and routers read.
 *
 * Replicas and routers share a Redis server (--redis URL). A replica tells the cluster which
 * prompt-cache blocks it holds by appending entries to one Redis stream, KVEVENT_STREAM
 * (XADD ... MAXLEN ~ KVEVENT_STREAM_MAXLEN), each a flat list of string fields:
 *     v      "1" (KVEVENT_VERSION; readers skip entries of another version)
 *     inst   the publishing process's instance id: 16 lowercase hex digits, random per start
 *     fp     the model fingerprint (fingerprint.h), 16 hex digits
 *     layout "<n_layer>x<kv_dim>"
 *     op     hello | store | evict | clear | bye
 *     chains (store, evict) chain hashes of full blocks, 16 hex digits each, separated by one
 *            space, at most KVEVENT_MAX_CHAINS per entry
 * A block is named by its chain hash (kvfile.h: kvfile_chain_root(fp, n_layer, kv_dim, ns),
 * then kvfile_chain over each KV_BLOCK tokens), so it already says model, layout, namespace and
 * every token up to the block's end; a router computes the same hashes from a request's prompt
 * tokens (kvevent_prompt_chains) and scores each replica by how many leading ones it holds.
 * Only full blocks (KV_BLOCK tokens) are published.
 *   hello  a process started (or reconnected to Redis): forget everything earlier of this inst
 *   store  these blocks are now held (in the KV pool or a local lower tier)
 *   evict  these blocks are no longer held anywhere local (a replica finds evictions by
 *          reconciling at most once a second: an evict may lag the eviction by about a second)
 *   clear  the replica dropped every block (cache clear)
 *   bye    the process is shutting down
 * A replica's /health answers {"status":"ok","instance":"<inst>","fingerprint":"<fp>",
 * "queue":<requests running + waiting>, ...} ("draining" and 503 while it shuts down), which is
 * how a router maps --replica URLs to instance ids. "fingerprint" is there when the replica runs
 * with --redis (or cache tiers), the only case its events exist.
 *
 * The shared KV tier stores a block's kvfile record (kvfile.h, checksummed) under the key
 * KVEVENT_BLOCK_PREFIX + "<fp>:<chain>" (hex), with the entry's remaining TTL as the Redis
 * expiry (PEXPIRE). A reader uses a record only when kvfile_decode accepts it and its
 * fingerprint, layout, namespace, chain hash and tokens are the ones it looked for. */
#ifndef PCACHE_KVEVENT_H
#define PCACHE_KVEVENT_H
#include <stddef.h>
#include <stdint.h>

#define KVEVENT_VERSION "1"
#define KVEVENT_STREAM "pcache:kv:events"
#define KVEVENT_STREAM_MAXLEN 200000
#define KVEVENT_BLOCK_PREFIX "pcache:kv:blk:"
#define KVEVENT_MAX_CHAINS 256

enum { KVEV_HELLO = 0, KVEV_STORE, KVEV_EVICT, KVEV_CLEAR, KVEV_BYE, KVEV_N };

/* "hello", "store", ... ; NULL for a bad op. */
const char *kvevent_op_name(int op);
/* The op of a name, or -1. */
int kvevent_op_parse(const char *s);

/* Formats n chain hashes as "h h h" (16 hex digits each) into out (cap bytes, needs 17 * n).
 * Returns the length, or -1 when it does not fit. */
int kvevent_format_chains(const uint64_t *chains, int n, char *out, size_t cap);
/* Parses such a list (strictly: 16 hex digits, single spaces) into out (at most cap). Returns
 * how many, or -1 on a malformed list or more than cap. */
int kvevent_parse_chains(const char *s, uint64_t *out, int cap);

/* 16 lowercase hex digits of v into out[17]. */
void kvevent_hex64(uint64_t v, char out[17]);
/* Parses exactly 16 hex digits. Returns 0 or -1. */
int kvevent_parse_hex64(const char *s, uint64_t *out);

/* The chain hashes of the full blocks of a prompt: out[b] names tokens [0, (b+1) * KV_BLOCK)
 * in namespace ns (NULL = "") of this model and layout. Returns how many (n / KV_BLOCK, at most
 * cap). */
int kvevent_prompt_chains(uint64_t model_fp, uint32_t n_layer, uint32_t kv_dim, const char *ns, const int32_t *tokens,
                          int n, uint64_t *out, int cap);

/* The shared tier's key of a block into out (cap >= 64). */
void kvevent_block_key(uint64_t model_fp, uint64_t chain, char *out, size_t cap);
#endif
