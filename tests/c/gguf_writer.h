/* gguf_writer.h: a tiny in-memory GGUF writer for tests (header-only, static functions).
 *
 * It writes exactly what the caller asks for, in order, with no validation: tests use it to
 * build both valid files and deliberately broken ones. Typical use:
 *
 *   gw_buf b = {0};
 *   gw_header(&b, 3, n_tensors, n_kv);
 *   gw_kv_u32(&b, "llama.block_count", 2);
 *   gw_kv_str(&b, "general.architecture", "llama");
 *   gw_tensor_info(&b, "w", 2, (int64_t[]){4, 3}, GGML_TYPE_F32, 0);
 *   gw_pad(&b, 32);                       // start of the data section
 *   gw_bytes(&b, data, nbytes);           // tensor data (pad between tensors yourself)
 *   ... gguf_open_mem(&f, b.p, b.n, err, sizeof err) ...
 *   gw_free(&b);
 *
 * Every writer returns the offset at which it started writing, so a test can patch fields
 * afterwards (gw_patch_u32/u64). Allocation failure aborts (tests only).
 */
#ifndef PCACHE_GGUF_WRITER_H
#define PCACHE_GGUF_WRITER_H
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct { uint8_t *p; size_t n, cap; } gw_buf;

static inline size_t gw_bytes(gw_buf *b, const void *d, size_t n) {
    size_t at = b->n;
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n) cap *= 2;
        uint8_t *p = realloc(b->p, cap);
        if (!p) { fprintf(stderr, "gw: out of memory\n"); abort(); }
        b->p = p;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->n, d, n);
    b->n += n;
    return at;
}
static inline size_t gw_u8(gw_buf *b, uint8_t v) { return gw_bytes(b, &v, 1); }
static inline size_t gw_u16(gw_buf *b, uint16_t v) { return gw_bytes(b, &v, 2); }
static inline size_t gw_u32(gw_buf *b, uint32_t v) { return gw_bytes(b, &v, 4); }
static inline size_t gw_u64(gw_buf *b, uint64_t v) { return gw_bytes(b, &v, 8); }
static inline size_t gw_f32(gw_buf *b, float v) { return gw_bytes(b, &v, 4); }
static inline size_t gw_f64(gw_buf *b, double v) { return gw_bytes(b, &v, 8); }
/* A GGUF string: u64 length then the bytes (no NUL). */
static inline size_t gw_strn(gw_buf *b, const char *s, size_t n) {
    size_t at = gw_u64(b, n);
    gw_bytes(b, s, n);
    return at;
}
static inline size_t gw_str(gw_buf *b, const char *s) { return gw_strn(b, s, strlen(s)); }
static inline void gw_patch_u32(gw_buf *b, size_t at, uint32_t v) { memcpy(b->p + at, &v, 4); }
static inline void gw_patch_u64(gw_buf *b, size_t at, uint64_t v) { memcpy(b->p + at, &v, 8); }
static inline void gw_free(gw_buf *b) { free(b->p); b->p = NULL; b->n = b->cap = 0; }
/* Zero bytes up to the next multiple of align. */
static inline size_t gw_pad(gw_buf *b, size_t align) {
    size_t at = b->n;
    while (b->n % align) gw_u8(b, 0);
    return at;
}

/* Header: magic, version, tensor count, kv count (v2 and v3 share this layout). */
static inline size_t gw_header(gw_buf *b, uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
    size_t at = gw_bytes(b, "GGUF", 4);
    gw_u32(b, version);
    gw_u64(b, n_tensors);
    gw_u64(b, n_kv);
    return at;
}

/* Value type ids as in gguf.h (repeated so this header does not depend on it). */
enum { GW_U8 = 0, GW_I8, GW_U16, GW_I16, GW_U32, GW_I32, GW_F32, GW_BOOL, GW_STR, GW_ARR, GW_U64,
       GW_I64, GW_F64 };

/* A key/value with a scalar value of `size` raw bytes. */
static inline size_t gw_kv_raw(gw_buf *b, const char *key, uint32_t type, const void *v, size_t size) {
    size_t at = gw_str(b, key);
    gw_u32(b, type);
    gw_bytes(b, v, size);
    return at;
}
static inline size_t gw_kv_u8(gw_buf *b, const char *k, uint8_t v) { return gw_kv_raw(b, k, GW_U8, &v, 1); }
static inline size_t gw_kv_i8(gw_buf *b, const char *k, int8_t v) { return gw_kv_raw(b, k, GW_I8, &v, 1); }
static inline size_t gw_kv_u16(gw_buf *b, const char *k, uint16_t v) { return gw_kv_raw(b, k, GW_U16, &v, 2); }
static inline size_t gw_kv_i16(gw_buf *b, const char *k, int16_t v) { return gw_kv_raw(b, k, GW_I16, &v, 2); }
static inline size_t gw_kv_u32(gw_buf *b, const char *k, uint32_t v) { return gw_kv_raw(b, k, GW_U32, &v, 4); }
static inline size_t gw_kv_i32(gw_buf *b, const char *k, int32_t v) { return gw_kv_raw(b, k, GW_I32, &v, 4); }
static inline size_t gw_kv_u64(gw_buf *b, const char *k, uint64_t v) { return gw_kv_raw(b, k, GW_U64, &v, 8); }
static inline size_t gw_kv_i64(gw_buf *b, const char *k, int64_t v) { return gw_kv_raw(b, k, GW_I64, &v, 8); }
static inline size_t gw_kv_f32(gw_buf *b, const char *k, float v) { return gw_kv_raw(b, k, GW_F32, &v, 4); }
static inline size_t gw_kv_f64(gw_buf *b, const char *k, double v) { return gw_kv_raw(b, k, GW_F64, &v, 8); }
static inline size_t gw_kv_bool(gw_buf *b, const char *k, int v) {
    uint8_t x = (uint8_t)(v != 0);
    return gw_kv_raw(b, k, GW_BOOL, &x, 1);
}
static inline size_t gw_kv_str(gw_buf *b, const char *k, const char *v) {
    size_t at = gw_str(b, k);
    gw_u32(b, GW_STR);
    gw_str(b, v);
    return at;
}
/* Array of n fixed-size elements of elem_size bytes each. */
static inline size_t gw_kv_arr(gw_buf *b, const char *k, uint32_t elem_type, uint64_t n, const void *data,
                               size_t elem_size) {
    size_t at = gw_str(b, k);
    gw_u32(b, GW_ARR);
    gw_u32(b, elem_type);
    gw_u64(b, n);
    gw_bytes(b, data, (size_t)n * elem_size);
    return at;
}
static inline size_t gw_kv_arr_str(gw_buf *b, const char *k, uint64_t n, const char *const *strs) {
    size_t at = gw_str(b, k);
    gw_u32(b, GW_ARR);
    gw_u32(b, GW_STR);
    gw_u64(b, n);
    for (uint64_t i = 0; i < n; i++) gw_str(b, strs[i]);
    return at;
}

/* One tensor-info entry: name, n_dims, ne[0..n_dims), ggml type, offset in the data section. */
static inline size_t gw_tensor_info(gw_buf *b, const char *name, uint32_t n_dims, const int64_t *ne,
                                    uint32_t type, uint64_t offset) {
    size_t at = gw_str(b, name);
    gw_u32(b, n_dims);
    for (uint32_t i = 0; i < n_dims; i++) gw_u64(b, (uint64_t)ne[i]);
    gw_u32(b, type);
    gw_u64(b, offset);
    return at;
}
#endif
