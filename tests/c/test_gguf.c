/* Tests for src/gguf.c: round trips through an in-memory writer (gguf_writer.h), every
 * corruption we can think of (each must be an error with a message, never a crash: the suite
 * runs under ASan/UBSan and each corrupted input sits in an exactly-sized heap buffer so any
 * over-read is caught), and a few known facts about the real model when it is present. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gguf.h"
#include "gguf_writer.h"

#define ERRLEN 512

/* Parse a copy of buf in an exactly-sized heap block (so ASan sees over-reads). */
static int open_copy(gguf_file **f, const void *buf, size_t n, char *err, void **copy) {
    *copy = malloc(n ? n : 1);
    ck_assert_ptr_nonnull(*copy);
    if (n) memcpy(*copy, buf, n);
    return gguf_open_mem(f, *copy, n, err, ERRLEN);
}

/* Expects the parse of b to fail with code `want` (0 = any error) and a message containing
 * `needle` (NULL = any). */
static void expect_fail(const gw_buf *b, int want, const char *needle) {
    char err[ERRLEN] = "";
    gguf_file *f = (gguf_file *)0x1;
    void *copy;
    int rc = open_copy(&f, b->p, b->n, err, &copy);
    ck_assert_msg(rc < 0, "expected failure, got rc %d", rc);
    ck_assert_ptr_null(f);
    if (want) ck_assert_msg(rc == want, "rc %d, want %d (%s)", rc, want, err);
    ck_assert_msg(strncmp(err, "gguf: ", 6) == 0 && strlen(err) > 10, "bad message '%s'", err);
    if (needle) ck_assert_msg(strstr(err, needle), "message '%s' lacks '%s'", err, needle);
    free(copy);
}

/* ---- a valid file with one of everything ---- */

