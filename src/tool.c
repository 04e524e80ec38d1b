/* pcache-tool: developer subcommands used by the tests and benchmarks (not the product CLI).
 * Each subcommand is one function in the table below. */
#include "api.h"
#include "engine.h"
#include "gguf.h"
#include "gpu.h"
#include "grammar.h"
#include "jsonschema.h"
#include "kv.h"
#include "kvevent.h"
#include "fingerprint.h"
#include "prompt.h"
#include "server.h"
#include "model.h"
#include "quant.h"
#include "threadpool.h"
#include "tokenizer.h"
#include "util.h"
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Reads a JSON array of token ids from stdin. Returns the count or -1. */
static int read_ids(int32_t **out) {
    size_t len;
    char *text = read_stream(stdin, &len);
    cJSON *j = text ? cJSON_ParseWithLength(text, len) : NULL;
    free(text);
    if (!cJSON_IsArray(j)) { cJSON_Delete(j); fprintf(stderr, "expected a JSON array of token ids on stdin\n"); return -1; }
    int n = cJSON_GetArraySize(j), k = 0;
    int32_t *ids = malloc(((size_t)n + 1) * sizeof *ids);
    cJSON *it;
    cJSON_ArrayForEach(it, j) {
        if (!cJSON_IsNumber(it)) { free(ids); cJSON_Delete(j); fprintf(stderr, "token ids must be numbers\n"); return -1; }
        ids[k++] = (int32_t)it->valuedouble;
    }
    cJSON_Delete(j);
    *out = ids;
    return n;
}

/* A model with one sequence over a private KV pool: the plainest path through model_forward. */
typedef struct {
    model *m;
    kv_pool kv;
    kv_seq seq;
    model_ctx *ctx;
    threadpool *tp;
    gpu_backend *gpu;    /* PCACHE_DEVICE=cuda: the CUDA backend instead of model_forward */
} solo;

static bool want_cuda(void) {
    const char *d = getenv("PCACHE_DEVICE");
    return d && !strcmp(d, "cuda");
}

