/* fuzz_cluster: libFuzzer harness for the parsers of issue 14's cluster: what `--redis` and
 * `--replica` take (an operator's strings) and the KV events read back from the shared Redis
 * stream (any process that can write to that Redis writes them: hostile data).
 * The first byte picks the parser:
 *   0  redis_url_parse (redis.h): the rest is the URL, then optionally a NUL and the
 *      REDIS_PASSWORD value. An accepted URL has a host, a port in 1-65535 and a db in range,
 *      and its printed form (redis_url_print, password masked) parses back to the same host,
 *      port, db and user.
 *   1  route_replica_url (routing.h): the rest is the URL. An accepted one is normalized
 *      (parses back to itself) and holds nothing the /metrics label or a request URL can't.
 *   2  kvevent_entry_parse (kvindex.h) and kvindex_apply: the rest is stream entries separated
 *      by '\n', each a list of fields name '\t' value '\t' name ..., applied in turn to a small
 *      index (4 owners, 64 chains each, so the bounds are reached). An accepted entry's fields
 *      format back to the values it came from (hex case aside), and the index then answers as
 *      the entry said (a store is held unless the owner is full, an evict is gone, a
 *      hello/clear empties the owner, a bye forgets it).
 * Run: scripts/fuzz-cluster.sh SECONDS. */
#include "kvevent.h"
#include "kvindex.h"
#include "redis.h"
#include "routing.h"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define FP 0x1234567890abcdefull
#define N_LAYER 30
#define KV_DIM 192
#define MAX_CHAINS 64

static void check(int ok, const char *what) {
    if (!ok) {
        fprintf(stderr, "fuzz_cluster: %s\n", what);
        abort();
    }
}

static void redis_one(const char *s, const char *env) {
    redis_url u, v;
    char err[256] = "", printed[1024];
    if (redis_url_parse(s, env, &u, err, sizeof err)) {
        check(err[0] != 0, "redis: refused without a reason");
        return;
    }
    check(u.host[0] != 0, "redis: no host");
    check(u.port >= 1 && u.port <= 65535, "redis: port out of range");
    check(u.db >= 0 && u.db <= 1 << 20, "redis: db out of range");
    check(memchr(u.host, 0, sizeof u.host) && memchr(u.user, 0, sizeof u.user) && memchr(u.password, 0, sizeof u.password),
          "redis: unterminated field");
    redis_url_print(&u, printed, sizeof printed);
    if (u.password[0]) check(strstr(printed, ":***@") != NULL, "redis: printed without the masked password");
    /* the printed form parses back, unless the user name holds what a URL would need escaped */
    if (strpbrk(u.user, "@:/%")) return;
    check(redis_url_parse(printed, NULL, &v, err, sizeof err) == 0, "redis: the printed URL does not parse");
    check(!strcmp(u.host, v.host) && u.port == v.port && u.db == v.db && !strcmp(u.user, v.user),
          "redis: the printed URL parses to another address");
}

static int forbidden(const char *s) {
    for (; *s; s++)
        if ((unsigned char)*s <= ' ' || *s == 0x7f || *s == '"' || *s == '\\' || *s == '?' || *s == '#') return 1;
    return 0;
}

static void replica_one(const char *s) {
    char out[512], again[512], err[256] = "";
    if (route_replica_url(s, out, sizeof out, err, sizeof err)) {
        check(err[0] != 0, "replica: refused without a reason");
        return;
    }
    size_t n = strlen(out);
    check(n > 7 && !strncmp(out, "http://", 7), "replica: not http://host");
    check(out[n - 1] != '/', "replica: trailing slash kept");
    check(!forbidden(out), "replica: a character the label or a request URL can't hold");
    const char *auth_end = out + 7 + strcspn(out + 7, "/");
    check(!memchr(out + 7, '@', (size_t)(auth_end - out - 7)), "replica: user info accepted");
    check(!strncmp(out, s, n), "replica: not a prefix of the input");
    check(route_replica_url(out, again, sizeof again, err, sizeof err) == 0 && !strcmp(out, again),
          "replica: not normalized");
    /* a smaller buffer refuses, never truncates */
    char small[16];
    if (route_replica_url(s, small, sizeof small, err, sizeof err) == 0) check(n < sizeof small && !strcmp(small, out), "replica: truncated");
}

