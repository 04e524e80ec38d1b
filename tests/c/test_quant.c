/* Tests for src/quant.c: the type table, fp16/bf16 conversions (exhaustive where cheap, and
 * checked against the F16C hardware path), dequantization of hand-built blocks, activation
 * quantization (round trip, rounding mode, SIMD == scalar bytes), and every dot kernel:
 * SIMD vs scalar reference, scalar reference vs a double-precision dot of dequantized rows,
 * and vec_dot_n bit-identical to vec_dot. (Dequantization vs the PyPI gguf package lives in
 * tests/py/test_dequant.py.) */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quant.h"

static uint32_t bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Weight types we dot, and row lengths to try (the model's 576 and 1536 among them). */
static const ggml_type DOT_TYPES[] = {GGML_TYPE_F32,  GGML_TYPE_F16,  GGML_TYPE_BF16, GGML_TYPE_Q4_0,
                                      GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_Q8_0,
                                      GGML_TYPE_Q4_K, GGML_TYPE_Q6_K};
#define N_DOT_TYPES (int)(sizeof DOT_TYPES / sizeof DOT_TYPES[0])
static const int64_t LENS[] = {256, 512, 576, 1536, 4096};
#define N_LENS (int)(sizeof LENS / sizeof LENS[0])

static void *xmalloc(size_t n) {
    void *p = aligned_alloc(64, (n + 63) / 64 * 64);
    ck_assert_ptr_nonnull(p);
    return p;
}

/* ---- type table ---- */

START_TEST(test_type_table) {
    static const struct { ggml_type t; const char *name; int bs; size_t ts; bool sup; } want[] = {
        {GGML_TYPE_F32, "F32", 1, 4, true},       {GGML_TYPE_F16, "F16", 1, 2, true},
        {GGML_TYPE_BF16, "BF16", 1, 2, true},     {GGML_TYPE_Q4_0, "Q4_0", 32, 18, true},
        {GGML_TYPE_Q4_1, "Q4_1", 32, 20, true},   {GGML_TYPE_Q5_0, "Q5_0", 32, 22, true},
        {GGML_TYPE_Q5_1, "Q5_1", 32, 24, true},   {GGML_TYPE_Q8_0, "Q8_0", 32, 34, true},
        {GGML_TYPE_Q8_1, "Q8_1", 32, 36, false},  {GGML_TYPE_Q2_K, "Q2_K", 256, 84, false},
        {GGML_TYPE_Q3_K, "Q3_K", 256, 110, false}, {GGML_TYPE_Q4_K, "Q4_K", 256, 144, true},
        {GGML_TYPE_Q5_K, "Q5_K", 256, 176, false}, {GGML_TYPE_Q6_K, "Q6_K", 256, 210, true},
        {GGML_TYPE_Q8_K, "Q8_K", 256, 292, false},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        const ggml_type_info *ti = ggml_type_get(want[i].t);
        ck_assert_ptr_nonnull(ti);
        ck_assert_str_eq(ti->name, want[i].name);
        ck_assert_int_eq(ti->block_size, want[i].bs);
        ck_assert_uint_eq(ti->type_size, want[i].ts);
        ck_assert_int_eq(ti->supported, want[i].sup);
        ck_assert_int_eq(ggml_type_from_name(want[i].name), want[i].t);
        ck_assert_uint_eq(ggml_row_size(want[i].t, 2 * 256), 2 * 256 / want[i].bs * want[i].ts);
    }
    ck_assert_int_eq(ggml_type_from_name("q4_1"), GGML_TYPE_Q4_1);
    ck_assert_int_eq(ggml_type_from_name("Q9_9"), GGML_TYPE_COUNT);
    ck_assert_int_eq(ggml_type_from_name(NULL), GGML_TYPE_COUNT);
    ck_assert_ptr_null(ggml_type_get((ggml_type)4)); /* removed Q4_2 */
    ck_assert_ptr_null(ggml_type_get((ggml_type)-1));
    ck_assert_ptr_null(ggml_type_get(GGML_TYPE_COUNT));
    ck_assert_ptr_null(ggml_type_get((ggml_type)1000));
    ck_assert_uint_eq(ggml_row_size(GGML_TYPE_Q4_0, 33), 0);
    ck_assert_uint_eq(ggml_row_size(GGML_TYPE_Q4_K, 32), 0);
    ck_assert_uint_eq(ggml_row_size(GGML_TYPE_F32, -4), 0);
    ck_assert_uint_eq(ggml_row_size((ggml_type)4, 32), 0);
    ck_assert_uint_eq(ggml_row_size(GGML_TYPE_F16, 7), 14);
    /* vec_dot partner types as in ggml-cpu */
    ck_assert_int_eq(quant_vec_dot_type(GGML_TYPE_Q4_0), GGML_TYPE_Q8_0);
    ck_assert_int_eq(quant_vec_dot_type(GGML_TYPE_Q8_0), GGML_TYPE_Q8_0);
    ck_assert_int_eq(quant_vec_dot_type(GGML_TYPE_Q5_0), GGML_TYPE_Q8_0);
    ck_assert_int_eq(quant_vec_dot_type(GGML_TYPE_Q4_1), GGML_TYPE_Q8_1);
    ck_assert_int_eq(quant_vec_dot_type(GGML_TYPE_Q5_1), GGML_TYPE_Q8_1);
    ck_assert_int_eq(quant_vec_dot_type(GGML_TYPE_Q4_K), GGML_TYPE_Q8_K);
    ck_assert_int_eq(quant_vec_dot_type(GGML_TYPE_Q6_K), GGML_TYPE_Q8_K);
    ck_assert_int_eq(quant_vec_dot_type(GGML_TYPE_F16), GGML_TYPE_F32);
    ck_assert_int_eq(quant_vec_dot_type(GGML_TYPE_BF16), GGML_TYPE_F32);
    ck_assert_int_eq(quant_vec_dot_type(GGML_TYPE_F32), GGML_TYPE_F32);
    ck_assert_uint_eq(ggml_row_size(quant_vec_dot_type(GGML_TYPE_Q2_K), 256), 0);
}
END_TEST

/* ---- fp16 / bf16 ---- */

START_TEST(test_fp16_known_values) {
    static const struct { float f; uint16_t h; } cases[] = {
        {0.0f, 0x0000},          {-0.0f, 0x8000},         {1.0f, 0x3c00},          {-2.0f, 0xc000},
        {0.5f, 0x3800},          {65504.0f, 0x7bff},      {0x1p-14f, 0x0400},      {0x1p-24f, 0x0001},
        {0x3ffp-24f, 0x03ff},    {-0x1p-24f, 0x8001},     {INFINITY, 0x7c00},      {-INFINITY, 0xfc00},
        {0.333251953125f, 0x3555},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ck_assert_uint_eq(fp32_to_fp16(cases[i].f), cases[i].h);
        ck_assert_uint_eq(fp32_to_fp16_ref(cases[i].f), cases[i].h);
        ck_assert_uint_eq(bits(fp16_to_fp32(cases[i].h)), bits(cases[i].f));
        ck_assert_uint_eq(bits(fp16_to_fp32_ref(cases[i].h)), bits(cases[i].f));
    }
    /* rounding: nearest, ties to even */
    static const struct { float f; uint16_t h; } rnd[] = {
        {1.0f + 0x1p-11f, 0x3c00},             /* tie between 0x3c00 and 0x3c01 -> even */
        {1.0f + 3 * 0x1p-11f, 0x3c02},         /* tie between 0x3c01 and 0x3c02 -> even */
        {1.0f + 0x1p-11f + 0x1p-20f, 0x3c01},  /* just above the tie */
        {65519.0f, 0x7bff},                    /* below the halfway point to 65536 */
        {65520.0f, 0x7c00},                    /* tie with "65536" rounds to inf */
        {1e6f, 0x7c00},
        {0x1p-25f, 0x0000},                    /* tie between 0 and the smallest subnormal */
        {0x1.8p-25f, 0x0001},
        {0x1p-26f, 0x0000},
        {3 * 0x1p-25f, 0x0002},                /* 1.5 ulp subnormal tie -> even (2) */
        {5 * 0x1p-25f, 0x0002},                /* 2.5 ulp -> 2 */
        {0x3ffp-24f + 0x1p-25f, 0x0400},       /* largest subnormal + half ulp -> tie -> even (normal) */
        {0x1p-14f - 0x1p-30f, 0x0400},
        {1e-10f, 0x0000},
        {-1e-10f, 0x8000},
    };
    for (size_t i = 0; i < sizeof rnd / sizeof rnd[0]; i++) {
        ck_assert_msg(fp32_to_fp16_ref(rnd[i].f) == rnd[i].h, "ref %a -> %04x, want %04x", (double)rnd[i].f,
                      fp32_to_fp16_ref(rnd[i].f), rnd[i].h);
        ck_assert_msg(fp32_to_fp16(rnd[i].f) == rnd[i].h, "%a -> %04x, want %04x", (double)rnd[i].f,
                      fp32_to_fp16(rnd[i].f), rnd[i].h);
    }
    /* NaN stays NaN (with sign), both ways */
    uint16_t hn = fp32_to_fp16_ref(NAN);
    ck_assert_uint_eq(hn & 0x7c00, 0x7c00);
    ck_assert_uint_ne(hn & 0x03ff, 0);
    ck_assert_uint_eq(fp32_to_fp16_ref(from_bits(0xff800001u)) & 0xfc00, 0xfc00); /* signalling, payload in low bits */
    ck_assert_uint_ne(fp32_to_fp16_ref(from_bits(0xff800001u)) & 0x03ff, 0);
    ck_assert(isnan(fp16_to_fp32_ref(0x7e00)) && isnan(fp16_to_fp32_ref(0xfc01)));
}
END_TEST

/* All 65536 halves: the public (F16C when compiled in) and portable paths agree bit for bit,
 * and every non-NaN half survives a round trip through fp32. */
START_TEST(test_fp16_exhaustive) {
    for (uint32_t h = 0; h < 0x10000; h++) {
        const float a = fp16_to_fp32((uint16_t)h), b = fp16_to_fp32_ref((uint16_t)h);
        ck_assert_msg(bits(a) == bits(b), "fp16_to_fp32(%04x): %08x vs ref %08x", h, bits(a), bits(b));
        const bool nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
        if (!nan) {
            ck_assert_uint_eq(fp32_to_fp16_ref(b), h);
            ck_assert_uint_eq(fp32_to_fp16(b), h);
        } else {
            ck_assert(isnan(b));
            ck_assert_uint_eq(fp32_to_fp16_ref(b), fp32_to_fp16(b));
        }
    }
}
END_TEST

/* fp32 -> fp16 over a dense stride of all 2^32 patterns (plus every pattern near the subnormal,
 * normal and overflow boundaries): portable == public, and the result is the nearest half. */
START_TEST(test_fp32_to_fp16_sweep) {
    uint64_t checked = 0;
    for (uint64_t u = 0; u <= 0xffffffffull; u += 4099) {
        const float f = from_bits((uint32_t)u);
        const uint16_t a = fp32_to_fp16(f), b = fp32_to_fp16_ref(f);
        ck_assert_msg(a == b, "fp32_to_fp16(%08x): %04x vs ref %04x", (uint32_t)u, a, b);
        checked++;
    }
    static const uint32_t centers[] = {0x33000000u, 0x33800000u, 0x38800000u, 0x477fe000u, 0x47800000u,
                                       0x7f800000u, 0x3f800000u};
    for (size_t c = 0; c < sizeof centers / sizeof centers[0]; c++)
        for (int32_t d = -20000; d <= 20000; d++)
            for (uint32_t s = 0; s < 2; s++) {
                const uint32_t u = (centers[c] + (uint32_t)d) | (s << 31);
                const float f = from_bits(u);
                const uint16_t a = fp32_to_fp16(f), b = fp32_to_fp16_ref(f);
                ck_assert_msg(a == b, "fp32_to_fp16(%08x): %04x vs ref %04x", u, a, b);
                if (!isnan(f) && fabsf(f) < 65504.0f) { /* nearest: no half is strictly closer */
                    const double err = fabs((double)fp16_to_fp32(b) - (double)f);
                    const double lo = fp16_to_fp32((uint16_t)(b - 1)), hi = fp16_to_fp32((uint16_t)(b + 1));
                    if ((b & 0x7fff) != 0) ck_assert(fabs(lo - (double)f) >= err);
                    if ((b & 0x7fff) < 0x7bff) ck_assert(fabs(hi - (double)f) >= err);
                }
                checked++;
            }
    ck_assert_uint_gt(checked, 1000000);
}
END_TEST

START_TEST(test_bf16) {
    ck_assert_uint_eq(fp32_to_bf16(1.0f), 0x3f80);
    ck_assert_uint_eq(fp32_to_bf16(-2.0f), 0xc000);
    ck_assert_uint_eq(fp32_to_bf16(from_bits(0x3f808000u)), 0x3f80); /* tie -> even */
    ck_assert_uint_eq(fp32_to_bf16(from_bits(0x3f818000u)), 0x3f82); /* tie -> even (up) */
    ck_assert_uint_eq(fp32_to_bf16(from_bits(0x3f808001u)), 0x3f81);
    ck_assert_uint_eq(fp32_to_bf16(INFINITY), 0x7f80);
    ck_assert(isnan(bf16_to_fp32(fp32_to_bf16(NAN))));
    ck_assert(isnan(bf16_to_fp32(fp32_to_bf16(from_bits(0x7f800001u))))); /* would truncate to inf */
    for (uint32_t h = 0; h < 0x10000; h++) {
        const float f = bf16_to_fp32((uint16_t)h);
        ck_assert_uint_eq(bits(f), h << 16);
        if (!isnan(f)) ck_assert_uint_eq(fp32_to_bf16(f), h);
    }
}
END_TEST

/* ---- dequantization of hand-built blocks ---- */

START_TEST(test_dequant_q4_0_q4_1_q8_0) {
    float y[32];
    uint8_t b[36];
    /* Q4_0: d = 0.5, qs[j] = lo j%16, hi 15 - j%16 */
    memset(b, 0, sizeof b);
    b[0] = 0x00; b[1] = 0x38; /* 0.5 */
    for (int j = 0; j < 16; j++) b[2 + j] = (uint8_t)(j | ((15 - j) << 4));
    dequantize_row(GGML_TYPE_Q4_0, b, y, 32);
    for (int j = 0; j < 16; j++) {
        ck_assert_float_eq(y[j], (float)(j - 8) * 0.5f);
        ck_assert_float_eq(y[j + 16], (float)(15 - j - 8) * 0.5f);
    }
    /* Q4_1: d = 2, m = -1 */
    b[0] = 0x00; b[1] = 0x40; b[2] = 0x00; b[3] = 0xbc;
    for (int j = 0; j < 16; j++) b[4 + j] = (uint8_t)(j | ((15 - j) << 4));
    dequantize_row(GGML_TYPE_Q4_1, b, y, 32);
    for (int j = 0; j < 16; j++) {
        ck_assert_float_eq(y[j], (float)j * 2.0f - 1.0f);
        ck_assert_float_eq(y[j + 16], (float)(15 - j) * 2.0f - 1.0f);
    }
    /* Q8_0: d = 0.25 */
    b[0] = 0x00; b[1] = 0x34;
    for (int j = 0; j < 32; j++) b[2 + j] = (uint8_t)(int8_t)(j * 8 - 128);
    dequantize_row(GGML_TYPE_Q8_0, b, y, 32);
    for (int j = 0; j < 32; j++) ck_assert_float_eq(y[j], (float)(j * 8 - 128) * 0.25f);
    /* Q5_0: d = 1, all low nibbles 3, high bits set for odd elements */
    b[0] = 0x00; b[1] = 0x3c;
    const uint32_t qh = 0xaaaaaaaau;
    memcpy(b + 2, &qh, 4);
    for (int j = 0; j < 16; j++) b[6 + j] = 0x33;
    dequantize_row(GGML_TYPE_Q5_0, b, y, 32);
    for (int j = 0; j < 32; j++) ck_assert_float_eq(y[j], (float)((3 | ((j & 1) << 4)) - 16));
}
END_TEST

/* Q4_K: the 12 scale bytes pack eight 6-bit scales and mins; check every sub-block's scale and
 * min lands where ggml's get_scale_min_k4 says, including the split j >= 4 encoding. */
START_TEST(test_dequant_q4_K_scales) {
    uint8_t b[144];
    memset(b, 0, sizeof b);
    b[0] = 0x00; b[1] = 0x3c; /* d = 1 */
    b[2] = 0x00; b[3] = 0x38; /* dmin = 0.5 */
    const int sc[8] = {1, 2, 3, 63, 17, 40, 33, 62}, mn[8] = {5, 0, 63, 7, 48, 3, 21, 60};
    uint8_t *s = b + 4;
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)(sc[j] | ((sc[j + 4] >> 4) << 6));
        s[j + 4] = (uint8_t)(mn[j] | ((mn[j + 4] >> 4) << 6));
        s[j + 8] = (uint8_t)((sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4));
    }
    for (int j = 0; j < 128; j++) b[16 + j] = 0x52; /* low nibble 2, high nibble 5 */
    float y[256];
    dequantize_row(GGML_TYPE_Q4_K, b, y, 256);
    for (int e = 0; e < 256; e++) {
        const int sub = e / 32, q = (sub % 2 == 0) ? 2 : 5;
        ck_assert_msg(y[e] == (float)(sc[sub] * q) - 0.5f * (float)mn[sub], "element %d: %g", e, (double)y[e]);
    }
}
END_TEST