static int solo_open(solo *s, const char *path, int n_ctx, int n_threads) {
    char err[512];
    memset(s, 0, sizeof *s);
    if (model_load_ex(&s->m, path, !want_cuda(), err, sizeof err)) { fprintf(stderr, "%s\n", err); return -1; }
    const model_config *c = &s->m->c;
    if (want_cuda()) {
        int nb = 0;
        size_t mem = kv_block_bytes(c->n_layer, c->n_head_kv * c->head_dim) * (size_t)((n_ctx + KV_BLOCK - 1) / KV_BLOCK + 2);
        if (gpu_create(&s->gpu, s->m, n_ctx, n_ctx, mem, &nb, err, sizeof err) ||
            kv_pool_init_external(&s->kv, c->n_layer, c->n_head_kv * c->head_dim, nb, gpu_copy_block, s->gpu, err, sizeof err)) {
            fprintf(stderr, "%s\n", err);
            return -1;
        }
        return 0;
    }
    size_t block_bytes = (size_t)c->n_layer * 2 * KV_BLOCK * c->n_head_kv * c->head_dim * sizeof(float);
    size_t mem = block_bytes * (size_t)((n_ctx + KV_BLOCK - 1) / KV_BLOCK + 2);
    if (kv_pool_init(&s->kv, c->n_layer, c->n_head_kv * c->head_dim, mem, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    s->ctx = model_ctx_create(s->m, n_ctx, n_ctx, n_threads);
    s->tp = tp_create(n_threads);
    return s->ctx && s->tp ? 0 : -1;
}

static void solo_close(solo *s) {
    kv_seq_release(&s->kv, &s->seq);
    free(s->seq.blocks);
    kv_pool_free(&s->kv);
    model_ctx_free(s->ctx);
    if (s->tp) tp_free(s->tp);
    gpu_free(s->gpu);
    model_free(s->m);
}

/* Runs tokens[0..n) at positions seq.n_tokens.. ; logits for all (all=true) or the last. */
static int solo_eval(solo *s, const int32_t *tokens, int n, bool all, float *logits) {
    char err[512];
    int start = s->seq.n_tokens;
    if (kv_seq_prepare(&s->kv, &s->seq, start + n)) { fprintf(stderr, "KV pool exhausted\n"); return -1; }
    int32_t *pos = malloc((size_t)n * sizeof *pos);
    kv_seq **seqs = malloc((size_t)n * sizeof *seqs);
    bool *want = malloc((size_t)n * sizeof *want);
    for (int i = 0; i < n; i++) { pos[i] = start + i; seqs[i] = &s->seq; want[i] = all || i == n - 1; }
    model_batch b = { .n = n, .tokens = tokens, .pos = pos, .seqs = seqs, .want_logits = want };
    int rc = s->gpu ? gpu_forward(s->gpu, &s->kv, &b, logits, NULL, err, sizeof err)
                    : model_forward(s->m, s->ctx, s->tp, &s->kv, &b, logits, err, sizeof err);
    if (rc) fprintf(stderr, "%s\n", err);
    else s->seq.n_tokens = start + n;
    free(pos); free(seqs); free(want);
    return rc;
}

static float f16_round(float x) { return fp16_to_fp32(fp32_to_fp16(x)); }

/* gpu-matmul TYPE ROWS COLS N WFILE: the CUDA backend's matmul on the weights in WFILE (ROWS rows
 * of TYPE) and N random activation rows, against a double-precision reference on the same
 * fp16-rounded operands. Prints JSON: the largest relative error (|y - ref| / max|ref|), and
 * whether every row equals the same row computed alone (batch invariance). */
static int cmd_gpu_matmul(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: pcache-tool gpu-matmul TYPE ROWS COLS N WFILE\n"); return 2; }
    int type = -1;
    for (int t = 0; t < 64; t++) {
        const ggml_type_info *ti = ggml_type_get((ggml_type)t);
        if (ti && !strcmp(ti->name, argv[0])) type = t;
    }
    int rows = atoi(argv[1]), cols = atoi(argv[2]), n = atoi(argv[3]);
    if (type < 0 || rows <= 0 || cols <= 0 || n <= 0) { fprintf(stderr, "gpu-matmul: bad arguments\n"); return 2; }
    size_t rb = ggml_row_size((ggml_type)type, cols), len = 0;
    char *w = read_file(argv[4], &len);
    if (!w || len != rb * (size_t)rows) { fprintf(stderr, "gpu-matmul: %s holds %zu bytes, expected %zu\n", argv[4], len, rb * rows); free(w); return 1; }
    float *x = malloc(sizeof(float) * (size_t)n * cols), *y = malloc(sizeof(float) * (size_t)n * rows);
    float *y1 = malloc(sizeof(float) * rows), *wr = malloc(sizeof(float) * cols), *bias = malloc(sizeof(float) * rows);
    uint64_t st = 12345;
    for (size_t i = 0; i < (size_t)n * cols; i++) {
        st = st * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = ((float)(st >> 40) / (float)(1 << 24) - 0.5f) * 4.0f;
    }
    for (int r = 0; r < rows; r++) bias[r] = 0.01f * (float)(r % 7);
    char err[256];
    if (gpu_test_matmul((ggml_type)type, w, rows, cols, x, n, bias, NULL, y, err, sizeof err)) { fprintf(stderr, "%s\n", err); return 1; }
    /* the same into y0 (accumulate, as the residual adds): ya = y0 + x . W^T + bias */
    float *y0 = malloc(sizeof(float) * (size_t)n * rows), *ya = malloc(sizeof(float) * (size_t)n * rows);
    for (size_t i = 0; i < (size_t)n * rows; i++) y0[i] = (float)((int)(i % 13) - 6) * 0.37f;
    if (gpu_test_matmul((ggml_type)type, w, rows, cols, x, n, bias, y0, ya, err, sizeof err)) { fprintf(stderr, "%s\n", err); return 1; }
    double max_err = 0, max_ref = 0, acc_err = 0;
    for (int r = 0; r < rows; r++) {
        dequantize_row((ggml_type)type, w + (size_t)r * rb, wr, cols);
        for (int t = 0; t < n; t++) {
            double acc = bias[r];
            for (int k = 0; k < cols; k++) acc += (double)f16_round(wr[k]) * f16_round(x[(size_t)t * cols + k]);
            double e = fabs(acc - y[(size_t)t * rows + r]);
            if (e > max_err) max_err = e;
            e = fabs(acc + y0[(size_t)t * rows + r] - ya[(size_t)t * rows + r]);
            if (e > acc_err) acc_err = e;
            if (fabs(acc) > max_ref) max_ref = fabs(acc);
        }
    }
    bool invariant = true;
    for (int t = 0; t < n && invariant; t += (n > 8 ? n / 5 : 1)) {
        if (gpu_test_matmul((ggml_type)type, w, rows, cols, x + (size_t)t * cols, 1, bias, NULL, y1, err, sizeof err)) { fprintf(stderr, "%s\n", err); return 1; }
        invariant = memcmp(y1, y + (size_t)t * rows, sizeof(float) * rows) == 0;
    }
    /* FNV-1a of y's and ya's bits: equal across kernel shapes and splits (PCACHE_MM, PCACHE_SPLIT) */
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < sizeof(float) * (size_t)n * rows; i++) h = (h ^ ((const unsigned char *)y)[i]) * 1099511628211ull;
    for (size_t i = 0; i < sizeof(float) * (size_t)n * rows; i++) h = (h ^ ((const unsigned char *)ya)[i]) * 1099511628211ull;
    printf("{\"rel_err\": %.3g, \"acc_rel_err\": %.3g, \"max_ref\": %.4g, \"batch_invariant\": %s, \"bits\": \"%016llx\"}\n",
           max_ref > 0 ? max_err / max_ref : max_err, max_ref > 0 ? acc_err / max_ref : acc_err, max_ref,
           invariant ? "true" : "false", (unsigned long long)h);
    free(w); free(x); free(y); free(y1); free(y0); free(ya); free(wr); free(bias);
    return 0;
}

/* gpu-argmax ROWS COLS < float32 rows: the CUDA backend's argmax of each row (k_argmax), as JSON. */
static int cmd_gpu_argmax(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: pcache-tool gpu-argmax ROWS COLS < float32\n"); return 2; }
    const int rows = atoi(argv[0]), cols = atoi(argv[1]);
    if (rows <= 0 || cols <= 0) { fprintf(stderr, "gpu-argmax: bad sizes\n"); return 2; }
    size_t len = 0;
    char *x = read_stream(stdin, &len);
    if (!x || len != (size_t)rows * cols * sizeof(float)) {
        fprintf(stderr, "gpu-argmax: %zu bytes on stdin, expected %zu\n", len, (size_t)rows * cols * sizeof(float));
        free(x);
        return 1;
    }
    int32_t *out = malloc(sizeof(int32_t) * rows);
    char err[256];
    if (!out || gpu_test_argmax((const float *)x, rows, cols, out, err, sizeof err)) {
        fprintf(stderr, "%s\n", out ? err : "out of memory");
        free(x); free(out);
        return 1;
    }
    for (int r = 0; r < rows; r++) printf(r ? ", %d" : "[%d", out[r]);
    puts("]");
    free(x); free(out);
    return 0;
}

/* gpu-bench-matmul M K N...: the CUDA matmul's time and TFLOP/s for M x K weights and each N (JSON
 * lines). bench/gpu_gemm.cu sets it beside cuBLAS. */
static int cmd_gpu_bench_matmul(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: pcache-tool gpu-bench-matmul M K N...\n"); return 2; }
    int M = atoi(argv[0]), K = atoi(argv[1]);
    for (int i = 2; i < argc; i++) {
        int N = atoi(argv[i]);
        double ms;
        char err[256];
        if (M <= 0 || K <= 0 || N <= 0) { fprintf(stderr, "gpu-bench-matmul: bad sizes\n"); return 2; }
        if (gpu_bench_matmul(M, K, N, 20, &ms, err, sizeof err)) { fprintf(stderr, "%s\n", err); return 1; }
        printf("{\"M\": %d, \"K\": %d, \"N\": %d, \"ms\": %.4f, \"tflops\": %.1f, \"weight_gbs\": %.0f}\n", M, K, N, ms,
               2.0 * M * K * N / (ms * 1e-3) / 1e12, (double)M * K * 2 / (ms * 1e-3) / 1e9);
    }
    return 0;
}

/* ---- bench-engine: the engine's speed on one model (bench/bench_gpu.sh drives it) ---- */
typedef struct { int done; engine_usage u; double t_done; } bres;
static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}
static void b_done(void *user, finish_reason why, const engine_usage *u, const char *err) {
    bres *r = user;
    (void)why;
    r->done = 1;
    r->u = *u;
    r->t_done = mono();
    if (err) fprintf(stderr, "bench: %s\n", err);
}
static void b_submit(engine *e, const int32_t *ids, int n, int gen, bres *r) {
    memset(r, 0, sizeof *r);
    engine_request q = { .prompt = ids, .n_prompt = n, .max_tokens = gen, .ignore_eos = true, .on_done = b_done, .user = r };
    sample_params_default(&q.sp);
    q.sp.temperature = 0;
    char err[256];
    if (engine_submit(e, &q, err, sizeof err) < 0) { fprintf(stderr, "bench: %s\n", err); exit(1); }
}
static void b_wait(engine *e, bres *r, int n) {
    for (;;) {
        int all = 1;
        for (int i = 0; i < n; i++) all &= r[i].done;
        if (all) return;
        engine_step(e);
    }
}
static int cmp_dbl(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return (x > y) - (x < y); }
static double median3(double *v, int n) { qsort(v, (size_t)n, sizeof *v, cmp_dbl); return v[n / 2]; }

/* bench-engine MODEL [DEVICE] [decode]: JSON with prefill tok/s at 512 and 8192 tokens (cold), decode tok/s
 * at batch 1 (128 tokens) and aggregate over 32 streams (128 + 128 each), and the prompt time of
 * 8000 cached + 192 new tokens. Medians of 3. Random token ids (1000..30000). */
