/* kvdisk: see kvdisk.h.
 *
 * The table is an open-addressing hash (linear probing, deletion by backward shift) keyed by
 * chain hash. Eviction scans it for its victim (expired first, then least recently used): a
 * scan of a few ten thousand entries costs less than the file it deletes.
 *
 * Chains are eaten from their ends. A lookup walks a chain from its first block, so a block
 * is worth nothing once its parent is gone; plain LRU would delete a document's first block
 * first (all of a prompt's blocks share one last-use time, and a later turn's deeper blocks
 * are newer still), leaving the rest of it unreachable. So each entry keeps its parent's chain
 * hash and a count of the held entries whose parent it is (kids), and eviction only takes
 * leaves (kids == 0): expired entries first, then orphans (a parent that is not held: only the
 * pool can still reach them), then the least recently used leaf. A document thus shrinks from
 * its end and its prefix stays servable. The counts are kept exact on every add and delete; an
 * entry deleted while it had kids (expiry, a bad file) leaves them orphaned, counted in
 * n_orphans, and only while that count is non-zero does adding an entry scan for its kids.
 *
 * Threads: one thread (the engine's I/O thread) calls put, get and clear; kvdisk_has and
 * kvdisk_get_stats may be called from another (the engine thread, at admission). A mutex
 * guards the table and the counters, never a file operation that waits for the device (the
 * write and fsync of a record happen outside it), so kvdisk_has never waits for I/O. Only the
 * writing thread changes the table, so it may use its entries between its own locked
 * sections. */
#include "kvdisk.h"
#include "util.h"
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
    uint64_t chain, parent, size;
    double expiry, last_use, ttl;
    int kids;       /* held entries whose parent is this chain */
    int kind;
    bool first;     /* the first block of its chain (parent is a chain root) */
    bool used;
} entry;

struct kvdisk {
    char *path;
    uint64_t model_fp, max_bytes;
    uint32_t n_layer, kv_dim;
    size_t max_record;
    entry *tab;
    size_t cap;   /* power of two */
    uint64_t n_orphans;   /* held non-first entries whose parent is not held */
    kvdisk_stats st;
    uint8_t *buf; /* one record */
    pthread_mutex_t mu;
};

static size_t home(const kvdisk *d, uint64_t chain) { return (size_t)(chain ^ chain >> 29) & (d->cap - 1); }

static entry *find(const kvdisk *d, uint64_t chain) {
    for (size_t i = home(d, chain);; i = (i + 1) & (d->cap - 1)) {
        if (!d->tab[i].used) return NULL;
        if (d->tab[i].chain == chain) return &d->tab[i];
    }
}

/* Kid bookkeeping for entry e joining (+1) or leaving (-1) the table. */
static void link_parent(kvdisk *d, entry *e, int dir) {
    if (e->first) return;
    entry *p = find(d, e->parent);
    if (p) p->kids += dir;
    else d->n_orphans = dir > 0 ? d->n_orphans + 1 : d->n_orphans - 1;
}

static void del(kvdisk *d, entry *e) {
    size_t i = (size_t)(e - d->tab), j = i;
    d->st.blocks--;
    d->st.bytes -= e->size;
    d->n_orphans += (uint64_t)e->kids;   /* its kids lose their parent */
    link_parent(d, e, -1);
    for (;;) {
        j = (j + 1) & (d->cap - 1);
        if (!d->tab[j].used) break;
        size_t k = home(d, d->tab[j].chain);
        /* move j back to i unless its home lies cyclically in (i, j] */
        if (i <= j ? (k <= i || k > j) : (k <= i && k > j)) {
            d->tab[i] = d->tab[j];
            i = j;
        }
    }
    d->tab[i].used = 0;
}

static int grow(kvdisk *d) {
    size_t ncap = d->cap ? d->cap * 2 : 1024;
    entry *old = d->tab, *t = calloc(ncap, sizeof *t);
    if (!t) return -1;
    size_t ocap = d->cap;
    d->tab = t;
    d->cap = ncap;
    for (size_t i = 0; i < ocap; i++)
        if (old[i].used) {
            size_t j = home(d, old[i].chain);
            while (t[j].used) j = (j + 1) & (ncap - 1);
            t[j] = old[i];
        }
    free(old);
    return 0;
}

