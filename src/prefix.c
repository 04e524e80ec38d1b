/* prefix: cross-request prompt cache index (see prefix.h for the API).
 *
 * Data structures
 * - One radix tree per namespace (hash table name -> tree). Tenants never share a tree, so
 *   one tenant's prompts can never hit (or time) another's entries. The model is fixed per
 *   engine, and the index is per engine, so the model is implicitly part of the key.
 * - A node covers a run of tokens at positions [start, start + len) and owns a copy of them.
 *   Children are kept sorted by their first token (binary search): a lookup costs one token
 *   compare per matched token plus O(log kids) per node, so matching is token-granular with no
 *   minimum length, and one changed token stops the match right there.
 * - KV data never moves: position p of a cached path lives in pool block blocks[p / KV_BLOCK],
 *   slot p % KV_BLOCK. A node holds one pool reference per block its tokens touch, so a block
 *   straddling two nodes is referenced by both; the index only stores block ids.
 *   Invariant (V): each block a node holds is valid from the block's first slot up to
 *   min(node end, block end). It holds at insertion (the inserting sequence had [0, n) valid),
 *   survives splits (subranges) and merges (of two blocks for the boundary index the deeper
 *   node's is kept, which is valid further). A match therefore hands out, for each block
 *   index, the block of the deepest matched node touching it.
 * - Why not chained block hashes (vLLM style)? Hashing gives block granularity only; the
 *   brief wants token granularity with no minimum, which a radix tree gives directly, and a
 *   tree lookup compares tokens (exact, no hash collisions to worry about) at a cost of a few
 *   ns per token: a 2000-token lookup is a few microseconds.
 *
 * Entries and lifetimes
 * - An entry sits at the end of a node (inserting splits a node if needed) and has a kind
 *   (AUTO / EXPLICIT), a ttl, an expiry and a last-use time. Hits refresh expiry to now + ttl.
 *   Both kinds at one position merge into one entry (EXPLICIT wins, longer ttl wins).
 * - A node exists only while some entry at or below it exists: removing an entry prunes the
 *   nodes only it needed (unref'ing their blocks) and merges an entry-less node with a single
 *   child back into it, so the tree stays at most ~2 nodes per entry.
 * - Blocks a running sequence still holds keep their refcount above zero, so eviction never
 *   frees a block in use: the pool gets a block back only when the last holder drops it.
 * - Expiry is lazy: entries past their TTL are removed by prefix_expire (the engine calls it
 *   periodically), and lookups and inserts run the same check first. A lower bound on the
 *   earliest expiry makes that check O(1) when nothing is due, so a lookup never returns an
 *   expired entry's tokens (exactly at expiry = start + ttl the entry is gone).
 * - Eviction order under pressure: expired, then AUTO by least recent use, then EXPLICIT by
 *   earliest expiry. Entries are in one flat array (swap-remove); the first victim of a
 *   reclaim is found by a linear scan (a few us for thousands of entries; the common case
 *   frees the one block needed), and when more are needed the remaining entries are sorted
 *   once, so a large reclaim is O(E log E), not O(E^2). Removing an entry whose blocks are
 *   all held by running sequences frees nothing; the evictor goes on to the next one and
 *   reports a shortfall only when the index is empty. (Trade-off: under extreme pressure from
 *   running sequences the cache is emptied even though that alone cannot satisfy the request;
 *   the sequences re-insert their prompts when they finish.)
 * - The pool's reclaim hook has no clock argument: the index remembers the latest `now` it
 *   was given.
 */
#include "prefix.h"
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct px_ns px_ns;
typedef struct px_node px_node;

struct px_node {
    px_node *parent;          /* NULL for a namespace root */
    px_ns *ns;
    px_node **kids;           /* sorted by kids[i]->toks[0] */
    int n_kids, cap_kids;
    int start, len;           /* token positions [start, start + len) */
    int32_t *toks;            /* len tokens */
    int32_t *blocks;          /* node_nblocks(start, len) block ids, one pool reference each */
    int entry;                /* index into prefix_index.entries, -1 = no entry here */
    int kind;
    double ttl, expiry, last_use;
};

struct px_ns {
    px_ns *next;              /* hash chain */
    uint64_t hash;
    char *name;
    px_node root;             /* len 0, no blocks */
};

