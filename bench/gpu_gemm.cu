/* gpu_gemm: what batch invariance costs. For the matmul shapes of a Llama-3-8B layer (and its
 * output layer), times pcache's batch-invariant matmul (gpu_bench_matmul: the backend's own
 * kernels, one reduction order for every batch size) against cuBLAS's default GEMM (which picks
 * kernels, tiles and split-K per shape), fp16 operands, fp32 results, at 1, 32, 512 and 2048
 * tokens; and shows that cuBLAS's bits for one token change with the batch around it.
 * Built and run by `make bench-gpu` on the GPU machine (links cuBLAS; the product does not). */
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
extern "C" {
#include "gpu.h"
}

#define CHECK(x)                                                                  \
    do {                                                                          \
        if ((x) != 0) { fprintf(stderr, "%s:%d: %s failed\n", __FILE__, __LINE__, #x); exit(1); } \
    } while (0)

static double cublas_ms(cublasHandle_t h, int M, int K, int N, const __half *W, const __half *X, float *Y, int reps) {
    const float one = 1.0f, zero = 0.0f;
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    double best = 1e30;
    for (int r = 0; r < reps + 1; r++) {
        cudaEventRecord(a);
        CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, M, N, K, &one, W, CUDA_R_16F, K, X, CUDA_R_16F, K, &zero, Y,
                           CUDA_R_32F, M, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        cudaEventRecord(b);
        cudaEventSynchronize(b);
        float ms;
        cudaEventElapsedTime(&ms, a, b);
        if (r > 0 && ms < best) best = ms;
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return best;
}

int main(void) {
    struct { const char *name; int M, K; } shapes[] = {
        { "qkv", 6144, 4096 }, { "o", 4096, 4096 }, { "gate|up", 28672, 4096 }, { "down", 4096, 14336 }, { "output", 128256, 4096 },
    };
    const int Ns[] = { 1, 32, 192, 512, 2048 };   /* 192: a prompt's new tokens after a cached prefix */
    cublasHandle_t h;
    CHECK(cublasCreate(&h));
    printf("| matmul (M x K) | tokens | pcache ms | cuBLAS ms | pcache / cuBLAS time | pcache TFLOP/s | cuBLAS TFLOP/s |\n");
    printf("|---|---:|---:|---:|---:|---:|---:|\n");
    double tot_p[5] = { 0 }, tot_c[5] = { 0 };
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        const int M = shapes[s].M, K = shapes[s].K, NMAX = 2048;
        __half *W, *X;
        float *Y;
        CHECK(cudaMalloc(&W, (size_t)M * K * 2));
        CHECK(cudaMalloc(&X, (size_t)NMAX * K * 2));
        CHECK(cudaMalloc(&Y, (size_t)NMAX * M * 4));
        CHECK(cudaMemset(W, 0x33, (size_t)M * K * 2));
        CHECK(cudaMemset(X, 0x31, (size_t)NMAX * K * 2));
        for (int i = 0; i < 5; i++) {
            const int N = Ns[i];
            double pm, cm = cublas_ms(h, M, K, N, W, X, Y, 20);
            char err[256];
            if (gpu_bench_matmul(M, K, N, 20, &pm, err, sizeof err)) { fprintf(stderr, "%s\n", err); return 1; }
            const double fl = 2.0 * M * K * N;
            printf("| %s (%d x %d) | %d | %.3f | %.3f | %.2f | %.0f | %.0f |\n", shapes[s].name, M, K, N, pm, cm, pm / cm,
                   fl / pm / 1e9, fl / cm / 1e9);
            if (s < 4) { tot_p[i] += pm; tot_c[i] += cm; }
        }
        cudaFree(W);
        cudaFree(X);
        cudaFree(Y);
    }
    for (int i = 0; i < 5; i++)
        printf("| one 8B layer (qkv+o+gate|up+down) | %d | %.3f | %.3f | %.2f | | |\n", Ns[i], tot_p[i], tot_c[i], tot_p[i] / tot_c[i]);
    /* cuBLAS is not batch-invariant: token 0's outputs, alone and among 512 others */
    {
        const int M = 4096, K = 14336, N = 512;
        __half *W, *X;
        float *Y1, *Yn;
        CHECK(cudaMalloc(&W, (size_t)M * K * 2));
        CHECK(cudaMalloc(&X, (size_t)N * K * 2));
        CHECK(cudaMalloc(&Y1, (size_t)M * 4));
        CHECK(cudaMalloc(&Yn, (size_t)N * M * 4));
        __half *hw = (__half *)malloc((size_t)M * K * 2), *hx = (__half *)malloc((size_t)N * K * 2);
        unsigned st = 1;
        for (size_t i = 0; i < (size_t)M * K; i++) { st = st * 1664525u + 1013904223u; hw[i] = __float2half(((st >> 8) / 16777216.0f - 0.5f) * 0.05f); }
        for (size_t i = 0; i < (size_t)N * K; i++) { st = st * 1664525u + 1013904223u; hx[i] = __float2half(((st >> 8) / 16777216.0f - 0.5f)); }
        cudaMemcpy(W, hw, (size_t)M * K * 2, cudaMemcpyHostToDevice);
        cudaMemcpy(X, hx, (size_t)N * K * 2, cudaMemcpyHostToDevice);
        const float one = 1.0f, zero = 0.0f;
        CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, M, 1, K, &one, W, CUDA_R_16F, K, X, CUDA_R_16F, K, &zero, Y1, CUDA_R_32F, M,
                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, M, N, K, &one, W, CUDA_R_16F, K, X, CUDA_R_16F, K, &zero, Yn, CUDA_R_32F, M,
                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        float *a = (float *)malloc((size_t)M * 4), *b = (float *)malloc((size_t)M * 4);
        cudaMemcpy(a, Y1, (size_t)M * 4, cudaMemcpyDeviceToHost);
        cudaMemcpy(b, Yn, (size_t)M * 4, cudaMemcpyDeviceToHost);
        int diff = 0;
        for (int i = 0; i < M; i++) diff += memcmp(&a[i], &b[i], 4) != 0;
        printf("\ncuBLAS, down projection (4096 x 14336): token 0 alone vs among 512: %d of %d outputs differ in their bits\n", diff, M);
    }
    cublasDestroy(h);
    return 0;
}
