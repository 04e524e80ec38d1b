/* gguf: a bounds-checked reader for GGUF v2/v3 files.
 *
 * Design. The whole file is one read-only byte range (an mmap we own, or a caller's buffer).
 * The parser walks it once with a cursor (struct cur) whose every read first checks that the
 * bytes exist; nothing is dereferenced through a length or offset that has not been checked
 * against the end of the buffer with overflow-safe arithmetic (a check of the form
 * "n <= remaining / elem_size", never "pos + n * elem_size <= size"). Counts that decide an
 * allocation (n_kv, n_tensors, string-array lengths) are first bounded by the bytes left in
 * the buffer, so a lying header fails with a message before it can make us allocate much:
 * total heap use is O(file size) whatever the header claims.
 *
 * What we keep. Strings, scalar values and numeric arrays are not copied: kv entries and
 * tensor infos hold pointers into the buffer. Only string arrays (and single strings, as a
 * one-element array, so callers can treat both alike) get a (ptr, len) table, because their
 * elements are variable-length and would otherwise need re-walking on every access.
 * Arrays of arrays are legal in the format but used by no model we know of: we bound-check
 * and skip them (depth-limited), keeping only a pointer to the first nested element.
 *
 * Lookup. Keys and tensor names go into two small open-addressing hash tables built during
 * parsing; they detect duplicates (an error) in O(n) and make the model loader's few hundred
 * gguf_find_tensor calls cheap. The tables live in a private struct wrapping the public
 * gguf_file, so the header stays plain data.
 *
 * Trade-offs. We assume a little-endian host (x86-64/aarch64) and read values with memcpy,
 * so unaligned metadata is fine. We do not require tensors to be packed back to back or to
 * not overlap (llama.cpp's writer packs them; a read-only mapping cannot be harmed by
 * overlap); we do require each tensor's offset to be aligned and its bytes to lie inside the
 * file. Bool values other than 0/1 are rejected: no writer produces them, so they mean a
 * corrupt file.
 */
#include "gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "gguf.c assumes a little-endian host"
#endif

#define GGUF_MAGIC "GGUF"
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_ARRAY_DEPTH 8

/* Smallest possible encodings, used to bound counts by the bytes that remain. */
#define MIN_KV_BYTES (8 + 4 + 1)          /* key length, value type, 1-byte value */
#define MIN_TENSOR_BYTES (8 + 4 + 4 + 8)  /* name length, n_dims (0), type, offset */

typedef struct {
    gguf_file pub;          /* must be first: gguf_file * <-> gguf_impl * */
    uint32_t *kv_hash;      /* index + 1 into pub.kv, 0 = empty */
    size_t kv_hash_cap;     /* power of two */
    uint32_t *t_hash;       /* index + 1 into pub.tensors */
    size_t t_hash_cap;
} gguf_impl;

typedef struct {
    const uint8_t *base;
    size_t pos, size;
    char *err;
    size_t errlen;
} cur;

static int fail(cur *c, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(cur *c, int code, const char *fmt, ...) {
    if (c->err && c->errlen) {
        int n = snprintf(c->err, c->errlen, "gguf: ");
        if (n < 0) n = 0;
        if ((size_t)n < c->errlen) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(c->err + n, c->errlen - (size_t)n, fmt, ap);
            va_end(ap);
        }
    }
    return code;
}

static size_t remaining(const cur *c) { return c->size - c->pos; }

static int need(cur *c, size_t n, const char *what) {
    if (n > remaining(c))
        return fail(c, GGUF_EFORMAT, "truncated: %s needs %zu bytes at offset %zu, file size %zu",
                    what, n, c->pos, c->size);
    return GGUF_OK;
}

static int rd_u32(cur *c, uint32_t *v, const char *what) {
    int rc = need(c, 4, what);
    if (rc) return rc;
    memcpy(v, c->base + c->pos, 4);
    c->pos += 4;
    return GGUF_OK;
}

static int rd_u64(cur *c, uint64_t *v, const char *what) {
    int rc = need(c, 8, what);
    if (rc) return rc;
    memcpy(v, c->base + c->pos, 8);
    c->pos += 8;
    return GGUF_OK;
}

