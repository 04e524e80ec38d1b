/* gguf: a bounds-checked reader for GGUF v2/v3 model files.
 *
 * The file is mmap'ed read-only (or, for fuzzing and tests, read from a caller's buffer).
 * Parsing walks the header, the metadata key/values and the tensor table once, checking every
 * length, count, offset and size against the end of the buffer before it is used; any failure
 * leaves a human-readable message in the caller's err buffer and returns a negative code.
 * After a successful open, all returned pointers point into the mapping and live until
 * gguf_close. Strings in GGUF are not NUL-terminated: they come back as (ptr, len) pairs.
 */
#ifndef PCACHE_GGUF_H
#define PCACHE_GGUF_H
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include "quant.h"

typedef enum {
    GGUF_TYPE_UINT8 = 0, GGUF_TYPE_INT8 = 1, GGUF_TYPE_UINT16 = 2, GGUF_TYPE_INT16 = 3,
    GGUF_TYPE_UINT32 = 4, GGUF_TYPE_INT32 = 5, GGUF_TYPE_FLOAT32 = 6, GGUF_TYPE_BOOL = 7,
    GGUF_TYPE_STRING = 8, GGUF_TYPE_ARRAY = 9, GGUF_TYPE_UINT64 = 10, GGUF_TYPE_INT64 = 11,
    GGUF_TYPE_FLOAT64 = 12, GGUF_TYPE_COUNT
} gguf_type;

typedef struct { const char *ptr; uint64_t len; } gguf_str;

typedef struct {
    gguf_str key;
    gguf_type type;          /* value type; GGUF_TYPE_ARRAY for arrays */
    gguf_type arr_type;      /* element type when type == GGUF_TYPE_ARRAY */
    uint64_t arr_n;          /* element count when type == GGUF_TYPE_ARRAY */
    const uint8_t *data;     /* scalar value bytes, or first array element (raw, little-endian) */
    gguf_str *strs;          /* for string arrays (and single strings, n=1): parsed (ptr,len) */
} gguf_kv;

#define GGUF_MAX_DIMS 4
typedef struct {
    gguf_str name;
    uint32_t n_dims;
    int64_t ne[GGUF_MAX_DIMS];  /* ne[0] is the innermost (row) length; unused dims are 1 */
    ggml_type type;
    uint64_t offset;            /* relative to the data section */
    const void *data;           /* into the mapping */
    size_t nbytes;
} gguf_tensor;

typedef struct gguf_file {
    uint32_t version;
    uint64_t n_kv, n_tensors;
    gguf_kv *kv;
    gguf_tensor *tensors;
    size_t alignment;
    const uint8_t *base;  /* whole file */
    size_t size;
    size_t data_offset;   /* start of the tensor data section */
    bool mapped;          /* base is an mmap we own */
} gguf_file;

/* Error codes (negative). */
enum { GGUF_OK = 0, GGUF_EIO = -1, GGUF_EFORMAT = -2, GGUF_EUNSUPPORTED = -3, GGUF_ENOMEM = -4,
       GGUF_ENOTFOUND = -5, GGUF_ETYPE = -6 };

/* Maps path read-only and parses it. On error *out is NULL, err says what and where. */
int gguf_open(gguf_file **out, const char *path, char *err, size_t errlen);
/* Parses a caller-owned buffer (not copied: it must outlive the gguf_file). */
int gguf_open_mem(gguf_file **out, const void *buf, size_t len, char *err, size_t errlen);
void gguf_close(gguf_file *f);

/* Metadata lookup. Returns the kv index or -1. */
int gguf_find_key(const gguf_file *f, const char *key);
const gguf_kv *gguf_get_kv(const gguf_file *f, const char *key);
/* Typed getters: return GGUF_OK, GGUF_ENOTFOUND or GGUF_ETYPE. Integer getters accept any
 * integer type whose value fits; float getters accept FLOAT32/FLOAT64. */
int gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out);
int gguf_get_i64(const gguf_file *f, const char *key, int64_t *out);
int gguf_get_f32(const gguf_file *f, const char *key, float *out);
int gguf_get_bool(const gguf_file *f, const char *key, bool *out);
int gguf_get_str(const gguf_file *f, const char *key, gguf_str *out);
/* Arrays: element type and count; for numeric arrays *data points at the raw elements
 * (little-endian, possibly unaligned: memcpy them out); for string arrays *data points at a
 * gguf_str[n] (the same as kv->strs); for arrays of arrays at the raw first nested array. */
int gguf_get_arr(const gguf_file *f, const char *key, gguf_type *type, uint64_t *n, const void **data);
/* Convenience: compare a gguf_str with a C string. */
bool gguf_str_eq(gguf_str s, const char *c);

const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name);
const char *gguf_type_name(gguf_type t);
#endif