static int cmd_bench_engine(int argc, char **argv) {
    if (argc < 1) { fprintf(stderr, "usage: pcache-tool bench-engine MODEL [cpu|cuda|auto] [decode|prefill]\n"); return 2; }
    engine_opts o = { .model_path = argv[0], .cache_enabled = true, .device = argc > 1 ? argv[1] : "auto",
                      .max_batch_tokens = 2048 };
    engine *e;
    char err[512];
    double t0 = mono();
    if (engine_create(&e, &o, err, sizeof err)) { fprintf(stderr, "%s\n", err); return 1; }
    double load_s = mono() - t0;
    enum { MAXN = 8192 + 256 };
    int32_t *ids = malloc(sizeof(int32_t) * MAXN * 2);
    uint64_t st = 7;
    for (int i = 0; i < MAXN * 2; i++) { st = st * 6364136223846793005ull + 1; ids[i] = 1000 + (int32_t)((st >> 33) % 29000); }
    bres r[32];
    double v[3], pp512 = 0, pp8192 = 0, tg1, tg32, cached_ms = 0;
    const int L = engine_n_ctx(e) > 8193 ? 8192 : engine_n_ctx(e) - 2, C = L - 192;   /* long prompt, cached part */
    const bool decode_only = argc > 2 && !strcmp(argv[2], "decode");                     /* quick A/B runs */
    if (argc > 2 && !strcmp(argv[2], "prefill")) {   /* one cold long prompt, then 192 new after it cached (profiles) */
        b_submit(e, ids + 5000, 64, 4, r); b_wait(e, r, 1);
        b_submit(e, ids, L, 1, r); b_wait(e, r, 1);
        const double cold = r[0].u.prefill_s;
        int32_t *q = malloc(sizeof(int32_t) * L);
        memcpy(q, ids, sizeof(int32_t) * C);
        for (int i = C; i < L; i++) q[i] = 1000 + i % 29000;
        b_submit(e, q, L, 1, r); b_wait(e, r, 1);
        printf("{\"cold_ms\": %.2f, \"cached_new192_ms\": %.2f, \"cached\": %d}\n", cold * 1000, r[0].u.ttft_s * 1000, r[0].u.cached_tokens);
        free(q); free(ids); engine_free(e);
        return 0;
    }
    b_submit(e, ids + 5000, 64, 4, r); b_wait(e, r, 1);                     /* warm-up */
    for (int k = 0; k < 3 && !decode_only; k++) { b_submit(e, ids + 100 * k + 1, 512, 1, r); b_wait(e, r, 1); v[k] = 512 / r[0].u.prefill_s; }
    if (!decode_only) pp512 = median3(v, 3);
    for (int k = 0; k < 3 && !decode_only; k++) { b_submit(e, ids + 7 * k + MAXN, L, 1, r); b_wait(e, r, 1); v[k] = L / r[0].u.prefill_s; }
    if (!decode_only) pp8192 = median3(v, 3);
    for (int k = 0; k < 3; k++) {
        b_submit(e, ids + 900 + 31 * k, 16, 129, r); b_wait(e, r, 1);
        v[k] = 128 / r[0].u.decode_s;
    }
    tg1 = median3(v, 3);
    for (int k = 0; k < 3; k++) {
        for (int i = 0; i < 32; i++) b_submit(e, ids + 2000 + 50 * i + 3 * k, 128, 128, &r[i]);
        b_wait(e, r, 32);
        /* every token after each stream's first, over the time from the first first-token to the last end */
        double start = 1e300, end = 0, toks = 0;
        for (int i = 0; i < 32; i++) {
            double first = r[i].t_done - r[i].u.decode_s;
            if (first < start) start = first;
            if (r[i].t_done > end) end = r[i].t_done;
            toks += r[i].u.completion_tokens - 1;
        }
        v[k] = toks / (end - start);
    }
    tg32 = median3(v, 3);
    for (int k = 0; k < 3 && !decode_only; k++) {
        int32_t *p = ids + 11 * k;
        b_submit(e, p, L, 1, r); b_wait(e, r, 1);                          /* cold: caches it */
        int32_t *q = malloc(sizeof(int32_t) * L);
        memcpy(q, p, sizeof(int32_t) * C);
        for (int i = C; i < L; i++) q[i] = 1000 + (i * 7 + k) % 29000;
        b_submit(e, q, L, 1, r); b_wait(e, r, 1);
        if (r[0].u.cached_tokens != C) fprintf(stderr, "bench: cached %d, expected %d\n", r[0].u.cached_tokens, C);
        v[k] = r[0].u.ttft_s * 1000;
        free(q);
    }
    if (!decode_only) cached_ms = median3(v, 3);
    printf("{\"model\": \"%s\", \"device\": \"%s\", \"load_s\": %.2f, \"pp512\": %.1f, \"pp8192\": %.1f, \"tg1\": %.1f, "
           "\"tg32_aggregate\": %.1f, \"cached_new192_ms\": %.2f, \"long\": %d}\n",
           argv[0], engine_device(e, NULL), load_s, pp512, pp8192, tg1, tg32, cached_ms, L);
    free(ids);
    engine_free(e);
    return 0;
}

static int cmd_logits(int argc, char **argv) {
    if (argc < 1) { fprintf(stderr, "usage: pcache-tool logits MODEL [--all] < ids.json\n"); return 2; }
    bool all = argc > 1 && !strcmp(argv[1], "--all");
    int32_t *ids;
    int n = read_ids(&ids);
    if (n <= 0) return 1;
    solo s;
    if (solo_open(&s, argv[0], n + 1, 2)) { free(ids); return 1; }
    int nv = s.m->c.n_vocab;
    float *logits = malloc((size_t)(all ? n : 1) * nv * sizeof(float));
    int rc = solo_eval(&s, ids, n, all, logits);
    if (rc == 0) fwrite(logits, sizeof(float), (size_t)(all ? n : 1) * nv, stdout);
    free(logits);
    free(ids);
    solo_close(&s);
    return rc ? 1 : 0;
}

static int cmd_generate(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: pcache-tool generate MODEL N < ids.json\n"); return 2; }
    int n_gen = atoi(argv[1]);
    int32_t *ids;
    int n = read_ids(&ids);
    if (n <= 0) return 1;
    solo s;
    if (solo_open(&s, argv[0], n + n_gen + 1, 2)) { free(ids); return 1; }
    char err[512];
    tokenizer *tok = NULL;
    if (tokenizer_load(&tok, s.m->f, err, sizeof err)) { fprintf(stderr, "%s\n", err); free(ids); solo_close(&s); return 1; }
    int nv = s.m->c.n_vocab;
    float *logits = malloc((size_t)nv * sizeof(float));
    int rc = solo_eval(&s, ids, n, false, logits);
    printf("[");
    for (int i = 0; rc == 0 && i < n_gen; i++) {
        int32_t best = 0;
        for (int k = 1; k < nv; k++) if (logits[k] > logits[best]) best = k;
        printf(i ? ", %d" : "%d", best);
        if (tokenizer_is_eog(tok, best)) break;
        rc = solo_eval(&s, &best, 1, false, logits);
    }
    printf("]\n");
    free(logits);
    free(ids);
    tokenizer_free(tok);
    solo_close(&s);
    return rc ? 1 : 0;
}

/* ---- tokenizer subcommands (owned by the tokenizer module) ---- */

