/* kvtier: see kvtier.h.
 *
 * One mutex guards the queues (touch jobs go with the reads: they are cheap); the tiers have
 * their own locks (kvdisk_has / kvhost_has are called from the engine thread while the I/O
 * thread writes). The write queue is a ring of
 * records (block id + metadata); "held" counts every block the engine has referenced for
 * writing and not yet released: queued, being written, or written and waiting for
 * kvtier_poll, so the bound is also the bound on pool blocks pinned by the tiers. */
#include "kvtier.h"
#include "gpu.h"
#include "kvdisk.h"
#include "kvhost.h"
#include "util.h"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct wjob { kvfile_meta m; int32_t block; double now; } wjob;

typedef struct rjob {
    int id;
    char ns[KVFILE_NS_MAX + 1];
    kvtier_item *items;        /* a read job's blocks; NULL for a touch job */
    uint64_t *chains;          /* a touch job's blocks */
    int n, n_tokens;           /* n_tokens: loaded so far */
    double now;
    struct rjob *next;
} rjob;

struct kvtier {
    kv_pool *pool;
    kvdisk *disk;
    kvhost *host;
    size_t block_bytes;
    uint8_t *stage;            /* one block: the I/O thread's bounce buffer */
    bool stage_pinned;         /* page-locked (gpu_host_alloc) */
    pthread_t th;
    bool started;
    pthread_mutex_t mu;
    pthread_cond_t work, done_cv;
    bool stop, paused;
    wjob *wq;                  /* ring of cap */
    int cap, w_head, w_n;
    int held;                  /* queued + in flight + done, not yet polled */
    int32_t *w_done;           /* finished writes' blocks, for the engine to unref */
    int n_w_done;
    rjob *r_head, *r_tail;     /* queued reads */
    rjob *r_done;              /* finished reads */
    bool busy;                 /* a job is in flight */
    kvtier_stats st;
};

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* The I/O thread: reads first, then writes; holds mu except while doing I/O. */
static void do_write(kvtier *t, wjob *w) {
    const void *kv = t->stage;
    if (!t->pool->read_block && t->pool->data) kv = kv_k(t->pool, w->block, 0);
    else if (kv_block_read(t->pool, w->block, t->stage)) return;
    if (t->host) {
        double t0 = mono();
        kvhost_put(t->host, &w->m, kv, w->now);
        double dt = mono() - t0;
        pthread_mutex_lock(&t->mu);
        kvtier_level_stats *s = &t->st.tier[KVTIER_HOST];
        s->demotions++; s->write_n++; s->write_s += dt;
        pthread_mutex_unlock(&t->mu);
    }
    if (t->disk) {
        char err[256];
        double t0 = mono();
        int rc = kvdisk_put(t->disk, &w->m, kv, w->now, err, sizeof err);
        double dt = mono() - t0;
        pthread_mutex_lock(&t->mu);
        kvtier_level_stats *s = &t->st.tier[KVTIER_DISK];
        if (rc == 0) { s->demotions++; s->write_n++; s->write_s += dt; }
        pthread_mutex_unlock(&t->mu);
    }
}

/* kvhost_get_with's sink on a pool stored elsewhere (GPU): the block straight into its slot. */
typedef struct { kv_pool *pool; int32_t block; } pool_sink;
static int into_pool(void *ctx, const void *kv) {
    pool_sink *p = ctx;
    return kv_block_write(p->pool, p->block, kv) ? -1 : 0;
}

static void do_read(kvtier *t, rjob *r) {
    bool direct = !t->pool->write_block && t->pool->data;
    for (int i = 0; i < r->n; i++) {
        kvtier_item *it = &r->items[i];
        void *dst = direct ? (void *)kv_k(t->pool, it->block, 0) : (void *)t->stage;
        int from = KVTIER_NONE;
        bool loaded = direct;   /* in the pool already (not via the bounce buffer) */
        double t0 = mono();
        kvfile_meta m;
        if (t->host) {
            int rc;
            if (direct) rc = kvhost_get(t->host, it->chain, r->ns, it->tokens, it->n_tokens, r->now, dst, &m);
            else {
                pool_sink ps = { t->pool, it->block };
                rc = kvhost_get_with(t->host, it->chain, r->ns, it->tokens, it->n_tokens, r->now, into_pool, &ps, &m);
                if (rc < 0) break;
                loaded = true;
            }
            if (rc == 1) from = KVTIER_HOST;
        }
        if (from == KVTIER_NONE && t->disk) {
            char err[256];
            loaded = direct;
            if (kvdisk_get(t->disk, it->chain, r->ns, it->tokens, it->n_tokens, r->now, &m, dst, err, sizeof err) == 1) {
                from = KVTIER_DISK;
                if (t->host) kvhost_put(t->host, &m, dst, r->now);   /* the host tier keeps what was read */
            }
        }
        if (from == KVTIER_NONE || (!loaded && kv_block_write(t->pool, it->block, t->stage))) break;
        it->kind = m.kind;
        it->ttl = m.ttl;
        it->expiry = m.expiry;
        double dt = mono() - t0;
        pthread_mutex_lock(&t->mu);
        kvtier_level_stats *s = &t->st.tier[from];
        s->promotions++; s->tokens_served += (uint64_t)it->n_tokens; s->read_n++; s->read_s += dt;
        pthread_mutex_unlock(&t->mu);
        r->n_tokens += it->n_tokens;
        if (it->n_tokens < KV_BLOCK) break;   /* a partial block ends the chain */
    }
}

