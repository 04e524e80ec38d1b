/* Cache tier tests (issue 11): the model fingerprint and its sidecar; the host-RAM block store;
 * and the engine with a disk (and host) tier on the real model: a restart serves earlier
 * prefixes with logits bit-identical to a cold run, another model file never reuses a block,
 * corrupt / truncated / foreign records are refused and counted, processes killed with SIGKILL
 * while writing never lead to a wrong answer, the disk bound holds, TTLs survive a restart,
 * namespaces hold in every tier, and a full write queue drops instead of blocking. */
#include <check.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include "engine.h"
#include "fingerprint.h"
#include "kvfile.h"
#include "kvhost.h"
#include "prefix.h"
#include "util.h"
#include "engine_harness.h"

static double fake_now = 1000;
static double fake_clock(void *ctx) { (void)ctx; return fake_now; }

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw) { (void)sb; (void)flag; (void)ftw; return remove(p); }
static void rmtree(const char *p) { nftw(p, rm_cb, 16, FTW_DEPTH | FTW_PHYS); }
static char *tmpdir(void) {
    char *t = strdup("/tmp/pcache-tiers-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(t));
    return t;
}

/* ---- fingerprint ---- */

static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(p, 1, n, f), n);
    fclose(f);
}

START_TEST(fingerprint_content_and_sidecar) {
    char *dir = tmpdir(), path[512];
    snprintf(path, sizeof path, "%s/model.bin", dir);
    enum { N = 100003 };
    uint8_t *buf = malloc(N);
    for (int i = 0; i < N; i++) buf[i] = (uint8_t)(i * 131 + (i >> 7));
    uint64_t h0 = fingerprint_bytes(buf, N);
    /* every byte position matters, and the length */
    for (int pos = 0; pos < N; pos += 9973) {
        buf[pos] ^= 1;
        ck_assert(fingerprint_bytes(buf, N) != h0);
        buf[pos] ^= 1;
    }
    ck_assert(fingerprint_bytes(buf, N - 1) != h0);
    ck_assert(fingerprint_bytes(buf, N) == h0);
    write_bytes(path, buf, N);
    uint64_t fp;
    int hashed;
    char err[256];
    ck_assert_int_eq(fingerprint_file(path, dir, &fp, &hashed, err, sizeof err), 0);
    ck_assert(fp == h0);
    ck_assert_int_eq(hashed, 1);
    ck_assert_int_eq(fingerprint_file(path, dir, &fp, &hashed, err, sizeof err), 0);
    ck_assert(fp == h0);
    ck_assert_int_eq(hashed, 0);   /* from the sidecar */
    /* the same size, other content, and the old mtime put back: still hashed again (ctime) */
    struct stat sb;
    ck_assert_int_eq(stat(path, &sb), 0);
    buf[N / 2] ^= 0x80;
    write_bytes(path, buf, N);
    struct timespec ts[2] = { sb.st_atim, sb.st_mtim };
    ck_assert_int_eq(utimensat(AT_FDCWD, path, ts, 0), 0);
    ck_assert_int_eq(fingerprint_file(path, dir, &fp, &hashed, err, sizeof err), 0);
    ck_assert_int_eq(hashed, 1);
    ck_assert(fp == fingerprint_bytes(buf, N) && fp != h0);
    ck_assert_int_eq(fingerprint_file("/nonexistent/x", dir, &fp, &hashed, err, sizeof err), -1);
    free(buf);
    rmtree(dir);
    free(dir);
}
END_TEST

/* ---- host tier ---- */

#define NL 2
#define KD 8
static void hblock(kvfile_meta *m, uint8_t *kv, const char *ns, int i, double expiry) {
    memset(m, 0, sizeof *m);
    m->model_fp = 7;
    m->n_layer = NL;
    m->kv_dim = KD;
    m->n_tokens = KV_BLOCK;
    snprintf(m->ns, sizeof m->ns, "%s", ns);
    for (int j = 0; j < KV_BLOCK; j++) m->tokens[j] = i * 100 + j;
    m->parent = kvfile_chain_root(7, NL, KD, ns);
    m->chain = kvfile_chain(m->parent, m->tokens, KV_BLOCK);
    m->expiry = expiry;
    for (size_t k = 0; k < kv_block_bytes(NL, KD); k++) kv[k] = (uint8_t)(k + i);
}

