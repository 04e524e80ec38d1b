/* model: the llama-family transformer (llama, qwen2, qwen3) over the paged KV pool.
 *
 * Reads top to bottom like llama2.c's run.c: model_load maps the GGUF weights (no copies),
 * model_forward runs one batch of tokens from any number of sequences through the layers:
 *   embed -> [RMSNorm -> Q,K,V (+bias) (-> q/k RMSNorm) -> RoPE -> write K,V to the pool ->
 *   causal GQA attention over the sequence's block table -> output proj -> residual ->
 *   RMSNorm -> SwiGLU FFN -> residual] x n_layer -> final RMSNorm -> logits.
 * Every per-token result depends only on that token's inputs and its sequence's KV, never on
 * what else is in the batch or on the thread count, so prefill in any chunking, decode, and a
 * prefix taken from the cache all give bit-identical K/V and logits.
 */
#ifndef PCACHE_MODEL_H
#define PCACHE_MODEL_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "gguf.h"
#include "kv.h"
#include "threadpool.h"

typedef enum { ARCH_LLAMA, ARCH_QWEN2, ARCH_QWEN3 } model_arch;

typedef struct {
    model_arch arch;
    int n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab, n_ctx_train, rope_dim;
    float rope_base, rms_eps;
    bool rope_neox;   /* rotate (x[i], x[i+d/2]) instead of (x[2i], x[2i+1]) */
} model_config;

/* A weight matrix [rows][cols]. x4: data is in quant's x4 layout (rows interleaved by four,
 * repacked at load time), else one row after another as in the file. */
typedef struct { ggml_type type; int64_t cols, rows; const void *data; size_t row_bytes; bool x4; } mat;

typedef struct {
    const float *attn_norm, *ffn_norm;
    mat wq, wk, wv, wo, w_gate, w_up, w_down;
    const float *bq, *bk, *bv;          /* qwen2; else NULL */
    const float *q_norm, *k_norm;       /* qwen3; else NULL */
} model_layer;

typedef struct model {
    model_config c;
    gguf_file *f;        /* owned */
    mat tok_embd, output;
    const float *output_norm;
    model_layer *layers;
    void *x4_buf;        /* owned: the repacked matrices, NULL if none */
    char name[128];
} model;

int model_load(model **out, const char *path, char *err, size_t errlen);
/* Only the shape, from the metadata (the router needs n_layer and the KV width, not weights). */
int model_config_read(const gguf_file *f, model_config *c, char *err, size_t errlen);
/* repack = false keeps every matrix in the file's row layout (a GPU backend reads them so). */
int model_load_ex(model **out, const char *path, bool repack, char *err, size_t errlen);
void model_free(model *m);

/* Scratch memory for batches of up to max_tokens tokens; one per engine. */
typedef struct model_ctx model_ctx;
model_ctx *model_ctx_create(const model *m, int max_tokens, int max_ctx, int n_threads);
void model_ctx_free(model_ctx *ctx);

/* One batch: token i of sequence seqs[i] at position pos[i]. The caller has made positions
 * writable (kv_seq_prepare) and all earlier positions of each sequence valid. logits_out gets
 * n_vocab floats for each token with want_logits[i] set, in batch order. */
typedef struct {
    int n;
    const int32_t *tokens;
    const int32_t *pos;
    kv_seq *const *seqs;
    const bool *want_logits;
    /* optional: rows (with want_logits) whose logits are wanted for their argmax alone; a
     * backend that finds it where the logits are need not hand over the rest (gpu_forward's
     * argmax_out); model_forward computes them as any other */
    const bool *argmax_only;
} model_batch;

int model_forward(const model *m, model_ctx *ctx, threadpool *tp, kv_pool *kv,
                  const model_batch *b, float *logits_out, char *err, size_t errlen);
#endif
