/* server: `pcache serve`, OpenAI- and Anthropic-compatible HTTP on libmicrohttpd.
 *
 * Threads. The engine is not thread-safe, so exactly one engine thread owns it: it loops
 * engine_step() while any request is active and sleeps on a condition variable when idle.
 * libmicrohttpd runs one thread per connection (simple blocking code, and a slow or stalled
 * client only ever stalls its own thread); handler threads parse, render and tokenize the
 * request themselves (the tokenizer is read-only), then hand a `job` to the engine thread
 * through a mutex-protected queue and wait on the job's condition variable. The engine
 * callbacks (on the engine thread) append generated text to the job and signal it; the
 * connection thread turns new text into SSE events (streaming) or waits for the end and sends
 * one JSON body. A job is reference counted: one reference for the connection, one for the
 * engine thread until on_done, one for a streaming response object and one per queued cancel.
 *
 * Cancellation. When a client goes away (libmicrohttpd reports the request terminated with an
 * error, a write fails, or, while we wait, poll() sees the socket hang up), the connection
 * thread queues a cancel; the engine thread calls engine_cancel (never another thread).
 *
 * Limits. Bodies over API_MAX_BODY get 413 (at once when Content-Length says so); headers that
 * do not fit the per-connection memory pool get 431 from libmicrohttpd; clients idle for
 * --timeout seconds while sending a request are dropped (slowloris); once a request is read the
 * connection's timeout is raised so long generations are not cut off.
 *
 * Decisions (documented for users):
 * - Model names (lenient by default): one model is loaded, so a request naming any model, or
 *   none, is served by it, and every reply (and stream chunk) names the served model, as
 *   llama.cpp's server does: clients send their own names (gpt-4o-mini, claude-sonnet-4-5,
 *   test) and would otherwise need reconfiguring. --alias NAME adds names to /v1/models (and
 *   GET /v1/models/{name} finds them; with the lenient default any name finds the served
 *   model). --strict-model restores the check that catches clients pointed at the wrong
 *   server: the name must be the GGUF general.name, the file name (with or without .gguf),
 *   "default" or an alias, else 404 model_not_found, and `model` is required (400).
 * - Paths: the API is served with and without the /v1 prefix (/chat/completions, /completions,
 *   /models, /messages, /messages/count_tokens), since clients given a base URL without /v1
 *   call those; /health and /metrics have one path each.
 * - CORS: browsers may call the API from the origins of --cors-origins (a list, or *; default:
 *   http(s)://localhost, 127.0.0.1 and [::1] on any port, as llama.cpp allows). An allowed
 *   request's Origin is echoed in Access-Control-Allow-Origin (with Vary: Origin) on every
 *   response, errors and SSE streams included; a preflight (OPTIONS on an API path) gets 204
 *   with the allowed methods, the requested headers (or a list of the SDKs' headers) and a
 *   day's Max-Age, and needs no key (browsers send none on a preflight). A disallowed origin
 *   gets no CORS headers, so the browser withholds the answer, but the request is answered as
 *   for any other client: CORS protects browser users, it is not access control (keys are).
 * - Prompts as token ids (completions): used as they are, no BOS added and no tokenization;
 *   each id must be in the vocabulary (400 naming the element). A batch of prompts is a 400.
 * - Context overflow: a prompt whose length plus max_tokens (or plus one token, without
 *   max_tokens) exceeds the context is a 400 worded as each API words it: OpenAI's code
 *   context_length_exceeded (param messages or prompt), Anthropic's "prompt is too long: M
 *   tokens > N maximum" or its "input length and `max_tokens` exceed context limit" message.
 * - Namespaces (tenant isolation by default): the cache namespace is derived from the presented
 *   credential (x-api-key, or the Authorization bearer token), hashed ("k" + FNV-1a-64, so keys
 *   are not kept in the cache index), whether or not --api-key is configured; requests without
 *   a credential share the namespace "". A request's `cache_salt` (vLLM's name) splits its
 *   namespace further ("s" + hash of namespace and salt). Why by default: a shared prompt cache
 *   is a timing side channel (a hit answers faster, so one client can test whether another
 *   sent a prompt; Gu et al. 2025, "Auditing Prompt Caching in Language Model APIs"). OpenAI's
 *   prompt_cache_key is a routing hint in OpenAI (it does not isolate caches), and this is one
 *   process, so it is accepted and ignored.
 * - Load: requests wait in a first-come-first-served queue for KV blocks and batch slots (the
 *   engine preempts and resumes sequences rather than failing them); at most --max-queue wait,
 *   beyond that 429 (OpenAI) / 529 overloaded_error (Anthropic) with Retry-After.
 * - Shutdown: SIGTERM/SIGINT starts draining: generation requests get 503, /health answers 503,
 *   in-flight requests run to completion for up to --drain-timeout seconds; what is left then
 *   ends with an error event on its stream (a 503 when not streamed). A second signal stops at
 *   once.
 * - Thinking models (the template or vocabulary has <think>): chat, messages and responses
 *   output is split by reasoning.h into the reasoning block and the content after it, the
 *   reasoning returned as OpenAI reasoning_content, Anthropic thinking blocks or a Responses
 *   reasoning item, streamed as it comes; tool calls are parsed from the content only. Not
 *   split: with reasoning_format "none" (inline, as llama.cpp), and when a grammar constrains
 *   the reply from its first token (response_format, forced tool calls: the reply is then the
 *   JSON or the calls, with no block). Whether the reply starts inside a block is read from
 *   what follows the generation prompt (a template's "<think>\n", an Anthropic prefill). A
 *   request that asks for reasoning (Anthropic thinking enabled, Responses reasoning.effort)
 *   is a 400 for a model that does not reason.
 * - Anthropic streaming: message_start is sent once the prompt is in the KV (the engine's
 *   on_start), so it carries the real input / cache_creation / cache_read split, as
 *   Anthropic's does; message_delta repeats the final numbers with output_tokens.
 * - /health, /metrics and CORS preflights need no key; every other API request does when keys
 *   are configured.
 */
#include "server.h"
#include "api.h"
#include "engine.h"
#include "gpu.h"
#include "http.h"
#include "jsonschema.h"
#include "kvevent.h"
#include "prompt.h"
#include "reasoning.h"
#include "redis.h"
#include "respstore.h"
#include "toolcall.h"
#include "util.h"
#include <cjson/cJSON.h>
#include <microhttpd.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------ types */
enum { EP_CHAT, EP_COMPLETIONS, EP_MESSAGES, EP_COUNT_TOKENS, EP_RESPONSES, EP_RESPONSE_ID, EP_MODELS, EP_HEALTH, EP_METRICS,
       EP_OTHER, EP_N };
static const char *const ep_names[EP_N] = { "chat_completions", "completions", "messages", "count_tokens", "responses",
                                            "response", "models", "health", "metrics", "other" };

#define N_TTFT 12
static const double ttft_bounds[N_TTFT] = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30 };
#define N_TPS 10
static const double tps_bounds[N_TPS] = { 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500 };
#define N_STATUS 12

typedef struct metrics {
    pthread_mutex_t mu;
    struct { int status; uint64_t n; } req[EP_N][N_STATUS];
    uint64_t ttft[N_TTFT + 1], tps[N_TPS + 1], ttft_n, tps_n;
    double ttft_sum, tps_sum;
    uint64_t prompt_tokens, hit_tokens, miss_tokens, completion_tokens, cache_write_tokens;
    engine_stats es;      /* snapshot taken by the engine thread */
    int active;
    uint64_t queue_full;
    bool gpu;
    gpu_mem gm;
} metrics;

typedef struct server server;

typedef enum { JOB_QUEUED, JOB_RUNNING, JOB_DONE } job_state;

typedef struct job {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs;
    server *srv;
    api_request req;
    int32_t *prompt;
    int n_prompt;
    engine_request er;
    char ns[18];
    /* shared with the engine thread, under mu */
    job_state state;
    int engine_id;
    bool cancel_queued;
    char *text;
    size_t text_len, text_cap;
    finish_reason why;
    engine_usage usage;
    bool started;         /* on_start seen: usage holds the prompt's cache split */
    bool waiting;         /* counted in server.waiting */
    engine_token_info *lps; /* logprobs of the generated tokens, under mu */
    int n_lps, cap_lps;
    int lps_sent;         /* connection thread: streamed so far */
    size_t lp_off;        /* connection thread: bytes of those tokens' text */
    char errmsg[256];
    bool submit_failed;
    /* identity */
    char id[40];
    long long created;
    int fd;               /* client socket, for hang-up checks */
    /* connection-thread only: stream state */
    size_t sent;
    char *pend;
    size_t pend_len, pend_off;
    int phase;            /* 0 start, 1 body, 2 finished */
    /* tool calls (api_tools_active): the output parsed into content and calls */
    bool tools_on;
    toolcall_parser tp;
    api_stream st;        /* streaming: blocks and calls sent */
    char *prompt_text;    /* Responses: the rendered prompt (the stored prefix's start) */
    char owner[18];       /* Responses: the caller's credential namespace (who may read it back) */
    int32_t *gen;         /* Responses: the generated tokens (engine's on_tokens) */
    int n_gen;
    size_t content_sent;  /* streaming: bytes of tp.content sent */
    char (*call_ids)[40]; /* an id per call, made as it is sent */
    int n_call_ids;
    /* reasoning (req.think): the output split into reasoning and content (which goes on to the
     * tool-call parser when tools_on) */
    reasoning_parser rp;
    size_t rp_used;       /* streaming: bytes of rp.content passed on */
    struct job *next, *cnext, *rnext;
} job;

struct server {
    engine *eng;
    const tokenizer *tok;
    const gguf_file *gf;
    chat_tmpl tmpl;
    chat_think think;         /* what the template does with <think> blocks */
    prompt_model pm;          /* tok, gf, tmpl and think, for prompt_tokens */
    int n_ctx;
    char model_id[256], model_file[256], model_stem[256];
    const char **aliases;     /* --alias: more names for the model (argv strings) */
    int n_aliases;
    bool strict_model;        /* --strict-model: unknown names are 404, `model` is required */
    const char **cors;        /* --cors-origins: allowed browser origins (argv substrings) */
    int n_cors;               /* -1: the default (localhost origins only) */
    bool cors_any;            /* "*" */
    char **keys;
    char (*key_ns)[18];
    int n_keys;
    unsigned timeout_s;
    /* engine queue */
    pthread_mutex_t q_mu;
    pthread_cond_t q_cv;
    job *pending, *pending_tail, *cancels;
    bool stopping;
    atomic_bool draining;
    pthread_t eng_thread;
    int max_queue;
    atomic_int waiting;       /* jobs handed to the engine thread whose prompt has not started */
    /* ids */
    uint64_t id_seed;
    atomic_uint_fast64_t id_ctr;
    metrics m;
    schema_cache *schemas;    /* compiled response_format grammars */
    respstore *responses;     /* the Responses API's stored responses */
    double cache_ttl;         /* --cache-ttl: how long a stored response lives (as its cache entry) */
    char instance[17];        /* this process's instance id (kvevent.h), hex */
    char fingerprint[17];     /* the model fingerprint, hex ("" when not computed: no tiers, no Redis) */
};

typedef struct conn {
    int ep;
    bool anthropic;
    body_buf in;              /* the request body */
    job *job;
    char ns[18];
} conn;

static double now_mono(void);
static int in_flight(server *s);

/* ------------------------------------------------------------------------------ helpers */
void server_key_namespace(const char *key, char out[18]) {
    if (!key) { out[0] = 0; return; }
    uint64_t h = 1469598103934665603ull;
    for (const unsigned char *p = (const unsigned char *)key; *p; p++) { h ^= *p; h *= 1099511628211ull; }
    snprintf(out, 18, "k%016llx", (unsigned long long)h);
}

static uint64_t mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}
static uint64_t next_rand(server *s) { return mix64(s->id_seed ^ mix64(atomic_fetch_add(&s->id_ctr, 1))); }

/* Constant-time string compare (keys). */
static bool key_eq(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    unsigned char d = la != lb;
    for (size_t i = 0; i < la; i++) d |= (unsigned char)(a[i] ^ b[i % (lb ? lb : 1)]);
    return d == 0;
}

static void metrics_request(server *s, int ep, int status) {
    pthread_mutex_lock(&s->m.mu);
    for (int i = 0; i < N_STATUS; i++) {
        if (s->m.req[ep][i].status == status || s->m.req[ep][i].status == 0) {
            s->m.req[ep][i].status = status;
            s->m.req[ep][i].n++;
            break;
        }
    }
    pthread_mutex_unlock(&s->m.mu);
}

/* ------------------------------------------------------------------------------ jobs */
static void job_release(job *j) {
    pthread_mutex_lock(&j->mu);
    int r = --j->refs;
    pthread_mutex_unlock(&j->mu);
    if (r > 0) return;
    pthread_mutex_destroy(&j->mu);
    pthread_cond_destroy(&j->cv);
    api_request_free(&j->req);
    grammar_unref(j->er.grammar);
    free(j->prompt_text);
    free(j->gen);
    free(j->prompt);
    free(j->text);
    free(j->pend);
    free(j->lps);
    toolcall_parser_free(&j->tp);
    reasoning_free(&j->rp);
    free(j->call_ids);
    free(j);
}

