/* router: `pcache route`, an OpenAI/Anthropic-compatible front that sends each request to the
 * replica (`pcache serve`) most likely to hold its prompt's prefix in cache, while keeping the
 * load even (issue 14).
 *
 * What it knows.
 * - The prompt: it loads the model's tokenizer and metadata only (no weights) and turns each
 *   request into token ids with prompt.c, the function the replicas use, then into the chain
 *   hashes of its full blocks (kvevent_prompt_chains) in the namespace the replica will use
 *   (the credential's, split by cache_salt). The same ids, the same hashes.
 * - Who holds what: replicas publish KV events on a Redis stream (kvevent.h). A thread reads it
 *   (XREAD from the start, then blocking XREADs) into kvindex, one set of chain hashes per
 *   replica instance; the instance ids are mapped to --replica URLs by the replicas' /health.
 *   On top of that, the router remembers what it sent where (the "predicted" index, expiring
 *   after --predict-ttl): this bridges the events' latency (a resend right after the answer)
 *   and keeps routing by prefix while Redis is down. An evict or clear event, or a replica
 *   restarting (a new instance id), drops its predictions.
 * - Load: each replica's queue (running + waiting) as its /health last said, plus what this
 *   router has sent it since that poll and not finished.
 * The choice itself is routing.c's (a pure function): the longest cached prefix (when it covers
 * --min-match of the prompt) unless that replica is overloaded by more than --load-threshold,
 * else affinity by prompt_cache_key / API key / prompt, else the least loaded.
 *
 * Forwarding. libmicrohttpd runs one thread per client connection; that thread forwards with
 * libcurl (a multi handle it drives itself, so it can also watch the client's socket). Every
 * path is forwarded as it is (OpenAI, Anthropic, models, Responses, CORS preflights), with the
 * client's headers (Authorization, x-api-key, anthropic-version, Origin ...) and the query
 * string; the replica's status and headers come back. Non-streamed answers are collected
 * whole, then sent; streamed ones (text/event-stream) are passed on as their events arrive,
 * a whole event at a time, never buffering the response.
 * Failures: a replica that cannot be reached, breaks before the client got a byte, or answers
 * 503 (draining) / 429 / 529 (queue full) is marked down (unreachable ones until the next good
 * health check) and the request goes to the next choice, each replica at most once. A stream
 * that breaks after bytes were sent ends with the API's error event (OpenAI `data: {"error":
 * ...}` then `data: [DONE]`; Anthropic `event: error`), as a replica's own failing stream does.
 * Responses with previous_response_id, and GET/DELETE /v1/responses/{id}, go to the replica
 * that stored the response (asked with GET /v1/responses/{id} and the caller's credential).
 *
 * Bad input gets the replica's own errors: the router parses with api.c and prompt.c, so a
 * malformed body is answered here in the same words without reaching a replica.
 *
 * Redis down: routing goes on (predictions, affinity, load); the events thread reconnects with
 * backoff and reads the stream from the start again (re-applying history is harmless: hello
 * resets an instance, store and evict are idempotent in order). /metrics says which.
 */
#include "router.h"
#include "api.h"
#include "fingerprint.h"
#include "gguf.h"
#include "http.h"
#include "kv.h"
#include "kvevent.h"
#include "kvindex.h"
#include "model.h"
#include "prompt.h"
#include "redis.h"
#include "routing.h"
#include "server.h"
#include "tokenizer.h"
#include "util.h"
#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <hiredis.h>
#include <microhttpd.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_REPLICAS 64
#define MAX_RESPONSE_BODY ((size_t)64 << 20)   /* a non-streamed answer larger is a 502 */

/* ------------------------------------------------------------------------------ types */
typedef struct replica {
    char url[512];            /* base URL without a trailing slash */
    uint64_t id;              /* route_hash(url) */
    /* under router.mu */
    bool healthy, ever_polled, wrong_model;
    uint64_t inst;            /* its instance id (from /health), when has_inst */
    bool has_inst;
    int queue_polled;         /* the queue its /health reported */
    int inflight_at_poll;     /* our in-flight count then */
    int inflight;             /* requests this router has running there */
    uint64_t requests, failures, hit_tokens, prompt_tokens, streams_broken;
    uint64_t status[6];       /* answers by status class: 1xx .. 5xx (0: other) */
    /* health thread only */
    CURL *hc;
} replica;

typedef struct router {
    replica reps[MAX_REPLICAS];
    int n_reps;
    pthread_mutex_t mu;       /* replicas' live fields and the counters below */
    pthread_rwlock_t idx_mu;  /* events and predicted */
    kvindex *events;          /* owner: instance id */
    kvindex *predicted;       /* owner: replica slot */
    /* model */
    gguf_file *gf;
    tokenizer *tok;
    prompt_model pm;
    uint64_t fp;
    uint32_t n_layer, kv_dim;
    /* options */
    route_policy policy;
    int threshold;
    double min_match;         /* the fraction of a prompt a prefix must cover to count */
    double health_s, predict_ttl_s;
    char **keys;
    int n_keys;
    bool redis_on;
    redis_url redis;
    /* state */
    atomic_bool stopping, draining;
    atomic_uint_fast64_t rr;
    double t0;                /* monotonic start: kvindex times are seconds since t0, plus 1 */
    /* counters (under mu) */
    uint64_t decisions[RR_N], retries, no_replica, bad_requests, streams_broken, requests;
    int inflight;
    bool redis_up;
    uint64_t redis_connects, redis_errors, events_applied, events_skipped, events_bad;
    char redis_err[200];
} router;

typedef struct hdr { char *name, *value; } hdr;

/* One forwarded request to one replica (a libcurl transfer driven by the connection thread). */
typedef struct fwd {
    router *rt;
    int rep;
    CURLM *m;
    CURL *e;
    struct curl_slist *req_hdrs;
    long status;
    bool in_headers;          /* a status line was seen, the blank line not yet */
    bool headers_done;
    hdr *rh;
    int n_rh, cap_rh;
    bool sse;                 /* the answer is text/event-stream */
    char *buf;                /* body received, [off, len) not yet passed on */
    size_t len, cap, off;
    size_t received;
    bool too_large;
    bool done;
    CURLcode res;
    char err[CURL_ERROR_SIZE];
    /* streaming to the client */
    bool anthropic;
    int client_fd;
    char *tail;               /* the error event of a broken stream, then nothing */
    size_t tail_len, tail_off;
    bool ended;
} fwd;

enum { EP_GEN_CHAT, EP_GEN_COMPLETIONS, EP_GEN_MESSAGES, EP_GEN_RESPONSES, EP_COUNT, EP_RESPONSE_ID, EP_FWD, EP_HEALTH, EP_METRICS };

typedef struct conn {
    int ep;
    bool anthropic;
    const char *resp_id;      /* EP_RESPONSE_ID: the id in the path (into url) */
    body_buf in;              /* the request body */
    bool answered;
    char ns[18];
} conn;

static double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}
static uint32_t idx_now(router *rt) { return (uint32_t)(now_mono() - rt->t0) + 1; }

static void logf_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logf_(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "pcache route: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    fflush(stderr);
    va_end(ap);
}

/* Load of a replica as the router sees it (under mu): what it is running for us now, plus what
 * its last /health counted that was not ours. */
static int rep_load(const replica *r) {
    int others = r->queue_polled - r->inflight_at_poll;
    return r->inflight + (others > 0 ? others : 0);
}

/* ------------------------------------------------------------------------------ events thread */
static redisContext *events_connect(router *rt, char *err, size_t errlen) {
    struct timeval tv = { 2, 0 };
    redisContext *c = redisConnectWithTimeout(rt->redis.host, rt->redis.port, tv);
    if (!c || c->err) {
        snprintf(err, errlen, "%s", c ? c->errstr : "out of memory");
        if (c) redisFree(c);
        return NULL;
    }
    struct timeval rtv = { 5, 0 };   /* above XREAD's BLOCK, so a dead server is noticed */
    redisSetTimeout(c, rtv);
    redisReply *r = NULL;
    if (rt->redis.password[0]) {
        r = rt->redis.user[0] ? redisCommand(c, "AUTH %s %s", rt->redis.user, rt->redis.password)
                              : redisCommand(c, "AUTH %s", rt->redis.password);
        if (!r || r->type == REDIS_REPLY_ERROR) {
            snprintf(err, errlen, "AUTH: %s", r ? r->str : c->errstr);
            goto fail;
        }
        freeReplyObject(r);
    }
    if (rt->redis.db) {
        r = redisCommand(c, "SELECT %d", rt->redis.db);
        if (!r || r->type == REDIS_REPLY_ERROR) {
            snprintf(err, errlen, "SELECT: %s", r ? r->str : c->errstr);
            goto fail;
        }
        freeReplyObject(r);
    }
    /* a server that wants a password we lack answers NOAUTH only to a command: ask here, so
     * that it is a failed connect (logged once, backed off), not a connect and a loss per try */
    r = redisCommand(c, "PING");
    if (!r || r->type == REDIS_REPLY_ERROR) {
        snprintf(err, errlen, "PING: %s", r ? r->str : c->errstr);
        goto fail;
    }
    freeReplyObject(r);
    return c;
fail:
    if (r) freeReplyObject(r);
    redisFree(c);
    return NULL;
}