struct prefix_index {
    kv_pool *pool;
    px_ns **buckets;
    int n_buckets, n_ns;
    px_node **entries;
    int n_entries, cap_entries;
    int32_t *idx_refs;        /* per pool block: references held by the index */
    int blocks_held;          /* blocks with idx_refs > 0 */
    int n_nodes;
    int64_t cached_tokens;
    double now;               /* latest time seen (for the reclaim hook) */
    double next_expiry;       /* <= every entry's expiry */
    prefix_stats st;          /* counters; state fields filled by prefix_get_stats */
};

/* ---- small helpers ---- */

static int first_bi(int start) { return start / KV_BLOCK; }
static int node_nblocks(int start, int len) {
    return len > 0 ? (start + len - 1) / KV_BLOCK - start / KV_BLOCK + 1 : 0;
}

static void px_ref(prefix_index *px, int32_t b) {
    kv_block_ref(px->pool, b);
    if (px->idx_refs[b]++ == 0) px->blocks_held++;
}
static void px_unref(prefix_index *px, int32_t b) {
    if (--px->idx_refs[b] == 0) px->blocks_held--;
    kv_block_unref(px->pool, b);
}

static uint64_t hash_str(const char *s) {
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static void refresh(px_node *x, double now) {
    x->last_use = now;
    if (now + x->ttl > x->expiry) x->expiry = now + x->ttl;
}

/* ---- namespaces ---- */

static px_ns *ns_find(const prefix_index *px, const char *name, uint64_t h) {
    for (px_ns *s = px->buckets[h & (uint64_t)(px->n_buckets - 1)]; s; s = s->next)
        if (s->hash == h && !strcmp(s->name, name)) return s;
    return NULL;
}

static px_ns *ns_get(prefix_index *px, const char *name, uint64_t h) {
    px_ns *s = ns_find(px, name, h);
    if (s) return s;
    if (px->n_ns >= px->n_buckets && px->n_buckets <= (1 << 28)) {   /* grow: load <= 1 */
        int nb = px->n_buckets * 2;
        px_ns **b = calloc((size_t)nb, sizeof *b);
        if (!b) return NULL;
        for (int i = 0; i < px->n_buckets; i++)
            for (px_ns *t = px->buckets[i], *nx; t; t = nx) {
                nx = t->next;
                t->next = b[t->hash & (uint64_t)(nb - 1)];
                b[t->hash & (uint64_t)(nb - 1)] = t;
            }
        free(px->buckets);
        px->buckets = b;
        px->n_buckets = nb;
    }
    s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->name = strdup(name);
    if (!s->name) { free(s); return NULL; }
    s->hash = h;
    s->root.ns = s;
    s->root.entry = -1;
    px_ns **head = &px->buckets[h & (uint64_t)(px->n_buckets - 1)];
    s->next = *head;
    *head = s;
    px->n_ns++;
    return s;
}

/* Frees a namespace whose tree is empty. */
static void ns_drop_if_empty(prefix_index *px, px_ns *s) {
    if (s->root.n_kids || s->root.entry >= 0) return;
    px_ns **pp = &px->buckets[s->hash & (uint64_t)(px->n_buckets - 1)];
    while (*pp != s) pp = &(*pp)->next;
    *pp = s->next;
    free(s->root.kids);
    free(s->name);
    free(s);
    px->n_ns--;
}

/* ---- nodes ---- */

/* Index of the kid starting with token t, or -1; *ins = where it would be inserted. */
static int kid_find(const px_node *x, int32_t t, int *ins) {
    int lo = 0, hi = x->n_kids;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        int32_t m = x->kids[mid]->toks[0];
        if (m == t) { if (ins) *ins = mid; return mid; }
        if (m < t) lo = mid + 1; else hi = mid;
    }
    if (ins) *ins = lo;
    return -1;
}

static int kids_reserve(px_node *x, int need) {
    if (x->cap_kids >= need) return 0;
    int cap = x->cap_kids ? x->cap_kids * 2 : 2;
    if (cap < need) cap = need;
    px_node **k = realloc(x->kids, (size_t)cap * sizeof *k);
    if (!k) return -1;
    x->kids = k;
    x->cap_kids = cap;
    return 0;
}

static void kid_insert(px_node *x, px_node *c) {   /* capacity reserved by the caller */
    int at;
    kid_find(x, c->toks[0], &at);
    memmove(x->kids + at + 1, x->kids + at, (size_t)(x->n_kids - at) * sizeof *x->kids);
    x->kids[at] = c;
    x->n_kids++;
    c->parent = x;
}