static void do_touch(kvtier *t, rjob *r) {
    for (int i = 0; i < r->n; i++) {
        if (t->host) kvhost_touch(t->host, r->chains[i], r->now);
        if (t->disk) kvdisk_touch(t->disk, r->chains[i], r->now);
    }
}

static void *io_main(void *arg) {
    kvtier *t = arg;
    pthread_mutex_lock(&t->mu);
    for (;;) {
        while (!t->stop && (t->paused || (!t->r_head && !t->w_n))) pthread_cond_wait(&t->work, &t->mu);
        if (t->r_head) {
            rjob *r = t->r_head;
            t->r_head = r->next;
            if (!t->r_head) t->r_tail = NULL;
            t->busy = true;
            pthread_mutex_unlock(&t->mu);
            if (r->items) do_read(t, r);
            else do_touch(t, r);
            pthread_mutex_lock(&t->mu);
            r->next = t->r_done;
            t->r_done = r;
        } else if (t->w_n) {
            wjob w = t->wq[t->w_head];
            t->w_head = (t->w_head + 1) % t->cap;
            t->w_n--;
            t->busy = true;
            pthread_mutex_unlock(&t->mu);
            do_write(t, &w);
            pthread_mutex_lock(&t->mu);
            t->w_done[t->n_w_done++] = w.block;
        } else break;   /* stopping with nothing left */
        t->busy = false;
        pthread_cond_broadcast(&t->done_cv);
    }
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

int kvtier_create(kvtier **out, const kvtier_opts *o, char *err, size_t errlen) {
    *out = NULL;
    kvtier *t = calloc(1, sizeof *t);
    if (!t) return errf(err, errlen, "kvtier: out of memory");
    t->pool = o->pool;
    t->block_bytes = kv_block_bytes(o->pool->n_layer, o->pool->kv_dim);
    t->cap = o->queue_blocks > 0 ? o->queue_blocks : 256;
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->work, NULL);
    pthread_cond_init(&t->done_cv, NULL);
    t->wq = malloc((size_t)t->cap * sizeof *t->wq);
    t->w_done = malloc((size_t)t->cap * sizeof *t->w_done);
    t->stage_pinned = o->host_pinned;   /* the GPU backend: the disk tier's blocks go to the pool by DMA too */
    t->stage = t->stage_pinned ? gpu_host_alloc(t->block_bytes) : malloc(t->block_bytes);
    if (!t->wq || !t->w_done || !t->stage) { kvtier_free(t); return errf(err, errlen, "kvtier: out of memory"); }
    if (o->host_bytes &&
        kvhost_create(&t->host, (uint32_t)o->pool->n_layer, (uint32_t)o->pool->kv_dim, o->host_bytes, o->host_pinned, err, errlen)) {
        kvtier_free(t);
        return -1;
    }
    if (o->dir && kvdisk_open(&t->disk, o->dir, o->model_fp, (uint32_t)o->pool->n_layer, (uint32_t)o->pool->kv_dim,
                              o->disk_bytes, o->now, err, errlen)) {
        kvtier_free(t);
        return -1;
    }
    if (pthread_create(&t->th, NULL, io_main, t)) { kvtier_free(t); return errf(err, errlen, "kvtier: cannot start the I/O thread"); }
    t->started = true;
    *out = t;
    return 0;
}

void kvtier_poll(kvtier *t, kvtier_done_fn done, void *ctx) {
    if (!t) return;
    pthread_mutex_lock(&t->mu);
    for (int i = 0; i < t->n_w_done; i++) kv_block_unref(t->pool, t->w_done[i]);
    t->held -= t->n_w_done;
    t->n_w_done = 0;
    rjob *r = t->r_done;
    t->r_done = NULL;
    pthread_mutex_unlock(&t->mu);
    /* oldest first: the list is newest first */
    rjob *rev = NULL;
    while (r) { rjob *nx = r->next; r->next = rev; rev = r; r = nx; }
    while (rev) {
        rjob *nx = rev->next;
        if (done && rev->items) done(ctx, rev->id, rev->n_tokens, rev->items, rev->n);
        free(rev->items);
        free(rev->chains);
        free(rev);
        rev = nx;
    }
}

void kvtier_free(kvtier *t) {
    if (!t) return;
    if (t->started) {
        pthread_mutex_lock(&t->mu);
        t->stop = true;
        t->paused = false;
        pthread_cond_broadcast(&t->work);
        pthread_mutex_unlock(&t->mu);
        pthread_join(t->th, NULL);
        kvtier_poll(t, NULL, NULL);
    }
    kvdisk_close(t->disk);
    kvhost_free(t->host);
    free(t->wq);
    free(t->w_done);
    if (t->stage_pinned) gpu_host_free(t->stage);
    else free(t->stage);
    pthread_cond_destroy(&t->work);
    pthread_cond_destroy(&t->done_cv);
    pthread_mutex_destroy(&t->mu);
    free(t);
}