static int rd_str(cur *c, gguf_str *s, const char *what) {
    uint64_t len;
    size_t at = c->pos;
    int rc = rd_u64(c, &len, what);
    if (rc) return rc;
    if (len > remaining(c))
        return fail(c, GGUF_EFORMAT,
                    "%s at offset %zu claims length %llu but only %zu bytes remain (file size %zu)",
                    what, at, (unsigned long long)len, remaining(c), c->size);
    s->ptr = (const char *)(c->base + c->pos);
    s->len = len;
    c->pos += (size_t)len;
    return GGUF_OK;
}

/* Bytes of one scalar of type t; 0 for STRING/ARRAY/unknown. */
static size_t scalar_size(gguf_type t) {
    switch (t) {
    case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_BOOL: return 1;
    case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16: return 2;
    case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_FLOAT32: return 4;
    case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64: case GGUF_TYPE_FLOAT64: return 8;
    default: return 0;
    }
}

const char *gguf_type_name(gguf_type t) {
    static const char *names[GGUF_TYPE_COUNT] = {
        "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "str", "arr", "u64", "i64", "f64",
    };
    if ((unsigned)t >= GGUF_TYPE_COUNT) return "unknown";
    return names[t];
}

static void print_key(char *dst, size_t n, gguf_str s) {
    /* For messages: the key, truncated and with non-printables replaced. */
    size_t i, m = s.len < n - 1 ? (size_t)s.len : n - 1;
    for (i = 0; i < m; i++) {
        unsigned char ch = (unsigned char)s.ptr[i];
        dst[i] = (ch >= 32 && ch < 127) ? (char)ch : '?';
    }
    dst[i] = 0;
}

/* Skips `n` elements of type t (t may be ARRAY: nested, bounded by depth). For BOOL checks 0/1. */
static int skip_elems(cur *c, gguf_type t, uint64_t n, int depth, const char *key) {
    size_t esz = scalar_size(t);
    if (esz) {
        if (n > remaining(c) / esz)
            return fail(c, GGUF_EFORMAT,
                        "key '%s': array of %llu %s at offset %zu runs past end of file (size %zu)",
                        key, (unsigned long long)n, gguf_type_name(t), c->pos, c->size);
        if (t == GGUF_TYPE_BOOL)
            for (uint64_t i = 0; i < n; i++)
                if (c->base[c->pos + i] > 1)
                    return fail(c, GGUF_EFORMAT, "key '%s': bool value %u at offset %zu is not 0 or 1",
                                key, c->base[c->pos + i], c->pos + (size_t)i);
        c->pos += (size_t)(n * esz);
        return GGUF_OK;
    }
    if (t == GGUF_TYPE_STRING) {
        for (uint64_t i = 0; i < n; i++) {
            gguf_str s;
            int rc = rd_str(c, &s, "array string");
            if (rc) return rc;
        }
        return GGUF_OK;
    }
    if (t == GGUF_TYPE_ARRAY) {
        if (depth >= GGUF_MAX_ARRAY_DEPTH)
            return fail(c, GGUF_EUNSUPPORTED, "key '%s': arrays nested deeper than %d at offset %zu",
                        key, GGUF_MAX_ARRAY_DEPTH, c->pos);
        /* Each nested array is at least 12 bytes (type + count): bound n before looping. */
        if (n > remaining(c) / 12)
            return fail(c, GGUF_EFORMAT,
                        "key '%s': array of %llu arrays at offset %zu runs past end of file (size %zu)",
                        key, (unsigned long long)n, c->pos, c->size);
        for (uint64_t i = 0; i < n; i++) {
            uint32_t et;
            uint64_t en;
            int rc = rd_u32(c, &et, "nested array type");
            if (rc) return rc;
            if (et >= GGUF_TYPE_COUNT)
                return fail(c, GGUF_EFORMAT, "key '%s': nested array has bad element type %u at offset %zu",
                            key, et, c->pos - 4);
            if ((rc = rd_u64(c, &en, "nested array count"))) return rc;
            if ((rc = skip_elems(c, (gguf_type)et, en, depth + 1, key))) return rc;
        }
        return GGUF_OK;
    }
    return fail(c, GGUF_EFORMAT, "key '%s': bad value type %u at offset %zu", key, (unsigned)t, c->pos);
}

static uint64_t hash_bytes(const char *p, size_t n) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) { h ^= (unsigned char)p[i]; h *= 1099511628211ull; }
    return h;
}

