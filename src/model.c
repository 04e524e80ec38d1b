/* model: see model.h for the shape of the forward pass.
 *
 * Work is split into phases, each one tp_run over the pool: row-parallel phases (norms,
 * activation quantization, RoPE, KV writes) split tokens across threads; matmuls split weight
 * rows across threads, each thread walking its rows in tiles of MM_TILE rows against every
 * token (a tile of a weight matrix stays in L1 while the quantized activations stream from
 * L2); attention splits (token, head) pairs. A matmul group shares one quantized input across
 * several matrices (Q,K,V and gate,up), saving a hand-over per matrix. Matrices of the x4
 * types are repacked at load (repack_weights) so that those tiles read one sequential stream.
 */
#include "model.h"
#include "quant.h"
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#define MM_TILE 16
#define MM_TOKENS 64   /* activations per vec_dot_tile call (bounds the stack buffer) */

/* ---------------------------------------------------------------------------------------- */
/* Loading                                                                                   */

static int get_u32_req(const gguf_file *f, const char *arch, const char *suffix, int *out,
                       char *err, size_t errlen) {
    char key[160];
    uint32_t v;
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    int rc = gguf_get_u32(f, key, &v);
    if (rc != GGUF_OK || v == 0 || v > (1u << 24)) {
        snprintf(err, errlen, "model: metadata '%s' %s", key, rc == GGUF_OK ? "out of range" : "missing or not an integer");
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int get_u32_opt(const gguf_file *f, const char *arch, const char *suffix, int dflt) {
    char key[160];
    uint32_t v;
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    if (gguf_get_u32(f, key, &v) != GGUF_OK || v == 0 || v > (1u << 24)) return dflt;
    return (int)v;
}

static float get_f32_opt(const gguf_file *f, const char *arch, const char *suffix, float dflt) {
    char key[160];
    float v;
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    if (gguf_get_f32(f, key, &v) != GGUF_OK || !isfinite(v)) return dflt;
    return v;
}

/* Looks up a 2-D weight [rows][cols] and checks its shape and that we can compute with it. */
static int load_mat(const gguf_file *f, const char *name, int64_t cols, int64_t rows, bool optional,
                    mat *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    const gguf_tensor *t = gguf_find_tensor(f, name);
    if (!t) {
        if (optional) return 0;
        snprintf(err, errlen, "model: tensor '%s' missing", name);
        return -1;
    }
    const ggml_type_info *ti = ggml_type_get(t->type);
    if (!ti || !ti->supported) {
        snprintf(err, errlen, "model: tensor '%s' has unsupported type %s", name, ti ? ti->name : "?");
        return -1;
    }
    if (t->ne[0] != cols || t->ne[1] != rows || t->ne[2] != 1 || t->ne[3] != 1) {
        snprintf(err, errlen, "model: tensor '%s' has shape [%lld, %lld], expected [%lld, %lld]", name,
                 (long long)t->ne[0], (long long)t->ne[1], (long long)cols, (long long)rows);
        return -1;
    }
    out->type = t->type;
    out->cols = cols;
    out->rows = rows;
    out->data = t->data;
    out->row_bytes = ggml_row_size(t->type, cols);
    if (out->row_bytes == 0) {
        snprintf(err, errlen, "model: tensor '%s' row of %lld is not a whole number of blocks", name, (long long)cols);
        return -1;
    }
    return 0;
}

static int load_vec(const gguf_file *f, const char *name, int64_t n, bool optional, const float **out,
                    char *err, size_t errlen) {
    *out = NULL;
    const gguf_tensor *t = gguf_find_tensor(f, name);
    if (!t) {
        if (optional) return 0;
        snprintf(err, errlen, "model: tensor '%s' missing", name);
        return -1;
    }
    if (t->type != GGML_TYPE_F32 || t->ne[0] != n || t->ne[1] != 1 || t->ne[2] != 1 || t->ne[3] != 1) {
        snprintf(err, errlen, "model: tensor '%s' must be F32 of length %lld", name, (long long)n);
        return -1;
    }
    if (((uintptr_t)t->data & 3) != 0) {
        snprintf(err, errlen, "model: tensor '%s' data misaligned", name);
        return -1;
    }
    *out = t->data;
    return 0;
}

/* Repacks every matrix the x4 kernels take into one buffer (huge pages where the kernel gives
 * them): a matmul then streams its weights sequentially, which doubles decode throughput per
 * byte on the row layout's 4 interleaved streams. The file's pages of repacked tensors are
 * released (they come back from the file if anything reads them); token_embd stays as it is,
 * since embedding lookups dequantize its rows. PCACHE_NO_X4=1 keeps the row layout (A/B runs). */
static int repack_weights(model *m, char *err, size_t errlen) {
    const char *no = getenv("PCACHE_NO_X4");
    if (no && *no && strcmp(no, "0") != 0) return 0;
    const int per_layer = 7;
    size_t n_mats = (size_t)m->c.n_layer * per_layer + 1, total = 0;
    mat **ms = malloc(n_mats * sizeof *ms);
    if (!ms) { snprintf(err, errlen, "model: out of memory"); return -1; }
    size_t n = 0;
    for (int i = 0; i < m->c.n_layer; i++) {
        model_layer *L = &m->layers[i];
        mat *l[7] = { &L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down };
        for (int j = 0; j < per_layer; j++) ms[n++] = l[j];
    }
    ms[n++] = &m->output;
    size_t kept = 0;
    for (size_t i = 0; i < n; i++)
        if (quant_x4_supported(ms[i]->type) && ms[i]->rows % 4 == 0) {
            ms[kept++] = ms[i];
            total += (ms[i]->row_bytes * (size_t)ms[i]->rows + 63) & ~(size_t)63;
        }
    if (kept == 0) { free(ms); return 0; }
    const size_t huge = (size_t)2 << 20, size = (total + huge - 1) / huge * huge;
    uint8_t *buf = aligned_alloc(huge, size);
    if (!buf) { free(ms); snprintf(err, errlen, "model: out of memory repacking %zu MiB of weights", size >> 20); return -1; }
#ifdef MADV_HUGEPAGE
    madvise(buf, size, MADV_HUGEPAGE);
#endif
    const long page = sysconf(_SC_PAGESIZE);
    size_t off = 0;
    for (size_t i = 0; i < kept; i++) {
        mat *w = ms[i];
        const size_t sz = w->row_bytes * (size_t)w->rows;
        if (quant_repack_x4(w->type, w->data, buf + off, w->rows, w->cols) != 0) {
            free(buf); free(ms);
            snprintf(err, errlen, "model: repacking a %s matrix failed", ggml_type_get(w->type)->name);
            return -1;
        }
        const uintptr_t lo = ((uintptr_t)w->data + (uintptr_t)page - 1) & ~((uintptr_t)page - 1);
        const uintptr_t hi = ((uintptr_t)w->data + sz) & ~((uintptr_t)page - 1);
        if (m->f->mapped && w->data != m->tok_embd.data && hi > lo) madvise((void *)lo, hi - lo, MADV_DONTNEED);
        w->data = buf + off;
        w->x4 = true;
        off += (sz + 63) & ~(size_t)63;
    }
    free(ms);
    m->x4_buf = buf;
    return 0;
}

/* The model's shape from its metadata (and the vocabulary size from token_embd's shape); no
 * weights are read. */
int model_config_read(const gguf_file *f, model_config *c, char *err, size_t errlen) {
    memset(c, 0, sizeof *c);
    gguf_str archs;
    if (gguf_get_str(f, "general.architecture", &archs) != GGUF_OK) {
        snprintf(err, errlen, "model: general.architecture missing");
        return -1;
    }
    char arch[32];
    snprintf(arch, sizeof arch, "%.*s", (int)(archs.len < 31 ? archs.len : 31), archs.ptr);
    if (strcmp(arch, "llama") == 0) c->arch = ARCH_LLAMA;
    else if (strcmp(arch, "qwen2") == 0) c->arch = ARCH_QWEN2;
    else if (strcmp(arch, "qwen3") == 0) c->arch = ARCH_QWEN3;
    else { snprintf(err, errlen, "model: unsupported architecture '%s' (supported: llama, qwen2, qwen3)", arch); return -1; }
    c->rope_neox = c->arch != ARCH_LLAMA;

    if (get_u32_req(f, arch, "block_count", &c->n_layer, err, errlen) ||
        get_u32_req(f, arch, "embedding_length", &c->n_embd, err, errlen) ||
        get_u32_req(f, arch, "feed_forward_length", &c->n_ff, err, errlen) ||
        get_u32_req(f, arch, "attention.head_count", &c->n_head, err, errlen))
        return -1;
    c->n_head_kv = get_u32_opt(f, arch, "attention.head_count_kv", c->n_head);
    c->head_dim = get_u32_opt(f, arch, "attention.key_length", c->n_embd / c->n_head);
    c->rope_dim = get_u32_opt(f, arch, "rope.dimension_count", c->head_dim);
    c->n_ctx_train = get_u32_opt(f, arch, "context_length", 2048);
    c->rope_base = get_f32_opt(f, arch, "rope.freq_base", 10000.0f);
    c->rms_eps = get_f32_opt(f, arch, "attention.layer_norm_rms_epsilon", 1e-5f);
    if (c->n_head % c->n_head_kv != 0 || c->n_head / c->n_head_kv > 64 || c->head_dim % 8 != 0 || c->rope_dim > c->head_dim ||
        c->rope_dim % 2 != 0 || c->head_dim > 1024) {
        snprintf(err, errlen, "model: inconsistent attention shape (heads %d, kv heads %d, head dim %d, rope dim %d)",
                 c->n_head, c->n_head_kv, c->head_dim, c->rope_dim);
        return -1;
    }
    const gguf_tensor *te = gguf_find_tensor(f, "token_embd.weight");
    if (!te) { snprintf(err, errlen, "model: tensor 'token_embd.weight' missing"); return -1; }
    c->n_vocab = (int)te->ne[1];
    if (te->ne[1] < 1 || te->ne[1] > (1 << 22)) { snprintf(err, errlen, "model: bad vocabulary size"); return -1; }
    return 0;
}

int model_load(model **out, const char *path, char *err, size_t errlen) {
    return model_load_ex(out, path, true, err, errlen);
}

int model_load_ex(model **out, const char *path, bool repack, char *err, size_t errlen) {
    *out = NULL;
    model *m = calloc(1, sizeof *m);
    if (!m) { snprintf(err, errlen, "model: out of memory"); return -1; }
    if (gguf_open(&m->f, path, err, errlen) != GGUF_OK) { free(m); return -1; }
    const gguf_file *f = m->f;
    model_config *c = &m->c;
    if (model_config_read(f, c, err, errlen)) goto fail;
    int q_dim = c->n_head * c->head_dim, kv_dim = c->n_head_kv * c->head_dim;
    if (load_mat(f, "token_embd.weight", c->n_embd, c->n_vocab, false, &m->tok_embd, err, errlen) ||
        load_vec(f, "output_norm.weight", c->n_embd, false, &m->output_norm, err, errlen) ||
        load_mat(f, "output.weight", c->n_embd, c->n_vocab, true, &m->output, err, errlen))
        goto fail;
    if (!m->output.data) m->output = m->tok_embd; /* tied embeddings */

    m->layers = calloc((size_t)c->n_layer, sizeof *m->layers);
    if (!m->layers) { snprintf(err, errlen, "model: out of memory"); goto fail; }
    for (int i = 0; i < c->n_layer; i++) {
        model_layer *L = &m->layers[i];
        char n[96];
#define NAME(s) (snprintf(n, sizeof n, "blk.%d.%s", i, s), n)
        if (load_vec(f, NAME("attn_norm.weight"), c->n_embd, false, &L->attn_norm, err, errlen) ||
            load_vec(f, NAME("ffn_norm.weight"), c->n_embd, false, &L->ffn_norm, err, errlen) ||
            load_mat(f, NAME("attn_q.weight"), c->n_embd, q_dim, false, &L->wq, err, errlen) ||
            load_mat(f, NAME("attn_k.weight"), c->n_embd, kv_dim, false, &L->wk, err, errlen) ||
            load_mat(f, NAME("attn_v.weight"), c->n_embd, kv_dim, false, &L->wv, err, errlen) ||
            load_mat(f, NAME("attn_output.weight"), q_dim, c->n_embd, false, &L->wo, err, errlen) ||
            load_mat(f, NAME("ffn_gate.weight"), c->n_embd, c->n_ff, false, &L->w_gate, err, errlen) ||
            load_mat(f, NAME("ffn_up.weight"), c->n_embd, c->n_ff, false, &L->w_up, err, errlen) ||
            load_mat(f, NAME("ffn_down.weight"), c->n_ff, c->n_embd, false, &L->w_down, err, errlen))
            goto fail;
        bool bias = c->arch == ARCH_QWEN2;
        if (load_vec(f, NAME("attn_q.bias"), q_dim, !bias, &L->bq, err, errlen) ||
            load_vec(f, NAME("attn_k.bias"), kv_dim, !bias, &L->bk, err, errlen) ||
            load_vec(f, NAME("attn_v.bias"), kv_dim, !bias, &L->bv, err, errlen))
            goto fail;
        bool qkn = c->arch == ARCH_QWEN3;
        if (load_vec(f, NAME("attn_q_norm.weight"), c->head_dim, !qkn, &L->q_norm, err, errlen) ||
            load_vec(f, NAME("attn_k_norm.weight"), c->head_dim, !qkn, &L->k_norm, err, errlen))
            goto fail;
#undef NAME
    }
    if (repack && repack_weights(m, err, errlen) != 0) goto fail;
    gguf_str gname;
    if (gguf_get_str(f, "general.name", &gname) == GGUF_OK)
        snprintf(m->name, sizeof m->name, "%.*s", (int)(gname.len < 127 ? gname.len : 127), gname.ptr);
    else
        snprintf(m->name, sizeof m->name, "%s", c->arch == ARCH_QWEN2 ? "qwen2" : c->arch == ARCH_QWEN3 ? "qwen3" : "llama");
    *out = m;
    return 0;
fail:
    model_free(m);
    return -1;
}

void model_free(model *m) {
    if (!m) return;
    free(m->layers);
    free(m->x4_buf);
    gguf_close(m->f);
    free(m);
}

/* ---------------------------------------------------------------------------------------- */
/* Scratch                                                                                   */

struct model_ctx {
    int max_tokens, max_ctx;
    float *x, *xn, *q, *k, *v, *att, *gate, *up; /* [max_tokens][...] activations */
    uint8_t *xq[3];                              /* quantized inputs, one per distinct type */
    size_t xq_stride;
    float *rope;                                 /* [max_tokens][rope_dim/2][2] cos, sin */
    float *attn_ws;                              /* [n_threads][attn_ws_floats] attention scratch */
    size_t attn_ws_floats;
    int n_threads;
    int32_t *out_rows;                           /* batch rows that want logits */
};

static void *xcalloc(size_t n, size_t sz) { return n && sz ? calloc(n, sz) : NULL; }

model_ctx *model_ctx_create(const model *m, int max_tokens, int max_ctx, int n_threads) {
    const model_config *c = &m->c;
    model_ctx *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return NULL;
    ctx->max_tokens = max_tokens;
    ctx->max_ctx = max_ctx;
    ctx->n_threads = n_threads;
    size_t T = (size_t)max_tokens;
    int q_dim = c->n_head * c->head_dim, kv_dim = c->n_head_kv * c->head_dim;
    int wide = c->n_embd;
    if (q_dim > wide) wide = q_dim;
    if (c->n_ff > wide) wide = c->n_ff;
    ctx->x = xcalloc(T * c->n_embd, sizeof(float));
    ctx->xn = xcalloc(T * c->n_embd, sizeof(float));
    ctx->q = xcalloc(T * q_dim, sizeof(float));
    ctx->k = xcalloc(T * kv_dim, sizeof(float));
    ctx->v = xcalloc(T * kv_dim, sizeof(float));
    ctx->att = xcalloc(T * q_dim, sizeof(float));
    ctx->gate = xcalloc(T * c->n_ff, sizeof(float));
    ctx->up = xcalloc(T * c->n_ff, sizeof(float));
    ctx->xq_stride = ((size_t)wide * 4 + 256 + 63) & ~(size_t)63; /* f32 is the widest format */
    for (int i = 0; i < 3; i++) ctx->xq[i] = aligned_alloc(64, T * ctx->xq_stride);
    ctx->rope = xcalloc(T * (size_t)c->rope_dim, sizeof(float));
    int G = c->n_head / c->n_head_kv;
    ctx->attn_ws_floats = (size_t)G * c->head_dim + (size_t)G * max_ctx; /* qr + sc, see attention_worker */
    ctx->attn_ws = xcalloc((size_t)n_threads * ctx->attn_ws_floats, sizeof(float));
    ctx->out_rows = xcalloc(T, sizeof(int32_t));
    if (!ctx->x || !ctx->xn || !ctx->q || !ctx->k || !ctx->v || !ctx->att || !ctx->gate || !ctx->up ||
        !ctx->xq[0] || !ctx->xq[1] || !ctx->xq[2] || !ctx->rope || !ctx->attn_ws || !ctx->out_rows) {
        model_ctx_free(ctx);
        return NULL;
    }
    return ctx;
}

void model_ctx_free(model_ctx *ctx) {
    if (!ctx) return;
    free(ctx->x); free(ctx->xn); free(ctx->q); free(ctx->k); free(ctx->v); free(ctx->att);
    free(ctx->gate); free(ctx->up);
    for (int i = 0; i < 3; i++) free(ctx->xq[i]);
    free(ctx->rope); free(ctx->attn_ws); free(ctx->out_rows);
    free(ctx);
}

/* ---------------------------------------------------------------------------------------- */
/* Small float kernels (fixed operation order: results never depend on the batch)           */

/* fp16 row helpers for the KV cache (IEEE half, round to nearest even both ways). */
static void f32_to_f16_row(kv_elem *dst, const float *src, int n) {
    int i = 0;
#if defined(__F16C__) && defined(__AVX2__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) dst[i] = fp32_to_fp16(src[i]);
}

static inline float round_f16(float x) {
#if defined(__F16C__)
    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph(_mm_set_ss(x), _MM_FROUND_TO_NEAREST_INT)));
#else
    return fp16_to_fp32(fp32_to_fp16(x));
#endif
}

