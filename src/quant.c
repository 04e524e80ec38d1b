/* quant: GGML block formats, reference kernels and their AVX2 twins.
 *
 * Design
 * - Each block format is a plain struct laid out byte-for-byte as in ggml (static asserts check
 *   the sizes). The scalar functions (*_ref, dequantize_row) are the definitions: they are
 *   written to read like ggml's reference C code and are checked against the PyPI gguf package
 *   (tests/py/test_dequant.py).
 * - Weight rows are dotted against activations quantized to the weight type's partner format
 *   ("vec_dot_type"), exactly as ggml's CPU backend does: Q4_0/Q5_0/Q8_0 -> Q8_0,
 *   Q4_1/Q5_1 -> Q8_1, K-quants -> Q8_K, float types -> F32.
 * - The AVX2 kernels follow ggml-cpu's x86 code (maddubs + madd integer products, one fp32 FMA
 *   per 32-element block). They differ from the scalar reference only in the order of float
 *   additions, so tests compare them with a tight relative tolerance. K-quant kernels reduce
 *   each 256-element super-block to exact integers and then do the same scalar float steps as
 *   the reference, so they are bit-identical to it.
 * - Determinism: every kernel is a pure function of its input rows. vec_dot_n interleaves up to
 *   four weight rows for instruction-level parallelism, but each row goes through exactly the
 *   same sequence of operations as in vec_dot, so batched prefill and decode agree bit for bit.
 * - Activation quantization rounds to nearest-even everywhere (nearbyintf in scalar code,
 *   _mm256_round_ps(_MM_FROUND_TO_NEAREST_INT) in AVX2 code; the float products that feed the
 *   rounding are the same IEEE multiplications), so the SIMD and scalar quantizers produce
 *   identical bytes for finite inputs. ggml's reference uses roundf (ties away from zero) for
 *   Q8_0/Q8_1 while its AVX2 path rounds to even; we pick the latter for both. Non-finite
 *   activations give unspecified (but memory-safe) bytes.
 * - fp16: F16C instructions when compiled with -mf16c; the portable bit-twiddling versions are
 *   exhaustively tested to give the same bits (including NaN payloads and ties).
 * - Bad input (unknown type, n not a multiple of the block size, n < 0) never crashes:
 *   dequantize_row fills NaNs, vec_dot returns NaN, quantize_row_act zero-fills dst.
 *   Alignment: rows must be 2-byte aligned (4 for Q8_K), which GGUF's 32-byte data alignment
 *   and malloc guarantee.
 */
#include "quant.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QUANT_AVX2 1
#include <immintrin.h>
#elif defined(__F16C__)
#include <immintrin.h>
#endif

/* ---------------------------------------------------------------------------------------- */
/* Block layouts (as in ggml-common.h)                                                       */

#define QK 32    /* elements per block of the legacy formats */
#define QK_K 256 /* elements per K-quant super-block */

typedef struct { uint16_t d; uint8_t qs[QK / 2]; } block_q4_0;
typedef struct { uint16_t d, m; uint8_t qs[QK / 2]; } block_q4_1;
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[QK / 2]; } block_q5_0;
typedef struct { uint16_t d, m; uint8_t qh[4]; uint8_t qs[QK / 2]; } block_q5_1;
typedef struct { uint16_t d; int8_t qs[QK]; } block_q8_0;
typedef struct { uint16_t d, s; int8_t qs[QK]; } block_q8_1; /* s = d * sum(qs) */
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[QK_K / 2]; } block_q4_K;
typedef struct {
    uint8_t ql[QK_K / 2];     /* low 4 bits */
    uint8_t qh[QK_K / 4];     /* high 2 bits */
    int8_t scales[QK_K / 16]; /* 8-bit scale per 16 elements */
    uint16_t d;
} block_q6_K;
typedef struct { float d; int8_t qs[QK_K]; int16_t bsums[QK_K / 16]; } block_q8_K;

_Static_assert(sizeof(block_q4_0) == 18, "q4_0");
_Static_assert(sizeof(block_q4_1) == 20, "q4_1");
_Static_assert(sizeof(block_q5_0) == 22, "q5_0");
_Static_assert(sizeof(block_q5_1) == 24, "q5_1");
_Static_assert(sizeof(block_q8_0) == 34, "q8_0");
_Static_assert(sizeof(block_q8_1) == 36, "q8_1");
_Static_assert(sizeof(block_q4_K) == 144, "q4_K");
_Static_assert(sizeof(block_q6_K) == 210, "q6_K");
_Static_assert(sizeof(block_q8_K) == 292, "q8_K");

/* ---------------------------------------------------------------------------------------- */
/* Type table                                                                                */

static const ggml_type_info type_table[GGML_TYPE_COUNT] = {
    [GGML_TYPE_F32] = {"F32", 1, 4, true},
    [GGML_TYPE_F16] = {"F16", 1, 2, true},
    [GGML_TYPE_Q4_0] = {"Q4_0", 32, 18, true},
    [GGML_TYPE_Q4_1] = {"Q4_1", 32, 20, true},
    [GGML_TYPE_Q5_0] = {"Q5_0", 32, 22, true},
    [GGML_TYPE_Q5_1] = {"Q5_1", 32, 24, true},
    [GGML_TYPE_Q8_0] = {"Q8_0", 32, 34, true},
    [GGML_TYPE_Q8_1] = {"Q8_1", 32, 36, false},
    [GGML_TYPE_Q2_K] = {"Q2_K", 256, 84, false},
    [GGML_TYPE_Q3_K] = {"Q3_K", 256, 110, false},
    [GGML_TYPE_Q4_K] = {"Q4_K", 256, 144, true},
    [GGML_TYPE_Q5_K] = {"Q5_K", 256, 176, false},
    [GGML_TYPE_Q6_K] = {"Q6_K", 256, 210, true},
    [GGML_TYPE_Q8_K] = {"Q8_K", 256, 292, false},
    /* Types we only know the size of, so that a GGUF containing them can still be parsed. */
    [16] = {"IQ2_XXS", 256, 66, false},
    [17] = {"IQ2_XS", 256, 74, false},
    [18] = {"IQ3_XXS", 256, 98, false},
    [19] = {"IQ1_S", 256, 50, false},
    [20] = {"IQ4_NL", 32, 18, false},
    [21] = {"IQ3_S", 256, 110, false},
    [22] = {"IQ2_S", 256, 82, false},
    [23] = {"IQ4_XS", 256, 136, false},
    [24] = {"I8", 1, 1, false},
    [25] = {"I16", 1, 2, false},
    [26] = {"I32", 1, 4, false},
    [27] = {"I64", 1, 8, false},
    [28] = {"F64", 1, 8, false},
    [29] = {"IQ1_M", 256, 56, false},
    [GGML_TYPE_BF16] = {"BF16", 1, 2, true},
    [34] = {"TQ1_0", 256, 54, false},
    [35] = {"TQ2_0", 256, 66, false},
    [39] = {"MXFP4", 32, 17, false},
};

const ggml_type_info *ggml_type_get(ggml_type t) {
    if ((int)t < 0 || (int)t >= GGML_TYPE_COUNT || type_table[t].name == NULL) return NULL;
    return &type_table[t];
}

/* Number of blocks in n elements, or -1 if n is negative or not a whole number of blocks.
 * Block sizes are all powers of two, so no (slow, 64-bit) division in the hot paths. */
static inline int64_t n_blocks(const ggml_type_info *ti, int64_t n) {
    const int64_t bs = ti->block_size;
    if (n < 0 || (n & (bs - 1)) != 0) return -1;
    return n >> __builtin_ctzll((unsigned long long)bs);
}

size_t ggml_row_size(ggml_type t, int64_t n) {
    const ggml_type_info *ti = ggml_type_get(t);
    const int64_t nb = ti ? n_blocks(ti, n) : -1;
    return nb < 0 ? 0 : (size_t)nb * ti->type_size;
}

ggml_type ggml_type_from_name(const char *name) {
    if (!name) return GGML_TYPE_COUNT;
    for (int t = 0; t < GGML_TYPE_COUNT; t++)
        if (type_table[t].name && strcasecmp(type_table[t].name, name) == 0) return (ggml_type)t;
    return GGML_TYPE_COUNT;
}

const char *quant_simd_name(void) {
#ifdef QUANT_AVX2
    return "avx2";
#else
    return "scalar";
#endif
}

/* Dequantizable types: the supported weight types plus the activation formats. */
static bool can_dequantize(ggml_type t) {
    const ggml_type_info *ti = ggml_type_get(t);
    return ti && (ti->supported || t == GGML_TYPE_Q8_1 || t == GGML_TYPE_Q8_K);
}

/* ---------------------------------------------------------------------------------------- */
/* fp16 / bf16                                                                               */

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

