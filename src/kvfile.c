/* kvfile: see kvfile.h. */
#include "kvfile.h"
#include "util.h"
#include <stdio.h>
#include <string.h>
#include <zlib.h>

static const uint8_t MAGIC[8] = { 'P', 'C', 'K', 'V', 'B', 'L', 'K', '1' };

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v |= (uint32_t)p[i] << (8 * i);
    return v;
}
static uint64_t get64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}
static void putf64(uint8_t *p, double d) { uint64_t v; memcpy(&v, &d, 8); put64(p, v); }
static double getf64(const uint8_t *p) { uint64_t v = get64(p); double d; memcpy(&d, &v, 8); return d; }

/* splitmix64's finalizer: every input bit reaches every output bit */
static uint64_t mix(uint64_t h, uint64_t v) {
    h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebull;
    return h ^ (h >> 31);
}

uint64_t kvfile_chain_root(uint64_t model_fp, uint32_t n_layer, uint32_t kv_dim, const char *ns) {
    uint64_t h = mix(mix(mix(0x6b76666c65763130ull, KVFILE_VERSION), model_fp), (uint64_t)n_layer << 32 | kv_dim);
    const size_t n = ns ? strlen(ns) : 0;
    h = mix(h, n);
    for (size_t i = 0; i < n; i++) h = mix(h, (uint8_t)ns[i]);
    return h;
}

uint64_t kvfile_chain(uint64_t parent, const int32_t *tokens, int n) {
    uint64_t h = mix(parent, (uint64_t)(uint32_t)n);
    for (int i = 0; i < n; i++) h = mix(h, (uint32_t)tokens[i]);
    return h;
}

static size_t header_size(size_t ns_len) { return (KVFILE_FIXED + ns_len + 7) / 8 * 8; }

size_t kvfile_size(uint32_t n_layer, uint32_t kv_dim, size_t ns_len) {
    return header_size(ns_len) + kv_block_bytes((int)n_layer, (int)kv_dim) + 4;
}

/* A layout the pool can hold (and whose size arithmetic cannot overflow). */
static int layout_ok(uint32_t n_layer, uint32_t kv_dim) {
    return n_layer >= 1 && n_layer <= 4096 && kv_dim >= 1 && kv_dim <= 65536;
}

size_t kvfile_encode(const kvfile_meta *m, const void *kv, uint8_t *out, size_t cap, char *err, size_t errlen) {
    const size_t ns_len = strnlen(m->ns, sizeof m->ns);
    if (ns_len > KVFILE_NS_MAX) { errf(err, errlen, "kvfile: namespace over %d bytes", KVFILE_NS_MAX); return 0; }
    if (!layout_ok(m->n_layer, m->kv_dim)) { errf(err, errlen, "kvfile: bad layout %u x %u", m->n_layer, m->kv_dim); return 0; }
    if (m->n_tokens < 1 || m->n_tokens > KV_BLOCK) { errf(err, errlen, "kvfile: %d tokens in a block", m->n_tokens); return 0; }
    if (m->chain != kvfile_chain(m->parent, m->tokens, m->n_tokens)) { errf(err, errlen, "kvfile: chain hash does not match the tokens"); return 0; }
    const size_t hs = header_size(ns_len), pb = kv_block_bytes((int)m->n_layer, (int)m->kv_dim), total = hs + pb + 4;
    if (cap < total) { errf(err, errlen, "kvfile: buffer of %zu bytes, record needs %zu", cap, total); return 0; }
    memset(out, 0, hs);
    memcpy(out, MAGIC, 8);
    put32(out + 8, KVFILE_VERSION);
    put32(out + 12, (uint32_t)hs);
    put64(out + 16, pb);
    put64(out + 24, m->model_fp);
    put32(out + 32, m->n_layer);
    put32(out + 36, m->kv_dim);
    put16(out + 40, KV_BLOCK);
    put16(out + 42, 1);
    put16(out + 44, (uint16_t)m->n_tokens);
    out[46] = (uint8_t)m->kind;
    out[47] = (uint8_t)ns_len;
    put64(out + 48, m->parent);
    put64(out + 56, m->chain);
    putf64(out + 64, m->expiry);
    putf64(out + 72, m->ttl);
    for (int i = 0; i < m->n_tokens; i++) put32(out + 80 + 4 * i, (uint32_t)m->tokens[i]);
    memcpy(out + KVFILE_FIXED, m->ns, ns_len);
    memcpy(out + hs, kv, pb);
    put32(out + hs + pb, (uint32_t)crc32_z(crc32_z(0, Z_NULL, 0), out, hs + pb));
    return total;
}