/* The attention dot products follow the summation order of llama.cpp's CPU attention (its
 * tinyBLAS f16 GEMM): one 8-lane accumulator fed in order, then the lanes summed as
 * ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)). The order is fixed, so results never depend on the
 * batch; matching the peer's order keeps greedy outputs comparable token for token. */
static inline float hsum8(const float l[8]) {
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

static inline void f16_to_f32_row(float *dst, const kv_elem *src, int n) {
    int i = 0;
#if defined(__F16C__) && defined(__AVX2__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; i++) dst[i] = fp16_to_fp32(src[i]);
}

/* a . b with one 8-lane accumulator fed in order, lanes summed by hsum8; n a multiple of 8 */
static float dot_f32_lanes(const float *a, const float *b, int n) {
    float lanes[8];
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    _mm256_storeu_ps(lanes, acc);
#else
    for (int l = 0; l < 8; l++) lanes[l] = 0;
    for (int i = 0; i < n; i += 8)
        for (int l = 0; l < 8; l++) lanes[l] = fmaf(a[i + l], b[i + l], lanes[l]);
#endif
    return hsum8(lanes);
}

/* Scores of one query against m <= 8 K rows (fp16, row stride ks): out[j] = q . k_j * scale,
 * with one 8-lane accumulator per row fed in order and reduced in hsum8's order, bit for bit
 * dot_f32_lanes. The 8 dot products are interleaved and reduced together: lanes of positions j
 * and j+4 share a register for the reduction. */
static void scores8(const float *q, const kv_elem *k, size_t ks, int m, int hd, float scale, float *out) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    if (m == 8) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
#define KROW(j) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + (size_t)(j) * ks + i)))
        for (int i = 0; i < hd; i += 8) {
            const __m256 qv = _mm256_loadu_ps(q + i);
            a0 = _mm256_fmadd_ps(qv, KROW(0), a0);
            a1 = _mm256_fmadd_ps(qv, KROW(1), a1);
            a2 = _mm256_fmadd_ps(qv, KROW(2), a2);
            a3 = _mm256_fmadd_ps(qv, KROW(3), a3);
            a4 = _mm256_fmadd_ps(qv, KROW(4), a4);
            a5 = _mm256_fmadd_ps(qv, KROW(5), a5);
            a6 = _mm256_fmadd_ps(qv, KROW(6), a6);
            a7 = _mm256_fmadd_ps(qv, KROW(7), a7);
        }
#undef KROW
        /* [l0+l4, l1+l5, l2+l6, l3+l7] of position j | the same of position j+4, then
         * (l0+l4)+(l2+l6) and (l1+l5)+(l3+l7), then their sum in lanes 0 (j) and 4 (j+4) */
#define RED(x, y) ({ __m256 p_ = _mm256_add_ps(_mm256_permute2f128_ps(x, y, 0x20), _mm256_permute2f128_ps(x, y, 0x31)); \
                     p_ = _mm256_add_ps(p_, _mm256_shuffle_ps(p_, p_, _MM_SHUFFLE(1, 0, 3, 2)));                     \
                     _mm256_add_ps(p_, _mm256_shuffle_ps(p_, p_, _MM_SHUFFLE(2, 3, 0, 1))); })
        const __m256 r0 = RED(a0, a4), r1 = RED(a1, a5), r2 = RED(a2, a6), r3 = RED(a3, a7);