/* Q6_K: element e uses scale e/16 and 6-bit quant split over ql/qh as in ggml. */
START_TEST(test_dequant_q6_K_layout) {
    uint8_t b[210];
    memset(b, 0, sizeof b);
    int8_t want_q[256];
    for (int e = 0; e < 256; e++) want_q[e] = (int8_t)((e * 7 + 3) % 64 - 32);
    for (int e = 0; e < 256; e++) {
        const int half = e / 128, r = e % 128, l = r % 32, part = r / 32;
        const int u = want_q[e] + 32;
        uint8_t *ql = b + 64 * half, *qh = b + 128 + 32 * half;
        const int qli = l + (part & 1) * 32;
        if (part < 2) ql[qli] |= (uint8_t)(u & 0xF);
        else ql[qli] |= (uint8_t)((u & 0xF) << 4);
        qh[l] |= (uint8_t)((u >> 4) << (2 * part));
    }
    for (int g = 0; g < 16; g++) b[192 + g] = (uint8_t)(int8_t)(g * 9 - 70);
    b[208] = 0x00; b[209] = 0x38; /* d = 0.5 */
    float y[256];
    dequantize_row(GGML_TYPE_Q6_K, b, y, 256);
    for (int e = 0; e < 256; e++)
        ck_assert_msg(y[e] == 0.5f * (float)((e / 16) * 9 - 70) * (float)want_q[e], "element %d", e);
}
END_TEST