int kvfile_decode(const uint8_t *buf, size_t len, kvfile_meta *m, const uint8_t **kv, char *err, size_t errlen) {
    if (len < KVFILE_FIXED + 4) return errf(err, errlen, "kvfile: %zu bytes, shorter than a header", len);
    if (memcmp(buf, MAGIC, 8)) return errf(err, errlen, "kvfile: not a KV block record (bad magic)");
    const uint32_t ver = get32(buf + 8);
    if (ver != KVFILE_VERSION) return errf(err, errlen, "kvfile: format version %u, this build reads %u", ver, KVFILE_VERSION);
    memset(m, 0, sizeof *m);
    m->model_fp = get64(buf + 24);
    m->n_layer = get32(buf + 32);
    m->kv_dim = get32(buf + 36);
    if (!layout_ok(m->n_layer, m->kv_dim)) return errf(err, errlen, "kvfile: bad layout %u x %u", m->n_layer, m->kv_dim);
    if (get16(buf + 40) != KV_BLOCK || get16(buf + 42) != 1)
        return errf(err, errlen, "kvfile: blocks of %u tokens, element type %u (expected %d, fp16)", get16(buf + 40), get16(buf + 42), KV_BLOCK);
    m->n_tokens = get16(buf + 44);
    m->kind = buf[46];
    const size_t ns_len = buf[47], hs = header_size(ns_len), pb = kv_block_bytes((int)m->n_layer, (int)m->kv_dim);
    if (m->n_tokens < 1 || m->n_tokens > KV_BLOCK) return errf(err, errlen, "kvfile: %d tokens in a block", m->n_tokens);
    if (m->kind != 0 && m->kind != 1) return errf(err, errlen, "kvfile: entry kind %d", m->kind);
    if (get32(buf + 12) != hs) return errf(err, errlen, "kvfile: header of %u bytes, expected %zu", get32(buf + 12), hs);
    if (get64(buf + 16) != pb) return errf(err, errlen, "kvfile: payload of %llu bytes, the layout needs %zu", (unsigned long long)get64(buf + 16), pb);
    if (len != hs + pb + 4) return errf(err, errlen, "kvfile: %zu bytes, the record needs %zu (truncated or trailing data)", len, hs + pb + 4);
    const uint32_t crc = (uint32_t)crc32_z(crc32_z(0, Z_NULL, 0), buf, hs + pb);
    if (crc != get32(buf + hs + pb)) return errf(err, errlen, "kvfile: checksum mismatch");
    for (size_t i = KVFILE_FIXED + ns_len; i < hs; i++)
        if (buf[i]) return errf(err, errlen, "kvfile: nonzero header padding");
    memcpy(m->ns, buf + KVFILE_FIXED, ns_len);
    if (memchr(m->ns, 0, ns_len)) return errf(err, errlen, "kvfile: NUL byte in the namespace");
    m->parent = get64(buf + 48);
    m->chain = get64(buf + 56);
    m->expiry = getf64(buf + 64);
    m->ttl = getf64(buf + 72);
    if (!(m->expiry == m->expiry) || !(m->ttl >= 0 && m->ttl <= 1e9)) return errf(err, errlen, "kvfile: bad expiry or ttl");
    for (int i = 0; i < KV_BLOCK; i++) {
        const int32_t t = (int32_t)get32(buf + 80 + 4 * i);
        if (i < m->n_tokens) m->tokens[i] = t;
        else if (t) return errf(err, errlen, "kvfile: nonzero unused token slot");
    }
    if (m->chain != kvfile_chain(m->parent, m->tokens, m->n_tokens)) return errf(err, errlen, "kvfile: chain hash does not match the tokens");
    *kv = buf + hs;
    return 0;
}
