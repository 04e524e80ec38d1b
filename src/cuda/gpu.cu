/* gpu.cu: the CUDA backend (see gpu.h). One forward pass per engine step:
 *
 *   embed -> per layer [RMSNorm -> Q,K,V matmuls (+bias) -> q/k norm, RoPE, K/V into the paged
 *   pool -> attention over the block tables -> output matmul (+= residual) -> RMSNorm ->
 *   gate, up matmuls -> SwiGLU -> down matmul (+= residual)] -> final RMSNorm of the rows whose
 *   logits are wanted -> output matmul -> logits to the host.
 *
 * Numerics. Weights are fp16 on the device (every GGUF type is dequantized by the CPU backend's
 * own reference dequantizers, then rounded to fp16); activations between kernels are fp32, and
 * enter a matmul as fp16, which meets the weights on the tensor cores with fp32 accumulation.
 * The KV cache is fp16 in the CPU backend's block layout. RMSNorm sums in double, as the CPU.
 * The results are close to the CPU backend's, not equal: the CPU quantizes activations to 8
 * bits before quantized matmuls (as llama.cpp's CPU backend does) and sums in another order.
 *
 * Batch invariance. A token's results never depend on what else is in the batch:
 * - matmuls: 64x64 output tiles, each 16x16 fragment accumulated by tensor-core MMAs in one
 *   fixed order along k (ascending 16-wide steps, zero-padded tails); no split-K, and the same
 *   kernel for every batch size, so a row's arithmetic is the same alone or among 512;
 * - attention: one warp per (token, query head) walks the positions in order, 32 at a time;
 * - norms, RoPE, SwiGLU: per token.
 */
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "gpu.h"
#include "quant.h"
}

using namespace nvcuda;

#define CK(call, what)                                                                                    \
    do {                                                                                                  \
        cudaError_t e_ = (call);                                                                          \
        if (e_ != cudaSuccess) {                                                                          \
            snprintf(err, errlen, "cuda: %s: %s", what, cudaGetErrorString(e_));                          \
            goto fail;                                                                                    \
        }                                                                                                 \
    } while (0)

/* ------------------------------------------------------------------------------ kernels */
#define MM_BM 64     /* output features per block */
#define MM_BN 64     /* tokens per block */
#define MM_BK 32     /* k per stage */
#define MM_LDA (MM_BK + 8)
#define MM_LDC (MM_BN + 4)

/* Y[n][ldy] (+)= X[n][K] . W[M][K]^T + bias: W and X fp16, Y fp32. 4 warps, each a 32x32 patch
 * (2x2 fragments of 16x16) of the 64x64 tile. */
__global__ void __launch_bounds__(128) k_matmul(const __half *__restrict__ W, const __half *__restrict__ X,
                                                float *__restrict__ Y, int M, int N, int K, int ldx, int ldy,
                                                const float *__restrict__ bias, int accumulate) {
    __shared__ __align__(32) __half As[MM_BM * MM_LDA];
    __shared__ __align__(32) __half Bs[MM_BN * MM_LDA];
    __shared__ __align__(32) float Cs[MM_BM * MM_LDC];
    const int m0 = blockIdx.x * MM_BM, n0 = blockIdx.y * MM_BN;
    const int tid = threadIdx.x, warp = tid / 32;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) wmma::fill_fragment(acc[i][j], 0.0f);
    for (int k0 = 0; k0 < K; k0 += MM_BK) {
        /* stage 64 rows x 32 k of W and of X (zero outside) */
        for (int i = tid; i < MM_BM * MM_BK; i += 128) {
            int r = i / MM_BK, c = i % MM_BK;
            int gm = m0 + r, gk = k0 + c;
            As[r * MM_LDA + c] = gm < M && gk < K ? W[(size_t)gm * K + gk] : __float2half(0.0f);
            int gn = n0 + r;
            Bs[r * MM_LDA + c] = gn < N && gk < K ? X[(size_t)gn * ldx + gk] : __float2half(0.0f);
        }
        __syncthreads();
        for (int kk = 0; kk < MM_BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b[2];
            for (int i = 0; i < 2; i++) wmma::load_matrix_sync(a[i], As + (wm + 16 * i) * MM_LDA + kk, MM_LDA);
            for (int j = 0; j < 2; j++) wmma::load_matrix_sync(b[j], Bs + (wn + 16 * j) * MM_LDA + kk, MM_LDA);
            for (int i = 0; i < 2; i++)
                for (int j = 0; j < 2; j++) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++)
            wmma::store_matrix_sync(Cs + (wm + 16 * i) * MM_LDC + wn + 16 * j, acc[i][j], MM_LDC, wmma::mem_row_major);
    __syncthreads();
    for (int i = tid; i < MM_BM * MM_BN; i += 128) {
        int n = i / MM_BM, m = i % MM_BM;   /* consecutive threads: consecutive outputs of a token */
        int gm = m0 + m, gn = n0 + n;
        if (gm >= M || gn >= N) continue;
        float v = Cs[m * MM_LDC + n];
        if (bias) v += bias[gm];
        float *y = Y + (size_t)gn * ldy + gm;
        *y = accumulate ? *y + v : v;
    }
}