/* Applies one stream entry: the instances' index, and the predictions of the replica whose
 * instance it is (an evict or clear undoes them). */
static void apply_entry(router *rt, redisReply *ent, char *last_id, size_t last_cap) {
    if (ent->type != REDIS_REPLY_ARRAY || ent->elements != 2 || ent->element[0]->type != REDIS_REPLY_STRING) return;
    snprintf(last_id, last_cap, "%s", ent->element[0]->str);
    redisReply *f = ent->element[1];
    const char *names[32], *values[32];
    int n = 0;
    if (f->type == REDIS_REPLY_ARRAY)
        for (size_t i = 0; i + 1 < f->elements && n < 32; i += 2) {
            if (f->element[i]->type != REDIS_REPLY_STRING || f->element[i + 1]->type != REDIS_REPLY_STRING) continue;
            names[n] = f->element[i]->str;
            values[n++] = f->element[i + 1]->str;
        }
    static _Thread_local kvevent_entry e;   /* 2 KB: off the stack */
    int pr = kvevent_entry_parse(names, values, n, &e);
    if (pr != 0) {
        pthread_mutex_lock(&rt->mu);
        if (pr < 0) rt->events_bad++; else rt->events_skipped++;
        pthread_mutex_unlock(&rt->mu);
        return;
    }
    int slot = -1;
    pthread_mutex_lock(&rt->mu);
    for (int i = 0; i < rt->n_reps; i++)
        if (rt->reps[i].has_inst && rt->reps[i].inst == e.inst) slot = i;
    pthread_mutex_unlock(&rt->mu);
    pthread_rwlock_wrlock(&rt->idx_mu);
    int ar = kvindex_apply(rt->events, &e, rt->fp, rt->n_layer, rt->kv_dim);
    if (ar == 0 && slot >= 0) {
        if (e.op == KVEV_EVICT) kvindex_evict(rt->predicted, (uint64_t)slot, e.chains, e.n_chains);
        else if (e.op == KVEV_CLEAR) kvindex_reset(rt->predicted, (uint64_t)slot);
    }
    pthread_rwlock_unlock(&rt->idx_mu);
    pthread_mutex_lock(&rt->mu);
    if (ar == 0) rt->events_applied++; else rt->events_skipped++;
    pthread_mutex_unlock(&rt->mu);
}

static void redis_state(router *rt, bool up, const char *err) {
    pthread_mutex_lock(&rt->mu);
    bool was = rt->redis_up;
    rt->redis_up = up;
    if (up) rt->redis_connects++;
    else rt->redis_errors++;
    if (err) snprintf(rt->redis_err, sizeof rt->redis_err, "%s", err);
    pthread_mutex_unlock(&rt->mu);
    if (up && !was) logf_("redis %s:%d connected, reading %s from the start", rt->redis.host, rt->redis.port, KVEVENT_STREAM);
    if (!up && was) logf_("redis %s:%d lost (%s); routing on without events, reconnecting", rt->redis.host, rt->redis.port, err ? err : "?");
}

static void sleep_unless_stopping(router *rt, double s) {
    for (double t = 0; t < s && !atomic_load(&rt->stopping); t += 0.05) {
        struct timespec ts = { 0, 50 * 1000000L };
        nanosleep(&ts, NULL);
    }
}

static void *events_main(void *arg) {
    router *rt = arg;
    redisContext *c = NULL;
    char last[64] = "0", err[200];
    double backoff = 0.25;
    bool warned = false;
    while (!atomic_load(&rt->stopping)) {
        if (!c) {
            if (!(c = events_connect(rt, err, sizeof err))) {
                if (!warned) { logf_("redis %s:%d: %s (retrying)", rt->redis.host, rt->redis.port, err); warned = true; }
                pthread_mutex_lock(&rt->mu);
                snprintf(rt->redis_err, sizeof rt->redis_err, "%s", err);
                rt->redis_errors++;
                pthread_mutex_unlock(&rt->mu);
                sleep_unless_stopping(rt, backoff);
                backoff = backoff * 2 < 5 ? backoff * 2 : 5;
                continue;
            }
            warned = false;
            snprintf(last, sizeof last, "0");
            redis_state(rt, true, NULL);
        }
        redisReply *r = redisCommand(c, "XREAD COUNT 1000 BLOCK 1000 STREAMS %s %s", KVEVENT_STREAM, last);
        if (!r || r->type == REDIS_REPLY_ERROR) {
            snprintf(err, sizeof err, "%s", r ? r->str : c->errstr);
            if (r) freeReplyObject(r);
            redisFree(c);
            c = NULL;
            redis_state(rt, false, err);
            sleep_unless_stopping(rt, backoff);
            backoff = backoff * 2 < 5 ? backoff * 2 : 5;   /* reset by a read that works, not by a connect */
            continue;
        }
        backoff = 0.25;
        /* [[stream, [[id, [field, value, ...]], ...]]] or nil when BLOCK timed out */
        if (r->type == REDIS_REPLY_ARRAY)
            for (size_t s = 0; s < r->elements; s++) {
                redisReply *st = r->element[s];
                if (st->type != REDIS_REPLY_ARRAY || st->elements != 2 || st->element[1]->type != REDIS_REPLY_ARRAY) continue;
                for (size_t i = 0; i < st->element[1]->elements; i++) apply_entry(rt, st->element[1]->element[i], last, sizeof last);
            }
        freeReplyObject(r);
    }
    if (c) redisFree(c);
    return NULL;
}

/* ------------------------------------------------------------------------------ health thread */
typedef struct { char *p; size_t n; } mbuf;
static size_t mbuf_write(char *d, size_t sz, size_t nm, void *u) {
    mbuf *b = u;
    size_t k = sz * nm;
    if (b->n + k > (1 << 20)) return 0;
    char *q = realloc(b->p, b->n + k + 1);
    if (!q) return 0;
    memcpy(q + b->n, d, k);
    b->p = q;
    b->n += k;
    b->p[b->n] = 0;
    return k;
}

