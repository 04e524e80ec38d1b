/* engine: see engine.h. One step of the scheduler:
 *   1. expire cache entries past their TTL; drop cancelled requests;
 *   2. admit queued requests first come, first served, while there is room: look up the
 *      longest cached prefix of the prompt (at most n_prompt-1 tokens, so the last prompt
 *      token is always computed and yields the first logits), take references to its blocks
 *      and reserve the blocks the rest of the prompt needs (evicting cache entries, never
 *      another sequence's blocks); a request that does not fit waits, and so does everyone
 *      behind it;
 *   3. build one batch: a decode token for every generating sequence first, then prefill
 *      chunks from prompts still being read, up to max_batch_tokens;
 *   4. make the KV positions writable (copy on write of a shared partial block); a decoding
 *      sequence that needs a block when none can be freed preempts the youngest running
 *      sequence (its KV goes into the prefix cache, its blocks back to the pool, and it is
 *      requeued with everything it generated: resuming prefills prompt + output, mostly from
 *      the cache, and continues exactly where it stopped); run the model, and for each sequence that finished its prompt, insert the prompt into the
 *      prefix cache (explicit breakpoints with their TTL, then the whole prompt automatically)
 *      and sample its first token; generating sequences sample their next token;
 *   5. finish sequences on EOS / stop string / max tokens, insert prompt+output into the cache
 *      so multi-turn chats find their history, and release their blocks.
 *
 * Cache tiers below the pool (cache_dir, cache_host_bytes; kvtier.h): whatever the prefix
 * index newly caches is also queued, block by block, for the I/O thread to write into host RAM
 * and disk (write-through; a full queue drops, never waits). Admission continues a pool match
 * into those tiers block by block (by chain hash: model fingerprint, layout, namespace and every
 * token so far); when they hold more, the sequence reserves its blocks as usual and waits in
 * the LOADING phase, which no batch includes, while the I/O thread reads and verifies the
 * blocks into the pool. At the step after the load it resumes from what loaded (the rest is
 * computed; a bad block stops the chain there), and the loaded prefix goes into the prefix
 * index with its records' kind and remaining lifetime (promotion). Other sequences run
 * meanwhile; when one of them cached more of the prompt than the admission matched and the
 * load brought, the sequence takes that longer pool match instead (rematch). A prefix cached
 * again (a hit) refreshes the tiers' records too (kvtier_touch).
 *
 * The cluster (redis_url; kvredis.h): the same write-through of full blocks to Redis (its own
 * thread and queue), and after the pool and the local tiers an admission continues the lookup
 * in Redis, when fetching pays (kvredis_fetch_pays: the measured transfer against the measured
 * prefill rate): the sequence waits in LOADING while the Redis thread loads and verifies what
 * Redis holds of the remaining full blocks (after a local load, when that loaded everything it
 * asked for). The replica also announces the blocks it holds (KV events; "the cluster (Redis)"
 * below).
 */
#include "engine.h"
#include "fingerprint.h"
#include "gpu.h"
#include "grammar.h"
#include "kv.h"
#include "kvevent.h"
#include "kvtier.h"
#include "model.h"
#include "prefix.h"
#include "threadpool.h"
#include "util.h"
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* SEQ_LOADING: admitted, its blocks reserved, waiting for the I/O thread to load a cached
 * prefix from a lower tier into them; no batch includes it and it cannot be cancelled or
 * preempted until the load is reported (the I/O thread writes into its blocks). */
typedef enum { SEQ_QUEUED, SEQ_LOADING, SEQ_PREFILL, SEQ_DECODE, SEQ_DONE } seq_phase;

typedef struct seq {
    int id;
    engine_request r;        /* copy; pointers below are owned */
    char *ns;
    char **stop;
    int32_t *tokens;         /* prompt then generated */
    int n_tokens, cap_tokens;
    int n_prompt;
    int n_fill;              /* prefill up to here, then sample: n_prompt, or n_tokens on resume */
    bool prompt_cached;      /* the prompt went into the prefix cache (cache_prompt ran) */
    bool admitted;           /* admitted once: usage.cached_tokens is final */
    uint64_t tried_epoch;    /* release epoch of the last failed admission (see admit) */
    engine_logit_bias *bias;
    int n_bias;
    int gstate;              /* with r.grammar: the grammar's state after the output so far */
    kv_seq kv;               /* positions [0, kv.n_tokens) are computed */
    int32_t spare;           /* LOADING a partial last block: the block reserved for its copy on
                                write once the loaded prefix is shared with the index; -1: none */
    kvtier_item *remote;     /* LOADING: full blocks to ask Redis for after the local tiers' load */
    int n_remote, cap_remote;
    int remote_at;           /* the position the first of them starts at */
    bool from_redis;         /* LOADING: the load in flight is a Redis read */
    seq_phase phase;
    bool cancelled;
    sample_rng rng;
    detok_state detok;
    char *pending;           /* decoded text not yet emitted (may start a stop string) */
    size_t n_pending, cap_pending;
    engine_usage u;
    double t_submit, t_first;
    int n_gen;
    finish_reason finish;
} seq;

struct engine {
    engine_opts o;
    model *m;
    tokenizer *tok;
    kv_pool kv;
    prefix_index *px;
    threadpool *tp;
    model_ctx *mctx;         /* CPU backend */
    gpu_backend *gpu;        /* CUDA backend, or NULL */
    long prof_steps;         /* steps that ran a batch, and their time (PCACHE_PROFILE prints it) */
    double prof_step_s, prof_fwd_s;
    int n_ctx;
    seq **seqs;              /* queued and active, in submission order */
    int n_seqs, cap_seqs;
    int next_id;
    /* per-step scratch */
    int32_t *b_tok, *b_pos;
    kv_seq **b_seq;
    bool *b_logits;
    bool *b_argmax;          /* the token's logits are wanted for their argmax alone (greedy_only) */
    seq **b_owner;
    float *logits;
    int32_t *argmax;         /* the GPU's argmax of each output row (gpu_forward), or NULL: the host finds it */
    sample_cand *cand;
    engine_stats st;
    double last_expire;
    uint64_t release_epoch;  /* bumped whenever a sequence gives blocks back */
    int32_t *lp_id;          /* logprobs scratch */
    float *lp_val;
    vocab_trie *trie;        /* the vocabulary's byte strings, built for the first grammar */
    int32_t eog[8];          /* end-of-generation tokens (grammar_apply) */
    float eog_logit[8];
    int n_eog;
    /* cache tiers below the pool (NULL: none) */
    kvtier *tier;
    uint64_t model_fp;
    double unix0, clock0;    /* wall clock and engine clock at creation: Unix time = unix0 + (now - clock0) */
    uint64_t tier_hits[KVTIER_N], tier_loads;
    kvtier_item *items;      /* admission scratch: the blocks a lookup found below the pool */
    int cap_items;
    uint64_t *touch;         /* write-through scratch: chains of blocks the tiers already hold */
    int cap_touch;
    /* the cluster (NULL: none): see "the cluster (Redis)" below */
    kvredis *rd;
    chainset announced;      /* full blocks announced as held (store events not yet undone) */
    uint64_t *ev_store, *ev_touch;   /* write-through scratch: chains to announce, to touch in Redis */
    int cap_ev;
    uint64_t rd_gen;         /* kvredis_generation whose hello was followed by our state */
    uint64_t rd_mark;        /* evictions (index and tiers) at the last reconciliation */
    double rd_last;          /* when the last reconciliation ran */
    bool rd_dirty;           /* reconcile at the next tick regardless of the marks */
    uint64_t rd_fetches, rd_computes, rd_hits, rd_tokens;
    double prefill_tok_s;    /* measured prefill seconds per token (moving average) */
};