/* x[t] = E[tok[t]] */
__global__ void k_embed(const __half *__restrict__ E, const int *__restrict__ tok, float *__restrict__ x, int d) {
    const int t = blockIdx.x;
    const __half *e = E + (size_t)tok[t] * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) x[(size_t)t * d + i] = __half2float(e[i]);
}

__device__ __forceinline__ double block_sum(double v, double *sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32, nw = blockDim.x / 32;
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    double s = 0;
    for (int i = 0; i < nw; i++) s += sh[i];
    return s;
}

/* out[i] = fp16(x[rows[i]] * rsqrt(mean(x^2) + eps) * w): one block per output row. rows NULL:
 * row i. */
__global__ void k_rmsnorm(const float *__restrict__ x, const int *__restrict__ rows, const float *__restrict__ w,
                          __half *__restrict__ out, int d, float eps) {
    __shared__ double sh[32];
    const int i = blockIdx.x, r = rows ? rows[i] : i;
    const float *xr = x + (size_t)r * d;
    double ss = 0;
    for (int k = threadIdx.x; k < d; k += blockDim.x) ss += (double)xr[k] * xr[k];
    ss = block_sum(ss, sh);
    const float inv = (float)(1.0 / sqrt(ss / d + eps));
    for (int k = threadIdx.x; k < d; k += blockDim.x) out[(size_t)i * d + k] = __float2half(xr[k] * inv * w[k]);
}

/* Per token: q/k RMSNorm (qwen3), RoPE (angles from the host, as the CPU computes them), and
 * K/V written as fp16 into the token's slot of its sequence's block. One warp per head. */
__global__ void k_rope_kv(float *__restrict__ q, const float *__restrict__ k, const float *__restrict__ v,
                          const float *__restrict__ rope, const float *__restrict__ qn, const float *__restrict__ kn,
                          __half *__restrict__ kv, const int *__restrict__ slot_block, const int *__restrict__ pos,
                          int n_head, int n_head_kv, int hd, int rope_dim, int neox, float eps, size_t block_elems,
                          int layer) {
    const int t = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    const int q_dim = n_head * hd, kv_dim = n_head_kv * hd;
    const float *r = rope + (size_t)t * rope_dim;
    const int half_ = rope_dim / 2;
    const size_t blk = (size_t)slot_block[t];
    const int slot = pos[t] % 16;
    __half *kd = kv + blk * block_elems + (size_t)(layer * 2 + 0) * 16 * kv_dim + (size_t)slot * kv_dim;
    __half *vd = kv + blk * block_elems + (size_t)(layer * 2 + 1) * 16 * kv_dim + (size_t)slot * kv_dim;
    extern __shared__ float hs[];            /* nw * hd */
    float *h = hs + warp * hd;
    for (int hh = warp; hh < n_head + n_head_kv; hh += nw) {
        const bool isq = hh < n_head;
        const float *src = isq ? q + (size_t)t * q_dim + hh * hd : k + (size_t)t * kv_dim + (hh - n_head) * hd;
        const float *nw_ = isq ? qn : kn;
        for (int d = lane; d < hd; d += 32) h[d] = src[d];
        __syncwarp();
        if (nw_) {
            double ss = 0;
            for (int d = lane; d < hd; d += 32) ss += (double)h[d] * h[d];
            for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
            const float inv = (float)(1.0 / sqrt(ss / hd + eps));
            __syncwarp();
            for (int d = lane; d < hd; d += 32) h[d] = h[d] * inv * nw_[d];
            __syncwarp();
        }
        for (int i = lane; i < half_; i += 32) {
            const float cs = r[2 * i], sn = r[2 * i + 1];
            const int a = neox ? i : 2 * i, b = neox ? i + half_ : 2 * i + 1;
            const float x0 = h[a], x1 = h[b];
            h[a] = x0 * cs - x1 * sn;
            h[b] = x0 * sn + x1 * cs;
        }
        __syncwarp();
        if (isq) {
            for (int d = lane; d < hd; d += 32) q[(size_t)t * q_dim + hh * hd + d] = h[d];
        } else {
            const int g = hh - n_head;
            for (int d = lane; d < hd; d += 32) {
                kd[g * hd + d] = __float2half(h[d]);
                vd[g * hd + d] = __float2half(v[(size_t)t * kv_dim + g * hd + d]);
            }
        }
        __syncwarp();
    }
}

