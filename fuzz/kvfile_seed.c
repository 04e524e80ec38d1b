/* kvfile_seed DIR: writes a few valid KV block records (small layouts, several namespaces and
 * token counts) into DIR as the fuzzer's seed corpus. */
#include "kvfile.h"
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: kvfile_seed DIR\n"); return 2; }
    const char *nss[] = { "", "t", "tenant-42" };
    for (int s = 0; s < 6; s++) {
        kvfile_meta m;
        memset(&m, 0, sizeof m);
        m.model_fp = 0xabcdef0123456789ull + (uint64_t)s;
        m.n_layer = 1 + s % 2;
        m.kv_dim = 2 + 2 * (s % 3);
        m.n_tokens = 1 + (s * 5) % KV_BLOCK;
        m.kind = s % 2;
        snprintf(m.ns, sizeof m.ns, "%s", nss[s % 3]);
        m.parent = kvfile_chain_root(m.model_fp, m.n_layer, m.kv_dim, m.ns);
        for (int i = 0; i < m.n_tokens; i++) m.tokens[i] = 100 * s + i;
        m.chain = kvfile_chain(m.parent, m.tokens, m.n_tokens);
        m.expiry = 1.8e9 + s;
        m.ttl = 300;
        unsigned char kv[2 * 2 * KV_BLOCK * 6 * 2], buf[4096];
        for (size_t i = 0; i < sizeof kv; i++) kv[i] = (unsigned char)(i * 13 + s);
        char err[200], path[4096];
        size_t n = kvfile_encode(&m, kv, buf, sizeof buf, err, sizeof err);
        if (!n) { fprintf(stderr, "%s\n", err); return 1; }
        snprintf(path, sizeof path, "%s/seed-%d", argv[1], s);
        FILE *f = fopen(path, "wb");
        if (!f || fwrite(buf, 1, n, f) != n || fclose(f)) { perror(path); return 1; }
    }
    return 0;
}
