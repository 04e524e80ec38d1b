/* redis: see redis.h. */
#include "redis.h"
#include "util.h"
#include <hiredis/hiredis.h>
#include <ctype.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Copies [s, e) into out (cap bytes) decoding %XX. Returns 0, or -1 (bad escape, too long, NUL). */
static int unescape(const char *s, const char *e, char *out, size_t cap) {
    size_t n = 0;
    for (; s < e; s++) {
        int c = (unsigned char)*s;
        if (c == '%') {
            if (e - s < 3 || hexval(s[1]) < 0 || hexval(s[2]) < 0) return -1;
            c = hexval(s[1]) * 16 + hexval(s[2]);
            s += 2;
            if (!c) return -1;
        }
        if (n + 1 >= cap) return -1;
        out[n++] = (char)c;
    }
    out[n] = 0;
    return 0;
}

/* A decimal number in [lo, hi] spanning exactly [s, e). */
static int number(const char *s, const char *e, long lo, long hi, int *out) {
    if (s == e || e - s > 9) return -1;
    long v = 0;
    for (const char *p = s; p < e; p++) {
        if (*p < '0' || *p > '9') return -1;
        v = v * 10 + (*p - '0');
    }
    if (v < lo || v > hi) return -1;
    *out = (int)v;
    return 0;
}

int redis_url_parse(const char *s, const char *env_password, redis_url *u, char *err, size_t errlen) {
    memset(u, 0, sizeof *u);
    u->port = 6379;
    if (!s) return errf(err, errlen, "--redis: no URL");
    if (!strncmp(s, "rediss://", 9)) return errf(err, errlen, "--redis: rediss:// (TLS) is not supported by this build's hiredis");
    if (strncmp(s, "redis://", 8)) return errf(err, errlen, "--redis: the URL must start with redis:// (redis://[[user]:password@]host[:port][/db])");
    const char *p = s + 8, *end = p + strlen(p);
    /* userinfo: up to the last '@' before the path (a password may hold '@' only escaped, but
     * taking the last one is kinder) */
    const char *path = memchr(p, '/', (size_t)(end - p));
    const char *auth_end = path ? path : end;
    const char *at = NULL;
    for (const char *q = p; q < auth_end; q++)
        if (*q == '@') at = q;
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        if (colon) {
            if (unescape(p, colon, u->user, sizeof u->user) || unescape(colon + 1, at, u->password, sizeof u->password))
                return errf(err, errlen, "--redis: bad user or password in the URL (too long, or a bad %%XX escape)");
        } else if (unescape(p, at, u->user, sizeof u->user)) {
            return errf(err, errlen, "--redis: bad user in the URL");
        }
        /* redis://password@host (no colon) is what some tools write for a password alone; a
         * Redis user without a password cannot AUTH, so read it as the password */
        if (!colon) {
            snprintf(u->password, sizeof u->password, "%s", u->user);
            u->user[0] = 0;
        }
        p = at + 1;
    }
    const char *host_end;
    if (*p == '[') {
        const char *rb = memchr(p, ']', (size_t)(auth_end - p));
        if (!rb || rb == p + 1) return errf(err, errlen, "--redis: bad IPv6 host in the URL");
        if ((size_t)(rb - p - 1) >= sizeof u->host) return errf(err, errlen, "--redis: host too long");
        /* an IPv6 address, maybe with a zone (fe80::1%eth0): nothing that a name could not hold */
        const char *zone = memchr(p + 1, '%', (size_t)(rb - p - 1));
        for (const char *q = p + 1; q < rb; q++) {
            bool ok = zone && q > zone ? isalnum((unsigned char)*q) || strchr("-._", *q)
                                       : q == zone || strchr("0123456789abcdefABCDEF:.", *q);
            if (!ok) return errf(err, errlen, "--redis: bad IPv6 host in the URL");
        }
        if (zone && (zone + 1 == rb || !memchr(p + 1, ':', (size_t)(zone - p - 1))))
            return errf(err, errlen, "--redis: bad IPv6 host in the URL");
        memcpy(u->host, p + 1, (size_t)(rb - p - 1));
        host_end = rb + 1;
        if (host_end < auth_end && *host_end != ':') return errf(err, errlen, "--redis: bad IPv6 host in the URL");
    } else {
        host_end = p;
        while (host_end < auth_end && *host_end != ':') host_end++;
        if (host_end == p) return errf(err, errlen, "--redis: no host in the URL");
        if ((size_t)(host_end - p) >= sizeof u->host) return errf(err, errlen, "--redis: host too long");
        for (const char *q = p; q < host_end; q++)
            if (*q == '@' || *q == '[' || *q == ']' || *q == '%' || *q == '?' || *q == '#' || (unsigned char)*q <= ' ')
                return errf(err, errlen, "--redis: bad host in the URL");
        memcpy(u->host, p, (size_t)(host_end - p));
    }
    if (host_end < auth_end && number(host_end + 1, auth_end, 1, 65535, &u->port))
        return errf(err, errlen, "--redis: bad port in the URL");
    if (path && path + 1 < end && number(path + 1, end, 0, 1 << 20, &u->db))
        return errf(err, errlen, "--redis: bad database number in the URL (redis://host:port/N)");
    if (!u->password[0] && env_password && *env_password) {
        if (strlen(env_password) >= sizeof u->password) return errf(err, errlen, "REDIS_PASSWORD: too long");
        snprintf(u->password, sizeof u->password, "%s", env_password);
    }
    return 0;
}