/* Causal attention: one warp per (token, query head), positions [0, pos] walked 32 at a time
 * (lane j scores position j0 + j against q; online softmax; each lane accumulates hd/32 output
 * dimensions). Output fp16 (the next matmul's input). */
#define ATT_MAX_HD 256
__global__ void k_attention(const float *__restrict__ q, const __half *__restrict__ kv, const int *__restrict__ bt,
                            const int *__restrict__ bt_off, const int *__restrict__ pos, __half *__restrict__ out,
                            int n_head, int n_head_kv, int hd, size_t block_elems, int layer, float scale) {
    const int t = blockIdx.x, h = blockIdx.y * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (h >= n_head) return;
    const int G = n_head / n_head_kv, g = h / G, kv_dim = n_head_kv * hd, q_dim = n_head * hd;
    extern __shared__ float qs_all[];
    float *qs = qs_all + (threadIdx.x / 32) * hd;
    for (int d = lane; d < hd; d += 32) qs[d] = q[(size_t)t * q_dim + h * hd + d];
    __syncwarp();
    const int *tab = bt + bt_off[t];
    const int n = pos[t] + 1;
    const int nd = hd / 32;                   /* dims per lane (hd % 32 == 0 checked at create) */
    float acc[ATT_MAX_HD / 32];
    for (int i = 0; i < ATT_MAX_HD / 32; i++) acc[i] = 0;
    float mx = -INFINITY, l = 0;
    const size_t koff = (size_t)(layer * 2 + 0) * 16 * kv_dim + (size_t)g * hd;
    const size_t voff = (size_t)(layer * 2 + 1) * 16 * kv_dim + (size_t)g * hd;
    for (int j0 = 0; j0 < n; j0 += 32) {
        const int j = j0 + lane;
        float s = -INFINITY;
        if (j < n) {
            const __half *kr = kv + (size_t)tab[j / 16] * block_elems + koff + (size_t)(j % 16) * kv_dim;
            float d0 = 0;
            for (int d = 0; d < hd; d += 2) {
                const float2 kf = __half22float2(*(const __half2 *)(kr + d));
                d0 = fmaf(qs[d], kf.x, d0);
                d0 = fmaf(qs[d + 1], kf.y, d0);
            }
            s = d0 * scale;
        }
        float cm = s;
        for (int o = 16; o > 0; o >>= 1) cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, o));
        const float nm = fmaxf(mx, cm);
        const float corr = mx == -INFINITY ? 0.0f : expf(mx - nm);
        const float p = j < n ? expf(s - nm) : 0.0f;
        float ps = p;
        for (int o = 16; o > 0; o >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
        l = l * corr + ps;
        for (int i = 0; i < nd; i++) acc[i] *= corr;
        const int m = n - j0 < 32 ? n - j0 : 32;
        for (int jj = 0; jj < m; jj++) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
            const int jp = j0 + jj;
            const __half *vr = kv + (size_t)tab[jp / 16] * block_elems + voff + (size_t)(jp % 16) * kv_dim;
            for (int i = 0; i < nd; i++) acc[i] = fmaf(pj, __half2float(vr[lane + 32 * i]), acc[i]);
        }
        mx = nm;
    }
    const float inv = 1.0f / l;
    for (int i = 0; i < nd; i++) out[(size_t)t * q_dim + h * hd + lane + 32 * i] = __float2half(acc[i] * inv);
}

/* act = fp16(silu(gate) * up) */
__global__ void k_swiglu(const float *__restrict__ gate, const float *__restrict__ up, __half *__restrict__ act, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = gate[i];
        act[i] = __float2half(g / (1.0f + expf(-g)) * up[i]);
    }
}

__global__ void k_copy_block(__half *kv, size_t block_elems, int dst, int src) {
    const uint4 *s = (const uint4 *)(kv + (size_t)src * block_elems);
    uint4 *d = (uint4 *)(kv + (size_t)dst * block_elems);
    const size_t n = block_elems * sizeof(__half) / sizeof(uint4);
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) d[i] = s[i];
}

/* ------------------------------------------------------------------------------ host side */
typedef struct { __half *w; const float *bias; int rows, cols; } dmat;
typedef struct {
    float *attn_norm, *ffn_norm, *bq, *bk, *bv, *q_norm, *k_norm;
    dmat wq, wk, wv, wo, gate, up, down;
} dlayer;

