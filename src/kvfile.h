/* kvfile: the stored form of one cached KV block, for the cache tiers below the KV pool (the
 * disk tier of issue 11, later a shared store). A record is self-describing and self-checking:
 * what it is the KV of (model fingerprint, KV layout, namespace, the chained hash of every token
 * up to and including this block, and the block's own tokens), until when it may be served, the
 * block's fp16 values, and a CRC-32 (zlib) over all of it at the end, so a torn or truncated
 * write, a flipped byte or a record of another model or layout is refused, never used.
 *
 * Layout (little-endian):
 *     0  magic "PCKVBLK1"              8
 *     8  format version u32 (KVFILE_VERSION)
 *    12  header bytes u32 (KVFILE_FIXED + ns_len, rounded up to 8)
 *    16  payload bytes u64 (n_layer * 2 * KV_BLOCK * kv_dim * 2)
 *    24  model fingerprint u64
 *    32  n_layer u32, kv_dim u32
 *    40  block tokens u16 (KV_BLOCK), element type u16 (1: IEEE fp16)
 *    44  valid tokens u16 (1..KV_BLOCK), entry kind u8, namespace length u8
 *    48  parent chain hash u64 (kvfile_chain_root for the first block)
 *    56  chain hash u64 (= kvfile_chain(parent, tokens, n_tokens))
 *    64  expiry f64 (Unix seconds), 72 ttl f64 (seconds)
 *    80  tokens i32[KV_BLOCK] (unused slots 0)
 *   144  namespace bytes, zero padding to the header size
 *        payload: the block as the pool holds it ([layer][K|V][slot][kv_dim] fp16)
 *        CRC-32 u32 of everything before it
 *
 * The chain hash is not cryptographic (64-bit, mixing each token through a multiply-xorshift):
 * a reader checks the namespace bytes and the model fingerprint literally, and uses a record
 * only at the chain position its own prefix computes. */
#ifndef PCACHE_KVFILE_H
#define PCACHE_KVFILE_H
#include <stddef.h>
#include <stdint.h>
#include "kv.h"

#define KVFILE_VERSION 1u
#define KVFILE_FIXED 144u
#define KVFILE_NS_MAX 255

typedef struct kvfile_meta {
    uint64_t model_fp;
    uint32_t n_layer, kv_dim;
    int n_tokens;                 /* valid tokens in the block, 1..KV_BLOCK */
    int kind;                     /* PREFIX_AUTO / PREFIX_EXPLICIT */
    uint64_t parent, chain;
    double expiry, ttl;
    int32_t tokens[KV_BLOCK];
    char ns[KVFILE_NS_MAX + 1];   /* NUL-terminated */
} kvfile_meta;

/* The chain hash before the first block: model, layout and namespace (NULL = ""). */
uint64_t kvfile_chain_root(uint64_t model_fp, uint32_t n_layer, uint32_t kv_dim, const char *ns);
/* The chain hash after a block of n tokens whose predecessor's hash is parent. */
uint64_t kvfile_chain(uint64_t parent, const int32_t *tokens, int n);

/* Bytes of the record of a block with this layout and namespace length. */
size_t kvfile_size(uint32_t n_layer, uint32_t kv_dim, size_t ns_len);

/* Writes the record of m (m->chain must equal kvfile_chain(m->parent, m->tokens, m->n_tokens))
 * and the block values kv (kv_block_bytes(n_layer, kv_dim) bytes) into out (cap bytes).
 * Returns the record's size, or 0 with err on bad metadata or too small a buffer. */
size_t kvfile_encode(const kvfile_meta *m, const void *kv, uint8_t *out, size_t cap, char *err, size_t errlen);

/* Checks and reads a record of len bytes: magic, version, sizes, layout, namespace, token
 * count, chain hash and CRC. On success fills m, points *kv at the block values inside buf and
 * returns 0; otherwise returns -1 with the reason in err (buf may be anything). */
int kvfile_decode(const uint8_t *buf, size_t len, kvfile_meta *m, const uint8_t **kv, char *err, size_t errlen);
#endif