#undef RED
        const __m256 u01 = _mm256_unpacklo_ps(r0, r1), u23 = _mm256_unpacklo_ps(r2, r3);
        const __m256 v = _mm256_shuffle_ps(u01, u23, _MM_SHUFFLE(1, 0, 1, 0));
        _mm256_storeu_ps(out, _mm256_mul_ps(v, _mm256_set1_ps(scale)));
        return;
    }
#endif
    float row[1024];
    for (int j = 0; j < m; j++) {
        f16_to_f32_row(row, k + (size_t)j * ks, hd);
        out[j] = dot_f32_lanes(q, row, hd) * scale;
    }
}



static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    double ss = 0; /* ggml sums in double */
    for (int i = 0; i < n; i++) ss += (double)(x[i] * x[i]);
    float scale = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * w[i];
}

/* exp of 8 floats: Cody-Waite range reduction and the classic Cephes polynomial (about 1 ulp
 * over the softmax range). A fixed, vectorized function: the softmax costs a fraction of libm's
 * per-element expf, and gives the same bits for the same input anywhere in a batch. */
#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
    const __m256 z = _mm256_mul_ps(r, r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, z, r);
    y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

/* p[j] = exp(p[j] - mx) for j < n; returns the sum, taken in floats of 8 (hsum8) and then in
 * double, in a fixed order. */