float fp16_to_fp32_ref(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    const uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    if (exp == 0) {
        /* zero or subnormal: mant * 2^-24, exact in fp32 */
        float f = (float)mant * 0x1p-24f;
        return f32_from_bits(f32_bits(f) | sign);
    }
    if (exp == 31) /* inf, or NaN with its payload, quieted (as vcvtph2ps does) */
        return f32_from_bits(sign | 0x7f800000u | (mant << 13) | (mant ? 0x400000u : 0));
    return f32_from_bits(sign | ((exp + 112) << 23) | (mant << 13));
}

uint16_t fp32_to_fp16_ref(float f) {
    const uint32_t x = f32_bits(f);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    const uint32_t a = x & 0x7fffffffu;
    if (a > 0x7f800000u) /* NaN: quieted, payload truncated (as vcvtps2ph does) */
        return sign | 0x7e00 | (uint16_t)((a >> 13) & 0x3ff);
    if (a >= 0x47800000u) return sign | 0x7c00; /* >= 65536 or inf */
    if (a >= 0x38800000u) {                     /* normal half: round to nearest even at bit 13 */
        uint32_t m = a + 0xfffu + ((a >> 13) & 1u);
        m -= 0x38000000u; /* rebias exponent 127 -> 15; a carry into exp 31 gives inf */
        return sign | (uint16_t)(m >> 13);
    }
    if (a <= 0x33000000u) return sign; /* <= 2^-25 rounds to (even) zero */
    /* half subnormal: value in units of 2^-24 */
    const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e; /* 14..24 */
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) q++;
    return sign | (uint16_t)q;
}

float fp16_to_fp32(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    return fp16_to_fp32_ref(h);
#endif
}

uint16_t fp32_to_fp16(float f) {
#ifdef __F16C__
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    return fp32_to_fp16_ref(f);
#endif
}

float bf16_to_fp32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

uint16_t fp32_to_bf16(float f) {
    const uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64); /* quiet NaN */
    return (uint16_t)((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}

#define F16(h) fp16_to_fp32(h)

/* ---------------------------------------------------------------------------------------- */
/* Scalar dequantization (the definitions)                                                   */

/* The 12 bytes of Q4_K/Q5_K scales hold eight 6-bit scales and eight 6-bit mins. */
static inline void get_scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
    }
}

static void dequant_q4_0(const block_q4_0 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = F16(x[i].d);
        for (int j = 0; j < QK / 2; j++) {
            y[i * QK + j] = (float)((x[i].qs[j] & 0x0F) - 8) * d;
            y[i * QK + j + QK / 2] = (float)((x[i].qs[j] >> 4) - 8) * d;
        }
    }
}

static void dequant_q4_1(const block_q4_1 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = F16(x[i].d), m = F16(x[i].m);
        for (int j = 0; j < QK / 2; j++) {
            y[i * QK + j] = (float)(x[i].qs[j] & 0x0F) * d + m;
            y[i * QK + j + QK / 2] = (float)(x[i].qs[j] >> 4) * d + m;
        }
    }
}

static inline uint32_t load_u32(const uint8_t *p) { uint32_t u; memcpy(&u, p, 4); return u; }

static void dequant_q5_0(const block_q5_0 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = F16(x[i].d);
        const uint32_t qh = load_u32(x[i].qh);
        for (int j = 0; j < QK / 2; j++) {
            const int xh0 = (int)(((qh >> (j + 0)) << 4) & 0x10);
            const int xh1 = (int)((qh >> (j + 12)) & 0x10);
            y[i * QK + j] = (float)(((x[i].qs[j] & 0x0F) | xh0) - 16) * d;
            y[i * QK + j + QK / 2] = (float)(((x[i].qs[j] >> 4) | xh1) - 16) * d;
        }
    }
}

static void dequant_q5_1(const block_q5_1 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = F16(x[i].d), m = F16(x[i].m);
        const uint32_t qh = load_u32(x[i].qh);
        for (int j = 0; j < QK / 2; j++) {
            const int xh0 = (int)(((qh >> (j + 0)) << 4) & 0x10);
            const int xh1 = (int)((qh >> (j + 12)) & 0x10);
            y[i * QK + j] = (float)((x[i].qs[j] & 0x0F) | xh0) * d + m;
            y[i * QK + j + QK / 2] = (float)((x[i].qs[j] >> 4) | xh1) * d + m;
        }
    }
}

static void dequant_q8_0(const block_q8_0 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = F16(x[i].d);
        for (int j = 0; j < QK; j++) y[i * QK + j] = (float)x[i].qs[j] * d;
    }
}

static void dequant_q8_1(const block_q8_1 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = F16(x[i].d);
        for (int j = 0; j < QK; j++) y[i * QK + j] = (float)x[i].qs[j] * d;
    }
}

static void dequant_q4_K(const block_q4_K *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *q = x[i].qs;
        const float d = F16(x[i].d), min = F16(x[i].dmin);
        int is = 0;
        uint8_t sc, m;
        for (int j = 0; j < QK_K; j += 64) {
            get_scale_min_k4(is + 0, x[i].scales, &sc, &m);
            const float d1 = d * sc, m1 = min * m;
            get_scale_min_k4(is + 1, x[i].scales, &sc, &m);
            const float d2 = d * sc, m2 = min * m;
            for (int l = 0; l < 32; ++l) *y++ = d1 * (float)(q[l] & 0xF) - m1;
            for (int l = 0; l < 32; ++l) *y++ = d2 * (float)(q[l] >> 4) - m2;
            q += 32;
            is += 2;
        }
    }
}