static void kid_remove(px_node *x, px_node *c) {
    int at = kid_find(x, c->toks[0], NULL);
    if (at < 0) return;
    memmove(x->kids + at, x->kids + at + 1, (size_t)(x->n_kids - at - 1) * sizeof *x->kids);
    x->n_kids--;
}

/* Allocates a node for [start, start + len) (arrays uninitialised, no references). */
static px_node *node_alloc(int start, int len) {
    px_node *x = calloc(1, sizeof *x);
    if (!x) return NULL;
    x->toks = malloc((size_t)len * sizeof *x->toks);
    x->blocks = malloc((size_t)node_nblocks(start, len) * sizeof *x->blocks);
    if (!x->toks || !x->blocks) { free(x->toks); free(x->blocks); free(x); return NULL; }
    x->start = start;
    x->len = len;
    x->entry = -1;
    return x;
}

static void node_dealloc(px_node *x) {
    if (!x) return;
    free(x->toks);
    free(x->blocks);
    free(x->kids);
    free(x);
}

/* Unlinks an entry-less leaf from its parent, drops its block references, frees it. */
static void node_delete(prefix_index *px, px_node *x) {
    kid_remove(x->parent, x);
    for (int i = 0, nb = node_nblocks(x->start, x->len); i < nb; i++) px_unref(px, x->blocks[i]);
    px->n_nodes--;
    px->cached_tokens -= x->len;
    node_dealloc(x);
}

/* Splits x at k (0 < k < len) into upper u = [start, start + k) (returned, takes x's place
 * under the parent) and x = [start + k, end) below it. u was allocated by node_alloc(start, k)
 * with kids capacity reserved. */
static px_node *node_split(prefix_index *px, px_node *x, int k, px_node *u) {
    int nbu = node_nblocks(x->start, k);
    memcpy(u->toks, x->toks, (size_t)k * sizeof *u->toks);
    memcpy(u->blocks, x->blocks, (size_t)nbu * sizeof *u->blocks);
    for (int i = 0; i < nbu; i++) px_ref(px, u->blocks[i]);
    u->ns = x->ns;
    u->parent = x->parent;
    int at = kid_find(x->parent, x->toks[0], NULL);
    x->parent->kids[at] = u;                    /* same first token: order unchanged */
    int drop = first_bi(x->start + k) - first_bi(x->start);   /* blocks only u needs now */
    for (int i = 0; i < drop; i++) px_unref(px, x->blocks[i]);
    int nbx = node_nblocks(x->start + k, x->len - k);
    memmove(x->blocks, x->blocks + drop, (size_t)nbx * sizeof *x->blocks);
    memmove(x->toks, x->toks + k, (size_t)(x->len - k) * sizeof *x->toks);
    x->start += k;
    x->len -= k;
    u->kids[0] = x;
    u->n_kids = 1;
    x->parent = u;
    px->n_nodes++;
    return u;
}

/* Merges an entry-less, non-root x with its only child c (c absorbs x). Optional: on
 * allocation failure the tree is left as it is (still correct, one node longer). */
static void node_merge(prefix_index *px, px_node *x) {
    px_node *c = x->kids[0];
    int nbx = node_nblocks(x->start, x->len), nbc = node_nblocks(c->start, c->len);
    bool shared = c->start % KV_BLOCK != 0;          /* x's last and c's first block: one index */
    int nb = nbx + nbc - (shared ? 1 : 0);
    int32_t *toks = malloc((size_t)(x->len + c->len) * sizeof *toks);
    int32_t *blocks = malloc((size_t)nb * sizeof *blocks);
    if (!toks || !blocks) { free(toks); free(blocks); return; }
    memcpy(toks, x->toks, (size_t)x->len * sizeof *toks);
    memcpy(toks + x->len, c->toks, (size_t)c->len * sizeof *toks);
    int keep = shared ? nbx - 1 : nbx;
    memcpy(blocks, x->blocks, (size_t)keep * sizeof *blocks);
    memcpy(blocks + keep, c->blocks, (size_t)nbc * sizeof *blocks);
    if (shared) px_unref(px, x->blocks[nbx - 1]);    /* c's block is valid further (V) */
    free(c->toks);
    free(c->blocks);
    c->toks = toks;
    c->blocks = blocks;
    c->start = x->start;
    c->len += x->len;
    px_node *p = x->parent;
    p->kids[kid_find(p, x->toks[0], NULL)] = c;
    c->parent = p;
    x->n_kids = 0;
    px->n_nodes--;
    node_dealloc(x);
}