void redis_url_print(const redis_url *u, char *out, size_t cap) {
    bool v6 = strchr(u->host, ':') != NULL;
    /* a user without a password keeps its ':' ("bob@" alone would read as a password) */
    snprintf(out, cap, "redis://%s%s%s%s%s%s:%d/%d", u->user, u->password[0] ? ":***" : u->user[0] ? ":" : "", u->user[0] || u->password[0] ? "@" : "",
             v6 ? "[" : "", u->host, v6 ? "]" : "", u->port, u->db);
}

double redis_backoff_s(int attempt, double max_s, unsigned rnd) {
    double d = 0.1;
    for (int i = 0; i < attempt && d < max_s; i++) d *= 2;
    if (d > max_s) d = max_s;
    return d * (0.75 + 0.5 * (rnd % 1001) / 1000.0);
}

/* Runs a command that must answer +OK / a status; err gets Redis's error otherwise. */
static int simple(redisContext *c, int argc, const char **argv, const char *what, char *err, size_t errlen) {
    redisReply *r = redisCommandArgv(c, argc, argv, NULL);
    if (!r) return errf(err, errlen, "redis %s: %s", what, c->errstr[0] ? c->errstr : "no answer");
    int rc = r->type == REDIS_REPLY_ERROR ? errf(err, errlen, "redis %s: %s", what, r->str) : 0;
    freeReplyObject(r);
    return rc;
}

redisContext *redis_connect(const redis_url *u, double timeout_s, char *err, size_t errlen) {
    struct timeval tv = { (time_t)timeout_s, (suseconds_t)((timeout_s - (double)(time_t)timeout_s) * 1e6) };
    redisContext *c = redisConnectWithTimeout(u->host, u->port, tv);
    if (!c) { errf(err, errlen, "redis %s:%d: out of memory", u->host, u->port); return NULL; }
    if (c->err) {
        errf(err, errlen, "redis %s:%d: %s", u->host, u->port, c->errstr);
        redisFree(c);
        return NULL;
    }
    if (redisSetTimeout(c, tv) != REDIS_OK) {
        errf(err, errlen, "redis %s:%d: cannot set the timeout", u->host, u->port);
        redisFree(c);
        return NULL;
    }
    redisEnableKeepAlive(c);
    char db[16];
    snprintf(db, sizeof db, "%d", u->db);
    const char *auth2[] = { "AUTH", u->password }, *auth3[] = { "AUTH", u->user, u->password };
    const char *sel[] = { "SELECT", db }, *ping[] = { "PING" };
    if ((u->password[0] && (u->user[0] ? simple(c, 3, auth3, "AUTH", err, errlen) : simple(c, 2, auth2, "AUTH", err, errlen))) ||
        (u->db && simple(c, 2, sel, "SELECT", err, errlen)) || simple(c, 1, ping, "PING", err, errlen)) {
        redisFree(c);
        return NULL;
    }
    return c;
}
