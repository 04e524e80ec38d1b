/* Cluster tests (issue 14), the replica's side: the --redis URL parser, the reconnect backoff,
 * the chain set, the fetch-or-compute rule; and, with a real redis-server (started here on a
 * free port; skipped when redis-server is not installed), the engine on the real model: its
 * KV events on the stream (hello, store with the prompt's chains, evict after expiry, clear,
 * bye), write-through records with their expiry, a second engine loading the prefix from Redis
 * with logits bit-identical to a cold run, namespaces, and a corrupted record refused and
 * counted. */
#include <check.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include "engine.h"
#include "kvevent.h"
#include "kvfile.h"
#include "kvredis.h"
#include "redis.h"
#include "util.h"
#include "engine_harness.h"

/* ---- the URL ---- */

START_TEST(url_parse) {
    redis_url u;
    char err[256];
    ck_assert_int_eq(redis_url_parse("redis://localhost", NULL, &u, err, sizeof err), 0);
    ck_assert_str_eq(u.host, "localhost");
    ck_assert_int_eq(u.port, 6379);
    ck_assert_int_eq(u.db, 0);
    ck_assert_str_eq(u.user, "");
    ck_assert_str_eq(u.password, "");
    ck_assert_int_eq(redis_url_parse("redis://10.0.0.5:6380/3", NULL, &u, err, sizeof err), 0);
    ck_assert_str_eq(u.host, "10.0.0.5");
    ck_assert_int_eq(u.port, 6380);
    ck_assert_int_eq(u.db, 3);
    ck_assert_int_eq(redis_url_parse("redis://:s3cret@h:1/", NULL, &u, err, sizeof err), 0);
    ck_assert_str_eq(u.password, "s3cret");
    ck_assert_str_eq(u.user, "");
    ck_assert_int_eq(u.port, 1);
    ck_assert_int_eq(u.db, 0);
    ck_assert_int_eq(redis_url_parse("redis://alice:pw%40x%3Ay@h", NULL, &u, err, sizeof err), 0);
    ck_assert_str_eq(u.user, "alice");
    ck_assert_str_eq(u.password, "pw@x:y");
    /* the last '@' ends the user info: an unescaped '@' in a password still works */
    ck_assert_int_eq(redis_url_parse("redis://:a@b@h:7", NULL, &u, err, sizeof err), 0);
    ck_assert_str_eq(u.password, "a@b");
    ck_assert_str_eq(u.host, "h");
    /* a bare user info is a password (requirepass) */
    ck_assert_int_eq(redis_url_parse("redis://pw@h", NULL, &u, err, sizeof err), 0);
    ck_assert_str_eq(u.password, "pw");
    ck_assert_str_eq(u.user, "");
    ck_assert_int_eq(redis_url_parse("redis://[::1]:6390/2", NULL, &u, err, sizeof err), 0);
    ck_assert_str_eq(u.host, "::1");
    ck_assert_int_eq(u.port, 6390);
    ck_assert_int_eq(u.db, 2);
    ck_assert_int_eq(redis_url_parse("redis://[::1]", NULL, &u, err, sizeof err), 0);
    ck_assert_int_eq(u.port, 6379);
    ck_assert_int_eq(redis_url_parse("redis://[fe80::1%eth0]:7", NULL, &u, err, sizeof err), 0);
    ck_assert_str_eq(u.host, "fe80::1%eth0");
    /* the environment's password, when the URL has none */
    ck_assert_int_eq(redis_url_parse("redis://h", "envpw", &u, err, sizeof err), 0);
    ck_assert_str_eq(u.password, "envpw");
    ck_assert_int_eq(redis_url_parse("redis://:urlpw@h", "envpw", &u, err, sizeof err), 0);
    ck_assert_str_eq(u.password, "urlpw");
    char buf[512];
    ck_assert_int_eq(redis_url_parse("redis://bob:hunter2@cache.local:7000/5", NULL, &u, err, sizeof err), 0);
    redis_url_print(&u, buf, sizeof buf);
    ck_assert_str_eq(buf, "redis://bob:***@cache.local:7000/5");
    ck_assert_ptr_null(strstr(buf, "hunter2"));
    /* a user without a password keeps its ':', so the printed URL does not read as a password
     * (fuzz_cluster: "bob@h" parses back as the password bob) */
    ck_assert_int_eq(redis_url_parse("redis://bob:@h", NULL, &u, err, sizeof err), 0);
    redis_url_print(&u, buf, sizeof buf);
    ck_assert_str_eq(buf, "redis://bob:@h:6379/0");
    redis_url v;
    ck_assert_int_eq(redis_url_parse(buf, NULL, &v, err, sizeof err), 0);
    ck_assert_str_eq(v.user, "bob");
    ck_assert_str_eq(v.password, "");

    const char *bad[] = { NULL, "", "http://h", "rediss://h", "redis://", "redis://:6379", "redis://h:0", "redis://h:65536",
                          "redis://h:12x", "redis://h:-1", "redis://h/x", "redis://h/1/2", "redis://[::1", "redis://[]:1",
                          "redis://[::1]x", "redis://u:p%4@h", "redis://u:p%zz@h", "redis://u:%00@h", "redis://h h",
                          /* fuzz_cluster: anything went between brackets */
                          "redis://[\x01]:1", "redis://[a b]", "redis://[::1%]", "redis://[%eth0]", "redis://[::1%e%0]", "redis://[x::1]",
                          "unix:///tmp/redis.sock", "redis://h:99999999999" };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        err[0] = 0;
        ck_assert_msg(redis_url_parse(bad[i], NULL, &u, err, sizeof err) == -1, "accepted '%s'", bad[i] ? bad[i] : "(null)");
        ck_assert_msg(err[0], "no reason for '%s'", bad[i] ? bad[i] : "(null)");
    }
    /* a bad URL's message never repeats its password */
    ck_assert_int_eq(redis_url_parse("redis://u:topsecret@h:bad", NULL, &u, err, sizeof err), -1);
    ck_assert_ptr_null(strstr(err, "topsecret"));
    /* overlong parts */
    char longp[600] = "redis://u:";
    memset(longp + 10, 'p', 400);
    strcpy(longp + 410, "@h");
    ck_assert_int_eq(redis_url_parse(longp, NULL, &u, err, sizeof err), -1);
}
END_TEST