static double softmax_exp(float *p, int n, float mx) {
    double sum = 0;
    int j0 = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 vmx = _mm256_set1_ps(mx);
    float l[8];
    for (; j0 + 8 <= n; j0 += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j0), vmx));
        _mm256_storeu_ps(p + j0, e);
        _mm256_storeu_ps(l, e);
        sum += (double)hsum8(l);
    }
    if (j0 < n) {
        float x[8] = { 0 };
        for (int k = 0; j0 + k < n; k++) x[k] = p[j0 + k] - mx;
        _mm256_storeu_ps(l, exp8(_mm256_loadu_ps(x)));
        for (int k = 0; k < 8; k++) {
            if (j0 + k < n) p[j0 + k] = l[k];
            else l[k] = 0;
        }
        sum += (double)hsum8(l);
    }
#else
    for (; j0 < n; j0++) { p[j0] = expf(p[j0] - mx); sum += p[j0]; }
#endif
    return sum;
}

/* p[j] = fp16(p[j] * a): probabilities as they meet the fp16 V cache */
static void scale_round_f16(float *p, int n, float a) {
    int j = 0;
#if defined(__F16C__) && defined(__AVX2__)
    const __m256 va = _mm256_set1_ps(a);
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(p + j, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(p + j), va), _MM_FROUND_TO_NEAREST_INT)));
#endif
    for (; j < n; j++) p[j] = round_f16(p[j] * a);
}