/* One /health poll of replica i. */
static void poll_replica(router *rt, int i) {
    replica *r = &rt->reps[i];
    if (!r->hc && !(r->hc = curl_easy_init())) return;
    char url[600];
    snprintf(url, sizeof url, "%s/health", r->url);
    mbuf b = { 0 };
    curl_easy_setopt(r->hc, CURLOPT_URL, url);
    curl_easy_setopt(r->hc, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(r->hc, CURLOPT_TIMEOUT_MS, 2000L);
    curl_easy_setopt(r->hc, CURLOPT_CONNECTTIMEOUT_MS, 1000L);
    curl_easy_setopt(r->hc, CURLOPT_WRITEFUNCTION, mbuf_write);
    curl_easy_setopt(r->hc, CURLOPT_WRITEDATA, &b);
    CURLcode res = curl_easy_perform(r->hc);
    long code = 0;
    curl_easy_getinfo(r->hc, CURLINFO_RESPONSE_CODE, &code);
    bool ok = res == CURLE_OK && code == 200;
    int queue = 0;
    bool has_inst = false;
    uint64_t inst = 0, fp = 0;
    bool has_fp = false;
    if (ok) {
        cJSON *j = b.p ? cJSON_Parse(b.p) : NULL;
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(j, "status");
        ok = cJSON_IsString(st) && !strcmp(st->valuestring, "ok");
        const cJSON *in = cJSON_GetObjectItemCaseSensitive(j, "instance");
        if (cJSON_IsString(in) && kvevent_parse_hex64(in->valuestring, &inst) == 0) has_inst = true;
        const cJSON *f = cJSON_GetObjectItemCaseSensitive(j, "fingerprint");
        if (cJSON_IsString(f) && kvevent_parse_hex64(f->valuestring, &fp) == 0) has_fp = true;
        const cJSON *q = cJSON_GetObjectItemCaseSensitive(j, "queue");
        if (cJSON_IsNumber(q) && q->valuedouble >= 0 && q->valuedouble < 1e9) queue = (int)q->valuedouble;
        cJSON_Delete(j);
    }
    free(b.p);
    bool dropped_inst = false, changed = false;
    uint64_t old_inst = 0;
    pthread_mutex_lock(&rt->mu);
    bool was = r->healthy, first = !r->ever_polled;
    r->ever_polled = true;
    r->healthy = ok;
    if (ok) {
        r->queue_polled = queue;
        r->inflight_at_poll = r->inflight;
        if (has_inst && (!r->has_inst || r->inst != inst)) {
            if (r->has_inst) { dropped_inst = true; old_inst = r->inst; }
            r->inst = inst;
            r->has_inst = true;
            changed = true;
        }
        bool wrong = has_fp && fp != rt->fp;
        if (wrong && !r->wrong_model)
            logf_("replica %s serves another model file (fingerprint %016llx, ours %016llx): its cache cannot match", r->url,
                  (unsigned long long)fp, (unsigned long long)rt->fp);
        r->wrong_model = wrong;
    }
    pthread_mutex_unlock(&rt->mu);
    if (dropped_inst) {   /* it restarted: its cache, and what we predicted of it, are gone */
        pthread_rwlock_wrlock(&rt->idx_mu);
        kvindex_drop(rt->events, old_inst);
        kvindex_reset(rt->predicted, (uint64_t)i);
        pthread_rwlock_unlock(&rt->idx_mu);
    }
    if (ok != was || first) {
        if (ok) logf_("replica %s up%s", r->url, changed ? "" : " (no instance id in its /health: prefix routing by events is off for it)");
        else logf_("replica %s down (%s)", r->url, res != CURLE_OK ? curl_easy_strerror(res) : "bad /health");
    }
}

static void *health_main(void *arg) {
    router *rt = arg;
    while (!atomic_load(&rt->stopping)) {
        for (int i = 0; i < rt->n_reps && !atomic_load(&rt->stopping); i++) poll_replica(rt, i);
        sleep_unless_stopping(rt, rt->health_s);
    }
    return NULL;
}

/* A transfer failed to reach or hear from a replica: nothing more goes there until a health
 * check says it is back. */
static void mark_down(router *rt, int i, const char *why) {
    pthread_mutex_lock(&rt->mu);
    bool was = rt->reps[i].healthy;
    rt->reps[i].healthy = false;
    rt->reps[i].failures++;
    pthread_mutex_unlock(&rt->mu);
    if (was) logf_("replica %s down (%s)", rt->reps[i].url, why);
}

/* ------------------------------------------------------------------------------ forwarding */
static size_t fwd_write(char *d, size_t sz, size_t nm, void *u) {
    fwd *f = u;
    size_t k = sz * nm;
    if (!f->sse && f->received + k > MAX_RESPONSE_BODY) { f->too_large = true; return 0; }
    if (f->off && f->off == f->len) f->off = f->len = 0;
    if (f->len + k + 1 > f->cap) {
        if (f->off) {   /* slide what is left to the front first */
            memmove(f->buf, f->buf + f->off, f->len - f->off);
            f->len -= f->off;
            f->off = 0;
        }
        size_t c = f->cap ? f->cap : 16384;
        while (c < f->len + k + 1) c *= 2;
        char *q = realloc(f->buf, c);
        if (!q) return 0;
        f->buf = q;
        f->cap = c;
    }
    memcpy(f->buf + f->len, d, k);
    f->len += k;
    f->buf[f->len] = 0;
    f->received += k;
    return k;
}

static bool hop_by_hop(const char *n) {
    static const char *const H[] = { "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                                     "proxy-authorization", "proxy-authenticate", "proxy-connection", "content-length",
                                     "host", "expect", "date" };
    for (size_t i = 0; i < sizeof H / sizeof *H; i++)
        if (!strcasecmp(n, H[i])) return true;
    return false;
}

static size_t fwd_header(char *d, size_t sz, size_t nm, void *u) {
    fwd *f = u;
    size_t k = sz * nm;
    if (k >= 5 && !strncmp(d, "HTTP/", 5)) {   /* a status line: a (new) response begins */
        for (int i = 0; i < f->n_rh; i++) { free(f->rh[i].name); free(f->rh[i].value); }
        f->n_rh = 0;
        const char *sp = memchr(d, ' ', k);
        f->status = sp ? strtol(sp + 1, NULL, 10) : 0;
        f->in_headers = true;
        f->headers_done = false;
        f->sse = false;
        return k;
    }
    if (k <= 2 && (d[0] == '\r' || d[0] == '\n')) {
        if (f->in_headers && f->status >= 200) f->headers_done = true;
        f->in_headers = false;
        return k;
    }
    const char *colon = memchr(d, ':', k);
    if (!colon) return k;
    size_t nl = (size_t)(colon - d);
    const char *v = colon + 1, *end = d + k;
    while (v < end && (*v == ' ' || *v == '\t')) v++;
    while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' ')) end--;
    if (f->n_rh == f->cap_rh) {
        int c = f->cap_rh ? 2 * f->cap_rh : 16;
        hdr *q = realloc(f->rh, (size_t)c * sizeof *q);
        if (!q) return 0;
        f->rh = q;
        f->cap_rh = c;
    }
    hdr h = { strndup(d, nl), strndup(v, (size_t)(end - v)) };
    if (!h.name || !h.value) { free(h.name); free(h.value); return 0; }
    if (!strcasecmp(h.name, "content-type") && !strncasecmp(h.value, "text/event-stream", 17)) f->sse = true;
    f->rh[f->n_rh++] = h;
    return k;
}

static void fwd_free(fwd *f) {
    if (!f) return;
    if (f->e) {
        if (f->m) curl_multi_remove_handle(f->m, f->e);
        curl_easy_cleanup(f->e);
    }
    if (f->m) curl_multi_cleanup(f->m);
    curl_slist_free_all(f->req_hdrs);
    for (int i = 0; i < f->n_rh; i++) { free(f->rh[i].name); free(f->rh[i].value); }
    free(f->rh);
    free(f->buf);
    free(f->tail);
    if (f->rep >= 0) {
        pthread_mutex_lock(&f->rt->mu);
        f->rt->reps[f->rep].inflight--;
        f->rt->inflight--;
        pthread_mutex_unlock(&f->rt->mu);
    }
    free(f);
}

typedef struct { struct curl_slist *l; bool oom; } hdr_acc;
static enum MHD_Result collect_header(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
    hdr_acc *a = cls;
    if (!key || hop_by_hop(key)) return MHD_YES;
    size_t n = strlen(key) + strlen(value ? value : "") + 3;
    char *line = malloc(n);
    if (!line) { a->oom = true; return MHD_NO; }
    snprintf(line, n, "%s: %s", key, value ? value : "");
    struct curl_slist *l = curl_slist_append(a->l, line);
    free(line);
    if (!l) { a->oom = true; return MHD_NO; }
    a->l = l;
    return MHD_YES;
}

typedef struct { char *p; size_t n, cap; bool oom; } qbuf;
static enum MHD_Result collect_arg(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
    qbuf *q = cls;
    char *k = curl_easy_escape(NULL, key, 0), *v = value ? curl_easy_escape(NULL, value, 0) : NULL;
    size_t want = q->n + (k ? strlen(k) : 0) + (v ? strlen(v) : 0) + 3;
    if (k && (!value || v) && want > q->cap) {
        char *g = realloc(q->p, 2 * want);
        if (g) { q->p = g; q->cap = 2 * want; }
    }
    if (!k || (value && !v) || want > q->cap) {
        q->oom = true;
        curl_free(k);
        curl_free(v);
        return MHD_NO;
    }
    q->n += (size_t)snprintf(q->p + q->n, q->cap - q->n, "%c%s%s%s", q->n ? '&' : '?', k, v ? "=" : "", v ? v : "");
    curl_free(k);
    curl_free(v);
    return MHD_YES;
}