static bool is_first(const kvdisk *d, const kvfile_meta *m) {
    return m->parent == kvfile_chain_root(d->model_fp, d->n_layer, d->kv_dim, m->ns);
}

/* Adds the entry of record m (size bytes). link: keep the kid counts (not during the open
 * scan, which counts them once at the end). */
static entry *add(kvdisk *d, const kvfile_meta *m, uint64_t size, double expiry, double last_use, bool link) {
    if ((d->st.blocks + 1) * 2 > d->cap && grow(d)) return NULL;
    size_t i = home(d, m->chain);
    while (d->tab[i].used) i = (i + 1) & (d->cap - 1);
    entry *e = &d->tab[i];
    *e = (entry){ .chain = m->chain, .parent = m->parent, .size = size, .expiry = expiry, .last_use = last_use,
                  .ttl = m->ttl, .kind = m->kind, .first = is_first(d, m), .used = true };
    d->st.blocks++;
    d->st.bytes += size;
    if (link) {
        link_parent(d, e, +1);
        if (d->n_orphans)   /* some of them may be this entry's kids */
            for (size_t k = 0; k < d->cap; k++)
                if (d->tab[k].used && !d->tab[k].first && d->tab[k].parent == e->chain && &d->tab[k] != e) {
                    e->kids++;
                    d->n_orphans--;
                }
    }
    return e;
}

static void file_of(const kvdisk *d, uint64_t chain, char *out, size_t n) {
    snprintf(out, n, "%s/%016llx.kvb", d->path, (unsigned long long)chain);
}

/* Removes the entry and its file. */
static void drop(kvdisk *d, entry *e) {
    char f[4096];
    file_of(d, e->chain, f, sizeof f);
    unlink(f);
    del(d, e);
}

/* Reads a whole file of at most cap bytes. Returns its length, -1 (errno set) on error,
 * -2 if it is larger than cap. */
static long read_all(const char *path, uint8_t *buf, size_t cap) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    size_t len = 0;
    for (;;) {
        if (len == cap) {
            uint8_t extra;
            ssize_t r = read(fd, &extra, 1);
            close(fd);
            return r == 0 ? (long)len : -2;
        }
        ssize_t r = read(fd, buf + len, cap - len);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) { int e = errno; close(fd); errno = e; return -1; }
        if (r == 0) break;
        len += (size_t)r;
    }
    close(fd);
    return (long)len;
}

/* Checks a decoded record against the store: model, layout. */
static int ours(const kvdisk *d, const kvfile_meta *m) {
    return m->model_fp == d->model_fp && m->n_layer == d->n_layer && m->kv_dim == d->kv_dim;
}

static int mkdirs(char *p) {
    for (char *s = p + 1; *s; s++)
        if (*s == '/') {
            *s = 0;
            int r = mkdir(p, 0755);
            *s = '/';
            if (r && errno != EEXIST) return -1;
        }
    return mkdir(p, 0755) && errno != EEXIST ? -1 : 0;
}

/* Eviction class of an entry: lower goes first. Expired; an orphan leaf; a live leaf; a block
 * with kids (taken only if nothing else is left, which a forest of chains never comes to). */
static int evict_class(const kvdisk *d, const entry *e, double now) {
    if (e->expiry <= now) return 0;
    if (e->kids > 0) return 3;
    return d->n_orphans && !e->first && !find(d, e->parent) ? 1 : 2;
}

/* Deletes records until `need` more bytes fit: expired first, then orphans, then the least
 * recently used leaf (see the top of the file). */
static void make_room(kvdisk *d, uint64_t need, double now) {
    while (d->st.blocks && d->st.bytes + need > d->max_bytes) {
        entry *v = NULL;
        int vc = 4;
        for (size_t i = 0; i < d->cap; i++) {
            entry *e = &d->tab[i];
            if (!e->used) continue;
            int c = evict_class(d, e, now);
            if (!v || c < vc || (c == vc && e->last_use < v->last_use)) { v = e; vc = c; }
        }
        if (v->expiry <= now) d->st.expired++;
        else d->st.evicted++;
        drop(d, v);
    }
}

