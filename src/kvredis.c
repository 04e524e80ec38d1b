/* kvredis: see kvredis.h.
 *
 * One mutex guards the queues and the statistics; the thread holds it except while it talks to
 * Redis. The write queue is a ring of records (block id + metadata) as in kvtier.c, and "held"
 * counts the pool blocks referenced for writing and not yet released (queued, being written,
 * written and waiting for kvredis_poll). Events are a ring of malloc'ed entries. Reads and
 * touches are linked lists of jobs. The encode buffer and the connection are the thread's. */
#include "kvredis.h"
#include "kvevent.h"
#include "util.h"
#include <errno.h>
#include <hiredis/hiredis.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#define READ_WINDOW 8           /* GETs in flight at once in a read job */
#define EWMA 0.25

typedef struct ev { int op, n; uint64_t chains[]; } ev;
typedef struct wjob { kvfile_meta m; int32_t block; double now; } wjob;

typedef struct rjob {
    int id;
    char ns[KVFILE_NS_MAX + 1];
    kvtier_item *items;         /* a read job's blocks; NULL for a touch job */
    uint64_t *chains;           /* a touch job's blocks */
    long long ttl_ms;
    double now;                 /* a read job's Unix time (the engine's clock) */
    int n, n_tokens;
    struct rjob *next;
} rjob;

struct kvredis {
    kvredis_opts o;
    size_t block_bytes, rec_cap;
    uint8_t *rec;               /* thread: one record being written */
    uint8_t *stage;             /* thread: one block (pools behind read_block / write_block) */
    char fp_hex[17], inst_hex[17], layout[32];
    pthread_t th;
    bool started;
    pthread_mutex_t mu;
    pthread_cond_t work, done_cv;
    bool stop;
    ev **evq;                   /* ring of ev_cap */
    int ev_cap, ev_head, ev_n;
    wjob *wq;                   /* ring of w_cap */
    int w_cap, w_head, w_n, held;
    int32_t *w_done;            /* finished writes' blocks, for the engine to unref */
    int n_w_done;
    rjob *r_head, *r_tail;      /* reads */
    rjob *t_head, *t_tail;      /* touches */
    rjob *r_done;               /* finished reads, newest first */
    bool busy, resync;
    atomic_bool connected;
    atomic_uint_fast64_t gen;
    kvredis_stats st;
    /* thread only */
    redisContext *c;
    int attempt;
    double next_try;
    unsigned rng;
    char chains[KVEVENT_MAX_CHAINS * 17 + 1];   /* an event's chains field */
};

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static unsigned xorshift(unsigned *s) {
    unsigned x = *s ? *s : 2463534242u;
    x ^= x << 13; x ^= x >> 17; x ^= x << 5;
    return *s = x;
}

/* ------------------------------------------------------------------ rules and sets (pure) */
bool kvredis_fetch_pays(double rtt_s, double block_s, int n_blocks, double prefill_tok_s) {
    if (n_blocks <= 0) return false;
    if (prefill_tok_s <= 0) return true;
    return rtt_s + n_blocks * block_s < (double)n_blocks * KV_BLOCK * prefill_tok_s;
}

static size_t slot_of(const chainset *s, uint64_t h) { return (size_t)((h ^ h >> 31) * 0x9E3779B97F4A7C15ull >> 7) & (s->cap - 1); }

bool chainset_has(const chainset *s, uint64_t h) {
    if (!h) return s->has_zero;
    if (!s->cap) return false;
    for (size_t i = slot_of(s, h);; i = (i + 1) & (s->cap - 1)) {
        if (s->keys[i] == h) return true;
        if (!s->keys[i]) return false;
    }
}