static size_t hash_cap_for(uint64_t n) {
    size_t cap = 8;
    while (cap < 2 * n) cap <<= 1;
    return cap;
}

/* Inserts idx (of a string s) into a table; returns the existing index if s is already there,
 * or -1 if inserted. `names(i)` is read through a stride so kv and tensors share the code. */
static long hash_insert(uint32_t *tab, size_t cap, const void *items, size_t stride, size_t name_off,
                        gguf_str s, uint32_t idx) {
    size_t mask = cap - 1, h = (size_t)hash_bytes(s.ptr, (size_t)s.len) & mask;
    for (;;) {
        uint32_t e = tab[h];
        if (!e) { tab[h] = idx + 1; return -1; }
        const gguf_str *o = (const gguf_str *)((const char *)items + (size_t)(e - 1) * stride + name_off);
        if (o->len == s.len && memcmp(o->ptr, s.ptr, (size_t)s.len) == 0) return (long)(e - 1);
        h = (h + 1) & mask;
    }
}

static long hash_find(const uint32_t *tab, size_t cap, const void *items, size_t stride, size_t name_off,
                      const char *name) {
    if (!tab || !name) return -1;
    size_t n = strlen(name), mask = cap - 1, h = (size_t)hash_bytes(name, n) & mask;
    for (;;) {
        uint32_t e = tab[h];
        if (!e) return -1;
        const gguf_str *o = (const gguf_str *)((const char *)items + (size_t)(e - 1) * stride + name_off);
        if (o->len == n && memcmp(o->ptr, name, n) == 0) return (long)(e - 1);
        h = (h + 1) & mask;
    }
}

static int parse_kv(cur *c, gguf_kv *kv, uint64_t i) {
    char kbuf[96];
    uint32_t t;
    int rc = rd_str(c, &kv->key, "metadata key");
    if (rc) return rc;
    print_key(kbuf, sizeof kbuf, kv->key);
    if ((rc = rd_u32(c, &t, "metadata value type"))) return rc;
    if (t >= GGUF_TYPE_COUNT)
        return fail(c, GGUF_EFORMAT, "key '%s' (kv %llu): bad value type %u at offset %zu", kbuf,
                    (unsigned long long)i, t, c->pos - 4);
    kv->type = (gguf_type)t;
    if (t == GGUF_TYPE_ARRAY) {
        uint32_t et;
        uint64_t n;
        if ((rc = rd_u32(c, &et, "array element type"))) return rc;
        if (et >= GGUF_TYPE_COUNT)
            return fail(c, GGUF_EFORMAT, "key '%s': bad array element type %u at offset %zu", kbuf, et,
                        c->pos - 4);
        if ((rc = rd_u64(c, &n, "array count"))) return rc;
        kv->arr_type = (gguf_type)et;
        kv->arr_n = n;
        kv->data = c->base + c->pos;
        if (et == GGUF_TYPE_STRING) {
            /* Every string costs at least its 8-byte length: bound n before allocating. */
            if (n > remaining(c) / 8)
                return fail(c, GGUF_EFORMAT,
                            "key '%s': string array of %llu elements at offset %zu cannot fit in the "
                            "%zu bytes left",
                            kbuf, (unsigned long long)n, c->pos, remaining(c));
            if (n) {
                kv->strs = malloc((size_t)n * sizeof *kv->strs);
                if (!kv->strs) return fail(c, GGUF_ENOMEM, "out of memory for string array '%s'", kbuf);
            }
            for (uint64_t j = 0; j < n; j++)
                if ((rc = rd_str(c, &kv->strs[j], "array string"))) return rc;
            return GGUF_OK;
        }
        return skip_elems(c, (gguf_type)et, n, 1, kbuf);
    }
    kv->arr_type = kv->type;
    kv->arr_n = 0;
    kv->data = c->base + c->pos;
    if (t == GGUF_TYPE_STRING) {
        kv->strs = malloc(sizeof *kv->strs);
        if (!kv->strs) return fail(c, GGUF_ENOMEM, "out of memory");
        return rd_str(c, kv->strs, "string value");
    }
    return skip_elems(c, kv->type, 1, 0, kbuf);
}