/* Sets a record's file times to t (Unix seconds): its last use, and the time its expiry counts
 * from (see kvdisk.h). Best effort: a time that did not stick only lets it expire earlier. */
static void set_file_time(const kvdisk *d, uint64_t chain, double t) {
    char f[4096];
    file_of(d, chain, f, sizeof f);
    struct timespec ts[2];
    ts[0].tv_sec = (time_t)t;
    ts[0].tv_nsec = (long)((t - (double)ts[0].tv_sec) * 1e9);
    if (ts[0].tv_nsec < 0 || ts[0].tv_nsec >= 1000000000L) ts[0].tv_nsec = 0;
    ts[1] = ts[0];
    utimensat(AT_FDCWD, f, ts, 0);
}

/* Opens the store, or with readonly only reads it: nothing is created or deleted (a missing
 * directory is an empty store), bad, expired and temporary files are only counted. */
static int open_store(kvdisk **out, const char *dir, uint64_t model_fp, uint32_t n_layer, uint32_t kv_dim, uint64_t max_bytes,
                      double now, bool readonly, char *err, size_t errlen) {
    *out = NULL;
    kvdisk *d = calloc(1, sizeof *d);
    if (!d) return errf(err, errlen, "kvdisk: out of memory");
    pthread_mutex_init(&d->mu, NULL);
    d->model_fp = model_fp;
    d->n_layer = n_layer;
    d->kv_dim = kv_dim;
    d->max_bytes = max_bytes;
    d->max_record = kvfile_size(n_layer, kv_dim, KVFILE_NS_MAX);
    size_t pl = strlen(dir) + 64;
    d->path = malloc(pl);
    d->buf = malloc(d->max_record);
    if (!d->path || !d->buf || grow(d)) { kvdisk_close(d); return errf(err, errlen, "kvdisk: out of memory"); }
    snprintf(d->path, pl, "%s/%016llx-%ux%u-v%u", dir, (unsigned long long)model_fp, n_layer, kv_dim, KVFILE_VERSION);
    if (!readonly && mkdirs(d->path)) {
        int e = errno;
        errf(err, errlen, "kvdisk: cannot create %s: %s", d->path, strerror(e));
        kvdisk_close(d);
        return -1;
    }
    DIR *dh = opendir(d->path);
    if (!dh && readonly && errno == ENOENT) { *out = d; return 0; }
    if (!dh) {
        int e = errno;
        errf(err, errlen, "kvdisk: cannot read %s: %s", d->path, strerror(e));
        kvdisk_close(d);
        return -1;
    }
    struct dirent *de;
    char f[4096];
    while ((de = readdir(dh))) {
        const char *nm = de->d_name;
        size_t n = strlen(nm);
        if (nm[0] == '.' && (n < 4 || strcmp(nm + n - 4, ".tmp"))) continue;   /* ., .., not ours */
        snprintf(f, sizeof f, "%s/%s", d->path, nm);
        if (n > 4 && !strcmp(nm + n - 4, ".tmp")) {   /* a write cut short (or, read-only, maybe in progress) */
            if (!readonly) unlink(f);
            d->st.temporaries++;
            continue;
        }
        if (n != 20 || strcmp(nm + 16, ".kvb")) continue;
        char *end;
        errno = 0;
        unsigned long long chain = strtoull(nm, &end, 16);
        kvfile_meta m;
        const uint8_t *kv;
        long len = read_all(f, d->buf, d->max_record);
        struct stat sb;
        if (end != nm + 16 || errno || len < 0 || kvfile_decode(d->buf, (size_t)len, &m, &kv, NULL, 0) || !ours(d, &m) ||
            m.chain != chain || find(d, chain)) {
            if (!readonly) unlink(f);
            d->st.bad_files++;
            continue;
        }
        double mt = stat(f, &sb) ? now : (double)sb.st_mtim.tv_sec + sb.st_mtim.tv_nsec * 1e-9;
        double expiry = m.expiry > mt + m.ttl ? m.expiry : mt + m.ttl;   /* touched since written */
        if (expiry <= now) {
            if (!readonly) unlink(f);
            d->st.expired++;
            continue;
        }
        if (!add(d, &m, (uint64_t)len, expiry, mt, false)) { closedir(dh); kvdisk_close(d); return errf(err, errlen, "kvdisk: out of memory"); }
    }
    closedir(dh);
    for (size_t i = 0; i < d->cap; i++)   /* the kid counts, now that every entry is in */
        if (d->tab[i].used) link_parent(d, &d->tab[i], +1);
    if (!readonly) make_room(d, 0, now);
    *out = d;
    return 0;
}