static int grow(chainset *s) {
    size_t cap = s->cap ? s->cap * 2 : 256;
    uint64_t *k = calloc(cap, sizeof *k);
    if (!k) return -1;
    chainset t = { k, cap, 0, false };
    for (size_t i = 0; i < s->cap; i++)
        if (s->keys[i]) {
            size_t j = slot_of(&t, s->keys[i]);
            while (k[j]) j = (j + 1) & (cap - 1);
            k[j] = s->keys[i];
        }
    free(s->keys);
    s->keys = k;
    s->cap = cap;
    return 0;
}

int chainset_add(chainset *s, uint64_t h) {
    if (!h) {
        if (s->has_zero) return 0;
        s->has_zero = true;
        return 1;
    }
    if ((s->n + 1) * 4 > s->cap * 3 && grow(s)) return -1;
    size_t i = slot_of(s, h);
    for (; s->keys[i]; i = (i + 1) & (s->cap - 1))
        if (s->keys[i] == h) return 0;
    s->keys[i] = h;
    s->n++;
    return 1;
}

int chainset_del(chainset *s, uint64_t h) {
    if (!h) {
        bool had = s->has_zero;
        s->has_zero = false;
        return had;
    }
    if (!s->cap) return 0;
    size_t i = slot_of(s, h);
    for (; s->keys[i] != h; i = (i + 1) & (s->cap - 1))
        if (!s->keys[i]) return 0;
    /* backward shift: move later members of the run into the hole when their home allows */
    size_t hole = i;
    for (size_t j = (i + 1) & (s->cap - 1); s->keys[j]; j = (j + 1) & (s->cap - 1)) {
        size_t home = slot_of(s, s->keys[j]);
        /* j's member may move to hole when home is not in (hole, j] (cyclically) */
        bool between = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!between) {
            s->keys[hole] = s->keys[j];
            hole = j;
        }
    }
    s->keys[hole] = 0;
    s->n--;
    return 1;
}

void chainset_clear(chainset *s) {
    if (s->keys) memset(s->keys, 0, s->cap * sizeof *s->keys);
    s->n = 0;
    s->has_zero = false;
}

void chainset_free(chainset *s) {
    free(s->keys);
    memset(s, 0, sizeof *s);
}

size_t chainset_size(const chainset *s) { return s->n + s->has_zero; }

size_t chainset_list(const chainset *s, size_t *pos, uint64_t *out, size_t cap) {
    size_t n = 0;
    /* position 0 is the zero hash, positions 1.. are the slots */
    if (*pos == 0) {
        if (s->has_zero && n < cap) out[n++] = 0;
        *pos = 1;
    }
    for (; *pos <= s->cap && n < cap; (*pos)++)
        if (s->keys[*pos - 1]) out[n++] = s->keys[*pos - 1];
    return n;
}

/* ------------------------------------------------------------------ the thread's Redis work */
static void disconnect(kvredis *r, const char *why) {
    pthread_mutex_lock(&r->mu);
    r->st.errors++;
    pthread_mutex_unlock(&r->mu);
    if (r->c) {
        fprintf(stderr, "pcache: redis: connection lost (%s); local caches only until it is back\n", why);
        fflush(stderr);
        redisFree(r->c);
        r->c = NULL;
    }
    atomic_store(&r->connected, false);
    r->attempt = 0;
    r->next_try = mono() + redis_backoff_s(0, r->o.max_backoff_s, xorshift(&r->rng));
}

static void count(kvredis *r, uint64_t *field, uint64_t n) {
    pthread_mutex_lock(&r->mu);
    *field += n;
    pthread_mutex_unlock(&r->mu);
}