/* Starts forwarding the client's request (method, path + query, headers, body) to replica i. */
static fwd *fwd_start(router *rt, int i, struct MHD_Connection *c, const char *method, const char *path, const char *query,
                      const char *body, size_t len) {
    fwd *f = calloc(1, sizeof *f);
    if (!f) return NULL;
    f->rt = rt;
    f->rep = -1;
    f->client_fd = -1;
    hdr_acc a = { 0 };
    if (c) MHD_get_connection_values(c, MHD_HEADER_KIND, collect_header, &a);
    struct curl_slist *l = a.oom ? NULL : curl_slist_append(a.l, "Expect:");
    if (!l) { curl_slist_free_all(a.l); free(f); return NULL; }
    f->req_hdrs = l;
    size_t ul = strlen(rt->reps[i].url) + strlen(path) + strlen(query) + 1;
    char *url = malloc(ul);
    if (!url || !(f->m = curl_multi_init()) || !(f->e = curl_easy_init())) { free(url); fwd_free(f); return NULL; }
    snprintf(url, ul, "%s%s%s", rt->reps[i].url, path, query);
    CURL *e = f->e;
    curl_easy_setopt(e, CURLOPT_URL, url);
    free(url);   /* libcurl copies option strings */
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, 2000L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, f->req_hdrs);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, fwd_write);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, f);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, fwd_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, f);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, f->err);
    curl_easy_setopt(e, CURLOPT_BUFFERSIZE, 65536L);
    if (!strcmp(method, "GET")) curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    else if (!strcmp(method, "HEAD")) curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    else {
        if (strcmp(method, "POST")) curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
        if (!strcmp(method, "POST") || len) {
            curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
            curl_easy_setopt(e, CURLOPT_POSTFIELDS, body ? body : "");
        }
    }
    if (curl_multi_add_handle(f->m, e) != CURLM_OK) { fwd_free(f); return NULL; }
    f->rep = i;
    pthread_mutex_lock(&rt->mu);
    rt->reps[i].inflight++;
    rt->inflight++;
    pthread_mutex_unlock(&rt->mu);
    return f;
}

/* Runs the transfer for up to ms milliseconds or until something arrives. */
static void fwd_pump(fwd *f, int ms) {
    int running = 0, nfd = 0;
    curl_multi_perform(f->m, &running);
    if (running) {
        curl_multi_poll(f->m, NULL, 0, ms, &nfd);
        curl_multi_perform(f->m, &running);
    }
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(f->m, &left)))
        if (msg->msg == CURLMSG_DONE) {
            f->done = true;
            f->res = msg->data.result;
            if (f->res == CURLE_OK && !f->headers_done) f->headers_done = true;   /* HEAD / bodyless */
        }
}


/* Streaming reader: whole SSE events as they come, then, if the replica's stream broke, the
 * API's error event. */
static ssize_t sse_reader(void *cls, uint64_t pos, char *out, size_t max) {
    fwd *f = cls;
    for (;;) {
        if (f->tail && f->tail_off < f->tail_len) {
            size_t n = f->tail_len - f->tail_off;
            if (n > max) n = max;
            memcpy(out, f->tail + f->tail_off, n);
            f->tail_off += n;
            return (ssize_t)n;
        }
        if (f->ended) return MHD_CONTENT_READER_END_OF_STREAM;
        if (f->len > f->off) {
            size_t n = 0;
            if (f->done && f->res == CURLE_OK) n = f->len - f->off;   /* the end: all of it */
            else   /* up to the end of the last whole event */
                for (size_t i = f->len; i >= f->off + 2; i--)
                    if (f->buf[i - 1] == '\n' && f->buf[i - 2] == '\n') { n = i - f->off; break; }
            if (n) {
                if (n > max) n = max;
                memcpy(out, f->buf + f->off, n);
                f->off += n;
                return (ssize_t)n;
            }
        }
        if (f->done) {
            if (f->res != CURLE_OK) {
                char msg[300];
                snprintf(msg, sizeof msg, "the replica's stream broke: %s", f->err[0] ? f->err : curl_easy_strerror(f->res));
                char *ev = api_format_stream_error(f->anthropic, msg);
                const char *done = f->anthropic ? "" : "data: [DONE]\n\n";
                size_t a = ev ? strlen(ev) : 0, b = strlen(done);
                if ((f->tail = malloc(a + b + 1))) {
                    memcpy(f->tail, ev ? ev : "", a);
                    memcpy(f->tail + a, done, b + 1);
                    f->tail_len = a + b;
                }
                free(ev);
                pthread_mutex_lock(&f->rt->mu);
                f->rt->streams_broken++;
                f->rt->reps[f->rep].streams_broken++;
                pthread_mutex_unlock(&f->rt->mu);
                mark_down(f->rt, f->rep, msg);
            }
            f->off = f->len;
            f->ended = true;
            continue;
        }
        if (http_peer_gone(f->client_fd)) return MHD_CONTENT_READER_END_WITH_ERROR;
        fwd_pump(f, 250);
    }
}

static void sse_free(void *cls) { fwd_free(cls); }

/* ------------------------------------------------------------------------------ replies */
static void count_status(router *rt, int rep, int status) {
    pthread_mutex_lock(&rt->mu);
    rt->requests++;
    if (rep >= 0) {
        int k = status >= 100 && status < 600 ? status / 100 : 0;
        rt->reps[rep].status[k]++;
    }
    pthread_mutex_unlock(&rt->mu);
}

static enum MHD_Result reply_body(struct MHD_Connection *c, int status, const char *ctype, char *body, int retry_s) {
    if (!body) body = strdup("{}");
    if (!body) return MHD_NO;
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    if (!r) { free(body); return MHD_NO; }
    MHD_add_response_header(r, "Content-Type", ctype);
    return http_queue(c, status, r, retry_s);
}

static enum MHD_Result reply_error(router *rt, struct MHD_Connection *c, bool anth, const api_error *e, int retry_s) {
    count_status(rt, -1, e->status);
    return reply_body(c, e->status, "application/json", api_format_error(anth, e), retry_s);
}

static enum MHD_Result reply_err(router *rt, struct MHD_Connection *c, bool anth, int status, const char *type, const char *code,
                                 int retry_s, const char *fmt, ...) __attribute__((format(printf, 8, 9)));
static enum MHD_Result reply_err(router *rt, struct MHD_Connection *c, bool anth, int status, const char *type, const char *code,
                                 int retry_s, const char *fmt, ...) {
    api_error e;
    api_error_set(&e, status, type, NULL, code, "%s", "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e.message, sizeof e.message, fmt, ap);
    va_end(ap);
    return reply_error(rt, c, anth, &e, retry_s);
}

/* The replica's answer (f done, or streaming with its headers in) to the client. Takes f. */
static enum MHD_Result reply_forwarded(router *rt, struct MHD_Connection *c, fwd *f) {
    struct MHD_Response *r;
    bool stream = f->sse && !(f->done && f->res != CURLE_OK);
    if (stream) {
        r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, sse_reader, f, sse_free);
        if (!r) { fwd_free(f); return MHD_NO; }
    } else {
        r = MHD_create_response_from_buffer(f->len - f->off, f->buf ? f->buf + f->off : (void *)"", MHD_RESPMEM_MUST_COPY);
        if (!r) { fwd_free(f); return MHD_NO; }
    }
    for (int i = 0; i < f->n_rh; i++)
        if (!hop_by_hop(f->rh[i].name)) MHD_add_response_header(r, f->rh[i].name, f->rh[i].value);
    if (stream) MHD_add_response_header(r, "X-Accel-Buffering", "no");
    int status = (int)f->status;
    count_status(rt, f->rep, status);
    enum MHD_Result ret = MHD_queue_response(c, (unsigned)status, r);
    MHD_destroy_response(r);   /* a stream's f is the response's now (sse_free) */
    if (!stream) fwd_free(f);
    return ret;
}

/* ------------------------------------------------------------------------------ requests */
static int classify(const char *url, const char *method, bool *anthropic, const char **resp_id) {
    *anthropic = false;
    *resp_id = NULL;
    if (!strcmp(url, "/health")) return EP_HEALTH;
    if (!strcmp(url, "/metrics")) return EP_METRICS;
    const char *p = !strncmp(url, "/v1/", 4) ? url + 3 : url;
    if (!strncmp(p, "/messages", 9)) *anthropic = true;
    if (strcmp(method, "POST")) {
        if (!strncmp(p, "/responses/", 11) && p[11] && !strchr(p + 11, '/')) { *resp_id = p + 11; return EP_RESPONSE_ID; }
        return EP_FWD;
    }
    if (!strcmp(p, "/chat/completions")) return EP_GEN_CHAT;
    if (!strcmp(p, "/completions")) return EP_GEN_COMPLETIONS;
    if (!strcmp(p, "/messages")) return EP_GEN_MESSAGES;
    if (!strcmp(p, "/responses")) return EP_GEN_RESPONSES;
    if (!strcmp(p, "/messages/count_tokens")) return EP_COUNT;
    return EP_FWD;
}

/* The caller's namespace, or -1 when keys are required and this one is missing or wrong. */
static bool key_eq(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    unsigned char d = la != lb;
    for (size_t i = 0; i < la; i++) d |= (unsigned char)(a[i] ^ b[i % (lb ? lb : 1)]);
    return d == 0;
}
static int authorize(router *rt, struct MHD_Connection *c, char ns[18]) {
    ns[0] = 0;
    const char *k = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "x-api-key");
    const char *a = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    if (!k && a && !strncasecmp(a, "Bearer ", 7)) { k = a + 7; while (*k == ' ') k++; }
    if (k && !*k) k = NULL;
    if (rt->n_keys == 0) {
        if (k) server_key_namespace(k, ns);
        return 0;
    }
    if (!k) return -1;
    bool found = false;
    for (int i = 0; i < rt->n_keys; i++) found |= key_eq(k, rt->keys[i]);
    if (!found) return -1;
    server_key_namespace(k, ns);
    return 0;
}