START_TEST(host_store) {
    size_t bb = kv_block_bytes(NL, KD);
    kvhost *h;
    char err[256];
    ck_assert_int_eq(kvhost_create(&h, NL, KD, bb - 1, false, err, sizeof err), -1);
    ck_assert_int_eq(kvhost_create(&h, NL, KD, 3 * bb, false, err, sizeof err), 0);
    kvfile_meta m[5];
    uint8_t *kv = malloc(bb), *out = malloc(bb);
    for (int i = 0; i < 4; i++) {
        hblock(&m[i], kv, "a", i, 100 + (i == 1 ? 0 : 1000));
        kvhost_put(h, &m[i], kv, 10 + i);
    }
    /* 3 slots: block 1 expired at 100 (now 13 < 100: still live) - so the oldest (0) went */
    ck_assert(!kvhost_has(h, m[0].chain, 13));
    ck_assert(kvhost_has(h, m[1].chain, 13));
    ck_assert_int_eq(kvhost_get(h, m[3].chain, "a", m[3].tokens, KV_BLOCK, 14, out, NULL), 1);
    hblock(&m[4], kv, "a", 3, 0);
    ck_assert_mem_eq(out, kv, bb);
    /* namespace and tokens are compared */
    ck_assert_int_eq(kvhost_get(h, m[3].chain, "b", m[3].tokens, KV_BLOCK, 14, out, NULL), 0);
    ck_assert_int_eq(kvhost_get(h, m[3].chain, "a", m[2].tokens, KV_BLOCK, 14, out, NULL), 0);
    ck_assert_int_eq(kvhost_get(h, m[3].chain, "a", m[3].tokens, KV_BLOCK - 1, 14, out, NULL), 0);
    /* expired blocks are not served, and go first */
    ck_assert(!kvhost_has(h, m[1].chain, 200));
    ck_assert_int_eq(kvhost_get(h, m[1].chain, "a", m[1].tokens, KV_BLOCK, 200, out, NULL), 0);
    hblock(&m[4], kv, "a", 9, 5000);
    kvhost_put(h, &m[4], kv, 201);
    ck_assert(kvhost_has(h, m[2].chain, 201) && kvhost_has(h, m[3].chain, 201) && kvhost_has(h, m[4].chain, 201));
    kvhost_stats st;
    kvhost_get_stats(h, &st);
    ck_assert_uint_eq(st.blocks, 3);
    ck_assert_uint_eq(st.bytes, 3 * bb);
    kvhost_free(h);
    free(kv);
    free(out);
}
END_TEST

/* A host tier of 9 blocks, two 6-block documents: the first one's prefix stays (chains are
 * eaten from their ends), also when its later blocks are newer. */
static void chain_block(kvfile_meta *m, uint8_t *kv, const char *ns, int i) {
    memset(m, 0, sizeof *m);
    m->model_fp = 7;
    m->n_layer = NL;
    m->kv_dim = KD;
    m->n_tokens = KV_BLOCK;
    m->ttl = 300;
    m->expiry = 1e9;
    snprintf(m->ns, sizeof m->ns, "%s", ns);
    uint64_t h = kvfile_chain_root(7, NL, KD, ns);
    for (int b = 0; b <= i; b++) {
        for (int j = 0; j < KV_BLOCK; j++) m->tokens[j] = b * 100 + j;
        m->parent = h;
        h = kvfile_chain(h, m->tokens, KV_BLOCK);
    }
    m->chain = h;
    memset(kv, i, kv_block_bytes(NL, KD));
}

START_TEST(host_store_keeps_chain_prefixes) {
    size_t bb = kv_block_bytes(NL, KD);
    uint8_t *kv = malloc(bb);
    kvfile_meta m;
    char err[256];
    for (int turns = 0; turns < 2; turns++) {
        kvhost *h;
        ck_assert_int_eq(kvhost_create(&h, NL, KD, 9 * bb, false, err, sizeof err), 0);
        for (int i = 0; i < 6; i++) {
            chain_block(&m, kv, "A", i);
            kvhost_put(h, &m, kv, turns && i >= 3 ? 12 : 10);
        }
        for (int i = 0; i < 6; i++) {
            chain_block(&m, kv, "B", i);
            kvhost_put(h, &m, kv, 13);
        }
        int a = 0, b = 0;
        for (; a < 6; a++) { chain_block(&m, kv, "A", a); if (!kvhost_has(h, m.chain, 14)) break; }
        for (; b < 6; b++) { chain_block(&m, kv, "B", b); if (!kvhost_has(h, m.chain, 14)) break; }
        ck_assert_int_eq(a, 3);
        ck_assert_int_eq(b, 6);
        kvhost_free(h);
    }
    free(kv);
}
END_TEST