int kvdisk_open(kvdisk **out, const char *dir, uint64_t model_fp, uint32_t n_layer, uint32_t kv_dim, uint64_t max_bytes,
                double now, char *err, size_t errlen) {
    return open_store(out, dir, model_fp, n_layer, kv_dim, max_bytes, now, false, err, errlen);
}

int kvdisk_scan(const char *dir, uint64_t model_fp, uint32_t n_layer, uint32_t kv_dim, double now, kvdisk_stats *out,
                char *err, size_t errlen) {
    kvdisk *d;
    memset(out, 0, sizeof *out);
    if (open_store(&d, dir, model_fp, n_layer, kv_dim, UINT64_MAX, now, true, err, errlen)) return -1;
    *out = d->st;
    kvdisk_close(d);
    return 0;
}

void kvdisk_close(kvdisk *d) {
    if (!d) return;
    free(d->tab);
    free(d->buf);
    free(d->path);
    pthread_mutex_destroy(&d->mu);
    free(d);
}

/* A use at now: the entry lives at least its ttl from now (as a hit refreshes a pool entry). */
static void touch(entry *e, double now) {
    e->last_use = now;
    if (now + e->ttl > e->expiry) e->expiry = now + e->ttl;
}

int kvdisk_touch(kvdisk *d, uint64_t chain, double now) {
    pthread_mutex_lock(&d->mu);
    entry *e = find(d, chain);
    int r = e && e->expiry > now;
    if (r) touch(e, now);
    pthread_mutex_unlock(&d->mu);
    if (r) set_file_time(d, chain, now);
    return r;
}

int kvdisk_covers(const kvdisk *d, uint64_t chain, int kind, double ttl, double now) {
    pthread_mutex_t *mu = (pthread_mutex_t *)&d->mu;
    pthread_mutex_lock(mu);
    const entry *e = find(d, chain);
    int r = e && e->expiry > now && e->kind >= kind && e->ttl >= ttl;
    pthread_mutex_unlock(mu);
    return r;
}

int kvdisk_has(const kvdisk *d, uint64_t chain, double now) {
    pthread_mutex_t *mu = (pthread_mutex_t *)&d->mu;
    pthread_mutex_lock(mu);
    const entry *e = find(d, chain);
    int r = e && e->expiry > now;
    pthread_mutex_unlock(mu);
    return r;
}