int kvtier_write(kvtier *t, const kvfile_meta *m, int32_t block, double now) {
    pthread_mutex_lock(&t->mu);
    if (t->held >= t->cap) {
        t->st.writes_dropped++;
        pthread_mutex_unlock(&t->mu);
        return -1;
    }
    kv_block_ref(t->pool, block);
    wjob *w = &t->wq[(t->w_head + t->w_n) % t->cap];
    w->m = *m;
    w->block = block;
    w->now = now;
    t->w_n++;
    t->held++;
    t->st.writes_queued++;
    pthread_cond_signal(&t->work);
    pthread_mutex_unlock(&t->mu);
    return 0;
}

int kvtier_has(kvtier *t, uint64_t chain, double now) {
    if (t->host && kvhost_has(t->host, chain, now)) return KVTIER_HOST;
    if (t->disk && kvdisk_has(t->disk, chain, now)) return KVTIER_DISK;
    return KVTIER_NONE;
}

bool kvtier_covers(kvtier *t, uint64_t chain, int kind, double ttl, double now) {
    return (!t->host || kvhost_covers(t->host, chain, kind, ttl, now)) &&
           (!t->disk || kvdisk_covers(t->disk, chain, kind, ttl, now));
}

static void queue_job(kvtier *t, rjob *r) {
    pthread_mutex_lock(&t->mu);
    if (t->r_tail) t->r_tail->next = r;
    else t->r_head = r;
    t->r_tail = r;
    pthread_cond_signal(&t->work);
    pthread_mutex_unlock(&t->mu);
}

int kvtier_touch(kvtier *t, const uint64_t *chains, int n, double now) {
    if (n <= 0) return 0;
    rjob *r = calloc(1, sizeof *r);
    if (!r) return -1;
    r->chains = malloc((size_t)n * sizeof *chains);
    if (!r->chains) { free(r); return -1; }
    memcpy(r->chains, chains, (size_t)n * sizeof *chains);
    r->id = -1;
    r->n = n;
    r->now = now;
    queue_job(t, r);
    return 0;
}

int kvtier_read(kvtier *t, int id, const char *ns, const kvtier_item *items, int n, double now) {
    rjob *r = calloc(1, sizeof *r);
    if (!r) return -1;
    r->items = malloc((size_t)n * sizeof *items);
    if (!r->items) { free(r); return -1; }
    memcpy(r->items, items, (size_t)n * sizeof *items);
    r->id = id;
    r->n = n;
    r->now = now;
    snprintf(r->ns, sizeof r->ns, "%s", ns ? ns : "");
    pthread_mutex_lock(&t->mu);
    if (t->r_tail) t->r_tail->next = r;
    else t->r_head = r;
    t->r_tail = r;
    t->st.read_jobs++;
    pthread_cond_signal(&t->work);
    pthread_mutex_unlock(&t->mu);
    return 0;
}

void kvtier_wait(kvtier *t, double max_s) {
    pthread_mutex_lock(&t->mu);
    if (!t->r_done && !t->n_w_done && (t->busy || t->r_head || t->w_n)) {
        const struct timespec ts = deadline_after(max_s);
        pthread_cond_timedwait(&t->done_cv, &t->mu, &ts);
    }
    pthread_mutex_unlock(&t->mu);
}

void kvtier_sync(kvtier *t, kvtier_done_fn done, void *ctx) {
    pthread_mutex_lock(&t->mu);
    while (!t->paused && (t->busy || t->r_head || t->w_n)) pthread_cond_wait(&t->done_cv, &t->mu);
    pthread_mutex_unlock(&t->mu);
    kvtier_poll(t, done, ctx);
}

void kvtier_pause(kvtier *t, bool paused) {
    pthread_mutex_lock(&t->mu);
    t->paused = paused;
    pthread_cond_broadcast(&t->work);
    pthread_mutex_unlock(&t->mu);
}

void kvtier_get_stats(kvtier *t, kvtier_stats *out) {
    pthread_mutex_lock(&t->mu);
    *out = t->st;
    out->queue_depth = t->held;
    pthread_mutex_unlock(&t->mu);
    if (t->host) {
        kvhost_stats h;
        kvhost_get_stats(t->host, &h);
        kvtier_level_stats *s = &out->tier[KVTIER_HOST];
        s->blocks = h.blocks; s->bytes = h.bytes; s->expired = h.expired; s->evicted = h.evicted;
    }
    if (t->disk) {
        kvdisk_stats d;
        kvdisk_get_stats(t->disk, &d);
        kvtier_level_stats *s = &out->tier[KVTIER_DISK];
        s->blocks = d.blocks; s->bytes = d.bytes; s->expired = d.expired; s->evicted = d.evicted;
        s->bad_files = d.bad_files; s->write_errors = d.write_errors;
    }
}

const char *kvtier_disk_path(const kvtier *t) { return t && t->disk ? kvdisk_path(t->disk) : NULL; }