/* ---- the engine with tiers ---- */

static const char *PROMPT =
    "<|im_start|>system\nYou are a helpful assistant who answers briefly and precisely, with facts "
    "that a curious student of astronomy would enjoy.<|im_end|>\n"
    "<|im_start|>user\nList three facts about the planet Mars, its two small moons Phobos and Deimos, "
    "and the reason for its red color.<|im_end|>\n<|im_start|>assistant\n";
#define NV 49152

typedef struct { const char *model, *dir; size_t kv_mem, disk, host; int queue; bool cache; } eopts;

static engine *mk(eopts o) {
    engine_opts eo = { .model_path = o.model ? o.model : default_model_path(), .kv_mem_bytes = o.kv_mem ? o.kv_mem : 64u << 20,
                       .cache_enabled = true, .n_threads = 2, .clock = fake_clock, .cache_dir = o.dir,
                       .cache_disk_bytes = o.disk, .cache_host_bytes = o.host, .cache_write_queue = o.queue };
    if (o.cache) eo.cache_enabled = false;   /* o.cache: "cold" (no cache at all) */
    engine *e;
    char err[512];
    if (engine_create(&e, &eo, err, sizeof err)) { fprintf(stderr, "%s\n", err); return NULL; }
    return e;
}

/* run_req with one breakpoint at bp (none when bp <= 0) */
static void run_bp(engine *e, const int32_t *ids, int n, const char *ns, int max_tokens, float *logits, int bp, double bp_ttl,
                   result *r) {
    run_req(e, ids, n, ns, max_tokens, logits, &bp, bp > 0, bp_ttl, r);
}

/* The cold reference: logits of the last prompt position and the greedy text. */
static float *cold_ref(const int32_t *ids, int n, result *r) {
    float *lg = malloc(sizeof(float) * NV);
    engine *e = mk((eopts){ .cache = true });
    ck_assert_ptr_nonnull(e);
    run_bp(e, ids, n, NULL, 16, lg, 0, 0, r);
    engine_free(e);
    return lg;
}

static char *store_file(engine *e, uint64_t chain) {
    char *f = malloc(4200);
    snprintf(f, 4200, "%s/%016llx.kvb", engine_cache_path(e), (unsigned long long)chain);
    return f;
}

/* The chain hash of block j (full blocks) of ids in namespace ns. */
static uint64_t chain_of(engine *e, const char *ns, const int32_t *ids, int j) {
    uint64_t h = kvfile_chain_root(engine_model_fp(e), 30, 192, ns);
    for (int b = 0; b <= j; b++) h = kvfile_chain(h, ids + b * KV_BLOCK, KV_BLOCK);
    return h;
}

START_TEST(restart_serves_prefixes) {
    char *dir = tmpdir();
    engine *e = mk((eopts){ .dir = dir });
    ck_assert_ptr_nonnull(e);
    int32_t *ids;
    int n = encode(e, PROMPT, &ids);
    ck_assert_int_gt(n, 48);
    result r0, r;
    float *ref = cold_ref(ids, n, &r0), *got = malloc(sizeof(float) * NV);
    run_bp(e, ids, n, NULL, 16, got, 0, 0, &r);
    ck_assert_int_eq(r.u.cached_tokens, 0);
    engine_cache_sync(e);
    engine_stats st;
    engine_get_stats(e, &st);
    ck_assert(st.tier_on[2]);
    ck_assert_uint_ge(st.tier[2].demotions, (uint64_t)(n / KV_BLOCK));
    ck_assert_uint_eq(st.tier[2].blocks, st.tier[2].demotions);
    engine_free(e);

    /* restart: the same directory serves every full block of the prompt */
    for (int chunked = 0; chunked < 2; chunked++) {
        e = mk((eopts){ .dir = dir });
        run_bp(e, ids, n, NULL, 16, got, 0, 0, &r);
        ck_assert_int_eq(r.u.cached_tokens, (n - 1) / KV_BLOCK * KV_BLOCK);
        ck_assert_msg(memcmp(ref, got, sizeof(float) * NV) == 0, "logits differ after a restart");
        ck_assert_str_eq(r.text, r0.text);
        engine_get_stats(e, &st);
        ck_assert_uint_eq(st.tier[2].promotions, (uint64_t)((n - 1) / KV_BLOCK));
        ck_assert_uint_eq(st.tier[2].tokens_served, (uint64_t)r.u.cached_tokens);
        ck_assert_uint_eq(st.tier[2].hits, 1);
        /* promoted into the pool: the next request is a pool hit */
        run_bp(e, ids, n, NULL, 16, got, 0, 0, &r);
        ck_assert_int_eq(r.u.cached_tokens, n - 1);
        ck_assert(memcmp(ref, got, sizeof(float) * NV) == 0);
        engine_free(e);
    }
    /* a prompt sharing only a prefix: loads the shared full blocks, computes the rest */
    e = mk((eopts){ .dir = dir });
    int32_t *alt = malloc(sizeof(int32_t) * n);
    memcpy(alt, ids, sizeof(int32_t) * n);
    alt[40] = alt[40] == 100 ? 101 : 100;
    result ra;
    float *ref_alt = cold_ref(alt, n, &ra);
    run_bp(e, alt, n, NULL, 16, got, 0, 0, &r);
    ck_assert_int_eq(r.u.cached_tokens, 32);
    ck_assert(memcmp(ref_alt, got, sizeof(float) * NV) == 0);
    ck_assert_str_eq(r.text, ra.text);
    engine_free(e);
    free(alt);
    free(ref_alt);
    free(ids);
    free(ref);
    free(got);
    rmtree(dir);
    free(dir);
}
END_TEST