/* Q6_K element e of a super-block as a signed 6-bit value (-32..31); its scale is sc[e/16]. */
static void q6_K_unpack(const block_q6_K *x, int8_t *q /* [256] */) {
    const uint8_t *ql = x->ql, *qh = x->qh;
    for (int n = 0; n < QK_K; n += 128) {
        for (int l = 0; l < 32; ++l) {
            q[n + l + 0] = (int8_t)(((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
            q[n + l + 32] = (int8_t)(((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
            q[n + l + 64] = (int8_t)(((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            q[n + l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
        ql += 64;
        qh += 32;
    }
}

static void dequant_q6_K(const block_q6_K *x, float *y, int64_t nb) {
    int8_t q[QK_K];
    for (int64_t i = 0; i < nb; i++) {
        const float d = F16(x[i].d);
        q6_K_unpack(&x[i], q);
        /* ggml: y = d * sc * q, evaluated left to right */
        for (int e = 0; e < QK_K; e++) y[i * QK_K + e] = d * (float)x[i].scales[e / 16] * (float)q[e];
    }
}

static void dequant_q8_K(const block_q8_K *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++)
        for (int j = 0; j < QK_K; j++) y[i * QK_K + j] = x[i].d * (float)x[i].qs[j];
}

void dequantize_row(ggml_type t, const void *src, float *dst, int64_t n) {
    if (n <= 0 || !dst) return;
    const ggml_type_info *ti = ggml_type_get(t);
    if (!src || !can_dequantize(t) || n % ti->block_size != 0) {
        for (int64_t i = 0; i < n; i++) dst[i] = NAN;
        return;
    }
    const int64_t nb = n / ti->block_size;
    switch (t) {
    case GGML_TYPE_F32: memmove(dst, src, (size_t)n * sizeof(float)); break;
    case GGML_TYPE_F16: {
        const uint16_t *h = src;
        for (int64_t i = 0; i < n; i++) dst[i] = fp16_to_fp32(h[i]);
        break;
    }
    case GGML_TYPE_BF16: {
        const uint16_t *h = src;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_fp32(h[i]);
        break;
    }
    case GGML_TYPE_Q4_0: dequant_q4_0(src, dst, nb); break;
    case GGML_TYPE_Q4_1: dequant_q4_1(src, dst, nb); break;
    case GGML_TYPE_Q5_0: dequant_q5_0(src, dst, nb); break;
    case GGML_TYPE_Q5_1: dequant_q5_1(src, dst, nb); break;
    case GGML_TYPE_Q8_0: dequant_q8_0(src, dst, nb); break;
    case GGML_TYPE_Q8_1: dequant_q8_1(src, dst, nb); break;
    case GGML_TYPE_Q4_K: dequant_q4_K(src, dst, nb); break;
    case GGML_TYPE_Q6_K: dequant_q6_K(src, dst, nb); break;
    case GGML_TYPE_Q8_K: dequant_q8_K(src, dst, nb); break;
    default:
        for (int64_t i = 0; i < n; i++) dst[i] = NAN;
    }
}

ggml_type quant_vec_dot_type(ggml_type t) {
    switch (t) {
    case GGML_TYPE_F32:
    case GGML_TYPE_F16:
    case GGML_TYPE_BF16: return GGML_TYPE_F32;
    case GGML_TYPE_Q4_0:
    case GGML_TYPE_Q5_0:
    case GGML_TYPE_Q8_0: return GGML_TYPE_Q8_0;
    case GGML_TYPE_Q4_1:
    case GGML_TYPE_Q5_1: return GGML_TYPE_Q8_1;
    case GGML_TYPE_Q4_K:
    case GGML_TYPE_Q6_K: return GGML_TYPE_Q8_K;
    default: return GGML_TYPE_COUNT; /* not dottable; ggml_row_size() of it is 0 */
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Activation quantization                                                                   */

/* Round a float that is known to lie within int8 range (or NaN) to nearest-even, as int8. */
static inline int8_t round_i8(float v) {
    const float r = nearbyintf(v);
    return (r >= -128.0f && r <= 127.0f) ? (int8_t)r : 0; /* NaN -> 0, never UB */
}

/* One 32-block of Q8_0/Q8_1 (scalar): d = amax/127, q = round_even(x * (127/amax)).
 * Returns the sum of the quants; *d_f gets the unrounded scale (Q8_1's s is built from it). */
static int quant_block_q8_ref(const float *x, uint16_t *d_out, float *d_f, int8_t *qs) {
    float amax = 0.0f;
    for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f; /* as ggml's AVX2 quantize_row_q8_{0,1} */
    *d_out = fp32_to_fp16(d);
    *d_f = d;
    int sum = 0;
    for (int j = 0; j < QK; j++) {
        qs[j] = round_i8(x[j] * id);
        sum += qs[j];
    }
    return sum;
}

static void quant_q8_0_ref(const float *x, block_q8_0 *y, int64_t nb) {
    float d;
    for (int64_t i = 0; i < nb; i++) quant_block_q8_ref(x + i * QK, &y[i].d, &d, y[i].qs);
}

static void quant_q8_1_ref(const float *x, block_q8_1 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        float d;
        const int sum = quant_block_q8_ref(x + i * QK, &y[i].d, &d, y[i].qs);
        y[i].s = fp32_to_fp16((float)sum * d);
    }
}

/* ggml's quantize_row_q8_K_ref: the scale comes from the signed element of largest |x|
 * (first one on ties) so that it maps to exactly -127. */
static void quant_q8_K_ref(const float *x, block_q8_K *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        float max = 0, amax = 0;
        for (int j = 0; j < QK_K; ++j) {
            const float ax = fabsf(x[j]);
            if (ax > amax) {
                amax = ax;
                max = x[j];
            }
        }
        if (amax == 0.0f) {
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        const float iscale = -127.f / max;
        for (int j = 0; j < QK_K; ++j) {
            const float r = nearbyintf(iscale * x[j]);
            y[i].qs[j] = (int8_t)(r >= -128.0f && r <= 127.0f ? r : (r > 127.0f ? 127 : 0));
        }
        for (int j = 0; j < QK_K / 16; ++j) {
            int sum = 0;
            for (int ii = 0; ii < 16; ++ii) sum += y[i].qs[j * 16 + ii];
            y[i].bsums[j] = (int16_t)sum;
        }
        y[i].d = 1 / iscale;
    }
}

#ifdef QUANT_AVX2
/* AVX2 twin of quant_block_q8_ref: same max (exact), same d and 127/amax, same products, same
 * round-to-nearest-even, so the same bytes. */
#define RNE (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
static inline int quant_block_q8_avx2(const float *x, uint16_t *d_out, float *d_f, int8_t *qs) {
    __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8);
    __m256 v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1));
    m = _mm256_max_ps(m, _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float d = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f; /* as ggml's AVX2 quantize_row_q8_{0,1} */
    *d_out = fp32_to_fp16(d);
    *d_f = d;
    const __m256 mul = _mm256_set1_ps(id);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, mul), RNE));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, mul), RNE));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, mul), RNE));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, mul), RNE));
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    __m128i s4 = _mm_add_epi32(_mm256_extracti128_si256(s, 1), _mm256_castsi256_si128(s));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
    i0 = _mm256_packs_epi32(i0, i1); /* 0..3 8..11 4..7 12..15 per lane */
    i2 = _mm256_packs_epi32(i2, i3);
    i0 = _mm256_packs_epi16(i0, i2);
    i0 = _mm256_permutevar8x32_epi32(i0, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)qs, i0);
    return _mm_cvtsi128_si32(s4);
}
#endif

void quantize_row_act_ref(ggml_type vdt, const float *x, void *dst, int64_t n) {
    const size_t rs = ggml_row_size(vdt, n);
    if (!dst || !x || n <= 0) return;
    if (rs == 0) return; /* unknown type or bad n: nothing sensible to write */
    const int64_t nb = n / ggml_type_get(vdt)->block_size;
    switch (vdt) {
    case GGML_TYPE_F32: memmove(dst, x, (size_t)n * sizeof(float)); break;
    case GGML_TYPE_Q8_0: quant_q8_0_ref(x, dst, nb); break;
    case GGML_TYPE_Q8_1: quant_q8_1_ref(x, dst, nb); break;
    case GGML_TYPE_Q8_K: quant_q8_K_ref(x, dst, nb); break;
    default: memset(dst, 0, rs);
    }
}

void quantize_row_act(ggml_type vdt, const float *x, void *dst, int64_t n) {
#ifdef QUANT_AVX2
    if (x && dst && n > 0 && ggml_row_size(vdt, n) != 0) {
        const int64_t nb = n / QK;
        float d;
        if (vdt == GGML_TYPE_Q8_0) {
            block_q8_0 *y = dst;
            for (int64_t i = 0; i < nb; i++) quant_block_q8_avx2(x + i * QK, &y[i].d, &d, y[i].qs);
            return;
        }
        if (vdt == GGML_TYPE_Q8_1) {
            block_q8_1 *y = dst;
            for (int64_t i = 0; i < nb; i++) {
                const int sum = quant_block_q8_avx2(x + i * QK, &y[i].d, &d, y[i].qs);
                y[i].s = fp32_to_fp16((float)sum * d);
            }
            return;
        }
    }
#endif
    quantize_row_act_ref(vdt, x, dst, n);
}

/* ---------------------------------------------------------------------------------------- */
/* Scalar dot products (the definitions). Integer sums within a block are exact; the float
 * steps per block follow ggml's generic C code. */

static float dot_f32_ref(const float *x, const float *y, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)x[i] * (double)y[i];
    return (float)s;
}

static float dot_f16_ref(const uint16_t *x, const float *y, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)fp16_to_fp32(x[i]) * (double)y[i];
    return (float)s;
}

static float dot_bf16_ref(const uint16_t *x, const float *y, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)bf16_to_fp32(x[i]) * (double)y[i];
    return (float)s;
}

static float dot_q4_0_q8_0_ref(const block_q4_0 *x, const block_q8_0 *y, int64_t nb) {
    float sumf = 0;
    for (int64_t ib = 0; ib < nb; ib++) {
        int sumi = 0;
        for (int j = 0; j < QK / 2; j++) {
            sumi += ((x[ib].qs[j] & 0x0F) - 8) * y[ib].qs[j];
            sumi += ((x[ib].qs[j] >> 4) - 8) * y[ib].qs[j + QK / 2];
        }
        sumf += (float)sumi * (F16(x[ib].d) * F16(y[ib].d));
    }
    return sumf;
}

static float dot_q4_1_q8_1_ref(const block_q4_1 *x, const block_q8_1 *y, int64_t nb) {
    float sumf = 0;
    for (int64_t ib = 0; ib < nb; ib++) {
        int sumi = 0;
        for (int j = 0; j < QK / 2; j++) {
            sumi += (x[ib].qs[j] & 0x0F) * y[ib].qs[j];
            sumi += (x[ib].qs[j] >> 4) * y[ib].qs[j + QK / 2];
        }
        sumf += (F16(x[ib].d) * F16(y[ib].d)) * (float)sumi + F16(x[ib].m) * F16(y[ib].s);
    }
    return sumf;
}

static float dot_q5_0_q8_0_ref(const block_q5_0 *x, const block_q8_0 *y, int64_t nb) {
    float sumf = 0;
    for (int64_t ib = 0; ib < nb; ib++) {
        const uint32_t qh = load_u32(x[ib].qh);
        int sumi = 0;
        for (int j = 0; j < QK / 2; j++) {
            const int xh0 = (int)(((qh >> (j + 0)) << 4) & 0x10);
            const int xh1 = (int)((qh >> (j + 12)) & 0x10);
            sumi += (((x[ib].qs[j] & 0x0F) | xh0) - 16) * y[ib].qs[j];
            sumi += (((x[ib].qs[j] >> 4) | xh1) - 16) * y[ib].qs[j + QK / 2];
        }
        sumf += (F16(x[ib].d) * F16(y[ib].d)) * (float)sumi;
    }
    return sumf;
}

