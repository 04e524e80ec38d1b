/* wgmma_probe: do Hopper's warpgroup MMA (wgmma.mma_async, operands in shared memory) and the
 * warp MMA the backend uses (mma.sync m16n8k16) give the same bits for the same fp16 operands,
 * fp32 accumulation and k order? If they do, a wgmma prefill GEMM can replace k_mm for large
 * batches while decode keeps mma.sync, without giving up batch invariance (issue 10).
 *
 *   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a bench/wgmma_probe.cu -o build/wgmma_probe
 *   build/wgmma_probe            prints mismatch counts per input distribution and K
 *
 * Both kernels compute C[64 rows][64 cols] = A[64][K] . B[64][K]^T (A rows = weight rows, B rows =
 * tokens, both k-contiguous), one fp32 accumulator per output, k16 steps in ascending order from
 * zero. A double-precision product checks that both are right at all. */
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CKR(x)                                                                                   \
    do {                                                                                         \
        cudaError_t e_ = (x);                                                                    \
        if (e_ != cudaSuccess) { fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_)); exit(1); } \
    } while (0)

__device__ __forceinline__ void mma16816(float *c, const unsigned *a, const unsigned *b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

/* reference: 4 warps, warp w owns rows 16w..16w+15, all 64 columns; fragments from global */
__global__ void k_ref(const __half *A, const __half *B, float *C, int K) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    float acc[8][4] = {};
    for (int k0 = 0; k0 < K; k0 += 16) {
        unsigned a[4];
        const __half *ar = A + (size_t)(16 * w + g) * K + k0;
        a[0] = *(const unsigned *)(ar + 2 * t);
        a[1] = *(const unsigned *)(ar + 8 * (size_t)K + 2 * t);
        a[2] = *(const unsigned *)(ar + 2 * t + 8);
        a[3] = *(const unsigned *)(ar + 8 * (size_t)K + 2 * t + 8);
        for (int j = 0; j < 8; j++) {
            unsigned b[2];
            const __half *br = B + (size_t)(8 * j + g) * K + k0;
            b[0] = *(const unsigned *)(br + 2 * t);
            b[1] = *(const unsigned *)(br + 2 * t + 8);
            mma16816(acc[j], a, b);
        }
    }
    for (int j = 0; j < 8; j++)
        for (int e = 0; e < 4; e++) {
            const int r = 16 * w + g + (e >> 1) * 8, c = 8 * j + 2 * t + (e & 1);
            C[r * 64 + c] = acc[j][e];
        }
}

__device__ __forceinline__ uint64_t sdesc(const void *p) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    uint64_t d = (uint64_t)((a & 0x3FFFF) >> 4);
    d |= (uint64_t)(16 >> 4) << 16;     /* leading byte offset (unused with 128B swizzle, K-major) */
    d |= (uint64_t)(1024 >> 4) << 32;   /* stride byte offset: 8 rows x 128 B */
    d |= 1ull << 62;                    /* 128-byte swizzle */
    return d;
}

#define R8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
__device__ __forceinline__ void wgmma64(float *d, uint64_t da, uint64_t db) {
    asm volatile("{\n"
                 ".reg .pred p;\n"
                 "setp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
                 "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
                 "%32, %33, p, 1, 1, 0, 0;\n"
                 "}\n"
                 : R8(0), R8(8), R8(16), R8(24)
                 : "l"(da), "l"(db));
}

/* one warpgroup: the 64x64 tile, k in stages of 64 (128-byte rows, 128B-swizzled) */
__global__ void __launch_bounds__(128) k_wg(const __half *A, const __half *B, float *C, int K) {
    __shared__ __align__(1024) __half As[64 * 64], Bs[64 * 64];
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, g = lane >> 2, t = lane & 3;
    float d[32];
    for (int i = 0; i < 32; i++) d[i] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += 64) {
        for (int i = tid; i < 64 * 8; i += 128) {
            const int r = i / 8, c = i % 8;
            const int s = r * 64 + ((c ^ (r & 7)) * 8);
            *(uint4 *)(As + s) = *(const uint4 *)(A + (size_t)r * K + k0 + c * 8);
            *(uint4 *)(Bs + s) = *(const uint4 *)(B + (size_t)r * K + k0 + c * 8);
        }
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
        for (int kk = 0; kk < 4; kk++) wgmma64(d, sdesc(As + kk * 16), sdesc(Bs + kk * 16));
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        __syncthreads();
    }
    /* accumulator layout: warp w rows 16w.., per n8 block j four values as mma.sync's C */
    for (int j = 0; j < 8; j++)
        for (int e = 0; e < 4; e++) {
            const int r = 16 * w + g + (e >> 1) * 8, c = 8 * j + 2 * t + (e & 1);
            C[r * 64 + c] = d[4 * j + e];
        }
}