static void copy_file(const char *from, const char *to, long flip_at) {
    size_t len;
    char *b = read_file(from, &len);
    ck_assert_ptr_nonnull(b);
    if (flip_at >= 0) b[len - 1 - (size_t)flip_at] ^= 0x11;
    write_bytes(to, b, len);
    free(b);
}

START_TEST(other_model_never_reuses) {
    char *dir = tmpdir(), same[600], flipped[600];
    snprintf(same, sizeof same, "%s/same.gguf", dir);
    snprintf(flipped, sizeof flipped, "%s/flipped.gguf", dir);
    copy_file(default_model_path(), same, -1);
    copy_file(default_model_path(), flipped, 0);   /* the last byte: the last tensor's data */
    char cache[600];
    snprintf(cache, sizeof cache, "%s/cache", dir);
    engine *e = mk((eopts){ .dir = cache });
    int32_t *ids;
    int n = encode(e, PROMPT, &ids);
    result r;
    run_bp(e, ids, n, NULL, 4, NULL, 0, 0, &r);
    uint64_t fp = engine_model_fp(e);
    engine_free(e);
    /* a copy of the same bytes is the same model */
    e = mk((eopts){ .model = same, .dir = cache });
    ck_assert(engine_model_fp(e) == fp);
    run_bp(e, ids, n, NULL, 4, NULL, 0, 0, &r);
    ck_assert_int_gt(r.u.cached_tokens, 0);
    engine_free(e);
    /* one flipped weight byte: another fingerprint, another store, nothing reused */
    e = mk((eopts){ .model = flipped, .dir = cache });
    ck_assert(engine_model_fp(e) != fp);
    run_bp(e, ids, n, NULL, 4, NULL, 0, 0, &r);
    ck_assert_int_eq(r.u.cached_tokens, 0);
    engine_stats st;
    engine_get_stats(e, &st);
    ck_assert_uint_eq(st.tier[2].promotions, 0);
    engine_free(e);
    free(ids);
    rmtree(dir);
    free(dir);
}
END_TEST

static void corrupt(const char *f, int how) {
    int fd = open(f, O_RDWR);
    ck_assert_int_ge(fd, 0);
    struct stat sb;
    fstat(fd, &sb);
    if (how == 0) {   /* flip a payload byte */
        uint8_t c;
        ck_assert_int_eq(pread(fd, &c, 1, sb.st_size / 2), 1);
        c ^= 0x40;
        ck_assert_int_eq(pwrite(fd, &c, 1, sb.st_size / 2), 1);
    } else ck_assert_int_eq(ftruncate(fd, sb.st_size - 100), 0);
    close(fd);
}

