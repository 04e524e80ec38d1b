/* respstore: see respstore.h. A flat array scanned linearly: thousands of entries at most, and
 * a lookup is one per request; entries are compared by id and namespace together, so another
 * tenant's id is simply not found. */
#include "respstore.h"
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *id, *ns;
    double expiry;
    uint64_t used;
    size_t bytes;
    resp_entry e;
} slot;

struct respstore {
    pthread_mutex_t mu;
    slot *v;
    int n, cap;
    size_t bytes, max_bytes;
    uint64_t tick;
};

static size_t entry_bytes(const resp_entry *e) {
    return (e->items ? strlen(e->items) : 0) + (e->prefix ? strlen(e->prefix) : 0) + (e->body ? strlen(e->body) : 0) +
           (size_t)e->n_tokens * sizeof(int32_t) + 128;
}

void resp_entry_free(resp_entry *e) {
    if (!e) return;
    free(e->items);
    free(e->prefix);
    free(e->tokens);
    free(e->body);
    memset(e, 0, sizeof *e);
}

static int copy_entry(resp_entry *dst, const resp_entry *src) {
    memset(dst, 0, sizeof *dst);
    dst->items = src->items ? strdup(src->items) : NULL;
    dst->prefix = src->prefix ? strdup(src->prefix) : NULL;
    dst->body = src->body ? strdup(src->body) : NULL;
    if (src->tokens && src->n_tokens > 0) {
        dst->tokens = malloc((size_t)src->n_tokens * sizeof *dst->tokens);
        if (dst->tokens) memcpy(dst->tokens, src->tokens, (size_t)src->n_tokens * sizeof *dst->tokens);
        dst->n_tokens = src->n_tokens;
    }
    if ((src->items && !dst->items) || (src->prefix && !dst->prefix) || (src->body && !dst->body) ||
        (src->tokens && src->n_tokens > 0 && !dst->tokens)) {
        resp_entry_free(dst);
        return -1;
    }
    return 0;
}

respstore *respstore_new(int max_entries, size_t max_bytes) {
    respstore *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->cap = max_entries > 0 ? max_entries : 1024;
    s->max_bytes = max_bytes;
    if (!(s->v = calloc((size_t)s->cap, sizeof *s->v))) { free(s); return NULL; }
    pthread_mutex_init(&s->mu, NULL);
    return s;
}

static void drop(respstore *s, int i) {
    s->bytes -= s->v[i].bytes;
    free(s->v[i].id);
    free(s->v[i].ns);
    resp_entry_free(&s->v[i].e);
    s->v[i] = s->v[--s->n];
}

void respstore_free(respstore *s) {
    if (!s) return;
    while (s->n) drop(s, s->n - 1);
    free(s->v);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

static int find(respstore *s, const char *id, const char *ns) {
    for (int i = 0; i < s->n; i++)
        if (!strcmp(s->v[i].id, id) && !strcmp(s->v[i].ns, ns)) return i;
    return -1;
}

int respstore_put(respstore *s, const char *id, const char *ns, double expiry, const resp_entry *e) {
    const size_t b = entry_bytes(e) + strlen(id) + strlen(ns);
    if (s->max_bytes && b > s->max_bytes) return -1;
    slot n = { 0 };
    n.id = strdup(id);
    n.ns = strdup(ns);
    n.expiry = expiry;
    n.bytes = b;
    if (!n.id || !n.ns || copy_entry(&n.e, e)) {
        free(n.id);
        free(n.ns);
        return -1;
    }
    pthread_mutex_lock(&s->mu);
    int i = find(s, id, ns);
    if (i >= 0) drop(s, i);
    while (s->n && (s->n == s->cap || (s->max_bytes && s->bytes + b > s->max_bytes))) {
        int lru = 0;   /* the least recently used */
        for (int k = 1; k < s->n; k++)
            if (s->v[k].used < s->v[lru].used) lru = k;
        drop(s, lru);
    }
    n.used = ++s->tick;
    s->v[s->n++] = n;
    s->bytes += b;
    pthread_mutex_unlock(&s->mu);
    return 0;
}

int respstore_get(respstore *s, const char *id, const char *ns, double now, double new_expiry, resp_entry *out) {
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&s->mu);
    int i = find(s, id, ns), rc = 0;
    if (i >= 0 && s->v[i].expiry <= now) { drop(s, i); i = -1; }
    if (i >= 0 && copy_entry(out, &s->v[i].e) == 0) {
        if (new_expiry > s->v[i].expiry) s->v[i].expiry = new_expiry;
        s->v[i].used = ++s->tick;
        rc = 1;
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int respstore_delete(respstore *s, const char *id, const char *ns, double now) {
    pthread_mutex_lock(&s->mu);
    int i = find(s, id, ns), rc = 0;
    if (i >= 0) {
        rc = s->v[i].expiry > now;
        drop(s, i);
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}