static int parse_tensor(cur *c, gguf_tensor *ti, uint64_t i) {
    char nbuf[96];
    uint32_t nd, type;
    int rc = rd_str(c, &ti->name, "tensor name");
    if (rc) return rc;
    print_key(nbuf, sizeof nbuf, ti->name);
    if ((rc = rd_u32(c, &nd, "tensor n_dims"))) return rc;
    if (nd > GGUF_MAX_DIMS)
        return fail(c, GGUF_EFORMAT, "tensor '%s' (#%llu): n_dims %u > %d", nbuf, (unsigned long long)i, nd,
                    GGUF_MAX_DIMS);
    ti->n_dims = nd;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) ti->ne[d] = 1;
    for (uint32_t d = 0; d < nd; d++) {
        uint64_t v;
        if ((rc = rd_u64(c, &v, "tensor dimension"))) return rc;
        if (v == 0 || v > (uint64_t)INT64_MAX)
            return fail(c, GGUF_EFORMAT, "tensor '%s': dimension %u is %lld (must be >= 1)", nbuf, d,
                        (long long)v);
        ti->ne[d] = (int64_t)v;
    }
    if ((rc = rd_u32(c, &type, "tensor type"))) return rc;
    const ggml_type_info *info = type < GGML_TYPE_COUNT ? ggml_type_get((ggml_type)type) : NULL;
    if (!info || info->block_size <= 0 || info->type_size == 0)
        return fail(c, GGUF_EUNSUPPORTED, "tensor '%s': unknown ggml type %u", nbuf, type);
    ti->type = (ggml_type)type;
    if ((rc = rd_u64(c, &ti->offset, "tensor offset"))) return rc;

    /* nbytes = (ne0 / block) * type_size * ne1 * ne2 * ne3, every step overflow-checked. */
    if (ti->ne[0] % info->block_size)
        return fail(c, GGUF_EFORMAT, "tensor '%s': row length %lld is not a multiple of %s block size %d",
                    nbuf, (long long)ti->ne[0], info->name, info->block_size);
    uint64_t nb = (uint64_t)(ti->ne[0] / info->block_size), ne_total = (uint64_t)ti->ne[0];
    if (__builtin_mul_overflow(nb, (uint64_t)info->type_size, &nb)) goto too_big;
    for (int d = 1; d < GGUF_MAX_DIMS; d++) {
        if (__builtin_mul_overflow(nb, (uint64_t)ti->ne[d], &nb)) goto too_big;
        if (__builtin_mul_overflow(ne_total, (uint64_t)ti->ne[d], &ne_total) || ne_total > (uint64_t)INT64_MAX)
            goto too_big;
    }
    if (nb > SIZE_MAX) goto too_big;
    ti->nbytes = (size_t)nb;
    return GGUF_OK;
too_big:
    return fail(c, GGUF_EFORMAT, "tensor '%s': size [%lld, %lld, %lld, %lld] overflows", nbuf,
                (long long)ti->ne[0], (long long)ti->ne[1], (long long)ti->ne[2], (long long)ti->ne[3]);
}