static uint64_t rs = 88172645463325252ull;
static double urand(void) { rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17; return (rs >> 11) * (1.0 / 9007199254740992.0); }
static double nrand(void) { double u = urand() + 1e-300, v = urand(); return sqrt(-2 * log(u)) * cos(6.283185307179586 * v); }

static float gen(int dist) {
    switch (dist) {
    case 0: return (float)nrand();                                      /* normal */
    case 1: return (float)((urand() < 0.5 ? -1 : 1) * ldexp(1 + urand(), (int)(urand() * 24) - 12)); /* wide range */
    case 2: return (float)((urand() < 0.5 ? -1 : 1) * ldexp(1 + urand(), (int)(urand() * 6)));  /* cancellation-prone */
    default: return urand() < 0.9 ? (float)(nrand() * 1e-3) : (float)(nrand() * 30); /* outliers */
    }
}

int main(void) {
    const int Ks[] = {16, 64, 256, 4096, 14336};
    const char *dn[] = {"normal", "wide", "cancel", "outlier"};
    int total_bad = 0;
    for (int dist = 0; dist < 4; dist++)
        for (int ki = 0; ki < 5; ki++) {
            const int K = Ks[ki] < 64 ? 64 : Ks[ki];   /* wgmma stages are 64 wide: K=16 is zero-padded */
            const int Kreal = Ks[ki];
            __half *hA = (__half *)calloc((size_t)64 * K, 2), *hB = (__half *)calloc((size_t)64 * K, 2);
            for (int r = 0; r < 64; r++)
                for (int k = 0; k < Kreal; k++) {
                    hA[(size_t)r * K + k] = __float2half(gen(dist));
                    hB[(size_t)r * K + k] = __float2half(gen(dist));
                }
            __half *dA, *dB;
            float *dC1, *dC2;
            CKR(cudaMalloc(&dA, (size_t)64 * K * 2));
            CKR(cudaMalloc(&dB, (size_t)64 * K * 2));
            CKR(cudaMalloc(&dC1, 64 * 64 * 4));
            CKR(cudaMalloc(&dC2, 64 * 64 * 4));
            CKR(cudaMemcpy(dA, hA, (size_t)64 * K * 2, cudaMemcpyHostToDevice));
            CKR(cudaMemcpy(dB, hB, (size_t)64 * K * 2, cudaMemcpyHostToDevice));
            k_ref<<<1, 128>>>(dA, dB, dC1, K);
            k_wg<<<1, 128>>>(dA, dB, dC2, K);
            CKR(cudaDeviceSynchronize());
            float c1[4096], c2[4096];
            CKR(cudaMemcpy(c1, dC1, sizeof c1, cudaMemcpyDeviceToHost));
            CKR(cudaMemcpy(c2, dC2, sizeof c2, cudaMemcpyDeviceToHost));
            int bad = 0;
            double e1 = 0, e2 = 0;
            for (int r = 0; r < 64; r++)
                for (int c = 0; c < 64; c++) {
                    double ref = 0, mag = 0;
                    for (int k = 0; k < K; k++) {
                        const double p = (double)__half2float(hA[(size_t)r * K + k]) * (double)__half2float(hB[(size_t)c * K + k]);
                        ref += p;
                        mag += fabs(p);
                    }
                    mag = mag > 0 ? mag : 1;
                    e1 = fmax(e1, fabs(c1[r * 64 + c] - ref) / mag);
                    e2 = fmax(e2, fabs(c2[r * 64 + c] - ref) / mag);
                    if (memcmp(&c1[r * 64 + c], &c2[r * 64 + c], 4)) bad++;
                }
            printf("dist %-8s K %5d: mma.sync vs wgmma differ in %4d of 4096; max err/sum|p|: mma %.2e wgmma %.2e\n", dn[dist],
                   Kreal, bad, e1, e2);
            total_bad += bad;
            cudaFree(dA), cudaFree(dB), cudaFree(dC1), cudaFree(dC2);
            free(hA), free(hB);
        }
    printf("total differing outputs: %d\n", total_bad);
    return 0;
}