static float dot_q5_1_q8_1_ref(const block_q5_1 *x, const block_q8_1 *y, int64_t nb) {
    float sumf = 0;
    for (int64_t ib = 0; ib < nb; ib++) {
        const uint32_t qh = load_u32(x[ib].qh);
        int sumi = 0;
        for (int j = 0; j < QK / 2; j++) {
            const int xh0 = (int)(((qh >> (j + 0)) << 4) & 0x10);
            const int xh1 = (int)((qh >> (j + 12)) & 0x10);
            sumi += ((x[ib].qs[j] & 0x0F) | xh0) * y[ib].qs[j];
            sumi += ((x[ib].qs[j] >> 4) | xh1) * y[ib].qs[j + QK / 2];
        }
        sumf += (F16(x[ib].d) * F16(y[ib].d)) * (float)sumi + F16(x[ib].m) * F16(y[ib].s);
    }
    return sumf;
}

static float dot_q8_0_q8_0_ref(const block_q8_0 *x, const block_q8_0 *y, int64_t nb) {
    float sumf = 0;
    for (int64_t ib = 0; ib < nb; ib++) {
        int sumi = 0;
        for (int j = 0; j < QK; j++) sumi += x[ib].qs[j] * y[ib].qs[j];
        sumf += (float)sumi * (F16(x[ib].d) * F16(y[ib].d));
    }
    return sumf;
}

/* K-quants: per super-block, exact integer sums, then these float steps (shared with the AVX2
 * kernels, which is what makes them bit-identical to the reference). */
static inline float k_accum(float sumf, float d, int32_t sumi, float dmin, int32_t summ) {
    const float a = d * (float)sumi;
    const float b = dmin * (float)summ;
    return sumf + (a - b);
}

/* Unpack the eight 6-bit scales and mins of a Q4_K block. */
static inline void q4_K_scales(const uint8_t *s12, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 8; j++) get_scale_min_k4(j, s12, &sc[j], &mn[j]);
}

static inline int32_t q4_K_min_sum(const uint8_t mn[8], const int16_t *bsums) {
    int32_t summ = 0;
    for (int j = 0; j < QK_K / 16; j++) summ += mn[j / 2] * bsums[j];
    return summ;
}

static float dot_q4_K_q8_K_ref(const block_q4_K *x, const block_q8_K *y, int64_t nb) {
    float sumf = 0;
    for (int64_t i = 0; i < nb; i++) {
        uint8_t sc[8], mn[8];
        q4_K_scales(x[i].scales, sc, mn);
        int32_t sumi = 0;
        for (int j = 0; j < QK_K / 64; j++) {
            const uint8_t *q4 = x[i].qs + 32 * j;
            const int8_t *q8 = y[i].qs + 64 * j;
            int32_t lo = 0, hi = 0;
            for (int l = 0; l < 32; l++) {
                lo += (q4[l] & 0xF) * q8[l];
                hi += (q4[l] >> 4) * q8[l + 32];
            }
            sumi += sc[2 * j] * lo + sc[2 * j + 1] * hi;
        }
        const int32_t summ = q4_K_min_sum(mn, y[i].bsums);
        sumf = k_accum(sumf, y[i].d * F16(x[i].d), sumi, y[i].d * F16(x[i].dmin), summ);
    }
    return sumf;
}

static float dot_q6_K_q8_K_ref(const block_q6_K *x, const block_q8_K *y, int64_t nb) {
    float sumf = 0;
    int8_t q[QK_K];
    for (int64_t i = 0; i < nb; i++) {
        q6_K_unpack(&x[i], q);
        int32_t sumi = 0;
        for (int g = 0; g < QK_K / 16; g++) {
            int32_t s = 0;
            for (int l = 0; l < 16; l++) s += q[16 * g + l] * y[i].qs[16 * g + l];
            sumi += x[i].scales[g] * s;
        }
        sumf = k_accum(sumf, F16(x[i].d) * y[i].d, sumi, 0.0f, 0);
    }
    return sumf;
}

/* Checks shared by vec_dot and vec_dot_ref: returns the number of blocks, or -1. */
static inline int64_t dot_blocks(ggml_type t, const void *w, const void *a, int64_t n) {
    const ggml_type_info *ti = ggml_type_get(t);
    if (!ti || !ti->supported || !w || !a) return -1;
    return n_blocks(ti, n);
}

float vec_dot_ref(ggml_type t, const void *w, const void *a, int64_t n) {
    const int64_t nb = dot_blocks(t, w, a, n);
    if (nb < 0) return NAN;
    switch (t) {
    case GGML_TYPE_F32: return dot_f32_ref(w, a, n);
    case GGML_TYPE_F16: return dot_f16_ref(w, a, n);
    case GGML_TYPE_BF16: return dot_bf16_ref(w, a, n);
    case GGML_TYPE_Q4_0: return dot_q4_0_q8_0_ref(w, a, nb);
    case GGML_TYPE_Q4_1: return dot_q4_1_q8_1_ref(w, a, nb);
    case GGML_TYPE_Q5_0: return dot_q5_0_q8_0_ref(w, a, nb);
    case GGML_TYPE_Q5_1: return dot_q5_1_q8_1_ref(w, a, nb);
    case GGML_TYPE_Q8_0: return dot_q8_0_q8_0_ref(w, a, nb);
    case GGML_TYPE_Q4_K: return dot_q4_K_q8_K_ref(w, a, nb);
    case GGML_TYPE_Q6_K: return dot_q6_K_q8_K_ref(w, a, nb);
    default: return NAN;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* AVX2 + FMA kernels (ggml-cpu x86 style)                                                   */

#ifdef QUANT_AVX2
#define AI static inline __attribute__((always_inline))

/* 32 nibbles -> 32 bytes: low nibbles of p[0..15] then high nibbles (ggml element order). */
AI __m256i bytes_from_nibbles_32(const uint8_t *p) {
    const __m128i tmp = _mm_loadu_si128((const __m128i *)p);
    const __m256i bytes = _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp);
    return _mm256_and_si256(_mm256_set1_epi8(0xF), bytes);
}

/* 32 bits -> 32 bytes, 0xFF where the bit is set. */
AI __m256i bytes_from_bits_32(const uint8_t *p) {
    const uint32_t x32 = load_u32(p);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                           0x0101010101010101, 0x0000000000000000);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x32), shuf);
    bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}

/* unsigned x (0..255) times signed y (-127..127), pairs summed, as 8 floats */
AI __m256 sum_us8_pairs_float(__m256i ax, __m256i sy) {
    const __m256i dot = _mm256_maddubs_epi16(ax, sy);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), dot));
}

/* signed x times signed y (y never -128: activation quantizers clamp to +-127) */
AI __m256 sum_i8_pairs_float(__m256i x, __m256i y) {
    return sum_us8_pairs_float(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
}

AI float hsum_float_8(__m256 x) {
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

AI int32_t hsum_i32_8(__m256i x) {
    __m128i r = _mm_add_epi32(_mm256_extracti128_si256(x, 1), _mm256_castsi256_si128(x));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, _MM_SHUFFLE(1, 0, 3, 2)));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(r);
}

/* Two adjacent fp16 values (a block's d and m, or d and s) to float with one load and one
 * conversion: the same values as two F16() calls, at half the instructions in the hot loop. */
AI void f16_pair(const uint16_t *p, float *a, float *b) {
    uint32_t bits;
    memcpy(&bits, p, sizeof bits);
    const __m128 v = _mm_cvtph_ps(_mm_cvtsi32_si128((int)bits));
    *a = _mm_cvtss_f32(v);
    *b = _mm_cvtss_f32(_mm_movehdup_ps(v));
}

/* A weight block unpacked for the integer dot: quants as bytes, scale, and min (Q4_1/Q5_1). */
typedef struct { __m256i q; float d, m; } wblock;