static const float T0[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
static const char *const STRS[3] = {"hello", "", "w\xc3\xb6rld"};
static const int32_t I32S[4] = {-1, 0, 7, 2147483647};
static const uint8_t BOOLS[3] = {1, 0, 1};

/* Builds a file with all scalar types, arrays (numeric, bool, string, empty, nested), and two
 * tensors (F32 [4,3], Q8_0 [32,2]) with the given alignment (0 = don't write the key). */
static void build_valid(gw_buf *b, uint32_t version, uint32_t align) {
    const uint64_t n_kv = 20 + (align ? 1 : 0);
    gw_header(b, version, 2, n_kv);
    gw_kv_u8(b, "t.u8", 200);
    gw_kv_i8(b, "t.i8", -100);
    gw_kv_u16(b, "t.u16", 60000);
    gw_kv_i16(b, "t.i16", -30000);
    gw_kv_u32(b, "t.u32", 4000000000u);
    gw_kv_i32(b, "t.i32", -2000000000);
    gw_kv_u64(b, "t.u64", 18000000000000000000ull);
    gw_kv_i64(b, "t.i64", -9000000000000000000ll);
    gw_kv_f32(b, "t.f32", 1.5f);
    gw_kv_f64(b, "t.f64", -2.25);
    gw_kv_bool(b, "t.true", 1);
    gw_kv_bool(b, "t.false", 0);
    gw_kv_str(b, "t.str", "llama");
    gw_kv_str(b, "t.empty", "");
    if (align) gw_kv_u32(b, "general.alignment", align);
    gw_kv_arr(b, "a.i32", GW_I32, 4, I32S, 4);
    gw_kv_arr(b, "a.bool", GW_BOOL, 3, BOOLS, 1);
    gw_kv_arr_str(b, "a.str", 3, STRS);
    gw_kv_arr(b, "a.empty", GW_F32, 0, NULL, 4);
    /* Array of 2 arrays: [u8 x3], [str x2]. */
    gw_str(b, "a.nested");
    gw_u32(b, GW_ARR);
    gw_u32(b, GW_ARR);
    gw_u64(b, 2);
    gw_u32(b, GW_U8); gw_u64(b, 3); gw_u8(b, 1); gw_u8(b, 2); gw_u8(b, 3);
    gw_u32(b, GW_STR); gw_u64(b, 2); gw_str(b, "x"); gw_str(b, "yz");
    gw_kv_u32(b, "after.nested", 42);

    size_t al = align ? align : 32;
    size_t q8_off = (48 + al - 1) / al * al;
    gw_tensor_info(b, "t0", 2, (int64_t[]){4, 3}, GGML_TYPE_F32, 0);
    gw_tensor_info(b, "blk.0.q8", 2, (int64_t[]){32, 2}, GGML_TYPE_Q8_0, q8_off);
    gw_pad(b, al);
    size_t data0 = b->n;
    gw_bytes(b, T0, sizeof T0);
    while (b->n < data0 + q8_off) gw_u8(b, 0);
    for (int i = 0; i < 68; i++) gw_u8(b, (uint8_t)(i * 3 + 1)); /* 2 blocks of 34 bytes */
}

static void check_valid(const gguf_file *f, uint32_t version, uint32_t align) {
    uint32_t u32; int64_t i64; float f32; bool bl; gguf_str s;
    ck_assert_uint_eq(f->version, version);
    ck_assert_uint_eq(f->n_kv, 20 + (align ? 1 : 0));
    ck_assert_uint_eq(f->n_tensors, 2);
    ck_assert_uint_eq(f->alignment, align ? align : 32);

    /* Integers: each type through the getters that accept it. */
    ck_assert_int_eq(gguf_get_u32(f, "t.u8", &u32), GGUF_OK); ck_assert_uint_eq(u32, 200);
    ck_assert_int_eq(gguf_get_i64(f, "t.i8", &i64), GGUF_OK); ck_assert_int_eq(i64, -100);
    ck_assert_int_eq(gguf_get_u32(f, "t.u16", &u32), GGUF_OK); ck_assert_uint_eq(u32, 60000);
    ck_assert_int_eq(gguf_get_i64(f, "t.i16", &i64), GGUF_OK); ck_assert_int_eq(i64, -30000);
    ck_assert_int_eq(gguf_get_u32(f, "t.u32", &u32), GGUF_OK); ck_assert_uint_eq(u32, 4000000000u);
    ck_assert_int_eq(gguf_get_i64(f, "t.u32", &i64), GGUF_OK); ck_assert_int_eq(i64, 4000000000ll);
    ck_assert_int_eq(gguf_get_i64(f, "t.i32", &i64), GGUF_OK); ck_assert_int_eq(i64, -2000000000);
    ck_assert_int_eq(gguf_get_i64(f, "t.i64", &i64), GGUF_OK); ck_assert_int_eq(i64, -9000000000000000000ll);
    /* Values that do not fit are type errors, not silent truncation. */
    ck_assert_int_eq(gguf_get_u32(f, "t.i8", &u32), GGUF_ETYPE);
    ck_assert_int_eq(gguf_get_u32(f, "t.u64", &u32), GGUF_ETYPE);
    ck_assert_int_eq(gguf_get_i64(f, "t.u64", &i64), GGUF_ETYPE);
    ck_assert_int_eq(gguf_get_u32(f, "t.f32", &u32), GGUF_ETYPE);
    ck_assert_int_eq(gguf_get_u32(f, "t.str", &u32), GGUF_ETYPE);
    const gguf_kv *kv = gguf_get_kv(f, "t.u64");
    ck_assert_ptr_nonnull(kv);
    uint64_t u64; memcpy(&u64, kv->data, 8);
    ck_assert_uint_eq(u64, 18000000000000000000ull);
    ck_assert_int_eq(kv->type, GGUF_TYPE_UINT64);

    ck_assert_int_eq(gguf_get_f32(f, "t.f32", &f32), GGUF_OK); ck_assert(f32 == 1.5f);
    ck_assert_int_eq(gguf_get_f32(f, "t.f64", &f32), GGUF_OK); ck_assert(f32 == -2.25f);
    ck_assert_int_eq(gguf_get_f32(f, "t.u8", &f32), GGUF_ETYPE);
    ck_assert_int_eq(gguf_get_bool(f, "t.true", &bl), GGUF_OK); ck_assert(bl);
    ck_assert_int_eq(gguf_get_bool(f, "t.false", &bl), GGUF_OK); ck_assert(!bl);
    ck_assert_int_eq(gguf_get_bool(f, "t.u8", &bl), GGUF_ETYPE);
    ck_assert_int_eq(gguf_get_str(f, "t.str", &s), GGUF_OK);
    ck_assert(gguf_str_eq(s, "llama"));
    ck_assert(!gguf_str_eq(s, "llam"));
    ck_assert(!gguf_str_eq(s, "llamas"));
    ck_assert_int_eq(gguf_get_str(f, "t.empty", &s), GGUF_OK);
    ck_assert_uint_eq(s.len, 0);
    ck_assert(gguf_str_eq(s, ""));
    ck_assert_int_eq(gguf_get_str(f, "t.u32", &s), GGUF_ETYPE);
    ck_assert_int_eq(gguf_get_str(f, "a.str", &s), GGUF_ETYPE);
    ck_assert_int_eq(gguf_get_u32(f, "missing", &u32), GGUF_ENOTFOUND);
    ck_assert_int_eq(gguf_get_str(f, "t.st", &s), GGUF_ENOTFOUND);
    ck_assert_int_eq(gguf_find_key(f, "missing"), -1);
    ck_assert_int_eq(gguf_find_key(f, "t.u8"), 0);
    ck_assert_int_eq(gguf_find_key(f, "t.i8"), 1);

    /* Arrays. */
    gguf_type at; uint64_t n; const void *d;
    ck_assert_int_eq(gguf_get_arr(f, "a.i32", &at, &n, &d), GGUF_OK);
    ck_assert_int_eq(at, GGUF_TYPE_INT32); ck_assert_uint_eq(n, 4);
    ck_assert_int_eq(memcmp(d, I32S, sizeof I32S), 0);
    ck_assert_int_eq(gguf_get_arr(f, "a.bool", &at, &n, &d), GGUF_OK);
    ck_assert_int_eq(at, GGUF_TYPE_BOOL); ck_assert_uint_eq(n, 3);
    ck_assert_int_eq(memcmp(d, BOOLS, 3), 0);
    ck_assert_int_eq(gguf_get_arr(f, "a.str", &at, &n, &d), GGUF_OK);
    ck_assert_int_eq(at, GGUF_TYPE_STRING); ck_assert_uint_eq(n, 3);
    const gguf_str *ss = d;
    for (int i = 0; i < 3; i++) ck_assert(gguf_str_eq(ss[i], STRS[i]));
    ck_assert_ptr_eq(ss, gguf_get_kv(f, "a.str")->strs);
    ck_assert_int_eq(gguf_get_arr(f, "a.empty", &at, &n, &d), GGUF_OK);
    ck_assert_int_eq(at, GGUF_TYPE_FLOAT32); ck_assert_uint_eq(n, 0);
    ck_assert_int_eq(gguf_get_arr(f, "a.nested", &at, &n, &d), GGUF_OK);
    ck_assert_int_eq(at, GGUF_TYPE_ARRAY); ck_assert_uint_eq(n, 2);
    uint32_t inner_type; memcpy(&inner_type, d, 4);
    ck_assert_uint_eq(inner_type, GGUF_TYPE_UINT8);
    ck_assert_int_eq(gguf_get_arr(f, "t.u8", &at, &n, &d), GGUF_ETYPE);
    ck_assert_int_eq(gguf_get_u32(f, "a.i32", &u32), GGUF_ETYPE);
    /* The key after the nested array was found, so it was skipped correctly. */
    ck_assert_int_eq(gguf_get_u32(f, "after.nested", &u32), GGUF_OK); ck_assert_uint_eq(u32, 42);

    /* Tensors. */
    ck_assert_uint_eq(f->data_offset % f->alignment, 0);
    const gguf_tensor *t0 = gguf_find_tensor(f, "t0");
    ck_assert_ptr_nonnull(t0);
    ck_assert_ptr_eq(t0, &f->tensors[0]);
    ck_assert(gguf_str_eq(t0->name, "t0"));
    ck_assert_uint_eq(t0->n_dims, 2);
    ck_assert_int_eq(t0->ne[0], 4); ck_assert_int_eq(t0->ne[1], 3);
    ck_assert_int_eq(t0->ne[2], 1); ck_assert_int_eq(t0->ne[3], 1);
    ck_assert_int_eq(t0->type, GGML_TYPE_F32);
    ck_assert_uint_eq(t0->nbytes, 48);
    ck_assert_ptr_eq(t0->data, f->base + f->data_offset);
    ck_assert_int_eq(memcmp(t0->data, T0, sizeof T0), 0);
    const gguf_tensor *t1 = gguf_find_tensor(f, "blk.0.q8");
    ck_assert_ptr_nonnull(t1);
    ck_assert_int_eq(t1->type, GGML_TYPE_Q8_0);
    ck_assert_uint_eq(t1->nbytes, 68);
    ck_assert_uint_eq(t1->offset % f->alignment, 0);
    ck_assert_ptr_eq(t1->data, f->base + f->data_offset + t1->offset);
    ck_assert_uint_eq(((const uint8_t *)t1->data)[0], 1);
    ck_assert_uint_eq(((const uint8_t *)t1->data)[67], (uint8_t)(67 * 3 + 1));
    ck_assert_ptr_eq((const uint8_t *)t1->data + t1->nbytes, f->base + f->size);
    ck_assert_ptr_null(gguf_find_tensor(f, "blk.0"));
    ck_assert_ptr_null(gguf_find_tensor(f, "t00"));
}

START_TEST(test_roundtrip_v3) {
    gw_buf b = {0};
    build_valid(&b, 3, 0);
    char err[ERRLEN];
    gguf_file *f;
    void *copy;
    ck_assert_msg(open_copy(&f, b.p, b.n, err, &copy) == GGUF_OK, "%s", err);
    check_valid(f, 3, 0);
    ck_assert(!f->mapped);
    gguf_close(f);
    free(copy);
    gw_free(&b);
}
END_TEST

START_TEST(test_roundtrip_v2) {
    gw_buf b = {0};
    build_valid(&b, 2, 0);
    char err[ERRLEN];
    gguf_file *f;
    void *copy;
    ck_assert_msg(open_copy(&f, b.p, b.n, err, &copy) == GGUF_OK, "%s", err);
    check_valid(f, 2, 0);
    gguf_close(f);
    free(copy);
    gw_free(&b);
}
END_TEST

START_TEST(test_alignment) {
    static const uint32_t aligns[] = {1, 8, 64, 256};
    for (size_t i = 0; i < sizeof aligns / sizeof *aligns; i++) {
        gw_buf b = {0};
        build_valid(&b, 3, aligns[i]);
        char err[ERRLEN];
        gguf_file *f;
        void *copy;
        ck_assert_msg(open_copy(&f, b.p, b.n, err, &copy) == GGUF_OK, "align %u: %s", aligns[i], err);
        check_valid(f, 3, aligns[i]);
        gguf_close(f);
        free(copy);
        gw_free(&b);
    }
}
END_TEST

START_TEST(test_no_tensors_no_kv) {
    /* Just a header: valid, empty. */
    gw_buf b = {0};
    gw_header(&b, 3, 0, 0);
    char err[ERRLEN];
    gguf_file *f;
    void *copy;
    ck_assert_msg(open_copy(&f, b.p, b.n, err, &copy) == GGUF_OK, "%s", err);
    ck_assert_uint_eq(f->n_kv, 0);
    ck_assert_uint_eq(f->n_tensors, 0);
    ck_assert_int_eq(gguf_find_key(f, "x"), -1);
    ck_assert_ptr_null(gguf_find_tensor(f, "x"));
    gguf_close(f);
    free(copy);
    gw_free(&b);
}
END_TEST

/* Truncating a valid file at every length must fail cleanly (the last tensor's data runs to the
 * end, so no proper prefix is valid). */
START_TEST(test_truncation_every_byte) {
    gw_buf b = {0};
    build_valid(&b, 3, 64);
    for (size_t n = 0; n < b.n; n++) {
        gw_buf t = {.p = b.p, .n = n, .cap = b.n};
        expect_fail(&t, 0, NULL);
    }
    gw_free(&b);
}
END_TEST

/* Every byte replaced by a few values: parse succeeds or fails, never crashes; on success the
 * result is still self-consistent. */
START_TEST(test_byte_corruption_no_crash) {
    gw_buf b = {0};
    build_valid(&b, 3, 0);
    static const uint8_t vals[] = {0x00, 0x01, 0x7f, 0x80, 0xff};
    uint8_t *m = malloc(b.n);
    int ok = 0, bad = 0;
    for (size_t i = 0; i < b.n; i++) {
        for (size_t v = 0; v < sizeof vals; v++) {
            memcpy(m, b.p, b.n);
            m[i] = vals[v];
            char err[ERRLEN];
            gguf_file *f;
            int rc = gguf_open_mem(&f, m, b.n, err, sizeof err);
            if (rc == GGUF_OK) {
                ok++;
                for (uint64_t k = 0; k < f->n_tensors; k++) {
                    const gguf_tensor *t = &f->tensors[k];
                    ck_assert((const uint8_t *)t->data >= f->base + f->data_offset);
                    ck_assert((const uint8_t *)t->data + t->nbytes <= f->base + f->size);
                }
                gguf_close(f);
            } else {
                bad++;
                ck_assert_ptr_null(f);
                ck_assert(strlen(err) > 6);
            }
        }
    }
    ck_assert(ok > 0 && bad > 0);
    free(m);
    gw_free(&b);
}
END_TEST

START_TEST(test_bad_magic_version) {
    gw_buf b = {0};
    build_valid(&b, 3, 0);
    b.p[0] = 'X';
    expect_fail(&b, GGUF_EFORMAT, "magic");
    b.p[0] = 'G';
    gw_patch_u32(&b, 4, 1);
    expect_fail(&b, GGUF_EUNSUPPORTED, "version 1");
    gw_patch_u32(&b, 4, 4);
    expect_fail(&b, GGUF_EUNSUPPORTED, "version 4");
    gw_patch_u32(&b, 4, 0);
    expect_fail(&b, GGUF_EUNSUPPORTED, "version");
    gw_patch_u32(&b, 4, 0x03000000); /* big-endian v3 */
    expect_fail(&b, GGUF_EUNSUPPORTED, "big-endian");
    gw_free(&b);
    gw_buf e = {0};
    expect_fail(&e, GGUF_EFORMAT, "too short");
}
END_TEST

START_TEST(test_huge_counts) {
    gw_buf b = {0};
    build_valid(&b, 3, 0);
    gw_patch_u64(&b, 16, UINT64_MAX); /* n_kv */
    expect_fail(&b, GGUF_EFORMAT, "metadata entries");
    gw_patch_u64(&b, 16, 1ull << 40);
    expect_fail(&b, GGUF_EFORMAT, "metadata entries");
    gw_patch_u64(&b, 16, 20);
    gw_patch_u64(&b, 8, UINT64_MAX); /* n_tensors */
    expect_fail(&b, GGUF_EFORMAT, "tensors");
    gw_patch_u64(&b, 8, 3); /* one more tensor than written: truncated tensor table */
    expect_fail(&b, GGUF_EFORMAT, NULL);
    gw_free(&b);

    /* Huge string-array count, numeric array count and nested count. */
    static const uint32_t elem[] = {GW_STR, GW_U64, GW_U8, GW_ARR};
    for (size_t i = 0; i < 4; i++) {
        gw_buf c = {0};
        gw_header(&c, 3, 0, 1);
        gw_str(&c, "arr");
        gw_u32(&c, GW_ARR);
        gw_u32(&c, elem[i]);
        gw_u64(&c, i == 2 ? UINT64_MAX / 2 + 1 : UINT64_MAX / 4);
        for (int k = 0; k < 64; k++) gw_u8(&c, 0);
        expect_fail(&c, GGUF_EFORMAT, "arr");
        gw_free(&c);
    }
}
END_TEST

START_TEST(test_huge_string_lengths) {
    static const uint64_t lens[] = {UINT64_MAX, UINT64_MAX - 7, 1ull << 63, 1000};
    for (size_t i = 0; i < 4; i++) {
        /* ... as a key */
        gw_buf b = {0};
        gw_header(&b, 3, 0, 1);
        gw_u64(&b, lens[i]);
        gw_bytes(&b, "key.....", 8);
        gw_u32(&b, GW_U8);
        gw_u8(&b, 1);
        expect_fail(&b, GGUF_EFORMAT, "metadata key");
        gw_free(&b);
        /* ... as a value */
        gw_header(&b, 3, 0, 1);
        gw_str(&b, "k");
        gw_u32(&b, GW_STR);
        gw_u64(&b, lens[i]);
        gw_bytes(&b, "value...", 8);
        expect_fail(&b, GGUF_EFORMAT, "string value");
        gw_free(&b);
        /* ... inside a string array */
        gw_header(&b, 3, 0, 1);
        gw_str(&b, "k");
        gw_u32(&b, GW_ARR);
        gw_u32(&b, GW_STR);
        gw_u64(&b, 2);
        gw_str(&b, "ok");
        gw_u64(&b, lens[i]);
        gw_bytes(&b, "value...", 8);
        expect_fail(&b, GGUF_EFORMAT, "array string");
        gw_free(&b);
        /* ... as a tensor name */
        gw_header(&b, 3, 1, 0);
        gw_u64(&b, lens[i]);
        gw_bytes(&b, "tensor..", 8);
        for (int k = 0; k < 32; k++) gw_u8(&b, 1);
        expect_fail(&b, GGUF_EFORMAT, "tensor name");
        gw_free(&b);
    }
}
END_TEST

/* A file with one tensor described by the arguments, alignment 32, n_data bytes of data. */
static void one_tensor(gw_buf *b, const char *name, uint32_t n_dims, const int64_t *ne, uint32_t type,
                       uint64_t offset, size_t n_data) {
    gw_header(b, 3, 1, 0);
    gw_tensor_info(b, name, n_dims, ne, type, offset);
    gw_pad(b, 32);
    for (size_t i = 0; i < n_data; i++) gw_u8(b, 0);
}

START_TEST(test_bad_tensors) {
    gw_buf b = {0};
    /* A good one first, so the failures below are about the one field changed. */
    one_tensor(&b, "w", 2, (int64_t[]){32, 2}, GGML_TYPE_Q8_0, 0, 68);
    char err[ERRLEN];
    gguf_file *f;
    void *copy;
    ck_assert_msg(open_copy(&f, b.p, b.n, err, &copy) == GGUF_OK, "%s", err);
    gguf_close(f);
    free(copy);
    gw_free(&b);

    static const uint32_t bad_types[] = {4, 5, 16, 29, 39, 40, 99, 0xffffffffu};
    int n_bad = 0;
    for (size_t i = 0; i < sizeof bad_types / sizeof *bad_types; i++) {
        /* Only ids quant does not know (it may list types it cannot compute, e.g. IQ*). */
        if (bad_types[i] < GGML_TYPE_COUNT && ggml_type_get((ggml_type)bad_types[i])) continue;
        n_bad++;
        one_tensor(&b, "w", 1, (int64_t[]){32}, bad_types[i], 0, 256);
        expect_fail(&b, GGUF_EUNSUPPORTED, "unknown ggml type");
        gw_free(&b);
    }
    ck_assert_int_ge(n_bad, 3);
    one_tensor(&b, "blk.0.attn_q.weight", 2, (int64_t[]){32, 2}, GGML_TYPE_Q8_0, 0, 67);
    expect_fail(&b, GGUF_EFORMAT, "tensor 'blk.0.attn_q.weight' data [");
    expect_fail(&b, GGUF_EFORMAT, "past end of file");
    gw_free(&b);
    one_tensor(&b, "w", 1, (int64_t[]){8}, GGML_TYPE_F32, 16, 64); /* misaligned */
    expect_fail(&b, GGUF_EFORMAT, "not a multiple of the alignment");
    gw_free(&b);
    one_tensor(&b, "w", 1, (int64_t[]){8}, GGML_TYPE_F32, 32, 48); /* aligned but past EOF */
    expect_fail(&b, GGUF_EFORMAT, "past end of file");
    gw_free(&b);
    one_tensor(&b, "w", 1, (int64_t[]){8}, GGML_TYPE_F32, UINT64_MAX - 31, 64); /* offset overflow */
    expect_fail(&b, GGUF_EFORMAT, "past end of file");
    gw_free(&b);
    one_tensor(&b, "w", 1, (int64_t[]){33}, GGML_TYPE_Q8_0, 0, 64); /* not a block multiple */
    expect_fail(&b, GGUF_EFORMAT, "block size");
    gw_free(&b);
    one_tensor(&b, "w", 2, (int64_t[]){8, 0}, GGML_TYPE_F32, 0, 64); /* zero dim */
    expect_fail(&b, GGUF_EFORMAT, "dimension 1");
    gw_free(&b);
    one_tensor(&b, "w", 1, (int64_t[]){-8}, GGML_TYPE_F32, 0, 64); /* negative dim */
    expect_fail(&b, GGUF_EFORMAT, "dimension 0");
    gw_free(&b);
    one_tensor(&b, "w", 5, (int64_t[]){1, 1, 1, 1, 1}, GGML_TYPE_F32, 0, 64);
    expect_fail(&b, GGUF_EFORMAT, "n_dims 5");
    gw_free(&b);
    one_tensor(&b, "w", 4, (int64_t[]){1ll << 32, 1ll << 32, 1ll << 32, 1}, GGML_TYPE_F32, 0, 64);
    expect_fail(&b, GGUF_EFORMAT, "overflows");
    gw_free(&b);
    one_tensor(&b, "w", 2, (int64_t[]){1ll << 62, 2}, GGML_TYPE_F32, 0, 64); /* bytes overflow */
    expect_fail(&b, GGUF_EFORMAT, "overflows");
    gw_free(&b);
    one_tensor(&b, "w", 2, (int64_t[]){1ll << 40, 1ll << 20}, GGML_TYPE_F32, 0, 64); /* huge, fits u64 */
    expect_fail(&b, GGUF_EFORMAT, "past end of file");
    gw_free(&b);

    /* Duplicate tensor names. */
    gw_header(&b, 3, 2, 0);
    gw_tensor_info(&b, "w", 1, (int64_t[]){8}, GGML_TYPE_F32, 0);
    gw_tensor_info(&b, "w", 1, (int64_t[]){8}, GGML_TYPE_F32, 32);
    gw_pad(&b, 32);
    for (int i = 0; i < 64; i++) gw_u8(&b, 0);
    expect_fail(&b, GGUF_EFORMAT, "duplicate tensor name 'w'");
    gw_free(&b);
}
END_TEST

START_TEST(test_bad_metadata) {
    gw_buf b = {0};
    /* Duplicate key. */
    gw_header(&b, 3, 0, 3);
    gw_kv_u32(&b, "a", 1);
    gw_kv_u32(&b, "b", 2);
    gw_kv_str(&b, "a", "x");
    expect_fail(&b, GGUF_EFORMAT, "duplicate metadata key 'a'");
    gw_free(&b);
    /* Bad value type and bad array element type. */
    gw_header(&b, 3, 0, 1);
    gw_kv_raw(&b, "k", 13, "\0\0\0\0", 4);
    expect_fail(&b, GGUF_EFORMAT, "bad value type 13");
    gw_free(&b);
    gw_header(&b, 3, 0, 1);
    gw_kv_arr(&b, "k", 77, 1, "\0\0\0\0", 4);
    expect_fail(&b, GGUF_EFORMAT, "bad array element type 77");
    gw_free(&b);
    /* Bool that is neither 0 nor 1, as a scalar and in an array. */
    gw_header(&b, 3, 0, 1);
    gw_kv_raw(&b, "k", GW_BOOL, "\x02", 1);
    expect_fail(&b, GGUF_EFORMAT, "bool");
    gw_free(&b);
    gw_header(&b, 3, 0, 1);
    gw_kv_arr(&b, "k", GW_BOOL, 3, "\x01\x00\x05", 1);
    expect_fail(&b, GGUF_EFORMAT, "bool");
    gw_free(&b);
    /* Nested arrays: bad inner type; deeper than the limit. */
    gw_header(&b, 3, 0, 1);
    gw_str(&b, "k"); gw_u32(&b, GW_ARR); gw_u32(&b, GW_ARR); gw_u64(&b, 1);
    gw_u32(&b, 200); gw_u64(&b, 0);
    expect_fail(&b, GGUF_EFORMAT, "nested array has bad element type");
    gw_free(&b);
    gw_header(&b, 3, 0, 1);
    gw_str(&b, "k"); gw_u32(&b, GW_ARR);
    for (int d = 0; d < 20; d++) { gw_u32(&b, GW_ARR); gw_u64(&b, 1); }
    gw_u32(&b, GW_U8); gw_u64(&b, 0);
    expect_fail(&b, GGUF_EUNSUPPORTED, "nested deeper");
    gw_free(&b);
}
END_TEST

START_TEST(test_bad_alignment) {
    static const uint32_t bad[] = {0, 3, 48, 0x80000001u};
    for (size_t i = 0; i < 4; i++) {
        gw_buf b = {0};
        gw_header(&b, 3, 0, 1);
        gw_kv_u32(&b, "general.alignment", bad[i]);
        expect_fail(&b, GGUF_EFORMAT, "power of two");
        gw_free(&b);
    }
    gw_buf b = {0};
    gw_header(&b, 3, 0, 1);
    gw_kv_str(&b, "general.alignment", "32");
    expect_fail(&b, GGUF_EFORMAT, "general.alignment must be");
    gw_free(&b);
    gw_header(&b, 3, 0, 1);
    gw_kv_i32(&b, "general.alignment", -32);
    expect_fail(&b, GGUF_EFORMAT, "general.alignment must be");
    gw_free(&b);
    /* Huge power of two: the data section start lands past EOF. */
    gw_header(&b, 3, 1, 1);
    gw_kv_u32(&b, "general.alignment", 1u << 31);
    gw_tensor_info(&b, "w", 1, (int64_t[]){8}, GGML_TYPE_F32, 0);
    for (int i = 0; i < 64; i++) gw_u8(&b, 0);
    expect_fail(&b, GGUF_EFORMAT, "data section");
    gw_free(&b);
    /* Data written at 32 but the file says 64: the tensor offset 32 is misaligned. */
    gw_header(&b, 3, 2, 1);
    gw_kv_u32(&b, "general.alignment", 64);
    gw_tensor_info(&b, "a", 1, (int64_t[]){8}, GGML_TYPE_F32, 0);
    gw_tensor_info(&b, "b", 1, (int64_t[]){8}, GGML_TYPE_F32, 32);
    gw_pad(&b, 64);
    for (int i = 0; i < 64; i++) gw_u8(&b, 0);
    expect_fail(&b, GGUF_EFORMAT, "tensor 'b': data offset 32 is not a multiple of the alignment 64");
    gw_free(&b);
}
END_TEST

START_TEST(test_open_file) {
    gw_buf b = {0};
    build_valid(&b, 3, 0);
    char path[] = "/tmp/test_gguf_XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, b.p, b.n), (ssize_t)b.n);
    close(fd);
    char err[ERRLEN];
    gguf_file *f;
    ck_assert_msg(gguf_open(&f, path, err, sizeof err) == GGUF_OK, "%s", err);
    ck_assert(f->mapped);
    ck_assert_uint_eq(f->size, b.n);
    check_valid(f, 3, 0);
    gguf_close(f);
    /* A truncated file on disk: error names the path. */
    ck_assert_int_eq(truncate(path, (off_t)b.n - 1), 0);
    ck_assert_int_lt(gguf_open(&f, path, err, sizeof err), 0);
    ck_assert_ptr_null(f);
    ck_assert_msg(strstr(err, path) && strstr(err, "past end of file"), "%s", err);
    unlink(path);
    gw_free(&b);

    ck_assert_int_eq(gguf_open(&f, "/nonexistent/x.gguf", err, sizeof err), GGUF_EIO);
    ck_assert_ptr_null(f);
    ck_assert_msg(strstr(err, "/nonexistent/x.gguf"), "%s", err);
    ck_assert_int_eq(gguf_open(&f, "/tmp", err, sizeof err), GGUF_EIO);
    /* Tiny error buffers are respected (no overflow under ASan). */
    char tiny[8];
    ck_assert_int_eq(gguf_open(&f, "/nonexistent/x.gguf", tiny, sizeof tiny), GGUF_EIO);
    ck_assert_uint_eq(strlen(tiny), 7);
    ck_assert_int_eq(gguf_open(&f, "/nonexistent/x.gguf", NULL, 0), GGUF_EIO);
    gguf_close(NULL);
}
END_TEST

START_TEST(test_type_names) {
    ck_assert_str_eq(gguf_type_name(GGUF_TYPE_UINT8), "u8");
    ck_assert_str_eq(gguf_type_name(GGUF_TYPE_STRING), "str");
    ck_assert_str_eq(gguf_type_name(GGUF_TYPE_ARRAY), "arr");
    ck_assert_str_eq(gguf_type_name(GGUF_TYPE_FLOAT64), "f64");
    ck_assert_str_eq(gguf_type_name(GGUF_TYPE_COUNT), "unknown");
    ck_assert_str_eq(gguf_type_name((gguf_type)-1), "unknown");
}
END_TEST

static const char *model_path(void) {
    const char *p = getenv("PCACHE_MODEL");
    return p && *p ? p : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

START_TEST(test_real_model) {
    const char *path = model_path();
    if (access(path, R_OK) != 0) {
        fprintf(stderr, "test_real_model: %s not present, skipped\n", path);
        return;
    }
    char err[ERRLEN];
    gguf_file *f;
    ck_assert_msg(gguf_open(&f, path, err, sizeof err) == GGUF_OK, "%s", err);
    ck_assert_uint_eq(f->version, 3);
    ck_assert_uint_eq(f->n_tensors, 272);
    uint32_t u;
    ck_assert_int_eq(gguf_get_u32(f, "llama.block_count", &u), GGUF_OK);
    ck_assert_uint_eq(u, 30);
    ck_assert_int_eq(gguf_get_u32(f, "llama.embedding_length", &u), GGUF_OK);
    ck_assert_uint_eq(u, 576);
    gguf_str s;
    ck_assert_int_eq(gguf_get_str(f, "general.architecture", &s), GGUF_OK);
    ck_assert(gguf_str_eq(s, "llama"));
    gguf_type at; uint64_t n; const void *d;
    ck_assert_int_eq(gguf_get_arr(f, "tokenizer.ggml.tokens", &at, &n, &d), GGUF_OK);
    ck_assert_int_eq(at, GGUF_TYPE_STRING);
    ck_assert_uint_eq(n, 49152);
    const gguf_tensor *t = gguf_find_tensor(f, "token_embd.weight");
    ck_assert_ptr_nonnull(t);
    ck_assert_int_eq(t->type, GGML_TYPE_Q8_0);
    ck_assert_uint_eq(t->n_dims, 2);
    ck_assert_int_eq(t->ne[0], 576);
    ck_assert_int_eq(t->ne[1], 49152);
    ck_assert_uint_eq(t->nbytes, (size_t)576 / 32 * 34 * 49152);
    t = gguf_find_tensor(f, "blk.29.attn_q.weight");
    ck_assert_ptr_nonnull(t);
    ck_assert_int_eq(t->type, GGML_TYPE_Q4_1);
    t = gguf_find_tensor(f, "output_norm.weight");
    ck_assert_ptr_nonnull(t);
    ck_assert_int_eq(t->type, GGML_TYPE_F32);
    /* Every tensor lies inside the data section, and they do not overlap. */
    size_t total = 0;
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        t = &f->tensors[i];
        ck_assert((const uint8_t *)t->data + t->nbytes <= f->base + f->size);
        total += t->nbytes;
    }
    ck_assert_uint_le(total, f->size - f->data_offset);
    gguf_close(f);
}
END_TEST

int main(void) {
    Suite *s = suite_create("gguf");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_roundtrip_v3);
    tcase_add_test(tc, test_roundtrip_v2);
    tcase_add_test(tc, test_alignment);
    tcase_add_test(tc, test_no_tensors_no_kv);
    tcase_add_test(tc, test_truncation_every_byte);
    tcase_add_test(tc, test_byte_corruption_no_crash);
    tcase_add_test(tc, test_bad_magic_version);
    tcase_add_test(tc, test_huge_counts);
    tcase_add_test(tc, test_huge_string_lengths);
    tcase_add_test(tc, test_bad_tensors);
    tcase_add_test(tc, test_bad_metadata);
    tcase_add_test(tc, test_bad_alignment);
    tcase_add_test(tc, test_open_file);
    tcase_add_test(tc, test_type_names);
    tcase_add_test(tc, test_real_model);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