START_TEST(backoff) {
    double prev = 0;
    for (int a = 0; a < 40; a++) {
        double lo = 1e9, hi = 0;
        for (unsigned r = 0; r < 3000; r += 7) {
            double d = redis_backoff_s(a, 5, r);
            if (d < lo) lo = d;
            if (d > hi) hi = d;
        }
        double base = 0.1 * (1 << (a < 6 ? a : 6));
        if (base > 5) base = 5;
        ck_assert_msg(lo >= 0.75 * base - 1e-9 && hi <= 1.25 * base + 1e-9, "attempt %d: %g..%g around %g", a, lo, hi, base);
        ck_assert(hi > lo);   /* jittered */
        ck_assert(lo >= prev * 0.99 || base == 5);
        prev = lo;
    }
    ck_assert(redis_backoff_s(0, 5, 0) >= 0.075);
    ck_assert(redis_backoff_s(1000000, 5, 12345) <= 6.25);
}
END_TEST

/* ---- the chain set against a plain array ---- */

START_TEST(chainset_ops) {
    chainset s = {0};
    enum { N = 4000 };
    uint64_t *ref = calloc(N, sizeof *ref);
    bool *in = calloc(N, sizeof *in);
    uint64_t x = 88172645463325252ull;
    for (int i = 0; i < N; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        /* a few keys in one home slot (low bits equal) make long runs to delete from */
        ref[i] = i % 97 == 0 ? 0 : i % 5 == 0 ? (x << 20) : x;
    }
    ref[1] = 0;   /* the zero hash, twice in the list */
    size_t n_in = 0;
    for (int step = 0; step < 60000; step++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        int i = (int)(x % N);
        bool zero = ref[i] == 0;
        bool was = false;
        for (int k = 0; k < N && !was; k++) was = in[k] && ref[k] == ref[i];
        ck_assert(chainset_has(&s, ref[i]) == was);
        if (x >> 60 < 9) {
            int rc = chainset_add(&s, ref[i]);
            ck_assert_int_eq(rc, was ? 0 : 1);
            if (!was) { in[i] = true; n_in++; }
        } else {
            int rc = chainset_del(&s, ref[i]);
            ck_assert_int_eq(rc, was ? 1 : 0);
            if (was) {
                for (int k = 0; k < N; k++)
                    if (in[k] && ref[k] == ref[i]) { in[k] = false; n_in--; }
            }
        }
        (void)zero;
        ck_assert_uint_eq(chainset_size(&s), n_in);
    }
    /* listing gives every member once */
    uint64_t buf[37];
    size_t pos = 0, k, total = 0;
    while ((k = chainset_list(&s, &pos, buf, 37)) > 0) {
        for (size_t j = 0; j < k; j++) ck_assert(chainset_has(&s, buf[j]));
        total += k;
    }
    ck_assert_uint_eq(total, n_in);
    chainset_clear(&s);
    ck_assert_uint_eq(chainset_size(&s), 0);
    ck_assert(!chainset_has(&s, 0));
    ck_assert(!chainset_has(&s, ref[2]));
    chainset_free(&s);
    free(ref);
    free(in);
}
END_TEST

START_TEST(fetch_rule) {
    /* CPU: 16 tokens at 0.5 ms each against 0.4 ms a block */
    ck_assert(kvredis_fetch_pays(1e-4, 4e-4, 1, 5e-4));
    ck_assert(kvredis_fetch_pays(1e-4, 4e-4, 125, 5e-4));
    /* a fast GPU (20 us a token = 0.32 ms a block) on a slow network (2 ms a block): compute */
    ck_assert(!kvredis_fetch_pays(5e-4, 2e-3, 125, 2e-5));
    /* a long round trip outweighs one block but not many */
    ck_assert(!kvredis_fetch_pays(0.05, 1e-4, 1, 1e-3));
    ck_assert(kvredis_fetch_pays(0.05, 1e-4, 100, 1e-3));
    /* nothing to fetch; not measured yet: try */
    ck_assert(!kvredis_fetch_pays(1e-4, 1e-4, 0, 1e-3));
    ck_assert(kvredis_fetch_pays(1e-4, 1e-4, 3, 0));
}
END_TEST