/* After x lost its entry or a child: delete the nodes no entry needs any more, merge a
 * pass-through node into its child, drop the namespace if its tree is empty. */
static void tidy(prefix_index *px, px_node *x) {
    px_ns *s = x->ns;
    while (x->parent && x->entry < 0 && x->n_kids == 0) {
        px_node *p = x->parent;
        node_delete(px, x);
        x = p;
    }
    if (x->parent && x->entry < 0 && x->n_kids == 1) node_merge(px, x);
    ns_drop_if_empty(px, s);
}

/* ---- entries ---- */

static void entry_remove(prefix_index *px, px_node *x) {
    int i = x->entry;
    px_node *last = px->entries[--px->n_entries];
    px->entries[i] = last;
    last->entry = i;
    x->entry = -1;
    tidy(px, x);
}

/* Removes every entry with expiry <= now (no-op when the bound says none is due). */
static int expire_due(prefix_index *px, double now) {
    if (now < px->next_expiry) return 0;
    int removed = 0;
    double next = 1e300;
    for (int i = px->n_entries - 1; i >= 0; i--) {
        if (i >= px->n_entries) continue;
        px_node *x = px->entries[i];
        if (x->expiry <= now) {
            entry_remove(px, x);
            removed++;
        }
    }
    for (int i = 0; i < px->n_entries; i++)
        if (px->entries[i]->expiry < next) next = px->entries[i]->expiry;
    px->next_expiry = next;
    px->st.evicted_expired += (uint64_t)removed;
    px->st.evictions += (uint64_t)removed;
    return removed;
}

/* Eviction priority: lower goes first. */
typedef struct { int cls; double key; } prio;
static prio entry_prio(const px_node *x, double now) {
    if (x->expiry <= now) return (prio){ 0, x->expiry };
    if (x->kind == PREFIX_AUTO) return (prio){ 1, x->last_use };
    return (prio){ 2, x->expiry };
}
static bool prio_less(prio a, prio b) { return a.cls != b.cls ? a.cls < b.cls : a.key < b.key; }

typedef struct { prio p; px_node *x; } victim;
static int victim_cmp(const void *a, const void *b) {
    const victim *u = a, *v = b;
    if (prio_less(u->p, v->p)) return -1;
    if (prio_less(v->p, u->p)) return 1;
    return 0;
}

static void evict_one(prefix_index *px, px_node *x, int cls) {
    if (cls == 0) px->st.evicted_expired++;
    else if (cls == 1) px->st.evicted_auto_lru++;
    else px->st.evicted_explicit++;
    px->st.evictions++;
    entry_remove(px, x);
}

/* ---- public API ---- */

static int px_reclaim(void *ctx, int n_needed) {
    prefix_index *px = ctx;
    px->st.reclaim_calls++;
    int freed = prefix_evict(px, n_needed, px->now);
    if (freed < n_needed) px->st.reclaim_short++;
    return freed;
}

prefix_index *prefix_create(kv_pool *pool) {
    if (!pool || pool->n_blocks <= 0) return NULL;
    prefix_index *px = calloc(1, sizeof *px);
    if (!px) return NULL;
    px->pool = pool;
    px->n_buckets = 16;
    px->buckets = calloc((size_t)px->n_buckets, sizeof *px->buckets);
    px->idx_refs = calloc((size_t)pool->n_blocks, sizeof *px->idx_refs);
    if (!px->buckets || !px->idx_refs) {
        free(px->buckets);
        free(px->idx_refs);
        free(px);
        return NULL;
    }
    px->next_expiry = 1e300;
    px->now = -1e300;
    pool->reclaim = px_reclaim;
    pool->reclaim_ctx = px;
    return px;
}

/* Drops every node below root (iteratively: trees can be deep). */
static void drop_tree(prefix_index *px, px_node *root) {
    while (root->n_kids) {
        px_node *x = root->kids[root->n_kids - 1];
        while (x->n_kids) x = x->kids[x->n_kids - 1];   /* deepest last leaf */
        x->parent->n_kids--;                             /* it is the parent's last kid */
        for (int i = 0, nb = node_nblocks(x->start, x->len); i < nb; i++) px_unref(px, x->blocks[i]);
        px->n_nodes--;
        px->cached_tokens -= x->len;
        node_dealloc(x);
    }
}