START_TEST(corrupt_blocks_are_refused) {
    char *dir = tmpdir();
    engine *e = mk((eopts){ .dir = dir });
    int32_t *ids;
    int n = encode(e, PROMPT, &ids);
    result r0, r;
    float *ref = cold_ref(ids, n, &r0), *got = malloc(sizeof(float) * NV);
    run_bp(e, ids, n, NULL, 16, NULL, 0, 0, &r);
    engine_cache_sync(e);
    char *f0 = store_file(e, chain_of(e, "", ids, 0)), *f1 = store_file(e, chain_of(e, "", ids, 1));
    char *f2 = store_file(e, chain_of(e, "", ids, 2)), *f3 = store_file(e, 0xdeadbeefull);
    engine_free(e);
    /* at start: a truncated record (block 2) and a foreign one (block 0's record under another
     * name) are deleted and counted */
    corrupt(f2, 1);
    copy_file(f0, f3, -1);
    e = mk((eopts){ .dir = dir });
    engine_stats st;
    engine_get_stats(e, &st);
    ck_assert_uint_eq(st.tier[2].bad_files, 2);
    /* after start: block 1 corrupted under the running engine; found bad on read */
    corrupt(f1, 0);
    run_bp(e, ids, n, NULL, 16, got, 0, 0, &r);
    ck_assert_int_eq(r.u.cached_tokens, 16);   /* block 0 only */
    ck_assert(memcmp(ref, got, sizeof(float) * NV) == 0);
    ck_assert_str_eq(r.text, r0.text);
    engine_get_stats(e, &st);
    ck_assert_uint_eq(st.tier[2].bad_files, 3);
    engine_free(e);
    free(f0); free(f1); free(f2); free(f3);
    free(ids);
    free(ref);
    free(got);
    rmtree(dir);
    free(dir);
}
END_TEST

/* Children write the cache and are killed at random moments; the survivors' blocks only ever
 * give the cold answer. */
START_TEST(killed_writers_never_corrupt) {
    char *dir = tmpdir();
    const char *prompts[3] = { PROMPT, "The history of the Roman empire, told in three short paragraphs for children:",
                               "def quicksort(xs):\n    \"\"\"Sort a list of integers.\"\"\"\n" };
    int32_t *ids[3];
    int n[3];
    result r0[3];
    float *ref[3];
    {
        engine *e = mk((eopts){ .cache = true });
        for (int i = 0; i < 3; i++) n[i] = encode(e, prompts[i], &ids[i]);
        engine_free(e);
    }
    for (int i = 0; i < 3; i++) ref[i] = cold_ref(ids[i], n[i], &r0[i]);
    srand(12345);
    for (int round = 0; round < 6; round++) {
        pid_t pid = fork();
        ck_assert_int_ge(pid, 0);
        if (pid == 0) {
            engine *e = mk((eopts){ .dir = dir });
            for (int k = 0;; k++) {
                result r;
                run_bp(e, ids[k % 3], n[k % 3] - (k / 3) % 7, k % 2 ? "t1" : NULL, 8, NULL, 0, 0, &r);
            }
        }
        usleep(200000 + (useconds_t)(rand() % 1500) * 1000);
        kill(pid, SIGKILL);
        int status;
        waitpid(pid, &status, 0);
    }
    engine *e = mk((eopts){ .dir = dir });
    float *got = malloc(sizeof(float) * NV);
    for (int i = 0; i < 3; i++) {
        result r;
        run_bp(e, ids[i], n[i], NULL, 16, got, 0, 0, &r);
        ck_assert_msg(memcmp(ref[i], got, sizeof(float) * NV) == 0, "prompt %d: logits differ after killed writers", i);
        ck_assert_str_eq(r.text, r0[i].text);
        free(ids[i]);
        free(ref[i]);
    }
    engine_free(e);
    free(got);
    rmtree(dir);
    free(dir);
}
END_TEST

static uint64_t dir_bytes_total;
static int du_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)p; (void)ftw;
    size_t l = strlen(p);
    if (flag == FTW_F && l > 4 && !strcmp(p + l - 4, ".kvb")) dir_bytes_total += (uint64_t)sb->st_size;
    return 0;
}