/* ---- with a real redis-server ---- */

static pid_t redis_pid;
static int redis_port;
static char redis_dir[64];
static char redis_url_s[64];

static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) || getsockname(fd, (struct sockaddr *)&a, &len)) return -1;
    close(fd);
    return ntohs(a.sin_port);
}

static bool have_redis(void) { return system("command -v redis-server >/dev/null 2>&1") == 0; }

static redisContext *rc(void) {
    redis_url u;
    char err[256];
    ck_assert_int_eq(redis_url_parse(redis_url_s, NULL, &u, err, sizeof err), 0);
    return redis_connect(&u, 2, err, sizeof err);
}

static void redis_start(void) {
    snprintf(redis_dir, sizeof redis_dir, "/tmp/pcache-redis-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(redis_dir));
    redis_port = free_port();
    ck_assert_int_gt(redis_port, 0);
    snprintf(redis_url_s, sizeof redis_url_s, "redis://127.0.0.1:%d", redis_port);
    char port[16];
    snprintf(port, sizeof port, "%d", redis_port);
    redis_pid = fork();
    if (redis_pid == 0) {
        (void)!freopen("/dev/null", "w", stdout);
        (void)!freopen("/dev/null", "w", stderr);
        execlp("redis-server", "redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", redis_dir, (char *)NULL);
        _exit(127);
    }
    for (int i = 0; i < 100; i++) {
        redisContext *c = rc();
        if (c) { redisFree(c); return; }
        usleep(50000);
    }
    ck_abort_msg("redis-server did not start");
}

static void redis_stop(void) {
    if (!redis_dir[0]) return;
    if (redis_pid > 0) {
        kill(redis_pid, SIGTERM);
        waitpid(redis_pid, NULL, 0);
        redis_pid = 0;
    }
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", redis_dir);
    (void)!system(cmd);
    redis_dir[0] = 0;
}

typedef struct { char op[8], inst[17]; int n; uint64_t chains[KVEVENT_MAX_CHAINS]; } event;

/* Every event on the stream (at most cap). */
static int read_events(event *out, int cap) {
    redisContext *c = rc();
    ck_assert_ptr_nonnull(c);
    redisReply *r = redisCommand(c, "XRANGE %s - +", KVEVENT_STREAM);
    ck_assert_ptr_nonnull(r);
    ck_assert_int_eq(r->type, REDIS_REPLY_ARRAY);
    int n = 0;
    for (size_t i = 0; i < r->elements && n < cap; i++) {
        redisReply *f = r->element[i]->element[1];
        event *e = &out[n++];
        memset(e, 0, sizeof *e);
        for (size_t k = 0; k + 1 < f->elements; k += 2) {
            const char *name = f->element[k]->str, *v = f->element[k + 1]->str;
            if (!strcmp(name, "op")) snprintf(e->op, sizeof e->op, "%s", v);
            else if (!strcmp(name, "inst")) snprintf(e->inst, sizeof e->inst, "%s", v);
            else if (!strcmp(name, "v")) ck_assert_str_eq(v, KVEVENT_VERSION);
            else if (!strcmp(name, "layout")) ck_assert_str_eq(v, "30x192");
            else if (!strcmp(name, "chains")) ck_assert_int_ge(e->n = kvevent_parse_chains(v, e->chains, KVEVENT_MAX_CHAINS), 1);
        }
    }
    freeReplyObject(r);
    redisFree(c);
    return n;
}

static double fake_now = 1000;
static double fake_clock(void *ctx) { (void)ctx; return fake_now; }

static const char *PROMPT =
    "<|im_start|>system\nYou are a helpful assistant who answers briefly and precisely, with facts "
    "that a curious student of astronomy would enjoy.<|im_end|>\n"
    "<|im_start|>user\nList three facts about the planet Mars, its two small moons Phobos and Deimos, "
    "and the reason for its red color.<|im_end|>\n<|im_start|>assistant\n";
#define NV 49152

static engine *mk(bool redis, bool cache, uint64_t inst) {
    engine_opts eo = { .model_path = default_model_path(), .kv_mem_bytes = 64u << 20, .cache_enabled = cache, .n_threads = 2,
                       .clock = fake_clock, .redis_url = redis ? redis_url_s : NULL, .instance = inst, .cache_ttl_s = 300 };
    engine *e;
    char err[512];
    if (engine_create(&e, &eo, err, sizeof err)) { fprintf(stderr, "%s\n", err); return NULL; }
    return e;
}

/* A replica with Redis and a host-RAM tier below a small pool. */
static engine *mk_tiered(uint64_t inst, size_t kv_mem, size_t host) {
    engine_opts eo = { .model_path = default_model_path(), .kv_mem_bytes = kv_mem, .cache_enabled = true, .n_threads = 2,
                       .clock = fake_clock, .redis_url = redis_url_s, .instance = inst, .cache_ttl_s = 300,
                       .cache_host_bytes = host };
    engine *e;
    char err[512];
    if (engine_create(&e, &eo, err, sizeof err)) { fprintf(stderr, "%s\n", err); return NULL; }
    return e;
}

/* Steps the engine (as the server's loop does) until the engine sees Redis connected or not,
 * for at most max_s seconds; whether it did. */
static bool wait_redis_state(engine *e, bool connected, double max_s) {
    for (int i = 0; i < (int)(max_s * 100); i++) {
        engine_stats st;
        engine_step(e);
        engine_get_stats(e, &st);
        if (st.redis.connected == connected) return true;
        usleep(10000);
    }
    return false;
}

/* Waits until Redis is connected and the engine saw it. */
static void wait_connected(engine *e) {
    if (!wait_redis_state(e, true, 4)) ck_abort_msg("never connected to redis");
}

static void run(engine *e, const int32_t *ids, int n, const char *ns, float *logits, result *r) {
    run_req(e, ids, n, ns, 8, logits, NULL, 0, 0, r);
    engine_cache_sync(e);   /* writes and events sent */
}

static bool has_chains(const event *ev, int n_ev, const char *op, const char *inst, const uint64_t *want, int n_want) {
    for (int w = 0; w < n_want; w++) {
        bool found = false;
        for (int i = 0; i < n_ev && !found; i++)
            if (!strcmp(ev[i].op, op) && !strcmp(ev[i].inst, inst))
                for (int k = 0; k < ev[i].n && !found; k++) found = ev[i].chains[k] == want[w];
        if (!found) return false;
    }
    return true;
}

START_TEST(cluster_engine) {
    if (!have_redis()) { fprintf(stderr, "redis-server not installed: skipping the cluster engine test\n"); return; }
    redis_start();
    event *ev = malloc(sizeof *ev * 256);
    /* the cold reference */
    engine *cold = mk(false, false, 0);
    ck_assert_ptr_nonnull(cold);
    int32_t *ids;
    int n = encode(cold, PROMPT, &ids);
    ck_assert_int_gt(n, 48);
    float *ref = malloc(sizeof(float) * NV), *got = malloc(sizeof(float) * NV);
    result r0, r;
    run_req(cold, ids, n, NULL, 8, ref, NULL, 0, 0, &r0);
    engine_free(cold);

    /* replica A computes the prompt: hello, then a store of its full blocks, and the records */
    engine *a = mk(true, true, 0xa11ce);
    ck_assert_ptr_nonnull(a);
    wait_connected(a);
    uint64_t fp = engine_model_fp(a);
    ck_assert(fp != 0);
    run(a, ids, n, NULL, got, &r);
    ck_assert_int_eq(r.u.cached_tokens, 0);
    ck_assert_str_eq(r.text, r0.text);
    uint64_t want[64];
    int nb = kvevent_prompt_chains(fp, 30, 192, NULL, ids, n, want, 64);
    ck_assert_int_eq(nb, n / KV_BLOCK);
    int n_ev = read_events(ev, 256);
    ck_assert_int_ge(n_ev, 2);
    ck_assert_str_eq(ev[0].op, "hello");
    ck_assert_str_eq(ev[0].inst, "00000000000a11ce");
    ck_assert(has_chains(ev, n_ev, "store", "00000000000a11ce", want, nb));
    engine_stats st;
    engine_get_stats(a, &st);
    ck_assert(st.redis_on && st.redis.connected);
    ck_assert_uint_ge(st.redis.blocks_written, (uint64_t)nb);
    ck_assert_int_ge(st.redis_announced, nb);
    redisContext *c = rc();
    char key[64];
    kvevent_block_key(fp, want[0], key, sizeof key);
    redisReply *x = redisCommand(c, "PTTL %s", key);
    ck_assert_int_eq(x->type, REDIS_REPLY_INTEGER);
    ck_assert_int_gt(x->integer, 250000);   /* the entry's 300 s */
    ck_assert_int_le(x->integer, 300000);
    freeReplyObject(x);

    /* replica B: the prefix comes from Redis, logits bit-identical to the cold run */
    engine *b = mk(true, true, 0xb0b);
    wait_connected(b);
    run(b, ids, n, NULL, got, &r);
    ck_assert_int_eq(r.u.cached_tokens, (n - 1) / KV_BLOCK * KV_BLOCK);
    ck_assert_msg(memcmp(ref, got, sizeof(float) * NV) == 0, "logits differ after a fetch from redis");
    ck_assert_str_eq(r.text, r0.text);
    engine_get_stats(b, &st);
    ck_assert_uint_eq(st.redis_tokens, (uint64_t)r.u.cached_tokens);
    ck_assert_uint_eq(st.redis_hits, 1);
    ck_assert_uint_eq(st.redis_fetches, 1);
    ck_assert_uint_eq(st.redis.blocks_read, (uint64_t)((n - 1) / KV_BLOCK));
    ck_assert_uint_eq(st.redis.bad_records, 0);
    /* B announced what it loaded, and holds it in its pool now */
    n_ev = read_events(ev, 256);
    ck_assert(has_chains(ev, n_ev, "store", "0000000000000b0b", want, (n - 1) / KV_BLOCK));
    run(b, ids, n, NULL, got, &r);
    ck_assert_int_eq(r.u.cached_tokens, n - 1);
    engine_free(b);

    /* another namespace (API key) gets nothing of it */
    engine *d = mk(true, true, 0xd);
    wait_connected(d);
    run(d, ids, n, "kother", got, &r);
    ck_assert_int_eq(r.u.cached_tokens, 0);
    ck_assert(memcmp(ref, got, sizeof(float) * NV) == 0);
    engine_get_stats(d, &st);
    ck_assert_uint_eq(st.redis.read_hits, 0);
    engine_free(d);

    /* a corrupted record (one byte of the values of block 2) is refused and counted: the
     * blocks before it load, the rest is computed, the answer is the same */
    kvevent_block_key(fp, want[2], key, sizeof key);
    x = redisCommand(c, "GETRANGE %s 400 400", key);
    ck_assert_int_eq(x->type, REDIS_REPLY_STRING);
    char flipped[2] = { (char)(x->str[0] ^ 0x20), 0 };
    freeReplyObject(x);
    x = redisCommand(c, "SETRANGE %s 400 %b", key, flipped, (size_t)1);
    freeReplyObject(x);
    engine *f = mk(true, true, 0xf);
    wait_connected(f);
    run(f, ids, n, NULL, got, &r);
    ck_assert_int_eq(r.u.cached_tokens, 2 * KV_BLOCK);
    ck_assert(memcmp(ref, got, sizeof(float) * NV) == 0);
    ck_assert_str_eq(r.text, r0.text);
    engine_get_stats(f, &st);
    ck_assert_uint_eq(st.redis.bad_records, 1);
    /* f computed block 2 and wrote it through: the good record is back */
    engine_free(f);
    engine *g = mk(true, true, 0x9);
    wait_connected(g);
    run(g, ids, n, NULL, got, &r);
    ck_assert_int_eq(r.u.cached_tokens, (n - 1) / KV_BLOCK * KV_BLOCK);
    ck_assert(memcmp(ref, got, sizeof(float) * NV) == 0);
    engine_free(g);

    /* A's entries expire: the next reconciliation evicts its blocks; then a clear; then bye */
    fake_now += 400;
    engine_step(a);
    engine_cache_sync(a);
    n_ev = read_events(ev, 256);
    ck_assert(has_chains(ev, n_ev, "evict", "00000000000a11ce", want, nb));
    engine_get_stats(a, &st);
    ck_assert_int_eq(st.redis_announced, 0);
    run(a, ids, n, NULL, got, &r);   /* (from Redis again: the records live 300 s of real time) */
    ck_assert(memcmp(ref, got, sizeof(float) * NV) == 0);
    ck_assert_int_gt(engine_cache_clear(a), 0);
    engine_cache_sync(a);
    n_ev = read_events(ev, 256);
    ck_assert_str_eq(ev[n_ev - 1].op, "clear");
    ck_assert_str_eq(ev[n_ev - 1].inst, "00000000000a11ce");
    engine_free(a);
    n_ev = read_events(ev, 256);
    ck_assert_str_eq(ev[n_ev - 1].op, "bye");
    ck_assert_str_eq(ev[n_ev - 1].inst, "00000000000a11ce");
    redisFree(c);
    redis_stop();
    free(ev);
    free(ids);
    free(ref);
    free(got);
}
END_TEST

/* A conversation's next turn on the same replica keeps the partial last block its pool matched
 * when Redis lacks the full block there (it is asked for, in place, never at the cost of the
 * match), with logits bit-identical to a cold run. */
START_TEST(partial_match_kept) {
    if (!have_redis()) return;
    redis_start();
    engine *cold = mk(false, false, 0);
    int32_t *ids;
    int n = encode(cold, PROMPT, &ids);
    ck_assert_int_ne(n % KV_BLOCK, 0);
    int n2 = n + 40;
    int32_t *ids2 = malloc(sizeof(int32_t) * n2);
    memcpy(ids2, ids, sizeof(int32_t) * n);
    for (int i = n; i < n2; i++) ids2[i] = ids[i - n + 5];
    float *ref = malloc(sizeof(float) * NV), *got = malloc(sizeof(float) * NV);
    result r0, r;
    run_req(cold, ids2, n2, NULL, 4, ref, NULL, 0, 0, &r0);
    engine_free(cold);
    engine *a = mk(true, true, 0xc0);
    wait_connected(a);
    run_req(a, ids, n, NULL, 1, NULL, NULL, 0, 0, &r);   /* caches exactly the prompt: a partial last block */
    engine_cache_sync(a);
    engine_stats st0;
    engine_get_stats(a, &st0);
    run_req(a, ids2, n2, NULL, 4, got, NULL, 0, 0, &r);
    engine_cache_sync(a);
    ck_assert_int_eq(r.u.cached_tokens, n);
    ck_assert(memcmp(ref, got, sizeof(float) * NV) == 0);
    ck_assert_str_eq(r.text, r0.text);
    engine_stats st;
    engine_get_stats(a, &st);
    ck_assert_uint_eq(st.redis_fetches - st0.redis_fetches, 1);   /* it did ask (from the block the match ends in) */
    ck_assert_uint_eq(st.redis.read_misses - st0.redis.read_misses, 1);
    ck_assert_uint_eq(st.redis_tokens, 0);
    engine_free(a);
    /* and when Redis has that block (a replica computed further), the match is completed */
    engine *b = mk(true, true, 0xc1);
    wait_connected(b);
    run_req(b, ids, n, NULL, 1, NULL, NULL, 0, 0, &r);   /* (its full blocks from Redis) */
    engine_get_stats(b, &st0);
    run_req(b, ids2, n2, NULL, 4, got, NULL, 0, 0, &r);
    ck_assert_int_eq(r.u.cached_tokens, (n2 - 1) / KV_BLOCK * KV_BLOCK);
    ck_assert_str_eq(r.text, r0.text);
    ck_assert(memcmp(ref, got, sizeof(float) * NV) == 0);
    engine_get_stats(b, &st);
    ck_assert_uint_eq(st.redis_tokens - st0.redis_tokens, (uint64_t)((n2 - 1) / KV_BLOCK * KV_BLOCK - n));
    engine_free(b);
    free(ids);
    free(ids2);
    free(ref);
    free(got);
    redis_stop();
}
END_TEST

/* A prefix pulled from Redis goes into the replica's own lower tiers as a computed one does
 * (write_through when the prompt is cached: the tiers lack those blocks, so they are written):
 * once other traffic has pushed it out of the pool, the host tier serves it, with no second
 * fetch from Redis, and the logits stay those of a cold run. */
START_TEST(pulled_prefix_reaches_local_tiers) {
    if (!have_redis()) return;
    redis_start();
    engine *cold = mk(false, false, 0);
    int32_t *ids;
    int n = encode(cold, PROMPT, &ids);
    float *ref = malloc(sizeof(float) * NV), *got = malloc(sizeof(float) * NV);
    result r0, r;
    run_req(cold, ids, n, NULL, 8, ref, NULL, 0, 0, &r0);
    engine_free(cold);
    engine *a = mk(true, true, 0xa);
    wait_connected(a);
    run(a, ids, n, NULL, NULL, &r);
    engine_free(a);
    /* B: a pool of 10 blocks, a host tier of 64; the prompt's full blocks come from Redis */
    const size_t blk = 368640;
    engine *b = mk_tiered(0xb, 10 * blk, 64 * blk);
    ck_assert_ptr_nonnull(b);
    ck_assert_int_le(n, 9 * KV_BLOCK);
    wait_connected(b);
    run(b, ids, n, NULL, got, &r);
    const int full = (n - 1) / KV_BLOCK * KV_BLOCK;
    ck_assert_int_eq(r.u.cached_tokens, full);
    ck_assert(memcmp(ref, got, sizeof(float) * NV) == 0);
    engine_stats st0, st;
    engine_get_stats(b, &st);
    ck_assert_uint_eq(st.redis.blocks_read, (uint64_t)(full / KV_BLOCK));
    ck_assert_uint_ge(st.tier[KVTIER_HOST].blocks, (uint64_t)(full / KV_BLOCK));
    /* later traffic pushes it out of the pool (the least recently used entry) */
    char text[300];
    for (int i = 0; i < 4; i++) {
        fake_now += 1;
        snprintf(text, sizeof text, "Request %d: a different long question about the number %d, its square, its cube, "
                 "its digits, and whether it is prime or not, with reasons and examples.", i, i * 7 + 3);
        int32_t *o;
        int no = encode(b, text, &o);
        run(b, o, no, NULL, NULL, &r);
        free(o);
    }
    engine_get_stats(b, &st0);
    ck_assert_uint_gt(st0.evictions, 0);
    run(b, ids, n, NULL, got, &r);
    ck_assert_int_ge(r.u.cached_tokens, full);
    ck_assert(memcmp(ref, got, sizeof(float) * NV) == 0);
    ck_assert_str_eq(r.text, r0.text);
    engine_get_stats(b, &st);
    ck_assert_uint_ge(st.tier[KVTIER_HOST].promotions - st0.tier[KVTIER_HOST].promotions, (uint64_t)(full / KV_BLOCK));
    ck_assert_uint_eq(st.redis.read_jobs, st0.redis.read_jobs);   /* not fetched again */
    ck_assert_uint_eq(st.redis.blocks_read, st0.redis.blocks_read);
    ck_assert_uint_eq(st.redis_fetches, st0.redis_fetches);
    engine_free(b);
    free(ids);
    free(ref);
    free(got);
    redis_stop();
}
END_TEST

/* Two requests under one long shared system prompt reach a cold replica one step apart: the
 * first waits for its Redis miss, then computes; the second, admitted before the first had
 * computed anything, waits for its own Redis miss meanwhile. When that load is reported the
 * pool holds the shared prefix (the first cached its prompt): the second takes it rather than
 * computing it again (cached_tokens: the common prefix), with logits bit-identical to a cold
 * run, and no block is left referenced once the cache is cleared. */
START_TEST(rematch_after_load) {
    if (!have_redis()) return;
    redis_start();
    const char *sys = "<|im_start|>system\nYou answer questions about the following chronicle. The city of Arden "
                      "was founded on the river Vell in the year of the long winter by three families of weavers, "
                      "who traded wool and dyed cloth with the towns of the southern coast, and whose guild hall "
                      "still stands beside the old stone bridge.<|im_end|>\n<|im_start|>user\n";
    char p1[1024], p2[1024];
    snprintf(p1, sizeof p1, "%sWho founded the city?<|im_end|>\n<|im_start|>assistant\n", sys);
    snprintf(p2, sizeof p2, "%sWhat did the families trade, and with whom?<|im_end|>\n<|im_start|>assistant\n", sys);
    engine *cold = mk(false, false, 0);
    ck_assert_ptr_nonnull(cold);
    int32_t *ids1, *ids2;
    int n1 = encode(cold, p1, &ids1), n2 = encode(cold, p2, &ids2);
    int lcp = 0;
    while (lcp < n1 && lcp < n2 - 1 && ids1[lcp] == ids2[lcp]) lcp++;
    ck_assert_int_ge(lcp, 4 * KV_BLOCK);
    ck_assert_int_le(n1, 512);   /* the first computes its whole prompt in one step */
    float *ref = malloc(sizeof(float) * NV), *got = malloc(sizeof(float) * NV);
    result r0, r1, r2;
    run_req(cold, ids2, n2, NULL, 4, ref, NULL, 0, 0, &r0);
    engine_free(cold);
    engine *a = mk(true, true, 0xd0);
    wait_connected(a);
    engine_request q1 = { .prompt = ids1, .n_prompt = n1, .max_tokens = 4, .on_text = on_text, .on_done = on_done, .user = &r1 };
    engine_request q2 = { .prompt = ids2, .n_prompt = n2, .max_tokens = 4, .prompt_logits = got, .on_text = on_text,
                          .on_done = on_done, .user = &r2 };
    sample_params_default(&q1.sp);
    sample_params_default(&q2.sp);
    q1.sp.temperature = q2.sp.temperature = 0;
    memset(&r1, 0, sizeof r1);
    memset(&r2, 0, sizeof r2);
    char err[256];
    ck_assert_int_ge(engine_submit(a, &q1, err, sizeof err), 0);
    engine_step(a);          /* the first is admitted and asks Redis */
    engine_cache_sync(a);    /* its miss is reported: it prefills at the next step */
    ck_assert_int_ge(engine_submit(a, &q2, err, sizeof err), 0);
    engine_step(a);          /* the second is admitted (nothing cached yet) and asks Redis; the first computes its prompt */
    engine_cache_sync(a);    /* the second's miss is reported, the shared prefix in the pool by now */
    while (!r1.done || !r2.done) engine_step(a);
    ck_assert_int_ne(r1.why, FINISH_ERROR);
    ck_assert_int_ne(r2.why, FINISH_ERROR);
    engine_stats st;
    engine_get_stats(a, &st);
    ck_assert_uint_eq(st.redis_fetches, 2);   /* both did wait for Redis */
    ck_assert_int_eq(r1.u.cached_tokens, 0);
    ck_assert_int_eq(r2.u.cached_tokens, lcp);   /* the shared prefix computed once */
    ck_assert_uint_eq(st.cached_tokens, (uint64_t)lcp);
    ck_assert(memcmp(ref, got, sizeof(float) * NV) == 0);
    ck_assert_str_eq(r2.text, r0.text);
    engine_cache_sync(a);
    engine_cache_clear(a);
    engine_get_stats(a, &st);
    ck_assert_int_eq(st.kv_blocks_used, 0);
    engine_free(a);
    free(ids1);
    free(ids2);
    free(ref);
    free(got);
    redis_stop();
}
END_TEST

/* Redis absent, then killed and restarted: the engine runs on its local cache meanwhile, the
 * client reconnects (counted), publishes hello and announces what it holds again. */
START_TEST(cluster_reconnect) {
    if (!have_redis()) return;
    redis_start();
    int port = redis_port;
    redis_stop();
    /* nothing listens: the engine serves from its own cache */
    engine *a = mk(true, true, 0x5eed);
    ck_assert_ptr_nonnull(a);
    int32_t *ids;
    int n = encode(a, PROMPT, &ids);
    result r;
    run_req(a, ids, n, NULL, 4, NULL, NULL, 0, 0, &r);
    run_req(a, ids, n, NULL, 4, NULL, NULL, 0, 0, &r);
    ck_assert_int_eq(r.u.cached_tokens, n - 1);
    engine_stats st;
    engine_get_stats(a, &st);
    ck_assert(!st.redis.connected);
    ck_assert_uint_gt(st.redis.errors, 0);
    /* Redis comes up on the same port: hello, then the blocks held */
    char port_s[16];
    snprintf(port_s, sizeof port_s, "%d", port);
    snprintf(redis_dir, sizeof redis_dir, "/tmp/pcache-redis-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(redis_dir));
    redis_pid = fork();
    if (redis_pid == 0) {
        (void)!freopen("/dev/null", "w", stdout);
        (void)!freopen("/dev/null", "w", stderr);
        execlp("redis-server", "redis-server", "--port", port_s, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", redis_dir, (char *)NULL);
        _exit(127);
    }
    event *ev = malloc(sizeof *ev * 64);
    uint64_t want[64];
    int nb = kvevent_prompt_chains(engine_model_fp(a), 30, 192, NULL, ids, n, want, 64);
    bool ok = false;
    for (int i = 0; i < 1000 && !ok; i++) {
        fake_now += 0.01;
        engine_step(a);
        usleep(10000);
        redisContext *c = rc();
        if (!c) continue;
        redisFree(c);
        int n_ev = read_events(ev, 64);
        ok = n_ev >= 2 && !strcmp(ev[0].op, "hello") && has_chains(ev, n_ev, "store", "0000000000005eed", want, nb);
    }
    ck_assert_msg(ok, "no hello and store after redis came back");
    engine_get_stats(a, &st);
    ck_assert(st.redis.connected);
    ck_assert_uint_eq(st.redis.connects, 1);
    /* killed again mid-run: requests still succeed, the loss is counted, and it reconnects */
    kill(redis_pid, SIGKILL);
    waitpid(redis_pid, NULL, 0);
    redis_pid = 0;
    uint64_t err0 = st.redis.errors;
    int32_t *alt = malloc(sizeof(int32_t) * n);
    memcpy(alt, ids, sizeof(int32_t) * n);
    alt[n - 20] = alt[n - 20] == 100 ? 101 : 100;
    run_req(a, alt, n, NULL, 4, NULL, NULL, 0, 0, &r);
    ck_assert_int_ne(r.why, FINISH_ERROR);
    for (int i = 0; i < 300; i++) {   /* the idle PING notices within a second */
        engine_step(a);
        engine_get_stats(a, &st);
        if (!st.redis.connected) break;
        usleep(10000);
    }
    ck_assert(!st.redis.connected);
    ck_assert_uint_gt(st.redis.errors, err0);
    engine_free(a);
    free(alt);
    free(ev);
    free(ids);
    redis_stop();
}
END_TEST

static void acl(const char *rule) {
    redisContext *c = redisConnect("127.0.0.1", redis_port);   /* (rc() PINGs, which -ping refuses) */
    ck_assert(c && !c->err);
    redisReply *r = redisCommand(c, "ACL SETUSER default %s", rule);
    ck_assert_msg(r && r->type != REDIS_REPLY_ERROR, "ACL SETUSER default %s: %s", rule, r ? r->str : c->errstr);
    freeReplyObject(r);
    redisFree(c);
}

/* The idle PING's error reply (here NOPERM: the ACL changed under the connection) is a lost
 * connection: counted, reconnects backed off (their PING fails too), and back once PING is
 * allowed again. It was taken for a live connection. */
START_TEST(ping_error_reply_reconnects) {
    if (!have_redis()) return;
    redis_start();
    engine *e = mk(true, true, 0xac1);
    ck_assert_ptr_nonnull(e);
    wait_connected(e);
    engine_stats st;
    engine_get_stats(e, &st);
    const uint64_t err0 = st.redis.errors, conn0 = st.redis.connects;
    acl("-ping");
    ck_assert_msg(wait_redis_state(e, false, 10), "an error reply to the idle PING left the connection up");
    engine_get_stats(e, &st);
    ck_assert_uint_gt(st.redis.errors, err0);
    acl("+ping");
    ck_assert_msg(wait_redis_state(e, true, 15), "never reconnected once PING was allowed again");
    engine_get_stats(e, &st);
    ck_assert_uint_gt(st.redis.connects, conn0);
    engine_free(e);
    redis_stop();
}
END_TEST

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    Suite *s = suite_create("redis");
    TCase *tc = tcase_create("redis");
    tcase_set_timeout(tc, 600);
    tcase_add_checked_fixture(tc, NULL, redis_stop);   /* a failed test leaves no redis-server behind */
    tcase_add_test(tc, url_parse);
    tcase_add_test(tc, backoff);
    tcase_add_test(tc, chainset_ops);
    tcase_add_test(tc, fetch_rule);
    tcase_add_test(tc, cluster_engine);
    tcase_add_test(tc, partial_match_kept);
    tcase_add_test(tc, pulled_prefix_reaches_local_tiers);
    tcase_add_test(tc, rematch_after_load);
    tcase_add_test(tc, cluster_reconnect);
    tcase_add_test(tc, ping_error_reply_reconnects);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
