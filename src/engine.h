/* engine: model + tokenizer + KV pool + prefix cache + scheduler, behind one small API.
 *
 * Not thread-safe: one thread owns the engine and calls engine_step in a loop; other threads
 * (HTTP handlers) hand requests to that thread through their own queue. Callbacks run on the
 * engine thread inside engine_step. A request's prompt is looked up in the prefix cache of its
 * namespace, only the uncached suffix is prefilled (in chunks, batched with other sequences'
 * decode steps), and its prompt blocks are inserted into the cache when prefill ends.
 */
#ifndef PCACHE_ENGINE_H
#define PCACHE_ENGINE_H
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include "sample.h"
#include "tokenizer.h"
#include "gguf.h"
#include "kvredis.h"

typedef struct engine_opts {
    const char *model_path;
    size_t kv_mem_bytes;         /* KV pool budget; 0 = 512 MiB */
    double cache_ttl_s;          /* automatic entries; 0 = 300 */
    bool cache_enabled;          /* false: never match (still correct, just slower) */
    int n_threads;               /* 0 = number of cores */
    int max_batch_tokens;        /* prefill chunk / tokens per step; 0 = 512 */
    int max_seqs;                /* concurrent sequences; 0 = 64 */
    const char *device;          /* "cpu", "cuda" or "auto" (NULL): the GPU when one is usable */
    double (*clock)(void *ctx);  /* seconds; NULL = CLOCK_MONOTONIC. Tests drive their own. */
    void *clock_ctx;
    /* Cache tiers below the KV pool (issue 11): blocks the prefix cache takes are also written,
     * in the background, to host RAM (cache_host_bytes > 0) and to disk under cache_dir (a
     * store per model fingerprint and KV layout), and a lookup continues a pool match into
     * them, loading what they hold back into the pool. NULL / 0: off. */
    const char *cache_dir;
    size_t cache_disk_bytes;     /* the disk tier's bound; 0 = 10 GiB */
    size_t cache_host_bytes;     /* the host-RAM tier's bound; 0 = no host tier */
    int cache_write_queue;       /* blocks that may wait to be written (per tier: local, Redis); 0 = 256 or half the pool if more */
    /* The cluster (issue 14; kvredis.h): with redis_url (redis.h's URL), the engine publishes its
     * KV events to Redis (kvevent.h), writes the blocks it caches through to Redis, and on a
     * local miss fetches a prefix from Redis when that is cheaper than computing it. Redis down
     * or slow: the local caches only (counted). NULL: off. */
    const char *redis_url;
    const char *redis_password;  /* when the URL has none (e.g. $REDIS_PASSWORD); NULL: none */
    uint64_t instance;           /* this process's instance id in the events; 0 = random */
    double redis_timeout_s;      /* connect and command timeout; 0 = 1 s */
} engine_opts;

typedef struct engine_usage {
    int prompt_tokens;
    int cached_tokens;           /* read from the cache */
    int cache_write_5m;          /* tokens newly written to the cache, by ttl class */
    int cache_write_1h;
    int cache_write_auto;        /* tokens newly cached by automatic caching (not breakpoints) */
    int completion_tokens;
    double ttft_s;               /* submit -> first token sampled */
    double prefill_s, decode_s;
    int stop_matched;            /* FINISH_STOP by a stop string: its 1-based index; 0 = EOS/none */
} engine_usage;
#define ENGINE_USAGE_HAS_STOP_MATCHED 1

typedef enum { FINISH_NONE = 0, FINISH_STOP, FINISH_LENGTH, FINISH_ABORT, FINISH_ERROR } finish_reason;

/* Log-probabilities of one sampled token: log-softmax of the logits the sampler saw (the
 * model's logits plus logit_bias and the repetition/presence/frequency penalties, before
 * temperature, top-k/p and min-p, which only choose among them), as OpenAI reports them. */