START_TEST(disk_bound_ttl_and_namespaces) {
    char *dir = tmpdir();
    fake_now = 1000;
    size_t rec = kvfile_size(30, 192, 8);
    size_t bound = 3 * rec;
    engine *e = mk((eopts){ .dir = dir, .disk = bound });
    int32_t *ids;
    int n = encode(e, PROMPT, &ids);
    result r;
    /* tenant-a: a 1h breakpoint at 32 (two blocks), the rest automatic (5 min) */
    run_bp(e, ids, n, "tenant-a", 1, NULL, 32, 3600, &r);
    engine_cache_sync(e);
    engine_stats st;
    engine_get_stats(e, &st);
    ck_assert_uint_le(st.tier[2].bytes, bound);
    ck_assert_uint_gt(st.tier[2].evicted, 0);
    dir_bytes_total = 0;
    nftw(dir, du_cb, 16, FTW_PHYS);
    ck_assert_uint_le(dir_bytes_total, bound);
    engine_free(e);
    /* the bound keeps the least recently used: so a store large enough for the test below */
    rmtree(dir);
    mkdir(dir, 0755);
    e = mk((eopts){ .dir = dir });
    run_bp(e, ids, n, "tenant-a", 1, NULL, 32, 3600, &r);
    engine_free(e);
    /* restart 10 minutes later: the automatic blocks expired, the 1h ones are served */
    e = mk((eopts){ .dir = dir });
    fake_now += 600;
    run_bp(e, ids, n, "tenant-b", 1, NULL, 0, 0, &r);
    ck_assert_int_eq(r.u.cached_tokens, 0);   /* another tenant never finds a's blocks */
    run_bp(e, ids, n, "tenant-a", 1, NULL, 0, 0, &r);
    ck_assert_int_eq(r.u.cached_tokens, 32);
    engine_free(e);
    /* and an hour after its last use (the lookup above, which extended it), nothing (a new
     * engine: nothing in its pool) */
    e = mk((eopts){ .dir = dir });
    fake_now += 3700 + 600;
    run_bp(e, ids, n, "tenant-a", 1, NULL, 0, 0, &r);
    ck_assert_int_eq(r.u.cached_tokens, 0);
    engine_free(e);
    free(ids);
    rmtree(dir);
    free(dir);
}
END_TEST

/* A disk bound of 1.5 prompts: after two prompts the first one's prefix is still served after
 * a restart (a block-aligned part of it), not lost with its first block, also when the first
 * prompt came in two turns (its later blocks newer). */
START_TEST(disk_eviction_keeps_prefix) {
    char *dir = tmpdir();
    fake_now = 1000;
    engine *e = mk((eopts){ .dir = dir, .disk = 12 * kvfile_size(30, 192, 0) });
    int32_t *p, *q, a[120], b[120];
    int np = encode(e, PROMPT, &p);
    int nq = encode(e, "<|im_start|>user\nWrite a short poem about the sea at night, the lighthouse on the cliff, the "
                       "fishing boats coming home and the gulls asleep on the harbor wall.<|im_end|>\n", &q);
    const int na = 120, nb = 120;   /* 7 full blocks and 8 tokens each */
    for (int i = 0; i < 120; i++) { a[i] = p[i % np]; b[i] = q[i % nq]; }
    free(p);
    free(q);
    result r0, r;
    float *ref = cold_ref(a, na, &r0), *got = malloc(sizeof(float) * NV);
    run_bp(e, a, 64, NULL, 1, NULL, 0, 0, &r);     /* a first turn: blocks 0-3 */
    engine_cache_sync(e);
    fake_now += 1;
    run_bp(e, a, na, NULL, 1, NULL, 0, 0, &r);     /* a second: blocks 4-6 and a partial 7, newer */
    engine_cache_sync(e);
    fake_now += 1;
    run_bp(e, b, nb, NULL, 1, NULL, 0, 0, &r);
    engine_cache_sync(e);
    engine_stats st;
    engine_get_stats(e, &st);
    ck_assert_uint_gt(st.tier[2].evicted, 0);
    engine_free(e);
    e = mk((eopts){ .dir = dir, .disk = 12 * kvfile_size(30, 192, 0) });
    run_bp(e, a, na, NULL, 16, got, 0, 0, &r);
    ck_assert_int_eq(r.u.cached_tokens, 64);        /* 12 records: b's 8 and a's first 4 */
    ck_assert(memcmp(ref, got, sizeof(float) * NV) == 0);
    ck_assert_str_eq(r.text, r0.text);
    engine_free(e);
    free(ref); free(got);
    rmtree(dir);
    free(dir);
}
END_TEST

/* Promoted blocks keep their records' kind and remaining TTL: a 1-hour breakpoint loaded after
 * a restart stays in the pool past the automatic TTL (no second load). And a prefix cached
 * again extends its disk records' expiry: a 5-minute prompt used at minute 4 is still on disk
 * at minute 7, after a restart. */