int prefix_clear_ns(prefix_index *px, const char *ns) {
    if (!px) return 0;
    if (!ns) ns = "";
    px_ns *s = ns_find(px, ns, hash_str(ns));
    if (!s) return 0;
    int removed = 0;
    for (int i = px->n_entries - 1; i >= 0; i--) {
        px_node *x = px->entries[i];
        if (x->ns != s) continue;
        px_node *last = px->entries[--px->n_entries];
        px->entries[i] = last;
        last->entry = i;
        x->entry = -1;
        removed++;
    }
    drop_tree(px, &s->root);
    ns_drop_if_empty(px, s);
    return removed;
}

void prefix_free(prefix_index *px) {
    if (!px) return;
    for (int i = 0; i < px->n_buckets; i++)
        for (px_ns *s = px->buckets[i], *nx; s; s = nx) {
            nx = s->next;
            drop_tree(px, &s->root);
            free(s->root.kids);
            free(s->name);
            free(s);
        }
    if (px->pool->reclaim == px_reclaim && px->pool->reclaim_ctx == px) {
        px->pool->reclaim = NULL;
        px->pool->reclaim_ctx = NULL;
    }
    free(px->buckets);
    free(px->entries);
    free(px->idx_refs);
    free(px);
}

int prefix_expire(prefix_index *px, double now) {
    if (!px) return 0;
    px->now = now;
    return expire_due(px, now);
}

int prefix_evict(prefix_index *px, int n_blocks, double now) {
    if (!px || n_blocks <= 0) return 0;
    px->now = now;
    kv_pool *pool = px->pool;
    int free0 = pool->n_free;
    /* First victim by a linear scan: usually one entry frees the block that was needed. */
    if (px->n_entries > 0) {
        int best = 0;
        prio bp = entry_prio(px->entries[0], now);
        for (int i = 1; i < px->n_entries; i++) {
            prio p = entry_prio(px->entries[i], now);
            if (prio_less(p, bp)) { bp = p; best = i; }
        }
        evict_one(px, px->entries[best], bp.cls);
    }
    if (pool->n_free - free0 < n_blocks && px->n_entries > 0) {
        /* More needed: order the rest once. Removing entries never changes other entries'
         * keys or frees a node that has an entry, so the order stays valid. */
        int n = px->n_entries;
        victim *v = malloc((size_t)n * sizeof *v);
        if (v) {
            for (int i = 0; i < n; i++) v[i] = (victim){ entry_prio(px->entries[i], now), px->entries[i] };
            qsort(v, (size_t)n, sizeof *v, victim_cmp);
            for (int i = 0; i < n && pool->n_free - free0 < n_blocks; i++) evict_one(px, v[i].x, v[i].p.cls);
            free(v);
        } else {
            while (pool->n_free - free0 < n_blocks && px->n_entries > 0) {   /* O(E^2) fallback */
                int best = 0;
                prio bp = entry_prio(px->entries[0], now);
                for (int i = 1; i < px->n_entries; i++) {
                    prio p = entry_prio(px->entries[i], now);
                    if (prio_less(p, bp)) { bp = p; best = i; }
                }
                evict_one(px, px->entries[best], bp.cls);
            }
        }
    }
    if (px->n_entries == 0) px->next_expiry = 1e300;
    int freed = pool->n_free - free0;
    px->st.blocks_reclaimed += (uint64_t)freed;
    return freed;
}

/* Walks tokens[0, n) down the tree: *node = deepest fully matched node (its end = *pos),
 * kid, k = the child matched partially (k < kid->len tokens) or NULL. */
static void walk(px_node *root, const int32_t *t, int n, px_node **node, int *pos, px_node **kid, int *k) {
    px_node *x = root;
    int p = 0;
    *kid = NULL;
    *k = 0;
    while (p < n && x->n_kids) {
        int i = kid_find(x, t[p], NULL);
        if (i < 0) break;
        px_node *c = x->kids[i];
        int lim = c->len < n - p ? c->len : n - p, j = 1;
        while (j < lim && c->toks[j] == t[p + j]) j++;
        if (j == c->len) { x = c; p += j; continue; }
        *kid = c;
        *k = j;
        break;
    }
    *node = x;
    *pos = p;
}