/* Opens MODEL's GGUF and its tokenizer. */
static int tok_open(const char *path, gguf_file **f, tokenizer **t) {
    char err[512];
    if (gguf_open(f, path, err, sizeof err)) { fprintf(stderr, "%s\n", err); return -1; }
    if (tokenizer_load(t, *f, err, sizeof err)) { fprintf(stderr, "%s\n", err); gguf_close(*f); return -1; }
    return 0;
}

static int cmd_tokenize(int argc, char **argv) {
    if (argc < 1) { fprintf(stderr, "usage: pcache-tool tokenize MODEL [--no-special] [--bos] < text\n"); return 2; }
    bool special = true, bos = false, batch = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--no-special")) special = false;
        else if (!strcmp(argv[i], "--bos")) bos = true;
        else if (!strcmp(argv[i], "--batch")) batch = true;
        else { fprintf(stderr, "tokenize: unknown option %s\n", argv[i]); return 2; }
    }
    gguf_file *f;
    tokenizer *t;
    if (tok_open(argv[0], &f, &t)) return 1;
    size_t len;
    char *text = read_stream(stdin, &len);
    char err[512];
    int32_t *ids = NULL;
    if (batch) { /* stdin: JSON array of strings; stdout: one JSON array of ids per line */
        cJSON *j = text ? cJSON_ParseWithLength(text, len) : NULL;
        int rc = cJSON_IsArray(j) ? 0 : 1;
        if (rc) fprintf(stderr, "tokenize --batch: expected a JSON array of strings\n");
        cJSON *it;
        cJSON_ArrayForEach(it, j) {
            const char *s = cJSON_IsString(it) ? it->valuestring : "";
            int k = tokenizer_encode(t, s, strlen(s), bos, special, &ids, err, sizeof err);
            if (k < 0) { fprintf(stderr, "tokenize: %s\n", err); rc = 1; break; }
            fputc('[', stdout);
            for (int i = 0; i < k; i++) printf(i ? ", %d" : "%d", ids[i]);
            fputs("]\n", stdout);
            free(ids);
            ids = NULL;
        }
        cJSON_Delete(j);
        free(text);
        tokenizer_free(t);
        gguf_close(f);
        return rc;
    }
    int n = text ? tokenizer_encode(t, text, len, bos, special, &ids, err, sizeof err) : -1;
    if (n < 0) fprintf(stderr, "tokenize: %s\n", text ? err : "cannot read stdin");
    else {
        fputc('[', stdout);
        for (int i = 0; i < n; i++) printf(i ? ", %d" : "%d", ids[i]);
        fputs("]\n", stdout);
    }
    free(ids);
    free(text);
    tokenizer_free(t);
    gguf_close(f);
    return n < 0;
}

/* Ids on stdin -> text through the streaming detokenizer (--special renders control tokens). */
static int cmd_detokenize(int argc, char **argv) {
    if (argc < 1) { fprintf(stderr, "usage: pcache-tool detokenize MODEL [--special] < ids.json\n"); return 2; }
    bool special = argc > 1 && !strcmp(argv[1], "--special");
    gguf_file *f;
    tokenizer *t;
    if (tok_open(argv[0], &f, &t)) return 1;
    int32_t *ids;
    int n = read_ids(&ids);
    if (n < 0) { tokenizer_free(t); gguf_close(f); return 1; }
    detok_state st = { 0 };
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= tokenizer_n_vocab(t)) { fprintf(stderr, "detokenize: bad id %d\n", ids[i]); continue; }
        if (special) {
            size_t pl;
            const char *p = tokenizer_piece(t, ids[i], false, &pl);
            if (pl == 0) { /* control token: print as-is, after what is pending */
                char tail[32];
                size_t k = detok_flush(&st, tail, sizeof tail);
                fwrite(tail, 1, k, stdout);
                p = tokenizer_piece(t, ids[i], true, &pl);
                fwrite(p, 1, pl, stdout);
                continue;
            }
        }
        size_t pl;
        tokenizer_piece(t, ids[i], true, &pl);
        size_t cap = 3 * (pl + 8) + 1;
        char *buf = malloc(cap);
        if (!buf) break;
        fwrite(buf, 1, detok_feed(t, &st, ids[i], buf, cap), stdout);
        free(buf);
    }
    char tail[32];
    size_t k = detok_flush(&st, tail, sizeof tail);
    fwrite(tail, 1, k, stdout);
    free(ids);
    tokenizer_free(t);
    gguf_close(f);
    return 0;
}

/* JSON messages [{"role":..,"content":..}] on stdin -> rendered prompt (with generation prompt
 * unless --no-gen). */
static int cmd_chat(int argc, char **argv) {
    if (argc < 1) { fprintf(stderr, "usage: pcache-tool chat MODEL [--no-gen] < messages.json\n"); return 2; }
    bool gen = !(argc > 1 && !strcmp(argv[1], "--no-gen"));
    gguf_file *f;
    tokenizer *t;
    if (tok_open(argv[0], &f, &t)) return 1;
    size_t len;
    char *text = read_stream(stdin, &len);
    cJSON *j = text ? cJSON_ParseWithLength(text, len) : NULL;
    free(text);
    int rc = 1;
    if (!cJSON_IsArray(j)) fprintf(stderr, "chat: expected a JSON array of messages on stdin\n");
    else {
        int n = cJSON_GetArraySize(j), k = 0;
        chat_msg *msgs = calloc((size_t)n + 1, sizeof *msgs);
        cJSON *it;
        cJSON_ArrayForEach(it, j) {
            cJSON *role = cJSON_GetObjectItemCaseSensitive(it, "role");
            cJSON *content = cJSON_GetObjectItemCaseSensitive(it, "content");
            if (cJSON_IsString(role) && cJSON_IsString(content))
                msgs[k++] = (chat_msg){ .role = role->valuestring, .content = content->valuestring };
        }
        char *out = chat_apply(chat_template_detect(f, t), f, msgs, k, gen);
        if (out) { fputs(out, stdout); rc = 0; }
        free(out);
        free(msgs);
    }
    cJSON_Delete(j);
    tokenizer_free(t);
    gguf_close(f);
    return rc;
}

/* An API request body on stdin (OpenAI chat, or Anthropic messages with --anthropic) -> the
 * prompt the server renders for it with the model's template (tools and tool turns included). */
typedef struct { gguf_file *f; chat_tmpl tmpl; chat_think think; bool no_thinking; } render_ctx;
static char *render_fn(void *ctx, const chat_msg *msgs, int n, const char *const *tools, int n_tools, bool gen) {
    render_ctx *rc = ctx;
    return chat_render(rc->tmpl, rc->f, &rc->think, msgs, n, tools, n_tools, gen, rc->no_thinking);
}

static int cmd_render(int argc, char **argv) {
    if (argc < 1) { fprintf(stderr, "usage: pcache-tool render MODEL [--anthropic] < request.json\n"); return 2; }
    bool anth = argc > 1 && !strcmp(argv[1], "--anthropic");
    gguf_file *f;
    tokenizer *t;
    if (tok_open(argv[0], &f, &t)) return 1;
    size_t len;
    char *body = read_stream(stdin, &len);
    api_request r;
    api_error e;
    int rc = 1;
    if (body && api_parse(anth ? API_ANTHROPIC_MESSAGES : API_OPENAI_CHAT, body, len, &r, &e) == 0) {
        render_ctx ctx = { f, chat_template_detect(f, t), chat_think_detect(f, t), r.no_thinking };
        char *prompt = NULL;
        size_t plen;
        api_bp bps[ENGINE_MAX_BREAKPOINTS];
        int nb;
        if (api_render(&r, render_fn, &ctx, &prompt, &plen, bps, &nb, &e) == 0) { fwrite(prompt, 1, plen, stdout); rc = 0; }
        else fprintf(stderr, "render: %s\n", e.message);
        free(prompt);
        api_request_free(&r);
    } else if (body) fprintf(stderr, "render: %d %s\n", e.status, e.message);
    free(body);
    tokenizer_free(t);
    gguf_close(f);
    return rc;
}