/* Appends the XADD of one event (kvevent.h's fields). */
static int append_event(kvredis *r, const ev *e) {
    const char *argv[18];
    size_t len[18];
    int n = 0;
    char maxlen[24];
    snprintf(maxlen, sizeof maxlen, "%d", KVEVENT_STREAM_MAXLEN);
    const char *fixed[] = { "XADD", KVEVENT_STREAM, "MAXLEN", "~", maxlen, "*", "v", KVEVENT_VERSION, "inst", r->inst_hex,
                            "fp", r->fp_hex, "layout", r->layout, "op", kvevent_op_name(e->op) };
    for (; n < 16; n++) { argv[n] = fixed[n]; len[n] = strlen(fixed[n]); }
    if (e->op == KVEV_STORE || e->op == KVEV_EVICT) {
        int k = kvevent_format_chains(e->chains, e->n, r->chains, sizeof r->chains);
        if (k < 0) return -1;
        argv[n] = "chains"; len[n++] = 6;
        argv[n] = r->chains; len[n++] = (size_t)k;
    }
    return redisAppendCommandArgv(r->c, n, argv, len) == REDIS_OK ? 0 : -1;
}

/* Sends events (pipelined) and reads their replies. Frees them. */
static void send_events(kvredis *r, ev **evs, int n) {
    uint64_t ok = 0, bad = 0;
    int sent = 0;
    for (; sent < n && r->c; sent++)
        if (append_event(r, evs[sent])) break;
    for (int i = 0; i < sent && r->c; i++) {
        redisReply *rep = NULL;
        if (redisGetReply(r->c, (void **)&rep) != REDIS_OK) {
            disconnect(r, r->c->errstr);
            break;
        }
        if (rep->type == REDIS_REPLY_ERROR) bad++;
        else ok++;
        freeReplyObject(rep);
    }
    pthread_mutex_lock(&r->mu);
    r->st.events_published += ok;
    r->st.events_dropped += (uint64_t)n - ok;
    r->st.errors += bad;
    if (bad && r->c) r->resync = true;   /* dropped while connected: the engine republishes */
    pthread_mutex_unlock(&r->mu);
    for (int i = 0; i < n; i++) free(evs[i]);
}

/* Publishes hello on a fresh connection (directly: it must precede everything queued). */
static int hello(kvredis *r) {
    ev e = { .op = KVEV_HELLO };
    if (append_event(r, &e)) return -1;
    redisReply *rep = NULL;
    if (redisGetReply(r->c, (void **)&rep) != REDIS_OK) return -1;
    int rc = rep->type == REDIS_REPLY_ERROR ? -1 : 0;
    if (rc) fprintf(stderr, "pcache: redis: XADD: %s\n", rep->str);
    freeReplyObject(rep);
    return rc;
}

static void try_connect(kvredis *r) {
    char err[512];
    redisContext *c = redis_connect(&r->o.url, r->o.timeout_s, err, sizeof err);
    double rtt = 0;
    if (c) {
        double t0 = mono();
        redisReply *rep = redisCommand(c, "PING");
        rtt = mono() - t0;
        if (rep) freeReplyObject(rep);
        r->c = c;
        if (hello(r)) {
            snprintf(err, sizeof err, "publishing hello failed");
            redisFree(c);
            r->c = c = NULL;
        }
    }
    if (!c) {
        /* the first failure is worth a line; the retries are counted */
        if (r->attempt == 0) { fprintf(stderr, "pcache: redis: %s (retrying with backoff)\n", err); fflush(stderr); }
        r->next_try = mono() + redis_backoff_s(r->attempt++, r->o.max_backoff_s, xorshift(&r->rng));
        count(r, &r->st.errors, 1);
        return;
    }
    r->attempt = 0;
    pthread_mutex_lock(&r->mu);
    uint64_t n = ++r->st.connects;
    if (r->st.rtt_s <= 0) r->st.rtt_s = rtt;
    pthread_mutex_unlock(&r->mu);
    atomic_store(&r->connected, true);
    atomic_fetch_add(&r->gen, 1);
    if (n > 1) { fprintf(stderr, "pcache: redis: reconnected\n"); fflush(stderr); }
}