/* The replicas as candidates for a request with these chains (n may be 0). */
static int candidates(router *rt, const uint64_t *chains, int n, route_cand *cand, const bool *tried) {
    uint64_t inst[MAX_REPLICAS];
    bool has[MAX_REPLICAS];
    pthread_mutex_lock(&rt->mu);
    for (int i = 0; i < rt->n_reps; i++) {
        replica *r = &rt->reps[i];
        cand[i] = (route_cand){ .healthy = r->healthy && !(tried && tried[i]), .load = rep_load(r), .id = r->id };
        inst[i] = r->inst;
        has[i] = r->has_inst;
    }
    pthread_mutex_unlock(&rt->mu);
    if (n > 0) {
        uint32_t now = idx_now(rt);
        pthread_rwlock_rdlock(&rt->idx_mu);
        for (int i = 0; i < rt->n_reps; i++) {
            int me = has[i] ? kvindex_match(rt->events, inst[i], chains, n, now) : 0;
            int mp = kvindex_match(rt->predicted, (uint64_t)i, chains, n, now);
            cand[i].match = me > mp ? me : mp;
        }
        pthread_rwlock_unlock(&rt->idx_mu);
    }
    return rt->n_reps;
}

/* The replica that stored Responses response `id` for this caller: asks each healthy one
 * (GET /v1/responses/{id} with the caller's credential). -1 when none has it. */
static int response_owner(router *rt, struct MHD_Connection *c, const char *id) {
    hdr_acc a = { 0 };
    const char *k = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "x-api-key");
    const char *au = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    char line[1200];
    if (k && strlen(k) < 1000) { snprintf(line, sizeof line, "x-api-key: %s", k); a.l = curl_slist_append(a.l, line); }
    if (au && strlen(au) < 1000) { snprintf(line, sizeof line, "Authorization: %s", au); a.l = curl_slist_append(a.l, line); }
    char *eid = curl_easy_escape(NULL, id, 0);
    int owner = -1;
    for (int i = 0; eid && i < rt->n_reps && owner < 0; i++) {
        pthread_mutex_lock(&rt->mu);
        bool ok = rt->reps[i].healthy;
        pthread_mutex_unlock(&rt->mu);
        if (!ok) continue;
        CURL *e = curl_easy_init();
        if (!e) break;
        char url[1200];
        snprintf(url, sizeof url, "%s/v1/responses/%s", rt->reps[i].url, eid);
        mbuf b = { 0 };
        curl_easy_setopt(e, CURLOPT_URL, url);
        curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, 3000L);
        curl_easy_setopt(e, CURLOPT_HTTPHEADER, a.l);
        curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, mbuf_write);
        curl_easy_setopt(e, CURLOPT_WRITEDATA, &b);
        long code = 0;
        if (curl_easy_perform(e) == CURLE_OK && curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &code) == CURLE_OK && code == 200) owner = i;
        curl_easy_cleanup(e);
        free(b.p);
    }
    curl_free(eid);
    curl_slist_free_all(a.l);
    return owner;
}

/* What routing needs of a generation request: its prompt's chains and affinity, or an error. */
typedef struct plan {
    uint64_t *chains;
    int n_chains, n_tokens;
    uint64_t affinity;
    const char *prev_id;      /* Responses previous_response_id (into req) */
    api_request req;
    bool parsed;
} plan;

static void plan_free(plan *p) {
    free(p->chains);
    if (p->parsed) api_request_free(&p->req);
    memset(p, 0, sizeof *p);
}

static int plan_request(router *rt, conn *cs, plan *p, api_error *e) {
    static const api_kind kinds[] = { [EP_GEN_CHAT] = API_OPENAI_CHAT, [EP_GEN_COMPLETIONS] = API_OPENAI_COMPLETION,
                                      [EP_GEN_MESSAGES] = API_ANTHROPIC_MESSAGES, [EP_GEN_RESPONSES] = API_OPENAI_RESPONSES };
    memset(p, 0, sizeof *p);
    if (prompt_parse(kinds[cs->ep], cs->in.body ? cs->in.body : "", cs->in.len, &p->req, e) < 0) return -1;
    p->parsed = true;
    char ns[18];
    prompt_namespace(cs->ns, p->req.cache_salt, ns);
    if (p->req.kind == API_OPENAI_RESPONSES && p->req.prev_id) {   /* its tokens are the replica's */
        p->prev_id = p->req.prev_id;
        p->affinity = route_affinity(ns, p->req.cache_key, NULL, 0);
        return 0;
    }
    rendered_prompt pr;
    if (prompt_tokens(&rt->pm, &p->req, NULL, &pr, e) < 0) return -1;
    p->n_tokens = pr.n;
    int nb = pr.n / KV_BLOCK;
    if (nb > 0 && (p->chains = malloc((size_t)nb * sizeof *p->chains)))
        p->n_chains = kvevent_prompt_chains(rt->fp, rt->n_layer, rt->kv_dim, ns, pr.tokens, pr.n, p->chains, nb);
    p->affinity = route_affinity(ns, p->req.cache_key, pr.tokens, pr.n);
    prompt_free(&pr);
    return 0;
}

static enum MHD_Result handle(router *rt, struct MHD_Connection *c, conn *cs, const char *url, const char *method) {
    if (atomic_load(&rt->draining))
        return reply_err(rt, c, cs->anthropic, 503, cs->anthropic ? "overloaded_error" : "server_error", NULL, 5, "router is shutting down");
    plan p = { 0 };
    api_error e;
    bool gen = cs->ep <= EP_GEN_RESPONSES;
    if (gen && plan_request(rt, cs, &p, &e) < 0) {
        plan_free(&p);
        pthread_mutex_lock(&rt->mu);
        rt->bad_requests++;
        pthread_mutex_unlock(&rt->mu);
        return reply_error(rt, c, cs->anthropic, &e, 0);
    }
    int owner = -1;
    if (p.prev_id) owner = response_owner(rt, c, p.prev_id);
    else if (cs->ep == EP_RESPONSE_ID) owner = response_owner(rt, c, cs->resp_id);
    qbuf q = { 0 };
    MHD_get_connection_values(c, MHD_GET_ARGUMENT_KIND, collect_arg, &q);
    const char *query = q.p && !q.oom ? q.p : "";
    int fd = -1;
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (ci) fd = ci->connect_fd;