static inline float silu(float x) { return x / (1.0f + expf(-x)); }

static void split_range(int n, int ith, int nth, int *lo, int *hi) {
    *lo = (int)((int64_t)n * ith / nth);
    *hi = (int)((int64_t)n * (ith + 1) / nth);
}

/* ---------------------------------------------------------------------------------------- */
/* Matmul groups: Y_g[t][r] (+)= W_g[r] . X[t] for up to 3 matrices sharing input X          */

typedef struct {
    int n_mat;
    const mat *w[3];
    float *y[3];
    int y_stride[3];
    const float *bias[3];
    bool accumulate;       /* y += (residual) instead of y = */
    const float *x;        /* input rows [T][x_stride] */
    int x_stride;
    int T;
    model_ctx *ctx;
    int xq_slot[3];        /* which ctx->xq buffer holds the input in w[i]'s dot type */
    ggml_type vdt[3];
    int n_slots;
    atomic_int next_tile;  /* tiles are handed out dynamically: a thread slowed by anything
                              else on the machine does less, the others do more */
} mm_group;

/* Quantizes input rows [lo, hi) into every activation format the group needs. */
static void mm_quantize_rows(const mm_group *g, int lo, int hi) {
    for (int sl = 0; sl < g->n_slots; sl++) {
        ggml_type vdt = GGML_TYPE_F32;
        for (int i = 0; i < g->n_mat; i++) if (g->xq_slot[i] == sl) vdt = g->vdt[i];
        for (int t = lo; t < hi; t++)
            quantize_row_act(vdt, g->x + (size_t)t * g->x_stride, g->ctx->xq[sl] + (size_t)t * g->ctx->xq_stride,
                             g->w[0]->cols);
    }
}

static void mm_quantize_worker(void *p, int ith, int nth) {
    mm_group *g = p;
    int lo, hi;
    split_range(g->T, ith, nth, &lo, &hi);
    mm_quantize_rows(g, lo, hi);
}

static void mm_worker(void *p, int ith, int nth) {
    mm_group *g = p;
    int total = 0;
    for (int i = 0; i < g->n_mat; i++) total += (int)g->w[i]->rows;
    int n_tiles = (total + MM_TILE - 1) / MM_TILE;
    float tmp[MM_TOKENS * MM_TILE];
    (void)ith;
    /* chunks of tiles: small enough to balance, large enough to keep the counter cold */
    int chunk = n_tiles / (8 * nth);
    if (chunk < 1) chunk = 1;
    if (chunk > 16) chunk = 16;
    for (;;) {
    int tlo = atomic_fetch_add_explicit(&g->next_tile, chunk, memory_order_relaxed);
    if (tlo >= n_tiles) break;
    int thi = tlo + chunk < n_tiles ? tlo + chunk : n_tiles;
    for (int tile = tlo; tile < thi; tile++) {
        int r0 = tile * MM_TILE, r1 = r0 + MM_TILE;
        if (r1 > total) r1 = total;
        /* map the global row range onto matrices (a tile may straddle two) */
        int base = 0;
        for (int i = 0; i < g->n_mat; i++) {
            const mat *w = g->w[i];
            int lo = r0 > base ? r0 - base : 0, hi = r1 - base;
            if (hi > w->rows) hi = (int)w->rows;
            if (lo < hi) {
                const uint8_t *xq = g->ctx->xq[g->xq_slot[i]];
                const uint8_t *wrow = (const uint8_t *)w->data + (size_t)lo * w->row_bytes;
                for (int t0 = 0; t0 < g->T; t0 += MM_TOKENS) {
                    int nt = g->T - t0 < MM_TOKENS ? g->T - t0 : MM_TOKENS;
                    const uint8_t *xt = xq + (size_t)t0 * g->ctx->xq_stride;
                    if (w->x4)
                        vec_dot_tile_x4(w->type, w->data, lo, hi - lo, xt, g->ctx->xq_stride, nt, tmp, MM_TILE, w->cols);
                    else
                        vec_dot_tile(w->type, wrow, w->row_bytes, hi - lo, xt, g->ctx->xq_stride, nt, tmp, MM_TILE,
                                     w->cols);
                    for (int t = t0; t < t0 + nt; t++) {
                        float *y = g->y[i] + (size_t)t * g->y_stride[i];
                        const float *v = tmp + (size_t)(t - t0) * MM_TILE - lo;
                        for (int r = lo; r < hi; r++) {
                            float x = v[r];
                            if (g->bias[i]) x += g->bias[i][r];
                            y[r] = g->accumulate ? y[r] + x : x;
                        }
                    }
                }
            }
            base += (int)w->rows;
        }
    }
    }
}