/* A generated NUL byte (a byte-fallback token) becomes U+FFFD: the reply's text is a C string
 * for the JSON library, which would otherwise end it there (and the streamed and whole replies
 * would differ). */
static void on_text(void *user, const char *text, size_t len) {
    job *j = user;
    size_t need = len;
    for (size_t i = 0; i < len; i++) need += text[i] ? 0 : 2;
    pthread_mutex_lock(&j->mu);
    if (j->text_len + need + 1 > j->text_cap) {
        size_t c = j->text_cap ? j->text_cap : 256;
        while (c < j->text_len + need + 1) c *= 2;
        char *p = realloc(j->text, c);
        if (p) { j->text = p; j->text_cap = c; }
    }
    if (j->text_len + need + 1 <= j->text_cap) {
        char *d = j->text + j->text_len;
        for (size_t i = 0; i < len; i++) {
            if (text[i]) *d++ = text[i];
            else { memcpy(d, "\xEF\xBF\xBD", 3); d += 3; }
        }
        j->text_len += need;
        j->text[j->text_len] = 0;
    }
    pthread_cond_broadcast(&j->cv);
    pthread_mutex_unlock(&j->mu);
}

static void on_token(void *user, const engine_token_info *ti) {
    job *j = user;
    pthread_mutex_lock(&j->mu);
    if (j->n_lps == j->cap_lps) {
        int c = j->cap_lps ? 2 * j->cap_lps : 16;
        engine_token_info *p = realloc(j->lps, (size_t)c * sizeof *p);
        if (p) { j->lps = p; j->cap_lps = c; }
    }
    if (j->n_lps < j->cap_lps) j->lps[j->n_lps++] = *ti;
    pthread_mutex_unlock(&j->mu);
}

static void on_tokens(void *user, const int32_t *toks, int n) {
    job *j = user;
    pthread_mutex_lock(&j->mu);
    free(j->gen);
    j->gen = n > 0 ? malloc((size_t)n * sizeof *j->gen) : NULL;
    if (j->gen) memcpy(j->gen, toks, (size_t)n * sizeof *toks);
    j->n_gen = j->gen ? n : 0;
    pthread_mutex_unlock(&j->mu);
}

static const char *token_text(void *ctx, int32_t id, size_t *len) {
    return tokenizer_piece((const tokenizer *)ctx, id, true, len);
}

/* The job's prompt started (or it ended): it no longer counts against --max-queue. Under mu. */
static void job_unwait(job *j) {
    if (!j->waiting) return;
    j->waiting = false;
    atomic_fetch_sub(&j->srv->waiting, 1);
}

static void on_start(void *user, const engine_usage *u) {
    job *j = user;
    pthread_mutex_lock(&j->mu);
    job_unwait(j);
    j->usage = *u;
    j->started = true;
    pthread_cond_broadcast(&j->cv);
    pthread_mutex_unlock(&j->mu);
}

static void job_finish(job *j, finish_reason why, const engine_usage *u, const char *err) {
    pthread_mutex_lock(&j->mu);
    job_unwait(j);
    j->state = JOB_DONE;
    j->why = why;
    if (u) j->usage = *u;
    if (err) snprintf(j->errmsg, sizeof j->errmsg, "%s", err);
    pthread_cond_broadcast(&j->cv);
    pthread_mutex_unlock(&j->mu);
}

static void on_done(void *user, finish_reason why, const engine_usage *u, const char *err) {
    job *j = user;
    server *s = j->srv;
    if (u) {
        pthread_mutex_lock(&s->m.mu);
        s->m.prompt_tokens += (uint64_t)u->prompt_tokens;
        s->m.hit_tokens += (uint64_t)u->cached_tokens;
        s->m.miss_tokens += (uint64_t)(u->prompt_tokens - u->cached_tokens);
        s->m.completion_tokens += (uint64_t)u->completion_tokens;
        s->m.cache_write_tokens += (uint64_t)(u->cache_write_5m + u->cache_write_1h);
        if (u->completion_tokens > 0 && u->ttft_s > 0) {
            int b = 0;
            while (b < N_TTFT && u->ttft_s > ttft_bounds[b]) b++;
            s->m.ttft[b]++; s->m.ttft_n++; s->m.ttft_sum += u->ttft_s;
        }
        if (u->completion_tokens > 1 && u->decode_s > 0) {
            double tps = (u->completion_tokens - 1) / u->decode_s;
            int b = 0;
            while (b < N_TPS && tps > tps_bounds[b]) b++;
            s->m.tps[b]++; s->m.tps_n++; s->m.tps_sum += tps;
        }
        pthread_mutex_unlock(&s->m.mu);
    }
    job_finish(j, why, u, err);
    /* the running list is the engine thread's: unlink */
    job_release(j); /* the engine's reference */
}

/* Queues a cancel unless the job already ended (any thread). */
static void job_cancel(server *s, job *j) {
    pthread_mutex_lock(&j->mu);
    bool go = j->state != JOB_DONE && !j->cancel_queued;
    if (go) { j->cancel_queued = true; j->refs++; }
    pthread_mutex_unlock(&j->mu);
    if (!go) return;
    pthread_mutex_lock(&s->q_mu);
    j->cnext = s->cancels;
    s->cancels = j;
    pthread_cond_signal(&s->q_cv);
    pthread_mutex_unlock(&s->q_mu);
}


/* Waits on the job's cv (held) up to ms milliseconds. */
static void job_wait(job *j, int ms) {
    const struct timespec ts = deadline_after(ms / 1000.0);
    pthread_cond_timedwait(&j->cv, &j->mu, &ts);
}

/* ------------------------------------------------------------------------------ engine thread */
static void *engine_main(void *arg) {
    server *s = arg;
    job *running = NULL;  /* submitted, on_done not yet seen (for shutdown) */
    int active = 0;
    char err[256];
    for (;;) {
        pthread_mutex_lock(&s->q_mu);
        /* Idle: wake once a second anyway, so that the engine collects the cache tiers'
         * finished writes (their block references) and /metrics stays current. */
        while (!s->stopping && !s->pending && !s->cancels && active == 0) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_sec += 1;
            if (pthread_cond_timedwait(&s->q_cv, &s->q_mu, &ts) == ETIMEDOUT) break;
        }
        bool stop = s->stopping;
        job *pend = s->pending, *canc = s->cancels;
        s->pending = s->pending_tail = NULL;
        s->cancels = NULL;
        pthread_mutex_unlock(&s->q_mu);

        for (job *j = pend, *nx; j; j = nx) {
            nx = j->next;
            pthread_mutex_lock(&j->mu);
            bool cancelled = j->cancel_queued;
            pthread_mutex_unlock(&j->mu);
            if (cancelled || stop) {
                job_finish(j, FINISH_ABORT, NULL, stop ? "server is shutting down" : "cancelled");
                job_release(j);
                continue;
            }
            err[0] = 0;
            int id = engine_submit(s->eng, &j->er, err, sizeof err);
            if (id < 0) {
                pthread_mutex_lock(&j->mu);
                j->submit_failed = true;
                pthread_mutex_unlock(&j->mu);
                job_finish(j, FINISH_ERROR, NULL, err[0] ? err : "request rejected by the engine");
                job_release(j);
                continue;
            }
            pthread_mutex_lock(&j->mu);
            j->engine_id = id;
            if (j->state == JOB_QUEUED) j->state = JOB_RUNNING;
            j->refs++; /* running list */
            pthread_cond_broadcast(&j->cv);
            pthread_mutex_unlock(&j->mu);
            j->rnext = running;
            running = j;
            active++;
        }
        for (job *j = canc, *nx; j; j = nx) {
            nx = j->cnext;
            pthread_mutex_lock(&j->mu);
            bool run = j->state == JOB_RUNNING;
            int id = j->engine_id;
            pthread_mutex_unlock(&j->mu);
            if (run) engine_cancel(s->eng, id);
            job_release(j);
        }
        if (stop) {
            for (job *j = running; j; j = j->rnext) {
                pthread_mutex_lock(&j->mu);
                bool run = j->state == JOB_RUNNING;
                pthread_mutex_unlock(&j->mu);
                if (run) engine_cancel(s->eng, j->engine_id);
            }
            for (int i = 0; i < 64 && engine_step(s->eng) > 0; i++) {}
            for (job *j = running, *nx; j; j = nx) {
                nx = j->rnext;
                pthread_mutex_lock(&j->mu);
                bool done = j->state == JOB_DONE;
                pthread_mutex_unlock(&j->mu);
                if (!done) job_finish(j, FINISH_ABORT, NULL, "server is shutting down"); /* engine ref leaks on purpose: the engine may still hold the pointer */
                job_release(j);
            }
            return NULL;
        }
        active = engine_step(s->eng);   /* with nothing running: expiry and the tiers' completions */
        /* prune finished jobs from the running list */
        for (job **pp = &running; *pp;) {
            job *j = *pp;
            pthread_mutex_lock(&j->mu);
            bool done = j->state == JOB_DONE;
            pthread_mutex_unlock(&j->mu);
            if (done) { *pp = j->rnext; job_release(j); } else pp = &j->rnext;
        }
        if (!running) active = 0;
        engine_stats es;
        engine_get_stats(s->eng, &es);
        gpu_mem gm;
        bool gpu = strcmp(engine_device(s->eng, NULL), "cuda") == 0;
        if (gpu) {   /* the driver's free/total: once a second is plenty */
            static double last_gm;
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            double t = (double)ts.tv_sec + ts.tv_nsec * 1e-9;
            if (t - last_gm < 1.0) gpu = false;
            else { last_gm = t; engine_device(s->eng, &gm); }
        }
        pthread_mutex_lock(&s->m.mu);
        s->m.es = es;
        if (gpu) { s->m.gpu = true; s->m.gm = gm; }
        pthread_mutex_unlock(&s->m.mu);
    }
}

/* ------------------------------------------------------------------------------ CORS */
/* http(s)://localhost, 127.0.0.1 or [::1], with any port: the default allow-list (llama.cpp's). */
static bool origin_is_local(const char *o) {
    const char *h = !strncmp(o, "http://", 7) ? o + 7 : !strncmp(o, "https://", 8) ? o + 8 : NULL;
    if (!h) return false;
    static const char *const hosts[] = { "localhost", "127.0.0.1", "[::1]" };
    for (size_t i = 0; i < sizeof hosts / sizeof *hosts; i++) {
        size_t n = strlen(hosts[i]);
        if (strncasecmp(h, hosts[i], n)) continue;
        const char *q = h + n;
        if (!*q) return true;
        if (*q++ != ':' || !*q) return false;
        while (*q >= '0' && *q <= '9') q++;
        return !*q;
    }
    return false;
}

/* The request's Origin when CORS allows it (to be echoed), else NULL. */
static const char *cors_origin(server *s, struct MHD_Connection *c) {
    const char *o = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Origin");
    if (!o || !*o || strlen(o) > 512 || strpbrk(o, "\r\n")) return NULL;
    if (s->cors_any) return o;
    if (s->n_cors < 0) return origin_is_local(o) ? o : NULL;
    size_t ol = strlen(o);
    while (ol > 0 && o[ol - 1] == '/') ol--;
    for (int i = 0; i < s->n_cors; i++) {
        size_t n = strlen(s->cors[i]);
        while (n > 0 && s->cors[i][n - 1] == '/') n--;
        if (n == ol && !strncasecmp(o, s->cors[i], n)) return o;
    }
    return NULL;
}

/* Access-Control-Allow-Origin (the request's origin, echoed) on a response, when allowed. A
 * disallowed origin gets no CORS headers: the browser then withholds the response, while the
 * request itself is answered as for any other client. */