struct gpu_backend {
    model_config c;
    int max_tokens, max_ctx, n_blocks;
    size_t block_elems;
    __half *kv;
    dmat tok_embd, output;
    float *output_norm;
    dlayer *layers;
    /* scratch */
    float *x, *q, *k, *v, *gate, *up, *logits, *rope;
    __half *xh, *att, *act;
    int *tok, *pos, *slot_block, *bt, *bt_off, *out_rows;
    int bt_cap;
    /* host staging */
    int *h_tok, *h_pos, *h_slot_block, *h_bt, *h_bt_off, *h_out_rows;
    float *h_rope;
    cudaStream_t st;
    size_t mem_weights, mem_kv, mem_scratch;
    char device[128];
    void **allocs;
    int n_allocs, cap_allocs;
};

static int track(gpu_backend *g, void *p) {
    if (g->n_allocs == g->cap_allocs) {
        int c = g->cap_allocs ? 2 * g->cap_allocs : 64;
        void **a = (void **)realloc(g->allocs, (size_t)c * sizeof *a);
        if (!a) return -1;
        g->allocs = a;
        g->cap_allocs = c;
    }
    g->allocs[g->n_allocs++] = p;
    return 0;
}

static cudaError_t dalloc(gpu_backend *g, void **p, size_t bytes, size_t *acct) {
    *p = NULL;
    cudaError_t e = cudaMalloc(p, bytes ? bytes : 16);
    if (e != cudaSuccess) return e;
    if (track(g, *p)) { cudaFree(*p); *p = NULL; return cudaErrorMemoryAllocation; }
    if (acct) *acct += bytes;
    return cudaSuccess;
}

extern "C" int gpu_available(char *why, size_t n) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        if (why && n) snprintf(why, n, "no CUDA device (%s)", e != cudaSuccess ? cudaGetErrorString(e) : "none found");
        return 0;
    }
    return 1;
}

static uint16_t f32_to_f16_bits(float f) {
    __half h = __float2half(f);
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
}

/* A matrix (rows of ggml_row_size(type, cols) bytes) to fp16 on the device. */
static int upload_mat(gpu_backend *g, dmat *d, ggml_type type, const void *data, int rows, int cols, char *err,
                      size_t errlen) {
    float *row = (float *)malloc((size_t)cols * sizeof(float));
    const size_t chunk_rows = (size_t)1 << 12;
    uint16_t *buf = (uint16_t *)malloc(chunk_rows * (size_t)cols * sizeof(uint16_t));
    const size_t rb = ggml_row_size(type, cols);
    d->rows = rows;
    d->cols = cols;
    d->bias = NULL;
    if (!row || !buf) { free(row); free(buf); snprintf(err, errlen, "cuda: out of host memory"); return -1; }
    CK(dalloc(g, (void **)&d->w, (size_t)rows * cols * sizeof(__half), &g->mem_weights), "weights");
    for (size_t r0 = 0; r0 < (size_t)rows; r0 += chunk_rows) {
        size_t nr = rows - r0 < chunk_rows ? rows - r0 : chunk_rows;
        for (size_t r = 0; r < nr; r++) {
            dequantize_row(type, (const uint8_t *)data + (r0 + r) * rb, row, cols);
            for (int c = 0; c < cols; c++) buf[r * cols + c] = f32_to_f16_bits(row[c]);
        }
        CK(cudaMemcpy(d->w + r0 * cols, buf, nr * cols * sizeof(uint16_t), cudaMemcpyHostToDevice), "weights upload");
    }
    free(row);
    free(buf);
    return 0;
fail:
    free(row);
    free(buf);
    return -1;
}

static int upload_vec(gpu_backend *g, float **d, const float *h, size_t n, char *err, size_t errlen) {
    *d = NULL;
    if (!h) return 0;
    CK(dalloc(g, (void **)d, n * sizeof(float), &g->mem_weights), "vectors");
    CK(cudaMemcpy(*d, h, n * sizeof(float), cudaMemcpyHostToDevice), "vector upload");
    return 0;
fail:
    return -1;
}

static int upload_model_mat(gpu_backend *g, dmat *d, const mat *m, char *err, size_t errlen) {
    if (m->x4) { snprintf(err, errlen, "cuda: model was loaded with repacked (x4) weights"); return -1; }
    return upload_mat(g, d, m->type, m->data, (int)m->rows, (int)m->cols, err, errlen);
}

extern "C" void gpu_free(gpu_backend *g) {
    if (!g) return;
    for (int i = 0; i < g->n_allocs; i++) cudaFree(g->allocs[i]);
    free(g->allocs);
    if (g->st) cudaStreamDestroy(g->st);
    free(g->layers);
    free(g->h_tok); free(g->h_pos); free(g->h_slot_block); free(g->h_bt); free(g->h_bt_off); free(g->h_out_rows);
    free(g->h_rope);
    free(g);
}

