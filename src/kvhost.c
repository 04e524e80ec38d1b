/* kvhost: see kvhost.h. One arena of fixed-size slots allocated up front (the bound is the
 * budget: nothing grows later), a chained hash from chain hash to slot, and eviction by a scan
 * for the oldest slot (a scan of a few thousand slots costs less than the 0.3 MB copy it makes
 * room for). As in kvdisk.c, chains are eaten from their ends: a slot is evicted only when no
 * held slot is its child (kids == 0), expired ones first, then orphans (parent not held), then
 * the least recently used leaf, so a document's prefix outlives its tail. */
#include "kvhost.h"
#include "gpu.h"
#include "util.h"
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    kvfile_meta m;
    double last_use;
    int next;       /* hash chain; -1 ends it */
    int kids;       /* held slots whose parent is this chain */
    bool first;     /* the first block of its chain */
    bool used;
} slot;

struct kvhost {
    pthread_mutex_t mu;
    size_t block_bytes;
    int n_slots, n_used, n_buckets;   /* n_buckets: a power of two */
    slot *slots;
    int *bucket;
    uint8_t *arena;
    bool pinned;
    int n_orphans;  /* held non-first slots whose parent is not held */
    kvhost_stats st;
};

static int bucket_of(const kvhost *h, uint64_t chain) { return (int)((chain ^ chain >> 31) & (uint64_t)(h->n_buckets - 1)); }

static int find(const kvhost *h, uint64_t chain) {
    for (int i = h->bucket[bucket_of(h, chain)]; i >= 0; i = h->slots[i].next)
        if (h->slots[i].m.chain == chain) return i;
    return -1;
}

/* Kid bookkeeping for slot i joining (+1) or leaving (-1) the store. */
static void link_parent(kvhost *h, int i, int dir) {
    if (h->slots[i].first) return;
    int p = find(h, h->slots[i].m.parent);
    if (p >= 0) h->slots[p].kids += dir;
    else h->n_orphans += dir;
}

static void unlink_slot(kvhost *h, int i) {
    h->n_orphans += h->slots[i].kids;   /* its kids lose their parent */
    link_parent(h, i, -1);
    int *p = &h->bucket[bucket_of(h, h->slots[i].m.chain)];
    while (*p != i) p = &h->slots[*p].next;
    *p = h->slots[i].next;
    h->slots[i].used = false;
    h->n_used--;
}

int kvhost_create(kvhost **out, uint32_t n_layer, uint32_t kv_dim, uint64_t max_bytes, bool pinned, char *err,
                  size_t errlen) {
    *out = NULL;
    size_t bb = kv_block_bytes((int)n_layer, (int)kv_dim);
    uint64_t n = max_bytes / bb;
    if (n < 1) return errf(err, errlen, "--cache-host-mem: %llu bytes hold no KV block (one is %zu bytes)", (unsigned long long)max_bytes, bb);
    if (n > (1u << 24)) n = 1u << 24;
    kvhost *h = calloc(1, sizeof *h);
    if (!h) return errf(err, errlen, "kvhost: out of memory");
    pthread_mutex_init(&h->mu, NULL);
    h->block_bytes = bb;
    h->n_slots = (int)n;
    h->n_buckets = 1;
    while (h->n_buckets < h->n_slots) h->n_buckets *= 2;
    h->slots = calloc((size_t)h->n_slots, sizeof *h->slots);
    h->bucket = malloc((size_t)h->n_buckets * sizeof *h->bucket);
    h->pinned = pinned;
    h->arena = pinned ? gpu_host_alloc((size_t)n * bb) : malloc((size_t)n * bb);
    if (!h->slots || !h->bucket || !h->arena) {
        kvhost_free(h);
        return errf(err, errlen, "--cache-host-mem: cannot allocate %llu bytes", (unsigned long long)(n * bb));
    }
    for (int i = 0; i < h->n_buckets; i++) h->bucket[i] = -1;
    h->st.capacity_blocks = n;
    *out = h;
    return 0;
}

void kvhost_free(kvhost *h) {
    if (!h) return;
    if (h->pinned) gpu_host_free(h->arena);
    else free(h->arena);
    free(h->slots);
    free(h->bucket);
    pthread_mutex_destroy(&h->mu);
    free(h);
}

/* Eviction class: lower goes first (expired, orphan leaf, leaf, a slot with kids). */
static int evict_class(const kvhost *h, const slot *s, double now) {
    if (s->m.expiry <= now) return 0;
    if (s->kids > 0) return 3;
    return h->n_orphans && !s->first && find(h, s->m.parent) < 0 ? 1 : 2;
}

/* A slot for a new block: a free one, else by evict_class, least recently used first. */
static int victim(kvhost *h, double now) {
    int v = -1, vc = 4;
    for (int i = 0; i < h->n_slots; i++) {
        slot *s = &h->slots[i];
        if (!s->used) return i;
        int c = evict_class(h, s, now);
        if (v < 0 || c < vc || (c == vc && s->last_use < h->slots[v].last_use)) { v = i; vc = c; }
    }
    if (h->slots[v].m.expiry <= now) h->st.expired++;
    else h->st.evicted++;
    unlink_slot(h, v);
    return v;
}