static void do_write(kvredis *r, const wjob *w) {
    const kv_pool *p = r->o.pool;
    const void *kv = r->stage;
    if (!p->read_block && p->data) kv = kv_k(p, w->block, 0);
    else if (kv_block_read(p, w->block, r->stage)) return;
    char err[128];
    size_t len = kvfile_encode(&w->m, kv, r->rec, r->rec_cap, err, sizeof err);
    long long ms = (long long)((w->m.expiry - w->now) * 1000);
    if (!len || ms <= 0) return;
    char key[64], px[24];
    kvevent_block_key(r->o.model_fp, w->m.chain, key, sizeof key);
    snprintf(px, sizeof px, "%lld", ms);
    const char *argv[] = { "SET", key, (const char *)r->rec, "PX", px };
    size_t lens[] = { 3, strlen(key), len, 2, strlen(px) };
    redisReply *rep = redisCommandArgv(r->c, 5, argv, lens);
    if (!rep) { disconnect(r, r->c->errstr); return; }
    pthread_mutex_lock(&r->mu);
    if (rep->type == REDIS_REPLY_ERROR) r->st.errors++;   /* e.g. OOM under maxmemory noeviction */
    else { r->st.blocks_written++; r->st.bytes_written += len; }
    pthread_mutex_unlock(&r->mu);
    freeReplyObject(rep);
}

static void do_touch(kvredis *r, const rjob *t) {
    char key[64], ms[24];
    snprintf(ms, sizeof ms, "%lld", t->ttl_ms);
    int sent = 0;
    for (; sent < t->n; sent++) {
        kvevent_block_key(r->o.model_fp, t->chains[sent], key, sizeof key);
        const char *argv[] = { "PEXPIRE", key, ms, "GT" };
        if (redisAppendCommandArgv(r->c, 4, argv, NULL) != REDIS_OK) break;
    }
    uint64_t bad = 0;
    for (int i = 0; i < sent; i++) {
        redisReply *rep = NULL;
        if (redisGetReply(r->c, (void **)&rep) != REDIS_OK) { disconnect(r, r->c->errstr); break; }
        bad += rep->type == REDIS_REPLY_ERROR;
        freeReplyObject(rep);
    }
    pthread_mutex_lock(&r->mu);
    r->st.touches += (uint64_t)sent;
    r->st.errors += bad;
    pthread_mutex_unlock(&r->mu);
}

/* Verifies a GET's value as the block it should be and loads it into the item's pool block.
 * Returns 1 (loaded), 0 (absent) or -1 (refused). */
static int take_block(kvredis *r, const rjob *j, kvtier_item *it, const redisReply *rep) {
    if (rep->type == REDIS_REPLY_NIL) return 0;
    if (rep->type != REDIS_REPLY_STRING) return -1;
    kvfile_meta m;
    const uint8_t *kv;
    const kv_pool *p = r->o.pool;
    if (kvfile_decode((const uint8_t *)rep->str, rep->len, &m, &kv, NULL, 0) || m.model_fp != r->o.model_fp ||
        m.n_layer != (uint32_t)p->n_layer || m.kv_dim != (uint32_t)p->kv_dim || strcmp(m.ns, j->ns) || m.chain != it->chain ||
        m.n_tokens != it->n_tokens || memcmp(m.tokens, it->tokens, sizeof(int32_t) * (size_t)it->n_tokens) || !(m.ttl > 0))
        return -1;
    if (!p->write_block && p->data) memcpy(kv_k(p, it->block, 0), kv, r->block_bytes);
    else if (kv_block_write(r->o.pool, it->block, kv)) return -1;
    it->kind = m.kind;
    it->ttl = m.ttl;
    it->expiry = 0;   /* set by do_read: a fetch is a use */
    return 1;
}