/* Unpacks block ib of a row of weight type T (constant after inlining). */
AI wblock legacy_unpack(ggml_type T, const uint8_t *row, int64_t ib) {
    wblock wb = { _mm256_setzero_si256(), 0.0f, 0.0f };
    switch (T) {
    case GGML_TYPE_Q8_0: {
        const block_q8_0 *x = (const block_q8_0 *)row + ib;
        wb.d = F16(x->d);
        wb.q = _mm256_loadu_si256((const __m256i *)x->qs);
        break;
    }
    case GGML_TYPE_Q4_0: {
        const block_q4_0 *x = (const block_q4_0 *)row + ib;
        wb.d = F16(x->d);
        wb.q = _mm256_sub_epi8(bytes_from_nibbles_32(x->qs), _mm256_set1_epi8(8));
        break;
    }
    case GGML_TYPE_Q5_0: {
        const block_q5_0 *x = (const block_q5_0 *)row + ib;
        wb.d = F16(x->d);
        __m256i qx = bytes_from_nibbles_32(x->qs);
        const __m256i hi = _mm256_andnot_si256(bytes_from_bits_32(x->qh), _mm256_set1_epi8((char)0xF0));
        wb.q = _mm256_or_si256(qx, hi); /* (q | h<<4) - 16 as two's complement bytes */
        break;
    }
    case GGML_TYPE_Q4_1: {
        const block_q4_1 *x = (const block_q4_1 *)row + ib;
        f16_pair(&x->d, &wb.d, &wb.m);
        wb.q = bytes_from_nibbles_32(x->qs);
        break;
    }
    case GGML_TYPE_Q5_1: {
        const block_q5_1 *x = (const block_q5_1 *)row + ib;
        f16_pair(&x->d, &wb.d, &wb.m);
        __m256i qx = bytes_from_nibbles_32(x->qs);
        wb.q = _mm256_or_si256(qx, _mm256_and_si256(bytes_from_bits_32(x->qh), _mm256_set1_epi8(0x10)));
        break;
    }
    default: break;
    }
    return wb;
}

/* One unpacked weight block against an activation block whose quants are qy and scales dy
 * (and sy = d*sum for Q8_1). Every kernel below goes through this one function, so a weight
 * row and an activation row always meet through the same operations, in the same order. */
AI void legacy_apply(ggml_type T, const wblock *wb, __m256i qy, float dy, float sy, __m256 *acc, float *summs) {
    const bool q81 = (T == GGML_TYPE_Q4_1 || T == GGML_TYPE_Q5_1);
    if (q81) *summs += wb->m * sy;
    const __m256 d = _mm256_set1_ps(wb->d * dy);
    *acc = _mm256_fmadd_ps(d, q81 ? sum_us8_pairs_float(wb->q, qy) : sum_i8_pairs_float(wb->q, qy), *acc);
}

AI void legacy_act(ggml_type T, const void *a, int64_t ib, __m256i *qy, float *dy, float *sy) {
    if (T == GGML_TYPE_Q4_1 || T == GGML_TYPE_Q5_1) {
        const block_q8_1 *y = (const block_q8_1 *)a + ib;
        *qy = _mm256_loadu_si256((const __m256i *)y->qs);
        f16_pair(&y->d, dy, sy);
    } else {
        const block_q8_0 *y = (const block_q8_0 *)a + ib;
        *qy = _mm256_loadu_si256((const __m256i *)y->qs);
        *dy = F16(y->d);
        *sy = 0.0f;
    }
}

/* R weight rows (stride ws) against C activation rows (stride as): out[c * os + r]. Each
 * (row, activation) accumulator sees exactly the same operations whatever R and C are, hence
 * vec_dot_n and vec_dot_tile equal vec_dot bit for bit. A tile unpacks each weight block once
 * for all C activations (the win in batched prefill). */
AI void legacy_tile(ggml_type T, int R, int C, const uint8_t *w, size_t ws, const uint8_t *a, size_t as,
                    int64_t nb, float *out, size_t os) {
    __m256 acc[4][2];
    float summs[4][2];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 2
        for (int c = 0; c < C; c++) { acc[r][c] = _mm256_setzero_ps(); summs[r][c] = 0.0f; }
    for (int64_t ib = 0; ib < nb; ib++) {
        __m256i qy[2];
        float dy[2], sy[2];
#pragma GCC unroll 2
        for (int c = 0; c < C; c++) legacy_act(T, a + (size_t)c * as, ib, &qy[c], &dy[c], &sy[c]);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const wblock wb = legacy_unpack(T, w + (size_t)r * ws, ib);
#pragma GCC unroll 2
            for (int c = 0; c < C; c++) legacy_apply(T, &wb, qy[c], dy[c], sy[c], &acc[r][c], &summs[r][c]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 2
        for (int c = 0; c < C; c++) out[(size_t)c * os + r] = hsum_float_8(acc[r][c]) + summs[r][c];
}

AI void legacy_rows(ggml_type T, int R, const uint8_t *w, size_t ws, const void *a, int64_t nb,
                    float *out) {
    legacy_tile(T, R, 1, w, ws, a, 0, nb, out, 0);
}

typedef void (*tile_fn)(const uint8_t *w, size_t ws, const uint8_t *a, size_t as, int64_t nb, float *out, size_t os);
typedef void (*rows_fn)(const uint8_t *w, size_t ws, const void *a, int64_t nb, float *out);
#define LEGACY_KERNELS(T, name)                                                                  \
    static void name##_r1(const uint8_t *w, size_t ws, const void *a, int64_t nb, float *out) {  \
        legacy_rows(T, 1, w, ws, a, nb, out);                                                    \
    }                                                                                            \
    static void name##_r4(const uint8_t *w, size_t ws, const void *a, int64_t nb, float *out) {  \
        legacy_rows(T, 4, w, ws, a, nb, out);                                                    \
    }
#define LEGACY_TILES(T, name)                                                                    \
    static void name##_t42(const uint8_t *w, size_t ws, const uint8_t *a, size_t as, int64_t nb,   \
                           float *out, size_t os) {                                                \
        legacy_tile(T, 4, 2, w, ws, a, as, nb, out, os);                                           \
    }
LEGACY_TILES(GGML_TYPE_Q8_0, dot_q8_0)
LEGACY_TILES(GGML_TYPE_Q4_0, dot_q4_0)
LEGACY_TILES(GGML_TYPE_Q5_0, dot_q5_0)
LEGACY_TILES(GGML_TYPE_Q4_1, dot_q4_1)
LEGACY_TILES(GGML_TYPE_Q5_1, dot_q5_1)

static tile_fn legacy_tile42(ggml_type t) {
    switch (t) {
    case GGML_TYPE_Q8_0: return dot_q8_0_t42;
    case GGML_TYPE_Q4_0: return dot_q4_0_t42;
    case GGML_TYPE_Q5_0: return dot_q5_0_t42;
    case GGML_TYPE_Q4_1: return dot_q4_1_t42;
    case GGML_TYPE_Q5_1: return dot_q5_1_t42;
    default: return NULL;
    }
}

LEGACY_KERNELS(GGML_TYPE_Q8_0, dot_q8_0)
LEGACY_KERNELS(GGML_TYPE_Q4_0, dot_q4_0)
LEGACY_KERNELS(GGML_TYPE_Q5_0, dot_q5_0)
LEGACY_KERNELS(GGML_TYPE_Q4_1, dot_q4_1)
LEGACY_KERNELS(GGML_TYPE_Q5_1, dot_q5_1)

static bool legacy_kernels(ggml_type t, rows_fn *r1, rows_fn *r4) {
    switch (t) {
    case GGML_TYPE_Q8_0: *r1 = dot_q8_0_r1; *r4 = dot_q8_0_r4; return true;
    case GGML_TYPE_Q4_0: *r1 = dot_q4_0_r1; *r4 = dot_q4_0_r4; return true;
    case GGML_TYPE_Q5_0: *r1 = dot_q5_0_r1; *r4 = dot_q5_0_r4; return true;
    case GGML_TYPE_Q4_1: *r1 = dot_q4_1_r1; *r4 = dot_q4_1_r4; return true;
    case GGML_TYPE_Q5_1: *r1 = dot_q5_1_r1; *r4 = dot_q5_1_r4; return true;
    default: return false;
    }
}

/* ---- x4: four rows interleaved block by block (see quant_repack_x4) ----
 * A group block holds block ib of 4 consecutive rows: their fp16 scales side by side (d0..d3,
 * then m0..m3 for Q4_1), then the quants: Q8_0 row by row (4 x 32 bytes); Q4_0/Q4_1 as two
 * 32-byte pairs where byte j holds element j of the even row in its low nibble and of the odd
 * row in its high nibble. One load then gives two rows' quants in element order, one
 * conversion gives four scales, and a matmul reads its weights as one sequential stream.
 * Each (row, activation) accumulator takes exactly the steps legacy_tile takes (same products,
 * same lanes, same order), so x4 results equal vec_dot's bit for bit. */
AI __m256i x4_nib_lo(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0xF)); }
AI __m256i x4_nib_hi(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0xF)); }