#define ENGINE_MAX_TOP_LOGPROBS 20
typedef struct engine_logprob {
    int32_t token;
    float logprob;
} engine_logprob;
typedef struct engine_token_info {
    int32_t token;
    float logprob;
    int n_top;                                  /* = the request's logprobs */
    engine_logprob top[ENGINE_MAX_TOP_LOGPROBS]; /* best first, ties by lower id */
} engine_token_info;

typedef struct engine_logit_bias { int32_t token; float bias; } engine_logit_bias;

#define ENGINE_MAX_BREAKPOINTS 4
typedef struct engine_request {
    const char *ns;                       /* cache namespace (tenant); NULL = "" */
    const int32_t *prompt;
    int n_prompt;
    struct { int pos; double ttl_s; } breakpoints[ENGINE_MAX_BREAKPOINTS]; /* cache [0,pos) */
    int n_breakpoints;
    sample_params sp;
    int max_tokens;                       /* <= 0: up to the context */
    const char *const *stop;              /* stop strings (not included in the output) */
    int n_stop;
    bool ignore_eos;
    bool no_cache;                        /* neither read nor write the prefix cache */
    const engine_logit_bias *logit_bias;  /* added to the logits before sampling (copied) */
    int n_logit_bias;
    int logprobs;                         /* with on_token: how many top alternatives each
                                             token's info lists (0 .. ENGINE_MAX_TOP_LOGPROBS) */
    float *prompt_logits;                 /* optional: gets the last prompt position's logits */
    /* Optional: constrained decoding (structured outputs). Every token is sampled among those
     * the grammar allows (grammar.h), and generation ends (FINISH_STOP) when the grammar's
     * sentence is complete; end-of-generation tokens are allowed only where it may end. The
     * engine holds a reference while the request lives. */
    struct grammar *grammar;
    /* Streamed output: called with each complete UTF-8 text delta (never splits a character,
     * holds back text that may be the start of a stop string). */
    void (*on_text)(void *user, const char *text, size_t len);
    /* Optional: called once when the prompt is in the KV and the first token is sampled (before
     * its text), with usage so far: prompt, cached and cache-written tokens, TTFT. */
    void (*on_start)(void *user, const engine_usage *u);
    void (*on_done)(void *user, finish_reason why, const engine_usage *u, const char *err);
    /* Optional: called with the log-probabilities of each generated token that becomes output
     * (not for an end-of-generation token), before the text it completes is passed to on_text.
     * Costs a pass over the vocabulary per token; NULL when logprobs are not wanted. */
    void (*on_token)(void *user, const engine_token_info *ti);
    /* Optional: called once when the request ends, before on_done, with every token it
     * generated (those in the KV; not the end-of-generation token): a conversation can continue
     * from exactly these tokens (the Responses API's previous_response_id). */
    void (*on_tokens)(void *user, const int32_t *tokens, int n);
    void *user;
} engine_request;

