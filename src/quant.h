/* quant: GGML tensor block formats.
 *
 * For each weight type: a scalar reference dequantizer (the definition, checked against the
 * PyPI gguf package) and a dot product against activations quantized to the type's partner
 * format ("vec_dot_type", as in ggml: Q4_0/Q8_0 -> Q8_0, Q4_1 -> Q8_1, K-quants -> Q8_K,
 * float types -> F32). Each dot has a portable scalar version (*_ref) and a SIMD (AVX2)
 * version that tests check against it. Results of vec_dot depend only on its two input rows,
 * never on batch size or thread count: batched prefill and one-token decode are bit-identical.
 */
#ifndef PCACHE_QUANT_H
#define PCACHE_QUANT_H
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

typedef enum {
    GGML_TYPE_F32 = 0, GGML_TYPE_F16 = 1, GGML_TYPE_Q4_0 = 2, GGML_TYPE_Q4_1 = 3,
    GGML_TYPE_Q5_0 = 6, GGML_TYPE_Q5_1 = 7, GGML_TYPE_Q8_0 = 8, GGML_TYPE_Q8_1 = 9,
    GGML_TYPE_Q2_K = 10, GGML_TYPE_Q3_K = 11, GGML_TYPE_Q4_K = 12, GGML_TYPE_Q5_K = 13,
    GGML_TYPE_Q6_K = 14, GGML_TYPE_Q8_K = 15, GGML_TYPE_BF16 = 30, GGML_TYPE_COUNT = 40
} ggml_type;

typedef struct {
    const char *name;
    int block_size;     /* elements per block (1 for float types) */
    size_t type_size;   /* bytes per block */
    bool supported;     /* we can dequantize and dot it */
} ggml_type_info;

const ggml_type_info *ggml_type_get(ggml_type t); /* NULL for unknown ids */
/* Bytes of one row of n elements; 0 if n is not a multiple of the block size or t is unknown. */
size_t ggml_row_size(ggml_type t, int64_t n);

/* fp16/bf16 <-> fp32 */
float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_fp16(float f);
float bf16_to_fp32(uint16_t h);

/* Scalar reference dequantization of n elements (n a multiple of the block size). */
void dequantize_row(ggml_type t, const void *src, float *dst, int64_t n);

/* Activation format that weights of type t are dotted against. */
ggml_type quant_vec_dot_type(ggml_type t);
/* Quantize n floats of activations into vec_dot_type(t) format (dst holds
 * ggml_row_size(vdt, n) bytes). For F32 vec_dot_type this is a copy. */
void quantize_row_act(ggml_type vdt, const float *x, void *dst, int64_t n);

/* Dot product of one weight row (type t, n elements) with one activation row already in
 * quant_vec_dot_type(t) format. Dispatches to SIMD when compiled in. */
float vec_dot(ggml_type t, const void *w, const void *a, int64_t n);
/* The portable scalar reference of the same computation. */
float vec_dot_ref(ggml_type t, const void *w, const void *a, int64_t n);

/* ---- additions (quant owner) ---------------------------------------------------------- */
/* Multi-row dot for batched matmuls: out[i] = vec_dot(t, w + i*w_stride, a, n) for i < nw,
 * bit-identical to calling vec_dot per row (rows are interleaved for ILP, never reordered
 * internally). */
void vec_dot_n(ggml_type t, const void *w, size_t w_stride, int nw, const void *a, float *out,
               int64_t n);
/* Scalar reference of quantize_row_act; quantize_row_act produces identical bytes. */
void quantize_row_act_ref(ggml_type vdt, const float *x, void *dst, int64_t n);
/* Portable conversions; the plain ones (F16C when compiled in) give identical results. */
float fp16_to_fp32_ref(uint16_t h);
uint16_t fp32_to_fp16_ref(float f);
uint16_t fp32_to_bf16(float f);     /* round to nearest even; NaN stays (quiet) NaN */
/* Name -> type ("Q4_1", case-insensitive); returns GGML_TYPE_COUNT if unknown. */
ggml_type ggml_type_from_name(const char *name);
/* Name of the SIMD path compiled in ("avx2" or "scalar"), for logs and benchmarks. */
const char *quant_simd_name(void);
/* Test/bench support: fill one row of n elements of type t (any dequantizable type, including
 * the activation formats Q8_0/Q8_1/Q8_K) with pseudo-random content from seed: random quants,
 * finite normal scales, int8 quants in [-127, 127], consistent Q8_1 s and Q8_K bsums.
 * Returns 0, or -1 for an unknown type or bad n. */
int quant_fill_random(ggml_type t, void *dst, int64_t n, uint64_t seed);
/* nw weight rows (stride w_stride bytes) against na activation rows (stride a_stride bytes):
 * out[c * out_stride + r] = vec_dot(t, w + r*w_stride, a + c*a_stride, n), bit for bit. Tiles of
 * rows x activations reuse each unpacked weight block (batched prefill). */
void vec_dot_tile(ggml_type t, const void *w, size_t w_stride, int nw, const void *a, size_t a_stride,
                  int na, float *out, size_t out_stride, int64_t n);
/* x4 layout: a matrix of rows (a multiple of 4) of type t stored as groups of 4 rows
 * interleaved block by block, in the same bytes as the row layout (group g starts where row
 * 4g did). Q4_0, Q4_1 and Q8_0 in SIMD builds; quant_x4_supported says. */
bool quant_x4_supported(ggml_type t);
/* Repacks rows x n elements from row layout (src) into x4 layout (dst, same size, not
 * overlapping). Returns -1 for an unsupported type, rows not a multiple of 4 or bad n. */
int quant_repack_x4(ggml_type t, const void *src, void *dst, int64_t rows, int64_t n);
/* vec_dot_tile over rows [r0, r0+nw) of an x4 matrix w (its base, not row r0):
 * out[c * out_stride + (r - r0)] equals vec_dot of the original row r, bit for bit. */
void vec_dot_tile_x4(ggml_type t, const void *w, int r0, int nw, const void *a, size_t a_stride, int na,
                     float *out, size_t out_stride, int64_t n);
/* rows x cols of type t (rows ggml_row_size(t, cols) bytes apart) as fp16 bits, dst[r * cols + c]:
 * dequantize_row's values rounded to nearest even (fp32_to_fp16), the same bits on any number of
 * threads (up to n_threads, rows split between them: a GPU upload's conversion). Returns 0, or
 * -1 for an unknown type or bad cols, or out of memory. */
int dequantize_rows_f16(ggml_type t, const void *src, size_t rows, int64_t cols, uint16_t *dst, int n_threads);
#endif