static void add_cors(server *s, struct MHD_Connection *c, struct MHD_Response *r) {
    if (MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Origin")) MHD_add_response_header(r, "Vary", "Origin");
    const char *o = cors_origin(s, c);
    if (!o) return;
    MHD_add_response_header(r, "Access-Control-Allow-Origin", o);
    MHD_add_response_header(r, "Access-Control-Expose-Headers", "Retry-After, Content-Type");
}

/* ------------------------------------------------------------------------------ responses */
/* Queues body (freed here; NULL: "{}") with the headers its status calls for, plus Retry-After
 * when retry_s > 0 (429/529 queue full, 503 draining), and counts the request. */
static enum MHD_Result reply_ex(server *s, struct MHD_Connection *c, int ep, int status, const char *ctype, char *body,
                                int retry_s) {
    if (!body) { body = strdup("{}"); if (!body) return MHD_NO; }
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    if (!r) { free(body); return MHD_NO; }
    MHD_add_response_header(r, "Content-Type", ctype);
    if (status == 405) MHD_add_response_header(r, "Allow", ep == EP_RESPONSE_ID ? "GET, DELETE, OPTIONS" : ep == EP_HEALTH || ep == EP_METRICS || ep == EP_MODELS ? "GET, HEAD, OPTIONS" : "POST, OPTIONS");
    add_cors(s, c, r);
    enum MHD_Result ret = http_queue(c, status, r, retry_s);
    metrics_request(s, ep, status);
    return ret;
}

static enum MHD_Result reply(server *s, struct MHD_Connection *c, int ep, int status, const char *ctype, char *body) {
    return reply_ex(s, c, ep, status, ctype, body, 0);
}

static enum MHD_Result reply_error(server *s, struct MHD_Connection *c, int ep, bool anthropic, const api_error *e) {
    return reply(s, c, ep, e->status, "application/json", api_format_error(anthropic, e));
}

static enum MHD_Result reply_errv(server *s, struct MHD_Connection *c, int ep, bool anthropic, int status,
                                  const char *type, const char *code, int retry_s, const char *fmt, va_list ap) {
    api_error e;
    api_error_set(&e, status, type, NULL, code, "%s", "");
    vsnprintf(e.message, sizeof e.message, fmt, ap);
    return reply_ex(s, c, ep, status, "application/json", api_format_error(anthropic, &e), retry_s);
}

static enum MHD_Result reply_err(server *s, struct MHD_Connection *c, int ep, bool anthropic, int status,
                                 const char *type, const char *code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    enum MHD_Result ret = reply_errv(s, c, ep, anthropic, status, type, code, 0, fmt, ap);
    va_end(ap);
    return ret;
}

/* An error with a Retry-After header (429/529 queue full, 503 draining). */
static enum MHD_Result reply_retry(server *s, struct MHD_Connection *c, int ep, bool anthropic, int status,
                                   const char *type, const char *code, int retry_s, const char *fmt, ...)
    __attribute__((format(printf, 9, 10)));
static enum MHD_Result reply_retry(server *s, struct MHD_Connection *c, int ep, bool anthropic, int status,
                                   const char *type, const char *code, int retry_s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    enum MHD_Result ret = reply_errv(s, c, ep, anthropic, status, type, code, retry_s, fmt, ap);
    va_end(ap);
    return ret;
}

/* One entry of the model list under the name `id` (the served model or an --alias of it). */
static cJSON *model_entry(server *s, const char *id) {
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "id", id);
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", 0);
    cJSON_AddStringToObject(m, "owned_by", "pcache");
    /* Anthropic's list shape fields too (type, display_name), harmless for OpenAI clients. */
    cJSON_AddStringToObject(m, "type", "model");
    cJSON_AddStringToObject(m, "display_name", id);
    cJSON_AddNumberToObject(m, "context_length", s->n_ctx);
    if (strcmp(id, s->model_id)) cJSON_AddStringToObject(m, "alias_of", s->model_id);
    return m;
}

/* GET /v1/models: the served model first, then its --alias names. */
static char *format_models(server *s) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "object", "list");
    cJSON *data = cJSON_AddArrayToObject(o, "data");
    cJSON_AddItemToArray(data, model_entry(s, s->model_id));
    for (int i = 0; i < s->n_aliases; i++)
        if (strcasecmp(s->aliases[i], s->model_id)) cJSON_AddItemToArray(data, model_entry(s, s->aliases[i]));
    cJSON_AddStringToObject(o, "first_id", s->model_id);
    cJSON_AddStringToObject(o, "last_id", s->n_aliases ? s->aliases[s->n_aliases - 1] : s->model_id);
    cJSON_AddBoolToObject(o, "has_more", 0);
    char *r = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return r;
}


/* GET /health: status, and what a router needs (kvevent.h): the instance id of this process's
 * KV events, the model fingerprint (with Redis or cache tiers) and the requests running or
 * waiting. 503 while draining. */
static enum MHD_Result reply_health(server *s, struct MHD_Connection *c) {
    bool draining = atomic_load(&s->draining);
    char body[192];
    snprintf(body, sizeof body, "{\"status\":\"%s\",\"instance\":\"%s\"%s%s%s,\"queue\":%d}", draining ? "draining" : "ok",
             s->instance, s->fingerprint[0] ? ",\"fingerprint\":\"" : "", s->fingerprint, s->fingerprint[0] ? "\"" : "", in_flight(s));
    return reply(s, c, EP_HEALTH, draining ? 503 : 200, "application/json", strdup(body));
}

/* The cluster's Redis client (--redis). */
static void format_redis_metrics(obuf *b, const engine_stats *es) {
    const kvredis_stats *r = &es->redis;
#define GAUGE(name, help, fmt, v) ob_printf(b, "# HELP pcache_redis_" name " " help "\n# TYPE pcache_redis_" name " gauge\npcache_redis_" name " " fmt "\n", v);
#define COUNTER(name, help, v) ob_printf(b, "# HELP pcache_redis_" name " " help "\n# TYPE pcache_redis_" name " counter\npcache_redis_" name " %llu\n", (unsigned long long)(v));
    GAUGE("connected", "1 while connected to Redis.", "%d", r->connected ? 1 : 0)
    COUNTER("reconnects_total", "Connections to Redis made again after one was lost or refused.", r->connects > 1 ? r->connects - 1 : 0)
    COUNTER("errors_total", "Failed connects and commands (timeouts included) and error replies.", r->errors)
    COUNTER("events_published_total", "KV events appended to the cluster's stream.", r->events_published)
    COUNTER("events_dropped_total", "KV events not published (Redis down, queue full, error).", r->events_dropped)
    COUNTER("blocks_written_total", "KV blocks written through to the shared tier.", r->blocks_written)
    COUNTER("bytes_written_total", "Bytes of the records written.", r->bytes_written)
    COUNTER("writes_dropped_total", "KV blocks not written (Redis down, queue full).", r->writes_dropped)
    COUNTER("blocks_read_total", "KV blocks loaded from the shared tier (verified).", r->blocks_read)
    COUNTER("bytes_read_total", "Bytes of the records loaded.", r->bytes_read)
    COUNTER("read_hits_total", "Blocks asked for and found good.", r->read_hits)
    COUNTER("read_misses_total", "Blocks asked for and absent.", r->read_misses)
    COUNTER("bad_records_total", "Records refused: checksum, size, model, layout, namespace, chain or tokens.", r->bad_records)
    COUNTER("touches_total", "Records whose lifetime a cache hit extended.", r->touches)
    COUNTER("hits_total", "Requests that loaded cached blocks from Redis.", es->redis_hits)
    COUNTER("tokens_served_total", "Prompt tokens loaded from Redis instead of computed.", es->redis_tokens)
    ob_printf(b, "# HELP pcache_redis_decisions_total Local misses Redis might serve: fetched (the transfer was cheaper) or computed.\n"
                 "# TYPE pcache_redis_decisions_total counter\npcache_redis_decisions_total{decision=\"fetch\"} %llu\n"
                 "pcache_redis_decisions_total{decision=\"compute\"} %llu\n",
              (unsigned long long)es->redis_fetches, (unsigned long long)es->redis_computes);
    GAUGE("announced_blocks", "Full KV blocks announced to the cluster as held here.", "%d", es->redis_announced)
    GAUGE("write_queue", "KV blocks waiting to be written to Redis.", "%d", r->write_queue_depth)
    GAUGE("rtt_seconds", "Estimated round trip to Redis.", "%.6f", r->rtt_s)
    GAUGE("block_seconds", "Estimated time to fetch and load one KV block from Redis.", "%.6f", r->block_s)
    ob_printf(b, "# HELP pcache_prefill_seconds_per_token Measured prefill time per token (moving average).\n"
                 "# TYPE pcache_prefill_seconds_per_token gauge\npcache_prefill_seconds_per_token %.6f\n", es->prefill_tok_s);
#undef GAUGE
#undef COUNTER
}