static double mono_now(void *ctx) {
    (void)ctx;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double now_s(const engine *e) { return e->o.clock(e->o.clock_ctx); }
/* Unix seconds for the tiers' records, following the engine clock (so tests drive it too). */
static double unix_s(const engine *e, double now) { return e->unix0 + (now - e->clock0); }

/* Creates dir (and its parents) if needed and checks that it is a writable directory. */
static int cache_dir_ok(const char *dir, char *err, size_t errlen) {
    char p[4096];
    if (!*dir || strlen(dir) >= sizeof p - 64) return errf(err, errlen, "--cache-dir: bad path '%s'", dir);
    snprintf(p, sizeof p, "%s", dir);
    for (char *s = p + 1; *s; s++)
        if (*s == '/') {
            *s = 0;
            mkdir(p, 0755);
            *s = '/';
        }
    if (mkdir(p, 0755) && errno != EEXIST) {
        int er = errno;
        return errf(err, errlen, "--cache-dir %s: cannot create it: %s", dir, strerror(er));
    }
    struct stat sb;
    if (stat(p, &sb)) { int er = errno; return errf(err, errlen, "--cache-dir %s: %s", dir, strerror(er)); }
    if (!S_ISDIR(sb.st_mode)) return errf(err, errlen, "--cache-dir %s: not a directory", dir);
    if (access(p, W_OK | X_OK)) { int er = errno; return errf(err, errlen, "--cache-dir %s: not writable: %s", dir, strerror(er)); }
    return 0;
}

/* Sets up the tiers below the pool: the model fingerprint (cached in the directory's
 * sidecar), the host-RAM store and the disk store, and the I/O thread; and the cluster's Redis
 * client. */
static int tiers_create(engine *e, char *err, size_t errlen) {
    const engine_opts *o = &e->o;
    bool local = o->cache_dir || o->cache_host_bytes;
    if (!local && !o->redis_url) return 0;
    if (o->cache_dir && cache_dir_ok(o->cache_dir, err, errlen)) return -1;
    if (fingerprint_file(o->model_path, o->cache_dir, &e->model_fp, NULL, err, errlen)) return -1;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    e->unix0 = (double)ts.tv_sec + ts.tv_nsec * 1e-9;
    e->clock0 = now_s(e);
    if (e->gpu) {
        e->kv.read_block = gpu_read_block;
        e->kv.write_block = gpu_write_block;
        e->kv.io_ctx = e->gpu;
    }
    kvtier_opts to = { .pool = &e->kv, .model_fp = e->model_fp, .dir = o->cache_dir,
                       .disk_bytes = o->cache_disk_bytes ? o->cache_disk_bytes : (uint64_t)10 << 30,
                       .host_bytes = o->cache_host_bytes, .host_pinned = e->gpu != NULL,
                       .queue_blocks = o->cache_write_queue, .now = e->unix0 };
    /* Default bound: 256 blocks, or half the pool when that is more, so the blocks of one long
     * prompt of a big model (an 8B model's 8000 tokens: 500 blocks of 2 MiB) are queued whole
     * rather than dropped; queued blocks are ones the index holds anyway. The same for Redis. */
    if (!to.queue_blocks) to.queue_blocks = e->kv.n_blocks / 2 > 256 ? e->kv.n_blocks / 2 : 256;
    if (local && kvtier_create(&e->tier, &to, err, errlen)) return -1;
    if (!o->redis_url) return 0;
    kvredis_opts ro = { .pool = &e->kv, .model_fp = e->model_fp, .instance = o->instance, .timeout_s = o->redis_timeout_s,
                        .write_queue = to.queue_blocks };
    if (redis_url_parse(o->redis_url, o->redis_password, &ro.url, err, errlen)) return -1;
    if (!ro.instance && getrandom(&ro.instance, sizeof ro.instance, 0) != sizeof ro.instance)
        ro.instance = (uint64_t)time(NULL) * 0x9E3779B97F4A7C15ull ^ (uint64_t)getpid();
    return kvredis_create(&e->rd, &ro, err, errlen);
}

int engine_create(engine **out, const engine_opts *o, char *err, size_t errlen) {
    *out = NULL;
    engine *e = calloc(1, sizeof *e);
    if (!e) { snprintf(err, errlen, "engine: out of memory"); return -1; }
    e->o = *o;
    const size_t kv_mem_asked = o->kv_mem_bytes;
    if (!e->o.kv_mem_bytes) e->o.kv_mem_bytes = (size_t)512 << 20;
    if (e->o.cache_ttl_s <= 0) e->o.cache_ttl_s = 300;
    if (e->o.n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        e->o.n_threads = n > 0 ? (int)n : 1;
    }
    if (e->o.max_batch_tokens <= 0) e->o.max_batch_tokens = 512;
    if (e->o.max_seqs <= 0) e->o.max_seqs = 64;
    if (!e->o.clock) e->o.clock = mono_now;
    const char *dev = o->device ? o->device : "auto";
    if (strcmp(dev, "cpu") && strcmp(dev, "cuda") && strcmp(dev, "auto")) {
        snprintf(err, errlen, "unknown device '%s' (cpu, cuda or auto)", dev);
        goto fail;
    }
    char why[200] = "";
    bool want_gpu = !strcmp(dev, "cuda") || (!strcmp(dev, "auto") && gpu_available(why, sizeof why));
    if (!strcmp(dev, "cuda") && !gpu_available(why, sizeof why)) {
        snprintf(err, errlen, "--device cuda: %s", why);
        goto fail;
    }
    /* The GPU backend reads the file's row layout; the CPU repacks for its kernels. */
    if (model_load_ex(&e->m, o->model_path, !want_gpu, err, errlen)) goto fail;
    if (tokenizer_load(&e->tok, e->m->f, err, errlen)) goto fail;
    e->n_ctx = e->m->c.n_ctx_train;
    const model_config *c = &e->m->c;
    int max_tokens = e->o.max_batch_tokens + e->o.max_seqs;
    if (want_gpu) {
        int nb = 0;
        if (gpu_create(&e->gpu, e->m, max_tokens, e->n_ctx, kv_mem_asked, &nb, err, errlen)) goto fail;
        if (kv_pool_init_external(&e->kv, c->n_layer, c->n_head_kv * c->head_dim, nb, gpu_copy_block, e->gpu, err, errlen))
            goto fail;
    } else if (kv_pool_init(&e->kv, c->n_layer, c->n_head_kv * c->head_dim, e->o.kv_mem_bytes, err, errlen)) goto fail;
    e->px = prefix_create(&e->kv);
    e->tp = tp_create(want_gpu ? 1 : e->o.n_threads);
    e->mctx = want_gpu ? NULL : model_ctx_create(e->m, max_tokens, e->n_ctx, e->o.n_threads);
    e->b_tok = calloc((size_t)max_tokens, sizeof(int32_t));
    e->b_pos = calloc((size_t)max_tokens, sizeof(int32_t));
    e->b_seq = calloc((size_t)max_tokens, sizeof(kv_seq *));
    e->b_logits = calloc((size_t)max_tokens, sizeof(bool));
    e->b_argmax = calloc((size_t)max_tokens, sizeof(bool));
    e->b_owner = calloc((size_t)max_tokens, sizeof(seq *));
    /* on the GPU, page-locked: the logits come down every step */
    e->logits = e->gpu ? gpu_host_alloc((size_t)e->o.max_seqs * c->n_vocab * sizeof(float))
                       : malloc((size_t)e->o.max_seqs * c->n_vocab * sizeof(float));
    /* greedy rows' argmax found on the GPU, their logits left there (PCACHE_GPU_ARGMAX=0: on the host) */
    const char *gam = getenv("PCACHE_GPU_ARGMAX");
    if (e->gpu && !(gam && !strcmp(gam, "0")) && !(e->argmax = gpu_host_alloc((size_t)e->o.max_seqs * sizeof(int32_t)))) {
        snprintf(err, errlen, "engine: out of memory");
        goto fail;
    }
    e->cand = malloc((size_t)c->n_vocab * sizeof(sample_cand));
    e->lp_id = malloc(ENGINE_MAX_TOP_LOGPROBS * sizeof(int32_t));
    e->lp_val = malloc(ENGINE_MAX_TOP_LOGPROBS * sizeof(float));
    e->release_epoch = 1;
    if (tiers_create(e, err, errlen)) goto fail;
    if (!e->lp_id || !e->lp_val || !e->px || !e->tp || (!e->mctx && !e->gpu) || !e->b_tok || !e->b_pos || !e->b_seq || !e->b_logits || !e->b_owner ||
        !e->b_argmax || !e->logits || !e->cand) {
        snprintf(err, errlen, "engine: out of memory");
        goto fail;
    }
    *out = e;
    return 0;
fail:
    engine_free(e);
    return -1;
}

static void seq_free(engine *e, seq *s) {
    if (s->spare >= 0) kv_block_unref(&e->kv, s->spare);
    free(s->remote);
    kv_seq_release(&e->kv, &s->kv);
    free(s->kv.blocks);
    for (int i = 0; i < s->r.n_stop; i++) free(s->stop[i]);
    free(s->stop);
    free(s->ns);
    free(s->tokens);
    free(s->pending);
    free(s->bias);
    grammar_unref(s->r.grammar);
    free(s);
}

void engine_free(engine *e) {
    if (!e) return;
    kvredis_free(e->rd);    /* first: bye, joins its thread */
    chainset_free(&e->announced);
    free(e->ev_store);
    free(e->ev_touch);
    kvtier_free(e->tier);   /* finishes queued writes, joins the I/O thread */
    free(e->items);
    free(e->touch);
    for (int i = 0; i < e->n_seqs; i++) seq_free(e, e->seqs[i]);
    free(e->seqs);
    vocab_trie_free(e->trie);
    if (e->px) prefix_free(e->px);
    kv_pool_free(&e->kv);
    if (e->tp) tp_free(e->tp);
    model_ctx_free(e->mctx);
    if (e->gpu) gpu_host_free(e->logits);
    else free(e->logits);
    gpu_host_free(e->argmax);
    if (e->prof_steps && getenv("PCACHE_PROFILE"))
        fprintf(stderr, "engine: %ld steps, %.3f ms a step, of which forward %.3f ms, sampling and the rest %.3f ms\n",
                e->prof_steps, 1e3 * e->prof_step_s / e->prof_steps, 1e3 * e->prof_fwd_s / e->prof_steps,
                1e3 * (e->prof_step_s - e->prof_fwd_s) / e->prof_steps);
    gpu_free(e->gpu);
    free(e->b_tok); free(e->b_pos); free(e->b_seq); free(e->b_logits); free(e->b_argmax); free(e->b_owner);
    free(e->cand); free(e->lp_id); free(e->lp_val);
    tokenizer_free(e->tok);
    model_free(e->m);
    free(e);
}

const tokenizer *engine_tok(const engine *e) { return e->tok; }
const gguf_file *engine_gguf(const engine *e) { return e->m->f; }
int engine_n_ctx(const engine *e) { return e->n_ctx; }
const char *engine_model_name(const engine *e) { return e->m->name; }

static int blocks_for(int n_tokens) { return (n_tokens + KV_BLOCK - 1) / KV_BLOCK; }

int engine_submit(engine *e, const engine_request *r, char *err, size_t errlen) {
    if (r->n_prompt <= 0) { snprintf(err, errlen, "empty prompt"); return -1; }
    if (r->n_prompt >= e->n_ctx) {
        snprintf(err, errlen, "prompt is %d tokens, the context holds %d", r->n_prompt, e->n_ctx);
        return -1;
    }
    if (r->max_tokens > 0 && (int64_t)r->n_prompt + r->max_tokens > e->n_ctx) {
        snprintf(err, errlen, "prompt (%d tokens) + max_tokens (%d) exceeds the context of %d tokens",
                 r->n_prompt, r->max_tokens, e->n_ctx);
        return -1;
    }
    /* The KV of the whole sequence must fit the pool when nothing else holds it; without
     * max_tokens the prompt and one generated token must (generation then ends at the pool). */
    int64_t need_tok = (int64_t)r->n_prompt + (r->max_tokens > 0 ? r->max_tokens : 1);
    if (blocks_for((int)need_tok) > e->kv.n_blocks) {
        snprintf(err, errlen, "the request needs KV for %lld tokens (prompt %d%s), the KV pool holds "
                 "%d tokens: raise --kv-mem", (long long)need_tok, r->n_prompt,
                 r->max_tokens > 0 ? " + max_tokens" : " + 1", e->kv.n_blocks * KV_BLOCK);
        return -1;
    }
    if (r->n_logit_bias < 0 || (r->n_logit_bias > 0 && !r->logit_bias)) {
        snprintf(err, errlen, "bad logit_bias");
        return -1;
    }
    for (int i = 0; i < r->n_logit_bias; i++)
        if (r->logit_bias[i].token < 0 || r->logit_bias[i].token >= e->m->c.n_vocab) {
            snprintf(err, errlen, "logit_bias: token id %d out of range (vocabulary of %d)",
                     r->logit_bias[i].token, e->m->c.n_vocab);
            return -1;
        }
    for (int i = 0; i < r->n_prompt; i++)
        if (r->prompt[i] < 0 || r->prompt[i] >= e->m->c.n_vocab) {
            snprintf(err, errlen, "token id %d out of range", r->prompt[i]);
            return -1;
        }
    if (r->n_breakpoints < 0 || r->n_breakpoints > ENGINE_MAX_BREAKPOINTS) {
        snprintf(err, errlen, "at most %d cache breakpoints", ENGINE_MAX_BREAKPOINTS);
        return -1;
    }
    seq *s = calloc(1, sizeof *s);
    if (!s) { snprintf(err, errlen, "out of memory"); return -1; }
    s->r = *r;
    s->spare = -1;
    s->r.grammar = NULL;   /* referenced below, once the sequence is sure to exist */
    s->ns = strdup(r->ns ? r->ns : "");
    s->cap_tokens = r->n_prompt + 64;
    s->tokens = malloc((size_t)s->cap_tokens * sizeof(int32_t));
    s->stop = r->n_stop > 0 ? calloc((size_t)r->n_stop, sizeof(char *)) : NULL;
    if (r->n_logit_bias > 0) {
        s->bias = malloc((size_t)r->n_logit_bias * sizeof *s->bias);
        if (s->bias) memcpy(s->bias, r->logit_bias, (size_t)r->n_logit_bias * sizeof *s->bias);
        s->n_bias = r->n_logit_bias;
    }
    bool ok = s->ns && s->tokens && (r->n_stop <= 0 || s->stop) && (r->n_logit_bias <= 0 || s->bias);
    for (int i = 0; ok && i < r->n_stop; i++) ok = (s->stop[i] = strdup(r->stop[i])) != NULL;
    if (!ok || e->n_seqs == e->cap_seqs) {
        int cap = e->cap_seqs ? 2 * e->cap_seqs : 16;
        seq **ns = ok ? realloc(e->seqs, (size_t)cap * sizeof *ns) : NULL;
        if (!ns) {
            s->r.n_stop = s->stop ? r->n_stop : 0;
            seq_free(e, s);
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        e->seqs = ns;
        e->cap_seqs = cap;
    }
    if (r->grammar) {
        s->r.grammar = grammar_ref(r->grammar);
        if ((s->gstate = grammar_start(r->grammar)) <= 0) {
            seq_free(e, s);
            snprintf(err, errlen, "the output grammar is too large");
            return -1;
        }
    }
    s->r.ns = s->ns;
    s->r.stop = (const char *const *)s->stop;
    s->r.prompt = NULL;
    s->r.logit_bias = NULL;
    if (s->r.logprobs > ENGINE_MAX_TOP_LOGPROBS) s->r.logprobs = ENGINE_MAX_TOP_LOGPROBS;
    if (s->r.logprobs < 0) s->r.logprobs = 0;
    memcpy(s->tokens, r->prompt, (size_t)r->n_prompt * sizeof(int32_t));
    s->n_tokens = s->n_prompt = s->n_fill = r->n_prompt;
    s->id = e->next_id++;
    s->phase = SEQ_QUEUED;
    s->t_submit = now_s(e);
    s->u.prompt_tokens = r->n_prompt;
    sample_rng_seed(&s->rng, r->sp.seed);
    e->seqs[e->n_seqs++] = s;
    e->st.requests++;
    e->st.prompt_tokens += (uint64_t)r->n_prompt;
    return s->id;
}

void engine_cancel(engine *e, int id) {
    for (int i = 0; i < e->n_seqs; i++)
        if (e->seqs[i]->id == id) e->seqs[i]->cancelled = true;
}

static bool running(const seq *s) { return s->phase == SEQ_PREFILL || s->phase == SEQ_DECODE; }

static int n_active(const engine *e) {
    int n = 0;
    for (int i = 0; i < e->n_seqs; i++) n += running(e->seqs[i]);
    return n;
}

/* ---- output text: UTF-8 safe, stop strings held back until they can no longer match ---- */

static bool pending_append(seq *s, const char *t, size_t n) {
    if (s->n_pending + n + 1 > s->cap_pending) {
        size_t cap = (s->n_pending + n + 1) * 2;
        char *p = realloc(s->pending, cap);
        if (!p) return false;
        s->pending = p;
        s->cap_pending = cap;
    }
    memcpy(s->pending + s->n_pending, t, n);
    s->n_pending += n;
    return true;
}

static void emit(seq *s, size_t n) {
    if (n == 0) return;
    if (s->r.on_text) s->r.on_text(s->r.user, s->pending, n);
    memmove(s->pending, s->pending + n, s->n_pending - n);
    s->n_pending -= n;
}

/* Emits what can no longer be part of a stop string. Returns true if a stop string matched
 * (the text before it is emitted, the rest dropped). */
static bool flush_text(seq *s, bool final) {
    size_t cut = s->n_pending;
    bool stopped = false;
    for (int i = 0; i < s->r.n_stop; i++) {
        size_t L = strlen(s->stop[i]);
        if (L == 0 || L > s->n_pending) continue;
        for (size_t j = 0; j + L <= s->n_pending; j++)
            if (memcmp(s->pending + j, s->stop[i], L) == 0) {
                if (j < cut) { cut = j; s->u.stop_matched = i + 1; }
                stopped = true;
                break;
            }
    }
    if (stopped) {
        emit(s, cut);
        s->n_pending = 0;
        return true;
    }
    size_t hold = 0;
    if (!final)
        for (int i = 0; i < s->r.n_stop; i++) {
            size_t L = strlen(s->stop[i]);
            for (size_t k = L > 1 ? L - 1 : 0; k > hold; k--)
                if (k <= s->n_pending && memcmp(s->pending + s->n_pending - k, s->stop[i], k) == 0) { hold = k; break; }
        }
    emit(s, s->n_pending - hold);
    return false;
}

/* The prefix index just cached [0, n) of s (kind, ttl), of which [n - added, n) is new: queues
 * the blocks covering the new positions for the lower tiers, each keyed by the chain hash of
 * its own valid tokens (a partial last block by its n % KV_BLOCK tokens). The blocks before
 * were cached already (a hit refreshed their entries): the tiers get a use of them (a touch:
 * their expiry extended, on disk too, without a rewrite), or, when a tier lacks one or holds
 * it with a shorter lifetime than this insertion's, the block is written again.
 * With Redis, the same for its full blocks: new ones are written through and announced (a
 * store event for those not announced yet), the others touched (their records live at least
 * ttl more). */
static void write_through(engine *e, const seq *s, int n, int added, int kind, double ttl, double now) {
    if ((!e->tier && !e->rd) || added < 0 || n <= 0 || strlen(s->ns) > KVFILE_NS_MAX) return;
    double un = unix_s(e, now);
    kvfile_meta m;
    memset(&m, 0, sizeof m);
    m.model_fp = e->model_fp;
    m.n_layer = (uint32_t)e->kv.n_layer;
    m.kv_dim = (uint32_t)e->kv.kv_dim;
    m.kind = kind;
    m.ttl = ttl;
    m.expiry = un + ttl;
    snprintf(m.ns, sizeof m.ns, "%s", s->ns);
    int nb = blocks_for(n);
    if (e->cap_touch < nb) {
        uint64_t *p = realloc(e->touch, (size_t)nb * sizeof *p);
        if (p) { e->touch = p; e->cap_touch = nb; }
    }
    if (e->rd && e->cap_ev < nb) {
        uint64_t *p = realloc(e->ev_store, (size_t)nb * sizeof *p), *q = p ? realloc(e->ev_touch, (size_t)nb * sizeof *q) : NULL;
        if (p) e->ev_store = p;
        if (q) { e->ev_touch = q; e->cap_ev = nb; }
    }
    int n_touch = 0, n_store = 0, n_rtouch = 0;
    uint64_t h = kvfile_chain_root(e->model_fp, m.n_layer, m.kv_dim, s->ns);
    for (int j = 0; j * KV_BLOCK < n && j < s->kv.n_blocks; j++) {
        int len = n - j * KV_BLOCK < KV_BLOCK ? n - j * KV_BLOCK : KV_BLOCK;
        uint64_t c = kvfile_chain(h, s->tokens + j * KV_BLOCK, len);
        bool fresh = j * KV_BLOCK + len > n - added;
        m.n_tokens = len;
        m.parent = h;
        m.chain = c;
        memset(m.tokens, 0, sizeof m.tokens);
        memcpy(m.tokens, s->tokens + j * KV_BLOCK, (size_t)len * sizeof(int32_t));
        if (e->tier) {
            if (!fresh && n_touch < e->cap_touch && kvtier_covers(e->tier, c, kind, ttl, un)) e->touch[n_touch++] = c;
            else kvtier_write(e->tier, &m, s->kv.blocks[j], un);
        }
        if (e->rd && len == KV_BLOCK && j < e->cap_ev) {
            if (fresh) kvredis_write(e->rd, &m, s->kv.blocks[j], un);
            else e->ev_touch[n_rtouch++] = c;
            if (chainset_add(&e->announced, c) == 1) e->ev_store[n_store++] = c;
        }
        h = c;
    }
    if (n_touch) kvtier_touch(e->tier, e->touch, n_touch, un);
    if (n_store) kvredis_publish(e->rd, KVEV_STORE, e->ev_store, n_store);
    if (n_rtouch) kvredis_touch(e->rd, e->ev_touch, n_rtouch, ttl);
}

static void finish(engine *e, seq *s, finish_reason why, const char *errmsg) {
    if (why != FINISH_ABORT && why != FINISH_ERROR) {
        char buf[16];
        size_t n = detok_flush(&s->detok, buf, sizeof buf);
        pending_append(s, buf, n);
        if (flush_text(s, true)) why = FINISH_STOP;
    }
    double now = now_s(e);
    s->u.completion_tokens = s->n_gen;
    if (s->t_first > 0) s->u.decode_s = now - s->t_first;
    /* Keep prompt + output for the next turn of a conversation (automatic TTL). */
    if (!s->r.no_cache && e->o.cache_enabled && s->kv.n_tokens > s->n_prompt && why != FINISH_ERROR) {
        int added = prefix_insert(e->px, s->ns, s->tokens, s->kv.n_tokens, &s->kv, PREFIX_AUTO, e->o.cache_ttl_s, now);
        write_through(e, s, s->kv.n_tokens, added, PREFIX_AUTO, e->o.cache_ttl_s, now);
    }
    kv_seq_release(&e->kv, &s->kv);
    e->release_epoch++;
    s->phase = SEQ_DONE;
    s->finish = why;
    e->st.completion_tokens += (uint64_t)s->n_gen;
    if (s->r.on_tokens) s->r.on_tokens(s->r.user, s->tokens + s->n_prompt, s->n_tokens - s->n_prompt);
    if (s->r.on_done) s->r.on_done(s->r.user, why, &s->u, errmsg);
}

static bool push_token(seq *s, int32_t t) {
    if (s->n_tokens == s->cap_tokens) {
        int cap = s->cap_tokens * 2;
        int32_t *p = realloc(s->tokens, (size_t)cap * sizeof(int32_t));
        if (!p) return false;
        s->tokens = p;
        s->cap_tokens = cap;
    }
    s->tokens[s->n_tokens++] = t;
    return true;
}

static const char *trie_piece(void *user, int32_t id, size_t *len) {
    return tokenizer_piece((const tokenizer *)user, id, false, len);
}

/* Constrained decoding: tokens the grammar does not allow get -inf, end-of-generation tokens
 * are allowed only where the grammar's sentence may end. Returns false (and finishes the
 * sequence) when the grammar hit a size limit or allows nothing. */
static bool grammar_apply(engine *e, seq *s, float *logits, int n_vocab) {
    grammar *g = s->r.grammar;
    if (!e->trie) {
        if (!(e->trie = vocab_trie_build(n_vocab, trie_piece, e->tok))) {
            finish(e, s, FINISH_ERROR, "out of memory");
            return false;
        }
        for (int i = 0; i < n_vocab && e->n_eog < 8; i++)
            if (tokenizer_is_eog(e->tok, i)) e->eog[e->n_eog++] = i;
    }
    const bool can_end = grammar_accepting(g, s->gstate);
    for (int i = 0; i < e->n_eog; i++) e->eog_logit[i] = logits[e->eog[i]];
    const uint64_t *m = grammar_can_continue(g, s->gstate) ? grammar_mask(g, e->trie, s->gstate) : NULL;
    if (!m && grammar_can_continue(g, s->gstate)) {
        finish(e, s, FINISH_ERROR, "the output grammar grew past its limits");
        return false;
    }
    /* a word of the mask at a time: all-allowed words (the inside of a free string) cost one
     * test; end-of-generation tokens are never in a mask, and are set apart below */
    bool any = false;
    for (int w = 0; w * 64 < n_vocab; w++) {
        const uint64_t bits = m ? m[w] : 0;
        any |= bits != 0;
        if (bits == ~0ull && (w + 1) * 64 <= n_vocab) continue;
        const int end = (w + 1) * 64 < n_vocab ? (w + 1) * 64 : n_vocab;
        for (int i = w * 64; i < end; i++)
            if (!(bits >> (i & 63) & 1)) logits[i] = -INFINITY;
    }
    for (int i = 0; i < e->n_eog; i++)
        if (can_end) { logits[e->eog[i]] = e->eog_logit[i]; any = true; }
    if (!any) {
        finish(e, s, FINISH_ERROR, "the output grammar allows no token here");
        return false;
    }
    return true;
}

/* Whether a sequence's next token is the argmax of its logits as the model gives them: greedy,
 * with no logit bias, grammar, penalty or log-probabilities (which need the whole row), and (a
 * prompt's last token) no prompt logits asked for. The step then takes the argmax alone
 * (take_token with no logits), and the CUDA backend finds it on the device: the row's logits
 * never come down (model_batch.argmax_only). */
static bool greedy_only(const seq *s) {
    const sample_params *sp = &s->r.sp;
    return sample_is_greedy(sp) && !sample_penalizes(sp) && s->n_bias == 0 && !s->r.grammar && !s->r.on_token &&
           !(s->phase == SEQ_PREFILL && !s->prompt_cached && s->r.prompt_logits);
}

/* Samples from logits (NULL: the token is `given`, the argmax of a greedy_only sequence's
 * logits), appends the token, streams text; finishes the sequence if done. */
static void take_token(engine *e, seq *s, float *logits, int32_t given) {
    int n_vocab = e->m->c.n_vocab;
    if (s->r.grammar && s->r.ignore_eos && !grammar_can_continue(s->r.grammar, s->gstate)) {
        finish(e, s, FINISH_STOP, NULL);   /* the sentence is complete: nothing may follow */
        return;
    }
    engine_token_info ti;
    int32_t t = given;
    if (logits) {
        for (int i = 0; i < s->n_bias; i++) logits[s->bias[i].token] += s->bias[i].bias;
        if (s->r.grammar && !grammar_apply(e, s, logits, n_vocab)) return;
        sample_penalize(logits, n_vocab, &s->r.sp, s->tokens, s->n_tokens);
        if (s->r.on_token) {
            /* before sample_pick: the top-N pass uses e->cand as scratch too */
            ti.n_top = s->r.logprobs;
            ti.logprob = 0;
            sample_logprobs(logits, n_vocab, 0, ti.n_top, e->lp_id, e->lp_val, e->cand);
            for (int i = 0; i < ti.n_top; i++) { ti.top[i].token = e->lp_id[i]; ti.top[i].logprob = e->lp_val[i]; }
        }
        t = sample_pick(logits, n_vocab, &s->r.sp, &s->rng, e->cand);
    }
    if (s->n_gen == 0) {
        s->t_first = now_s(e);
        s->u.ttft_s = s->t_first - s->t_submit;
        if (s->r.on_start) s->r.on_start(s->r.user, &s->u);
    }
    if ((!s->r.ignore_eos || s->r.grammar) && tokenizer_is_eog(e->tok, t)) { finish(e, s, FINISH_STOP, NULL); return; }
    if (!push_token(s, t)) { finish(e, s, FINISH_ERROR, "out of memory"); return; }
    s->n_gen++;
    if (s->r.grammar) {
        size_t plen = 0;
        const char *p = tokenizer_piece(e->tok, t, false, &plen);
        s->gstate = p ? grammar_advance(s->r.grammar, s->gstate, p, plen) : GRAMMAR_DEAD;
        if (s->gstate <= 0) { finish(e, s, FINISH_ERROR, "the output grammar grew past its limits"); return; }
    }
    if (s->r.on_token && logits) {   /* (never without: greedy_only) */
        ti.token = t;
        ti.logprob = sample_logprobs(logits, n_vocab, t, 0, NULL, NULL, e->cand);
        s->r.on_token(s->r.user, &ti);
    }
    char buf[256];
    size_t n = detok_feed(e->tok, &s->detok, t, buf, sizeof buf);
    if (!pending_append(s, buf, n)) { finish(e, s, FINISH_ERROR, "out of memory"); return; }
    if (flush_text(s, false)) { finish(e, s, FINISH_STOP, NULL); return; }
    if (s->r.max_tokens > 0 && s->n_gen >= s->r.max_tokens) { finish(e, s, FINISH_LENGTH, NULL); return; }
    if (s->n_tokens >= e->n_ctx) { finish(e, s, FINISH_LENGTH, NULL); return; }
    s->phase = SEQ_DECODE;
}

/* Blocks a sequence must get before positions [kv.n_tokens, n_total) can be written: new ones
 * and copies of shared ones. */
static int blocks_to_write(const engine *e, const seq *s, int n_total) {
    const kv_seq *q = &s->kv;
    int n = blocks_for(n_total) - q->n_blocks;
    if (n < 0) n = 0;
    for (int i = q->n_tokens / KV_BLOCK; i < q->n_blocks; i++) n += e->kv.refcnt[q->blocks[i]] > 1;
    return n;
}

/* Blocks the pool could hand out now: free ones and those only the prefix cache holds. */
static int blocks_obtainable(const engine *e) {
    prefix_stats ps;
    prefix_get_stats(e->px, &ps);
    return e->kv.n_free + ps.blocks_index_only;
}

/* Tries to start a queued sequence: takes its cached prefix and reserves the blocks for the
 * rest of what it has to prefill (n_fill tokens: the prompt, or prompt + output when it was
 * preempted), keeping `headroom` blocks free for the running sequences' decode steps. On
 * failure nothing is held and false is returned; it is only tried again once some sequence
 * released blocks (release_epoch), so a waiting request costs no lookups while nothing moves. */
/* Continues a pool match of m tokens into the lower tiers: from block m / KV_BLOCK on, a full
 * block while a tier holds its chain, then the longest partial block, never beyond limit tokens.
 * Fills e->items (pool blocks not yet set) and returns the end of what was found (> m), or 0;
 * *tier_out gets the tier of the first block. */
static int tier_lookup(engine *e, const seq *s, int m, int limit, double now, int *n_items, int *tier_out) {
    *n_items = 0;
    if (strlen(s->ns) > KVFILE_NS_MAX) return 0;
    double un = unix_s(e, now);
    int j = m / KV_BLOCK;
    uint64_t h = kvfile_chain_root(e->model_fp, (uint32_t)e->kv.n_layer, (uint32_t)e->kv.kv_dim, s->ns);
    for (int b = 0; b < j; b++) h = kvfile_chain(h, s->tokens + b * KV_BLOCK, KV_BLOCK);
    int end = j * KV_BLOCK;
    for (; end < limit; j++) {
        int avail = limit - end, len = 0, tier = KVTIER_NONE;
        uint64_t c = 0;
        if (avail >= KV_BLOCK) {
            c = kvfile_chain(h, s->tokens + end, KV_BLOCK);
            if ((tier = kvtier_has(e->tier, c, un))) len = KV_BLOCK;
        }
        for (int L = avail < KV_BLOCK ? avail : KV_BLOCK - 1; !len && L > 0; L--) {
            c = kvfile_chain(h, s->tokens + end, L);
            if ((tier = kvtier_has(e->tier, c, un))) len = L;
        }
        if (!len) break;
        if (*n_items == e->cap_items) {
            int cap = e->cap_items ? 2 * e->cap_items : 64;
            kvtier_item *p = realloc(e->items, (size_t)cap * sizeof *p);
            if (!p) break;
            e->items = p;
            e->cap_items = cap;
        }
        kvtier_item *it = &e->items[(*n_items)++];
        it->chain = c;
        it->n_tokens = len;
        it->block = -1;
        memset(it->tokens, 0, sizeof it->tokens);
        memcpy(it->tokens, s->tokens + end, (size_t)len * sizeof(int32_t));
        if (*n_items == 1) *tier_out = tier;
        end += len;
        h = c;
        if (len < KV_BLOCK) break;
    }
    return end > m ? end : 0;
}

/* The cluster's part of a lookup: the full blocks from position `from` (rounded down to a block
 * edge: the block of a partial pool match is asked for whole) up to limit that Redis may hold,
 * when fetching them pays (kvredis_fetch_pays: the measured transfer against the measured prefill rate).
 * Fills s->remote (pool blocks not yet set) and returns how many (0: none, or computing pays);
 * *n_cand gets how many full blocks were considered. */
static int redis_plan(engine *e, seq *s, int from, int limit, int *n_cand) {
    *n_cand = 0;
    s->n_remote = 0;
    if (!e->rd || !kvredis_connected(e->rd) || strlen(s->ns) > KVFILE_NS_MAX) return 0;
    int b0 = from / KV_BLOCK, b1 = limit / KV_BLOCK;
    if (b1 <= b0) return 0;
    *n_cand = b1 - b0;
    kvredis_stats st;
    kvredis_get_stats(e->rd, &st);
    if (!kvredis_fetch_pays(st.rtt_s, st.block_s, b1 - b0, e->prefill_tok_s)) return 0;
    if (s->cap_remote < b1 - b0) {
        kvtier_item *p = realloc(s->remote, (size_t)(b1 - b0) * sizeof *p);
        if (!p) return 0;
        s->remote = p;
        s->cap_remote = b1 - b0;
    }
    uint64_t h = kvfile_chain_root(e->model_fp, (uint32_t)e->kv.n_layer, (uint32_t)e->kv.kv_dim, s->ns);
    for (int b = 0; b < b0; b++) h = kvfile_chain(h, s->tokens + b * KV_BLOCK, KV_BLOCK);
    for (int b = b0; b < b1; b++) {
        kvtier_item *it = &s->remote[b - b0];
        memset(it, 0, sizeof *it);
        it->chain = h = kvfile_chain(h, s->tokens + b * KV_BLOCK, KV_BLOCK);
        it->block = -1;
        it->n_tokens = KV_BLOCK;
        memcpy(it->tokens, s->tokens + b * KV_BLOCK, sizeof it->tokens);
    }
    s->remote_at = b0 * KV_BLOCK;
    return s->n_remote = b1 - b0;
}

/* Queues the Redis read of s->remote into the sequence's blocks from position remote_at (its
 * KV ends in that block: at its start, or inside it after a partial pool match, whose block
 * kv_seq_prepare has copied for this sequence alone, so a loaded block may overwrite it and a
 * missing one leaves it valid). Returns true when queued (the sequence is LOADING). */
static bool start_remote(engine *e, seq *s, double now) {
    int j0 = s->remote_at / KV_BLOCK, n = s->n_remote;
    s->n_remote = 0;
    if (n <= 0 || s->kv.n_tokens < s->remote_at || s->kv.n_tokens >= s->remote_at + KV_BLOCK || j0 + n > s->kv.n_blocks)
        return false;
    for (int i = 0; i < n; i++) {
        s->remote[i].block = s->kv.blocks[j0 + i];
        if (e->kv.refcnt[s->remote[i].block] != 1) return false;   /* shared: never written */
    }
    if (kvredis_read(e->rd, s->id, s->ns, s->remote, n, unix_s(e, now))) return false;
    s->from_redis = true;
    s->phase = SEQ_LOADING;
    return true;
}

static bool admit(engine *e, seq *s, double now, int headroom) {
    if (s->tried_epoch == e->release_epoch && blocks_obtainable(e) < blocks_for(s->n_fill) + headroom)
        return false;
    int m = 0, n_items = 0, tier = KVTIER_NONE, n_cand = 0;
    s->n_remote = 0;
    if (!s->r.no_cache && e->o.cache_enabled) {
        m = prefix_match(e->px, s->ns, s->tokens, s->n_fill - 1, now, &s->kv);
        if (m < 0) m = 0;
        int end = e->tier ? tier_lookup(e, s, m, s->n_fill - 1, now, &n_items, &tier) : 0;
        /* Redis continues what the pool and the local tiers found, from a block edge */
        if (!end || end % KV_BLOCK == 0) redis_plan(e, s, end ? end : m, s->n_fill - 1, &n_cand);
        /* the local tiers load from the block edge; Redis continues a partial pool match in place
         * (start_remote) */
        if (end > 0) kv_seq_truncate(&e->kv, &s->kv, m / KV_BLOCK * KV_BLOCK);
    }
    int need = blocks_to_write(e, s, s->n_fill) + headroom;
    /* A partial last block, once loaded, is shared with the prefix index (load_done), so the
     * sequence's first prefill copies it: one more block, reserved now. When the pool cannot
     * give it, the partial block is not loaded (its few tokens are computed). */
    bool spare = n_items > 0 && e->items[n_items - 1].n_tokens < KV_BLOCK;
    if (spare && e->kv.n_free < need + 1) prefix_evict(e->px, need + 1 - e->kv.n_free, now);
    if (spare && e->kv.n_free < need + 1) {
        n_items--;
        spare = false;
    }
    if (e->kv.n_free < need) prefix_evict(e->px, need - e->kv.n_free, now);
    if (e->kv.n_free < need || kv_seq_prepare(&e->kv, &s->kv, s->n_fill) != 0) {
        kv_seq_release(&e->kv, &s->kv);
        s->tried_epoch = e->release_epoch;
        s->n_remote = 0;
        return false;
    }
    if (n_cand > 0) {
        if (s->n_remote > 0) e->rd_fetches++;
        else e->rd_computes++;
    }
    if (n_items > 0) {
        int j0 = s->kv.n_tokens / KV_BLOCK;
        for (int i = 0; i < n_items; i++) e->items[i].block = s->kv.blocks[j0 + i];
        if (spare) s->spare = kv_block_alloc(&e->kv);
        if (kvtier_read(e->tier, s->id, s->ns, e->items, n_items, unix_s(e, now)) == 0) {
            e->tier_hits[tier]++;
            e->tier_loads++;
            s->from_redis = false;
            s->phase = SEQ_LOADING;
            return true;   /* Redis (s->remote) after, when the whole local load succeeds */
        }
        if (s->spare >= 0) kv_block_unref(&e->kv, s->spare);
        s->spare = -1;
        s->n_remote = 0;
    }
    if (s->n_remote > 0 && start_remote(e, s, now)) return true;
    if (!s->admitted) {
        s->admitted = true;
        s->u.cached_tokens = s->kv.n_tokens;
        e->st.cached_tokens += (uint64_t)s->kv.n_tokens;
    }
    s->phase = SEQ_PREFILL;
    return true;
}

/* Sends a running sequence back to the queue: its computed KV goes into the prefix cache (so
 * resuming is mostly a lookup), its blocks go back to the pool, and it keeps its tokens,
 * sampler state and pending text, so that it continues exactly where it stopped. */
static void preempt(engine *e, seq *s, double now) {
    if (!s->r.no_cache && e->o.cache_enabled && s->kv.n_tokens > 0) {
        int added = prefix_insert(e->px, s->ns, s->tokens, s->kv.n_tokens, &s->kv, PREFIX_AUTO, e->o.cache_ttl_s, now);
        write_through(e, s, s->kv.n_tokens, added, PREFIX_AUTO, e->o.cache_ttl_s, now);
    }
    kv_seq_release(&e->kv, &s->kv);
    e->release_epoch++;
    s->n_fill = s->n_tokens;
    s->phase = SEQ_QUEUED;
    s->tried_epoch = e->release_epoch;   /* not back in the same step it left */
    e->st.preemptions++;
}

/* Makes room for s to write positions up to n_total: prepare evicts cache entries itself;
 * when that is not enough, preempts the youngest running sequence (s itself when it is the
 * youngest). Returns 0 when s can go on, 1 when s was preempted, and 2 when s is alone and
 * the whole pool is not enough (it has to end). */
static int make_room(engine *e, seq *s, int n_total, double now) {
    for (;;) {
        if (kv_seq_prepare(&e->kv, &s->kv, n_total) == 0) return 0;
        seq *victim = NULL;
        for (int i = e->n_seqs - 1; i >= 0 && !victim; i--)
            if (running(e->seqs[i])) victim = e->seqs[i];
        if (victim == s) {
            if (n_active(e) == 1) return 2;
            preempt(e, s, now);
            return 1;
        }
        preempt(e, victim, now);
    }
}

/* The prompt is fully in the KV: cache it (breakpoints first: they are what the caller asked
 * for, with their own TTL; then the automatic entry for the whole prompt). */
static void cache_prompt(engine *e, seq *s, double now) {
    s->prompt_cached = true;
    if (s->r.no_cache || !e->o.cache_enabled) return;
    for (int i = 0; i < s->r.n_breakpoints; i++) {
        int pos = s->r.breakpoints[i].pos;
        if (pos <= 0 || pos > s->n_prompt) continue;
        double ttl = s->r.breakpoints[i].ttl_s > 0 ? s->r.breakpoints[i].ttl_s : 300;
        int added = prefix_insert(e->px, s->ns, s->tokens, pos, &s->kv, PREFIX_EXPLICIT, ttl, now);
        write_through(e, s, pos, added, PREFIX_EXPLICIT, ttl, now);
        if (added > 0) {
            if (ttl > 300) s->u.cache_write_1h += added;
            else s->u.cache_write_5m += added;
        }
    }
    int added = prefix_insert(e->px, s->ns, s->tokens, s->n_prompt, &s->kv, PREFIX_AUTO, e->o.cache_ttl_s, now);
    write_through(e, s, s->n_prompt, added, PREFIX_AUTO, e->o.cache_ttl_s, now);
    if (added > 0) s->u.cache_write_auto += added;
}

/* The cluster: the full blocks of a load (n_tokens over items) are held now: announces those
 * not announced yet. */
static void announce_loaded(engine *e, const kvtier_item *items, int n_tokens) {
    if (!e->rd || n_tokens <= 0) return;
    uint64_t add[64];
    int n = 0;
    for (int i = 0, at = 0; at < n_tokens; at += items[i].n_tokens, i++) {
        if (items[i].n_tokens == KV_BLOCK && chainset_add(&e->announced, items[i].chain) == 1) add[n++] = items[i].chain;
        if (n == 64) { kvredis_publish(e->rd, KVEV_STORE, add, n); n = 0; }
    }
    if (n) kvredis_publish(e->rd, KVEV_STORE, add, n);
}

/* Puts a prefix loaded from the tiers, [start, start + n_tokens) of s over items, into the
 * prefix index (the promotion back into the pool's tier), each run of blocks with the kind and
 * the remaining lifetime of its records: an entry at the end of every run of equal (kind, ttl,
 * expiry), so a 1-hour breakpoint stays explicit with its expiry and the automatic rest keeps
 * its own. */
static void promote(engine *e, seq *s, int start, int n_tokens, const kvtier_item *items, double now) {
    double to_engine = now - unix_s(e, now);   /* Unix seconds -> engine clock */
    int end = start;
    for (int i = 0; end < start + n_tokens; i++) {
        end += items[i].n_tokens;
        const kvtier_item *a = &items[i], *b = &items[i + 1];
        bool last = end >= start + n_tokens;
        if (last || b->kind != a->kind || b->ttl != a->ttl || b->expiry != a->expiry) {
            int kind = a->kind == PREFIX_EXPLICIT ? PREFIX_EXPLICIT : PREFIX_AUTO;
            double ttl = a->ttl > 0 ? a->ttl : e->o.cache_ttl_s;
            prefix_insert_until(e->px, s->ns, s->tokens, end, &s->kv, kind, ttl, a->expiry + to_engine, now);
        }
    }
}

/* A sequence that waited in LOADING took its pool match at admission; meanwhile another
 * sequence may have cached more of its prompt (cold requests under one system prompt: the
 * first computes it while the second, admitted before anything was cached, waits for its own
 * Redis miss). Takes that longer match rather than computing those tokens again: its blocks go
 * back (what it matched or loaded before is in the index, so the new match covers it) and it is
 * prepared again from the new match, which needs no more new blocks than it gave back. Should
 * that prepare fail, the prefill step prepares again. */
static void rematch(engine *e, seq *s, double now) {
    if (s->r.no_cache || !e->o.cache_enabled) return;
    if (prefix_peek(e->px, s->ns, s->tokens, s->n_fill - 1) <= s->kv.n_tokens) return;
    kv_seq_release(&e->kv, &s->kv);
    prefix_match(e->px, s->ns, s->tokens, s->n_fill - 1, now, &s->kv);   /* -1: left empty, all computed */
    kv_seq_prepare(&e->kv, &s->kv, s->n_fill);
}

/* The I/O thread finished loading n_tokens of seq `id` (from position kv.n_tokens on): resume
 * it from there, put the loaded prefix into the prefix index (the tiers below already hold it,
 * so nothing is written back), and copy a loaded partial last block, now shared with the index,
 * into the block reserved for it at admission; or take a longer pool match (rematch). */
static void load_done(void *ctx, int id, int n_tokens, const kvtier_item *items, int n_items) {
    engine *e = ctx;
    (void)n_items;
    seq *s = NULL;
    for (int i = 0; i < e->n_seqs && !s; i++)
        if (e->seqs[i]->id == id && e->seqs[i]->phase == SEQ_LOADING) s = e->seqs[i];
    if (!s) return;
    double now = now_s(e);
    /* a Redis load starts at its block's edge, which a partial pool match may have passed */
    int start = s->from_redis ? s->remote_at : s->kv.n_tokens, before = s->kv.n_tokens;
    if (start + n_tokens > s->kv.n_tokens) s->kv.n_tokens = start + n_tokens;
    if (n_tokens > 0) promote(e, s, start, n_tokens, items, now);
    if (s->from_redis) {
        e->rd_tokens += (uint64_t)(s->kv.n_tokens - before);
        e->rd_hits += s->kv.n_tokens > before;
    }
    announce_loaded(e, items, n_tokens);
    /* the local tiers' load is complete: Redis may continue it */
    if (!s->from_redis && s->n_remote > 0 && start_remote(e, s, now)) return;
    s->n_remote = 0;
    s->from_redis = false;
    if (s->spare >= 0) {
        /* back to the free list, and at once taken again by the copy (the list is a stack and
         * nothing else runs in between) */
        kv_block_unref(&e->kv, s->spare);
        s->spare = -1;
        if (s->kv.n_tokens % KV_BLOCK) kv_seq_prepare(&e->kv, &s->kv, s->kv.n_tokens + 1);
    }
    rematch(e, s, now);
    if (!s->admitted) {
        s->admitted = true;
        s->u.cached_tokens = s->kv.n_tokens;
        e->st.cached_tokens += (uint64_t)s->kv.n_tokens;
    }
    s->phase = SEQ_PREFILL;
}

static int n_loading(const engine *e) {
    int n = 0;
    for (int i = 0; i < e->n_seqs; i++) n += e->seqs[i]->phase == SEQ_LOADING;
    return n;
}

static void compact(engine *e) {
    int j = 0;
    for (int i = 0; i < e->n_seqs; i++) {
        if (e->seqs[i]->phase == SEQ_DONE) seq_free(e, e->seqs[i]);
        else e->seqs[j++] = e->seqs[i];
    }
    e->n_seqs = j;
}

/* ---- the cluster (Redis): what this replica tells the others it holds ----
 * Rule: a full block is held while the prefix index holds it (an entry's path covers it) or a
 * local lower tier (host RAM, disk) does; Redis does not count (it is not local). The engine
 * announces (store) every full block as the index takes it (write-through, and promotions from
 * the tiers or Redis), and keeps the set of announced chains. Evictions are found by
 * reconciliation, at most once a second and only when something was evicted or expired (the
 * index's and the tiers' counters moved): the chains of every index entry are recomputed
 * (O(tokens in entries)), and an announced chain neither there nor in a local tier is evicted.
 * So a router may believe a block held up to a second after it went (it then routes to a
 * replica that recomputes or fetches it from Redis), never the reverse for longer than an event
 * takes to travel. After a reconnect (Redis's hello forgot us) or dropped events, the whole set
 * is announced again. */
typedef struct { engine *e; chainset *held; } held_ctx;
static int held_visit(void *user, const prefix_entry_info *en) {
    held_ctx *c = user;
    engine *e = c->e;
    if (strlen(en->ns) > KVFILE_NS_MAX) return 0;
    uint64_t h = kvfile_chain_root(e->model_fp, (uint32_t)e->kv.n_layer, (uint32_t)e->kv.kv_dim, en->ns);
    for (int b = 0; (b + 1) * KV_BLOCK <= en->n_tokens; b++) {
        h = kvfile_chain(h, en->tokens + b * KV_BLOCK, KV_BLOCK);
        if (chainset_add(c->held, h) < 0) return -1;
    }
    return 0;
}

/* Publishes op for the chains in list (n) in entries of at most KVEVENT_MAX_CHAINS. */
static void publish_list(engine *e, int op, const uint64_t *list, size_t n) {
    for (size_t at = 0; at < n; at += KVEVENT_MAX_CHAINS)
        kvredis_publish(e->rd, op, list + at, (int)(n - at < KVEVENT_MAX_CHAINS ? n - at : KVEVENT_MAX_CHAINS));
}

/* Every announced chain (malloc'ed; *n gets the count), or NULL. */
static uint64_t *announced_list(engine *e, size_t *n) {
    *n = chainset_size(&e->announced);
    uint64_t *all = malloc((*n ? *n : 1) * sizeof *all);
    size_t pos = 0, got = 0;
    if (all) while (got < *n) {
        size_t k = chainset_list(&e->announced, &pos, all + got, *n - got);
        if (!k) break;
        got += k;
    }
    return all;
}

static void reconcile(engine *e, double now) {
    chainset held = {0};
    held_ctx c = { e, &held };
    size_t n = 0;
    uint64_t *all = announced_list(e, &n);
    if (!all || prefix_visit(e->px, held_visit, &c)) {
        free(all);
        chainset_free(&held);
        e->rd_dirty = true;   /* out of memory: try again later */
        return;
    }
    double un = unix_s(e, now);
    size_t n_evict = 0;
    for (size_t i = 0; i < n; i++)
        if (!chainset_has(&held, all[i]) && (!e->tier || !kvtier_has(e->tier, all[i], un))) {
            chainset_del(&e->announced, all[i]);
            all[n_evict++] = all[i];
        }
    publish_list(e, KVEV_EVICT, all, n_evict);
    free(all);
    /* and what the index holds but was not announced (a missed event) */
    size_t pos = 0, k;
    uint64_t buf[KVEVENT_MAX_CHAINS];
    size_t n_store = 0;
    while ((k = chainset_list(&held, &pos, buf + n_store, KVEVENT_MAX_CHAINS - n_store)) > 0) {
        size_t j = n_store;
        for (size_t i = n_store; i < n_store + k; i++)
            if (chainset_add(&e->announced, buf[i]) == 1) buf[j++] = buf[i];
        n_store = j;
        if (n_store == KVEVENT_MAX_CHAINS) { publish_list(e, KVEV_STORE, buf, n_store); n_store = 0; }
    }
    publish_list(e, KVEV_STORE, buf, n_store);
    chainset_free(&held);
}

/* Evictions and expiries so far, in the index and the local tiers. */
static uint64_t evict_mark(engine *e) {
    prefix_stats ps;
    prefix_get_stats(e->px, &ps);
    uint64_t m = ps.evictions;
    if (e->tier) {
        kvtier_stats ts;
        kvtier_get_stats(e->tier, &ts);
        for (int t = KVTIER_HOST; t < KVTIER_N; t++) m += ts.tier[t].expired + ts.tier[t].evicted;
    }
    return m;
}

static void cluster_tick(engine *e, double now) {
    if (!e->rd) return;
    uint64_t gen = kvredis_generation(e->rd);
    bool again = gen != e->rd_gen, hello = kvredis_take_resync(e->rd);
    if (!again && !hello && now - e->rd_last < 1.0 && now >= e->rd_last) return;
    e->rd_last = now;
    uint64_t mark = evict_mark(e);
    if (mark != e->rd_mark || e->rd_dirty) {
        e->rd_mark = mark;
        e->rd_dirty = false;
        reconcile(e, now);
    }
    if ((again || hello) && kvredis_connected(e->rd)) {
        /* Redis heard a hello (ours at connect, or this one after dropped events): say again
         * everything we hold */
        e->rd_gen = gen;
        if (hello) kvredis_publish(e->rd, KVEV_HELLO, NULL, 0);
        size_t n = 0;
        uint64_t *all = announced_list(e, &n);
        if (all) publish_list(e, KVEV_STORE, all, n);
        else e->rd_gen = 0;
        free(all);
    }
}

int engine_cache_clear(engine *e) {
    double now = now_s(e);
    int freed = prefix_evict(e->px, e->kv.n_blocks + 1, now);
    if (e->rd) {
        size_t n = 0;
        uint64_t *all = announced_list(e, &n);
        chainset_clear(&e->announced);
        kvredis_publish(e->rd, KVEV_CLEAR, NULL, 0);
        if (all) {
            double un = unix_s(e, now);
            size_t k = 0;
            for (size_t i = 0; i < n; i++)
                if (e->tier && kvtier_has(e->tier, all[i], un)) {
                    chainset_add(&e->announced, all[i]);
                    all[k++] = all[i];
                }
            publish_list(e, KVEV_STORE, all, k);
        }
        free(all);
        e->rd_mark = evict_mark(e);
    }
    return freed;
}

int engine_step(engine *e) {
    double now = now_s(e), t_step = now;
    if (now - e->last_expire > 1.0) {
        prefix_expire(e->px, now);
        e->last_expire = now;
    }
    kvtier_poll(e->tier, load_done, e);
    kvredis_poll(e->rd, load_done, e);
    cluster_tick(e, now);
    for (int i = 0; i < e->n_seqs; i++) {
        seq *s = e->seqs[i];
        if (s->cancelled && s->phase != SEQ_DONE && s->phase != SEQ_LOADING) finish(e, s, FINISH_ABORT, NULL);
    }
    compact(e);
    /* Admission, first come first served: stop at the first request that does not fit. The
     * headroom (1% of the pool, at least a block) keeps running sequences' next decode
     * blocks from being taken by newcomers, which would only preempt them right back. */
    int active = n_active(e) + n_loading(e);
    int headroom = e->kv.n_blocks / 100 > 1 ? e->kv.n_blocks / 100 : 1;
    for (int i = 0; i < e->n_seqs && active < e->o.max_seqs; i++) {
        seq *s = e->seqs[i];
        if (s->phase != SEQ_QUEUED) continue;
        if (!admit(e, s, now, active > 0 ? headroom : 0)) break;
        active++;
    }

    /* Build the batch: decode tokens (oldest first, each may need a block), then prefill
     * chunks (their blocks were reserved at admission). */
    int n = 0, n_decode = 0, budget = e->o.max_batch_tokens;
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) n_decode = n;
        for (int i = 0; i < e->n_seqs; i++) {
            seq *s = e->seqs[i];
            int start = s->kv.n_tokens, count;
            if (pass == 0 && s->phase == SEQ_DECODE) count = 1;
            else if (pass == 1 && s->phase == SEQ_PREFILL) {
                count = s->n_fill - start;
                if (count > budget) count = budget;
                if (count <= 0) continue;
            } else continue;
            int room = pass == 0 ? make_room(e, s, start + count, now)
                                 : kv_seq_prepare(&e->kv, &s->kv, start + count) ? 1 : 0;
            if (room == 1) continue;      /* preempted (or, for prefill, retried next step) */
            if (room == 2) { finish(e, s, FINISH_LENGTH, NULL); continue; }
            for (int k = 0; k < count; k++) {
                e->b_tok[n] = s->tokens[start + k];
                e->b_pos[n] = start + k;
                e->b_seq[n] = &s->kv;
                e->b_owner[n] = s;
                bool last = s->phase == SEQ_DECODE || start + k == s->n_fill - 1;
                e->b_logits[n] = last;
                e->b_argmax[n] = last && greedy_only(s);
                n++;
            }
            if (s->phase == SEQ_PREFILL) budget -= count;
        }
    }
    if (n == 0) {
        /* Nothing could run. Loads in flight: wait a little for one to finish (no busy loop).
         * Otherwise, with admission reserving blocks this only happens when the one queued
         * request cannot get blocks with nothing else running (memory allocation failed):
         * fail it rather than spin. */
        if (n_loading(e) > 0) {
            if (e->tier) kvtier_wait(e->tier, 0.005);
            if (e->rd) kvredis_wait(e->rd, 0.005);
        }
        else if (n_active(e) == 0)
            for (int i = 0; i < e->n_seqs; i++)
                if (e->seqs[i]->phase == SEQ_QUEUED && e->seqs[i]->tried_epoch == e->release_epoch) {
                    finish(e, e->seqs[i], FINISH_ERROR, "KV cache memory exhausted (raise --kv-mem)");
                    break;
                }
        compact(e);
        return e->n_seqs;
    }
    model_batch b = { .n = n, .tokens = e->b_tok, .pos = e->b_pos, .seqs = e->b_seq, .want_logits = e->b_logits,
                      .argmax_only = e->b_argmax };
    char err[256];
    double t_fwd = now_s(e), t_real = mono_now(NULL);
    int frc = e->gpu ? gpu_forward(e->gpu, &e->kv, &b, e->logits, e->argmax, err, sizeof err)
                     : model_forward(e->m, e->mctx, e->tp, &e->kv, &b, e->logits, err, sizeof err);
    e->prof_fwd_s += now_s(e) - t_fwd;
    /* the prefill rate, for the cluster's fetch-or-compute rule: steps with a prefill chunk of at
     * least a block (a step's time over its tokens; attention makes later positions dearer, so
     * this is the rate at the positions being prefilled, a fair guess for the next prompt's) */
    if (n - n_decode >= KV_BLOCK) {
        double per = (mono_now(NULL) - t_real) / n;
        e->prefill_tok_s = e->prefill_tok_s > 0 ? 0.75 * e->prefill_tok_s + 0.25 * per : per;
    }
    if (frc != 0) {
        for (int i = 0; i < n; i++)
            if (e->b_owner[i]->phase != SEQ_DONE) finish(e, e->b_owner[i], FINISH_ERROR, err);
        compact(e);
        return e->n_seqs;
    }
    /* Advance: tokens of one sequence are contiguous in the batch. */
    int out = 0;
    now = now_s(e);
    for (int i = 0; i < n;) {
        seq *s = e->b_owner[i];
        int j = i;
        while (j < n && e->b_owner[j] == s) j++;
        s->kv.n_tokens = e->b_pos[j - 1] + 1;
        if (e->b_logits[j - 1]) {
            float *lg = e->logits + (size_t)out * e->m->c.n_vocab;
            /* a greedy_only row: its argmax (from the GPU, which then kept the logits) */
            const bool am = e->b_argmax[j - 1];
            const int32_t given = !am ? -1 : e->argmax ? e->argmax[out] : sample_argmax(lg, e->m->c.n_vocab);
            out++;
            if (s->phase == SEQ_PREFILL && !s->prompt_cached) {
                s->u.prefill_s = now - s->t_submit;
                cache_prompt(e, s, now);
                if (s->r.prompt_logits) memcpy(s->r.prompt_logits, lg, (size_t)e->m->c.n_vocab * sizeof(float));
            }
            take_token(e, s, am ? NULL : lg, given);
        }
        i = j;
    }
    compact(e);
    e->prof_steps++;
    e->prof_step_s += now_s(e) - t_step;
    return e->n_seqs;
}