int prefix_match(prefix_index *px, const char *ns, const int32_t *tokens, int n, double now, kv_seq *out) {
    if (!px || !out || out->n_blocks != 0 || out->n_tokens != 0 || n < 0 || (n > 0 && !tokens)) return -1;
    px->now = now;
    expire_due(px, now);
    if (n == 0) return 0;
    px->st.lookups++;
    px->st.tokens_looked_up += (uint64_t)n;
    if (!ns) ns = "";
    px_ns *s = ns_find(px, ns, hash_str(ns));
    px_node *x = NULL, *kid = NULL;
    int pos = 0, k = 0;
    if (s) walk(&s->root, tokens, n, &x, &pos, &kid, &k);
    int m = pos + k;
    if (m == 0) { px->st.misses++; return 0; }
    int nb = (m + KV_BLOCK - 1) / KV_BLOCK;
    if (out->cap_blocks < nb) {
        int32_t *b = realloc(out->blocks, (size_t)nb * sizeof *b);
        if (!b) return -1;
        out->blocks = b;
        out->cap_blocks = nb;
    }
    /* Block for each index: the deepest matched node touching it (invariant V). Fill from the
     * bottom up, each node writing only the indices no deeper node wrote. */
    int filled = nb;                      /* indices >= filled are done */
    if (kid) {
        for (int bi = (kid->start + k - 1) / KV_BLOCK; bi >= first_bi(kid->start); bi--)
            out->blocks[bi] = kid->blocks[bi - first_bi(kid->start)];
        filled = first_bi(kid->start);
        if (kid->entry >= 0) refresh(kid, now);
    }
    for (px_node *y = x; y->parent; y = y->parent) {
        int lo = first_bi(y->start), hi = (y->start + y->len - 1) / KV_BLOCK;
        if (hi >= filled) hi = filled - 1;
        for (int bi = hi; bi >= lo; bi--) out->blocks[bi] = y->blocks[bi - lo];
        if (lo < filled) filled = lo;
        if (y->entry >= 0) refresh(y, now);
    }
    for (int i = 0; i < nb; i++) kv_block_ref(px->pool, out->blocks[i]);
    out->n_blocks = nb;
    out->n_tokens = m;
    px->st.hits++;
    px->st.tokens_saved += (uint64_t)m;
    return m;
}

int prefix_peek(const prefix_index *px, const char *ns, const int32_t *tokens, int n) {
    if (!px || n <= 0 || !tokens) return 0;
    if (!ns) ns = "";
    px_ns *s = ns_find(px, ns, hash_str(ns));
    if (!s) return 0;
    px_node *x = NULL, *kid = NULL;
    int pos = 0, k = 0;
    walk(&s->root, tokens, n, &x, &pos, &kid, &k);
    return pos + k;
}