/* An API request body on stdin -> its prompt's token count and the chain hashes of its full
 * blocks (kvevent.h) in the namespace a replica uses (the --key credential's, split by the
 * body's cache_salt): what `pcache route` computes, for tests that publish KV events. */
static int cmd_request_chains(int argc, char **argv) {
    static const char *const kinds[] = { "chat", "completions", "responses", "messages" };
    static const api_kind kv[] = { API_OPENAI_CHAT, API_OPENAI_COMPLETION, API_OPENAI_RESPONSES, API_ANTHROPIC_MESSAGES };
    if (argc < 2) { fprintf(stderr, "usage: pcache-tool request-chains MODEL chat|completions|responses|messages [--key KEY] < request.json\n"); return 2; }
    int k = -1;
    for (int i = 0; i < 4; i++) if (!strcmp(argv[1], kinds[i])) k = i;
    if (k < 0) { fprintf(stderr, "request-chains: unknown kind %s\n", argv[1]); return 2; }
    char key_ns[18] = "";
    if (argc > 3 && !strcmp(argv[2], "--key")) server_key_namespace(argv[3], key_ns);
    gguf_file *f;
    tokenizer *t;
    if (tok_open(argv[0], &f, &t)) return 1;
    char err[512] = "";
    model_config mc;
    uint64_t fp;
    if (model_config_read(f, &mc, err, sizeof err) || fingerprint_file(argv[0], NULL, &fp, NULL, err, sizeof err)) {
        fprintf(stderr, "request-chains: %s\n", err);
        tokenizer_free(t);
        gguf_close(f);
        return 1;
    }
    size_t len;
    char *body = read_stream(stdin, &len);
    api_request r;
    api_error e;
    rendered_prompt pr;
    int rc = 1;
    prompt_model pm = prompt_model_of(t, f);
    if (body && prompt_parse(kv[k], body, len, &r, &e) == 0) {
        if (prompt_tokens(&pm, &r, NULL, &pr, &e) == 0) {
            char ns[18];
            prompt_namespace(key_ns, r.cache_salt, ns);
            int nb = pr.n / KV_BLOCK;
            uint64_t *ch = malloc(((size_t)nb + 1) * sizeof *ch);
            nb = ch ? kvevent_prompt_chains(fp, (uint32_t)mc.n_layer, (uint32_t)(mc.n_head_kv * mc.head_dim), ns, pr.tokens, pr.n, ch, nb) : 0;
            char h[17];
            kvevent_hex64(fp, h);
            printf("{\"tokens\":%d,\"ns\":\"%s\",\"fp\":\"%s\",\"layout\":\"%dx%d\",\"chains\":[", pr.n, ns, h, mc.n_layer,
                   mc.n_head_kv * mc.head_dim);
            for (int i = 0; i < nb; i++) {
                kvevent_hex64(ch[i], h);
                printf("%s\"%s\"", i ? "," : "", h);
            }
            printf("]}\n");
            free(ch);
            prompt_free(&pr);
            rc = 0;
        } else fprintf(stderr, "request-chains: %d %s\n", e.status, e.message);
        api_request_free(&r);
    } else if (body) fprintf(stderr, "request-chains: %d %s\n", e.status, e.message);
    free(body);
    tokenizer_free(t);
    gguf_close(f);
    return rc;
}

/* ---- quant subcommands (owned by the quant module) ---- */

/* Raw blocks of TYPE on stdin -> N float32 (little-endian) on stdout, via the scalar reference
 * dequantizer. */
static int cmd_dequant(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: pcache-tool dequant TYPE N < raw_bytes > float32\n"); return 2; }
    ggml_type t = ggml_type_from_name(argv[0]);
    long long n = atoll(argv[1]);
    size_t rs = t == GGML_TYPE_COUNT ? 0 : ggml_row_size(t, n);
    if (rs == 0 || n <= 0) { fprintf(stderr, "dequant: bad type %s or N %s\n", argv[0], argv[1]); return 2; }
    const ggml_type_info *ti = ggml_type_get(t);
    if (!ti->supported && t != GGML_TYPE_Q8_1 && t != GGML_TYPE_Q8_K) { fprintf(stderr, "dequant: %s not supported\n", ti->name); return 1; }
    uint8_t *src = malloc(rs);
    float *dst = malloc((size_t)n * sizeof(float));
    int rc = 1;
    if (!src || !dst) fprintf(stderr, "dequant: out of memory\n");
    else if (fread(src, 1, rs, stdin) != rs) fprintf(stderr, "dequant: need %zu bytes on stdin\n", rs);
    else {
        dequantize_row(t, src, dst, n);
        rc = fwrite(dst, sizeof(float), (size_t)n, stdout) == (size_t)n ? 0 : 1;
    }
    free(src);
    free(dst);
    return rc;
}

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* ns per dot of TYPE rows of N elements against their activation format: vec_dot on one
 * (cache-hot) row, vec_dot_n over ROWS rows (default 1536, like a real matmul), vec_dot_ref. */
