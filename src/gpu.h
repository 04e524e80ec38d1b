/* gpu: the CUDA backend, behind a C interface the engine calls instead of model_forward.
 *
 * The scheduler, prefix index, block tables, sampler, tokenizer and server are shared with the
 * CPU backend; what differs is where weights and KV blocks live and how a batch is run. The
 * CUDA backend keeps every weight on the device (converted to fp16 at load: every GGUF type the
 * CPU backend reads), the paged KV pool in device memory (the same block layout as the CPU's,
 * fp16; the pool's bookkeeping stays in kv_pool, whose copy on write calls gpu_copy_block), and
 * runs each layer as a few kernels. Every kernel computes a token's results in an order that
 * does not depend on the other tokens in the batch (the matmuls are our own tensor-core tiles
 * with a fixed reduction order along k, no split-K), so logits stay bit-identical whether a
 * prefix came from the cache or was computed, however prefill was chunked and whatever was
 * batched with it.
 *
 * Built from src/cuda/ when nvcc is found (`make CUDA=0` builds src/gpu_none.c instead, which
 * reports that the backend is not built). A binary with the backend still runs where there is
 * no GPU: gpu_available says why not, and the engine uses the CPU.
 */
#ifndef PCACHE_GPU_H
#define PCACHE_GPU_H
#include <stddef.h>
#include <stdint.h>
#include "model.h"

typedef struct gpu_backend gpu_backend;

/* 1 when a CUDA device can be used; else 0 with the reason in why. */
int gpu_available(char *why, size_t n);

/* Uploads m's weights (m loaded with repack = false) and allocates the KV pool (kv_mem_bytes;
 * 0 = what is free after weights and scratch, minus a margin) and scratch for batches of up to
 * max_tokens tokens over contexts of up to max_ctx. *n_blocks gets the pool's block count. */
int gpu_create(gpu_backend **out, const model *m, int max_tokens, int max_ctx, size_t kv_mem_bytes, int *n_blocks,
               char *err, size_t errlen);
void gpu_free(gpu_backend *g);

/* model_forward on the device: the same contract (kv holds the block tables' bookkeeping). With
 * argmax_out, it also gets the argmax of each output row (the first position of the largest
 * logit, as sample_argmax finds it), and the logits of rows with b->argmax_only set are not
 * copied down (their part of logits_out is left as it was). */
int gpu_forward(gpu_backend *g, const kv_pool *kv, const model_batch *b, float *logits_out, int32_t *argmax_out,
                char *err, size_t errlen);

/* kv_pool's copy-on-write hook: copies block src's first n_slots slots (every layer, K and V). */
void gpu_copy_block(void *g, int32_t dst, int32_t src, int n_slots);

/* kv_pool's read_block / write_block hooks: one whole block (every layer, K and V; the host
 * layout, which is the device's) between device memory and host memory, on a stream of their
 * own, synchronously (they are called from the engine's I/O thread, never the engine thread). */
int gpu_read_block(void *g, int32_t block, void *dst);          /* 0, or -1 (CUDA error) */
int gpu_write_block(void *g, int32_t block, const void *src);

/* Page-locked host memory (faster copies from the device); plain malloc without the backend. */
void *gpu_host_alloc(size_t bytes);
void gpu_host_free(void *p);

typedef struct gpu_mem {
    size_t weights, kv, scratch;   /* bytes this backend holds, by use */
    size_t free, total;            /* cudaMemGetInfo after creation */
    char device[128];
} gpu_mem;
void gpu_get_mem(const gpu_backend *g, gpu_mem *out);

/* For the kernel tests: y[n][rows] = (y0 +) x[n][cols] . W^T (+ bias) with the backend's matmul, W
 * given in any GGUF type; y0 NULL: no accumulation (rows of ggml_row_size(type, cols) bytes). Returns 0 or -1 with err. */
int gpu_test_matmul(ggml_type type, const void *w, int rows, int cols, const float *x, int n, const float *bias,
                    const float *y0, float *y, char *err, size_t errlen);

/* For the kernel tests: the device's argmax (gpu_forward's argmax_out) of each of rows rows of cols floats. */
int gpu_test_argmax(const float *x, int rows, int cols, int32_t *out, char *err, size_t errlen);

/* For benchmarks: the fastest of reps runs of the backend's matmul on constant fp16 operands, M x K
 * weights by N tokens, in milliseconds. Returns 0 or -1 with err. */
int gpu_bench_matmul(int M, int K, int N, int reps, double *ms, char *err, size_t errlen);
#endif