static void do_read(kvredis *r, rjob *j) {
    double t0 = mono();
    uint64_t hits = 0, misses = 0, bad = 0, bytes = 0;
    bool stopped = false;
    char key[64];
    for (int at = 0; at < j->n && !stopped && r->c; at += READ_WINDOW) {
        int w = j->n - at < READ_WINDOW ? j->n - at : READ_WINDOW, sent = 0;
        for (; sent < w; sent++) {
            kvevent_block_key(r->o.model_fp, j->items[at + sent].chain, key, sizeof key);
            const char *argv[] = { "GET", key };
            if (redisAppendCommandArgv(r->c, 2, argv, NULL) != REDIS_OK) break;
        }
        for (int i = 0; i < sent; i++) {
            redisReply *rep = NULL;
            if (redisGetReply(r->c, (void **)&rep) != REDIS_OK) { disconnect(r, r->c->errstr); stopped = true; break; }
            if (!stopped) {
                kvtier_item *it = &j->items[at + i];
                int rc = take_block(r, j, it, rep);
                if (rc == 1) {
                    hits++;
                    bytes += rep->len;
                    it->expiry = j->now + it->ttl;   /* a fetch is a use, as a hit */
                    j->n_tokens += it->n_tokens;
                } else {
                    if (rc == 0) misses++;
                    else {
                        bad++;
                        fprintf(stderr, "pcache: redis: refused the record of block %016llx (corrupt or not what its key names)\n",
                                (unsigned long long)it->chain);
                        fflush(stderr);
                    }
                    stopped = true;
                }
            }
            freeReplyObject(rep);
        }
        if (sent < w) { disconnect(r, "pipelining failed"); break; }
    }
    double dt = mono() - t0;
    pthread_mutex_lock(&r->mu);
    r->st.read_hits += hits;
    r->st.read_misses += misses;
    r->st.bad_records += bad;
    r->st.blocks_read += hits;
    r->st.bytes_read += bytes;
    if (r->c) {
        /* a job that found nothing measured a round trip; one that found blocks, their cost */
        if (!hits) r->st.rtt_s = r->st.rtt_s > 0 ? (1 - EWMA) * r->st.rtt_s + EWMA * dt : dt;
        else {
            double per = (dt - r->st.rtt_s) / (double)hits;
            if (per < 0) per = 0;
            r->st.block_s = (1 - EWMA) * r->st.block_s + EWMA * per;
        }
    }
    pthread_mutex_unlock(&r->mu);
}

/* Under mu: fails queued reads (0 tokens), drops queued writes, touches and events. */
static void fail_queued(kvredis *r) {
    while (r->r_head) {
        rjob *j = r->r_head;
        r->r_head = j->next;
        j->next = r->r_done;
        r->r_done = j;
    }
    r->r_tail = NULL;
    while (r->t_head) {
        rjob *t = r->t_head;
        r->t_head = t->next;
        free(t->chains);
        free(t);
    }
    r->t_tail = NULL;
    for (; r->w_n; r->w_n--, r->w_head = (r->w_head + 1) % r->w_cap) {
        r->w_done[r->n_w_done++] = r->wq[r->w_head].block;
        r->st.writes_dropped++;
    }
    for (; r->ev_n; r->ev_n--, r->ev_head = (r->ev_head + 1) % r->ev_cap) {
        free(r->evq[r->ev_head]);
        r->st.events_dropped++;
    }
}