static int cmd_bench_dot(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: pcache-tool bench-dot TYPE N ITERS [ROWS]\n"); return 2; }
    ggml_type t = ggml_type_from_name(argv[0]);
    long long n = atoll(argv[1]), iters = atoll(argv[2]);
    int rows = argc > 3 ? atoi(argv[3]) : 1536;
    const ggml_type_info *ti = ggml_type_get(t);
    ggml_type vdt = ti ? quant_vec_dot_type(t) : GGML_TYPE_COUNT;
    size_t rs = ti ? ggml_row_size(t, n) : 0, as = ggml_row_size(vdt, n);
    if (!ti || !ti->supported || rs == 0 || as == 0 || iters <= 0 || rows <= 0) {
        fprintf(stderr, "bench-dot: bad type %s, N %s, ITERS %s or ROWS\n", argv[0], argv[1], argv[2]);
        return 2;
    }
    uint8_t *w = malloc(rs * (size_t)rows), *a = malloc(as);
    float *x = malloc((size_t)n * sizeof(float)), *out = malloc((size_t)rows * sizeof(float));
    if (!w || !a || !x || !out) { fprintf(stderr, "bench-dot: out of memory\n"); return 1; }
    for (int r = 0; r < rows; r++) quant_fill_random(t, w + (size_t)r * rs, n, (uint64_t)r + 1);
    quant_fill_random(GGML_TYPE_F32, x, n, 12345);
    quantize_row_act(vdt, x, a, n);
    volatile float sink = 0;
    double t0 = now_ns();
    for (long long i = 0; i < iters; i++) sink += vec_dot(t, w, a, n);
    double t1 = now_ns();
    long long mat_iters = iters / rows > 0 ? iters / rows : 1;
    for (long long i = 0; i < mat_iters; i++) { vec_dot_n(t, w, rs, rows, a, out, n); sink += out[0]; }
    double t2 = now_ns();
    double tx = 0;
    if (quant_x4_supported(t) && rows % 4 == 0) {
        uint8_t *wx = malloc(rs * (size_t)rows);
        if (wx && quant_repack_x4(t, w, wx, rows, n) == 0) {
            double x0 = now_ns();
            for (long long i = 0; i < mat_iters; i++) { vec_dot_tile_x4(t, wx, 0, rows, a, as, 1, out, (size_t)rows, n); sink += out[0]; }
            tx = now_ns() - x0;
        }
        free(wx);
    }
    double t2r = now_ns();
    long long ref_iters = iters / 8 > 0 ? iters / 8 : 1;
    for (long long i = 0; i < ref_iters; i++) sink += vec_dot_ref(t, w, a, n);
    double t3 = now_ns();
    double q0 = now_ns();
    for (long long i = 0; i < ref_iters; i++) { quantize_row_act(vdt, x, a, n); sink += (float)((uint8_t *)a)[0]; }
    double q1 = now_ns();
    printf("%s x %s n=%lld simd=%s\n", ti->name, ggml_type_get(vdt)->name, n, quant_simd_name());
    printf("vec_dot (hot row):     %8.1f ns/dot\n", (t1 - t0) / (double)iters);
    printf("vec_dot_n (%d rows): %8.1f ns/dot  (%.2f GB/s of weights)\n", rows,
           (t2 - t1) / ((double)mat_iters * rows), (double)rs * rows * mat_iters / (t2 - t1));
    if (tx > 0)
        printf("vec_dot_tile_x4 (%d):%8.1f ns/dot  (%.2f GB/s of weights)\n", rows, tx / ((double)mat_iters * rows),
               (double)rs * rows * mat_iters / tx);
    printf("vec_dot_ref:           %8.1f ns/dot\n", (t3 - t2r) / (double)ref_iters);
    printf("quantize_row_act:      %8.1f ns/row\n", (q1 - q0) / (double)ref_iters);
    (void)sink;
    free(w); free(a); free(x); free(out);
    return 0;
}

/* Read bandwidth of this machine: T threads (the engine's pool) each sum their half of an
 * MB-megabyte buffer, REPS times; the decode roofline in the README comes from this. */
typedef struct { const uint64_t *buf; size_t n; uint64_t sum[64]; } bw_job;

static void bw_worker(void *p, int ith, int nth) {
    bw_job *j = p;
    size_t lo = j->n * (size_t)ith / (size_t)nth, hi = j->n * (size_t)(ith + 1) / (size_t)nth;
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (size_t i = lo; i + 4 <= hi; i += 4) { a += j->buf[i]; b += j->buf[i + 1]; c += j->buf[i + 2]; d += j->buf[i + 3]; }
    j->sum[ith % 64] = a + b + c + d;
}

static int cmd_bench_bw(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: pcache-tool bench-bw MB THREADS [REPS]\n"); return 2; }
    long mb = atol(argv[0]), reps = argc > 2 ? atol(argv[2]) : 10;
    int threads = atoi(argv[1]);
    if (mb <= 0 || mb > 65536 || threads < 1 || threads > 64 || reps <= 0) {
        fprintf(stderr, "bench-bw: bad MB %s, THREADS %s or REPS\n", argv[0], argv[1]);
        return 2;
    }
    bw_job j = { .n = (size_t)mb << 17 }; /* 8-byte words */
    uint64_t *buf = malloc(j.n * sizeof *buf);
    threadpool *tp = tp_create(threads);
    if (!buf || !tp) { fprintf(stderr, "bench-bw: out of memory\n"); free(buf); tp_free(tp); return 1; }
    for (size_t i = 0; i < j.n; i++) buf[i] = i;
    j.buf = buf;
    tp_run(tp, bw_worker, &j); /* warm-up */
    double t0 = now_ns();
    for (long r = 0; r < reps; r++) tp_run(tp, bw_worker, &j);
    double t1 = now_ns();
    /* the sums land in j, which tp_run's workers share: the reads cannot be optimized away */
    printf("read %ld MB x %ld with %d threads: %.2f GB/s\n", mb, reps, threads,
           (double)j.n * 8 * (double)reps / (t1 - t0));
    tp_free(tp);
    free(buf);
    return 0;
}


/* ---- structured outputs (grammar.h, jsonschema.h) ---- */

/* The grammar of a schema file ("-": any JSON object, response_format json_object). */
static grammar *schema_file_grammar(const char *path) {
    char err[512];
    if (!strcmp(path, "-")) return jsonschema_any_object(err, sizeof err);
    size_t len;
    char *text = read_file(path, &len);
    cJSON *j = text ? cJSON_ParseWithLength(text, len) : NULL;
    free(text);
    if (!j) { fprintf(stderr, "%s: not a JSON file\n", path); return NULL; }
    grammar *g = jsonschema_compile(j, err, sizeof err);
    cJSON_Delete(j);
    if (!g) fprintf(stderr, "schema refused: %s\n", err);
    return g;
}

static const char *tool_piece(void *user, int32_t id, size_t *len) { return tokenizer_piece((const tokenizer *)user, id, false, len); }

/* grammar-check SCHEMA|- < text: whether the bytes on stdin are a complete sentence of the
 * schema's grammar ("complete"), a viable prefix ("prefix") or neither ("rejected").
 * grammar-check --batch: JSON lines {"schema": S (null: any object), "text": T} on stdin, one
 * verdict per line out ("error: ..." for a refused schema). */
static const char *verdict(grammar *g, const char *text, size_t len) {
    const int st = grammar_advance(g, grammar_start(g), text, len);
    return st < 0 ? "limit" : st == GRAMMAR_DEAD ? "rejected" : grammar_accepting(g, st) ? "complete" : "prefix";
}
static int cmd_grammar_check(int argc, char **argv) {
    if (argc < 1) { fprintf(stderr, "usage: pcache-tool grammar-check SCHEMA|-|--batch < text\n"); return 2; }
    size_t len;
    char *text = read_stream(stdin, &len);
    if (!text) return 1;
    if (strcmp(argv[0], "--batch")) {
        grammar *g = schema_file_grammar(argv[0]);
        if (g) printf("%s\n", verdict(g, text, len));
        grammar_unref(g);
        free(text);
        return g ? 0 : 1;
    }
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        cJSON *j = cJSON_Parse(line);
        const cJSON *sc = cJSON_GetObjectItemCaseSensitive(j, "schema"), *tx = cJSON_GetObjectItemCaseSensitive(j, "text");
        char err[512] = "bad line";
        grammar *g = !cJSON_IsString(tx) ? NULL : cJSON_IsNull(sc) ? jsonschema_any_object(err, sizeof err) : sc ? jsonschema_compile(sc, err, sizeof err) : NULL;
        if (g) printf("%s\n", verdict(g, tx->valuestring, strlen(tx->valuestring)));
        else printf("error: %s\n", err);
        grammar_unref(g);
        cJSON_Delete(j);
    }
    free(text);
    return 0;
}

