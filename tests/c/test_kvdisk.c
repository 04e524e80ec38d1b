/* kvdisk tests: blocks stored and read back, found again after a restart, never across models or
 * namespaces; expired, corrupt, truncated and foreign records deleted and counted; half-written
 * temporary files removed; the byte bound kept (expired first, then least recently used); and
 * processes killed (SIGKILL) at random moments while writing leave only whole, verifiable
 * records behind. */
#include <check.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include "kvdisk.h"
#include "prefix.h"

#define NL 2
#define KD 8
#define FP 0x0123456789abcdefull
#define BB kv_block_bytes(NL, KD)

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw) { (void)sb; (void)flag; (void)ftw; return remove(p); }
static void rmtree(const char *p) { nftw(p, rm_cb, 16, FTW_DEPTH | FTW_PHYS); }
static char *tmpdir(void) {
    char *t = strdup("/tmp/pcache-kvdisk-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(t));
    return t;
}

/* Block i of a prefix in namespace ns: tokens and values derived from (ns, i). */
static void block(kvfile_meta *m, uint8_t *kv, const char *ns, int i, double expiry) {
    memset(m, 0, sizeof *m);
    m->model_fp = FP;
    m->n_layer = NL;
    m->kv_dim = KD;
    m->n_tokens = KV_BLOCK;
    m->kind = PREFIX_AUTO;
    snprintf(m->ns, sizeof m->ns, "%s", ns);
    uint64_t parent = kvfile_chain_root(FP, NL, KD, ns);
    int32_t t[KV_BLOCK];
    for (int b = 0; b <= i; b++) {
        for (int j = 0; j < KV_BLOCK; j++) t[j] = 5 + 31 * b + j + (int)strlen(ns);
        m->parent = parent;
        parent = kvfile_chain(parent, t, KV_BLOCK);
    }
    memcpy(m->tokens, t, sizeof t);
    m->chain = parent;
    m->expiry = expiry;
    m->ttl = 300;
    for (size_t k = 0; k < BB; k++) kv[k] = (uint8_t)(k * 7 + i * 13 + strlen(ns));
}

static kvdisk *open_at(const char *dir, uint64_t fp, uint64_t max, double now) {
    kvdisk *d;
    char err[300];
    ck_assert_msg(kvdisk_open(&d, dir, fp, NL, KD, max, now, err, sizeof err) == 0, "%s", err);
    return d;
}
static void put(kvdisk *d, const kvfile_meta *m, const uint8_t *kv, double now) {
    char err[300];
    ck_assert_msg(kvdisk_put(d, m, kv, now, err, sizeof err) == 0, "%s", err);
}
static int get(kvdisk *d, const kvfile_meta *m, double now, uint8_t *out) {
    kvfile_meta r;
    char err[300];
    int rc = kvdisk_get(d, m->chain, m->ns, m->tokens, m->n_tokens, now, &r, out, err, sizeof err);
    ck_assert_msg(rc >= 0, "%s", err);
    return rc;
}
static kvdisk_stats stats(kvdisk *d) { kvdisk_stats s; kvdisk_get_stats(d, &s); return s; }
static void file_path(kvdisk *d, uint64_t chain, char *out, size_t n) {
    snprintf(out, n, "%s/%016llx.kvb", kvdisk_path(d), (unsigned long long)chain);
}

START_TEST(put_get_restart) {
    char *dir = tmpdir();
    kvfile_meta m[4];
    uint8_t kv[4][BB], out[BB];
    kvdisk *d = open_at(dir, FP, 1 << 20, 1000);
    for (int i = 0; i < 4; i++) { block(&m[i], kv[i], "ten", i, 2000); put(d, &m[i], kv[i], 1000); }
    ck_assert_uint_eq(stats(d).blocks, 4);
    ck_assert(kvdisk_has(d, m[2].chain, 1000));
    ck_assert_int_eq(get(d, &m[2], 1001, out), 1);
    ck_assert_mem_eq(out, kv[2], BB);
    kvfile_meta other;
    uint8_t okv[BB];
    block(&other, okv, "other", 2, 2000);   /* another namespace: another chain, not held */
    ck_assert_int_eq(get(d, &other, 1001, out), 0);
    kvfile_meta wrong = m[1];              /* the right chain asked for by another tenant */
    snprintf(wrong.ns, sizeof wrong.ns, "intruder");
    ck_assert_int_eq(get(d, &wrong, 1001, out), 0);
    kvdisk_close(d);

    d = open_at(dir, FP, 1 << 20, 1500);   /* restart */
    ck_assert_uint_eq(stats(d).blocks, 4);
    for (int i = 0; i < 4; i++) {
        ck_assert_int_eq(get(d, &m[i], 1500, out), 1);
        ck_assert_mem_eq(out, kv[i], BB);
    }
    kvdisk_close(d);
    d = open_at(dir, FP + 1, 1 << 20, 1500);   /* another model never sees them */
    ck_assert_uint_eq(stats(d).blocks, 0);
    ck_assert_int_eq(get(d, &m[0], 1500, out), 0);
    kvdisk_close(d);
    rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(expiry_survives_restart) {
    char *dir = tmpdir();
    kvfile_meta a, b;
    uint8_t ka[BB], kb[BB], out[BB];
    block(&a, ka, "", 0, 1300);   /* 5-minute entry */
    block(&b, kb, "", 1, 4600);   /* 1-hour entry */
    kvdisk *d = open_at(dir, FP, 1 << 20, 1000);
    put(d, &a, ka, 1000);
    put(d, &b, kb, 1000);
    kvdisk_close(d);
    d = open_at(dir, FP, 1 << 20, 2000);   /* a's time has passed: deleted at start */
    ck_assert_uint_eq(stats(d).blocks, 1);
    ck_assert_uint_eq(stats(d).expired, 1);
    ck_assert_int_eq(get(d, &a, 2000, out), 0);
    ck_assert_int_eq(get(d, &b, 2000, out), 1);
    ck_assert_int_eq(get(d, &b, 4700, out), 0);   /* and b's, later */
    ck_assert_uint_eq(stats(d).blocks, 0);
    kvdisk_close(d);
    rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(bad_files_deleted_and_counted) {
    char *dir = tmpdir();
    kvfile_meta m[3];
    uint8_t kv[3][BB], out[BB];
    kvdisk *d = open_at(dir, FP, 1 << 20, 1000);
    for (int i = 0; i < 3; i++) { block(&m[i], kv[i], "x", i, 5000); put(d, &m[i], kv[i], 1000); }
    char f[4096];
    file_path(d, m[0].chain, f, sizeof f);        /* flip a byte of block 0 */
    int fd = open(f, O_RDWR);
    uint8_t c;
    ck_assert_int_eq(pread(fd, &c, 1, 300), 1);
    c ^= 0x10;
    ck_assert_int_eq(pwrite(fd, &c, 1, 300), 1);
    close(fd);
    file_path(d, m[1].chain, f, sizeof f);        /* truncate block 1 */
    ck_assert_int_eq(truncate(f, 100), 0);
    ck_assert_int_eq(get(d, &m[0], 1001, out), 0);   /* refused while running */
    ck_assert_uint_eq(stats(d).bad_files, 1);
    ck_assert_uint_eq(stats(d).blocks, 2);
    char sub[4096], tmp[4200], foreign[4200];
    snprintf(sub, sizeof sub, "%s", kvdisk_path(d));
    kvdisk_close(d);
    snprintf(tmp, sizeof tmp, "%s/.%016llx.99.tmp", sub, 7ull);
    snprintf(foreign, sizeof foreign, "%s/%016llx.kvb", sub, 0x42ull);
    FILE *t = fopen(tmp, "w");
    fputs("half a record", t);
    fclose(t);
    /* a record of another model, renamed into this model's directory */
    kvdisk *o = open_at(dir, FP + 9, 1 << 20, 1000);
    kvfile_meta om;
    uint8_t okv[BB];
    block(&om, okv, "x", 0, 5000);
    om.model_fp = FP + 9;
    put(o, &om, okv, 1000);
    file_path(o, om.chain, f, sizeof f);
    kvdisk_close(o);
    ck_assert_int_eq(rename(f, foreign), 0);
    d = open_at(dir, FP, 1 << 20, 1000);          /* start: truncated + foreign deleted, tmp removed */
    ck_assert_uint_eq(stats(d).bad_files, 2);
    ck_assert_uint_eq(stats(d).blocks, 1);
    ck_assert_int_eq(access(tmp, F_OK), -1);
    ck_assert_int_eq(access(foreign, F_OK), -1);
    ck_assert_int_eq(get(d, &m[2], 1001, out), 1);
    ck_assert_mem_eq(out, kv[2], BB);
    ck_assert_int_eq(kvdisk_clear(d), 1);
    ck_assert_uint_eq(stats(d).blocks, 0);
    kvdisk_close(d);
    rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(size_bound_expired_then_lru) {
    char *dir = tmpdir();
    static const char *NS[] = { "a", "b", "c", "d", "e" };   /* unrelated one-block chains */
    const uint64_t rec = kvfile_size(NL, KD, 1);
    kvfile_meta m[6];
    uint8_t kv[6][BB], out[BB];
    kvdisk *d = open_at(dir, FP, 3 * rec, 1000);
    block(&m[0], kv[0], NS[0], 0, 5000);
    block(&m[1], kv[1], NS[1], 0, 1100);   /* expires first */
    block(&m[2], kv[2], NS[2], 0, 5000);
    put(d, &m[0], kv[0], 1000);
    put(d, &m[1], kv[1], 1001);
    put(d, &m[2], kv[2], 1002);
    ck_assert_int_eq(get(d, &m[0], 1003, out), 1);   /* 0 is now the most recently used */
    block(&m[3], kv[3], NS[3], 0, 5000);
    put(d, &m[3], kv[3], 1200);                      /* evicts 1: expired */
    ck_assert(!kvdisk_has(d, m[1].chain, 1200));
    ck_assert_uint_eq(stats(d).expired, 1);
    block(&m[4], kv[4], NS[4], 0, 5000);
    put(d, &m[4], kv[4], 1201);                      /* evicts 2: least recently used */
    ck_assert(kvdisk_has(d, m[0].chain, 1201) && !kvdisk_has(d, m[2].chain, 1201));
    ck_assert(kvdisk_has(d, m[3].chain, 1201) && kvdisk_has(d, m[4].chain, 1201));
    ck_assert_uint_eq(stats(d).evicted, 1);
    ck_assert_uint_le(stats(d).bytes, 3 * rec);
    kvdisk_close(d);
    d = open_at(dir, FP, 2 * rec, 1202);             /* a smaller bound at start is kept too */
    ck_assert_uint_eq(stats(d).blocks, 2);
    kvdisk_close(d);
    rmtree(dir);
    free(dir);
}
END_TEST

/* How many blocks of the chain of namespace ns (block(), i = 0, 1, ...) a lookup walking from
 * the first block finds. */
static int reachable(kvdisk *d, const char *ns, int n, double now) {
    kvfile_meta m;
    uint8_t kv[BB];
    int k = 0;
    while (k < n) {
        block(&m, kv, ns, k, 0);
        if (!kvdisk_has(d, m.chain, now)) break;
        k++;
    }
    return k;
}

/* A bound of 1.5 documents: after two are written the first one's prefix is still served (the
 * chain is eaten from its end), also when its later blocks are newer (a second turn), and after
 * a restart under a smaller bound. */
START_TEST(eviction_keeps_chain_prefixes) {
    char *dir = tmpdir();
    const uint64_t rec = kvfile_size(NL, KD, 1);
    kvfile_meta m;
    uint8_t kv[BB];
    for (int turns = 0; turns < 2; turns++) {
        kvdisk *d = open_at(dir, FP, 9 * rec, 1000);
        for (int i = 0; i < 6; i++) {   /* document A; with turns, blocks 3.. a later turn */
            block(&m, kv, "A", i, 5000);
            put(d, &m, kv, turns && i >= 3 ? 1002 : 1000);
        }
        for (int i = 0; i < 6; i++) {
            block(&m, kv, "B", i, 5000);
            put(d, &m, kv, 1003);
        }
        ck_assert_uint_eq(stats(d).blocks, 9);
        ck_assert_int_eq(reachable(d, "A", 6, 1004), 3);
        ck_assert_int_eq(reachable(d, "B", 6, 1004), 6);
        kvdisk_close(d);
        d = open_at(dir, FP, 7 * rec, 1005);   /* at start: the file times order the chains */
        ck_assert_int_eq(reachable(d, "A", 6, 1006), 1);
        ck_assert_int_eq(reachable(d, "B", 6, 1006), 6);
        kvdisk_clear(d);
        kvdisk_close(d);
    }
    /* an orphan (its parent expired) goes before a live leaf */
    kvdisk *d = open_at(dir, FP, 3 * rec, 1000);
    block(&m, kv, "C", 0, 1100);
    put(d, &m, kv, 1000);
    block(&m, kv, "C", 1, 5000);
    put(d, &m, kv, 1001);
    block(&m, kv, "D", 0, 5000);
    put(d, &m, kv, 999);             /* the oldest */
    ck_assert_int_eq(get(d, &m, 1200, kv), 1);   /* C's block 0 expires on this lookup */
    block(&m, kv, "D", 1, 5000);
    put(d, &m, kv, 1201);
    block(&m, kv, "E", 0, 5000);
    put(d, &m, kv, 1202);            /* evicts C 1, the orphan, not D */
    ck_assert_int_eq(reachable(d, "D", 2, 1203), 2);
    kvdisk_close(d);
    rmtree(dir);
    free(dir);
}
END_TEST

/* A use of a held block (kvdisk_touch, or kvdisk_put with no longer lifetime) extends its expiry
 * to now + ttl without rewriting it, and the extension survives a restart; a longer ttl
 * rewrites the record. */
START_TEST(touch_extends_expiry) {
    char *dir = tmpdir();
    kvfile_meta m, r;
    uint8_t kv[BB], out[BB];
    char f[4096], err[300];
    kvdisk *d = open_at(dir, FP, UINT64_MAX, 1000);
    block(&m, kv, "n", 0, 1300);   /* ttl 300 */
    put(d, &m, kv, 1000);
    file_path(d, m.chain, f, sizeof f);
    struct stat s0, s1;
    ck_assert_int_eq(stat(f, &s0), 0);
    ck_assert_int_eq(kvdisk_touch(d, m.chain, 1200), 1);
    ck_assert(kvdisk_has(d, m.chain, 1450));
    ck_assert_int_eq(kvdisk_get(d, m.chain, "n", m.tokens, KV_BLOCK, 1450, &r, out, err, sizeof err), 1);
    ck_assert(r.expiry == 1500);
    kvdisk_close(d);
    d = open_at(dir, FP, UINT64_MAX, 1400);
    ck_assert(kvdisk_has(d, m.chain, 1499) && !kvdisk_has(d, m.chain, 1500));
    /* a put of the same lifetime is a use, not a write */
    block(&m, kv, "n", 0, 1750);
    put(d, &m, kv, 1450);
    ck_assert(kvdisk_has(d, m.chain, 1749));
    ck_assert_int_eq(stat(f, &s1), 0);
    ck_assert(s1.st_ino == s0.st_ino);
    ck_assert_uint_eq(stats(d).writes, 0);
    /* a longer ttl (an explicit 1h breakpoint over an automatic block) rewrites it */
    block(&m, kv, "n", 0, 1460 + 3600);
    m.ttl = 3600;
    m.kind = PREFIX_EXPLICIT;
    put(d, &m, kv, 1460);
    ck_assert_uint_eq(stats(d).writes, 1);
    ck_assert(kvdisk_covers(d, m.chain, PREFIX_EXPLICIT, 3600, 1461));
    ck_assert(!kvdisk_covers(d, m.chain, PREFIX_EXPLICIT, 7200, 1461));
    kvdisk_close(d);
    rmtree(dir);
    free(dir);
}
END_TEST

static char *list_dir(const char *dir) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "cd %s && find . | sort", dir);
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    char *buf = calloc(1, 1 << 16);
    fread(buf, 1, (1 << 16) - 1, p);
    pclose(p);
    return buf;
}

/* kvdisk_scan counts what kvdisk_open would delete (bad, expired, temporaries), deleting
 * nothing; kvdisk_open then deletes them. */
START_TEST(scan_is_read_only) {
    char *dir = tmpdir();
    kvfile_meta m;
    uint8_t kv[BB];
    char f[4096], g[4200];
    kvdisk *d = open_at(dir, FP, UINT64_MAX, 1000);
    for (int i = 0; i < 3; i++) {
        block(&m, kv, "n", i, i == 2 ? 1100 : 5000);
        put(d, &m, kv, 1000);
    }
    file_path(d, 0xabcdefull, f, sizeof f);
    FILE *o = fopen(f, "wb");
    fputs("not a record", o);
    fclose(o);
    snprintf(g, sizeof g, "%s/.00000000000000aa.123.tmp", kvdisk_path(d));
    o = fopen(g, "wb");
    fputs("half", o);
    fclose(o);
    kvdisk_close(d);
    char *before = list_dir(dir);
    kvdisk_stats st;
    char err[300];
    ck_assert_int_eq(kvdisk_scan(dir, FP, NL, KD, 1200, &st, err, sizeof err), 0);
    ck_assert_uint_eq(st.blocks, 2);
    ck_assert_uint_eq(st.bad_files, 1);
    ck_assert_uint_eq(st.expired, 1);
    ck_assert_uint_eq(st.temporaries, 1);
    char *after = list_dir(dir);
    ck_assert_str_eq(before, after);
    ck_assert_int_eq(kvdisk_scan(dir, FP + 1, NL, KD, 1200, &st, err, sizeof err), 0);   /* no store */
    ck_assert_uint_eq(st.blocks, 0);
    free(after);
    after = list_dir(dir);
    ck_assert_str_eq(before, after);
    d = open_at(dir, FP, UINT64_MAX, 1200);
    ck_assert_uint_eq(stats(d).temporaries, 1);
    ck_assert_uint_eq(stats(d).blocks, 2);
    kvdisk_close(d);
    ck_assert_int_eq(kvdisk_scan(dir, FP, NL, KD, 1200, &st, err, sizeof err), 0);
    ck_assert_uint_eq(st.bad_files + st.expired + st.temporaries, 0);
    free(before);
    free(after);
    rmtree(dir);
    free(dir);
}
END_TEST

/* A child writes blocks 0, 1, 2, ... until killed; whatever it left must verify and hold what
 * it wrote. Repeated at random moments, over the same directory. */
START_TEST(kill_during_writes) {
    char *dir = tmpdir();
    srand(12345);
    int served = 0;
    for (int round = 0; round < 12; round++) {
        pid_t pid = fork();
        ck_assert_int_ge(pid, 0);
        if (pid == 0) {
            kvdisk *d;
            char err[300];
            if (kvdisk_open(&d, dir, FP, NL, KD, 1 << 20, 1000, err, sizeof err)) _exit(1);
            for (int i = 0;; i = (i + 1) % 64) {
                kvfile_meta m;
                uint8_t kv[BB];
                block(&m, kv, "k", i, 5000 + round);   /* a later expiry rewrites the record */
                if (kvdisk_put(d, &m, kv, 1000, err, sizeof err)) _exit(2);
            }
        }
        /* random moments up to 20 ms; the last round long enough that some writes finished
         * whatever the disk's fsync costs */
        struct timespec ts = { 0, round == 11 ? 300000000L : (long)(rand() % 20000) * 1000 };
        nanosleep(&ts, NULL);
        kill(pid, SIGKILL);
        int status;
        waitpid(pid, &status, 0);
        ck_assert(WIFSIGNALED(status));
        kvdisk *d = open_at(dir, FP, 1 << 20, 1000);
        for (int i = 0; i < 64; i++) {
            kvfile_meta m;
            uint8_t kv[BB], out[BB];
            block(&m, kv, "k", i, 0);
            if (get(d, &m, 1000, out)) { ck_assert_mem_eq(out, kv, BB); served++; }
        }
        ck_assert_uint_eq(stats(d).bad_files, 0);   /* rename makes a record whole or absent */
        kvdisk_close(d);
    }
    ck_assert_int_gt(served, 0);
    rmtree(dir);
    free(dir);
}
END_TEST

int main(void) {
    Suite *s = suite_create("kvdisk");
    TCase *tc = tcase_create("store");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, put_get_restart);
    tcase_add_test(tc, expiry_survives_restart);
    tcase_add_test(tc, bad_files_deleted_and_counted);
    tcase_add_test(tc, size_bound_expired_then_lru);
    tcase_add_test(tc, eviction_keeps_chain_prefixes);
    tcase_add_test(tc, touch_extends_expiry);
    tcase_add_test(tc, scan_is_read_only);
    tcase_add_test(tc, kill_during_writes);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