static void *redis_main(void *arg) {
    kvredis *r = arg;
    pthread_mutex_lock(&r->mu);
    for (;;) {
        if (!r->c) {
            fail_queued(r);
            pthread_cond_broadcast(&r->done_cv);
            if (r->stop) break;
            double now = mono();
            if (now < r->next_try) {
                const struct timespec ts = deadline_after(r->next_try - now);
                pthread_cond_timedwait(&r->work, &r->mu, &ts);
                continue;
            }
            r->busy = true;
            pthread_mutex_unlock(&r->mu);
            try_connect(r);
            pthread_mutex_lock(&r->mu);
            r->busy = false;
            continue;
        }
        if (r->r_head && !r->stop) {
            rjob *j = r->r_head;
            r->r_head = j->next;
            if (!r->r_head) r->r_tail = NULL;
            r->busy = true;
            pthread_mutex_unlock(&r->mu);
            do_read(r, j);
            pthread_mutex_lock(&r->mu);
            j->next = r->r_done;
            r->r_done = j;
        } else if (r->ev_n) {
            ev *batch[64];
            int n = 0;
            for (; r->ev_n && n < 64; r->ev_n--, r->ev_head = (r->ev_head + 1) % r->ev_cap) batch[n++] = r->evq[r->ev_head];
            r->busy = true;
            pthread_mutex_unlock(&r->mu);
            send_events(r, batch, n);
            pthread_mutex_lock(&r->mu);
        } else if (r->stop) {
            break;   /* events sent (bye last); reads, touches and writes are dropped below */
        } else if (r->t_head) {
            rjob *t = r->t_head;
            r->t_head = t->next;
            if (!r->t_head) r->t_tail = NULL;
            r->busy = true;
            pthread_mutex_unlock(&r->mu);
            do_touch(r, t);
            free(t->chains);
            free(t);
            pthread_mutex_lock(&r->mu);
        } else if (r->w_n) {
            wjob w = r->wq[r->w_head];
            r->w_head = (r->w_head + 1) % r->w_cap;
            r->w_n--;
            r->busy = true;
            pthread_mutex_unlock(&r->mu);
            do_write(r, &w);
            pthread_mutex_lock(&r->mu);
            r->w_done[r->n_w_done++] = w.block;
        } else {
            /* idle: a PING a second notices a Redis that went away (or restarted and lost our
             * hello) before the next event would; an error reply (a password or ACL changed
             * under the connection, a replica that lost its master) is a lost connection too:
             * the reconnect's AUTH and PING say whether it may be used again */
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_sec += 1;
            if (pthread_cond_timedwait(&r->work, &r->mu, &ts) == ETIMEDOUT && !r->stop && !r->r_head && !r->ev_n && !r->t_head && !r->w_n) {
                r->busy = true;
                pthread_mutex_unlock(&r->mu);
                redisReply *rep = redisCommand(r->c, "PING");
                if (!rep) disconnect(r, r->c->errstr);
                else {
                    if (rep->type == REDIS_REPLY_ERROR) disconnect(r, rep->str);
                    freeReplyObject(rep);
                }
                pthread_mutex_lock(&r->mu);
                r->busy = false;
                pthread_cond_broadcast(&r->done_cv);
            }
            continue;
        }
        r->busy = false;
        pthread_cond_broadcast(&r->done_cv);
    }
    fail_queued(r);
    r->busy = false;
    pthread_cond_broadcast(&r->done_cv);
    pthread_mutex_unlock(&r->mu);
    if (r->c) redisFree(r->c);
    r->c = NULL;
    atomic_store(&r->connected, false);
    return NULL;
}

/* ------------------------------------------------------------------ the engine's side */
int kvredis_create(kvredis **out, const kvredis_opts *o, char *err, size_t errlen) {
    *out = NULL;
    kvredis *r = calloc(1, sizeof *r);
    if (!r) return errf(err, errlen, "redis: out of memory");
    r->o = *o;
    if (r->o.timeout_s <= 0) r->o.timeout_s = 1;
    if (r->o.max_backoff_s <= 0) r->o.max_backoff_s = 5;
    r->w_cap = o->write_queue > 0 ? o->write_queue : 128;
    r->ev_cap = o->event_queue > 0 ? o->event_queue : 1024;
    r->block_bytes = kv_block_bytes(o->pool->n_layer, o->pool->kv_dim);
    r->rec_cap = kvfile_size((uint32_t)o->pool->n_layer, (uint32_t)o->pool->kv_dim, KVFILE_NS_MAX);
    /* the first estimates, until measured: a local network's 1 GB/s */
    r->st.block_s = (double)r->block_bytes / 1e9;
    kvevent_hex64(o->model_fp, r->fp_hex);
    kvevent_hex64(o->instance, r->inst_hex);
    snprintf(r->layout, sizeof r->layout, "%dx%d", o->pool->n_layer, o->pool->kv_dim);
    if (getrandom(&r->rng, sizeof r->rng, 0) != sizeof r->rng) r->rng = (unsigned)o->instance;
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->work, NULL);
    pthread_cond_init(&r->done_cv, NULL);
    r->rec = malloc(r->rec_cap);
    r->stage = malloc(r->block_bytes);
    r->wq = malloc((size_t)r->w_cap * sizeof *r->wq);
    r->w_done = malloc((size_t)r->w_cap * sizeof *r->w_done);
    r->evq = malloc((size_t)r->ev_cap * sizeof *r->evq);
    if (!r->rec || !r->stage || !r->wq || !r->w_done || !r->evq) { kvredis_free(r); return errf(err, errlen, "redis: out of memory"); }
    if (pthread_create(&r->th, NULL, redis_main, r)) { kvredis_free(r); return errf(err, errlen, "redis: cannot start its thread"); }
    r->started = true;
    *out = r;
    return 0;
}