AI void x4_tile(ggml_type T, int C, const uint8_t *g, size_t gb, const uint8_t *a, size_t as, int64_t nb,
                float *out, size_t os) {
    const bool q81 = (T == GGML_TYPE_Q4_1);
    __m256 acc[4][2];
    __m128 summ[2];
#pragma GCC unroll 2
    for (int c = 0; c < C; c++) {
        summ[c] = _mm_setzero_ps();
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) acc[r][c] = _mm256_setzero_ps();
    }
    for (int64_t ib = 0; ib < nb; ib++, g += gb) {
        __m256i qy[2];
        float dy[2], sy[2];
#pragma GCC unroll 2
        for (int c = 0; c < C; c++) legacy_act(T, a + (size_t)c * as, ib, &qy[c], &dy[c], &sy[c]);
        __m256 dd;
        __m128 m4 = _mm_setzero_ps();
        __m256i q[4];
        if (q81) {
            const __m256 dm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)g));
            dd = _mm256_permute2f128_ps(dm, dm, 0x00);
            m4 = _mm256_extractf128_ps(dm, 1);
        } else {
            const __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)g));
            dd = _mm256_set_m128(d4, d4);
        }
        if (T == GGML_TYPE_Q8_0) {
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) q[r] = _mm256_loadu_si256((const __m256i *)(g + 8 + 32 * r));
        } else {
            const uint8_t *qs = g + (q81 ? 16 : 8);
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)qs);
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(qs + 32));
            q[0] = x4_nib_lo(v0); q[1] = x4_nib_hi(v0); q[2] = x4_nib_lo(v1); q[3] = x4_nib_hi(v1);
            if (T == GGML_TYPE_Q4_0)
#pragma GCC unroll 4
                for (int r = 0; r < 4; r++) q[r] = _mm256_sub_epi8(q[r], _mm256_set1_epi8(8));
        }
#pragma GCC unroll 2
        for (int c = 0; c < C; c++) {
            const __m256 ddc = _mm256_mul_ps(dd, _mm256_set1_ps(dy[c])); /* = d_r * dy, lane r */
            if (q81) summ[c] = _mm_add_ps(summ[c], _mm_mul_ps(m4, _mm_set1_ps(sy[c])));
            __m256 d[4];
            d[0] = _mm256_shuffle_ps(ddc, ddc, 0x00);
            d[1] = _mm256_shuffle_ps(ddc, ddc, 0x55);
            d[2] = _mm256_shuffle_ps(ddc, ddc, 0xAA);
            d[3] = _mm256_shuffle_ps(ddc, ddc, 0xFF);
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++)
                acc[r][c] = _mm256_fmadd_ps(d[r], q81 ? sum_us8_pairs_float(q[r], qy[c]) : sum_i8_pairs_float(q[r], qy[c]),
                                            acc[r][c]);
        }
    }
#pragma GCC unroll 2
    for (int c = 0; c < C; c++) {
        float sm[4];
        _mm_storeu_ps(sm, summ[c]);
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) out[(size_t)c * os + r] = hsum_float_8(acc[r][c]) + sm[r];
    }
}

typedef void (*x4_fn)(const uint8_t *g, size_t gb, const uint8_t *a, size_t as, int64_t nb, float *out, size_t os);
#define X4_KERNELS(T, name)                                                                           \
    static void name##_x4c1(const uint8_t *g, size_t gb, const uint8_t *a, size_t as, int64_t nb,     \
                            float *out, size_t os) { x4_tile(T, 1, g, gb, a, as, nb, out, os); }       \
    static void name##_x4c2(const uint8_t *g, size_t gb, const uint8_t *a, size_t as, int64_t nb,     \
                            float *out, size_t os) { x4_tile(T, 2, g, gb, a, as, nb, out, os); }
X4_KERNELS(GGML_TYPE_Q4_0, dot_q4_0)
X4_KERNELS(GGML_TYPE_Q4_1, dot_q4_1)
X4_KERNELS(GGML_TYPE_Q8_0, dot_q8_0)

static bool x4_kernels(ggml_type t, x4_fn *c1, x4_fn *c2) {
    switch (t) {
    case GGML_TYPE_Q4_0: *c1 = dot_q4_0_x4c1; *c2 = dot_q4_0_x4c2; return true;
    case GGML_TYPE_Q4_1: *c1 = dot_q4_1_x4c1; *c2 = dot_q4_1_x4c2; return true;
    case GGML_TYPE_Q8_0: *c1 = dot_q8_0_x4c1; *c2 = dot_q8_0_x4c2; return true;
    default: return false;
    }
}

/* Float weights: 8-lane partial sums in 4 accumulators, then a scalar tail. */
AI __m256 load8_as_f32(ggml_type T, const void *x, int64_t i) {
    if (T == GGML_TYPE_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i)));
    if (T == GGML_TYPE_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i))), 16));
    return _mm256_loadu_ps((const float *)x + i);
}

AI float scalar_as_f32(ggml_type T, const void *x, int64_t i) {
    if (T == GGML_TYPE_F16) return fp16_to_fp32(((const uint16_t *)x)[i]);
    if (T == GGML_TYPE_BF16) return bf16_to_fp32(((const uint16_t *)x)[i]);
    return ((const float *)x)[i];
}

AI float dot_float_avx2(ggml_type T, const void *x, const float *y, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(load8_as_f32(T, x, i + 0), _mm256_loadu_ps(y + i + 0), a0);
        a1 = _mm256_fmadd_ps(load8_as_f32(T, x, i + 8), _mm256_loadu_ps(y + i + 8), a1);
        a2 = _mm256_fmadd_ps(load8_as_f32(T, x, i + 16), _mm256_loadu_ps(y + i + 16), a2);
        a3 = _mm256_fmadd_ps(load8_as_f32(T, x, i + 24), _mm256_loadu_ps(y + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(load8_as_f32(T, x, i), _mm256_loadu_ps(y + i), a0);
    float s = hsum_float_8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++) s += scalar_as_f32(T, x, i) * y[i];
    return s;
}

/* Shuffle masks that broadcast the 16-bit lane k (bytes 2k, 2k+1) of a register. */
static const uint8_t k4_shuffle[8][32] = {
#define R2(k) 2 * k, 2 * k + 1
#define R16(k) R2(k), R2(k), R2(k), R2(k), R2(k), R2(k), R2(k), R2(k), R2(k), R2(k), R2(k), R2(k), R2(k), R2(k), R2(k), R2(k)
    {R16(0)}, {R16(1)}, {R16(2)}, {R16(3)}, {R16(4)}, {R16(5)}, {R16(6)}, {R16(7)},
#undef R16
#undef R2
};
/* Q6_K: bytes g (x8) then g+1 (x8), for g = 0, 2, ..., 14. */
static const uint8_t q6_shuffle[8][16] = {
#define S(g) g, g, g, g, g, g, g, g, g + 1, g + 1, g + 1, g + 1, g + 1, g + 1, g + 1, g + 1
    {S(0)}, {S(2)}, {S(4)}, {S(6)}, {S(8)}, {S(10)}, {S(12)}, {S(14)},
#undef S
};

static float dot_q4_K_q8_K_avx2(const block_q4_K *x, const block_q8_K *y, int64_t nb) {
    const uint32_t kmask1 = 0x3f3f3f3f, kmask2 = 0x0f0f0f0f, kmask3 = 0x03030303;
    const __m256i m4 = _mm256_set1_epi8(0xF);
    float sumf = 0;
    for (int64_t i = 0; i < nb; i++) {
        /* ggml's unpacking of the 12 scale bytes: bytes 0..7 scales, 8..15 mins */
        uint32_t utmp[4];
        memcpy(utmp, x[i].scales, 12);
        utmp[3] = ((utmp[2] >> 4) & kmask2) | (((utmp[1] >> 6) & kmask3) << 4);
        const uint32_t uaux = utmp[1] & kmask1;
        utmp[1] = (utmp[2] & kmask2) | (((utmp[0] >> 6) & kmask3) << 4);
        utmp[2] = uaux;
        utmp[0] &= kmask1;
        const __m256i mins_and_scales =
            _mm256_cvtepu8_epi16(_mm_set_epi32((int)utmp[3], (int)utmp[2], (int)utmp[1], (int)utmp[0]));
        /* sum over 16-groups of bsums pairs (one per 32-sub-block) times mins */
        const __m256i q8sums = _mm256_loadu_si256((const __m256i *)y[i].bsums);
        const __m128i q8s = _mm_hadd_epi16(_mm256_castsi256_si128(q8sums), _mm256_extracti128_si256(q8sums, 1));
        __m128i pm = _mm_madd_epi16(_mm256_extracti128_si256(mins_and_scales, 1), q8s);
        pm = _mm_add_epi32(pm, _mm_shuffle_epi32(pm, _MM_SHUFFLE(1, 0, 3, 2)));
        pm = _mm_add_epi32(pm, _mm_shuffle_epi32(pm, _MM_SHUFFLE(2, 3, 0, 1)));
        const int32_t summ = _mm_cvtsi128_si32(pm);

        const __m128i sc128 = _mm256_castsi256_si128(mins_and_scales);
        const __m256i scales = _mm256_set_m128i(sc128, sc128);
        __m256i sumi = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int j = 0; j < QK_K / 64; j++) {
            const __m256i scale_l = _mm256_shuffle_epi8(scales, _mm256_loadu_si256((const __m256i *)k4_shuffle[2 * j]));
            const __m256i scale_h = _mm256_shuffle_epi8(scales, _mm256_loadu_si256((const __m256i *)k4_shuffle[2 * j + 1]));
            const __m256i q4 = _mm256_loadu_si256((const __m256i *)(x[i].qs + 32 * j));
            const __m256i q4l = _mm256_and_si256(q4, m4);
            const __m256i q4h = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
            const __m256i q8l = _mm256_loadu_si256((const __m256i *)(y[i].qs + 64 * j));
            const __m256i q8h = _mm256_loadu_si256((const __m256i *)(y[i].qs + 64 * j + 32));
            const __m256i pl = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(q4l, q8l));
            const __m256i ph = _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(q4h, q8h));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
        }
        sumf = k_accum(sumf, y[i].d * F16(x[i].d), hsum_i32_8(sumi), y[i].d * F16(x[i].dmin), summ);
    }
    return sumf;
}