/* Works out which activation formats the group's matrices need (one buffer per format). */
static void mm_prepare(mm_group *g) {
    g->n_slots = 0;
    atomic_store_explicit(&g->next_tile, 0, memory_order_relaxed);
    for (int i = 0; i < g->n_mat; i++) {
        g->vdt[i] = quant_vec_dot_type(g->w[i]->type);
        g->xq_slot[i] = -1;
        for (int j = 0; j < i; j++)
            if (g->vdt[j] == g->vdt[i]) g->xq_slot[i] = g->xq_slot[j];
        if (g->xq_slot[i] < 0) g->xq_slot[i] = g->n_slots++;
    }
}

/* Quantizes the input and multiplies: two hand-overs. Phases that produce the input row by
 * row (norms, SwiGLU) quantize it themselves (mm_quantize_rows) and call tp_run(mm_worker). */
static void mm_run(threadpool *tp, mm_group *g) {
    mm_prepare(g);
    tp_run(tp, mm_quantize_worker, g);
    tp_run(tp, mm_worker, g);
}

/* ---------------------------------------------------------------------------------------- */
/* The forward pass                                                                          */

typedef struct {
    const model *m;
    model_ctx *ctx;
    kv_pool *kv;
    const model_batch *b;
    const model_layer *L;
    int layer;
    int n_out;
    mm_group *next;   /* the matmul whose input the current row-wise phase produces */
} fwd;

static void embed_worker(void *p, int ith, int nth) {
    fwd *f = p;
    const model_config *c = &f->m->c;
    int lo, hi;
    split_range(f->b->n, ith, nth, &lo, &hi);
    const mat *e = &f->m->tok_embd;
    for (int t = lo; t < hi; t++)
        dequantize_row(e->type, (const uint8_t *)e->data + (size_t)f->b->tokens[t] * e->row_bytes,
                       f->ctx->x + (size_t)t * c->n_embd, c->n_embd);
    /* RoPE angles per token, as ggml computes them: theta_i = pos * base^(-2i/rope_dim) by
     * repeated multiplication in float. */
    int half = c->rope_dim / 2;
    float theta_scale = powf(c->rope_base, -2.0f / (float)c->rope_dim);
    for (int t = lo; t < hi; t++) {
        float theta = (float)f->b->pos[t];
        float *r = f->ctx->rope + (size_t)t * c->rope_dim;
        for (int i = 0; i < half; i++) {
            r[2 * i] = cosf(theta);
            r[2 * i + 1] = sinf(theta);
            theta *= theta_scale;
        }
    }
}

static void norm_worker_attn(void *p, int ith, int nth) {
    fwd *f = p;
    const model_config *c = &f->m->c;
    int lo, hi;
    split_range(f->b->n, ith, nth, &lo, &hi);
    for (int t = lo; t < hi; t++)
        rmsnorm(f->ctx->xn + (size_t)t * c->n_embd, f->ctx->x + (size_t)t * c->n_embd, f->L->attn_norm, c->n_embd, c->rms_eps);
    mm_quantize_rows(f->next, lo, hi);
}

static void norm_worker_ffn(void *p, int ith, int nth) {
    fwd *f = p;
    const model_config *c = &f->m->c;
    int lo, hi;
    split_range(f->b->n, ith, nth, &lo, &hi);
    for (int t = lo; t < hi; t++)
        rmsnorm(f->ctx->xn + (size_t)t * c->n_embd, f->ctx->x + (size_t)t * c->n_embd, f->L->ffn_norm, c->n_embd, c->rms_eps);
    mm_quantize_rows(f->next, lo, hi);
}

static void rope_apply(float *v, const float *r, int rope_dim, bool neox) {
    int half = rope_dim / 2;
    for (int i = 0; i < half; i++) {
        float cs = r[2 * i], sn = r[2 * i + 1];
        int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        float x0 = v[a], x1 = v[b];
        v[a] = x0 * cs - x1 * sn;
        v[b] = x0 * sn + x1 * cs;
    }
}

/* q/k norm (qwen3), RoPE, and the K/V write into the sequence's blocks. */
static void rope_kv_worker(void *p, int ith, int nth) {
    fwd *f = p;
    const model_config *c = &f->m->c;
    model_ctx *ctx = f->ctx;
    int lo, hi;
    split_range(f->b->n, ith, nth, &lo, &hi);
    int q_dim = c->n_head * c->head_dim, kv_dim = c->n_head_kv * c->head_dim;
    for (int t = lo; t < hi; t++) {
        float *q = ctx->q + (size_t)t * q_dim, *k = ctx->k + (size_t)t * kv_dim, *v = ctx->v + (size_t)t * kv_dim;
        const float *r = ctx->rope + (size_t)t * c->rope_dim;
        for (int h = 0; h < c->n_head; h++) {
            float *qh = q + h * c->head_dim;
            if (f->L->q_norm) rmsnorm(qh, qh, f->L->q_norm, c->head_dim, c->rms_eps);
            rope_apply(qh, r, c->rope_dim, c->rope_neox);
        }
        for (int h = 0; h < c->n_head_kv; h++) {
            float *kh = k + h * c->head_dim;
            if (f->L->k_norm) rmsnorm(kh, kh, f->L->k_norm, c->head_dim, c->rms_eps);
            rope_apply(kh, r, c->rope_dim, c->rope_neox);
        }
        const kv_seq *s = f->b->seqs[t];
        int pos = f->b->pos[t];
        int32_t blk = s->blocks[pos / KV_BLOCK];
        int slot = pos % KV_BLOCK;
        f32_to_f16_row(kv_k(f->kv, blk, f->layer) + (size_t)slot * kv_dim, k, kv_dim);
        f32_to_f16_row(kv_v(f->kv, blk, f->layer) + (size_t)slot * kv_dim, v, kv_dim);
    }
}