extern "C" int gpu_create(gpu_backend **out, const model *m, int max_tokens, int max_ctx, size_t kv_mem_bytes,
                          int *n_blocks, char *err, size_t errlen) {
    *out = NULL;
    const model_config *c = &m->c;
    if (c->head_dim % 32 != 0 || c->head_dim > ATT_MAX_HD) {
        snprintf(err, errlen, "cuda: head dim %d not supported (a multiple of 32 up to %d)", c->head_dim, ATT_MAX_HD);
        return -1;
    }
    char why[160];
    if (!gpu_available(why, sizeof why)) { snprintf(err, errlen, "cuda: %s", why); return -1; }
    gpu_backend *g = (gpu_backend *)calloc(1, sizeof *g);
    if (!g) { snprintf(err, errlen, "cuda: out of memory"); return -1; }
    g->c = *c;
    g->max_tokens = max_tokens;
    g->max_ctx = max_ctx;
    const int q_dim = c->n_head * c->head_dim, kv_dim = c->n_head_kv * c->head_dim;
    const int wide = c->n_ff > q_dim ? (c->n_ff > c->n_embd ? c->n_ff : c->n_embd) : (q_dim > c->n_embd ? q_dim : c->n_embd);
    const size_t T = (size_t)max_tokens;
    const int max_blocks = (max_ctx + 15) / 16;
    size_t free_b = 0, total_b = 0;
    {
        cudaDeviceProp prop;
        CK(cudaSetDevice(0), "set device");
        CK(cudaGetDeviceProperties(&prop, 0), "device properties");
        snprintf(g->device, sizeof g->device, "%s", prop.name);
        CK(cudaStreamCreateWithFlags(&g->st, cudaStreamNonBlocking), "stream");
    }
    /* weights */
    CK(cudaMemGetInfo(&free_b, &total_b), "memory info");
    {
        g->layers = (dlayer *)calloc((size_t)c->n_layer, sizeof *g->layers);
        if (!g->layers) { snprintf(err, errlen, "cuda: out of memory"); goto fail; }
        const size_t w_est = (size_t)c->n_layer * ((size_t)c->n_embd * (q_dim + 2 * kv_dim) + (size_t)q_dim * c->n_embd +
                                                   3 * (size_t)c->n_embd * c->n_ff) * 2 + (size_t)c->n_vocab * c->n_embd * 4;
        if (w_est > free_b) {
            snprintf(err, errlen, "cuda: the weights need about %zu MiB as fp16, the GPU has %zu MiB free of %zu", w_est >> 20,
                     free_b >> 20, total_b >> 20);
            goto fail;
        }
        if (m->f && (m->f->size >> 30) >= 1) fprintf(stderr, "pcache: uploading %s of weights to %s ...\n", "the model", g->device);
        if (upload_model_mat(g, &g->tok_embd, &m->tok_embd, err, errlen)) goto fail;
        if (m->output.data == m->tok_embd.data) g->output = g->tok_embd;
        else if (upload_model_mat(g, &g->output, &m->output, err, errlen)) goto fail;
        if (upload_vec(g, &g->output_norm, m->output_norm, c->n_embd, err, errlen)) goto fail;
        for (int l = 0; l < c->n_layer; l++) {
            const model_layer *L = &m->layers[l];
            dlayer *D = &g->layers[l];
            if (upload_vec(g, &D->attn_norm, L->attn_norm, c->n_embd, err, errlen) ||
                upload_vec(g, &D->ffn_norm, L->ffn_norm, c->n_embd, err, errlen) ||
                upload_vec(g, &D->bq, L->bq, q_dim, err, errlen) || upload_vec(g, &D->bk, L->bk, kv_dim, err, errlen) ||
                upload_vec(g, &D->bv, L->bv, kv_dim, err, errlen) ||
                upload_vec(g, &D->q_norm, L->q_norm, c->head_dim, err, errlen) ||
                upload_vec(g, &D->k_norm, L->k_norm, c->head_dim, err, errlen) ||
                upload_model_mat(g, &D->wq, &L->wq, err, errlen) || upload_model_mat(g, &D->wk, &L->wk, err, errlen) ||
                upload_model_mat(g, &D->wv, &L->wv, err, errlen) || upload_model_mat(g, &D->wo, &L->wo, err, errlen) ||
                upload_model_mat(g, &D->gate, &L->w_gate, err, errlen) ||
                upload_model_mat(g, &D->up, &L->w_up, err, errlen) || upload_model_mat(g, &D->down, &L->w_down, err, errlen))
                goto fail;
            D->wq.bias = D->bq;
            D->wk.bias = D->bk;
            D->wv.bias = D->bv;
            if (m->f && (m->f->size >> 30) >= 1 && (l + 1) % 8 == 0)
                fprintf(stderr, "pcache: layer %d/%d on the GPU\n", l + 1, c->n_layer);
        }
    }
    /* scratch */
    {
        const size_t f4 = sizeof(float), h2 = sizeof(__half);
        void **p;
#define SCR(ptr, bytes) (p = (void **)&(ptr), dalloc(g, p, (bytes), &g->mem_scratch))
        CK(SCR(g->x, T * c->n_embd * f4), "scratch");
        CK(SCR(g->q, T * q_dim * f4), "scratch");
        CK(SCR(g->k, T * kv_dim * f4), "scratch");
        CK(SCR(g->v, T * kv_dim * f4), "scratch");
        CK(SCR(g->gate, T * c->n_ff * f4), "scratch");
        CK(SCR(g->up, T * c->n_ff * f4), "scratch");
        CK(SCR(g->logits, T * c->n_vocab * f4), "scratch");
        CK(SCR(g->rope, T * c->rope_dim * f4), "scratch");
        CK(SCR(g->xh, T * wide * h2), "scratch");
        CK(SCR(g->att, T * q_dim * h2), "scratch");
        CK(SCR(g->act, T * c->n_ff * h2), "scratch");
        CK(SCR(g->tok, T * sizeof(int)), "scratch");
        CK(SCR(g->pos, T * sizeof(int)), "scratch");
        CK(SCR(g->slot_block, T * sizeof(int)), "scratch");
        CK(SCR(g->bt_off, T * sizeof(int)), "scratch");
        CK(SCR(g->out_rows, T * sizeof(int)), "scratch");
        g->bt_cap = (int)T * (max_blocks < 64 ? max_blocks : 64) + max_blocks;
        CK(SCR(g->bt, (size_t)g->bt_cap * sizeof(int)), "scratch");
#undef SCR
        g->h_tok = (int *)malloc(T * sizeof(int));
        g->h_pos = (int *)malloc(T * sizeof(int));
        g->h_slot_block = (int *)malloc(T * sizeof(int));
        g->h_bt_off = (int *)malloc(T * sizeof(int));
        g->h_out_rows = (int *)malloc(T * sizeof(int));
        g->h_bt = (int *)malloc((size_t)g->bt_cap * sizeof(int));
        g->h_rope = (float *)malloc(T * c->rope_dim * f4);
        if (!g->h_tok || !g->h_pos || !g->h_slot_block || !g->h_bt_off || !g->h_out_rows || !g->h_bt || !g->h_rope) {
            snprintf(err, errlen, "cuda: out of host memory");
            goto fail;
        }
    }
    /* KV pool: what was asked, or what is free minus a margin */
    {
        g->block_elems = (size_t)c->n_layer * 2 * 16 * (size_t)kv_dim;
        const size_t bb = g->block_elems * sizeof(__half);
        CK(cudaMemGetInfo(&free_b, &total_b), "memory info");
        size_t margin = (size_t)512 << 20;
        size_t want = kv_mem_bytes ? kv_mem_bytes : (free_b > margin ? free_b - margin : 0);
        if (kv_mem_bytes && kv_mem_bytes + ((size_t)64 << 20) > free_b) {
            snprintf(err, errlen, "cuda: --kv-mem %zu MiB does not fit: %zu MiB free on %s after %zu MiB of weights and %zu MiB of scratch",
                     kv_mem_bytes >> 20, free_b >> 20, g->device, g->mem_weights >> 20, g->mem_scratch >> 20);
            goto fail;
        }
        size_t nb = want / bb;
        if (nb > (size_t)1 << 30) nb = (size_t)1 << 30;
        if (nb < 2) {
            snprintf(err, errlen, "cuda: no room for the KV pool: %zu MiB free on %s after %zu MiB of weights", free_b >> 20,
                     g->device, g->mem_weights >> 20);
            goto fail;
        }
        CK(dalloc(g, (void **)&g->kv, nb * bb, &g->mem_kv), "KV pool");
        CK(cudaMemset(g->kv, 0, nb * bb), "KV pool");
        g->n_blocks = (int)nb;
        *n_blocks = (int)nb;
    }
    *out = g;
    return 0;
fail:
    gpu_free(g);
    return -1;
}