static float dot_q6_K_q8_K_avx2(const block_q6_K *x, const block_q8_K *y, int64_t nb) {
    const __m256i m4 = _mm256_set1_epi8(0xF), m2 = _mm256_set1_epi8(3), m32s = _mm256_set1_epi8(32);
    float sumf = 0;
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *q4 = x[i].ql, *qh = x[i].qh;
        const int8_t *q8 = y[i].qs;
        const __m128i scales = _mm_loadu_si128((const __m128i *)x[i].scales);
        __m256i sumi = _mm256_setzero_si256();
#pragma GCC unroll 2
        for (int j = 0; j < QK_K / 128; j++) {
            const __m256i b1 = _mm256_loadu_si256((const __m256i *)q4);
            const __m256i b2 = _mm256_loadu_si256((const __m256i *)(q4 + 32));
            const __m256i bh = _mm256_loadu_si256((const __m256i *)qh);
            q4 += 64;
            qh += 32;
            __m256i q6[4];
            q6[0] = _mm256_or_si256(_mm256_and_si256(b1, m4), _mm256_slli_epi16(_mm256_and_si256(bh, m2), 4));
            q6[1] = _mm256_or_si256(_mm256_and_si256(b2, m4),
                                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 2), m2), 4));
            q6[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b1, 4), m4),
                                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 4), m2), 4));
            q6[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b2, 4), m4),
                                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 6), m2), 4));
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                const __m256i y8 = _mm256_loadu_si256((const __m256i *)(q8 + 32 * k));
                /* (q - 32) * y = q*y - 32*y, both fit int16 after maddubs */
                const __m256i p = _mm256_sub_epi16(_mm256_maddubs_epi16(q6[k], y8), _mm256_maddubs_epi16(m32s, y8));
                const __m128i sh = _mm_loadu_si128((const __m128i *)q6_shuffle[4 * j + k]);
                const __m256i s16 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, sh));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(s16, p));
            }
            q8 += 128;
        }
        sumf = k_accum(sumf, F16(x[i].d) * y[i].d, hsum_i32_8(sumi), 0.0f, 0);
    }
    return sumf;
}
#endif /* QUANT_AVX2 */

/* ---------------------------------------------------------------------------------------- */
/* Dispatch                                                                                  */

float vec_dot(ggml_type t, const void *w, const void *a, int64_t n) {
#ifdef QUANT_AVX2
    const int64_t nb = dot_blocks(t, w, a, n);
    if (nb < 0) return NAN;
    float out;
    switch (t) {
    case GGML_TYPE_Q8_0: dot_q8_0_r1(w, 0, a, nb, &out); return out;
    case GGML_TYPE_Q4_0: dot_q4_0_r1(w, 0, a, nb, &out); return out;
    case GGML_TYPE_Q5_0: dot_q5_0_r1(w, 0, a, nb, &out); return out;
    case GGML_TYPE_Q4_1: dot_q4_1_r1(w, 0, a, nb, &out); return out;
    case GGML_TYPE_Q5_1: dot_q5_1_r1(w, 0, a, nb, &out); return out;
    case GGML_TYPE_F32: return dot_float_avx2(GGML_TYPE_F32, w, a, n);
    case GGML_TYPE_F16: return dot_float_avx2(GGML_TYPE_F16, w, a, n);
    case GGML_TYPE_BF16: return dot_float_avx2(GGML_TYPE_BF16, w, a, n);
    case GGML_TYPE_Q4_K: return dot_q4_K_q8_K_avx2(w, a, nb);
    case GGML_TYPE_Q6_K: return dot_q6_K_q8_K_avx2(w, a, nb);
    default: break;
    }
#endif
    return vec_dot_ref(t, w, a, n);
}

void vec_dot_n(ggml_type t, const void *w, size_t w_stride, int nw, const void *a, float *out,
               int64_t n) {
    if (nw <= 0 || !out) return;
    const int64_t nb = dot_blocks(t, w, a, n);
    if (nb < 0) {
        for (int i = 0; i < nw; i++) out[i] = NAN;
        return;
    }
    const uint8_t *wb = w;
    int i = 0;
#ifdef QUANT_AVX2
    rows_fn r1, r4;
    if (legacy_kernels(t, &r1, &r4)) {
        for (; i + 4 <= nw; i += 4) r4(wb + (size_t)i * w_stride, w_stride, a, nb, out + i);
        for (; i < nw; i++) r1(wb + (size_t)i * w_stride, 0, a, nb, out + i);
        return;
    }
#endif
    for (; i < nw; i++) out[i] = vec_dot(t, wb + (size_t)i * w_stride, a, n);
}

void vec_dot_tile(ggml_type t, const void *w, size_t w_stride, int nw, const void *a, size_t a_stride,
                  int na, float *out, size_t out_stride, int64_t n) {
    if (nw <= 0 || na <= 0 || !out) return;
    const uint8_t *wb = w, *ab = a;
    int c = 0;
#ifdef QUANT_AVX2
    tile_fn t42 = legacy_tile42(t);
    const int64_t nb = dot_blocks(t, w, a, n);
    if (t42 && nb >= 0) {
        for (; c + 2 <= na; c += 2) {
            int r = 0;
            for (; r + 4 <= nw; r += 4)
                t42(wb + (size_t)r * w_stride, w_stride, ab + (size_t)c * a_stride, a_stride, nb,
                    out + (size_t)c * out_stride + r, out_stride);
            for (int cc = c; cc < c + 2; cc++)
                if (r < nw) vec_dot_n(t, wb + (size_t)r * w_stride, w_stride, nw - r, ab + (size_t)cc * a_stride,
                                      out + (size_t)cc * out_stride + r, n);
        }
    }
#endif
    for (; c < na; c++) vec_dot_n(t, wb, w_stride, nw, ab + (size_t)c * a_stride, out + (size_t)c * out_stride, n);
}

/* ---------------------------------------------------------------------------------------- */
/* x4: interleaved rows                                                                      */

bool quant_x4_supported(ggml_type t) {
#ifdef QUANT_AVX2
    return t == GGML_TYPE_Q4_0 || t == GGML_TYPE_Q4_1 || t == GGML_TYPE_Q8_0;
#else
    (void)t;
    return false; /* the layout only pays with the SIMD kernels; scalar builds keep rows */
#endif
}

/* element j (0..31) of a Q4 block's 16 quant bytes */
static inline uint8_t q4_elem(const uint8_t *qs, int j) { return j < 16 ? qs[j] & 0xF : qs[j - 16] >> 4; }

int quant_repack_x4(ggml_type t, const void *src, void *dst, int64_t rows, int64_t n) {
    const size_t rs = quant_x4_supported(t) ? ggml_row_size(t, n) : 0;
    if (rs == 0 || rows <= 0 || rows % 4 != 0 || !src || !dst) return -1;
    const int64_t nb = n / 32;
    const size_t bb = ggml_type_get(t)->type_size; /* one row's block */
    for (int64_t g = 0; g < rows / 4; g++) {
        const uint8_t *rows4 = (const uint8_t *)src + (size_t)g * 4 * rs;
        uint8_t *o = (uint8_t *)dst + (size_t)g * 4 * rs;
        for (int64_t ib = 0; ib < nb; ib++, o += 4 * bb) {
            const uint8_t *blk[4];
            for (int r = 0; r < 4; r++) blk[r] = rows4 + (size_t)r * rs + (size_t)ib * bb;
            /* every type here starts its block with the fp16 d (Q4_1: then m) */
            for (int r = 0; r < 4; r++) memcpy(o + 2 * r, blk[r], 2);
            if (t == GGML_TYPE_Q8_0) {
                for (int r = 0; r < 4; r++) memcpy(o + 8 + 32 * r, blk[r] + 2, 32);
                continue;
            }
            const size_t qoff = t == GGML_TYPE_Q4_1 ? 4 : 2; /* offset of qs in a row block */
            uint8_t *q = o + (t == GGML_TYPE_Q4_1 ? 16 : 8);
            if (t == GGML_TYPE_Q4_1)
                for (int r = 0; r < 4; r++) memcpy(o + 8 + 2 * r, blk[r] + 2, 2);
            for (int p = 0; p < 2; p++)
                for (int j = 0; j < 32; j++)
                    q[32 * p + j] = (uint8_t)(q4_elem(blk[2 * p] + qoff, j) | q4_elem(blk[2 * p + 1] + qoff, j) << 4);
        }
    }
    return 0;
}