static char *format_metrics(server *s) {
    metrics m;
    pthread_mutex_lock(&s->m.mu);
    memcpy(&m, &s->m, sizeof m); /* the copied mutex is never used */
    pthread_mutex_unlock(&s->m.mu);
    engine_redis_stats(s->eng, &m.es.redis);   /* live: the engine thread may be in a long step */
    obuf b = {0};
    ob_printf(&b, "# HELP pcache_requests_total HTTP requests by endpoint and status.\n# TYPE pcache_requests_total counter\n");
    for (int e = 0; e < EP_N; e++)
        for (int i = 0; i < N_STATUS && m.req[e][i].status; i++)
            ob_printf(&b, "pcache_requests_total{endpoint=\"%s\",status=\"%d\"} %llu\n", ep_names[e], m.req[e][i].status,
                      (unsigned long long)m.req[e][i].n);
    ob_printf(&b, "# HELP pcache_ttft_seconds Time from submit to the first generated token.\n# TYPE pcache_ttft_seconds histogram\n");
    uint64_t cum = 0;
    for (int i = 0; i < N_TTFT; i++) { cum += m.ttft[i]; ob_printf(&b, "pcache_ttft_seconds_bucket{le=\"%g\"} %llu\n", ttft_bounds[i], (unsigned long long)cum); }
    ob_printf(&b, "pcache_ttft_seconds_bucket{le=\"+Inf\"} %llu\npcache_ttft_seconds_sum %.6f\npcache_ttft_seconds_count %llu\n",
              (unsigned long long)m.ttft_n, m.ttft_sum, (unsigned long long)m.ttft_n);
    ob_printf(&b, "# HELP pcache_decode_tokens_per_second Per-request decode speed.\n# TYPE pcache_decode_tokens_per_second histogram\n");
    cum = 0;
    for (int i = 0; i < N_TPS; i++) { cum += m.tps[i]; ob_printf(&b, "pcache_decode_tokens_per_second_bucket{le=\"%g\"} %llu\n", tps_bounds[i], (unsigned long long)cum); }
    ob_printf(&b, "pcache_decode_tokens_per_second_bucket{le=\"+Inf\"} %llu\npcache_decode_tokens_per_second_sum %.3f\npcache_decode_tokens_per_second_count %llu\n",
              (unsigned long long)m.tps_n, m.tps_sum, (unsigned long long)m.tps_n);
    ob_printf(&b, "# HELP pcache_prompt_tokens_total Prompt tokens of finished requests.\n# TYPE pcache_prompt_tokens_total counter\npcache_prompt_tokens_total %llu\n", (unsigned long long)m.prompt_tokens);
    ob_printf(&b, "# HELP pcache_cache_hit_tokens_total Prompt tokens read from the prefix cache.\n# TYPE pcache_cache_hit_tokens_total counter\npcache_cache_hit_tokens_total %llu\n", (unsigned long long)m.hit_tokens);
    ob_printf(&b, "# HELP pcache_cache_miss_tokens_total Prompt tokens computed.\n# TYPE pcache_cache_miss_tokens_total counter\npcache_cache_miss_tokens_total %llu\n", (unsigned long long)m.miss_tokens);
    ob_printf(&b, "# HELP pcache_cache_write_tokens_total Prompt tokens written to the cache by breakpoints.\n# TYPE pcache_cache_write_tokens_total counter\npcache_cache_write_tokens_total %llu\n", (unsigned long long)m.cache_write_tokens);
    ob_printf(&b, "# HELP pcache_completion_tokens_total Generated tokens.\n# TYPE pcache_completion_tokens_total counter\npcache_completion_tokens_total %llu\n", (unsigned long long)m.completion_tokens);
    ob_printf(&b, "# HELP pcache_cache_evictions_total Cache entries evicted.\n# TYPE pcache_cache_evictions_total counter\npcache_cache_evictions_total %llu\n", (unsigned long long)m.es.evictions);
    ob_printf(&b, "# HELP pcache_kv_blocks_used KV blocks in use.\n# TYPE pcache_kv_blocks_used gauge\npcache_kv_blocks_used %d\n", m.es.kv_blocks_used);
    ob_printf(&b, "# HELP pcache_cache_blocks KV blocks held by the prompt cache (when idle, every used block is one).\n# TYPE pcache_cache_blocks gauge\npcache_cache_blocks %d\n", m.es.cache_blocks);
    ob_printf(&b, "# HELP pcache_kv_blocks_free KV blocks free.\n# TYPE pcache_kv_blocks_free gauge\npcache_kv_blocks_free %d\n", m.es.kv_blocks_free);
    ob_printf(&b, "# HELP pcache_kv_blocks_total KV blocks in the pool.\n# TYPE pcache_kv_blocks_total gauge\npcache_kv_blocks_total %d\n", m.es.kv_blocks_total);
    ob_printf(&b, "# HELP pcache_active_requests Requests being served.\n# TYPE pcache_active_requests gauge\npcache_active_requests %d\n", m.active);
    ob_printf(&b, "# HELP pcache_active_sequences Sequences in the engine.\n# TYPE pcache_active_sequences gauge\npcache_active_sequences %d\n", m.es.active_seqs);
    ob_printf(&b, "# HELP pcache_queue_depth Requests waiting for their prompt to start (KV blocks or a batch slot).\n# TYPE pcache_queue_depth gauge\npcache_queue_depth %d\n", atomic_load(&s->waiting));
    ob_printf(&b, "# HELP pcache_queued_sequences Sequences queued in the engine, preempted ones included.\n# TYPE pcache_queued_sequences gauge\npcache_queued_sequences %d\n", m.es.queued_seqs);
    ob_printf(&b, "# HELP pcache_preemptions_total Running sequences sent back to the queue for KV blocks.\n# TYPE pcache_preemptions_total counter\npcache_preemptions_total %llu\n", (unsigned long long)m.es.preemptions);
    ob_printf(&b, "# HELP pcache_queue_rejections_total Requests refused because the queue was full.\n# TYPE pcache_queue_rejections_total counter\npcache_queue_rejections_total %llu\n", (unsigned long long)m.queue_full);
    if (m.gpu) {
        ob_printf(&b, "# HELP pcache_gpu_memory_bytes GPU memory by use (weights, kv, scratch; free and total from the driver).\n# TYPE pcache_gpu_memory_bytes gauge\n");
        ob_printf(&b, "pcache_gpu_memory_bytes{use=\"weights\"} %zu\npcache_gpu_memory_bytes{use=\"kv\"} %zu\npcache_gpu_memory_bytes{use=\"scratch\"} %zu\n"
                      "pcache_gpu_memory_bytes{use=\"free\"} %zu\npcache_gpu_memory_bytes{use=\"total\"} %zu\n",
                  m.gm.weights, m.gm.kv, m.gm.scratch, m.gm.free, m.gm.total);
    }
    if (m.es.tier_on[1] || m.es.tier_on[2]) {
        static const char *tn[3] = { "pool", "host", "disk" };
        int t0 = m.es.tier_on[1] ? 1 : 2, t1 = m.es.tier_on[2] ? 2 : 1;
        ob_printf(&b, "# HELP pcache_cache_tier_blocks KV blocks held by each cache tier.\n# TYPE pcache_cache_tier_blocks gauge\n");
        ob_printf(&b, "pcache_cache_tier_blocks{tier=\"pool\"} %d\n", m.es.cache_blocks);
        for (int t = t0; t <= t1; t++) ob_printf(&b, "pcache_cache_tier_blocks{tier=\"%s\"} %llu\n", tn[t], (unsigned long long)m.es.tier[t].blocks);
        ob_printf(&b, "# HELP pcache_cache_tier_bytes Bytes held by each cache tier.\n# TYPE pcache_cache_tier_bytes gauge\n");
        for (int t = t0; t <= t1; t++) ob_printf(&b, "pcache_cache_tier_bytes{tier=\"%s\"} %llu\n", tn[t], (unsigned long long)m.es.tier[t].bytes);
#define TIER_COUNTER(name, help, field)                                                                             \
        ob_printf(&b, "# HELP pcache_cache_tier_" name " " help "\n# TYPE pcache_cache_tier_" name " counter\n");     \
        for (int t = t0; t <= t1; t++)                                                                              \
            ob_printf(&b, "pcache_cache_tier_" name "{tier=\"%s\"} %llu\n", tn[t], (unsigned long long)m.es.tier[t].field);
        TIER_COUNTER("hits_total", "Admissions that loaded cached blocks from the tier.", hits)
        TIER_COUNTER("tokens_served_total", "Prompt tokens loaded from the tier instead of computed.", tokens_served)
        TIER_COUNTER("promotions_total", "Blocks loaded from the tier into the KV pool.", promotions)
        TIER_COUNTER("demotions_total", "Blocks written into the tier (write-through).", demotions)
        TIER_COUNTER("checksum_failures_total", "Records refused: checksum, truncation, another model or layout (deleted).", bad_files)
        TIER_COUNTER("write_errors_total", "Failed writes.", write_errors)
        TIER_COUNTER("expired_total", "Blocks dropped at their expiry.", expired)
        TIER_COUNTER("evictions_total", "Blocks evicted by the tier's size bound.", evicted)
#undef TIER_COUNTER
        ob_printf(&b, "# HELP pcache_cache_tier_read_seconds Time to read one block from the tier into the pool.\n# TYPE pcache_cache_tier_read_seconds summary\n");
        for (int t = t0; t <= t1; t++)
            ob_printf(&b, "pcache_cache_tier_read_seconds_sum{tier=\"%s\"} %.6f\npcache_cache_tier_read_seconds_count{tier=\"%s\"} %llu\n",
                      tn[t], m.es.tier[t].read_s, tn[t], (unsigned long long)m.es.tier[t].read_n);
        ob_printf(&b, "# HELP pcache_cache_tier_write_seconds Time to write one block into the tier.\n# TYPE pcache_cache_tier_write_seconds summary\n");
        for (int t = t0; t <= t1; t++)
            ob_printf(&b, "pcache_cache_tier_write_seconds_sum{tier=\"%s\"} %.6f\npcache_cache_tier_write_seconds_count{tier=\"%s\"} %llu\n",
                      tn[t], m.es.tier[t].write_s, tn[t], (unsigned long long)m.es.tier[t].write_n);
        ob_printf(&b, "# HELP pcache_cache_tier_dropped_writes_total Blocks not written down: the write queue was full.\n# TYPE pcache_cache_tier_dropped_writes_total counter\npcache_cache_tier_dropped_writes_total %llu\n",
                  (unsigned long long)m.es.tier_writes_dropped);
        ob_printf(&b, "# HELP pcache_cache_tier_write_queue Blocks waiting to be written down.\n# TYPE pcache_cache_tier_write_queue gauge\npcache_cache_tier_write_queue %d\n", m.es.tier_queue_depth);
        ob_printf(&b, "# HELP pcache_cache_tier_loads_total Requests that waited for blocks loaded from a lower tier.\n# TYPE pcache_cache_tier_loads_total counter\npcache_cache_tier_loads_total %llu\n",
                  (unsigned long long)m.es.tier_loads);
    }
    if (m.es.redis_on) format_redis_metrics(&b, &m.es);
    ob_printf(&b, "# HELP pcache_draining 1 while the server drains for shutdown.\n# TYPE pcache_draining gauge\npcache_draining %d\n", atomic_load(&s->draining) ? 1 : 0);

    return b.p ? b.p : strdup("");
}

/* ------------------------------------------------------------------------------ streaming */
/* ------------------------------------------------------------------------------ tool calls */
/* Ids for the calls parsed so far (each made once). false: out of memory. */
static bool job_call_ids(job *j) {
    if (j->n_call_ids >= j->tp.n_calls) return true;
    char (*ids)[40] = realloc(j->call_ids, (size_t)j->tp.n_calls * sizeof *ids);
    if (!ids) return false;
    j->call_ids = ids;
    for (; j->n_call_ids < j->tp.n_calls; j->n_call_ids++)
        api_tool_call_id(ids[j->n_call_ids], api_is_anthropic(j->req.kind), next_rand(j->srv), next_rand(j->srv));
    return true;
}

/* The parsed calls as the API formatter takes them (pointers into the parser; caller frees). */
static api_tool_call *job_calls(job *j) {
    api_tool_call *c = calloc((size_t)j->tp.n_calls + 1, sizeof *c);
    if (!c || !job_call_ids(j)) { free(c); return NULL; }
    for (int i = 0; i < j->tp.n_calls; i++) {
        c[i].id = j->call_ids[i];
        c[i].name = j->tp.calls[i].name;
        c[i].arguments = j->tp.calls[i].arguments;
    }
    return c;
}

/* Streaming: feeds new output to the parser and formats what it released, in order: content up
 * to each new call, the call, the content after it. Connection thread, under j->mu. */
static char *tool_stream_events(job *j, api_result *res, const char *text, size_t len, bool final) {
    int before = j->tp.n_calls;
    if (!toolcall_feed(&j->tp, text, len, final)) return NULL;
    api_tool_call *calls = job_calls(j);
    if (!calls) return NULL;
    char *out = strdup("");
    for (int i = before; i <= j->tp.n_calls && out; i++) {
        size_t upto = i < j->tp.n_calls ? j->tp.calls[i].at : j->tp.n_content;
        char *a = NULL, *b = NULL;
        if (upto > j->content_sent) {
            a = api_format_stream_text(&j->req, res, &j->st, j->tp.content + j->content_sent, upto - j->content_sent);
            j->content_sent = upto;
            res->n_lps = 0;   /* logprobs go with the first text after them */
        }
        if (i < j->tp.n_calls) b = api_format_stream_call(&j->req, res, &j->st, &calls[i]);
        size_t n0 = strlen(out), na = a ? strlen(a) : 0, nb = b ? strlen(b) : 0;
        char *o = realloc(out, n0 + na + nb + 1);
        if (o) { memcpy(o + n0, a ? a : "", na); memcpy(o + n0 + na, b ? b : "", nb); o[n0 + na + nb] = 0; }
        else free(out);
        out = o;
        free(a);
        free(b);
    }
    free(calls);
    return out;
}

/* Whether the reply starts inside a <think> block: what follows the generation prompt (the
 * template's "<think>\n", then an Anthropic prefill) opens one and does not close it. */
static bool reply_starts_inside(const server *s, const api_request *r) {
    const char *sfx = chat_think_suffix(&s->think, r->no_thinking);
    const char *pre = r->assistant_prefill && r->n_msgs > 0 ? r->msgs[r->n_msgs - 1].content : "";
    size_t a = strlen(sfx), b = strlen(pre);
    char *tail = malloc(a + b + 1);
    if (!tail) return false;
    memcpy(tail, sfx, a);
    memcpy(tail + a, pre, b + 1);
    const char *open = NULL;
    for (const char *p = tail; (p = strstr(p, REASONING_OPEN)) != NULL; p++) open = p;
    const bool inside = open && !strstr(open, REASONING_CLOSE);
    free(tail);
    return inside;
}

/* The reasoning of a finished output (rp fed to the end) into res, with the number of generated
 * tokens that wrote the block: all of them when it never closed, else those whose text reaches
 * the end of its </think> (detokenized as the engine did, so the byte counts agree). Under j->mu
 * or after the job is done. */
static void job_reasoning_result(job *j, api_result *res) {
    res->reasoning = j->rp.reasoning ? j->rp.reasoning : "";
    res->reasoning_len = j->rp.n_reasoning;
    int k = 0;
    if (j->rp.reasoning_end > 0 && j->rp.reasoning_end >= j->rp.fed) k = j->n_gen;
    else {
        detok_state ds = { 0 };
        char buf[256];
        for (size_t acc = 0; k < j->n_gen && acc < j->rp.reasoning_end; k++)
            acc += detok_feed(j->srv->tok, &ds, j->gen[k], buf, sizeof buf);
    }
    res->reasoning_tokens = k;
}

/* Streaming with reasoning or tools: feeds new output to the splitter (req.think) and formats
 * the reasoning it released, then passes the new content on (to the tool-call parser when
 * tools_on) and formats that. Connection thread, under j->mu. */
static char *stream_events(job *j, api_result *res, const char *text, size_t len, bool final) {
    char *head = strdup("");
    if (!head) return NULL;
    if (j->req.think) {
        free(head);
        if (!reasoning_feed(&j->rp, text, len, final)) return NULL;
        res->reasoning = j->rp.reasoning ? j->rp.reasoning : "";
        res->reasoning_len = j->rp.n_reasoning;
        if (!(head = api_format_stream_reasoning(&j->req, res, &j->st))) return NULL;
        if (*head) res->n_lps = 0;   /* logprobs go with the first chunk after them */
        text = j->rp.content ? j->rp.content + j->rp_used : "";
        len = j->rp.n_content - j->rp_used;
        j->rp_used = j->rp.n_content;
    }
    char *tail = j->tools_on ? tool_stream_events(j, res, text, len, final)
                 : len ? api_format_stream_text(&j->req, res, &j->st, text, len) : strdup("");
    if (!tail) { free(head); return NULL; }
    size_t a = strlen(head), b = strlen(tail);
    char *out = realloc(head, a + b + 1);
    if (out) memcpy(out + a, tail, b + 1);
    else free(head);
    free(tail);
    return out;
}

/* The grammar of the request's tool calls: forced calls (tool_choice required / named, Anthropic
 * any / tool) from the first token; with tool_choice auto and a strict function, free text then
 * constrained calls. Strict functions' schemas must compile (else a 400 naming the keyword);
 * others fall back to any JSON object when their schema is beyond the supported subset. NULL
 * and err empty: no grammar needed. */