/* A use at now: the block lives at least its ttl from now. */
static void touch(slot *s, double now) {
    s->last_use = now;
    if (now + s->m.ttl > s->m.expiry) s->m.expiry = now + s->m.ttl;
}

void kvhost_put(kvhost *h, const kvfile_meta *m, const void *kv, double now) {
    pthread_mutex_lock(&h->mu);
    int i = find(h, m->chain);
    if (i >= 0 && h->slots[i].m.expiry > now && h->slots[i].m.ttl >= m->ttl && h->slots[i].m.kind >= m->kind &&
        h->slots[i].m.n_tokens == m->n_tokens) {
        touch(&h->slots[i], now);
        if (m->expiry > h->slots[i].m.expiry) h->slots[i].m.expiry = m->expiry;
        pthread_mutex_unlock(&h->mu);
        return;
    }
    if (i >= 0) unlink_slot(h, i);
    i = victim(h, now);
    slot *s = &h->slots[i];
    s->m = *m;
    s->last_use = now;
    s->used = true;
    s->kids = 0;
    s->first = m->parent == kvfile_chain_root(m->model_fp, m->n_layer, m->kv_dim, m->ns);
    int b = bucket_of(h, m->chain);
    s->next = h->bucket[b];
    h->bucket[b] = i;
    h->n_used++;
    link_parent(h, i, +1);
    for (int k = 0; h->n_orphans && k < h->n_slots; k++)   /* orphans that are its kids */
        if (k != i && h->slots[k].used && !h->slots[k].first && h->slots[k].m.parent == m->chain) {
            s->kids++;
            h->n_orphans--;
        }
    memcpy(h->arena + (size_t)i * h->block_bytes, kv, h->block_bytes);
    h->st.puts++;
    pthread_mutex_unlock(&h->mu);
}

int kvhost_touch(kvhost *h, uint64_t chain, double now) {
    pthread_mutex_lock(&h->mu);
    int i = find(h, chain), r = i >= 0 && h->slots[i].m.expiry > now;
    if (r) touch(&h->slots[i], now);
    pthread_mutex_unlock(&h->mu);
    return r;
}

int kvhost_covers(kvhost *h, uint64_t chain, int kind, double ttl, double now) {
    pthread_mutex_lock(&h->mu);
    int i = find(h, chain);
    int r = i >= 0 && h->slots[i].m.expiry > now && h->slots[i].m.kind >= kind && h->slots[i].m.ttl >= ttl;
    pthread_mutex_unlock(&h->mu);
    return r;
}

int kvhost_has(kvhost *h, uint64_t chain, double now) {
    pthread_mutex_lock(&h->mu);
    int i = find(h, chain);
    int r = i >= 0 && h->slots[i].m.expiry > now;
    pthread_mutex_unlock(&h->mu);
    return r;
}

int kvhost_get_with(kvhost *h, uint64_t chain, const char *ns, const int32_t *tokens, int n, double now,
                    int (*sink)(void *ctx, const void *kv), void *ctx, kvfile_meta *out) {
    pthread_mutex_lock(&h->mu);
    h->st.lookups++;
    int i = find(h, chain), r = 0;
    if (i >= 0) {
        const kvfile_meta *m = &h->slots[i].m;
        if (m->expiry <= now) {
            unlink_slot(h, i);
            h->st.expired++;
        } else if (!strcmp(m->ns, ns ? ns : "") && m->n_tokens == n && !memcmp(m->tokens, tokens, sizeof(int32_t) * (size_t)n)) {
            if (sink(ctx, h->arena + (size_t)i * h->block_bytes)) r = -1;
            else {
                if (out) *out = *m;
                h->slots[i].last_use = now;
                r = 1;
            }
        }
    }
    if (r == 1) h->st.hits++;
    else h->st.misses++;
    pthread_mutex_unlock(&h->mu);
    return r;
}

typedef struct { void *dst; size_t n; } copy_sink;
static int copy_to(void *ctx, const void *kv) {
    copy_sink *c = ctx;
    memcpy(c->dst, kv, c->n);
    return 0;
}

int kvhost_get(kvhost *h, uint64_t chain, const char *ns, const int32_t *tokens, int n, double now, void *kv,
               kvfile_meta *out) {
    copy_sink c = { kv, h->block_bytes };
    return kvhost_get_with(h, chain, ns, tokens, n, now, copy_to, &c, out) == 1;
}

void kvhost_get_stats(kvhost *h, kvhost_stats *out) {
    pthread_mutex_lock(&h->mu);
    *out = h->st;
    out->blocks = (uint64_t)h->n_used;
    out->bytes = (uint64_t)h->n_used * h->block_bytes;
    pthread_mutex_unlock(&h->mu);
}