void vec_dot_tile_x4(ggml_type t, const void *w, int r0, int nw, const void *a, size_t a_stride, int na,
                     float *out, size_t out_stride, int64_t n) {
    if (nw <= 0 || na <= 0 || !out || r0 < 0) return;
#ifdef QUANT_AVX2
    x4_fn c1, c2;
    const size_t rs = ggml_row_size(t, n);
    if (x4_kernels(t, &c1, &c2) && rs) {
        const int64_t nb = n / 32;
        const size_t gb = 4 * ggml_type_get(t)->type_size;
        for (int c = 0; c < na;) {
            const int cc = na - c >= 2 ? 2 : 1;
            const uint8_t *ap = (const uint8_t *)a + (size_t)c * a_stride;
            for (int g = r0 / 4; g * 4 < r0 + nw; g++) {
                const uint8_t *gp = (const uint8_t *)w + (size_t)g * 4 * rs;
                const int lo = g * 4;
                if (lo >= r0 && lo + 4 <= r0 + nw) { /* whole group inside the range */
                    (cc == 2 ? c2 : c1)(gp, gb, ap, a_stride, nb, out + (size_t)c * out_stride + (lo - r0), out_stride);
                    continue;
                }
                float tmp[2 * 4];
                (cc == 2 ? c2 : c1)(gp, gb, ap, a_stride, nb, tmp, 4);
                for (int k = 0; k < cc; k++)
                    for (int r = lo; r < lo + 4; r++)
                        if (r >= r0 && r < r0 + nw) out[(size_t)(c + k) * out_stride + (r - r0)] = tmp[k * 4 + (r - lo)];
            }
            c += cc;
        }
        return;
    }
#endif
    (void)w; (void)a; (void)a_stride; (void)t; (void)n;
    for (int c = 0; c < na; c++)
        for (int r = 0; r < nw; r++) out[(size_t)c * out_stride + r] = NAN; /* not packable here */
}

/* ---------------------------------------------------------------------------------------- */
/* Random rows for tests and benchmarks                                                      */

static inline uint64_t rng_next(uint64_t *s) { /* splitmix64 */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static inline float rng_uniform(uint64_t *s) { /* [-1, 1) */
    return (float)((double)(rng_next(s) >> 11) * 0x1p-52 - 1.0);
}
static inline uint16_t rng_scale16(uint64_t *s, bool allow_negative) {
    /* magnitude in [2^-8, 2^-3): finite, normal, products stay far from overflow */
    float m = ldexpf(1.0f + 0.5f * (rng_uniform(s) + 1.0f), -8 + (int)(rng_next(s) % 5));
    if (allow_negative && (rng_next(s) & 1)) m = -m;
    return fp32_to_fp16(m);
}

int quant_fill_random(ggml_type t, void *dst, int64_t n, uint64_t seed) {
    const size_t rs = ggml_row_size(t, n);
    if (!dst || rs == 0 || !can_dequantize(t)) return -1;
    uint64_t s = seed ^ 0x5eed5eed5eedull;
    uint8_t *b = dst;
    if (t == GGML_TYPE_F32) {
        for (int64_t i = 0; i < n; i++) ((float *)dst)[i] = rng_uniform(&s);
        return 0;
    }
    if (t == GGML_TYPE_F16 || t == GGML_TYPE_BF16) {
        for (int64_t i = 0; i < n; i++) {
            const float f = rng_uniform(&s);
            ((uint16_t *)dst)[i] = t == GGML_TYPE_F16 ? fp32_to_fp16(f) : fp32_to_bf16(f);
        }
        return 0;
    }
    for (size_t i = 0; i < rs; i++) b[i] = (uint8_t)rng_next(&s);
    const int64_t nb = n / ggml_type_get(t)->block_size;
    for (int64_t i = 0; i < nb; i++) {
        switch (t) {
        case GGML_TYPE_Q4_0: ((block_q4_0 *)dst)[i].d = rng_scale16(&s, true); break;
        case GGML_TYPE_Q5_0: ((block_q5_0 *)dst)[i].d = rng_scale16(&s, true); break;
        case GGML_TYPE_Q4_1:
            ((block_q4_1 *)dst)[i].d = rng_scale16(&s, false);
            ((block_q4_1 *)dst)[i].m = rng_scale16(&s, true);
            break;
        case GGML_TYPE_Q5_1:
            ((block_q5_1 *)dst)[i].d = rng_scale16(&s, false);
            ((block_q5_1 *)dst)[i].m = rng_scale16(&s, true);
            break;
        case GGML_TYPE_Q8_0: {
            block_q8_0 *y = (block_q8_0 *)dst + i;
            y->d = rng_scale16(&s, true);
            for (int j = 0; j < QK; j++) if (y->qs[j] == -128) y->qs[j] = -127;
            break;
        }
        case GGML_TYPE_Q8_1: {
            block_q8_1 *y = (block_q8_1 *)dst + i;
            y->d = rng_scale16(&s, false);
            int sum = 0;
            for (int j = 0; j < QK; j++) {
                if (y->qs[j] == -128) y->qs[j] = -127;
                sum += y->qs[j];
            }
            y->s = fp32_to_fp16((float)sum * F16(y->d));
            break;
        }
        case GGML_TYPE_Q4_K:
            ((block_q4_K *)dst)[i].d = rng_scale16(&s, false);
            ((block_q4_K *)dst)[i].dmin = rng_scale16(&s, false);
            break;
        case GGML_TYPE_Q6_K: ((block_q6_K *)dst)[i].d = rng_scale16(&s, true); break;
        case GGML_TYPE_Q8_K: {
            block_q8_K *y = (block_q8_K *)dst + i;
            y->d = F16(rng_scale16(&s, false));
            for (int j = 0; j < QK_K; j++) if (y->qs[j] == -128) y->qs[j] = -127;
            for (int g = 0; g < QK_K / 16; g++) {
                int sum = 0;
                for (int l = 0; l < 16; l++) sum += y->qs[16 * g + l];
                y->bsums[g] = (int16_t)sum;
            }
            break;
        }
        default: return -1;
        }
    }
    return 0;
}

/* ---- dequantize_rows_f16: a matrix to fp16 on several threads ---- */
typedef struct {
    ggml_type t;
    const uint8_t *src;
    size_t rb, r0, r1;
    int64_t cols;
    uint16_t *dst;
    int rc;
} f16_job;

static void *f16_rows(void *arg) {
    f16_job *j = arg;
    float *row = malloc((size_t)j->cols * sizeof *row);
    if (!row) { j->rc = -1; return NULL; }
    for (size_t r = j->r0; r < j->r1; r++) {
        uint16_t *d = j->dst + r * (size_t)j->cols;
        dequantize_row(j->t, j->src + r * j->rb, row, j->cols);
        for (int64_t c = 0; c < j->cols; c++) d[c] = fp32_to_fp16(row[c]);
    }
    free(row);
    return NULL;
}

int dequantize_rows_f16(ggml_type t, const void *src, size_t rows, int64_t cols, uint16_t *dst, int n_threads) {
    const size_t rb = ggml_row_size(t, cols);
    if (!rb || cols <= 0) return -1;
    enum { MAX_THREADS = 64 };
    if (n_threads < 1) n_threads = 1;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    /* at least 64 rows a thread: a small matrix is not worth the threads */
    if ((size_t)n_threads > rows / 64) n_threads = rows / 64 > 0 ? (int)(rows / 64) : 1;
    f16_job jobs[MAX_THREADS];
    pthread_t th[MAX_THREADS];
    bool started[MAX_THREADS] = { false };
    for (int i = 0; i < n_threads; i++) {
        jobs[i] = (f16_job){ t, src, rb, rows * (size_t)i / (size_t)n_threads, rows * (size_t)(i + 1) / (size_t)n_threads, cols, dst, 0 };
        /* thread 0's share runs here; the others on threads (their share here when one cannot start) */
        if (i > 0) started[i] = pthread_create(&th[i], NULL, f16_rows, &jobs[i]) == 0;
    }
    f16_rows(&jobs[0]);
    int rc = jobs[0].rc;
    for (int i = 1; i < n_threads; i++) {
        if (started[i]) pthread_join(th[i], NULL);
        else f16_rows(&jobs[i]);
        if (jobs[i].rc) rc = -1;
    }
    return rc;
}