static grammar *tool_grammar(server *s, const api_request *r, toolfmt fmt, char *err, size_t errlen) {
    err[0] = 0;
    bool forced = r->tool_choice == API_TOOL_REQUIRED || r->tool_choice == API_TOOL_NAMED, strict = false;
    for (int i = 0; i < r->n_tools; i++) strict |= r->tools[i].strict;
    if (!forced && !strict) return NULL;
    toolcall_tool *tt = calloc((size_t)r->n_tools, sizeof *tt);
    cJSON **schemas = calloc((size_t)r->n_tools, sizeof *schemas);
    grammar *g = NULL;
    int n = 0;
    if (!tt || !schemas) { errf(err, errlen, "out of memory"); goto done; }
    for (int i = 0; i < r->n_tools; i++) {
        const api_tool *t = &r->tools[i];
        if (r->tool_choice == API_TOOL_NAMED && strcmp(t->name, r->tool_name)) continue;
        cJSON *sc = t->parameters ? cJSON_Parse(t->parameters) : NULL;
        if (sc && !t->strict) {   /* does it compile on its own? */
            char e2[256];
            grammar *probe = jsonschema_compile(sc, e2, sizeof e2);
            if (!probe) { cJSON_Delete(sc); sc = NULL; }
            grammar_unref(probe);
        }
        schemas[n] = sc;
        tt[n].name = t->name;
        tt[n].parameters = sc;
        n++;
    }
    g = toolcall_grammar(fmt, tt, n, forced ? TOOLCALL_FORCED : TOOLCALL_LAZY, r->parallel_tool_calls, err, errlen);
done:
    for (int i = 0; i < n; i++) cJSON_Delete(schemas[i]);
    free(schemas);
    free(tt);
    (void)s;
    return g;
}

/* ------------------------------------------------------------------------------ generation */
static void job_result(job *j, api_result *res) {
    memset(res, 0, sizeof *res);
    res->id = j->id;
    res->created = j->created;
    res->model = j->srv->model_id;
    res->text = j->text ? j->text : "";
    res->text_len = j->text_len;
    res->why = j->why;
#ifdef ENGINE_USAGE_HAS_STOP_MATCHED
    res->stop_matched = j->usage.stop_matched;
#endif
    res->usage = &j->usage;
    res->lps = j->lps;
    res->n_lps = j->n_lps;
    res->tok_text = token_text;
    res->tok_ctx = (void *)j->srv->tok;
}

/* Responses: keeps a finished response (store: true) with its conversation, the tokens of its
 * prompt and output and the text they render, until its cache entry would expire. res holds the
 * content outside calls and the calls. Connection thread. */
static void store_response(job *j, const api_result *res, int msg_item) {
    server *s = j->srv;
    if (j->req.kind != API_OPENAI_RESPONSES || !j->req.store || j->why == FINISH_ERROR || j->why == FINISH_ABORT) return;
    char *out = api_responses_output_items(&j->req, res, msg_item);
    cJSON *items = cJSON_Parse(j->req.items ? j->req.items : "[]"), *outs = out ? cJSON_Parse(out) : NULL;
    free(out);
    if (!items || !outs) { cJSON_Delete(items); cJSON_Delete(outs); return; }
    for (cJSON *x = outs->child; x;) {
        cJSON *next = x->next;
        cJSON_AddItemToArray(items, cJSON_DetachItemViaPointer(outs, x));
        x = next;
    }
    cJSON_Delete(outs);
    resp_entry e = { 0 };
    e.items = cJSON_PrintUnformatted(items);
    cJSON_Delete(items);
    e.body = api_format_response(&j->req, res);
    pthread_mutex_lock(&j->mu);
    /* the exact continuation: the prompt's text and tokens, then the output's (when the text is
     * what the tokens render: not cut by a stop string) */
    if (j->prompt_text && j->usage.stop_matched == 0 && j->gen) {
        size_t a = strlen(j->prompt_text);
        if ((e.prefix = malloc(a + j->text_len + 1))) {
            memcpy(e.prefix, j->prompt_text, a);
            if (j->text_len) memcpy(e.prefix + a, j->text, j->text_len);
            e.prefix[a + j->text_len] = 0;
        }
        if ((e.tokens = malloc(((size_t)j->n_prompt + (size_t)j->n_gen) * sizeof *e.tokens))) {
            memcpy(e.tokens, j->prompt, (size_t)j->n_prompt * sizeof *e.tokens);
            memcpy(e.tokens + j->n_prompt, j->gen, (size_t)j->n_gen * sizeof *e.tokens);
            e.n_tokens = j->n_prompt + j->n_gen;
        }
        if (!e.prefix || !e.tokens) { free(e.prefix); free(e.tokens); e.prefix = NULL; e.tokens = NULL; e.n_tokens = 0; }
    }
    pthread_mutex_unlock(&j->mu);
    if (e.items && e.body) respstore_put(s->responses, j->id, j->owner, now_mono() + s->cache_ttl, &e);
    resp_entry_free(&e);
}

static char *stream_error_event(job *j, const char *msg) {
    return api_format_stream_error(api_is_anthropic(j->req.kind), msg);
}

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    job *j = cls;
    for (;;) {
        if (j->pend && j->pend_off < j->pend_len) {
            size_t n = j->pend_len - j->pend_off;
            if (n > max) n = max;
            memcpy(buf, j->pend + j->pend_off, n);
            j->pend_off += n;
            return (ssize_t)n;
        }
        free(j->pend);
        j->pend = NULL;
        j->pend_len = j->pend_off = 0;
        if (j->phase == 2) return MHD_CONTENT_READER_END_OF_STREAM;
        api_result res;
        if (j->phase == 0) {
            /* message_start carries the prompt's cache split: wait until the engine knows it */
            pthread_mutex_lock(&j->mu);
            while (!j->started && j->state != JOB_DONE) {
                job_wait(j, 250);
                if (!j->started && j->state != JOB_DONE && http_peer_gone(j->fd)) {
                    pthread_mutex_unlock(&j->mu);
                    return MHD_CONTENT_READER_END_WITH_ERROR;
                }
            }
            job_result(j, &res);
            if (!j->started) res.usage = NULL;
            j->pend = api_format_stream_start(&j->req, &res, j->n_prompt);
            pthread_mutex_unlock(&j->mu);
            j->phase = 1;
        } else {
            pthread_mutex_lock(&j->mu);
            while (j->text_len == j->sent && j->state != JOB_DONE) {
                job_wait(j, 250);
                if (j->text_len == j->sent && j->state != JOB_DONE && http_peer_gone(j->fd)) {
                    pthread_mutex_unlock(&j->mu);
                    return MHD_CONTENT_READER_END_WITH_ERROR;
                }
            }
            job_result(j, &res);
            if (j->text_len > j->sent) {
                res.lps = j->lps + j->lps_sent;        /* the tokens since the last delta */
                res.n_lps = j->n_lps - j->lps_sent;
                res.text_offset0 = j->lp_off;
                for (int i = 0; i < res.n_lps; i++) {
                    size_t pl = 0;
                    tokenizer_piece(j->srv->tok, res.lps[i].token, true, &pl);
                    j->lp_off += pl;
                }
                j->lps_sent = j->n_lps;
                if (j->tools_on || j->req.think) j->pend = stream_events(j, &res, j->text + j->sent, j->text_len - j->sent, false);
                else if (j->req.kind == API_OPENAI_RESPONSES)
                    j->pend = api_format_stream_text(&j->req, &res, &j->st, j->text + j->sent, j->text_len - j->sent);
                else j->pend = api_format_stream_delta(&j->req, &res, j->text + j->sent, j->text_len - j->sent);
                j->sent = j->text_len;
            } else {
                if (j->why == FINISH_ERROR || j->why == FINISH_ABORT) {
                    char *ev = stream_error_event(j, j->errmsg[0] ? j->errmsg
                                                     : atomic_load(&j->srv->draining) ? "server is shutting down"
                                                                                      : "generation failed");
                    char *end = api_is_anthropic(j->req.kind) ? NULL : strdup("data: [DONE]\n\n");
                    size_t a = ev ? strlen(ev) : 0, b = end ? strlen(end) : 0;
                    j->pend = malloc(a + b + 1);
                    if (j->pend) { memcpy(j->pend, ev ? ev : "", a); memcpy(j->pend + a, end ? end : "", b); j->pend[a + b] = 0; }
                    free(ev); free(end);
                } else if (j->tools_on || j->req.think) {
                    res.n_lps = 0;
                    char *tail = stream_events(j, &res, "", 0, true);
                    if (j->req.think) {   /* the final response's content: after the reasoning */
                        job_reasoning_result(j, &res);
                        res.text = j->rp.content ? j->rp.content : "";
                        res.text_len = j->rp.n_content;
                    }
                    res.n_calls = j->tools_on ? j->tp.n_calls : 0;
                    api_tool_call *calls = j->tools_on && j->req.kind == API_OPENAI_RESPONSES ? job_calls(j) : NULL;
                    if (calls) {   /* the final response lists the content and the calls */
                        res.text = j->tp.content ? j->tp.content : "";
                        res.text_len = j->tp.n_content;
                        res.calls = calls;
                    }
                    char *fin = tail ? api_format_stream_finish(&j->req, &res, &j->st) : NULL;
                    pthread_mutex_unlock(&j->mu);
                    store_response(j, &res, j->st.msg_item);
                    pthread_mutex_lock(&j->mu);
                    free(calls);
                    if (tail && fin) {
                        size_t a = strlen(tail), b = strlen(fin);
                        if ((j->pend = malloc(a + b + 1))) { memcpy(j->pend, tail, a); memcpy(j->pend + a, fin, b + 1); }
                    }
                    free(tail);
                    free(fin);
                } else if (j->req.kind == API_OPENAI_RESPONSES) {
                    res.n_lps = 0;
                    j->pend = api_format_stream_finish(&j->req, &res, &j->st);
                    pthread_mutex_unlock(&j->mu);
                    store_response(j, &res, j->st.msg_item);
                    pthread_mutex_lock(&j->mu);
                } else {
                    j->pend = api_format_stream_end(&j->req, &res);
                }
                j->phase = 2;
            }
            pthread_mutex_unlock(&j->mu);
        }
        if (!j->pend) return MHD_CONTENT_READER_END_WITH_ERROR;
        j->pend_len = strlen(j->pend);
    }
}

static void stream_free(void *cls) { job_release(cls); }

/* The served model's own names: its GGUF general.name, its file name (with or without .gguf),
 * "default" and each --alias. Returns the alias matched (to name a /models/{alias} entry), the
 * model id for the others, NULL for an unknown name. */
static const char *model_known(server *s, const char *name) {
    if (!strcasecmp(name, s->model_id) || !strcasecmp(name, s->model_file) || !strcasecmp(name, s->model_stem) ||
        !strcasecmp(name, "default"))
        return s->model_id;
    for (int i = 0; i < s->n_aliases; i++)
        if (!strcasecmp(name, s->aliases[i])) return s->aliases[i];
    return NULL;
}

/* Whether a request naming `name` (NULL: none) is served: always, with one model loaded, unless
 * --strict-model, which wants one of the model's own names. */
static bool model_ok(server *s, const char *name) {
    if (!s->strict_model) return true;
    return name && model_known(s, name);
}

/* A prompt of n tokens that, with max_tokens (or one generated token when it is not given), does
 * not fit the context: 400 worded as each API words it, so clients recognize it (OpenAI's code
 * context_length_exceeded; Anthropic's "prompt is too long" and its max_tokens message). */
static enum MHD_Result reply_too_long(server *s, struct MHD_Connection *c, int ep, const api_request *r, int n) {
    int ctx = s->n_ctx, mt = r->max_tokens > 0 ? r->max_tokens : 0;
    long long total = (long long)n + (mt ? mt : 1);
    if (api_is_anthropic(r->kind)) {
        if (n >= ctx)
            return reply_err(s, c, ep, true, 400, "invalid_request_error", NULL, "prompt is too long: %d tokens > %d maximum", n, ctx - 1);
        return reply_err(s, c, ep, true, 400, "invalid_request_error", NULL,
                         "input length and `max_tokens` exceed context limit: %d + %d > %d, decrease input length or `max_tokens` and try again",
                         n, mt, ctx);
    }
    api_error e;
    if (r->kind == API_OPENAI_CHAT && !mt)
        api_error_set(&e, 400, "invalid_request_error", "messages", "context_length_exceeded",
                      "This model's maximum context length is %d tokens. However, your messages resulted in %d tokens. "
                      "Please reduce the length of the messages.", ctx, n);
    else if (r->kind == API_OPENAI_CHAT)
        api_error_set(&e, 400, "invalid_request_error", "messages", "context_length_exceeded",
                      "This model's maximum context length is %d tokens. However, you requested %lld tokens (%d in the messages, "
                      "%d in the completion). Please reduce the length of the messages or completion.", ctx, total, n, mt);
    else
        api_error_set(&e, 400, "invalid_request_error", "prompt", "context_length_exceeded",
                      "This model's maximum context length is %d tokens, however you requested %lld tokens (%d in your prompt; "
                      "%d for the completion). Please reduce your prompt; or completion length.", ctx, total, n, mt ? mt : 1);
    return reply_error(s, c, ep, false, &e);
}