/* prefix_insert (given: false, expiry = now + ttl_s) and prefix_insert_until (given: true). */
static int insert(prefix_index *px, const char *ns, const int32_t *tokens, int n, const kv_seq *seq, int kind,
                  double ttl_s, double expiry, bool given, double now) {
    if (!px || !seq || n < 0 || (n > 0 && !tokens)) return -1;
    if (!(expiry > now)) return -1;
    if (kind != PREFIX_AUTO && kind != PREFIX_EXPLICIT) return -1;
    if (!(ttl_s > 0) || ttl_s > 1e12) return -1;
    if (n == 0) return 0;
    if (seq->n_tokens < n || seq->n_blocks < (n + KV_BLOCK - 1) / KV_BLOCK) return -1;
    px->now = now;
    expire_due(px, now);
    if (!ns) ns = "";
    uint64_t h = hash_str(ns);
    px_ns *s = ns_get(px, ns, h);
    if (!s) return -1;
    px_node *x, *kid;
    int pos, k;
    walk(&s->root, tokens, n, &x, &pos, &kid, &k);
    int leaf_start = kid ? pos + k : pos;        /* first position not yet in the tree */
    /* Validate the blocks we will reference, then allocate everything before mutating. */
    for (int bi = first_bi(leaf_start); leaf_start < n && bi <= (n - 1) / KV_BLOCK; bi++) {
        int32_t b = seq->blocks[bi];
        if (b < 0 || b >= px->pool->n_blocks || px->pool->refcnt[b] <= 0) { ns_drop_if_empty(px, s); return -1; }
    }
    px_node *u = NULL, *leaf = NULL;
    bool fail = false;
    if (px->n_entries == px->cap_entries) {
        int cap = px->cap_entries ? px->cap_entries * 2 : 64;
        px_node **e = realloc(px->entries, (size_t)cap * sizeof *e);
        if (e) { px->entries = e; px->cap_entries = cap; } else fail = true;
    }
    if (kid) {
        u = node_alloc(kid->start, k);
        if (!u || kids_reserve(u, 2)) fail = true;
    } else if (leaf_start < n && kids_reserve(x, x->n_kids + 1)) fail = true;
    if (leaf_start < n) {
        leaf = node_alloc(leaf_start, n - leaf_start);
        if (!leaf) fail = true;
    }
    if (fail) {
        node_dealloc(u);
        node_dealloc(leaf);
        ns_drop_if_empty(px, s);
        return -1;
    }
    if (kid) x = node_split(px, kid, k, u);
    if (leaf) {
        memcpy(leaf->toks, tokens + leaf_start, (size_t)leaf->len * sizeof *leaf->toks);
        for (int i = 0, nb = node_nblocks(leaf->start, leaf->len); i < nb; i++) {
            leaf->blocks[i] = seq->blocks[first_bi(leaf_start) + i];
            px_ref(px, leaf->blocks[i]);
        }
        leaf->ns = s;
        kid_insert(x, leaf);
        px->n_nodes++;
        px->cached_tokens += leaf->len;
        x = leaf;
    }
    /* x ends at n: put or upgrade the entry. */
    if (x->entry < 0) {
        x->entry = px->n_entries;
        px->entries[px->n_entries++] = x;
        x->kind = kind;
        x->ttl = ttl_s;
        x->expiry = expiry;
        x->last_use = now;
    } else {
        if (kind > x->kind) x->kind = kind;
        if (ttl_s > x->ttl) x->ttl = ttl_s;
        if (!given) refresh(x, now);
        else {
            x->last_use = now;
            if (expiry > x->expiry) x->expiry = expiry;
        }
    }
    if (x->expiry < px->next_expiry) px->next_expiry = x->expiry;
    int added = n - leaf_start;
    px->st.tokens_inserted += (uint64_t)added;
    return added;
}

int prefix_insert(prefix_index *px, const char *ns, const int32_t *tokens, int n, const kv_seq *seq,
                  int kind, double ttl_s, double now) {
    return insert(px, ns, tokens, n, seq, kind, ttl_s, now + ttl_s, false, now);
}

int prefix_insert_until(prefix_index *px, const char *ns, const int32_t *tokens, int n, const kv_seq *seq,
                        int kind, double ttl_s, double expiry, double now) {
    return insert(px, ns, tokens, n, seq, kind, ttl_s, expiry, true, now);
}

void prefix_get_stats(const prefix_index *px, prefix_stats *out) {
    memset(out, 0, sizeof *out);
    if (!px) return;
    *out = px->st;
    out->namespaces = px->n_ns;
    out->entries = px->n_entries;
    for (int i = 0; i < px->n_entries; i++) {
        if (px->entries[i]->kind == PREFIX_EXPLICIT) out->entries_explicit++;
        else out->entries_auto++;
    }
    out->nodes = px->n_nodes;
    out->cached_tokens = px->cached_tokens;
    out->blocks_held = px->blocks_held;
    for (int b = 0; b < px->pool->n_blocks; b++)
        if (px->idx_refs[b] > 0 && px->pool->refcnt[b] == px->idx_refs[b]) out->blocks_index_only++;
}

int prefix_visit(const prefix_index *px, int (*fn)(void *user, const prefix_entry_info *e), void *user) {
    if (!px || !fn) return -1;
    int32_t *buf = NULL;
    int cap = 0, rc = 0;
    for (int i = 0; i < px->n_entries && rc == 0; i++) {
        const px_node *x = px->entries[i];
        int n = x->start + x->len;
        if (n > cap) {
            int32_t *b = realloc(buf, (size_t)n * sizeof *b);
            if (!b) { rc = -1; break; }
            buf = b;
            cap = n;
        }
        for (const px_node *y = x; y->parent; y = y->parent)
            memcpy(buf + y->start, y->toks, (size_t)y->len * sizeof *buf);
        prefix_entry_info e = { x->ns->name, buf, n, x->kind, x->ttl, x->expiry, x->last_use };
        rc = fn(user, &e);
    }
    free(buf);
    return rc;
}