static int parse(gguf_impl *g, cur *c) {
    gguf_file *f = &g->pub;
    uint32_t ver;
    uint64_t n_kv, n_t;
    int rc;

    if (c->size < 4 || memcmp(c->base, GGUF_MAGIC, 4) != 0) {
        if (c->size < 4) return fail(c, GGUF_EFORMAT, "not a GGUF file: %zu bytes, too short for magic", c->size);
        return fail(c, GGUF_EFORMAT, "not a GGUF file: bad magic %02x %02x %02x %02x (want 'GGUF')",
                    c->base[0], c->base[1], c->base[2], c->base[3]);
    }
    c->pos = 4;
    if ((rc = rd_u32(c, &ver, "version"))) return rc;
    if (ver == 1)
        return fail(c, GGUF_EUNSUPPORTED, "GGUF version 1 is not supported (only v2 and v3); re-convert the model");
    if (ver != 2 && ver != 3) {
        if ((ver & 0xffff) == 0 && (ver >> 24) >= 1 && (ver >> 24) <= 3)
            return fail(c, GGUF_EUNSUPPORTED, "GGUF version 0x%08x: a big-endian file? only little-endian is supported", ver);
        return fail(c, GGUF_EUNSUPPORTED, "unsupported GGUF version %u (only v2 and v3)", ver);
    }
    f->version = ver;
    if ((rc = rd_u64(c, &n_t, "tensor count"))) return rc;
    if ((rc = rd_u64(c, &n_kv, "metadata kv count"))) return rc;
    if (n_kv > remaining(c) / MIN_KV_BYTES || n_kv > INT32_MAX)
        return fail(c, GGUF_EFORMAT, "header claims %llu metadata entries but only %zu bytes follow",
                    (unsigned long long)n_kv, remaining(c));
    /* Tensor infos follow the kvs: their minimum size must fit too. */
    if (n_t > (remaining(c) - n_kv * MIN_KV_BYTES) / MIN_TENSOR_BYTES || n_t > INT32_MAX)
        return fail(c, GGUF_EFORMAT, "header claims %llu tensors but only %zu bytes follow",
                    (unsigned long long)n_t, remaining(c));

    f->kv = calloc(n_kv ? (size_t)n_kv : 1, sizeof *f->kv);
    g->kv_hash_cap = hash_cap_for(n_kv);
    g->kv_hash = calloc(g->kv_hash_cap, sizeof *g->kv_hash);
    f->tensors = calloc(n_t ? (size_t)n_t : 1, sizeof *f->tensors);
    g->t_hash_cap = hash_cap_for(n_t);
    g->t_hash = calloc(g->t_hash_cap, sizeof *g->t_hash);
    if (!f->kv || !g->kv_hash || !f->tensors || !g->t_hash) return fail(c, GGUF_ENOMEM, "out of memory");

    for (uint64_t i = 0; i < n_kv; i++) {
        f->n_kv = i + 1; /* so gguf_close frees a partly filled entry */
        if ((rc = parse_kv(c, &f->kv[i], i))) return rc;
        if (hash_insert(g->kv_hash, g->kv_hash_cap, f->kv, sizeof *f->kv, offsetof(gguf_kv, key),
                        f->kv[i].key, (uint32_t)i) >= 0) {
            char kbuf[96];
            print_key(kbuf, sizeof kbuf, f->kv[i].key);
            return fail(c, GGUF_EFORMAT, "duplicate metadata key '%s' (kv %llu)", kbuf, (unsigned long long)i);
        }
    }

    f->alignment = GGUF_DEFAULT_ALIGNMENT;
    if (gguf_find_key(f, "general.alignment") >= 0) {
        uint32_t a;
        if (gguf_get_u32(f, "general.alignment", &a) != GGUF_OK)
            return fail(c, GGUF_EFORMAT, "general.alignment must be an unsigned 32-bit integer (got %s)",
                        gguf_type_name(gguf_get_kv(f, "general.alignment")->type));
        if (a == 0 || (a & (a - 1)))
            return fail(c, GGUF_EFORMAT, "general.alignment %u is not a nonzero power of two", a);
        f->alignment = a;
    }

    for (uint64_t i = 0; i < n_t; i++) {
        f->n_tensors = i + 1;
        if ((rc = parse_tensor(c, &f->tensors[i], i))) return rc;
        if (hash_insert(g->t_hash, g->t_hash_cap, f->tensors, sizeof *f->tensors, offsetof(gguf_tensor, name),
                        f->tensors[i].name, (uint32_t)i) >= 0) {
            char nbuf[96];
            print_key(nbuf, sizeof nbuf, f->tensors[i].name);
            return fail(c, GGUF_EFORMAT, "duplicate tensor name '%s' (#%llu)", nbuf, (unsigned long long)i);
        }
    }

    /* The data section starts at the next alignment boundary after the tensor table. */
    size_t pad = (f->alignment - c->pos % f->alignment) % f->alignment;
    if (pad > remaining(c)) {
        if (n_t)
            return fail(c, GGUF_EFORMAT, "data section start (offset %zu aligned to %zu) is past end of file (size %zu)",
                        c->pos, f->alignment, c->size);
        f->data_offset = c->size; /* no tensors: trailing padding may be absent */
    } else {
        f->data_offset = c->pos + pad;
    }
    size_t data_size = c->size - f->data_offset;
    for (uint64_t i = 0; i < n_t; i++) {
        gguf_tensor *t = &f->tensors[i];
        char nbuf[96];
        print_key(nbuf, sizeof nbuf, t->name);
        if (t->offset % f->alignment)
            return fail(c, GGUF_EFORMAT, "tensor '%s': data offset %llu is not a multiple of the alignment %zu",
                        nbuf, (unsigned long long)t->offset, f->alignment);
        if (t->offset > data_size || t->nbytes > data_size - t->offset) {
            unsigned long long s = (unsigned long long)f->data_offset + t->offset, e;
            if (__builtin_add_overflow(s, (unsigned long long)t->nbytes, &e)) e = ULLONG_MAX;
            if (s < t->offset) s = ULLONG_MAX;
            return fail(c, GGUF_EFORMAT, "tensor '%s' data [%llu..%llu) past end of file (size %zu)", nbuf, s, e,
                        c->size);
        }
        t->data = c->base + f->data_offset + t->offset;
    }
    return GGUF_OK;
}