    bool tried[MAX_REPLICAS] = { 0 };
    route_cand cand[MAX_REPLICAS];
    fwd *f = NULL;
    enum MHD_Result ret = MHD_NO;
    char last_err[300] = "";
    for (int attempt = 0; attempt < rt->n_reps; attempt++) {
        int n = candidates(rt, p.chains, p.n_chains, cand, tried);
        route_reason why;
        int pick;
        if (owner >= 0 && !tried[owner] && cand[owner].healthy) { pick = owner; why = RR_RESPONSE; }
        else if (gen && !p.prev_id) {
            /* a prefix counts from --min-match of the prompt on (at least one block) */
            int mm = (int)(rt->min_match * p.n_tokens / KV_BLOCK + 0.999);
            if (mm > p.n_chains) mm = p.n_chains;   /* the last partial block is never held */
            route_params rp = { rt->policy, rt->threshold, mm, p.affinity, atomic_fetch_add(&rt->rr, 1) };
            pick = route_choose(&rp, cand, n, &why);
        } else {
            route_params rp = { ROUTE_LEAST_LOADED, 0, 1, 0, atomic_fetch_add(&rt->rr, 1) };
            pick = route_choose(&rp, cand, n, &why);
            why = RR_OTHER;
        }
        if (pick < 0) break;
        tried[pick] = true;
        pthread_mutex_lock(&rt->mu);
        rt->decisions[why]++;
        if (attempt > 0) rt->retries++;
        rt->reps[pick].requests++;
        if (gen) {
            rt->reps[pick].prompt_tokens += (uint64_t)p.n_tokens;
            rt->reps[pick].hit_tokens += (uint64_t)cand[pick].match * KV_BLOCK;
        }
        pthread_mutex_unlock(&rt->mu);
        if (!(f = fwd_start(rt, pick, c, method, url, query, cs->in.body, cs->in.len))) {
            ret = reply_err(rt, c, cs->anthropic, 500, cs->anthropic ? "api_error" : "server_error", NULL, 0, "out of memory");
            goto out;
        }
        f->anthropic = cs->anthropic;
        f->client_fd = fd;
        /* Until the client has a byte, any failure can go elsewhere: wait for the whole answer,
         * or for a stream's first event. */
        while (!f->done && !(f->headers_done && f->sse && f->len > f->off)) {
            fwd_pump(f, 250);
            if (!f->done && http_peer_gone(fd)) { fwd_free(f); f = NULL; ret = MHD_NO; goto out; }
        }
        bool failed = f->done && f->res != CURLE_OK;
        bool busy = !failed && (f->status == 503 || f->status == 429 || f->status == 529);
        if (!failed && !busy) break;
        if (f->too_large) {
            fwd_free(f);
            f = NULL;
            ret = reply_err(rt, c, cs->anthropic, 502, cs->anthropic ? "api_error" : "server_error", NULL, 0,
                            "the replica's answer is larger than %zu bytes", MAX_RESPONSE_BODY);
            goto out;
        }
        if (failed) {
            snprintf(last_err, sizeof last_err, "%s: %s", rt->reps[pick].url, f->err[0] ? f->err : curl_easy_strerror(f->res));
            mark_down(rt, pick, last_err);
        }
        /* the last candidate's busy answer goes to the client as it is */
        bool more = false;
        candidates(rt, NULL, 0, cand, tried);
        for (int i = 0; i < rt->n_reps; i++) more |= cand[i].healthy;
        if (busy && !more) break;
        fwd_free(f);
        f = NULL;
    }
    if (!f) {
        pthread_mutex_lock(&rt->mu);
        rt->no_replica++;
        pthread_mutex_unlock(&rt->mu);
        if (last_err[0])
            ret = reply_err(rt, c, cs->anthropic, 502, cs->anthropic ? "api_error" : "server_error", NULL, 1,
                            "no replica could serve the request (last: %s)", last_err);
        else
            ret = reply_err(rt, c, cs->anthropic, 503, cs->anthropic ? "overloaded_error" : "server_error", NULL, 1,
                            "no healthy replica");
        goto out;
    }
    if (gen && p.n_chains > 0 && f->status == 200) {   /* it will hold these blocks now */
        uint32_t now = idx_now(rt);
        pthread_rwlock_wrlock(&rt->idx_mu);
        kvindex_store(rt->predicted, (uint64_t)f->rep, p.chains, p.n_chains, now + (uint32_t)rt->predict_ttl_s, now);
        pthread_rwlock_unlock(&rt->idx_mu);
    }
    MHD_set_connection_option(c, MHD_CONNECTION_OPTION_TIMEOUT, 3600u);
    ret = reply_forwarded(rt, c, f);
out:
    free(q.p);
    plan_free(&p);
    return ret;
}

/* ------------------------------------------------------------------------------ own endpoints */

/* The replicas' instance ids as /health polls last saw them (has[i]: replica i answered one). */
static void rep_instances(router *rt, uint64_t *inst, bool *has) {
    pthread_mutex_lock(&rt->mu);
    for (int i = 0; i < rt->n_reps; i++) { inst[i] = rt->reps[i].inst; has[i] = rt->reps[i].has_inst; }
    pthread_mutex_unlock(&rt->mu);
}

static char *format_metrics(router *rt) {
    obuf b = { 0 };
    size_t ev_chains[MAX_REPLICAS], pr_chains[MAX_REPLICAS];
    uint64_t inst[MAX_REPLICAS];
    bool has[MAX_REPLICAS];
    rep_instances(rt, inst, has);
    pthread_rwlock_rdlock(&rt->idx_mu);
    for (int i = 0; i < rt->n_reps; i++) {
        ev_chains[i] = has[i] ? kvindex_count(rt->events, inst[i]) : 0;
        pr_chains[i] = kvindex_count(rt->predicted, (uint64_t)i);
    }
    uint64_t dropped = kvindex_dropped(rt->events) + kvindex_dropped(rt->predicted);
    pthread_rwlock_unlock(&rt->idx_mu);
    pthread_mutex_lock(&rt->mu);
    ob_printf(&b, "# HELP pcache_router_decisions_total Routing decisions by reason.\n# TYPE pcache_router_decisions_total counter\n");
    for (int r = 0; r < RR_N; r++)
        ob_printf(&b, "pcache_router_decisions_total{reason=\"%s\"} %llu\n", route_reason_name(r), (unsigned long long)rt->decisions[r]);
    ob_printf(&b, "# HELP pcache_router_requests_total Requests answered by the router (its own errors included).\n"
                  "# TYPE pcache_router_requests_total counter\npcache_router_requests_total %llu\n", (unsigned long long)rt->requests);
    ob_printf(&b, "# HELP pcache_router_replica_requests_total Requests sent to each replica (retries included).\n"
                  "# TYPE pcache_router_replica_requests_total counter\n");
    for (int i = 0; i < rt->n_reps; i++)
        ob_printf(&b, "pcache_router_replica_requests_total{replica=\"%s\"} %llu\n", rt->reps[i].url, (unsigned long long)rt->reps[i].requests);
    ob_printf(&b, "# HELP pcache_router_replica_responses_total Replica answers passed on, by status class.\n"
                  "# TYPE pcache_router_replica_responses_total counter\n");
    for (int i = 0; i < rt->n_reps; i++)
        for (int k = 1; k < 6; k++)
            if (rt->reps[i].status[k])
                ob_printf(&b, "pcache_router_replica_responses_total{replica=\"%s\",code=\"%dxx\"} %llu\n", rt->reps[i].url, k,
                          (unsigned long long)rt->reps[i].status[k]);
    ob_printf(&b, "# HELP pcache_router_prompt_tokens_total Prompt tokens of generation requests sent to each replica.\n"
                  "# TYPE pcache_router_prompt_tokens_total counter\n");
    for (int i = 0; i < rt->n_reps; i++)
        ob_printf(&b, "pcache_router_prompt_tokens_total{replica=\"%s\"} %llu\n", rt->reps[i].url, (unsigned long long)rt->reps[i].prompt_tokens);
    ob_printf(&b, "# HELP pcache_router_predicted_hit_tokens_total Prompt tokens the chosen replica was expected to hold "
                  "(leading full blocks; the predicted hit rate is this over prompt tokens).\n"
                  "# TYPE pcache_router_predicted_hit_tokens_total counter\n");
    for (int i = 0; i < rt->n_reps; i++)
        ob_printf(&b, "pcache_router_predicted_hit_tokens_total{replica=\"%s\"} %llu\n", rt->reps[i].url, (unsigned long long)rt->reps[i].hit_tokens);
    ob_printf(&b, "# HELP pcache_router_replica_healthy Whether the replica is taking requests.\n# TYPE pcache_router_replica_healthy gauge\n");
    for (int i = 0; i < rt->n_reps; i++) ob_printf(&b, "pcache_router_replica_healthy{replica=\"%s\"} %d\n", rt->reps[i].url, rt->reps[i].healthy);
    ob_printf(&b, "# HELP pcache_router_replica_load Requests running or waiting at the replica, as the router estimates.\n"
                  "# TYPE pcache_router_replica_load gauge\n");
    int lo = 0, hi = 0, n_ok = 0;
    for (int i = 0; i < rt->n_reps; i++) {
        int l = rep_load(&rt->reps[i]);
        ob_printf(&b, "pcache_router_replica_load{replica=\"%s\"} %d\n", rt->reps[i].url, l);
        if (!rt->reps[i].healthy) continue;
        if (!n_ok || l < lo) lo = l;
        if (!n_ok || l > hi) hi = l;
        n_ok++;
    }
    ob_printf(&b, "# HELP pcache_router_load_spread Highest minus lowest load over the healthy replicas.\n"
                  "# TYPE pcache_router_load_spread gauge\npcache_router_load_spread %d\n", hi - lo);
    ob_printf(&b, "# HELP pcache_router_replica_failures_total Transfers to the replica that failed (it was marked down).\n"
                  "# TYPE pcache_router_replica_failures_total counter\n");
    for (int i = 0; i < rt->n_reps; i++)
        ob_printf(&b, "pcache_router_replica_failures_total{replica=\"%s\"} %llu\n", rt->reps[i].url, (unsigned long long)rt->reps[i].failures);
    ob_printf(&b, "# HELP pcache_router_index_blocks Blocks each replica holds: from its KV events, and predicted by the router.\n"
                  "# TYPE pcache_router_index_blocks gauge\n");
    for (int i = 0; i < rt->n_reps; i++) {
        ob_printf(&b, "pcache_router_index_blocks{replica=\"%s\",source=\"events\"} %zu\n", rt->reps[i].url, ev_chains[i]);
        ob_printf(&b, "pcache_router_index_blocks{replica=\"%s\",source=\"predicted\"} %zu\n", rt->reps[i].url, pr_chains[i]);
    }
    ob_printf(&b, "# TYPE pcache_router_index_dropped_total counter\npcache_router_index_dropped_total %llu\n", (unsigned long long)dropped);
    ob_printf(&b, "# HELP pcache_router_retries_total Requests sent to another replica after one failed before the first byte.\n"
                  "# TYPE pcache_router_retries_total counter\npcache_router_retries_total %llu\n", (unsigned long long)rt->retries);
    ob_printf(&b, "# TYPE pcache_router_no_replica_total counter\npcache_router_no_replica_total %llu\n", (unsigned long long)rt->no_replica);
    ob_printf(&b, "# HELP pcache_router_streams_broken_total Streams that broke midway (ended with an error event).\n"
                  "# TYPE pcache_router_streams_broken_total counter\npcache_router_streams_broken_total %llu\n",
              (unsigned long long)rt->streams_broken);
    ob_printf(&b, "# TYPE pcache_router_bad_requests_total counter\npcache_router_bad_requests_total %llu\n", (unsigned long long)rt->bad_requests);
    ob_printf(&b, "# TYPE pcache_router_in_flight gauge\npcache_router_in_flight %d\n", rt->inflight);
    ob_printf(&b, "# HELP pcache_router_redis_connected Whether the KV events stream is being read (-1: no --redis).\n"
                  "# TYPE pcache_router_redis_connected gauge\npcache_router_redis_connected %d\n", rt->redis_on ? (int)rt->redis_up : -1);
    ob_printf(&b, "# TYPE pcache_router_redis_connects_total counter\npcache_router_redis_connects_total %llu\n", (unsigned long long)rt->redis_connects);
    ob_printf(&b, "# HELP pcache_router_redis_errors_total Connects to Redis that failed (refused, AUTH) and connections lost.\n"
                  "# TYPE pcache_router_redis_errors_total counter\npcache_router_redis_errors_total %llu\n", (unsigned long long)rt->redis_errors);
    ob_printf(&b, "# HELP pcache_router_kv_events_total KV events read, by outcome.\n# TYPE pcache_router_kv_events_total counter\n"
                  "pcache_router_kv_events_total{outcome=\"applied\"} %llu\npcache_router_kv_events_total{outcome=\"skipped\"} %llu\n"
                  "pcache_router_kv_events_total{outcome=\"malformed\"} %llu\n",
              (unsigned long long)rt->events_applied, (unsigned long long)rt->events_skipped, (unsigned long long)rt->events_bad);
    pthread_mutex_unlock(&rt->mu);
    return b.p;
}