/* The last value of field `name` among the n fields (the parser's rule), or NULL. */
static const char *field(const char *const *names, const char *const *values, int n, const char *name) {
    const char *v = NULL;
    for (int i = 0; i < n; i++)
        if (!strcmp(names[i], name)) v = values[i];
    return v;
}

static void event_one(kvindex *x, char *line) {
    const char *names[32], *values[32];
    int n = 0;
    for (char *p = line; p && n < 32;) {
        char *tab = strchr(p, '\t');
        if (!tab) break;
        *tab = 0;
        names[n] = p;
        values[n++] = tab + 1;
        p = strchr(tab + 1, '\t');
        if (p) *p++ = 0;
    }
    static kvevent_entry e;
    int rc = kvevent_entry_parse(names, values, n, &e);
    check(rc >= -1 && rc <= 1, "event: bad return");
    if (rc) return;
    check(e.op >= 0 && e.op < KVEV_N, "event: bad op");
    check(e.n_chains >= 0 && e.n_chains <= KVEVENT_MAX_CHAINS, "event: bad chain count");
    check(e.n_chains == 0 || e.op == KVEV_STORE || e.op == KVEV_EVICT, "event: chains on another op");
    /* the fields format back to what they were */
    char hex[17], layout[64], list[KVEVENT_MAX_CHAINS * 17 + 1];
    kvevent_hex64(e.inst, hex);
    check(!strcasecmp(hex, field(names, values, n, "inst")), "event: inst does not round-trip");
    kvevent_hex64(e.fp, hex);
    check(!strcasecmp(hex, field(names, values, n, "fp")), "event: fp does not round-trip");
    check(!strcmp(kvevent_op_name(e.op), field(names, values, n, "op")), "event: op does not round-trip");
    snprintf(layout, sizeof layout, "%ux%u", e.n_layer, e.kv_dim);
    check(!strcmp(layout, field(names, values, n, "layout")), "event: layout does not round-trip");
    if (e.op == KVEV_STORE || e.op == KVEV_EVICT) {
        check(kvevent_format_chains(e.chains, e.n_chains, list, sizeof list) >= 0, "event: chains do not format");
        check(!strcasecmp(list, field(names, values, n, "chains")), "event: chains do not round-trip");
    }
    /* the index then says what the entry said */
    int ar = kvindex_apply(x, &e, FP, N_LAYER, KV_DIM);
    bool ours = e.fp == FP && e.n_layer == N_LAYER && e.kv_dim == KV_DIM;
    check(ar == (ours ? 0 : 1), "event: applied another model's entry, or skipped ours");
    if (!ours) return;
    size_t held = kvindex_count(x, e.inst);
    check(held <= MAX_CHAINS, "event: owner past its bound");
    switch (e.op) {
    case KVEV_STORE:
        if (held < MAX_CHAINS) check(kvindex_match(x, e.inst, e.chains, e.n_chains, 1) == e.n_chains, "event: store not held");
        break;
    case KVEV_EVICT:
        for (int i = 0; i < e.n_chains; i++) check(kvindex_match(x, e.inst, &e.chains[i], 1, 1) == 0, "event: evicted chain held");
        break;
    default:   /* hello, clear, bye */
        check(held == 0, "event: owner not emptied");
        break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1 || size > 1 << 16) return 0;
    char *s = malloc(size + 1);
    if (!s) return 0;
    memcpy(s, data + 1, size - 1);
    s[size - 1] = 0;
    switch (data[0] % 3) {
    case 0: {
        size_t l = strlen(s);
        redis_one(s, l + 1 < size ? s + l + 1 : NULL);
        break;
    }
    case 1:
        replica_one(s);
        break;
    case 2: {
        kvindex *x = kvindex_new(MAX_CHAINS, 4);
        if (!x) break;
        for (char *line = s, *nl; line; line = nl) {
            if ((nl = strchr(line, '\n'))) *nl++ = 0;
            event_one(x, line);
        }
        kvindex_free(x);
        break;
    }
    }
    free(s);
    return 0;
}