static void cluster_stats(const engine *e, engine_stats *s) {
    s->prefill_tok_s = e->prefill_tok_s;
    if (!e->rd) return;
    s->redis_on = true;
    kvredis_get_stats(e->rd, &s->redis);
    s->redis_fetches = e->rd_fetches;
    s->redis_computes = e->rd_computes;
    s->redis_hits = e->rd_hits;
    s->redis_tokens = e->rd_tokens;
    s->redis_announced = (int)chainset_size(&e->announced);
}

void engine_get_stats(const engine *e, engine_stats *s) {
    *s = e->st;
    s->kv_blocks_total = e->kv.n_blocks;
    s->kv_blocks_used = kv_blocks_used(&e->kv);
    s->kv_blocks_free = e->kv.n_blocks - s->kv_blocks_used;
    s->active_seqs = n_active(e);
    s->queued_seqs = 0;
    for (int i = 0; i < e->n_seqs; i++) s->queued_seqs += e->seqs[i]->phase == SEQ_QUEUED;
    prefix_stats ps;
    prefix_get_stats(e->px, &ps);
    s->evictions = ps.evictions;
    s->cache_lookups = ps.lookups;
    s->cache_hits = ps.hits;
    s->cache_tokens_saved = ps.tokens_saved;
    s->cache_entries = ps.entries;
    s->cache_tokens = ps.cached_tokens;
    s->cache_blocks = ps.blocks_held;
    cluster_stats(e, s);
    if (!e->tier) return;
    kvtier_stats ts;
    kvtier_get_stats(e->tier, &ts);
    s->tier_on[KVTIER_HOST] = e->o.cache_host_bytes > 0;
    s->tier_on[KVTIER_DISK] = e->o.cache_dir != NULL;
    for (int t = KVTIER_HOST; t < KVTIER_N; t++) {
        const kvtier_level_stats *l = &ts.tier[t];
        s->tier[t] = (struct engine_tier){ .blocks = l->blocks, .bytes = l->bytes, .hits = e->tier_hits[t],
                                           .tokens_served = l->tokens_served, .promotions = l->promotions,
                                           .demotions = l->demotions, .bad_files = l->bad_files,
                                           .write_errors = l->write_errors, .expired = l->expired, .evicted = l->evicted,
                                           .read_n = l->read_n, .write_n = l->write_n, .read_s = l->read_s, .write_s = l->write_s };
    }
    s->tier_writes_dropped = ts.writes_dropped;
    s->tier_queue_depth = ts.queue_depth;
    s->tier_loads = e->tier_loads;
}

uint64_t engine_model_fp(const engine *e) { return e->model_fp; }
const char *engine_cache_path(const engine *e) { return kvtier_disk_path(e->tier); }
bool engine_redis_stats(const engine *e, kvredis_stats *out) {
    if (!e->rd) return false;
    kvredis_get_stats(e->rd, out);
    return true;
}

void engine_cache_sync(engine *e) {
    if (e->tier) kvtier_sync(e->tier, load_done, e);
    if (e->rd) kvredis_sync(e->rd, load_done, e);
}
void engine_cache_pause(engine *e, bool paused) { if (e->tier) kvtier_pause(e->tier, paused); }

const char *engine_device(const engine *e, struct gpu_mem *mem) {
    if (!e->gpu) return "cpu";
    if (mem) gpu_get_mem(e->gpu, mem);
    return "cuda";
}