static enum MHD_Result handle_generate(server *s, struct MHD_Connection *c, conn *cs) {
    static const api_kind kinds[] = { [EP_CHAT] = API_OPENAI_CHAT, [EP_COMPLETIONS] = API_OPENAI_COMPLETION,
                                      [EP_MESSAGES] = API_ANTHROPIC_MESSAGES, [EP_COUNT_TOKENS] = API_ANTHROPIC_COUNT_TOKENS,
                                      [EP_RESPONSES] = API_OPENAI_RESPONSES };
    bool anth = cs->anthropic;
    api_error e;
    memset(&e, 0, sizeof e);
    job *j = calloc(1, sizeof *j);
    if (!j) return reply_err(s, c, cs->ep, anth, 500, anth ? "api_error" : "server_error", NULL, "out of memory");
    pthread_mutex_init(&j->mu, NULL);
    pthread_cond_init(&j->cv, NULL);
    j->refs = 1;
    j->srv = s;
    j->fd = -1;
    enum MHD_Result ret;
    resp_entry prev = { 0 };   /* Responses: the conversation continued (previous_response_id) */
    if (prompt_parse(kinds[cs->ep], cs->in.body, cs->in.len, &j->req, &e) < 0) {
        ret = reply_error(s, c, cs->ep, anth, &e);
        goto out;
    }
    if (!j->req.model && !model_ok(s, NULL)) {
        api_error_set(&e, 400, "invalid_request_error", "model", "missing_required_parameter", "model: Field required");
        ret = reply_error(s, c, cs->ep, anth, &e);
        goto out;
    }
    if (!model_ok(s, j->req.model)) {
        if (anth) ret = reply_err(s, c, cs->ep, true, 404, "not_found_error", NULL, "model: %.200s", j->req.model);
        else {
            api_error_set(&e, 404, "invalid_request_error", "model", "model_not_found",
                          "The model `%.200s` does not exist or you do not have access to it.", j->req.model);
            ret = reply_error(s, c, cs->ep, false, &e);
        }
        goto out;
    }
    if (j->req.want_thinking && !s->think.thinks) {
        api_error_set(&e, 400, "invalid_request_error", j->req.want_thinking, "unsupported_parameter",
                      "%s: the model does not reason (its chat template writes no <think> blocks)", j->req.want_thinking);
        ret = reply_error(s, c, cs->ep, anth, &e);
        goto out;
    }
    prompt_namespace(cs->ns, j->req.cache_salt, j->ns);
    memcpy(j->owner, cs->ns, sizeof j->owner);
    if (j->req.kind == API_OPENAI_RESPONSES && j->req.prev_id) {
        char pid[128];
        snprintf(pid, sizeof pid, "%s", j->req.prev_id);
        const double now = now_mono();
        if (!respstore_get(s->responses, pid, cs->ns, now, now + s->cache_ttl, &prev)) {
            api_error_set(&e, 404, "invalid_request_error", "previous_response_id", "previous_response_not_found",
                          "Previous response with id '%.100s' not found.", pid);
            ret = reply_error(s, c, cs->ep, false, &e);
            goto out;
        }
        api_request_free(&j->req);   /* again, after the stored conversation */
        if (api_parse_responses(cs->in.body, cs->in.len, prev.items, &j->req, &e) < 0) {
            resp_entry_free(&prev);
            ret = reply_error(s, c, cs->ep, false, &e);
            goto out;
        }
    }
    /* The prompt's tokens (prompt.c: the router tokenizes requests with the same function). */
    rendered_prompt pr;
    const prompt_prev pv = { prev.prefix, prev.tokens, prev.n_tokens };
    if (prompt_tokens(&s->pm, &j->req, &pv, &pr, &e) < 0) {
        ret = reply_error(s, c, cs->ep, anth, &e);
        goto out;
    }
    const int n = pr.n;
    const bool add_bos = pr.add_bos;
    j->prompt = pr.tokens;
    if (j->req.kind == API_OPENAI_RESPONSES) j->prompt_text = pr.text;
    else free(pr.text);
    j->n_prompt = n;
    if (cs->ep == EP_COUNT_TOKENS) {
        engine_usage u = { .prompt_tokens = n };
        api_result res = { .id = "", .model = s->model_id, .text = "", .usage = &u };
        ret = reply(s, c, cs->ep, 200, "application/json", api_format_response(&j->req, &res));
        goto out;
    }
    if (n == 0) {
        ret = reply_err(s, c, cs->ep, anth, 400, "invalid_request_error", NULL, "the prompt is empty");
        goto out;
    }
    /* The prompt and max_tokens (or, without it, one generated token) must fit the context. */
    if ((int64_t)n + (j->req.max_tokens > 0 ? j->req.max_tokens : 1) > s->n_ctx) {
        ret = reply_too_long(s, c, cs->ep, &j->req, n);
        goto out;
    }
    engine_request *er = &j->er;
    if (j->req.format != API_FORMAT_TEXT) {   /* structured outputs: the schema's grammar */
        char gerr[300] = "";
        if (!(er->grammar = schema_cache_get(s->schemas, j->req.format == API_FORMAT_JSON_SCHEMA ? j->req.schema : NULL, gerr, sizeof gerr))) {
            api_error_set(&e, 400, "invalid_request_error", "response_format", "invalid_json_schema", "response_format: %s", gerr);
            ret = reply_error(s, c, cs->ep, false, &e);
            goto out;
        }
    }
    if (api_tools_active(&j->req)) {   /* tool calls: parse the output, constrain it when asked */
        toolfmt fmt = s->tmpl == CHAT_TMPL_LLAMA3 ? TOOLFMT_LLAMA3 : TOOLFMT_HERMES;
        char gerr[300];
        er->grammar = tool_grammar(s, &j->req, fmt, gerr, sizeof gerr);
        if (!er->grammar && gerr[0]) {
            api_error_set(&e, 400, "invalid_request_error", "tools", "invalid_function_parameters", "tools: %s", gerr);
            if (anth) snprintf(e.type, sizeof e.type, "%s", api_anthropic_type(400));
            ret = reply_error(s, c, cs->ep, anth, &e);
            goto out;
        }
        j->tools_on = true;
        toolcall_parser_init(&j->tp, fmt);
    }
    const bool forced_calls = j->tools_on && (j->req.tool_choice == API_TOOL_REQUIRED || j->req.tool_choice == API_TOOL_NAMED);
    if (s->think.thinks && j->req.reasoning_format == API_REASONING_SPLIT && j->req.kind != API_OPENAI_COMPLETION &&
        j->req.format == API_FORMAT_TEXT && !forced_calls) {
        j->req.think = true;
        reasoning_init(&j->rp, reply_starts_inside(s, &j->req));
    }
    /* Byte breakpoints -> token positions (whole tokens inside the prefix). */
    if (pr.n_bps > 0) {
        size_t *ends = malloc((size_t)n * sizeof *ends);
        if (!ends) { ret = reply_err(s, c, cs->ep, anth, 500, anth ? "api_error" : "server_error", NULL, "out of memory"); goto out; }
        size_t acc = 0;
        for (int i = 0; i < n; i++) {
            size_t pl = 0;
            if (!(i == 0 && add_bos && j->prompt[0] == tokenizer_bos(s->tok))) tokenizer_piece(s->tok, j->prompt[i], true, &pl);
            acc += pl;
            ends[i] = acc;
        }
        for (int b = 0; b < pr.n_bps; b++) {
            int pos = api_byte_to_token(ends, n, pr.bps[b].off);
            if (pos <= 0) continue;
            if (er->n_breakpoints > 0 && er->breakpoints[er->n_breakpoints - 1].pos >= pos) continue;
            er->breakpoints[er->n_breakpoints].pos = pos;
            er->breakpoints[er->n_breakpoints].ttl_s = pr.bps[b].ttl_s;
            er->n_breakpoints++;
        }
        free(ends);
    }
    er->ns = j->ns;
    er->logit_bias = j->req.logit_bias;
    er->n_logit_bias = j->req.n_logit_bias;
    er->ignore_eos = j->req.ignore_eos;
    if (j->req.logprobs >= 0) {
        er->on_token = on_token;
        er->logprobs = j->req.logprobs;
    }
    er->prompt = j->prompt;
    er->n_prompt = n;
    er->sp = j->req.sp;
    if (!j->req.has_seed) er->sp.seed = next_rand(s);
    er->max_tokens = j->req.max_tokens > 0 ? j->req.max_tokens : 0;
    er->stop = (const char *const *)j->req.stop;
    er->n_stop = j->req.n_stop;
    er->on_text = on_text;
    er->on_done = on_done;
    er->on_start = on_start;
    if (j->req.kind == API_OPENAI_RESPONSES || j->req.think) er->on_tokens = on_tokens;
    er->user = j;
    uint64_t r1 = next_rand(s), r2 = next_rand(s);
    snprintf(j->id, sizeof j->id, "%s%016llx%08llx", anth ? "msg_" : cs->ep == EP_CHAT ? "chatcmpl-" : cs->ep == EP_RESPONSES ? "resp_" : "cmpl-",
             (unsigned long long)r1, (unsigned long long)(r2 & 0xffffffffu));
    j->created = (long long)time(NULL);
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    j->fd = ci ? ci->connect_fd : -1;

    /* Hand it to the engine thread. */
    pthread_mutex_lock(&s->q_mu);
    if (s->stopping || atomic_load(&s->draining)) {
        pthread_mutex_unlock(&s->q_mu);
        ret = reply_retry(s, c, cs->ep, anth, 503, anth ? "overloaded_error" : "server_error", NULL, 5,
                          "server is shutting down");
        goto out;
    }
    if (atomic_load(&s->waiting) >= s->max_queue) {
        pthread_mutex_unlock(&s->q_mu);
        pthread_mutex_lock(&s->m.mu);
        s->m.queue_full++;
        pthread_mutex_unlock(&s->m.mu);
        if (anth) ret = reply_retry(s, c, cs->ep, true, 529, "overloaded_error", NULL, 1, "Overloaded: %d requests are waiting (--max-queue)", s->max_queue);
        else ret = reply_retry(s, c, cs->ep, false, 429, "rate_limit_error", "rate_limit_exceeded", 1,
                               "The server is at capacity: %d requests are waiting (--max-queue). Retry shortly.", s->max_queue);
        goto out;
    }
    atomic_fetch_add(&s->waiting, 1);
    j->waiting = true;
    j->refs++; /* engine's */
    j->next = NULL;
    if (s->pending_tail) s->pending_tail->next = j; else s->pending = j;
    s->pending_tail = j;
    pthread_cond_signal(&s->q_cv);
    pthread_mutex_unlock(&s->q_mu);
    cs->job = j;
    j->refs++; /* the connection's (released in on_completed); ours is released at out */
    pthread_mutex_lock(&s->m.mu);
    s->m.active++;
    pthread_mutex_unlock(&s->m.mu);

    /* Wait until it is accepted (or rejected) before choosing the status line. */
    pthread_mutex_lock(&j->mu);
    while (j->state == JOB_QUEUED) {
        job_wait(j, 250);
        if (j->state == JOB_QUEUED && http_peer_gone(j->fd)) break;
    }
    bool queued = j->state == JOB_QUEUED;
    bool rejected = j->submit_failed;
    char msg[256];
    snprintf(msg, sizeof msg, "%s", j->errmsg);
    pthread_mutex_unlock(&j->mu);
    if (queued) { job_cancel(s, j); ret = MHD_NO; goto out; }
    if (rejected) {
        const char *code = anth ? NULL : strstr(msg, "--kv-mem") ? "kv_cache_exceeded"
                                       : strstr(msg, "context") ? "context_length_exceeded" : NULL;
        ret = reply_err(s, c, cs->ep, anth, 400, "invalid_request_error", code, "%s", msg);
        goto out;
    }
    unsigned long long to = 3600;
    MHD_set_connection_option(c, MHD_CONNECTION_OPTION_TIMEOUT, (unsigned int)to);
    if (j->req.stream) {
        j->refs++; /* the response's */
        struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, stream_reader, j, stream_free);
        if (!r) { job_release(j); job_cancel(s, j); ret = MHD_NO; goto out; }
        MHD_add_response_header(r, "Content-Type", "text/event-stream; charset=utf-8");
        MHD_add_response_header(r, "Cache-Control", "no-cache");
        MHD_add_response_header(r, "X-Accel-Buffering", "no");
        add_cors(s, c, r);
        ret = MHD_queue_response(c, 200, r);
        MHD_destroy_response(r);
        metrics_request(s, cs->ep, 200);
        goto out;
    }
    pthread_mutex_lock(&j->mu);
    bool gone = false;
    while (j->state != JOB_DONE) {
        job_wait(j, 250);
        if (j->state != JOB_DONE && http_peer_gone(j->fd)) { gone = true; break; }
    }
    pthread_mutex_unlock(&j->mu);
    if (gone) { job_cancel(s, j); ret = MHD_NO; goto out; }
    if (j->why == FINISH_ABORT && (s->stopping || atomic_load(&s->draining))) {
        ret = reply_retry(s, c, cs->ep, anth, 503, anth ? "overloaded_error" : "server_error", NULL, 5,
                          "server is shutting down");
        goto out;
    }
    if (j->why == FINISH_ERROR || j->why == FINISH_ABORT) {
        ret = reply_err(s, c, cs->ep, anth, 500, anth ? "api_error" : "server_error", NULL, "%s", j->errmsg[0] ? j->errmsg : "generation failed");
        goto out;
    }
    api_result res;
    job_result(j, &res);
    api_tool_call *calls = NULL;
    if (j->req.think) {
        if (!reasoning_feed(&j->rp, res.text, res.text_len, true)) {
            ret = reply_err(s, c, cs->ep, anth, 500, anth ? "api_error" : "server_error", NULL, "out of memory");
            goto out;
        }
        job_reasoning_result(j, &res);
        res.text = j->rp.content ? j->rp.content : "";
        res.text_len = j->rp.n_content;
    }
    if (j->tools_on) {
        if (!toolcall_feed(&j->tp, res.text, res.text_len, true) || !(calls = job_calls(j))) {
            ret = reply_err(s, c, cs->ep, anth, 500, anth ? "api_error" : "server_error", NULL, "out of memory");
            goto out;
        }
        res.text = j->tp.content ? j->tp.content : "";
        res.text_len = j->tp.n_content;
        res.calls = calls;
        res.n_calls = j->tp.n_calls;
    }
    store_response(j, &res, 0);
    ret = reply(s, c, cs->ep, 200, "application/json", api_format_response(&j->req, &res));
    free(calls);