extern "C" void gpu_copy_block(void *ctx, int32_t dst, int32_t src, int n_slots) {
    gpu_backend *g = (gpu_backend *)ctx;
    (void)n_slots;   /* the whole block: copying the unused slots too costs nothing that matters */
    k_copy_block<<<64, 256, 0, g->st>>>(g->kv, g->block_elems, dst, src);
}

extern "C" void gpu_get_mem(const gpu_backend *g, gpu_mem *o) {
    memset(o, 0, sizeof *o);
    o->weights = g->mem_weights;
    o->kv = g->mem_kv;
    o->scratch = g->mem_scratch;
    cudaMemGetInfo(&o->free, &o->total);
    snprintf(o->device, sizeof o->device, "%s", g->device);
}

static void matmul(gpu_backend *g, const dmat *w, const __half *x, int ldx, int n, float *y, int ldy, int accumulate) {
    dim3 grid((w->rows + MM_BM - 1) / MM_BM, (n + MM_BN - 1) / MM_BN);
    k_matmul<<<grid, 128, 0, g->st>>>(w->w, x, y, w->rows, n, w->cols, ldx, ldy, w->bias, accumulate);
}

extern "C" int gpu_forward(gpu_backend *g, const kv_pool *kv, const model_batch *b, float *logits_out, char *err,
                           size_t errlen) {
    const model_config *c = &g->c;
    const int n = b->n;
    if (n <= 0 || n > g->max_tokens) { snprintf(err, errlen, "cuda: batch of %d tokens (max %d)", n, g->max_tokens); return -1; }
    if (kv->n_blocks > g->n_blocks) { snprintf(err, errlen, "cuda: KV pool mismatch"); return -1; }
    const int q_dim = c->n_head * c->head_dim, kv_dim = c->n_head_kv * c->head_dim;
    /* host side: token ids, positions, RoPE angles (as the CPU computes them), block tables */
    int nbt = 0, n_out = 0;
    const int half_ = c->rope_dim / 2;
    const float theta_scale = powf(c->rope_base, -2.0f / (float)c->rope_dim);
    for (int t = 0; t < n; t++) {
        const kv_seq *s = b->seqs[t];
        if (b->tokens[t] < 0 || b->tokens[t] >= c->n_vocab || b->pos[t] < 0 || b->pos[t] >= g->max_ctx ||
            b->pos[t] / 16 >= s->n_blocks) {
            snprintf(err, errlen, "cuda: bad batch entry %d (token %d, position %d)", t, b->tokens[t], b->pos[t]);
            return -1;
        }
        g->h_tok[t] = b->tokens[t];
        g->h_pos[t] = b->pos[t];
        g->h_slot_block[t] = s->blocks[b->pos[t] / 16];
        /* one copy of each sequence's table (tokens of a sequence are contiguous in a batch) */
        if (t > 0 && b->seqs[t - 1] == s) g->h_bt_off[t] = g->h_bt_off[t - 1];
        else {
            const int need = b->pos[t] / 16 + 1;
            int last = t;
            while (last + 1 < n && b->seqs[last + 1] == s) last++;
            const int need_all = b->pos[last] / 16 + 1 > need ? b->pos[last] / 16 + 1 : need;
            if (nbt + need_all > g->bt_cap) { snprintf(err, errlen, "cuda: block tables exceed the scratch"); return -1; }
            g->h_bt_off[t] = nbt;
            memcpy(g->h_bt + nbt, s->blocks, (size_t)need_all * sizeof(int));
            nbt += need_all;
        }
        float theta = (float)b->pos[t];
        float *r = g->h_rope + (size_t)t * c->rope_dim;
        for (int i = 0; i < half_; i++) {
            r[2 * i] = cosf(theta);
            r[2 * i + 1] = sinf(theta);
            theta *= theta_scale;
        }
        if (b->want_logits && b->want_logits[t]) g->h_out_rows[n_out++] = t;
    }
    cudaStream_t st = g->st;
#define UP(d, h, bytes) CK(cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, st), "upload")
    UP(g->tok, g->h_tok, n * sizeof(int));
    UP(g->pos, g->h_pos, n * sizeof(int));
    UP(g->slot_block, g->h_slot_block, n * sizeof(int));
    UP(g->bt_off, g->h_bt_off, n * sizeof(int));
    UP(g->bt, g->h_bt, nbt * sizeof(int));
    UP(g->rope, g->h_rope, (size_t)n * c->rope_dim * sizeof(float));
    if (n_out) UP(g->out_rows, g->h_out_rows, n_out * sizeof(int));
#undef UP
    {
        k_embed<<<n, 256, 0, st>>>(g->tok_embd.w, g->tok, g->x, c->n_embd);
        const float scale = 1.0f / sqrtf((float)c->head_dim);
        const int heads_per_block = 4;
        for (int l = 0; l < c->n_layer; l++) {
            const dlayer *D = &g->layers[l];
            k_rmsnorm<<<n, 256, 0, st>>>(g->x, NULL, D->attn_norm, g->xh, c->n_embd, c->rms_eps);
            matmul(g, &D->wq, g->xh, c->n_embd, n, g->q, q_dim, 0);
            matmul(g, &D->wk, g->xh, c->n_embd, n, g->k, kv_dim, 0);
            matmul(g, &D->wv, g->xh, c->n_embd, n, g->v, kv_dim, 0);
            k_rope_kv<<<n, 256, 8 * c->head_dim * sizeof(float), st>>>(
                g->q, g->k, g->v, g->rope, D->q_norm, D->k_norm, g->kv, g->slot_block, g->pos, c->n_head, c->n_head_kv,
                c->head_dim, c->rope_dim, c->rope_neox, c->rms_eps, g->block_elems, l);
            dim3 ag(n, (c->n_head + heads_per_block - 1) / heads_per_block);
            k_attention<<<ag, 32 * heads_per_block, heads_per_block * c->head_dim * sizeof(float), st>>>(
                g->q, g->kv, g->bt, g->bt_off, g->pos, g->att, c->n_head, c->n_head_kv, c->head_dim, g->block_elems, l, scale);
            matmul(g, &D->wo, g->att, q_dim, n, g->x, c->n_embd, 1);
            k_rmsnorm<<<n, 256, 0, st>>>(g->x, NULL, D->ffn_norm, g->xh, c->n_embd, c->rms_eps);
            matmul(g, &D->gate, g->xh, c->n_embd, n, g->gate, c->n_ff, 0);
            matmul(g, &D->up, g->xh, c->n_embd, n, g->up, c->n_ff, 0);
            size_t ne = (size_t)n * c->n_ff;
            k_swiglu<<<(unsigned)((ne + 255) / 256 < 4096 ? (ne + 255) / 256 : 4096), 256, 0, st>>>(g->gate, g->up, g->act, ne);
            matmul(g, &D->down, g->act, c->n_ff, n, g->x, c->n_embd, 1);
        }
        if (n_out) {
            k_rmsnorm<<<n_out, 256, 0, st>>>(g->x, g->out_rows, g->output_norm, g->xh, c->n_embd, c->rms_eps);
            matmul(g, &g->output, g->xh, c->n_embd, n_out, g->logits, c->n_vocab, 0);
        }
        CK(cudaGetLastError(), "kernel launch");
        if (n_out)
            CK(cudaMemcpyAsync(logits_out, g->logits, (size_t)n_out * c->n_vocab * sizeof(float), cudaMemcpyDeviceToHost, st),
               "logits download");
        CK(cudaStreamSynchronize(st), "forward");
    }
    return 0;
fail:
    return -1;
}