int gguf_open_mem(gguf_file **out, const void *buf, size_t len, char *err, size_t errlen) {
    cur c = {.base = buf, .pos = 0, .size = len, .err = err, .errlen = errlen};
    if (err && errlen) err[0] = 0;
    if (!out) return fail(&c, GGUF_EFORMAT, "no output pointer");
    *out = NULL;
    if (!buf && len) return fail(&c, GGUF_EFORMAT, "NULL buffer");
    if (!buf) c.base = (const uint8_t *)"";
    gguf_impl *g = calloc(1, sizeof *g);
    if (!g) return fail(&c, GGUF_ENOMEM, "out of memory");
    g->pub.base = c.base;
    g->pub.size = len;
    int rc = parse(g, &c);
    if (rc) { gguf_close(&g->pub); return rc; }
    *out = &g->pub;
    return GGUF_OK;
}

int gguf_open(gguf_file **out, const char *path, char *err, size_t errlen) {
    cur c = {.err = err, .errlen = errlen};
    if (err && errlen) err[0] = 0;
    if (!out) return fail(&c, GGUF_EFORMAT, "no output pointer");
    *out = NULL;
    if (!path) return fail(&c, GGUF_EIO, "no path");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fail(&c, GGUF_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return fail(&c, GGUF_EIO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) { close(fd); return fail(&c, GGUF_EIO, "%s: not a regular file", path); }
    if (st.st_size < 24) { close(fd); return fail(&c, GGUF_EFORMAT, "%s: %lld bytes, too small for a GGUF header", path, (long long)st.st_size); }
    size_t size = (size_t)st.st_size;
    void *m = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd); /* the mapping keeps the file alive */
    if (m == MAP_FAILED) return fail(&c, GGUF_EIO, "%s: mmap failed: %s", path, strerror(e));

    char tmp[512];
    gguf_file *f = NULL;
    int rc = gguf_open_mem(&f, m, size, tmp, sizeof tmp);
    if (rc) {
        munmap(m, size);
        /* "gguf: <path>: <message without its own 'gguf: ' prefix>" */
        const char *msg = strncmp(tmp, "gguf: ", 6) == 0 ? tmp + 6 : tmp;
        return fail(&c, rc, "%s: %s", path, msg);
    }
    f->mapped = true;
    *out = f;
    return GGUF_OK;
}

void gguf_close(gguf_file *f) {
    if (!f) return;
    gguf_impl *g = (gguf_impl *)f;
    if (f->kv)
        for (uint64_t i = 0; i < f->n_kv; i++) free(f->kv[i].strs);
    free(f->kv);
    free(f->tensors);
    free(g->kv_hash);
    free(g->t_hash);
    if (f->mapped && f->base) munmap((void *)f->base, f->size);
    free(g);
}

int gguf_find_key(const gguf_file *f, const char *key) {
    if (!f) return -1;
    const gguf_impl *g = (const gguf_impl *)f;
    return (int)hash_find(g->kv_hash, g->kv_hash_cap, f->kv, sizeof *f->kv, offsetof(gguf_kv, key), key);
}

const gguf_kv *gguf_get_kv(const gguf_file *f, const char *key) {
    int i = gguf_find_key(f, key);
    return i < 0 ? NULL : &f->kv[i];
}

const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name) {
    if (!f) return NULL;
    const gguf_impl *g = (const gguf_impl *)f;
    long i = hash_find(g->t_hash, g->t_hash_cap, f->tensors, sizeof *f->tensors, offsetof(gguf_tensor, name), name);
    return i < 0 ? NULL : &f->tensors[i];
}