out:
    resp_entry_free(&prev);
    job_release(j);
    return ret;
}

/* ------------------------------------------------------------------------------ routing */
/* The endpoint of a URL path. The API paths are served with and without the /v1 prefix (clients
 * configured with a base URL that lacks it call /chat/completions, /models ...); *model_name gets
 * the name in /models/{name}, else NULL. */
static int route(const char *url, bool *anthropic, const char **model_name) {
    *anthropic = false;
    *model_name = NULL;
    if (!strcmp(url, "/health")) return EP_HEALTH;
    if (!strcmp(url, "/metrics")) return EP_METRICS;
    const char *p = !strncmp(url, "/v1/", 4) ? url + 3 : url;
    if (!strcmp(p, "/models")) return EP_MODELS;
    if (!strncmp(p, "/models/", 8) && p[8]) { *model_name = p + 8; return EP_MODELS; }
    if (!strcmp(p, "/chat/completions")) return EP_CHAT;
    if (!strcmp(p, "/completions")) return EP_COMPLETIONS;
    if (!strcmp(p, "/responses")) return EP_RESPONSES;
    if (!strncmp(p, "/responses/", 11) && p[11] && !strchr(p + 11, '/')) { *model_name = p + 11; return EP_RESPONSE_ID; }
    if (!strcmp(p, "/messages")) { *anthropic = true; return EP_MESSAGES; }
    if (!strcmp(p, "/messages/count_tokens")) { *anthropic = true; return EP_COUNT_TOKENS; }
    if (!strncmp(p, "/messages", 9)) *anthropic = true;
    return EP_OTHER;
}

/* GET /v1/responses/{id}: a stored response, DELETE: forget it; only the tenant that made it
 * finds it. */
static enum MHD_Result handle_response_id(server *s, struct MHD_Connection *c, const char *method, const char *id, const char *ns) {
    const double now = now_mono();
    if (!strcmp(method, "DELETE")) {
        if (respstore_delete(s->responses, id, ns, now)) {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "id", id);
            cJSON_AddStringToObject(o, "object", "response");
            cJSON_AddBoolToObject(o, "deleted", true);
            char *body = cJSON_PrintUnformatted(o);
            cJSON_Delete(o);
            return reply(s, c, EP_RESPONSE_ID, 200, "application/json", body);
        }
    } else {
        resp_entry e;
        if (respstore_get(s->responses, id, ns, now, 0, &e)) {
            char *body = e.body;
            e.body = NULL;
            resp_entry_free(&e);
            return reply(s, c, EP_RESPONSE_ID, 200, "application/json", body);
        }
    }
    api_error err;
    api_error_set(&err, 404, "invalid_request_error", NULL, "not_found", "Response with id '%.100s' not found.", id);
    return reply_error(s, c, EP_RESPONSE_ID, false, &err);
}

/* The answer to a CORS preflight (OPTIONS): 204, no key needed (browsers send none). */
static enum MHD_Result reply_preflight(server *s, struct MHD_Connection *c, int ep) {
    struct MHD_Response *r = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
    if (!r) return MHD_NO;
    bool get = ep == EP_HEALTH || ep == EP_METRICS || ep == EP_MODELS;
    const char *allow = ep == EP_RESPONSE_ID ? "GET, DELETE, OPTIONS" : get ? "GET, HEAD, OPTIONS" : "POST, OPTIONS";
    MHD_add_response_header(r, "Allow", allow);
    add_cors(s, c, r);
    if (cors_origin(s, c)) {
        const char *rh = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Access-Control-Request-Headers");
        MHD_add_response_header(r, "Access-Control-Allow-Methods", allow);
        MHD_add_response_header(r, "Access-Control-Allow-Headers",
                                rh && *rh && strlen(rh) < 2048 && !strpbrk(rh, "\r\n") ? rh
                                : "authorization, content-type, x-api-key, anthropic-version, anthropic-beta, "
                                  "anthropic-dangerous-direct-browser-access, openai-organization, openai-project, "
                                  "openai-beta, x-stainless-arch, x-stainless-lang, x-stainless-os, "
                                  "x-stainless-package-version, x-stainless-retry-count, x-stainless-runtime, "
                                  "x-stainless-runtime-version, x-stainless-timeout");
        MHD_add_response_header(r, "Access-Control-Max-Age", "86400");
        const char *pna = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Access-Control-Request-Private-Network");
        if (pna && !strcasecmp(pna, "true")) MHD_add_response_header(r, "Access-Control-Allow-Private-Network", "true");
    }
    enum MHD_Result ret = MHD_queue_response(c, 204, r);
    MHD_destroy_response(r);
    metrics_request(s, ep, 204);
    return ret;
}

/* The caller's namespace, or -1 when keys are required and this one is missing or wrong. */
static int authorize(server *s, struct MHD_Connection *c, char ns[18]) {
    ns[0] = 0;
    const char *k = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "x-api-key");
    const char *a = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    if (!k && a && !strncasecmp(a, "Bearer ", 7)) { k = a + 7; while (*k == ' ') k++; }
    if (k && !*k) k = NULL;
    if (s->n_keys == 0) {               /* no auth, but each credential is its own tenant */
        if (k) server_key_namespace(k, ns);
        return 0;
    }
    if (!k) return -1;
    int found = -1;
    for (int i = 0; i < s->n_keys; i++) if (key_eq(k, s->keys[i])) found = i;
    if (found < 0) return -1;
    memcpy(ns, s->key_ns[found], 18);
    return 0;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_data_size, void **con_cls) {
    server *s = cls;
    conn *cs = *con_cls;
    if (!cs) {
        cs = calloc(1, sizeof *cs);
        if (!cs) return MHD_NO;
        *con_cls = cs;
        const char *model_name;
        cs->ep = route(url, &cs->anthropic, &model_name);
        bool get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
        bool post = !strcmp(method, "POST");
        int ep = cs->ep;
        if (ep == EP_OTHER)
            return reply_err(s, c, ep, cs->anthropic, 404, cs->anthropic ? "not_found_error" : "invalid_request_error", NULL,
                             "Unknown request URL: %s %.200s", method, url);
        if (!strcmp(method, "OPTIONS")) return reply_preflight(s, c, ep);
        bool want_get = ep == EP_HEALTH || ep == EP_METRICS || ep == EP_MODELS;
        if (ep == EP_RESPONSE_ID ? !get && strcmp(method, "DELETE") : (want_get && !get) || (!want_get && !post))
            return reply_err(s, c, ep, cs->anthropic, 405, "invalid_request_error", NULL, "Method %s not allowed for %.200s", method, url);
        if (ep != EP_HEALTH && ep != EP_METRICS && authorize(s, c, cs->ns) < 0) {
            if (cs->anthropic) return reply_err(s, c, ep, true, 401, "authentication_error", NULL, "invalid x-api-key");
            api_error e;
            api_error_set(&e, 401, "invalid_request_error", NULL, "invalid_api_key", "Incorrect API key provided.");
            return reply_error(s, c, ep, false, &e);
        }
        if (ep == EP_HEALTH) return reply_health(s, c);
        if (ep == EP_METRICS) return reply(s, c, ep, 200, "text/plain; version=0.0.4", format_metrics(s));
        if (ep == EP_RESPONSE_ID) return handle_response_id(s, c, method, model_name, cs->ns);
        if (ep == EP_MODELS) {
            if (model_name) {   /* any name finds the served model, unless --strict-model */
                const char *id = model_known(s, model_name);
                if (!id && s->strict_model) {
                    api_error e;
                    api_error_set(&e, 404, "invalid_request_error", "model", "model_not_found", "The model `%.200s` does not exist", model_name);
                    return reply_error(s, c, ep, false, &e);
                }
                cJSON *m = model_entry(s, id ? id : s->model_id);
                char *one = m ? cJSON_PrintUnformatted(m) : NULL;
                cJSON_Delete(m);
                return reply(s, c, ep, 200, "application/json", one);
            }
            return reply(s, c, ep, 200, "application/json", format_models(s));
        }
        if (http_body_too_large(c, API_MAX_BODY))
            return reply_err(s, c, ep, cs->anthropic, 413, cs->anthropic ? "request_too_large" : "invalid_request_error", NULL,
                             "request body is larger than %u bytes", API_MAX_BODY);
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        size_t n = *upload_data_size;
        *upload_data_size = 0;
        return body_append(&cs->in, upload_data, n, API_MAX_BODY) ? MHD_YES : MHD_NO;
    }
    if (cs->job) return MHD_NO; /* a response was already queued */
    if (cs->in.too_large)
        return reply_err(s, c, cs->ep, cs->anthropic, 413, cs->anthropic ? "request_too_large" : "invalid_request_error", NULL,
                         "request body is larger than %u bytes", API_MAX_BODY);
    return handle_generate(s, c, cs);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe) {
    server *s = cls;
    conn *cs = *con_cls;
    if (!cs) return;
    if (cs->job) {
        if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK) job_cancel(s, cs->job);
        pthread_mutex_lock(&s->m.mu);
        s->m.active--;
        pthread_mutex_unlock(&s->m.mu);
        job_release(cs->job);
    }
    free(cs->in.body);
    free(cs);
    *con_cls = NULL;
}

/* ------------------------------------------------------------------------------ main */
static double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Generation requests whose connection is still open. */
static int in_flight(server *s) {
    pthread_mutex_lock(&s->m.mu);
    int n = s->m.active;
    pthread_mutex_unlock(&s->m.mu);
    return n;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: pcache serve [options]\n"
            "  -m, --model PATH      GGUF model (default $PCACHE_MODEL or models/SmolLM2-135M-Instruct.Q4_1.gguf)\n"
            "  --host ADDR           bind address (default 127.0.0.1)\n"
            "  --port N              port (default 8080; 0 = any free port)\n"
            "  --kv-mem SIZE         KV cache budget, e.g. 512M, 2G (default 512M)\n"
            "  --cache-dir DIR       also keep cached KV blocks on disk under DIR, across restarts\n"
            "  --cache-disk SIZE     bound of the disk tier (default 10G)\n"
            "  --cache-host-mem SIZE a host-RAM tier between the KV pool and the disk\n"
            "  --cache-ttl T         lifetime of automatic cache entries, e.g. 300, 5m, 1h (default 5m)\n"
            "  --no-cache            disable prefix reuse\n"
            "  --device D            cpu, cuda or auto (default: the GPU when one is usable)\n"
            "  --kv-mem on cuda      default: the GPU memory free after weights and scratch, less 512 MiB\n"
            "  --api-key KEY         require this key (repeatable; each key is its own cache namespace)\n"
            "  --parallel N          concurrent sequences (default 64)\n"
            "  --batch N             tokens per engine step (default 512)\n"
            "  -t, --threads N       compute threads (default: all cores)\n"
            "  --timeout S           drop clients idle for S seconds while sending a request (default 30)\n"
            "  --max-queue N         requests that may wait for their prompt to start; beyond, 429/529 (default 256)\n"
            "  --drain-timeout S     on SIGTERM/SIGINT, let in-flight requests finish for up to S seconds (default 30)\n"
            "  --alias NAME          another name for the model, listed by /v1/models (repeatable)\n"
            "  --strict-model        refuse (404) a `model` that is not one of the model's names (its GGUF name,\n"
            "                        file name, \"default\" or an --alias), and require `model`; by default any\n"
            "                        name, or none, is served by the one model and replies name it\n"
            "  --redis URL           join a cluster through Redis: redis://[[user]:password@]host[:port][/db]\n"
            "                        (the password may instead be in $REDIS_PASSWORD): publish KV events,\n"
            "                        share KV blocks (write-through; fetched on a local miss when cheaper)\n"
            "  --redis-timeout S     Redis connect and command timeout (default 1)\n"
            "  --cors-origins LIST   browser origins allowed to call the API: comma-separated (e.g.\n"
            "                        https://app.example.com,http://localhost:5173), * for any, \"\" for none\n"
            "                        (default: http(s)://localhost, 127.0.0.1 and [::1], any port)\n"
            "API paths are served with and without the /v1 prefix (/chat/completions, /completions, /models,\n"
            "/messages, /messages/count_tokens). /health and /metrics, and CORS preflights, need no key.\n");
}