typedef struct engine_stats {
    uint64_t requests, prompt_tokens, cached_tokens, completion_tokens, evictions;
    int kv_blocks_used, kv_blocks_free, kv_blocks_total;
    int active_seqs;
    int queued_seqs;               /* waiting for KV blocks or a batch slot (preempted ones too) */
    uint64_t preemptions;          /* running sequences sent back to the queue for KV blocks */
    /* prefix cache */
    uint64_t cache_lookups, cache_hits, cache_tokens_saved;
    int cache_entries;
    int64_t cache_tokens;          /* tokens held in the index */
    int cache_blocks;              /* distinct KV blocks the index holds */
    /* lower tiers (cache_dir / cache_host_bytes); all zero when off */
    bool tier_on[3];               /* [1] host RAM, [2] disk (kvtier.h's KVTIER_HOST, KVTIER_DISK) */
    struct engine_tier {
        uint64_t blocks, bytes;        /* held now */
        uint64_t hits;                 /* admissions that loaded >= 1 block from this tier */
        uint64_t tokens_served;        /* prompt tokens loaded from it instead of computed */
        uint64_t promotions;           /* blocks loaded from it into the KV pool */
        uint64_t demotions;            /* blocks written into it */
        uint64_t bad_files;            /* refused records (checksum, truncation, foreign) */
        uint64_t write_errors, expired, evicted;
        uint64_t read_n, write_n;      /* per-block latency: count and sum of seconds */
        double read_s, write_s;
    } tier[3];
    uint64_t tier_writes_dropped;  /* blocks not written: the write queue was full */
    int tier_queue_depth;
    uint64_t tier_loads;           /* admissions that waited for a load from a lower tier */
    /* the cluster (redis_url); all zero when off */
    bool redis_on;
    kvredis_stats redis;
    uint64_t redis_fetches;        /* admissions that asked Redis for blocks (the transfer was cheaper) */
    uint64_t redis_computes;       /* admissions that computed blocks Redis may hold (computing was cheaper) */
    uint64_t redis_hits;           /* admissions that loaded >= 1 block from Redis */
    uint64_t redis_tokens;         /* prompt tokens loaded from Redis instead of computed */
    int redis_announced;           /* full blocks announced to the cluster as held */
    double prefill_tok_s;          /* measured prefill seconds per token (moving average; 0: none yet) */
} engine_stats;

typedef struct engine engine;
int engine_create(engine **out, const engine_opts *o, char *err, size_t errlen);
void engine_free(engine *e);
const tokenizer *engine_tok(const engine *e);
const gguf_file *engine_gguf(const engine *e);
int engine_n_ctx(const engine *e);
const char *engine_model_name(const engine *e);

/* Queues a request (everything is copied). Returns its id (>= 0) or -1 with err when it can
 * never run: its prompt (+ max_tokens, when given) is longer than the context or needs more KV
 * blocks than the whole pool has. Admission is first come, first served, as KV blocks allow:
 * a queued request waits (cache entries are evicted first); when a running sequence needs a
 * block and none can be freed, the youngest running sequence is preempted: its KV goes into
 * the prefix cache, its blocks are released and it is requeued, to resume where it stopped
 * (the same tokens as an uninterrupted run). A sequence without max_tokens that outgrows the
 * whole pool ends with FINISH_LENGTH. */
int engine_submit(engine *e, const engine_request *r, char *err, size_t errlen);
/* Ends a request early (client went away): on_done(FINISH_ABORT) is called and its blocks are
 * released at the next step. */
void engine_cancel(engine *e, int id);
/* Runs one step (a batch of decode tokens and prefill chunks). Returns the number of requests
 * still active afterwards. */
int engine_step(engine *e);
void engine_get_stats(const engine *e, engine_stats *s);
/* The model file's fingerprint (0 without cache tiers or Redis) and the disk store's directory
 * (NULL). */
uint64_t engine_model_fp(const engine *e);
const char *engine_cache_path(const engine *e);
/* For tests: waits until the cache tiers' queued reads and writes are done (and collected);
 * pauses / resumes their I/O thread (a paused thread takes no work: the write queue fills). */
void engine_cache_sync(engine *e);
void engine_cache_pause(engine *e, bool paused);
/* Drops every prefix-cache entry (blocks running sequences hold stay theirs); the lower tiers
 * keep theirs. With Redis, publishes clear, then a store of what the lower tiers still hold.
 * Returns the number of KV blocks freed. */
int engine_cache_clear(engine *e);
/* Any thread: the Redis client's counters now (kvredis_get_stats), fresher than a snapshot of
 * engine_get_stats taken between engine steps. Returns false (nothing filled) without Redis. */
bool engine_redis_stats(const engine *e, kvredis_stats *out);

/* "cpu" or "cuda" (the backend in use); with cuda, *mem (if not NULL) gets its memory by use. */
struct gpu_mem;
const char *engine_device(const engine *e, struct gpu_mem *mem);
#endif
