/* util: see util.h. */
#include "util.h"
#include <errno.h>
#include <stdarg.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int parse_size(const char *s, size_t *out) {
    if (!s || !*s) return -1;
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    if (errno || end == s || !(v >= 0)) return -1;
    double mul = 1;
    switch (*end) {
    case 'k': case 'K': mul = 1024.0; end++; break;
    case 'm': case 'M': mul = 1024.0 * 1024; end++; break;
    case 'g': case 'G': mul = 1024.0 * 1024 * 1024; end++; break;
    case 't': case 'T': mul = 1024.0 * 1024 * 1024 * 1024; end++; break;
    default: break;
    }
    if (*end == 'i' || *end == 'I') end++;
    if (*end == 'b' || *end == 'B') end++;
    if (*end) return -1;
    v *= mul;
    if (!(v < 1.8e19)) return -1;
    *out = (size_t)v;
    return 0;
}

int parse_duration(const char *s, double *out) {
    if (!s || !*s) return -1;
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    if (errno || end == s || !isfinite(v) || v < 0) return -1;
    if (strcmp(end, "") == 0 || strcmp(end, "s") == 0) *out = v;
    else if (strcmp(end, "ms") == 0) *out = v / 1000;
    else if (strcmp(end, "m") == 0 || strcmp(end, "min") == 0) *out = v * 60;
    else if (strcmp(end, "h") == 0) *out = v * 3600;
    else if (strcmp(end, "d") == 0) *out = v * 86400;
    else return -1;
    return 0;
}

char *read_stream(void *file, size_t *len) {
    FILE *f = file;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    if (!buf) return NULL;
    for (;;) {
        if (n + 1 >= cap) {
            char *p = realloc(buf, cap * 2);
            if (!p) { free(buf); return NULL; }
            buf = p;
            cap *= 2;
        }
        size_t r = fread(buf + n, 1, cap - n - 1, f);
        n += r;
        if (r == 0) break;
    }
    if (ferror(f)) { free(buf); return NULL; }
    buf[n] = 0;
    if (len) *len = n;
    return buf;
}

char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *b = read_stream(f, len);
    fclose(f);
    return b;
}

const char *default_model_path(void) {
    const char *p = getenv("PCACHE_MODEL");
    return p && *p ? p : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

int errf(char *err, size_t errlen, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

bool body_append(body_buf *b, const char *piece, size_t n, size_t max) {
    if (b->too_large || b->len + n > max) {
        b->too_large = true;
        b->discarded += n;
        return b->discarded <= 2 * max;
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = realloc(b->body, cap);
        if (!p) return false;
        b->body = p;
        b->cap = cap;
    }
    memcpy(b->body + b->len, piece, n);
    b->len += n;
    b->body[b->len] = 0;
    return true;
}

struct timespec deadline_after(double seconds) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (seconds < 0) seconds = 0;
    const time_t whole = (time_t)seconds;
    const long ns = ts.tv_nsec + (long)((seconds - (double)whole) * 1e9);
    ts.tv_sec += whole + ns / 1000000000L;
    ts.tv_nsec = ns % 1000000000L;
    return ts;
}