/* Reads an integer-typed scalar as a signed/unsigned pair. Returns false for non-integers. */
static bool kv_int(const gguf_kv *kv, bool *neg, uint64_t *mag) {
    const uint8_t *p = kv->data;
    *neg = false;
    switch (kv->type) {
    case GGUF_TYPE_UINT8: *mag = p[0]; return true;
    case GGUF_TYPE_UINT16: { uint16_t v; memcpy(&v, p, 2); *mag = v; return true; }
    case GGUF_TYPE_UINT32: { uint32_t v; memcpy(&v, p, 4); *mag = v; return true; }
    case GGUF_TYPE_UINT64: { uint64_t v; memcpy(&v, p, 8); *mag = v; return true; }
    case GGUF_TYPE_INT8: case GGUF_TYPE_INT16: case GGUF_TYPE_INT32: case GGUF_TYPE_INT64: {
        int64_t v;
        if (kv->type == GGUF_TYPE_INT8) v = (int8_t)p[0];
        else if (kv->type == GGUF_TYPE_INT16) { int16_t x; memcpy(&x, p, 2); v = x; }
        else if (kv->type == GGUF_TYPE_INT32) { int32_t x; memcpy(&x, p, 4); v = x; }
        else memcpy(&v, p, 8);
        *neg = v < 0;
        *mag = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
        return true;
    }
    default: return false;
    }
}

int gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out) {
    const gguf_kv *kv = gguf_get_kv(f, key);
    bool neg;
    uint64_t m;
    if (!kv) return GGUF_ENOTFOUND;
    if (!kv_int(kv, &neg, &m) || neg || m > UINT32_MAX) return GGUF_ETYPE;
    if (out) *out = (uint32_t)m;
    return GGUF_OK;
}

int gguf_get_i64(const gguf_file *f, const char *key, int64_t *out) {
    const gguf_kv *kv = gguf_get_kv(f, key);
    bool neg;
    uint64_t m;
    if (!kv) return GGUF_ENOTFOUND;
    if (!kv_int(kv, &neg, &m)) return GGUF_ETYPE;
    if (neg ? m > (uint64_t)INT64_MAX + 1 : m > (uint64_t)INT64_MAX) return GGUF_ETYPE;
    if (out) *out = neg ? (int64_t)(0 - m) : (int64_t)m;
    return GGUF_OK;
}

int gguf_get_f32(const gguf_file *f, const char *key, float *out) {
    const gguf_kv *kv = gguf_get_kv(f, key);
    if (!kv) return GGUF_ENOTFOUND;
    float v;
    if (kv->type == GGUF_TYPE_FLOAT32) memcpy(&v, kv->data, 4);
    else if (kv->type == GGUF_TYPE_FLOAT64) { double d; memcpy(&d, kv->data, 8); v = (float)d; }
    else return GGUF_ETYPE;
    if (out) *out = v;
    return GGUF_OK;
}

int gguf_get_bool(const gguf_file *f, const char *key, bool *out) {
    const gguf_kv *kv = gguf_get_kv(f, key);
    if (!kv) return GGUF_ENOTFOUND;
    if (kv->type != GGUF_TYPE_BOOL) return GGUF_ETYPE;
    if (out) *out = kv->data[0] != 0;
    return GGUF_OK;
}

int gguf_get_str(const gguf_file *f, const char *key, gguf_str *out) {
    const gguf_kv *kv = gguf_get_kv(f, key);
    if (!kv) return GGUF_ENOTFOUND;
    if (kv->type != GGUF_TYPE_STRING) return GGUF_ETYPE;
    if (out) *out = kv->strs[0];
    return GGUF_OK;
}

int gguf_get_arr(const gguf_file *f, const char *key, gguf_type *type, uint64_t *n, const void **data) {
    const gguf_kv *kv = gguf_get_kv(f, key);
    if (!kv) return GGUF_ENOTFOUND;
    if (kv->type != GGUF_TYPE_ARRAY) return GGUF_ETYPE;
    if (type) *type = kv->arr_type;
    if (n) *n = kv->arr_n;
    if (data) *data = kv->arr_type == GGUF_TYPE_STRING ? (const void *)kv->strs : (const void *)kv->data;
    return GGUF_OK;
}

bool gguf_str_eq(gguf_str s, const char *c) {
    if (!c) return false;
    size_t n = strlen(c);
    return s.len == n && (n == 0 || memcmp(s.ptr, c, n) == 0);
}