/* One random token walk through g over the vocabulary (uniform among allowed tokens, the end
 * with probability 1/2 where the grammar may end), as a JSON line. Returns 0, or -1 when the
 * grammar failed (a limit, or no token allowed in a live state: a bug). */
static int grammar_walk(grammar *g, const vocab_trie *tr, const tokenizer *t, uint64_t *rng, int index, char *out, size_t cap) {
    const int nv = tokenizer_n_vocab(t);
    int st = grammar_start(g), steps = 0, rc = 0;
    size_t ol = 0;
    bool complete = false;
    for (; steps < 4000 && st > 0; steps++) {
        *rng ^= *rng << 13, *rng ^= *rng >> 7, *rng ^= *rng << 17;
        const bool can_end = grammar_accepting(g, st), more = grammar_can_continue(g, st);
        if (can_end && (!more || (*rng >> 11) % 2 == 0)) { complete = true; break; }
        const uint64_t *m = grammar_mask(g, tr, st);
        if (!m) { fprintf(stderr, "grammar limit\n"); rc = -1; break; }
        int cnt = 0;
        for (int w = 0; w < (nv + 63) / 64; w++) cnt += __builtin_popcountll(m[w]);
        if (!cnt) { fprintf(stderr, "no token allowed in a live state\n"); rc = -1; break; }
        *rng ^= *rng << 13, *rng ^= *rng >> 7, *rng ^= *rng << 17;
        int pick = (int)((*rng >> 11) % (uint64_t)cnt), id = -1;
        for (int i = 0; i < nv; i++)
            if (m[i >> 6] >> (i & 63) & 1 && pick-- == 0) { id = i; break; }
        size_t pl;
        const char *p = tokenizer_piece(t, id, false, &pl);
        if (ol + pl >= cap) break;
        memcpy(out + ol, p, pl);
        ol += pl;
        if ((st = grammar_advance(g, st, p, pl)) <= 0) { fprintf(stderr, "a masked-in token killed the state\n"); rc = -1; }
    }
    cJSON *line = cJSON_CreateObject();
    char *txt = malloc(ol + 1);
    if (txt) { memcpy(txt, out, ol); txt[ol] = 0; }
    cJSON_AddNumberToObject(line, "i", index);
    cJSON_AddStringToObject(line, "text", txt ? txt : "");
    cJSON_AddBoolToObject(line, "complete", complete);
    cJSON_AddNumberToObject(line, "steps", steps);
    char *js = cJSON_PrintUnformatted(line);
    if (js) printf("%s\n", js);
    free(js);
    free(txt);
    cJSON_Delete(line);
    return rc;
}

/* grammar-sample MODEL SCHEMA|-|--batch SEED N: N random token walks through the schema's
 * grammar over MODEL's vocabulary (no model), one JSON line each (i, text, complete, steps):
 * exactly the masks the engine applies, exercised fast. --batch: a schema per line on stdin
 * (null: any JSON object), N walks each, i the line's index; a schema refused is a line with
 * "error". */
static int cmd_grammar_sample(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: pcache-tool grammar-sample MODEL SCHEMA|-|--batch SEED N\n"); return 2; }
    gguf_file *f;
    tokenizer *t;
    if (tok_open(argv[0], &f, &t)) return 1;
    vocab_trie *tr = vocab_trie_build(tokenizer_n_vocab(t), tool_piece, t);
    uint64_t rng = strtoull(argv[2], NULL, 10) * 0x9e3779b97f4a7c15ull + 1;
    const int n = atoi(argv[3]);
    const size_t cap = 1 << 20;
    char *out = malloc(cap);
    int rc = tr && out ? 0 : 1;
    if (!rc && strcmp(argv[1], "--batch")) {
        grammar *g = schema_file_grammar(argv[1]);
        rc = g ? 0 : 1;
        for (int k = 0; k < n && !rc; k++) rc = grammar_walk(g, tr, t, &rng, 0, out, cap) ? 1 : 0;
        grammar_unref(g);
    } else if (!rc) {
        size_t len;
        char *text = read_stream(stdin, &len);
        char *save = NULL;
        int idx = 0;
        for (char *line = text ? strtok_r(text, "\n", &save) : NULL; line && !rc; line = strtok_r(NULL, "\n", &save), idx++) {
            char err[512];
            cJSON *j = cJSON_Parse(line);
            grammar *g = !j ? NULL : cJSON_IsNull(j) ? jsonschema_any_object(err, sizeof err) : jsonschema_compile(j, err, sizeof err);
            if (!j) snprintf(err, sizeof err, "not JSON");
            cJSON_Delete(j);
            if (!g) {
                cJSON *e = cJSON_CreateObject();
                cJSON_AddNumberToObject(e, "i", idx);
                cJSON_AddStringToObject(e, "error", err);
                char *js = cJSON_PrintUnformatted(e);
                if (js) printf("%s\n", js);
                free(js);
                cJSON_Delete(e);
                continue;
            }
            for (int k = 0; k < n && !rc; k++) rc = grammar_walk(g, tr, t, &rng, idx, out, cap) ? 1 : 0;
            grammar_unref(g);
        }
        free(text);
    }
    free(out);
    vocab_trie_free(tr);
    tokenizer_free(t);
    gguf_close(f);
    return rc;
}

/* bench-grammar MODEL SCHEMA [PROMPT]: decode speed with the schema's grammar and without (the
 * same number of tokens, greedy), in one process, as JSON: 5 rounds of a run without then one
 * with (masks cached); slowdown = 1 - the median of the rounds' ratios; and the first run with
 * the grammar (its masks computed) on its own. PCACHE_BENCH_VERBOSE=1 prints every run. */