extern "C" int gpu_test_matmul(ggml_type type, const void *w, int rows, int cols, const float *x, int n,
                               const float *bias, float *y, char *err, size_t errlen) {
    gpu_backend g;
    memset(&g, 0, sizeof g);
    dmat d;
    __half *dx = NULL;
    float *dy = NULL, *db = NULL;
    uint16_t *hx = (uint16_t *)malloc((size_t)n * cols * sizeof(uint16_t));
    int rc = -1;
    char why[160];
    if (!hx) { snprintf(err, errlen, "out of memory"); return -1; }
    if (!gpu_available(why, sizeof why)) { snprintf(err, errlen, "cuda: %s", why); free(hx); return -1; }
    CK(cudaStreamCreate(&g.st), "stream");
    if (upload_mat(&g, &d, type, w, rows, cols, err, errlen)) goto fail;
    for (size_t i = 0; i < (size_t)n * cols; i++) hx[i] = f32_to_f16_bits(x[i]);
    CK(dalloc(&g, (void **)&dx, (size_t)n * cols * sizeof(__half), NULL), "x");
    CK(dalloc(&g, (void **)&dy, (size_t)n * rows * sizeof(float), NULL), "y");
    CK(cudaMemcpy(dx, hx, (size_t)n * cols * sizeof(__half), cudaMemcpyHostToDevice), "x upload");
    if (bias) {
        CK(dalloc(&g, (void **)&db, (size_t)rows * sizeof(float), NULL), "bias");
        CK(cudaMemcpy(db, bias, (size_t)rows * sizeof(float), cudaMemcpyHostToDevice), "bias upload");
        d.bias = db;
    }
    matmul(&g, &d, dx, cols, n, dy, rows, 0);
    CK(cudaGetLastError(), "matmul launch");
    CK(cudaStreamSynchronize(g.st), "matmul");
    CK(cudaMemcpy(y, dy, (size_t)n * rows * sizeof(float), cudaMemcpyDeviceToHost), "y download");
    rc = 0;
fail:
    for (int i = 0; i < g.n_allocs; i++) cudaFree(g.allocs[i]);
    free(g.allocs);
    if (g.st) cudaStreamDestroy(g.st);
    free(hx);
    return rc;
}
