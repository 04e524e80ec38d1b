/* kvevent: see kvevent.h. */
#include "kvevent.h"
#include "kv.h"
#include "kvfile.h"
#include <stdio.h>
#include <string.h>

static const char *const OPS[KVEV_N] = { "hello", "store", "evict", "clear", "bye" };

const char *kvevent_op_name(int op) { return op >= 0 && op < KVEV_N ? OPS[op] : NULL; }

int kvevent_op_parse(const char *s) {
    for (int i = 0; s && i < KVEV_N; i++)
        if (!strcmp(s, OPS[i])) return i;
    return -1;
}

void kvevent_hex64(uint64_t v, char out[17]) {
    static const char d[] = "0123456789abcdef";
    for (int i = 15; i >= 0; i--, v >>= 4) out[i] = d[v & 15];
    out[16] = 0;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int parse16(const char *s, uint64_t *out) {
    uint64_t v = 0;
    for (int i = 0; i < 16; i++) {
        int x = hexval(s[i]);
        if (x < 0) return -1;
        v = v << 4 | (uint64_t)x;
    }
    *out = v;
    return 0;
}

int kvevent_parse_hex64(const char *s, uint64_t *out) {
    if (!s || strlen(s) != 16) return -1;
    return parse16(s, out);
}

int kvevent_format_chains(const uint64_t *chains, int n, char *out, size_t cap) {
    if (n < 0 || (size_t)n * 17 > cap || cap == 0) return -1;
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        if (i) out[at++] = ' ';
        kvevent_hex64(chains[i], out + at);
        at += 16;
    }
    out[at] = 0;
    return (int)at;
}

int kvevent_parse_chains(const char *s, uint64_t *out, int cap) {
    if (!s) return -1;
    int n = 0;
    if (!*s) return 0;
    for (;;) {
        if (n >= cap) return -1;
        for (int i = 0; i < 16; i++)
            if (!s[i]) return -1;
        if (parse16(s, &out[n]) < 0) return -1;
        n++;
        s += 16;
        if (!*s) return n;
        if (*s != ' ' || !s[1]) return -1;
        s++;
    }
}

int kvevent_prompt_chains(uint64_t model_fp, uint32_t n_layer, uint32_t kv_dim, const char *ns, const int32_t *tokens,
                          int n, uint64_t *out, int cap) {
    uint64_t h = kvfile_chain_root(model_fp, n_layer, kv_dim, ns);
    int m = 0;
    for (int b = 0; (b + 1) * KV_BLOCK <= n && m < cap; b++) {
        h = kvfile_chain(h, tokens + b * KV_BLOCK, KV_BLOCK);
        out[m++] = h;
    }
    return m;
}

void kvevent_block_key(uint64_t model_fp, uint64_t chain, char *out, size_t cap) {
    char a[17], b[17];
    kvevent_hex64(model_fp, a);
    kvevent_hex64(chain, b);
    snprintf(out, cap, "%s%s:%s", KVEVENT_BLOCK_PREFIX, a, b);
}