START_TEST(promotion_and_recache_keep_ttls) {
    char *dir = tmpdir();
    fake_now = 1000;
    engine *e = mk((eopts){ .dir = dir });
    int32_t *ids;
    int n = encode(e, PROMPT, &ids);
    result r;
    run_bp(e, ids, n, "a", 1, NULL, 32, 3600, &r);   /* a 1h breakpoint at 32, the rest 5 min */
    engine_free(e);
    e = mk((eopts){ .dir = dir });
    fake_now += 600;                                 /* the automatic records expired */
    run_bp(e, ids, n, "a", 1, NULL, 0, 0, &r);
    ck_assert_int_eq(r.u.cached_tokens, 32);
    engine_stats st;
    engine_get_stats(e, &st);
    ck_assert_uint_eq(st.tier_loads, 1);
    fake_now += 360;                                 /* this request's own 5-minute entry expired */
    run_bp(e, ids, n, "a", 1, NULL, 0, 0, &r);
    ck_assert_int_eq(r.u.cached_tokens, 32);
    engine_get_stats(e, &st);
    ck_assert_uint_eq(st.tier_loads, 1);             /* from the pool: the promoted 1h entry */
    engine_free(e);
    rmtree(dir);
    mkdir(dir, 0755);

    fake_now = 1000;
    e = mk((eopts){ .dir = dir });
    run_bp(e, ids, n, NULL, 1, NULL, 0, 0, &r);
    fake_now += 240;
    run_bp(e, ids, n, NULL, 1, NULL, 0, 0, &r);
    ck_assert_int_eq(r.u.cached_tokens, n - 1);      /* a pool hit, cached again */
    engine_free(e);
    e = mk((eopts){ .dir = dir });
    fake_now += 420;                                 /* 7 minutes after the first write */
    run_bp(e, ids, n, NULL, 1, NULL, 0, 0, &r);
    ck_assert_int_eq(r.u.cached_tokens, (n - 1) / KV_BLOCK * KV_BLOCK);
    engine_free(e);
    free(ids);
    rmtree(dir);
    free(dir);
}
END_TEST

/* A partial last block loaded from a tier is shared with the index once promoted, so the
 * prefill copies it: admission reserves that block. With a pool of exactly the request's
 * blocks it cannot, and loads only the full blocks (before, the copy evicted the promoted
 * entry); with one more block it loads the partial block too. Logits as cold either way. */