/* out[0..w) = sum over j < n of p[j] * V_j[off .. off+w), w <= 64 a multiple of 8: each output
 * summed over j in order (fused multiply-adds), all w sums held in registers while the V rows
 * stream by once, contiguously. */
static void attend_v(const kv_pool *kv, const kv_seq *s, int layer, int off, int kv_dim, const float *p, int n,
                     int w, float *out) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    if (w == 64) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int j0 = 0; j0 < n; j0 += KV_BLOCK) {
            const kv_elem *vb = kv_v(kv, s->blocks[j0 / KV_BLOCK], layer) + off;
            const int m = n - j0 < KV_BLOCK ? n - j0 : KV_BLOCK;
            for (int k = 0; k < m; k++) {
                const kv_elem *v = vb + (size_t)k * kv_dim;
                const __m256 pj = _mm256_set1_ps(p[j0 + k]);
#define VC(i) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + 8 * (i))))
                a0 = _mm256_fmadd_ps(pj, VC(0), a0);
                a1 = _mm256_fmadd_ps(pj, VC(1), a1);
                a2 = _mm256_fmadd_ps(pj, VC(2), a2);
                a3 = _mm256_fmadd_ps(pj, VC(3), a3);
                a4 = _mm256_fmadd_ps(pj, VC(4), a4);
                a5 = _mm256_fmadd_ps(pj, VC(5), a5);
                a6 = _mm256_fmadd_ps(pj, VC(6), a6);
                a7 = _mm256_fmadd_ps(pj, VC(7), a7);
#undef VC
            }
        }
        _mm256_storeu_ps(out + 0, a0); _mm256_storeu_ps(out + 8, a1);
        _mm256_storeu_ps(out + 16, a2); _mm256_storeu_ps(out + 24, a3);
        _mm256_storeu_ps(out + 32, a4); _mm256_storeu_ps(out + 40, a5);
        _mm256_storeu_ps(out + 48, a6); _mm256_storeu_ps(out + 56, a7);
        return;
    }
#endif
    for (int d = 0; d < w; d++) out[d] = 0;
    for (int j = 0; j < n; j++) {
        const kv_elem *v = kv_v(kv, s->blocks[j / KV_BLOCK], layer) + (size_t)(j % KV_BLOCK) * kv_dim + off;
        for (int d = 0; d < w; d++) out[d] = fmaf(p[j], fp16_to_fp32(v[d]), out[d]);
    }
}

/* Causal attention for one (token, KV head) item at a time: the query heads sharing that KV
 * head (GQA) walk the sequence's blocks together, so each K and V row is converted from fp16
 * once for all of them. Per query head the arithmetic is fixed (see hsum8), so results never
 * depend on the batch or the thread count. As llama.cpp: q meets the fp16 K cache as fp16;
 * scores and softmax in f32 (exponentials summed in floats of 8, then in double);
 * probabilities meet the fp16 V cache as fp16. */
static void attention_worker(void *p, int ith, int nth) {
    fwd *f = p;
    const model_config *c = &f->m->c;
    model_ctx *ctx = f->ctx;
    const int hd = c->head_dim, G = c->n_head / c->n_head_kv;
    const int q_dim = c->n_head * hd, kv_dim = c->n_head_kv * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    /* Work items: (token, KV head); with too few of those to keep every thread busy (decode),
     * (token, KV head, query head), at the price of reading K/V rows once per head. */
    const int per_group = f->b->n * c->n_head_kv >= 4 * nth ? 1 : G;
    int lo, hi;
    split_range(f->b->n * c->n_head_kv * per_group, ith, nth, &lo, &hi);
    float *ws = ctx->attn_ws + (size_t)ith * ctx->attn_ws_floats;
    float *qr = ws;                            /* [G][hd]   queries rounded to fp16 */
    float *sc = qr + (size_t)G * hd;           /* [G][max_ctx] scores, then probabilities */
    for (int it = lo; it < hi; it++) {
        const int t = it / (c->n_head_kv * per_group), g = it / per_group % c->n_head_kv;
        const int h0 = per_group == 1 ? 0 : it % per_group, h1 = per_group == 1 ? G : h0 + 1;
        const kv_seq *s = f->b->seqs[t];
        const int n = f->b->pos[t] + 1;
        for (int h = h0; h < h1; h++) {
            const float *qh = ctx->q + (size_t)t * q_dim + (size_t)(g * G + h) * hd;
            for (int d = 0; d < hd; d++) qr[h * hd + d] = round_f16(qh[d]);
        }
        /* scores, 8 positions at a time (a block of KV_BLOCK = 16 holds two such groups) */
        for (int j0 = 0; j0 < n; j0 += 8) {
            const kv_elem *kb = kv_k(f->kv, s->blocks[j0 / KV_BLOCK], f->layer) + (size_t)(j0 % KV_BLOCK) * kv_dim + g * hd;
            const int m = n - j0 < 8 ? n - j0 : 8;
            for (int h = h0; h < h1; h++) scores8(qr + h * hd, kb, (size_t)kv_dim, m, hd, scale, sc + (size_t)h * ctx->max_ctx + j0);
        }
        /* softmax per head */
        float inv[64];
        for (int h = h0; h < h1; h++) {
            float *sh = sc + (size_t)h * ctx->max_ctx;
            float mx = -INFINITY;
            for (int j = 0; j < n; j++) if (sh[j] > mx) mx = sh[j];
            inv[h] = (float)(1.0 / softmax_exp(sh, n, mx));
        }
        /* out = sum_j p_j v_j */
        for (int h = h0; h < h1; h++) {
            float *ph = sc + (size_t)h * ctx->max_ctx;
            scale_round_f16(ph, n, inv[h]);
            float *out = ctx->att + (size_t)t * q_dim + (size_t)(g * G + h) * hd;
            for (int d0 = 0; d0 < hd; d0 += 64)
                attend_v(f->kv, s, f->layer, g * hd + d0, kv_dim, ph, n, hd - d0 < 64 ? hd - d0 : 64, out + d0);
        }
    }
}