START_TEST(test_bad_input) {
    float y[64];
    uint8_t b[64] = {0};
    dequantize_row(GGML_TYPE_Q4_0, b, y, 31);
    for (int i = 0; i < 31; i++) ck_assert(isnan(y[i]));
    dequantize_row(GGML_TYPE_Q2_K, b, y, 64); /* known but unsupported: never reads 256 elements */
    ck_assert(isnan(y[0]));
    dequantize_row((ggml_type)4, b, y, 32);
    ck_assert(isnan(y[0]));
    dequantize_row(GGML_TYPE_Q4_0, b, y, 0);
    ck_assert(isnan(vec_dot(GGML_TYPE_Q4_0, b, b, 31)));
    ck_assert(isnan(vec_dot_ref(GGML_TYPE_Q4_0, b, b, 31)));
    ck_assert(isnan(vec_dot(GGML_TYPE_Q2_K, b, b, 256)));
    ck_assert(isnan(vec_dot((ggml_type)99, b, b, 32)));
    ck_assert(isnan(vec_dot(GGML_TYPE_F32, NULL, b, 4)));
    float out[3] = {0, 0, 0};
    vec_dot_n(GGML_TYPE_Q8_0, b, 34, 3, b, out, 33);
    ck_assert(isnan(out[0]) && isnan(out[2]));
    vec_dot_n(GGML_TYPE_Q8_0, b, 34, 0, b, out, 32); /* nothing to do */
    ck_assert_int_eq(quant_fill_random(GGML_TYPE_Q4_0, b, 33, 1), -1);
    /* quantize_row_act with a non-activation type must not write past the row */
    quantize_row_act(GGML_TYPE_Q4_0, y, b, 32);
    quantize_row_act(GGML_TYPE_Q8_0, y, b, 31);
}
END_TEST