int kvdisk_put(kvdisk *d, const kvfile_meta *m, const void *kv, double now, char *err, size_t errlen) {
    if (!ours(d, m)) return errf(err, errlen, "kvdisk: a block of another model or layout");
    pthread_mutex_lock(&d->mu);
    entry *e = find(d, m->chain);
    if (e && e->expiry > now && e->ttl >= m->ttl && e->kind >= m->kind) {
        /* held with at least this lifetime: extend it instead of rewriting the block */
        touch(e, now);
        if (m->expiry > e->expiry) e->expiry = m->expiry;
        pthread_mutex_unlock(&d->mu);
        set_file_time(d, m->chain, now);
        return 0;
    }
    pthread_mutex_unlock(&d->mu);
    size_t len = kvfile_encode(m, kv, d->buf, d->max_record, err, errlen);
    if (!len) return -1;
    if (len > d->max_bytes) return 0;   /* never fits: not stored */
    pthread_mutex_lock(&d->mu);
    if (e) drop(d, e);
    make_room(d, len, now);
    pthread_mutex_unlock(&d->mu);
    char f[4096], tmp[4200];
    file_of(d, m->chain, f, sizeof f);
    snprintf(tmp, sizeof tmp, "%s/.%016llx.%ld.tmp", d->path, (unsigned long long)m->chain, (long)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644), ok = fd >= 0, er = ok ? 0 : errno;
    for (size_t off = 0; ok && off < len;) {
        ssize_t w = write(fd, d->buf + off, len - off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) { ok = 0; er = w < 0 ? errno : ENOSPC; break; }
        off += (size_t)w;
    }
    if (ok && fsync(fd)) { ok = 0; er = errno; }
    if (fd >= 0 && close(fd) && ok) { ok = 0; er = errno; }
    if (ok && rename(tmp, f)) { ok = 0; er = errno; }
    if (!ok) {
        unlink(tmp);
        pthread_mutex_lock(&d->mu);
        d->st.write_errors++;
        pthread_mutex_unlock(&d->mu);
        return errf(err, errlen, "kvdisk: writing %s: %s", f, strerror(er));
    }
    /* the file's time: its last use, never letting mtime + ttl outlive the record's expiry */
    set_file_time(d, m->chain, m->expiry - m->ttl < now ? m->expiry - m->ttl : now);
    pthread_mutex_lock(&d->mu);
    d->st.writes++;
    entry *a = add(d, m, len, m->expiry, now, true);
    pthread_mutex_unlock(&d->mu);
    if (!a) { unlink(f); return errf(err, errlen, "kvdisk: out of memory"); }
    return 0;
}

int kvdisk_get(kvdisk *d, uint64_t chain, const char *ns, const int32_t *tokens, int n, double now, kvfile_meta *m,
               void *kv, char *err, size_t errlen) {
    pthread_mutex_lock(&d->mu);
    d->st.lookups++;
    entry *e = find(d, chain);
    if (!e) { d->st.misses++; pthread_mutex_unlock(&d->mu); return 0; }
    if (e->expiry <= now) { d->st.expired++; drop(d, e); d->st.misses++; pthread_mutex_unlock(&d->mu); return 0; }
    pthread_mutex_unlock(&d->mu);
    char f[4096];
    file_of(d, chain, f, sizeof f);
    long len = read_all(f, d->buf, d->max_record);
    if (len == -1 && errno != ENOENT) { int er = errno; return errf(err, errlen, "kvdisk: reading %s: %s", f, strerror(er)); }
    const uint8_t *p;
    int r = 1;
    if (len < 0 || kvfile_decode(d->buf, (size_t)len, m, &p, NULL, 0) || !ours(d, m) || m->chain != chain) {
        pthread_mutex_lock(&d->mu);
        if (len != -1) d->st.bad_files++;   /* a missing file is only forgotten */
        drop(d, e);
        r = 0;
    } else if (strcmp(m->ns, ns ? ns : "") || m->n_tokens != n || memcmp(m->tokens, tokens, sizeof(int32_t) * (size_t)n)) {
        pthread_mutex_lock(&d->mu);
        r = 0;   /* another prefix under the same hash: not ours to serve */
    } else {
        memcpy(kv, p, kv_block_bytes((int)d->n_layer, (int)d->kv_dim));
        pthread_mutex_lock(&d->mu);
        e->last_use = now;
        m->expiry = e->expiry;   /* with the touches since it was written */
        d->st.hits++;
    }
    if (!r) d->st.misses++;
    pthread_mutex_unlock(&d->mu);
    return r;
}

int kvdisk_clear(kvdisk *d) {
    int n = 0;
    pthread_mutex_lock(&d->mu);
    for (size_t i = 0; i < d->cap;) {
        if (d->tab[i].used) { drop(d, &d->tab[i]); n++; }   /* backward shift may refill slot i */
        else i++;
    }
    pthread_mutex_unlock(&d->mu);
    return n;
}

void kvdisk_get_stats(const kvdisk *d, kvdisk_stats *out) {
    pthread_mutex_t *mu = (pthread_mutex_t *)&d->mu;
    pthread_mutex_lock(mu);
    *out = d->st;
    pthread_mutex_unlock(mu);
}
const char *kvdisk_path(const kvdisk *d) { return d->path; }