void kvredis_free(kvredis *r) {
    if (!r) return;
    if (r->started) {
        kvredis_publish(r, KVEV_BYE, NULL, 0);
        pthread_mutex_lock(&r->mu);
        r->stop = true;
        pthread_cond_broadcast(&r->work);
        pthread_mutex_unlock(&r->mu);
        pthread_join(r->th, NULL);
        kvredis_poll(r, NULL, NULL);
    }
    free(r->rec);
    free(r->stage);
    free(r->wq);
    free(r->w_done);
    free(r->evq);
    pthread_cond_destroy(&r->work);
    pthread_cond_destroy(&r->done_cv);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

bool kvredis_connected(kvredis *r) { return atomic_load(&r->connected); }
uint64_t kvredis_generation(kvredis *r) { return atomic_load(&r->gen); }

bool kvredis_take_resync(kvredis *r) {
    pthread_mutex_lock(&r->mu);
    bool v = r->resync;
    r->resync = false;
    pthread_mutex_unlock(&r->mu);
    return v;
}

int kvredis_publish(kvredis *r, int op, const uint64_t *chains, int n) {
    if (!kvevent_op_name(op) || n < 0) return -1;
    int rc = 0;
    bool with_chains = op == KVEV_STORE || op == KVEV_EVICT;
    if (with_chains && n == 0) return 0;
    for (int at = 0; at < n || (!with_chains && at == 0); at += KVEVENT_MAX_CHAINS) {
        int k = with_chains ? (n - at < KVEVENT_MAX_CHAINS ? n - at : KVEVENT_MAX_CHAINS) : 0;
        ev *e = malloc(sizeof *e + (size_t)k * sizeof(uint64_t));
        pthread_mutex_lock(&r->mu);
        if (!e || !atomic_load(&r->connected) || r->ev_n == r->ev_cap || r->stop) {
            r->st.events_dropped++;
            if (atomic_load(&r->connected)) r->resync = true;
            pthread_mutex_unlock(&r->mu);
            free(e);
            rc = -1;
            if (!with_chains) break;
            continue;
        }
        e->op = op;
        e->n = k;
        if (k) memcpy(e->chains, chains + at, (size_t)k * sizeof(uint64_t));
        r->evq[(r->ev_head + r->ev_n++) % r->ev_cap] = e;
        pthread_cond_signal(&r->work);
        pthread_mutex_unlock(&r->mu);
        if (!with_chains) break;
    }
    return rc;
}

int kvredis_write(kvredis *r, const kvfile_meta *m, int32_t block, double now) {
    pthread_mutex_lock(&r->mu);
    if (r->held >= r->w_cap || !atomic_load(&r->connected) || m->expiry <= now) {
        r->st.writes_dropped++;
        pthread_mutex_unlock(&r->mu);
        return -1;
    }
    kv_block_ref(r->o.pool, block);
    wjob *w = &r->wq[(r->w_head + r->w_n) % r->w_cap];
    w->m = *m;
    w->block = block;
    w->now = now;
    r->w_n++;
    r->held++;
    pthread_cond_signal(&r->work);
    pthread_mutex_unlock(&r->mu);
    return 0;
}

static void queue_job(kvredis *r, rjob *j, bool read) {
    pthread_mutex_lock(&r->mu);
    rjob **head = read ? &r->r_head : &r->t_head, **tail = read ? &r->r_tail : &r->t_tail;
    if (*tail) (*tail)->next = j;
    else *head = j;
    *tail = j;
    if (read) r->st.read_jobs++;
    pthread_cond_signal(&r->work);
    pthread_mutex_unlock(&r->mu);
}

int kvredis_touch(kvredis *r, const uint64_t *chains, int n, double ttl_s) {
    if (n <= 0 || !atomic_load(&r->connected)) return 0;
    rjob *t = calloc(1, sizeof *t);
    if (!t) return -1;
    t->chains = malloc((size_t)n * sizeof *chains);
    if (!t->chains) { free(t); return -1; }
    memcpy(t->chains, chains, (size_t)n * sizeof *chains);
    t->n = n;
    t->ttl_ms = (long long)(ttl_s * 1000);
    if (t->ttl_ms < 1) t->ttl_ms = 1;
    queue_job(r, t, false);
    return 0;
}

int kvredis_read(kvredis *r, int id, const char *ns, const kvtier_item *items, int n, double now) {
    rjob *j = calloc(1, sizeof *j);
    if (!j) return -1;
    j->items = malloc((size_t)(n > 0 ? n : 1) * sizeof *items);
    if (!j->items) { free(j); return -1; }
    memcpy(j->items, items, (size_t)n * sizeof *items);
    j->id = id;
    j->n = n;
    j->now = now;
    snprintf(j->ns, sizeof j->ns, "%s", ns ? ns : "");
    queue_job(r, j, true);
    return 0;
}

void kvredis_poll(kvredis *r, kvtier_done_fn done, void *ctx) {
    if (!r) return;
    pthread_mutex_lock(&r->mu);
    for (int i = 0; i < r->n_w_done; i++) kv_block_unref(r->o.pool, r->w_done[i]);
    r->held -= r->n_w_done;
    r->n_w_done = 0;
    rjob *j = r->r_done;
    r->r_done = NULL;
    pthread_mutex_unlock(&r->mu);
    rjob *rev = NULL;
    while (j) { rjob *nx = j->next; j->next = rev; rev = j; j = nx; }
    while (rev) {
        rjob *nx = rev->next;
        if (done) done(ctx, rev->id, rev->n_tokens, rev->items, rev->n);
        free(rev->items);
        free(rev);
        rev = nx;
    }
}

void kvredis_wait(kvredis *r, double max_s) {
    pthread_mutex_lock(&r->mu);
    if (!r->r_done && (r->busy || r->r_head)) {
        const struct timespec ts = deadline_after(max_s);
        pthread_cond_timedwait(&r->done_cv, &r->mu, &ts);
    }
    pthread_mutex_unlock(&r->mu);
}

void kvredis_sync(kvredis *r, kvtier_done_fn done, void *ctx) {
    pthread_mutex_lock(&r->mu);
    while (r->busy || r->r_head || r->t_head || r->w_n || r->ev_n) pthread_cond_wait(&r->done_cv, &r->mu);
    pthread_mutex_unlock(&r->mu);
    kvredis_poll(r, done, ctx);
}

void kvredis_get_stats(kvredis *r, kvredis_stats *out) {
    pthread_mutex_lock(&r->mu);
    *out = r->st;
    out->connected = atomic_load(&r->connected);
    out->write_queue_depth = r->held;
    out->event_queue_depth = r->ev_n;
    pthread_mutex_unlock(&r->mu);
}