START_TEST(partial_block_copy_reserved) {
    char *dir = tmpdir();
    fake_now = 1000;
    engine *e = mk((eopts){ .cache = true });
    int32_t *p, ids[150];
    int np = encode(e, PROMPT, &p);
    engine_free(e);
    for (int i = 0; i < 150; i++) ids[i] = p[i % np];
    result r0, r;
    float *ref = cold_ref(ids, 150, &r0), *got = malloc(sizeof(float) * NV);
    for (int extra = 0; extra < 2; extra++) {
        rmtree(dir);
        mkdir(dir, 0755);
        e = mk((eopts){ .dir = dir });
        run_bp(e, ids, 100, NULL, 1, NULL, 0, 0, &r);   /* blocks 0-5 and a 4-token block 6 on disk */
        engine_free(e);
        e = mk((eopts){ .dir = dir, .kv_mem = (size_t)(10 + extra) * 368640u });
        run_bp(e, ids, 150, NULL, 1, got, 0, 0, &r);   /* 151 tokens: the 10 blocks */
        ck_assert_int_eq(r.u.cached_tokens, extra ? 100 : 96);
        engine_stats st;
        engine_get_stats(e, &st);
        ck_assert_uint_eq(st.evictions, 0);
        ck_assert(memcmp(ref, got, sizeof(float) * NV) == 0);
        engine_free(e);
    }
    free(p); free(ref); free(got);
    rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(host_tier_and_namespaces) {
    fake_now = 1000;
    /* a pool of 10 blocks and a host tier of 64: the pool forgets, the host tier serves */
    engine *e = mk((eopts){ .kv_mem = 10 * 368640u, .host = 64 * 368640u });
    ck_assert_ptr_nonnull(e);
    int32_t *ids;
    int n = encode(e, PROMPT, &ids);
    ck_assert_int_le(n, 9 * KV_BLOCK);
    result r0, r;
    float *ref = cold_ref(ids, n, &r0), *got = malloc(sizeof(float) * NV);
    run_bp(e, ids, n, "tenant-a", 16, NULL, 0, 0, &r);
    engine_cache_sync(e);
    /* other traffic pushes tenant-a's blocks out of the pool */
    char text[300];
    for (int i = 0; i < 4; i++) {
        snprintf(text, sizeof text, "Request %d: a different long question about the number %d, its square, its cube, "
                 "its digits, and whether it is prime or not, with reasons and examples.", i, i * 7 + 3);
        int32_t *o;
        int no = encode(e, text, &o);
        run_bp(e, o, no, "other", 4, NULL, 0, 0, &r);
        free(o);
    }
    engine_cache_sync(e);
    run_bp(e, ids, n, "tenant-b", 16, got, 0, 0, &r);
    ck_assert_int_eq(r.u.cached_tokens, 0);
    ck_assert(memcmp(ref, got, sizeof(float) * NV) == 0);
    engine_stats st;
    engine_get_stats(e, &st);
    ck_assert(st.tier_on[1] && !st.tier_on[2]);
    ck_assert_uint_eq(st.tier[1].promotions, 0);
    /* the pool lost it again (tenant-b's request), then tenant-a is served from host RAM */
    for (int i = 0; i < 4; i++) {
        snprintf(text, sizeof text, "Request %d: another different long question about the number %d, its square, "
                 "its cube, its digits, and whether it is prime or not, with reasons.", i, i * 11 + 5);
        int32_t *o;
        int no = encode(e, text, &o);
        run_bp(e, o, no, "other", 4, NULL, 0, 0, &r);
        free(o);
    }
    run_bp(e, ids, n, "tenant-a", 16, got, 0, 0, &r);
    ck_assert_int_ge(r.u.cached_tokens, (n - 1) / KV_BLOCK * KV_BLOCK);
    ck_assert(memcmp(ref, got, sizeof(float) * NV) == 0);
    ck_assert_str_eq(r.text, r0.text);
    engine_get_stats(e, &st);
    ck_assert_uint_gt(st.tier[1].promotions, 0);
    engine_free(e);
    free(ids);
    free(ref);
    free(got);
}
END_TEST

START_TEST(full_queue_drops) {
    char *dir = tmpdir();
    engine *e = mk((eopts){ .dir = dir, .queue = 2 });
    int32_t *ids;
    int n = encode(e, PROMPT, &ids);
    result r;
    engine_cache_pause(e, true);
    run_bp(e, ids, n, NULL, 4, NULL, 0, 0, &r);   /* completes with the I/O thread stopped */
    engine_stats st;
    engine_get_stats(e, &st);
    ck_assert_int_eq(st.tier_queue_depth, 2);
    ck_assert_uint_ge(st.tier_writes_dropped, (uint64_t)(n / KV_BLOCK - 1));
    ck_assert_uint_eq(st.tier[2].demotions, 0);
    engine_cache_pause(e, false);
    engine_cache_sync(e);
    engine_get_stats(e, &st);
    ck_assert_uint_eq(st.tier[2].demotions, 2);
    ck_assert_int_eq(st.tier_queue_depth, 0);
    engine_free(e);
    free(ids);
    rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(bad_cache_dir) {
    char *dir = tmpdir(), f[600];
    snprintf(f, sizeof f, "%s/file", dir);
    write_bytes(f, "x", 1);
    engine_opts eo = { .model_path = default_model_path(), .kv_mem_bytes = 16u << 20, .cache_enabled = true, .n_threads = 1,
                       .cache_dir = f };
    engine *e;
    char err[512];
    ck_assert_int_eq(engine_create(&e, &eo, err, sizeof err), -1);
    ck_assert_msg(strstr(err, "not a directory"), "%s", err);
    rmtree(dir);
    free(dir);
}
END_TEST

int main(void) {
    Suite *s = suite_create("tiers");
    TCase *tc = tcase_create("tiers");
    tcase_set_timeout(tc, 1200);
    tcase_add_test(tc, fingerprint_content_and_sidecar);
    tcase_add_test(tc, host_store);
    tcase_add_test(tc, host_store_keeps_chain_prefixes);
    tcase_add_test(tc, bad_cache_dir);
    tcase_add_test(tc, full_queue_drops);
    tcase_add_test(tc, restart_serves_prefixes);
    tcase_add_test(tc, other_model_never_reuses);
    tcase_add_test(tc, corrupt_blocks_are_refused);
    tcase_add_test(tc, disk_bound_ttl_and_namespaces);
    tcase_add_test(tc, host_tier_and_namespaces);
    tcase_add_test(tc, disk_eviction_keeps_prefix);
    tcase_add_test(tc, promotion_and_recache_keep_ttls);
    tcase_add_test(tc, partial_block_copy_reserved);
    tcase_add_test(tc, killed_writers_never_corrupt);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