static char *format_health(router *rt, int *status) {
    cJSON *o = cJSON_CreateObject(), *arr = cJSON_CreateArray();
    size_t blocks[MAX_REPLICAS] = { 0 };
    uint64_t inst[MAX_REPLICAS];
    bool has[MAX_REPLICAS];
    rep_instances(rt, inst, has);
    pthread_rwlock_rdlock(&rt->idx_mu);
    for (int i = 0; i < rt->n_reps; i++) blocks[i] = has[i] ? kvindex_count(rt->events, inst[i]) : 0;
    pthread_rwlock_unlock(&rt->idx_mu);
    int healthy = 0;
    pthread_mutex_lock(&rt->mu);
    for (int i = 0; i < rt->n_reps; i++) {
        replica *r = &rt->reps[i];
        cJSON *x = cJSON_CreateObject();
        cJSON_AddStringToObject(x, "url", r->url);
        cJSON_AddBoolToObject(x, "healthy", r->healthy);
        cJSON_AddNumberToObject(x, "load", rep_load(r));
        char h[17] = "";
        if (r->has_inst) kvevent_hex64(r->inst, h);
        cJSON_AddStringToObject(x, "instance", h);
        cJSON_AddNumberToObject(x, "blocks", (double)blocks[i]);
        cJSON_AddItemToArray(arr, x);
        healthy += r->healthy;
    }
    bool draining = atomic_load(&rt->draining);
    cJSON_AddStringToObject(o, "status", draining ? "draining" : healthy ? "ok" : "no healthy replica");
    cJSON_AddNumberToObject(o, "healthy", healthy);
    cJSON_AddStringToObject(o, "policy", route_policy_name(rt->policy));
    cJSON_AddStringToObject(o, "redis", !rt->redis_on ? "off" : rt->redis_up ? "connected" : "disconnected");
    /* why it is not connected (refused, NOAUTH, WRONGPASS, lost): Redis's and hiredis's messages
     * name no password */
    if (rt->redis_on && !rt->redis_up && rt->redis_err[0]) cJSON_AddStringToObject(o, "redis_error", rt->redis_err);
    cJSON_AddNumberToObject(o, "events_applied", (double)rt->events_applied);
    pthread_mutex_unlock(&rt->mu);
    cJSON_AddItemToObject(o, "replicas", arr);
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    *status = draining || !healthy ? 503 : 200;
    return s;
}

/* ------------------------------------------------------------------------------ HTTP front */
static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_data_size, void **con_cls) {
    router *rt = cls;
    conn *cs = *con_cls;
    if (!cs) {
        if (!(cs = calloc(1, sizeof *cs))) return MHD_NO;
        *con_cls = cs;
        cs->ep = classify(url, method, &cs->anthropic, &cs->resp_id);
        if (cs->ep == EP_HEALTH || cs->ep == EP_METRICS) {
            cs->answered = true;
            if (cs->ep == EP_METRICS) return reply_body(c, 200, "text/plain; version=0.0.4", format_metrics(rt), 0);
            int st;
            char *body = format_health(rt, &st);
            return reply_body(c, st, "application/json", body, 0);
        }
        if (strcmp(method, "OPTIONS") && authorize(rt, c, cs->ns) < 0) {
            cs->answered = true;
            if (cs->anthropic) return reply_err(rt, c, true, 401, "authentication_error", NULL, 0, "invalid x-api-key");
            api_error e;
            api_error_set(&e, 401, "invalid_request_error", NULL, "invalid_api_key", "Incorrect API key provided.");
            return reply_error(rt, c, false, &e, 0);
        }
        if (http_body_too_large(c, API_MAX_BODY)) {
            cs->answered = true;
            return reply_err(rt, c, cs->anthropic, 413, cs->anthropic ? "request_too_large" : "invalid_request_error", NULL, 0,
                             "request body is larger than %u bytes", API_MAX_BODY);
        }
        return MHD_YES;
    }
    if (cs->answered) { *upload_data_size = 0; return MHD_YES; }
    if (*upload_data_size > 0) {
        size_t n = *upload_data_size;
        *upload_data_size = 0;
        return body_append(&cs->in, upload_data, n, API_MAX_BODY) ? MHD_YES : MHD_NO;
    }
    cs->answered = true;
    if (cs->in.too_large)
        return reply_err(rt, c, cs->anthropic, 413, cs->anthropic ? "request_too_large" : "invalid_request_error", NULL, 0,
                         "request body is larger than %u bytes", API_MAX_BODY);
    return handle(rt, c, cs, url, method);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe) {
    conn *cs = *con_cls;
    if (!cs) return;
    free(cs->in.body);
    free(cs);
    *con_cls = NULL;
}

/* ------------------------------------------------------------------------------ main */
static void usage(FILE *f) {
    fprintf(f,
            "usage: pcache route --replica URL [--replica URL]... [options]\n"
            "  --replica URL         a `pcache serve` replica, e.g. http://10.0.0.2:8080 (repeatable, at most %d)\n"
            "  --redis URL           the cluster's Redis, redis://[[user]:password@]host[:port][/db]: replicas' KV\n"
            "                        events (without it, routing uses the router's own predictions, affinity and load)\n"
            "  -m, --model PATH      the replicas' GGUF (only its tokenizer and metadata are loaded; default\n"
            "                        $PCACHE_MODEL or models/SmolLM2-135M-Instruct.Q4_1.gguf)\n"
            "  --host ADDR           bind address (default 127.0.0.1)\n"
            "  --port N              port (default 8090; 0 = any free port)\n"
            "  --api-key KEY         require this key (repeatable), as the replicas do; it is passed on to them\n"
            "  --policy P            cache (default), round-robin or least-loaded\n"
            "  --load-threshold N    cache policy: leave the replica holding the longest prefix when its load exceeds\n"
            "                        the least loaded one's by more than N requests (default 4)\n"
            "  --min-match F         cache policy: a cached prefix counts when it covers at least this fraction of the\n"
            "                        prompt (default 0.5; below, affinity decides)\n"
            "  --predict-ttl T       how long the router assumes a replica keeps a prompt it sent there (default 5m)\n"
            "  --health-interval T   seconds between /health polls of each replica (default 1)\n"
            "  --timeout S           drop clients idle for S seconds while sending a request (default 30)\n"
            "  --drain-timeout S     on SIGTERM/SIGINT, let in-flight requests finish for up to S seconds (default 30)\n"
            "Every API path is forwarded (OpenAI, Anthropic, /v1/models, Responses, preflights); /health and /metrics\n"
            "are the router's own.\n",
            MAX_REPLICAS);
}

