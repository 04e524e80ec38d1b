/* gpu_none: the CUDA backend's interface when pcache is built without it (make CUDA=0, or no
 * nvcc): every entry point reports that, and the engine runs on the CPU. */
#include "gpu.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *why_not = "pcache was built without the CUDA backend (no nvcc, or make CUDA=0)";

int gpu_available(char *why, size_t n) {
    if (why && n) snprintf(why, n, "%s", why_not);
    return 0;
}

int gpu_create(gpu_backend **out, const model *m, int max_tokens, int max_ctx, size_t kv_mem_bytes, int *n_blocks,
               char *err, size_t errlen) {
    (void)m; (void)max_tokens; (void)max_ctx; (void)kv_mem_bytes; (void)n_blocks;
    *out = NULL;
    snprintf(err, errlen, "%s", why_not);
    return -1;
}

void gpu_free(gpu_backend *g) { (void)g; }

int gpu_forward(gpu_backend *g, const kv_pool *kv, const model_batch *b, float *logits_out, int32_t *argmax_out,
                char *err, size_t errlen) {
    (void)g; (void)kv; (void)b; (void)logits_out; (void)argmax_out;
    snprintf(err, errlen, "%s", why_not);
    return -1;
}

void gpu_copy_block(void *g, int32_t dst, int32_t src, int n_slots) { (void)g; (void)dst; (void)src; (void)n_slots; }

int gpu_read_block(void *g, int32_t block, void *dst) { (void)g; (void)block; (void)dst; return -1; }
int gpu_write_block(void *g, int32_t block, const void *src) { (void)g; (void)block; (void)src; return -1; }

void gpu_get_mem(const gpu_backend *g, gpu_mem *out) { (void)g; memset(out, 0, sizeof *out); }

int gpu_test_matmul(ggml_type type, const void *w, int rows, int cols, const float *x, int n, const float *bias,
                    const float *y0, float *y, char *err, size_t errlen) {
    (void)type; (void)w; (void)rows; (void)cols; (void)x; (void)n; (void)bias; (void)y0; (void)y;
    snprintf(err, errlen, "%s", why_not);
    return -1;
}

int gpu_test_argmax(const float *x, int rows, int cols, int32_t *out, char *err, size_t errlen) {
    (void)x; (void)rows; (void)cols; (void)out;
    snprintf(err, errlen, "%s", why_not);
    return -1;
}

int gpu_bench_matmul(int M, int K, int N, int reps, double *ms, char *err, size_t errlen) {
    (void)M; (void)K; (void)N; (void)reps; (void)ms;
    snprintf(err, errlen, "%s", why_not);
    return -1;
}

void *gpu_host_alloc(size_t bytes) { return malloc(bytes); }
void gpu_host_free(void *p) { free(p); }