/* ---- activation quantization ---- */

static void random_floats(float *x, int64_t n, uint64_t seed, float scale) {
    quant_fill_random(GGML_TYPE_F32, x, n, seed);
    for (int64_t i = 0; i < n; i++) x[i] *= scale;
}

START_TEST(test_quantize_act_round_trip) {
    const ggml_type vdts[] = {GGML_TYPE_Q8_0, GGML_TYPE_Q8_1, GGML_TYPE_Q8_K, GGML_TYPE_F32};
    const int64_t n = 1536;
    float *x = xmalloc(n * sizeof(float)), *y = xmalloc(n * sizeof(float));
    uint8_t *q = xmalloc(ggml_row_size(GGML_TYPE_F32, n));
    for (int seed = 1; seed <= 20; seed++) {
        random_floats(x, n, (uint64_t)seed, seed % 2 ? 3.0f : 1e-3f);
        if (seed == 3) x[17] = -1000.0f; /* an outlier */
        if (seed == 4) memset(x, 0, 256 * sizeof(float)); /* an all-zero block */
        for (int v = 0; v < 4; v++) {
            const ggml_type vdt = vdts[v];
            const int bs = ggml_type_get(vdt)->block_size;
            quantize_row_act(vdt, x, q, n);
            dequantize_row(vdt, q, y, n);
            for (int64_t b0 = 0; b0 < n; b0 += (bs > 1 ? bs : 32)) {
                const int len = bs > 1 ? bs : 32;
                float amax = 0;
                for (int j = 0; j < len; j++) amax = fmaxf(amax, fabsf(x[b0 + j]));
                /* error per element <= half a step, plus 127 times the fp16 rounding error of d
                 * for Q8_0/Q8_1 (large when d is an fp16 subnormal) */
                const float step = amax / 127.0f;
                float tol = 0.0f;
                if (vdt == GGML_TYPE_Q8_K) tol = 0.5001f * step;
                if (vdt == GGML_TYPE_Q8_0 || vdt == GGML_TYPE_Q8_1) {
                    uint16_t d16;
                    memcpy(&d16, q + (b0 / 32) * ggml_type_get(vdt)->type_size, 2);
                    tol = 0.5001f * step + 127.5f * fabsf(step - fp16_to_fp32(d16));
                }
                for (int j = 0; j < len; j++)
                    ck_assert_msg(fabsf(y[b0 + j] - x[b0 + j]) <= tol, "%s seed %d elem %ld: %g vs %g",
                                  ggml_type_get(vdt)->name, seed, (long)(b0 + j), (double)y[b0 + j], (double)x[b0 + j]);
                if (amax == 0.0f)
                    for (int j = 0; j < len; j++) ck_assert_float_eq(y[b0 + j], 0.0f);
            }
            if (vdt == GGML_TYPE_Q8_1) { /* s = d * sum(q), d before its rounding to fp16 */
                for (int64_t b = 0; b < n / 32; b++) {
                    float amax = 0;
                    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[b * 32 + j]));
                    const uint8_t *blk = q + 36 * b;
                    uint16_t d16, s16;
                    memcpy(&d16, blk, 2);
                    memcpy(&s16, blk + 2, 2);
                    int sum = 0;
                    for (int j = 0; j < 32; j++) sum += (int8_t)blk[4 + j];
                    const float want = (float)sum * fp16_to_fp32(d16);
                    const float dd = fabsf(amax / 127.0f - fp16_to_fp32(d16)) * (float)abs(sum);
                    ck_assert_msg(fabsf(fp16_to_fp32(s16) - want) <= 1e-3f * fabsf(want) + dd + 1e-7f, "s %g vs %g",
                                  (double)fp16_to_fp32(s16), (double)want);
                }
            }
            if (vdt == GGML_TYPE_Q8_K) { /* bsums, and the max-|x| element maps to exactly -127 */
                for (int64_t b = 0; b < n / 256; b++) {
                    const uint8_t *blk = q + 292 * b;
                    const int8_t *qs = (const int8_t *)(blk + 4);
                    int16_t bs16[16];
                    memcpy(bs16, blk + 260, sizeof bs16);
                    int imax = 0;
                    for (int j = 0; j < 256; j++) if (fabsf(x[b * 256 + j]) > fabsf(x[b * 256 + imax])) imax = j;
                    if (x[b * 256 + imax] != 0.0f) ck_assert_int_eq(qs[imax], -127);
                    for (int g = 0; g < 16; g++) {
                        int sum = 0;
                        for (int l = 0; l < 16; l++) sum += qs[16 * g + l];
                        ck_assert_int_eq(bs16[g], sum);
                    }
                }
            }
        }
    }
    free(x); free(y); free(q);
}
END_TEST