static int load_model(router *rt, const char *path) {
    char err[512] = "";
    model_config mc;
    if (gguf_open(&rt->gf, path, err, sizeof err) != GGUF_OK || model_config_read(rt->gf, &mc, err, sizeof err) ||
        tokenizer_load(&rt->tok, rt->gf, err, sizeof err) || fingerprint_file(path, NULL, &rt->fp, NULL, err, sizeof err)) {
        fprintf(stderr, "pcache route: %s: %s\n", path, err[0] ? err : "cannot load");
        return -1;
    }
    rt->n_layer = (uint32_t)mc.n_layer;
    rt->kv_dim = (uint32_t)(mc.n_head_kv * mc.head_dim);
    rt->pm = prompt_model_of(rt->tok, rt->gf);
    return 0;
}

int router_main(int argc, char **argv) {
    router *rt = calloc(1, sizeof *rt);
    if (!rt) return 1;
    const char *host = "127.0.0.1", *model_path = default_model_path();
    long port = 8090;
    unsigned timeout = 30;
    double drain_s = 30;
    rt->threshold = 4;
    rt->min_match = 0.5;
    rt->health_s = 1;
    rt->predict_ttl_s = 300;
    rt->keys = calloc((size_t)argc + 1, sizeof *rt->keys);
    if (!rt->keys) return 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEED() do { if (!v) { fprintf(stderr, "pcache route: %s needs a value\n", a); return 2; } i++; } while (0)
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); return 0; }
        else if (!strcmp(a, "--replica")) {
            NEED();
            if (rt->n_reps == MAX_REPLICAS) { fprintf(stderr, "pcache route: at most %d replicas\n", MAX_REPLICAS); return 2; }
            replica *r = &rt->reps[rt->n_reps];
            char err[200];
            if (route_replica_url(v, r->url, sizeof r->url, err, sizeof err)) {
                fprintf(stderr, "pcache route: bad --replica %s: %s\n", v, err);
                return 2;
            }
            rt->n_reps++;
            r->id = route_hash(r->url);
            for (int k = 0; k < rt->n_reps - 1; k++)
                if (!strcmp(rt->reps[k].url, r->url)) { fprintf(stderr, "pcache route: --replica %s given twice\n", v); return 2; }
        }
        else if (!strcmp(a, "--redis")) {
            NEED();
            char err[200];
            if (redis_url_parse(v, getenv("REDIS_PASSWORD"), &rt->redis, err, sizeof err)) { fprintf(stderr, "pcache route: %s\n", err); return 2; }
            rt->redis_on = true;
        }
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) { NEED(); model_path = v; }
        else if (!strcmp(a, "--host")) { NEED(); host = v; }
        else if (!strcmp(a, "--port")) { NEED(); char *e; port = strtol(v, &e, 10); if (*e || port < 0 || port > 65535) { fprintf(stderr, "pcache route: bad --port %s\n", v); return 2; } }
        else if (!strcmp(a, "--api-key")) { NEED(); if (!*v) { fprintf(stderr, "pcache route: empty --api-key\n"); return 2; } rt->keys[rt->n_keys++] = (char *)v; }
        else if (!strcmp(a, "--policy")) { NEED(); int p = route_policy_parse(v); if (p < 0) { fprintf(stderr, "pcache route: bad --policy %s (cache, round-robin or least-loaded)\n", v); return 2; } rt->policy = (route_policy)p; }
        else if (!strcmp(a, "--load-threshold")) { NEED(); char *e; long t = strtol(v, &e, 10); if (*e || t < 0 || t > 1000000) { fprintf(stderr, "pcache route: bad --load-threshold %s\n", v); return 2; } rt->threshold = (int)t; }
        else if (!strcmp(a, "--min-match")) { NEED(); char *e; rt->min_match = strtod(v, &e); if (*e || !(rt->min_match >= 0 && rt->min_match <= 1)) { fprintf(stderr, "pcache route: bad --min-match %s (0 to 1)\n", v); return 2; } }
        else if (!strcmp(a, "--predict-ttl")) { NEED(); if (parse_duration(v, &rt->predict_ttl_s) < 0 || rt->predict_ttl_s < 0 || rt->predict_ttl_s > 1e8) { fprintf(stderr, "pcache route: bad --predict-ttl %s\n", v); return 2; } }
        else if (!strcmp(a, "--health-interval")) { NEED(); if (parse_duration(v, &rt->health_s) < 0 || rt->health_s < 0.05 || rt->health_s > 3600) { fprintf(stderr, "pcache route: bad --health-interval %s\n", v); return 2; } }
        else if (!strcmp(a, "--timeout")) { NEED(); long t = atol(v); if (t < 1 || t > 86400) { fprintf(stderr, "pcache route: bad --timeout %s\n", v); return 2; } timeout = (unsigned)t; }
        else if (!strcmp(a, "--drain-timeout")) { NEED(); if (parse_duration(v, &drain_s) < 0 || drain_s < 0) { fprintf(stderr, "pcache route: bad --drain-timeout %s\n", v); return 2; } }
        else { fprintf(stderr, "pcache route: unknown option %s\n", a); usage(stderr); return 2; }
#undef NEED
    }
    if (!rt->n_reps) { fprintf(stderr, "pcache route: no --replica given\n"); usage(stderr); return 2; }

    sigset_t sigs;
    http_block_signals(&sigs);
    if (curl_global_init(CURL_GLOBAL_DEFAULT)) { fprintf(stderr, "pcache route: libcurl failed to start\n"); return 1; }
    if (load_model(rt, model_path)) return 1;
    rt->t0 = now_mono();
    pthread_mutex_init(&rt->mu, NULL);
    pthread_rwlock_init(&rt->idx_mu, NULL);
    if (!(rt->events = kvindex_new((size_t)1 << 21, 256)) || !(rt->predicted = kvindex_new((size_t)1 << 20, MAX_REPLICAS))) {
        fprintf(stderr, "pcache route: out of memory\n");
        return 1;
    }
    for (int i = 0; i < rt->n_reps; i++) poll_replica(rt, i);   /* know who is up before the first request */
    pthread_t health, events;
    if (pthread_create(&health, NULL, health_main, rt)) { fprintf(stderr, "pcache route: cannot start the health thread\n"); return 1; }
    if (rt->redis_on && pthread_create(&events, NULL, events_main, rt)) { fprintf(stderr, "pcache route: cannot start the events thread\n"); return 1; }

    unsigned bound = 0;
    struct MHD_Daemon *d = http_start("pcache route", host, port, timeout, 1024, on_request, on_completed, rt, &bound);
    if (!d) return 1;
    logf_("%d replica(s), policy %s, %s, listening on http://%s:%u%s", rt->n_reps, route_policy_name(rt->policy),
          rt->redis_on ? "KV events from redis" : "no redis (predictions, affinity and load only)", host, bound,
          rt->n_keys ? " (API keys required)" : "");

    int sig = 0;
    sigwait(&sigs, &sig);
    atomic_store(&rt->draining, true);
    logf_("signal %d, draining (up to %.0f s; again to stop now)", sig, drain_s);
    double t0 = now_mono();
    for (;;) {
        pthread_mutex_lock(&rt->mu);
        int left = rt->inflight;
        pthread_mutex_unlock(&rt->mu);
        if (!left || now_mono() - t0 >= drain_s) break;
        struct timespec ts = { 0, 50 * 1000000L };
        if (sigtimedwait(&sigs, NULL, &ts) > 0) break;
    }
    atomic_store(&rt->stopping, true);
    MHD_quiesce_daemon(d);
    MHD_stop_daemon(d);
    pthread_join(health, NULL);
    if (rt->redis_on) pthread_join(events, NULL);
    for (int i = 0; i < rt->n_reps; i++)
        if (rt->reps[i].hc) curl_easy_cleanup(rt->reps[i].hc);
    kvindex_free(rt->events);
    kvindex_free(rt->predicted);
    tokenizer_free(rt->tok);
    gguf_close(rt->gf);
    curl_global_cleanup();
    pthread_mutex_destroy(&rt->mu);
    pthread_rwlock_destroy(&rt->idx_mu);
    free(rt->keys);
    free(rt);
    return 0;
}