/* ---- self-check ---- */

#define CHECK(cond, ...) do { if (!(cond)) { snprintf(err, errlen, __VA_ARGS__); goto out; } } while (0)

int prefix_check(const prefix_index *px, char *err, size_t errlen) {
    const kv_pool *pool = px->pool;
    int rc = -1, nodes = 0, entries = 0, ns = 0;
    int64_t toks = 0;
    int32_t *refs = calloc((size_t)pool->n_blocks, sizeof *refs);
    px_node **stack = NULL;
    int sp = 0, cap = 0;
    CHECK(refs, "out of memory");
    for (int i = 0; i < px->n_buckets; i++)
        for (const px_ns *s = px->buckets[i]; s; s = s->next) {
            ns++;
            CHECK(s->root.n_kids > 0, "namespace '%s' has an empty tree", s->name);
            CHECK(s->root.entry < 0 && s->root.len == 0, "namespace '%s' root is not empty", s->name);
            if (sp == cap) {
                cap = cap ? cap * 2 : 64;
                px_node **ns_ = realloc(stack, (size_t)cap * sizeof *ns_);
                CHECK(ns_, "out of memory");
                stack = ns_;
            }
            stack[sp++] = (px_node *)&s->root;
            while (sp) {
                px_node *x = stack[--sp];
                CHECK(x->ns == s, "node in the wrong namespace");
                if (x->parent) {
                    nodes++;
                    toks += x->len;
                    CHECK(x->len > 0, "empty non-root node");
                    CHECK(x->start == x->parent->start + x->parent->len, "node start %d != parent end", x->start);
                    CHECK(x->entry >= 0 || x->n_kids > 0, "node [%d,+%d) has no entry and no kids", x->start, x->len);
                    for (int b = 0, nb = node_nblocks(x->start, x->len); b < nb; b++) {
                        int32_t id = x->blocks[b];
                        CHECK(id >= 0 && id < pool->n_blocks, "bad block id %d", id);
                        refs[id]++;
                    }
                }
                if (x->entry >= 0) {
                    entries++;
                    CHECK(x->entry < px->n_entries && px->entries[x->entry] == x, "entry table mismatch");
                    CHECK(x->kind == PREFIX_AUTO || x->kind == PREFIX_EXPLICIT, "bad entry kind");
                    CHECK(x->expiry >= px->next_expiry, "expiry below the lower bound");
                }
                for (int j = 0; j < x->n_kids; j++) {
                    CHECK(x->kids[j]->parent == x, "kid's parent pointer wrong");
                    if (j) CHECK(x->kids[j - 1]->toks[0] < x->kids[j]->toks[0], "kids not sorted / duplicate first token");
                    if (sp == cap) {
                        cap *= 2;
                        px_node **ns_ = realloc(stack, (size_t)cap * sizeof *ns_);
                        CHECK(ns_, "out of memory");
                        stack = ns_;
                    }
                    stack[sp++] = x->kids[j];
                }
            }
        }
    CHECK(ns == px->n_ns, "namespace count %d != %d", ns, px->n_ns);
    CHECK(nodes == px->n_nodes, "node count %d != %d", nodes, px->n_nodes);
    CHECK(toks == px->cached_tokens, "cached tokens %lld != %lld", (long long)toks, (long long)px->cached_tokens);
    CHECK(entries == px->n_entries, "entry count %d != %d", entries, px->n_entries);
    int held = 0, used = 0;
    for (int b = 0; b < pool->n_blocks; b++) {
        CHECK(refs[b] == px->idx_refs[b], "block %d: index refs %d, counted %d", b, px->idx_refs[b], refs[b]);
        CHECK(pool->refcnt[b] >= refs[b], "block %d: pool refcnt %d < index refs %d", b, pool->refcnt[b], refs[b]);
        if (refs[b]) held++;
        if (pool->refcnt[b] > 0) used++;
    }
    CHECK(held == px->blocks_held, "blocks held %d != %d", held, px->blocks_held);
    CHECK(used + pool->n_free == pool->n_blocks, "pool: %d used + %d free != %d", used, pool->n_free, pool->n_blocks);
    rc = 0;
out:
    free(refs);
    free(stack);
    return rc;
}