/* Rounding is nearest-even and the SIMD and scalar quantizers write identical bytes. */
START_TEST(test_quantize_act_simd_equals_ref) {
    const ggml_type vdts[] = {GGML_TYPE_Q8_0, GGML_TYPE_Q8_1, GGML_TYPE_Q8_K};
    float x[256];
    /* amax 127 -> d = 1, so x*id is x: exact ties */
    for (int j = 0; j < 256; j++) x[j] = (float)((j % 9) - 4) + 0.5f;
    x[0] = 127.0f;
    x[32] = 127.0f;
    uint8_t a[300], b[300];
    quantize_row_act(GGML_TYPE_Q8_0, x, a, 64);
    for (int j = 1; j < 32; j++) ck_assert_int_eq((int8_t)a[2 + j], (int)nearbyint(x[j])); /* even */
    ck_assert_int_eq((int8_t)a[2 + 1], -2); /* -2.5 -> -2 */
    ck_assert_int_eq((int8_t)a[2 + 2], -2); /* -1.5 -> -2 */
    ck_assert_int_eq((int8_t)a[2 + 4], 0);  /* 0.5 -> 0 */
    ck_assert_int_eq((int8_t)a[2 + 5], 2);  /* 1.5 -> 2 */
    ck_assert_int_eq((int8_t)a[2 + 6], 2);  /* 2.5 -> 2 */
    ck_assert_int_eq((int8_t)a[2 + 7], 4);  /* 3.5 -> 4 */
    ck_assert_int_eq((int8_t)a[2 + 8], 4);  /* 4.5 -> 4 */
    for (int v = 0; v < 3; v++) {
        quantize_row_act(vdts[v], x, a, 256);
        quantize_row_act_ref(vdts[v], x, b, 256);
        ck_assert_int_eq(memcmp(a, b, ggml_row_size(vdts[v], 256)), 0);
    }
    const int64_t n = 4096;
    float *xs = xmalloc(n * sizeof(float));
    uint8_t *qa = xmalloc(ggml_row_size(GGML_TYPE_Q8_1, n) + 64), *qb = xmalloc(ggml_row_size(GGML_TYPE_Q8_1, n) + 64);
    for (int seed = 1; seed <= 50; seed++) {
        random_floats(xs, n, (uint64_t)seed * 77, ldexpf(1.0f, seed % 30 - 15));
        if (seed % 5 == 0) /* quantized-looking inputs produce many exact ties */
            for (int64_t i = 0; i < n; i++) xs[i] = nearbyintf(xs[i] * 16.0f) / 4.0f;
        for (int v = 0; v < 3; v++) {
            quantize_row_act(vdts[v], xs, qa, n);
            quantize_row_act_ref(vdts[v], xs, qb, n);
            ck_assert_msg(memcmp(qa, qb, ggml_row_size(vdts[v], n)) == 0, "%s seed %d", ggml_type_get(vdts[v])->name, seed);
        }
    }
    free(xs); free(qa); free(qb);
}
END_TEST

/* ---- dot products ---- */

/* Activations for weight type t: either quantized from random floats (as the engine does) or
 * random blocks. For Q8_1 random blocks d is a power of two and |q| <= 63, so s = d*sum(q) is
 * exact in fp16 and the dequantized activations are exactly what the dot sees. */
static void make_act(ggml_type t, void *a, float *xf, int64_t n, uint64_t seed, bool quantized) {
    const ggml_type vdt = quant_vec_dot_type(t);
    if (quantized || vdt == GGML_TYPE_F32) {
        random_floats(xf, n, seed, 2.0f);
        quantize_row_act(vdt, xf, a, n);
        return;
    }
    ck_assert_int_eq(quant_fill_random(vdt, a, n, seed), 0);
    if (vdt == GGML_TYPE_Q8_1) {
        uint8_t *blk = a;
        for (int64_t b = 0; b < n / 32; b++, blk += 36) {
            const uint16_t d16 = fp32_to_fp16(0x1p-7f);
            int sum = 0;
            for (int j = 0; j < 32; j++) {
                blk[4 + j] = (uint8_t)(int8_t)((int8_t)blk[4 + j] / 2);
                sum += (int8_t)blk[4 + j];
            }
            const uint16_t s16 = fp32_to_fp16((float)sum * 0x1p-7f);
            memcpy(blk, &d16, 2);
            memcpy(blk + 2, &s16, 2);
        }
    }
}