/* --cors-origins: "*", or comma-separated origins (scheme://host[:port]); "" allows none. The
 * list is copied to *buf and split there; s->cors points into it. */
static int parse_cors(server *s, const char *v, char **buf) {
    free(*buf);
    free(s->cors);
    s->cors = NULL;
    s->n_cors = 0;
    s->cors_any = false;
    if (!(*buf = strdup(v)) || !(s->cors = calloc(strlen(v) / 2 + 2, sizeof *s->cors))) return -1;
    for (char *save = NULL, *t = strtok_r(*buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        while (*t == ' ' || *t == '\t') t++;
        char *e = t + strlen(t);
        while (e > t && (e[-1] == ' ' || e[-1] == '\t')) *--e = 0;
        if (!*t) continue;
        if (!strcmp(t, "*")) { s->cors_any = true; continue; }
        if (strncmp(t, "http://", 7) && strncmp(t, "https://", 8)) return -1;
        s->cors[s->n_cors++] = t;
    }
    return 0;
}

int server_main(int argc, char **argv) {
    engine_opts eo = { .cache_enabled = true };
    const char *host = "127.0.0.1";
    long port = 8080;
    unsigned timeout = 30;
    double drain_s = 30;
    int max_queue = 256;
    eo.model_path = default_model_path();
    server *s = calloc(1, sizeof *s);
    if (!s) return 1;
    s->keys = calloc((size_t)argc + 1, sizeof *s->keys);
    s->key_ns = calloc((size_t)argc + 1, sizeof *s->key_ns);
    s->aliases = calloc((size_t)argc + 1, sizeof *s->aliases);
    if (!s->keys || !s->key_ns || !s->aliases) { free(s->keys); free(s->key_ns); free(s->aliases); free(s); return 1; }
    s->n_cors = -1;
    char *cors_list = NULL;   /* the --cors-origins value, split in place */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEED() do { if (!v) { fprintf(stderr, "pcache serve: %s needs a value\n", a); return 2; } i++; } while (0)
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); return 0; }
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) { NEED(); eo.model_path = v; }
        else if (!strcmp(a, "--host")) { NEED(); host = v; }
        else if (!strcmp(a, "--port")) { NEED(); char *e; port = strtol(v, &e, 10); if (*e || port < 0 || port > 65535) { fprintf(stderr, "pcache serve: bad --port %s\n", v); return 2; } }
        else if (!strcmp(a, "--kv-mem")) { NEED(); if (parse_size(v, &eo.kv_mem_bytes) < 0) { fprintf(stderr, "pcache serve: bad --kv-mem %s\n", v); return 2; } }
        else if (!strcmp(a, "--cache-ttl")) { NEED(); if (parse_duration(v, &eo.cache_ttl_s) < 0) { fprintf(stderr, "pcache serve: bad --cache-ttl %s\n", v); return 2; } }
        else if (!strcmp(a, "--no-cache")) eo.cache_enabled = false;
        else if (!strcmp(a, "--cache-dir")) { NEED(); eo.cache_dir = v; }
        else if (!strcmp(a, "--cache-disk")) { NEED(); if (parse_size(v, &eo.cache_disk_bytes) < 0 || !eo.cache_disk_bytes) { fprintf(stderr, "pcache serve: bad --cache-disk %s\n", v); return 2; } }
        else if (!strcmp(a, "--cache-host-mem")) { NEED(); if (parse_size(v, &eo.cache_host_bytes) < 0 || !eo.cache_host_bytes) { fprintf(stderr, "pcache serve: bad --cache-host-mem %s\n", v); return 2; } }
        else if (!strcmp(a, "--device")) { NEED(); if (strcmp(v, "cpu") && strcmp(v, "cuda") && strcmp(v, "auto")) { fprintf(stderr, "pcache serve: bad --device %s (cpu, cuda or auto)\n", v); return 2; } eo.device = v; }
        else if (!strcmp(a, "--api-key")) { NEED(); if (!*v) { fprintf(stderr, "pcache serve: empty --api-key\n"); return 2; } s->keys[s->n_keys++] = (char *)v; }
        else if (!strcmp(a, "--parallel")) { NEED(); eo.max_seqs = atoi(v); if (eo.max_seqs < 1) { fprintf(stderr, "pcache serve: bad --parallel %s\n", v); return 2; } }
        else if (!strcmp(a, "--batch")) { NEED(); eo.max_batch_tokens = atoi(v); if (eo.max_batch_tokens < 1) { fprintf(stderr, "pcache serve: bad --batch %s\n", v); return 2; } }
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) { NEED(); eo.n_threads = atoi(v); if (eo.n_threads < 1) { fprintf(stderr, "pcache serve: bad --threads %s\n", v); return 2; } }
        else if (!strcmp(a, "--timeout")) { NEED(); long t = atol(v); if (t < 1 || t > 86400) { fprintf(stderr, "pcache serve: bad --timeout %s\n", v); return 2; } timeout = (unsigned)t; }
        else if (!strcmp(a, "--max-queue")) { NEED(); char *e; long q = strtol(v, &e, 10); if (*e || q < 0 || q > 1000000) { fprintf(stderr, "pcache serve: bad --max-queue %s\n", v); return 2; } max_queue = (int)q; }
        else if (!strcmp(a, "--alias")) { NEED(); if (!*v || strlen(v) > 200) { fprintf(stderr, "pcache serve: bad --alias '%s'\n", v); return 2; } s->aliases[s->n_aliases++] = v; }
        else if (!strcmp(a, "--strict-model")) s->strict_model = true;
        else if (!strcmp(a, "--cors-origins")) { NEED(); if (parse_cors(s, v, &cors_list) < 0) { fprintf(stderr, "pcache serve: bad --cors-origins '%s' (comma-separated origins such as https://app.example.com, or *)\n", v); return 2; } }
        else if (!strcmp(a, "--redis")) {
            NEED();
            redis_url u;
            char uerr[256];
            if (redis_url_parse(v, NULL, &u, uerr, sizeof uerr) < 0) { fprintf(stderr, "pcache serve: %s\n", uerr); return 2; }
            eo.redis_url = v;
        }
        else if (!strcmp(a, "--redis-timeout")) { NEED(); if (parse_duration(v, &eo.redis_timeout_s) < 0 || eo.redis_timeout_s <= 0 || eo.redis_timeout_s > 60) { fprintf(stderr, "pcache serve: bad --redis-timeout %s\n", v); return 2; } }
        else if (!strcmp(a, "--drain-timeout")) { NEED(); if (parse_duration(v, &drain_s) < 0 || drain_s < 0) { fprintf(stderr, "pcache serve: bad --drain-timeout %s\n", v); return 2; } }
        else { fprintf(stderr, "pcache serve: unknown option %s\n", a); usage(stderr); return 2; }
#undef NEED
    }
    for (int i = 0; i < s->n_keys; i++) server_key_namespace(s->keys[i], s->key_ns[i]);
    s->timeout_s = timeout;
    s->max_queue = max_queue;

    /* Signals: handled by sigwait in this thread; every other thread inherits the block. */
    sigset_t sigs;
    http_block_signals(&sigs);

    uint64_t inst = 0;
    while (!inst && getrandom(&inst, sizeof inst, 0) == sizeof inst) {}
    if (!inst) inst = (uint64_t)time(NULL) * 0x9E3779B97F4A7C15ull ^ (uint64_t)getpid();
    kvevent_hex64(inst, s->instance);
    eo.instance = inst;
    eo.redis_password = getenv("REDIS_PASSWORD");
    char err[512] = "";
    if (engine_create(&s->eng, &eo, err, sizeof err) < 0) {
        fprintf(stderr, "pcache serve: %s\n", err[0] ? err : "could not load the model");
        return 1;
    }
    s->cache_ttl = eo.cache_ttl_s > 0 ? eo.cache_ttl_s : 300;
    if (engine_model_fp(s->eng)) kvevent_hex64(engine_model_fp(s->eng), s->fingerprint);
    if (!(s->responses = respstore_new(4096, (size_t)256 << 20)) || !(s->schemas = schema_cache_new(16))) {
        fprintf(stderr, "pcache serve: out of memory\n");
        engine_free(s->eng);
        return 1;
    }
    engine_get_stats(s->eng, &s->m.es);   /* /metrics before the first request (the tiers' start-up scan) */
    s->tok = engine_tok(s->eng);
    s->gf = engine_gguf(s->eng);
    s->pm = prompt_model_of(s->tok, s->gf);
    s->tmpl = s->pm.tmpl;
    s->think = s->pm.think;
    s->n_ctx = engine_n_ctx(s->eng);
    const char *base = strrchr(eo.model_path, '/');
    base = base ? base + 1 : eo.model_path;
    snprintf(s->model_file, sizeof s->model_file, "%s", base);
    snprintf(s->model_stem, sizeof s->model_stem, "%s", base);
    size_t bl = strlen(s->model_stem);
    if (bl > 5 && !strcasecmp(s->model_stem + bl - 5, ".gguf")) s->model_stem[bl - 5] = 0;
    const char *mn = engine_model_name(s->eng);
    snprintf(s->model_id, sizeof s->model_id, "%s", mn && *mn ? mn : s->model_stem);
    if (getrandom(&s->id_seed, sizeof s->id_seed, 0) != sizeof s->id_seed) s->id_seed = (uint64_t)time(NULL) ^ (uint64_t)getpid() << 32;
    pthread_mutex_init(&s->q_mu, NULL);
    pthread_cond_init(&s->q_cv, NULL);
    pthread_mutex_init(&s->m.mu, NULL);

    if (pthread_create(&s->eng_thread, NULL, engine_main, s)) { fprintf(stderr, "pcache serve: cannot start the engine thread\n"); return 1; }
    unsigned bound = 0;
    struct MHD_Daemon *d = http_start("pcache serve", host, port, timeout, 512, on_request, on_completed, s, &bound);
    if (!d) {
        pthread_mutex_lock(&s->q_mu);
        s->stopping = true;
        pthread_cond_signal(&s->q_cv);
        pthread_mutex_unlock(&s->q_mu);
        pthread_join(s->eng_thread, NULL);
        engine_free(s->eng);
        return 1;
    }
    fprintf(stderr, "pcache serve: %s (ctx %d, %s) listening on http://%s:%u%s\n", s->model_id, s->n_ctx,
            engine_device(s->eng, NULL), host, bound, s->n_keys ? " (API keys required)" : "");
    fflush(stderr);

    int sig = 0;
    sigwait(&sigs, &sig);
    /* Drain: new generation requests get 503 and /health says so; in-flight ones finish (or
     * a second signal, or the drain timeout, ends them). */
    atomic_store(&s->draining, true);
    fprintf(stderr, "pcache serve: signal %d, draining (up to %.0f s; again to stop now)\n", sig, drain_s);
    fflush(stderr);
    double t0 = now_mono();
    bool forced = false;
    while (!forced && in_flight(s) > 0 && now_mono() - t0 < drain_s) {
        struct timespec ts = { 0, 50 * 1000000L };
        if (sigtimedwait(&sigs, NULL, &ts) > 0) forced = true;
    }
    int left = in_flight(s);
    fprintf(stderr, "pcache serve: %s, %d request(s) still running are ended\n",
            forced ? "second signal" : left ? "drain timeout" : "drained", left);
    pthread_mutex_lock(&s->q_mu);
    s->stopping = true;
    pthread_cond_signal(&s->q_cv);
    pthread_mutex_unlock(&s->q_mu);
    pthread_join(s->eng_thread, NULL);
    /* let the ended streams send their error event */
    for (double t1 = now_mono(); in_flight(s) > 0 && now_mono() - t1 < 2;) {
        struct timespec ts = { 0, 20 * 1000000L };
        nanosleep(&ts, NULL);
    }
    MHD_quiesce_daemon(d);
    MHD_stop_daemon(d);
    engine_free(s->eng);
    schema_cache_free(s->schemas);
    respstore_free(s->responses);
    pthread_mutex_destroy(&s->q_mu);
    pthread_cond_destroy(&s->q_cv);
    pthread_mutex_destroy(&s->m.mu);
    free(s->keys);
    free(s->key_ns);
    free(s->aliases);
    free(s->cors);
    free(cors_list);
    free(s);
    return 0;
}