static int cmd_bench_grammar(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: pcache-tool bench-grammar MODEL SCHEMA|- [PROMPT]\n"); return 2; }
    engine_opts o = { .model_path = argv[0], .cache_enabled = false, .device = "cpu" };
    engine *e;
    char err[512];
    if (engine_create(&e, &o, err, sizeof err)) { fprintf(stderr, "%s\n", err); return 1; }
    grammar *g = schema_file_grammar(argv[1]);
    if (!g) { engine_free(e); return 1; }
    const char *text = argc > 2 ? argv[2] : "List the planets of the solar system with their order from the sun, as JSON.";
    chat_msg msg = { .role = "user", .content = text };
    char *prompt = chat_apply(chat_template_detect(engine_gguf(e), engine_tok(e)), engine_gguf(e), &msg, 1, true);
    int32_t *ids = NULL;
    const int n = prompt ? tokenizer_encode(engine_tok(e), prompt, strlen(prompt), false, true, &ids, err, sizeof err) : -1;
    free(prompt);
    if (n <= 0) { fprintf(stderr, "bench: cannot tokenize\n"); grammar_unref(g); engine_free(e); return 1; }
    /* the first run with the grammar computes its masks (cold); then rounds alternate a run
     * without the grammar (as many tokens, greedy) and one with it (masks cached): medians */
    {   /* warm-up without the grammar: the weights paged in, the threads started */
        bres r;
        memset(&r, 0, sizeof r);
        engine_request q = { .prompt = ids, .n_prompt = n, .max_tokens = 16, .ignore_eos = true, .on_done = b_done, .user = &r };
        sample_params_default(&q.sp);
        if (engine_submit(e, &q, err, sizeof err) == 0) b_wait(e, &r, 1);
    }
    enum { ROUNDS = 5 };
    double cold = 0, none[ROUNDS], warm[ROUNDS];
    int gen = 0;
    for (int k = 0; k < 1 + 2 * ROUNDS; k++) {
        const bool with = k == 0 || k % 2 == 0;
        bres r;
        memset(&r, 0, sizeof r);
        engine_request q = { .prompt = ids, .n_prompt = n, .max_tokens = k == 0 ? 512 : gen, .ignore_eos = !with,
                             .grammar = with ? g : NULL, .on_done = b_done, .user = &r };
        sample_params_default(&q.sp);
        q.sp.temperature = 0;
        if (engine_submit(e, &q, err, sizeof err) < 0) { fprintf(stderr, "bench: %s\n", err); break; }
        b_wait(e, &r, 1);
        if (k == 0) gen = r.u.completion_tokens;
        const double tps = r.u.completion_tokens > 1 ? (r.u.completion_tokens - 1) / r.u.decode_s : 0;
        if (getenv("PCACHE_BENCH_VERBOSE")) fprintf(stderr, "run %d (%s): %d tokens, %.1f tok/s, ttft %.3f s\n", k, with ? "grammar" : "none", r.u.completion_tokens, tps, r.u.ttft_s);
        if (k == 0) cold = tps;
        else if (with) warm[(k - 1) / 2] = tps;
        else none[(k - 1) / 2] = tps;
    }
    double ratio[ROUNDS];   /* per round: with / without, adjacent runs (slow drifts of a shared machine cancel) */
    for (int k = 0; k < ROUNDS; k++) ratio[k] = none[k] > 0 ? warm[k] / none[k] : 0;
    qsort(ratio, ROUNDS, sizeof *ratio, cmp_dbl);
    qsort(none, ROUNDS, sizeof *none, cmp_dbl);
    qsort(warm, ROUNDS, sizeof *warm, cmp_dbl);
    const double tn = none[ROUNDS / 2], tw = warm[ROUNDS / 2], rm = ratio[ROUNDS / 2];
    grammar_stats gs;
    grammar_get_stats(g, &gs);
    printf("{\"tokens\": %d, \"tps_none\": %.1f, \"tps_grammar\": %.1f, \"tps_grammar_first\": %.1f, \"slowdown\": %.4f, "
           "\"slowdown_first\": %.4f, \"states\": %d, \"masks\": %d}\n",
           gen, tn, tw, cold, 1 - rm, tn > 0 ? 1 - cold / tn : 0, gs.states, gs.masks);
    free(ids);
    grammar_unref(g);
    engine_free(e);
    return 0;
}

/* The cluster's block names (kvevent.h) of a prompt's full blocks: what a replica announces and
 * a router looks up. */
static int cmd_kv_chains(int argc, char **argv) {
    uint64_t fp;
    unsigned n_layer, kv_dim;
    char tail;
    if (argc < 2 || kvevent_parse_hex64(argv[0], &fp) || sscanf(argv[1], "%ux%u%c", &n_layer, &kv_dim, &tail) != 2) {
        fprintf(stderr, "usage: pcache-tool kv-chains FP LAYERSxKVDIM [NAMESPACE] < ids.json\n");
        return 2;
    }
    int32_t *ids;
    int n = read_ids(&ids);
    if (n < 0) return 1;
    int cap = n / KV_BLOCK + 1;
    uint64_t *ch = malloc((size_t)cap * sizeof *ch);
    int m = kvevent_prompt_chains(fp, n_layer, kv_dim, argc > 2 ? argv[2] : NULL, ids, n, ch, cap);
    fputc('[', stdout);
    for (int i = 0; i < m; i++) {
        char hex[17];
        kvevent_hex64(ch[i], hex);
        printf(i ? ", \"%s\"" : "\"%s\"", hex);
    }
    fputs("]\n", stdout);
    free(ch);
    free(ids);
    return 0;
}

typedef struct { const char *name; int (*fn)(int argc, char **argv); const char *help; } subcommand;

static const subcommand commands[] = {
    { "gpu-matmul", cmd_gpu_matmul, "TYPE ROWS COLS N WFILE : the CUDA matmul against a double reference (JSON)" },
    { "gpu-argmax", cmd_gpu_argmax, "ROWS COLS < float32 : the CUDA backend's argmax of each row (JSON)" },
    { "gpu-bench-matmul", cmd_gpu_bench_matmul, "M K N... : the CUDA matmul's ms and TFLOP/s (JSON lines)" },
    { "bench-engine", cmd_bench_engine, "MODEL [cpu|cuda|auto] [decode|prefill] : prefill, decode (1 and 32 streams), cached-prefix TTFT (JSON); decode: only those; prefill: one cold long prompt and one cached" },
    { "logits", cmd_logits, "MODEL [--all] < ids.json : raw float32 logits of the last (or every) position" },
    { "generate", cmd_generate, "MODEL N < ids.json : greedy continuation ids as JSON" },
    { "tokenize", cmd_tokenize, "MODEL [--no-special] [--bos] [--batch] < text : token ids as JSON (--batch: JSON array of strings in, one id array per line out)" },
    { "detokenize", cmd_detokenize, "MODEL [--special] < ids.json : text (streaming detokenizer)" },
    { "render", cmd_render, "MODEL [--anthropic] < request.json : the prompt the server renders for an API request" },
    { "request-chains", cmd_request_chains, "MODEL chat|completions|responses|messages [--key KEY] < request.json : the prompt's KV block chain hashes, as the router computes them (JSON)" },
    { "chat", cmd_chat, "MODEL [--no-gen] < messages.json : prompt rendered by the chat template" },
    { "dequant", cmd_dequant, "TYPE N < raw_bytes : N float32 from the scalar reference dequantizer" },
    { "bench-bw", cmd_bench_bw, "MB THREADS [REPS] : read bandwidth over an MB-megabyte buffer" },
    { "grammar-check", cmd_grammar_check, "SCHEMA|-|--batch < text : complete, prefix or rejected under the schema's grammar" },
    { "grammar-sample", cmd_grammar_sample, "MODEL SCHEMA|-|--batch SEED N : random token walks through the schema's grammar (JSON lines)" },
    { "bench-grammar", cmd_bench_grammar, "MODEL SCHEMA|- [PROMPT] : decode tok/s with and without the grammar (JSON)" },
    { "kv-chains", cmd_kv_chains, "FP LAYERSxKVDIM [NAMESPACE] < ids.json : the chain hashes (hex) of the prompt's full KV blocks (kvevent.h)" },
    { "bench-dot", cmd_bench_dot, "TYPE N ITERS [ROWS] : ns per vec_dot / vec_dot_n / vec_dot_ref" },
};

int main(int argc, char **argv) {
    int n = (int)(sizeof commands / sizeof commands[0]);
    if (argc >= 2)
        for (int i = 0; i < n; i++)
            if (!strcmp(argv[1], commands[i].name)) return commands[i].fn(argc - 2, argv + 2);
    fprintf(stderr, "usage: pcache-tool <command> ...\n");
    for (int i = 0; i < n; i++) fprintf(stderr, "  %s %s\n", commands[i].name, commands[i].help);
    return 2;
}