START_TEST(test_vec_dot_simd_vs_ref_vs_dequant) {
    for (int ti = 0; ti < N_DOT_TYPES; ti++) {
        const ggml_type t = DOT_TYPES[ti], vdt = quant_vec_dot_type(t);
        for (int li = 0; li < N_LENS; li++) {
            const int64_t n = LENS[li];
            if (n % ggml_type_get(t)->block_size) continue; /* 576 is not a K-quant row */
            uint8_t *w = xmalloc(ggml_row_size(t, n)), *a = xmalloc(ggml_row_size(vdt, n));
            float *wf = xmalloc(n * sizeof(float)), *af = xmalloc(n * sizeof(float)), *xf = xmalloc(n * sizeof(float));
            for (int rep = 0; rep < 6; rep++) {
                const uint64_t seed = (uint64_t)(1000 * ti + 10 * li + rep);
                ck_assert_msg(quant_fill_random(t, w, n, seed) == 0, "fill %s n=%ld", ggml_type_get(t)->name, (long)n);
                make_act(t, a, xf, n, seed ^ 0xabc, rep % 2 == 0);
                dequantize_row(t, w, wf, n);
                dequantize_row(vdt, a, af, n);
                double exact = 0, mag = 0;
                for (int64_t i = 0; i < n; i++) {
                    exact += (double)wf[i] * (double)af[i];
                    mag += fabs((double)wf[i] * (double)af[i]);
                }
                const float ref = vec_dot_ref(t, w, a, n), simd = vec_dot(t, w, a, n);
                ck_assert_msg(isfinite(ref) && mag > 0, "%s n=%ld", ggml_type_get(t)->name, (long)n);
                ck_assert_msg(fabs((double)simd - (double)ref) <= 1e-5 * mag, "%s n=%ld rep %d: simd %.9g ref %.9g (mag %g)",
                              ggml_type_get(t)->name, (long)n, rep, (double)simd, (double)ref, mag);
                /* Q8_1 activations from the quantizer carry s rounded to fp16; the dot uses it
                 * (as ggml does), so there compare only the random exact-s blocks tightly. */
                const bool s_rounded = vdt == GGML_TYPE_Q8_1 && rep % 2 == 0;
                const double tol = s_rounded ? 2e-3 * mag : 1e-5 * mag;
                ck_assert_msg(fabs((double)ref - exact) <= tol, "%s n=%ld rep %d: ref %.9g dequant-dot %.9g (mag %g)",
                              ggml_type_get(t)->name, (long)n, rep, (double)ref, exact, mag);
            }
            free(w); free(a); free(wf); free(af); free(xf);
        }
    }
}
END_TEST

/* Float weights also take rows that are not a multiple of 32 (tails). */
START_TEST(test_vec_dot_float_tails) {
    const ggml_type ts[] = {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16};
    for (int k = 0; k < 3; k++)
        for (int64_t n = 1; n <= 80; n++) {
            uint8_t *w = xmalloc(ggml_row_size(ts[k], n));
            float *a = xmalloc(n * sizeof(float)), *wf = xmalloc(n * sizeof(float));
            quant_fill_random(ts[k], w, n, (uint64_t)n);
            random_floats(a, n, (uint64_t)n + 7, 1.0f);
            dequantize_row(ts[k], w, wf, n);
            double exact = 0, mag = 0;
            for (int64_t i = 0; i < n; i++) {
                exact += (double)wf[i] * a[i];
                mag += fabs((double)wf[i] * a[i]);
            }
            ck_assert(fabs((double)vec_dot(ts[k], w, a, n) - exact) <= 1e-5 * mag + 1e-30);
            ck_assert(fabs((double)vec_dot_ref(ts[k], w, a, n) - exact) <= 1e-6 * mag + 1e-30);
            float out[1];
            vec_dot_n(ts[k], w, 0, 1, a, out, n);
            ck_assert_uint_eq(bits(out[0]), bits(vec_dot(ts[k], w, a, n)));
            free(w); free(a); free(wf);
        }
}
END_TEST

/* Extreme quants: all-max nibbles and int8 weights of -128 (valid in Q8_0 weight blocks). */
START_TEST(test_vec_dot_extremes) {
    for (int ti = 0; ti < N_DOT_TYPES; ti++) {
        const ggml_type t = DOT_TYPES[ti], vdt = quant_vec_dot_type(t);
        if (vdt == GGML_TYPE_F32) continue;
        const int64_t n = 512;
        const size_t rs = ggml_row_size(t, n);
        uint8_t *w = xmalloc(rs), *a = xmalloc(ggml_row_size(vdt, n));
        float *xf = xmalloc(n * sizeof(float)), *wf = xmalloc(n * sizeof(float)), *af = xmalloc(n * sizeof(float));
        for (int pat = 0; pat < 2; pat++) {
            quant_fill_random(t, w, n, 5);
            /* overwrite quant bytes (not the scales) with 0xff or 0x80 patterns via a re-fill
             * that keeps the scale fields: set every byte, then restore scales from the copy */
            uint8_t *copy = xmalloc(rs);
            memcpy(copy, w, rs);
            memset(w, pat ? 0x80 : 0xff, rs);
            const int bs = ggml_type_get(t)->block_size;
            const size_t ts = ggml_type_get(t)->type_size;
            for (int64_t b = 0; b < n / bs; b++) { /* scale fields back (offsets per format) */
                uint8_t *dst = w + b * ts, *src = copy + b * ts;
                switch (t) {
                case GGML_TYPE_Q4_1: case GGML_TYPE_Q5_1: case GGML_TYPE_Q4_K: memcpy(dst, src, 4); break;
                case GGML_TYPE_Q6_K: memcpy(dst + 192, src + 192, 18); break;
                default: memcpy(dst, src, 2); break;
                }
                if (t == GGML_TYPE_Q4_K) memcpy(dst + 4, src + 4, 12);
            }
            free(copy);
            random_floats(xf, n, 99, 1.0f);
            for (int64_t i = 0; i < n; i += 3) xf[i] = i % 2 ? 5.0f : -5.0f; /* many +-127 */
            quantize_row_act(vdt, xf, a, n);
            dequantize_row(t, w, wf, n);
            dequantize_row(vdt, a, af, n);
            double exact = 0, mag = 0;
            for (int64_t i = 0; i < n; i++) {
                exact += (double)wf[i] * af[i];
                mag += fabs((double)wf[i] * af[i]);
            }
            const float ref = vec_dot_ref(t, w, a, n), simd = vec_dot(t, w, a, n);
            ck_assert_msg(fabs((double)simd - ref) <= 1e-5 * mag, "%s pat %d: %g vs %g", ggml_type_get(t)->name, pat,
                          (double)simd, (double)ref);
            if (vdt != GGML_TYPE_Q8_1) ck_assert_msg(fabs((double)ref - exact) <= 1e-5 * mag, "%s pat %d", ggml_type_get(t)->name, pat);
        }
        free(w); free(a); free(xf); free(wf); free(af);
    }
}
END_TEST

