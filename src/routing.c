/* routing: see routing.h. */
#include "routing.h"
#include "util.h"
#include <string.h>

static const char *const REASONS[RR_N] = { "prefix", "affinity", "load", "round_robin", "least_loaded", "response", "other" };
static const char *const POLICIES[] = { "cache", "round-robin", "least-loaded" };

const char *route_reason_name(route_reason r) { return r >= 0 && r < RR_N ? REASONS[r] : "unknown"; }
const char *route_policy_name(route_policy p) { return p >= 0 && p <= ROUTE_LEAST_LOADED ? POLICIES[p] : "unknown"; }

int route_policy_parse(const char *s) {
    for (int i = 0; s && i <= ROUTE_LEAST_LOADED; i++)
        if (!strcmp(s, POLICIES[i])) return i;
    return -1;
}

static uint64_t mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

#define FNV_OFF 1469598103934665603ull
#define FNV_PRIME 1099511628211ull
static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) { h ^= b[i]; h *= FNV_PRIME; }
    return h;
}

uint64_t route_hash(const char *s) { return fnv(FNV_OFF, s, strlen(s)); }

uint64_t route_affinity(const char *ns, const char *cache_key, const int32_t *tokens, int n) {
    uint64_t h = fnv(FNV_OFF, ns, strlen(ns));
    h = fnv(h, "\x1f", 1);
    if (cache_key && *cache_key) return fnv(fnv(h, "c", 1), cache_key, strlen(cache_key));
    if (ns[0]) return fnv(h, "n", 1);   /* a key's (or a cache_salt's) namespace: it alone */
    h = fnv(h, "t", 1);
    for (int i = 0; i < n; i++) h = fnv(h, &tokens[i], sizeof tokens[i]);
    return h;
}

/* Rendezvous weight of replica c for key a: the highest wins. */
static uint64_t weight(const route_cand *c, uint64_t a) { return mix64(a ^ mix64(c->id)); }

/* Whether x is preferred to y: lower load, then longer match (when by_match), then affinity. */
static bool better_loaded(const route_cand *x, const route_cand *y, uint64_t a, bool by_match) {
    if (x->load != y->load) return x->load < y->load;
    if (by_match && x->match != y->match) return x->match > y->match;
    return weight(x, a) > weight(y, a);
}

int route_choose(const route_params *rp, const route_cand *c, int n, route_reason *why) {
    const route_policy p = rp->policy;
    const uint64_t affinity = rp->affinity, rr = rp->rr;
    const int threshold = rp->threshold, min_match = rp->min_match > 1 ? rp->min_match : 1;
    int n_ok = 0, least = -1, min_load = 0, best_match = 0;
    for (int i = 0; i < n; i++) {
        if (!c[i].healthy) continue;
        if (!n_ok || c[i].load < min_load) min_load = c[i].load;
        if (c[i].match > best_match) best_match = c[i].match;
        n_ok++;
    }
    if (!n_ok) { *why = RR_N; return -1; }
    if (p == ROUTE_ROUND_ROBIN) {
        int k = (int)(rr % (uint64_t)n_ok);
        for (int i = 0; i < n; i++)
            if (c[i].healthy && k-- == 0) { *why = RR_ROUND_ROBIN; return i; }
    }
    if (p == ROUTE_LEAST_LOADED) {
        /* ties rotate with the counter, so equal loads spread as round-robin does */
        int start = (int)(rr % (uint64_t)n);
        for (int k = 0; k < n; k++) {
            int i = (start + k) % n;
            if (c[i].healthy && (least < 0 || c[i].load < c[least].load)) least = i;
        }
        *why = RR_LEAST_LOADED;
        return least;
    }
    int pick = -1;
    if (best_match >= min_match) {
        for (int i = 0; i < n; i++)
            if (c[i].healthy && c[i].match == best_match && (pick < 0 || better_loaded(&c[i], &c[pick], affinity, false))) pick = i;
        *why = RR_PREFIX;
    } else {
        for (int i = 0; i < n; i++)
            if (c[i].healthy && (pick < 0 || weight(&c[i], affinity) > weight(&c[pick], affinity))) pick = i;
        *why = RR_AFFINITY;
    }
    if (threshold >= 0 && c[pick].load > min_load + threshold) {
        for (int i = 0; i < n; i++)
            if (c[i].healthy && (least < 0 || better_loaded(&c[i], &c[least], affinity, true))) least = i;
        *why = RR_LOAD;
        return least;
    }
    return pick;
}

int route_replica_url(const char *s, char *out, size_t cap, char *err, size_t errlen) {
    if (!s || strncmp(s, "http://", 7)) return errf(err, errlen, "expected http://host:port");
    for (const char *q = s; *q; q++)
        if ((unsigned char)*q <= ' ' || *q == 0x7f || *q == '"' || *q == '\\' || *q == '?' || *q == '#')
            return errf(err, errlen, "a space, control character, quote, backslash, query or fragment in the URL");
    const char *p = s + 7, *auth_end = p + strcspn(p, "/"), *host_end;
    if (memchr(p, '@', (size_t)(auth_end - p))) return errf(err, errlen, "user info in the URL (the router passes the clients' credentials on)");
    if (*p == '[') {
        const char *rb = memchr(p, ']', (size_t)(auth_end - p));
        if (!rb || rb == p + 1) return errf(err, errlen, "bad IPv6 host (expected http://[addr]:port)");
        for (const char *q = p + 1; q < rb; q++)
            if (!strchr("0123456789abcdefABCDEF:.", *q)) return errf(err, errlen, "bad IPv6 host (expected http://[addr]:port)");
        host_end = rb + 1;
    } else {
        host_end = p;
        while (host_end < auth_end && *host_end != ':') host_end++;
        if (host_end == p) return errf(err, errlen, "no host (expected http://host:port)");
        for (const char *q = p; q < host_end; q++)
            if (!(*q >= 'a' && *q <= 'z') && !(*q >= 'A' && *q <= 'Z') && !(*q >= '0' && *q <= '9') && !strchr("-._", *q))
                return errf(err, errlen, "bad host (a name, an IPv4 address or [an IPv6 address]; no user info)");
    }
    if (host_end < auth_end) {
        long port = 0;
        const char *q = host_end + 1;
        if (*host_end != ':' || q == auth_end || auth_end - q > 5) return errf(err, errlen, "bad port");
        for (; q < auth_end; q++) {
            if (*q < '0' || *q > '9') return errf(err, errlen, "bad port");
            port = port * 10 + (*q - '0');
        }
        if (port < 1 || port > 65535) return errf(err, errlen, "bad port (1 to 65535)");
    }
    size_t n = strlen(s);
    while (n > (size_t)(auth_end - s) && s[n - 1] == '/') n--;
    if (n >= cap) return errf(err, errlen, "too long (at most %zu bytes)", cap ? cap - 1 : 0);
    memcpy(out, s, n);
    out[n] = 0;
    return 0;
}