static void swiglu_worker(void *p, int ith, int nth) {
    fwd *f = p;
    const model_config *c = &f->m->c;
    int lo, hi;
    split_range(f->b->n, ith, nth, &lo, &hi);
    for (size_t i = (size_t)lo * c->n_ff; i < (size_t)hi * c->n_ff; i++)
        f->ctx->gate[i] = silu(f->ctx->gate[i]) * f->ctx->up[i];
    mm_quantize_rows(f->next, lo, hi);
}

static void final_norm_worker(void *p, int ith, int nth) {
    fwd *f = p;
    const model_config *c = &f->m->c;
    int lo, hi;
    split_range(f->n_out, ith, nth, &lo, &hi);
    for (int i = lo; i < hi; i++) {
        int t = f->ctx->out_rows[i];
        rmsnorm(f->ctx->xn + (size_t)i * c->n_embd, f->ctx->x + (size_t)t * c->n_embd, f->m->output_norm, c->n_embd, c->rms_eps);
    }
}

int model_forward(const model *m, model_ctx *ctx, threadpool *tp, kv_pool *kv, const model_batch *b,
                  float *logits_out, char *err, size_t errlen) {
    const model_config *c = &m->c;
    if (b->n <= 0 || b->n > ctx->max_tokens) {
        snprintf(err, errlen, "model: batch of %d tokens (max %d)", b->n, ctx->max_tokens);
        return -1;
    }
    for (int t = 0; t < b->n; t++) {
        if (b->tokens[t] < 0 || b->tokens[t] >= c->n_vocab) {
            snprintf(err, errlen, "model: token id %d out of range [0, %d)", b->tokens[t], c->n_vocab);
            return -1;
        }
        if (b->pos[t] < 0 || b->pos[t] >= ctx->max_ctx) {
            snprintf(err, errlen, "model: position %d outside the context (%d)", b->pos[t], ctx->max_ctx);
            return -1;
        }
        const kv_seq *s = b->seqs[t];
        if (b->pos[t] / KV_BLOCK >= s->n_blocks) {
            snprintf(err, errlen, "model: position %d has no KV block (sequence holds %d)", b->pos[t], s->n_blocks);
            return -1;
        }
    }
    fwd f = { .m = m, .ctx = ctx, .kv = kv, .b = b };
    int q_dim = c->n_head * c->head_dim, kv_dim = c->n_head_kv * c->head_dim;
    tp_run(tp, embed_worker, &f);
    for (int l = 0; l < c->n_layer; l++) {
        const model_layer *L = &m->layers[l];
        f.L = L;
        f.layer = l;
        mm_group qkv = { .n_mat = 3, .w = { &L->wq, &L->wk, &L->wv }, .y = { ctx->q, ctx->k, ctx->v },
                         .y_stride = { q_dim, kv_dim, kv_dim }, .bias = { L->bq, L->bk, L->bv },
                         .x = ctx->xn, .x_stride = c->n_embd, .T = b->n, .ctx = ctx };
        mm_prepare(&qkv);
        f.next = &qkv;
        tp_run(tp, norm_worker_attn, &f);
        tp_run(tp, mm_worker, &qkv);
        tp_run(tp, rope_kv_worker, &f);
        tp_run(tp, attention_worker, &f);
        mm_group wo = { .n_mat = 1, .w = { &L->wo }, .y = { ctx->x }, .y_stride = { c->n_embd },
                        .accumulate = true, .x = ctx->att, .x_stride = q_dim, .T = b->n, .ctx = ctx };
        mm_run(tp, &wo);
        mm_group gu = { .n_mat = 2, .w = { &L->w_gate, &L->w_up }, .y = { ctx->gate, ctx->up },
                        .y_stride = { c->n_ff, c->n_ff }, .x = ctx->xn, .x_stride = c->n_embd, .T = b->n, .ctx = ctx };
        mm_prepare(&gu);
        f.next = &gu;
        tp_run(tp, norm_worker_ffn, &f);
        tp_run(tp, mm_worker, &gu);
        mm_group down = { .n_mat = 1, .w = { &L->w_down }, .y = { ctx->x }, .y_stride = { c->n_embd },
                          .accumulate = true, .x = ctx->gate, .x_stride = c->n_ff, .T = b->n, .ctx = ctx };
        mm_prepare(&down);
        f.next = &down;
        tp_run(tp, swiglu_worker, &f);
        tp_run(tp, mm_worker, &down);
    }
    int n_out = 0;
    for (int t = 0; t < b->n; t++)
        if (b->want_logits && b->want_logits[t]) ctx->out_rows[n_out++] = t;
    if (n_out == 0) return 0;
    f.n_out = n_out;
    tp_run(tp, final_norm_worker, &f);
    mm_group out = { .n_mat = 1, .w = { &m->output }, .y = { logits_out }, .y_stride = { c->n_vocab },
                     .x = ctx->xn, .x_stride = c->n_embd, .T = n_out, .ctx = ctx };
    mm_run(tp, &out);
    return 0;
}