START_TEST(test_vec_dot_n_bit_exact) {
    static const int NWS[] = {1, 2, 3, 4, 5, 7, 8, 13};
    for (int ti = 0; ti < N_DOT_TYPES; ti++) {
        const ggml_type t = DOT_TYPES[ti], vdt = quant_vec_dot_type(t);
        for (int li = 0; li < 3; li++) {
            const int64_t n = LENS[li + 1];
            if (n % ggml_type_get(t)->block_size) continue;
            const size_t rs = ggml_row_size(t, n), stride = rs + (li == 2 ? 4 : 0); /* padded stride too */
            uint8_t *w = xmalloc(stride * 13), *a = xmalloc(ggml_row_size(vdt, n));
            float *xf = xmalloc(n * sizeof(float));
            for (int r = 0; r < 13; r++) quant_fill_random(t, w + r * stride, n, (uint64_t)(r * 31 + li));
            make_act(t, a, xf, n, 4242 + (uint64_t)li, true);
            for (size_t k = 0; k < sizeof NWS / sizeof NWS[0]; k++) {
                float out[13];
                vec_dot_n(t, w, stride, NWS[k], a, out, n);
                for (int r = 0; r < NWS[k]; r++) {
                    const float one = vec_dot(t, w + r * stride, a, n);
                    ck_assert_msg(bits(out[r]) == bits(one), "%s n=%ld nw=%d row %d: %.9g vs %.9g", ggml_type_get(t)->name,
                                  (long)n, NWS[k], r, (double)out[r], (double)one);
                }
            }
            free(w); free(a); free(xf);
        }
    }
}
END_TEST

/* vec_dot_tile (rows x activations, used by batched prefill) equals vec_dot per pair, bit
 * for bit, for every shape including partial tiles: the cache-on/off and batch-size
 * transparency of the engine rests on this. */
START_TEST(test_vec_dot_tile_bit_exact) {
    static const int NWS[] = {1, 3, 4, 7, 8, 13};
    static const int NAS[] = {1, 2, 3, 5};
    for (int ti = 0; ti < N_DOT_TYPES; ti++) {
        const ggml_type t = DOT_TYPES[ti], vdt = quant_vec_dot_type(t);
        const int64_t n = LENS[2];
        if (n % ggml_type_get(t)->block_size) continue;
        const size_t rs = ggml_row_size(t, n), as = ggml_row_size(vdt, n) + 64;
        uint8_t *w = xmalloc(rs * 13), *a = xmalloc(as * 5);
        float *xf = xmalloc(n * sizeof(float));
        for (int r = 0; r < 13; r++) quant_fill_random(t, w + r * rs, n, (uint64_t)(r * 17 + 5));
        for (int c = 0; c < 5; c++) make_act(t, a + c * as, xf, n, 99 + (uint64_t)c, true);
        for (size_t k = 0; k < sizeof NWS / sizeof NWS[0]; k++)
            for (size_t m = 0; m < sizeof NAS / sizeof NAS[0]; m++) {
                float out[5 * 16];
                vec_dot_tile(t, w, rs, NWS[k], a, as, NAS[m], out, 16, n);
                for (int c = 0; c < NAS[m]; c++)
                    for (int r = 0; r < NWS[k]; r++) {
                        const float one = vec_dot(t, w + r * rs, a + c * as, n);
                        ck_assert_msg(bits(out[c * 16 + r]) == bits(one), "%s nw=%d na=%d (%d,%d): %.9g vs %.9g",
                                      ggml_type_get(t)->name, NWS[k], NAS[m], r, c, (double)out[c * 16 + r], (double)one);
                    }
            }
        free(w); free(a); free(xf);
    }
}
END_TEST

/* The x4 layout (four rows interleaved, what the model runs its matmuls on) gives exactly
 * vec_dot's results for every row range, aligned to groups or not, and every number of
 * activations; repacking rejects what it cannot pack. */
START_TEST(test_vec_dot_tile_x4_bit_exact) {
    static const ggml_type X4[] = {GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q8_0};
    static const int RANGES[][2] = {{0, 16}, {0, 4}, {4, 8}, {1, 3}, {2, 13}, {5, 1}, {12, 4}, {3, 10}};
    static const int NAS[] = {1, 2, 3, 5};
    for (int ti = 0; ti < 3; ti++) {
        const ggml_type t = X4[ti], vdt = quant_vec_dot_type(t);
        if (!quant_x4_supported(t)) {
            ck_assert_int_eq(quant_repack_x4(t, "", (char[1]){0}, 4, 32), -1);
            continue;
        }
        for (int li = 0; li < 3; li++) {
            const int64_t n = LENS[li + 1];
            const size_t rs = ggml_row_size(t, n), as = ggml_row_size(vdt, n) + 32;
            uint8_t *w = xmalloc(rs * 16), *wx = xmalloc(rs * 16), *a = xmalloc(as * 5);
            float *xf = xmalloc(n * sizeof(float));
            for (int r = 0; r < 16; r++) quant_fill_random(t, w + r * rs, n, (uint64_t)(r * 13 + li + 7));
            for (int c = 0; c < 5; c++) make_act(t, a + c * as, xf, n, 777 + (uint64_t)c, true);
            ck_assert_int_eq(quant_repack_x4(t, w, wx, 16, n), 0);
            ck_assert_msg(memcmp(w, wx, rs * 16) != 0, "repacking changed nothing");
            ck_assert_int_eq(quant_repack_x4(t, w, wx, 6, n), -1);           /* rows % 4 */
            ck_assert_int_eq(quant_repack_x4(t, w, wx, 4, n + 1), -1);       /* partial block */
            ck_assert_int_eq(quant_repack_x4(GGML_TYPE_Q4_K, w, wx, 4, 256), -1);
            for (size_t k = 0; k < sizeof RANGES / sizeof RANGES[0]; k++)
                for (size_t m = 0; m < sizeof NAS / sizeof NAS[0]; m++) {
                    const int r0 = RANGES[k][0], nw = RANGES[k][1];
                    float out[5 * 16];
                    for (int i = 0; i < 5 * 16; i++) out[i] = -12345.0f;
                    vec_dot_tile_x4(t, wx, r0, nw, a, as, NAS[m], out, 16, n);
                    for (int c = 0; c < 5; c++)
                        for (int r = 0; r < 16; r++) {
                            if (c >= NAS[m] || r >= nw) { /* nothing outside the range is written */
                                ck_assert(out[c * 16 + r] == -12345.0f);
                                continue;
                            }
                            const float one = vec_dot(t, w + (r0 + r) * rs, a + c * as, n);
                            ck_assert_msg(bits(out[c * 16 + r]) == bits(one), "%s n=%ld rows [%d,+%d) na=%d (%d,%d): %.9g vs %.9g",
                                          ggml_type_get(t)->name, (long)n, r0, nw, NAS[m], r, c,
                                          (double)out[c * 16 + r], (double)one);
                        }
                }
            free(w); free(wx); free(a); free(xf);
        }
    }
}
END_TEST

/* K-quant SIMD kernels reduce each super-block to exact integers and then take the same float
 * steps as the reference, so they must agree bit for bit (with any compiler's contraction). */
START_TEST(test_vec_dot_kquants_bit_exact_with_ref) {
    const ggml_type ks[] = {GGML_TYPE_Q4_K, GGML_TYPE_Q6_K};
    const int64_t n = 1536;
    for (int k = 0; k < 2; k++) {
        uint8_t *w = xmalloc(ggml_row_size(ks[k], n)), *a = xmalloc(ggml_row_size(GGML_TYPE_Q8_K, n));
        float *xf = xmalloc(n * sizeof(float));
        for (int rep = 0; rep < 20; rep++) {
            quant_fill_random(ks[k], w, n, (uint64_t)rep + 100);
            make_act(ks[k], a, xf, n, (uint64_t)rep + 200, rep % 2 == 0);
            const float r = vec_dot_ref(ks[k], w, a, n), v = vec_dot(ks[k], w, a, n);
            ck_assert_msg(bits(r) == bits(v), "%s rep %d: %.9g vs %.9g", ggml_type_get(ks[k])->name, rep, (double)v, (double)r);
        }
        free(w); free(a); free(xf);
    }
}
END_TEST

/* vec_dot is a pure function: same inputs, same bits, whatever ran before. */
START_TEST(test_vec_dot_deterministic) {
    const int64_t n = 1536;
    for (int ti = 0; ti < N_DOT_TYPES; ti++) {
        const ggml_type t = DOT_TYPES[ti], vdt = quant_vec_dot_type(t);
        uint8_t *w = xmalloc(ggml_row_size(t, n)), *a = xmalloc(ggml_row_size(vdt, n));
        uint8_t *w2 = xmalloc(ggml_row_size(t, n));
        float *xf = xmalloc(n * sizeof(float));
        quant_fill_random(t, w, n, 1);
        memcpy(w2, w, ggml_row_size(t, n));
        make_act(t, a, xf, n, 2, true);
        const float first = vec_dot(t, w, a, n);
        float junk[5];
        vec_dot_n(t, w, 0, 5, a, junk, n);
        ck_assert_uint_eq(bits(vec_dot(t, w2, a, n)), bits(first));
        free(w); free(w2); free(a); free(xf);
    }
}
END_TEST

/* dequantize_rows_f16 (the GPU upload's conversion): the serial per-row conversion's bits on 1,
 * 3 and 8 threads, for a row count that no thread count divides; bad input refused. */
START_TEST(test_dequantize_rows_f16) {
    const ggml_type types[] = { GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q8_0, GGML_TYPE_Q4_K,
                                GGML_TYPE_Q6_K };
    const int64_t cols = 512;
    const size_t rows = 389;
    for (size_t ti = 0; ti < sizeof types / sizeof *types; ti++) {
        const ggml_type t = types[ti];
        const size_t rb = ggml_row_size(t, cols);
        uint8_t *m = malloc(rows * rb);
        float *row = malloc(cols * sizeof *row);
        uint16_t *want = malloc(rows * cols * sizeof *want), *got = malloc(rows * cols * sizeof *got);
        ck_assert(m && row && want && got);
        for (size_t r = 0; r < rows; r++) ck_assert_int_eq(quant_fill_random(t, m + r * rb, cols, 1000 + r), 0);
        for (size_t r = 0; r < rows; r++) {
            dequantize_row(t, m + r * rb, row, cols);
            for (int64_t c = 0; c < cols; c++) want[r * cols + c] = fp32_to_fp16(row[c]);
        }
        const int threads[] = { 1, 3, 8 };
        for (int k = 0; k < 3; k++) {
            memset(got, 0xAB, rows * cols * sizeof *got);
            ck_assert_int_eq(dequantize_rows_f16(t, m, rows, cols, got, threads[k]), 0);
            ck_assert_msg(!memcmp(got, want, rows * cols * sizeof *got), "type %d, %d threads", (int)t, threads[k]);
        }
        free(m); free(row); free(want); free(got);
    }
    uint16_t d[32];
    uint8_t q[18 * 2] = { 0 };
    ck_assert_int_eq(dequantize_rows_f16(GGML_TYPE_Q4_0, q, 1, 31, d, 4), -1);   /* not a whole block */
    ck_assert_int_eq(dequantize_rows_f16(GGML_TYPE_COUNT, q, 1, 32, d, 4), -1);
    ck_assert_int_eq(dequantize_rows_f16(GGML_TYPE_Q4_0, q, 1, 32, d, 0), 0);    /* 0 threads: the caller's */
}
END_TEST

int main(void) {
    Suite *s = suite_create("quant");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_type_table);
    tcase_add_test(tc, test_fp16_known_values);
    tcase_add_test(tc, test_fp16_exhaustive);
    tcase_add_test(tc, test_fp32_to_fp16_sweep);
    tcase_add_test(tc, test_bf16);
    tcase_add_test(tc, test_dequant_q4_0_q4_1_q8_0);
    tcase_add_test(tc, test_dequant_q4_K_scales);
    tcase_add_test(tc, test_dequant_q6_K_layout);
    tcase_add_test(tc, test_bad_input);
    tcase_add_test(tc, test_quantize_act_round_trip);
    tcase_add_test(tc, test_quantize_act_simd_equals_ref);
    tcase_add_test(tc, test_vec_dot_simd_vs_ref_vs_dequant);
    tcase_add_test(tc, test_vec_dot_float_tails);
    tcase_add_test(tc, test_vec_dot_extremes);
    tcase_add_test(tc, test_vec_dot_n_bit_exact);
    tcase_add_test(tc, test_vec_dot_tile_bit_exact);
    tcase_add_test(tc, test_vec_dot_tile_x4_bit_exact);
    tcase_add_test(tc, test_vec_dot_kquants_bit_exact_with_ref);
    tcase_add_test(tc, test_vec_dot_deterministic);
    tcase_add_test(tc, test_dequantize_rows_f16);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
