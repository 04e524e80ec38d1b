/* pcache command line: run | serve | tokenize.
 *
 *   pcache run [-m MODEL] [-n N] [--temp T] [--top-k K] [--top-p P] [--min-p P] [--seed S]
 *              [--repeat-penalty R] [--chat] [--system TEXT] [--ignore-eos] [-t THREADS]
 *              [--kv-mem SIZE] [--cache-ttl T] [--no-cache] [--prompts FILE] [-f FILE | PROMPT]
 *              [--cache-dir DIR] [--cache-disk SIZE] [--cache-host-mem SIZE]
 *   pcache tokenize [-m MODEL]          (text on stdin -> JSON array of token ids)
 *   pcache serve ...                    (see server.c)
 *   pcache route ...                    (see router.c)
 *   pcache cache stats|clear --cache-dir DIR [-m MODEL]   (the disk tier's stores)
 */
#include "engine.h"
#include "fingerprint.h"
#include "gguf.h"
#include "kvdisk.h"
#include "tokenizer.h"
#include "util.h"
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int server_main(int argc, char **argv);
int router_main(int argc, char **argv);

static void usage(FILE *out) {
    fprintf(out,
            "usage: pcache <command> [options]\n"
            "  run [-m MODEL] [-n N] [--temp T] [--top-k K] [--top-p P] [--min-p P] [--seed S]\n"
            "      [--repeat-penalty R] [--chat] [--system TEXT] [--ignore-eos] [-t THREADS]\n"
            "      [--kv-mem SIZE] [--cache-ttl T] [--no-cache] [--stop STR]... [--prompts FILE]\n"
            "      [--device cpu|cuda|auto] [--cache-dir DIR] [--cache-disk SIZE] [--cache-host-mem SIZE]\n"
            "      [-f FILE | PROMPT]\n"
            "      Streams the completion to stdout, timings to stderr. --temp 0 is greedy.\n"
            "      Generation ends at an end-of-generation token, after -n tokens, or at a --stop\n"
            "      string (not printed).\n"
            "      --prompts FILE runs one prompt per line (a JSON string, or an object with\n"
            "      \"prompt\" or \"messages\") in one process, sharing the prompt cache, and prints\n"
            "      one JSON line per prompt: prompt_tokens, cached_tokens, ttft_ms, text.\n"
            "      --cache-dir DIR keeps cached KV blocks on disk (bounded by --cache-disk, default\n"
            "      10G) across restarts; --cache-host-mem SIZE adds a host-RAM tier.\n"
            "  tokenize [-m MODEL]   text on stdin -> JSON array of token ids\n"
            "  cache stats|clear --cache-dir DIR [-m MODEL]\n"
            "      the disk tier's stores (every model's, or MODEL's): blocks, bytes, and the bad\n"
            "      and expired records found (and deleted) by verifying them; clear deletes them\n"
            "  serve [options]       OpenAI/Anthropic-compatible HTTP server (pcache serve --help)\n"
            "  route --replica URL... [options]\n"
            "                        cache-aware router in front of serve replicas (pcache route --help)\n");
}

typedef struct {
    const char *model;
    int n_predict;
    sample_params sp;
    bool chat, ignore_eos, no_cache, quiet;
    const char *system;
    int threads;
    size_t kv_mem;
    const char *cache_dir;
    size_t cache_disk, cache_host;
    const char *device;   /* cpu, cuda, auto (NULL) */
    double ttl;
    const char *prompt, *prompt_file, *prompts_file;
    const char *stop[8];
    int n_stop;
} run_opts;

static int need(int i, int argc, const char *flag) {
    if (i + 1 >= argc) { fprintf(stderr, "pcache: %s needs a value\n", flag); return -1; }
    return 0;
}

static int parse_num(const char *s, double lo, double hi, double *out, const char *flag) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "pcache: bad value for %s: '%s' (expected %g..%g)\n", flag, s, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_run_opts(int argc, char **argv, run_opts *o) {
    memset(o, 0, sizeof *o);
    o->model = default_model_path();
    o->n_predict = 256;
    sample_params_default(&o->sp);
    o->threads = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        double v;
#define NUM(flag, lo, hi) (need(i, argc, flag) || parse_num(argv[++i], lo, hi, &v, flag))
        if (!strcmp(a, "-m") || !strcmp(a, "--model")) { if (need(i, argc, a)) return -1; o->model = argv[++i]; }
        else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) { if (NUM(a, -1, 1e9)) return -1; o->n_predict = (int)v; }
        else if (!strcmp(a, "--temp")) { if (NUM(a, 0, 100)) return -1; o->sp.temperature = (float)v; }
        else if (!strcmp(a, "--top-k")) { if (NUM(a, 0, 1e9)) return -1; o->sp.top_k = (int)v; }
        else if (!strcmp(a, "--top-p")) { if (NUM(a, 0, 1)) return -1; o->sp.top_p = (float)v; }
        else if (!strcmp(a, "--min-p")) { if (NUM(a, 0, 1)) return -1; o->sp.min_p = (float)v; }
        else if (!strcmp(a, "--seed")) { if (NUM(a, 0, 1.8e19)) return -1; o->sp.seed = (uint64_t)v; }
        else if (!strcmp(a, "--repeat-penalty")) { if (NUM(a, 0, 10)) return -1; o->sp.repeat_penalty = (float)v; }
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) { if (NUM(a, 1, 1024)) return -1; o->threads = (int)v; }
        else if (!strcmp(a, "--chat")) o->chat = true;
        else if (!strcmp(a, "--system")) { if (need(i, argc, a)) return -1; o->system = argv[++i]; o->chat = true; }
        else if (!strcmp(a, "--ignore-eos")) o->ignore_eos = true;
        else if (!strcmp(a, "--no-cache")) o->no_cache = true;
        else if (!strcmp(a, "--device")) {
            if (need(i, argc, a)) return -1;
            o->device = argv[++i];
            if (strcmp(o->device, "cpu") && strcmp(o->device, "cuda") && strcmp(o->device, "auto")) {
                fprintf(stderr, "pcache: bad --device '%s' (cpu, cuda or auto)\n", o->device);
                return -1;
            }
        }
        else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) o->quiet = true;
        else if (!strcmp(a, "--kv-mem")) {
            if (need(i, argc, a)) return -1;
            if (parse_size(argv[++i], &o->kv_mem)) { fprintf(stderr, "pcache: bad --kv-mem '%s'\n", argv[i]); return -1; }
        } else if (!strcmp(a, "--cache-dir")) {
            if (need(i, argc, a)) return -1;
            o->cache_dir = argv[++i];
        } else if (!strcmp(a, "--cache-disk") || !strcmp(a, "--cache-host-mem")) {
            if (need(i, argc, a)) return -1;
            size_t *dst = a[8] == 'd' ? &o->cache_disk : &o->cache_host;
            if (parse_size(argv[++i], dst) || !*dst) { fprintf(stderr, "pcache: bad %s '%s'\n", a, argv[i]); return -1; }
        } else if (!strcmp(a, "--cache-ttl")) {
            if (need(i, argc, a)) return -1;
            if (parse_duration(argv[++i], &o->ttl)) { fprintf(stderr, "pcache: bad --cache-ttl '%s'\n", argv[i]); return -1; }
        } else if (!strcmp(a, "-f") || !strcmp(a, "--file")) { if (need(i, argc, a)) return -1; o->prompt_file = argv[++i]; }
        else if (!strcmp(a, "--prompts")) { if (need(i, argc, a)) return -1; o->prompts_file = argv[++i]; }
        else if (!strcmp(a, "--stop")) {
            if (need(i, argc, a)) return -1;
            if (o->n_stop == 8) { fprintf(stderr, "pcache: at most 8 --stop strings\n"); return -1; }
            o->stop[o->n_stop++] = argv[++i];
        }
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); exit(0); }
        else if (a[0] == '-' && a[1]) { fprintf(stderr, "pcache: unknown option '%s'\n", a); return -1; }
        else if (!o->prompt) o->prompt = a;
        else { fprintf(stderr, "pcache: more than one prompt given (quote it)\n"); return -1; }
#undef NUM
    }
    return 0;
}

/* ---- one request through the engine ---- */

typedef struct {
    bool done;
    finish_reason why;
    engine_usage u;
    char err[256];
    bool echo;                 /* stream text to stdout */
    char *text;                /* collected text */
    size_t n_text, cap_text;
} run_state;

static void on_text(void *user, const char *t, size_t n) {
    run_state *st = user;
    if (st->echo) { fwrite(t, 1, n, stdout); fflush(stdout); }
    if (st->n_text + n + 1 > st->cap_text) {
        size_t cap = (st->n_text + n + 1) * 2;
        char *p = realloc(st->text, cap);
        if (!p) return;
        st->text = p;
        st->cap_text = cap;
    }
    memcpy(st->text + st->n_text, t, n);
    st->n_text += n;
    st->text[st->n_text] = 0;
}

static void on_done(void *user, finish_reason why, const engine_usage *u, const char *err) {
    run_state *st = user;
    st->done = true;
    st->why = why;
    st->u = *u;
    if (err) snprintf(st->err, sizeof st->err, "%s", err);
}

static char *render_prompt(engine *e, const run_opts *o, const char *text) {
    if (!o->chat) return strdup(text);
    const gguf_file *f = engine_gguf(e);
    chat_tmpl t = chat_template_detect(f, engine_tok(e));
    chat_msg msgs[2];
    int n = 0;
    if (o->system) msgs[n++] = (chat_msg){ .role = "system", .content = o->system };
    msgs[n++] = (chat_msg){ .role = "user", .content = text };
    return chat_apply(t, f, msgs, n, true);
}

static int run_one(engine *e, const run_opts *o, const char *prompt, bool echo, run_state *st) {
    char err[256];
    int32_t *ids = NULL;
    const tokenizer *tok = engine_tok(e);
    int n = tokenizer_encode(tok, prompt, strlen(prompt), tokenizer_add_bos(tok), true, &ids, err, sizeof err);
    if (n < 0) { fprintf(stderr, "pcache: %s\n", err); return -1; }
    if (n == 0) { fprintf(stderr, "pcache: the prompt is empty\n"); free(ids); return -1; }
    memset(st, 0, sizeof *st);
    st->echo = echo;
    engine_request r = { .prompt = ids, .n_prompt = n, .sp = o->sp, .max_tokens = o->n_predict,
                         .ignore_eos = o->ignore_eos, .no_cache = o->no_cache,
                         .stop = o->stop, .n_stop = o->n_stop,
                         .on_text = on_text, .on_done = on_done, .user = st };
    if (engine_submit(e, &r, err, sizeof err) < 0) { fprintf(stderr, "pcache: %s\n", err); free(ids); return -1; }
    free(ids);
    while (!st->done) engine_step(e);
    if (st->why == FINISH_ERROR) { fprintf(stderr, "pcache: %s\n", st->err); return -1; }
    return 0;
}

static int cmd_run(int argc, char **argv) {
    run_opts o;
    if (parse_run_opts(argc, argv, &o)) return 2;
    char *text = NULL;
    if (o.prompt_file) {
        text = read_file(o.prompt_file, NULL);
        if (!text) { fprintf(stderr, "pcache: cannot read %s: %s\n", o.prompt_file, strerror(errno)); return 1; }
    } else if (o.prompt) text = strdup(o.prompt);
    if (!text && !o.prompts_file) { usage(stderr); return 2; }
    engine_opts eo = { .model_path = o.model, .kv_mem_bytes = o.kv_mem, .cache_ttl_s = o.ttl,
                       .cache_enabled = !o.no_cache, .n_threads = o.threads, .device = o.device,
                       .cache_dir = o.cache_dir, .cache_disk_bytes = o.cache_disk, .cache_host_bytes = o.cache_host };
    engine *e;
    char err[512];
    if (engine_create(&e, &eo, err, sizeof err)) { fprintf(stderr, "pcache: %s\n", err); free(text); return 1; }
    int rc = 0;
    run_state st;
    if (text) {
        char *p = render_prompt(e, &o, text);
        if (!p || run_one(e, &o, p, true, &st)) rc = 1;
        else {
            printf("\n");
            int decode_tokens = st.u.completion_tokens > 0 ? st.u.completion_tokens - 1 : 0;
            int prefill_tokens = st.u.prompt_tokens - st.u.cached_tokens;
            double ps = st.u.ttft_s, ds = st.u.decode_s;
            fprintf(stderr,
                    "timings: prompt_tokens=%d cached_tokens=%d prefill_tokens=%d prefill_s=%.4f prefill_tps=%.1f "
                    "decode_tokens=%d decode_s=%.4f decode_tps=%.1f\n",
                    st.u.prompt_tokens, st.u.cached_tokens, prefill_tokens, ps, ps > 0 ? prefill_tokens / ps : 0.0,
                    decode_tokens, ds, ds > 0 ? decode_tokens / ds : 0.0);
        }
        free(p);
        free(st.text);
    }
    if (rc == 0 && o.prompts_file) {
        FILE *f = fopen(o.prompts_file, "r");
        if (!f) { fprintf(stderr, "pcache: cannot read %s: %s\n", o.prompts_file, strerror(errno)); rc = 1; }
        char *line = NULL;
        size_t cap = 0;
        ssize_t len;
        int idx = 0;
        while (f && (len = getline(&line, &cap, f)) > 0) {
            cJSON *j = cJSON_ParseWithLength(line, (size_t)len);
            char *prompt = NULL;
            if (cJSON_IsString(j)) prompt = render_prompt(e, &o, j->valuestring);
            else if (cJSON_IsObject(j) && cJSON_IsString(cJSON_GetObjectItem(j, "prompt")))
                prompt = render_prompt(e, &o, cJSON_GetObjectItem(j, "prompt")->valuestring);
            else if (cJSON_IsObject(j) && cJSON_IsArray(cJSON_GetObjectItem(j, "messages"))) {
                cJSON *ms = cJSON_GetObjectItem(j, "messages"), *m;
                int n = cJSON_GetArraySize(ms), k = 0;
                chat_msg *msgs = calloc((size_t)n + 1, sizeof *msgs);
                cJSON_ArrayForEach(m, ms) {
                    cJSON *role = cJSON_GetObjectItem(m, "role"), *content = cJSON_GetObjectItem(m, "content");
                    if (msgs && cJSON_IsString(role) && cJSON_IsString(content))
                        msgs[k++] = (chat_msg){ .role = role->valuestring, .content = content->valuestring };
                }
                if (msgs && k > 0)
                    prompt = chat_apply(chat_template_detect(engine_gguf(e), engine_tok(e)), engine_gguf(e), msgs, k, true);
                free(msgs);
            }
            if (!prompt) {
                fprintf(stderr, "pcache: %s line %d: expected a JSON string or {\"prompt\"|\"messages\"}\n", o.prompts_file, idx + 1);
                cJSON_Delete(j);
                idx++;
                rc = 1;
                continue;
            }
            if (run_one(e, &o, prompt, false, &st) == 0) {
                cJSON *r = cJSON_CreateObject();
                cJSON_AddNumberToObject(r, "index", idx);
                cJSON_AddNumberToObject(r, "prompt_tokens", st.u.prompt_tokens);
                cJSON_AddNumberToObject(r, "cached_tokens", st.u.cached_tokens);
                cJSON_AddNumberToObject(r, "ttft_ms", st.u.ttft_s * 1000.0);
                cJSON_AddNumberToObject(r, "completion_tokens", st.u.completion_tokens);
                cJSON_AddStringToObject(r, "text", st.text ? st.text : "");
                char *s = cJSON_PrintUnformatted(r);
                printf("%s\n", s);
                fflush(stdout);
                free(s);
                cJSON_Delete(r);
            } else rc = 1;
            free(st.text);
            free(prompt);
            cJSON_Delete(j);
            idx++;
        }
        free(line);
        if (f) fclose(f);
        engine_stats es;
        engine_get_stats(e, &es);
        fprintf(stderr,
                "cache: requests=%llu prompt_tokens=%llu cached_tokens=%llu lookups=%llu hits=%llu hit_rate=%.3f "
                "entries=%d evictions=%llu kv_blocks_used=%d kv_blocks_free=%d\n",
                (unsigned long long)es.requests, (unsigned long long)es.prompt_tokens,
                (unsigned long long)es.cached_tokens, (unsigned long long)es.cache_lookups,
                (unsigned long long)es.cache_hits, es.cache_lookups ? (double)es.cache_hits / es.cache_lookups : 0.0,
                es.cache_entries, (unsigned long long)es.evictions, es.kv_blocks_used, es.kv_blocks_free);
    }
    free(text);
    engine_free(e);
    return rc;
}

static int cmd_tokenize(int argc, char **argv) {
    const char *model = default_model_path();
    for (int i = 0; i < argc; i++) {
        if ((!strcmp(argv[i], "-m") || !strcmp(argv[i], "--model")) && i + 1 < argc) model = argv[++i];
        else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            printf("usage: pcache tokenize [-m MODEL] < text  (prints the token ids as a JSON array)\n");
            return 0;
        } else { fprintf(stderr, "pcache tokenize: unknown argument '%s'\n", argv[i]); return 2; }
    }
    char err[512];
    gguf_file *f;
    if (gguf_open(&f, model, err, sizeof err)) { fprintf(stderr, "pcache: %s\n", err); return 1; }
    tokenizer *t;
    if (tokenizer_load(&t, f, err, sizeof err)) { fprintf(stderr, "pcache: %s\n", err); gguf_close(f); return 1; }
    size_t len;
    char *text = read_stream(stdin, &len);
    int rc = 1;
    int32_t *ids = NULL;
    int n = text ? tokenizer_encode(t, text, len, tokenizer_add_bos(t), true, &ids, err, sizeof err) : -1;
    if (n >= 0) {
        putchar('[');
        for (int i = 0; i < n; i++) printf(i ? ", %d" : "%d", ids[i]);
        printf("]\n");
        rc = 0;
    } else fprintf(stderr, "pcache: %s\n", text ? err : "cannot read stdin");
    free(ids);
    free(text);
    tokenizer_free(t);
    gguf_close(f);
    return rc;
}

/* pcache cache stats|clear: every store directory under --cache-dir (<fp>-<layers>x<kvdim>-v1),
 * or the one(s) of -m MODEL's fingerprint. stats only reads (kvdisk_scan verifies every record
 * and counts bad, expired and temporary files, deleting nothing: a running server may be
 * writing there, and its temporaries are its writes in progress; -m hashes the model without
 * writing the fingerprint sidecar). clear opens each store as a server does at start (deleting
 * bad, expired and temporary files) and deletes every record. */
static int cmd_cache(int argc, char **argv) {
    const char *dir = NULL, *model = NULL, *what = argc > 0 ? argv[0] : "";
    if (strcmp(what, "stats") && strcmp(what, "clear")) {
        fprintf(stderr, "usage: pcache cache stats|clear --cache-dir DIR [-m MODEL]\n");
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--cache-dir") && i + 1 < argc) dir = argv[++i];
        else if ((!strcmp(argv[i], "-m") || !strcmp(argv[i], "--model")) && i + 1 < argc) model = argv[++i];
        else { fprintf(stderr, "pcache cache: unknown argument '%s'\n", argv[i]); return 2; }
    }
    if (!dir) { fprintf(stderr, "pcache cache: --cache-dir DIR is required\n"); return 2; }
    struct stat sb;
    if (stat(dir, &sb)) { fprintf(stderr, "pcache cache: --cache-dir %s: %s\n", dir, strerror(errno)); return 1; }
    if (!S_ISDIR(sb.st_mode)) { fprintf(stderr, "pcache cache: --cache-dir %s: not a directory\n", dir); return 1; }
    char err[512];
    uint64_t want = 0;
    bool stats = !strcmp(what, "stats");
    if (model && fingerprint_file(model, stats || access(dir, W_OK) ? NULL : dir, &want, NULL, err, sizeof err)) {
        fprintf(stderr, "pcache cache: %s\n", err);
        return 1;
    }
    DIR *dh = opendir(dir);
    if (!dh) { fprintf(stderr, "pcache cache: --cache-dir %s: %s\n", dir, strerror(errno)); return 1; }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    double now = (double)ts.tv_sec + ts.tv_nsec * 1e-9;
    struct dirent *de;
    int rc = 0, n_stores = 0;
    uint64_t tot_blocks = 0, tot_bytes = 0;
    while ((de = readdir(dh))) {
        unsigned long long fp;
        unsigned nl, kd, ver;
        int used = 0;
        if (sscanf(de->d_name, "%16llx-%ux%u-v%u%n", &fp, &nl, &kd, &ver, &used) != 4 || de->d_name[used] || ver != KVFILE_VERSION)
            continue;
        if (model && fp != want) continue;
        if (stats) {
            kvdisk_stats st;
            if (kvdisk_scan(dir, fp, nl, kd, now, &st, err, sizeof err)) {
                fprintf(stderr, "pcache cache: %s\n", err);
                rc = 1;
                continue;
            }
            n_stores++;
            printf("%s/%s: model_fp=%016llx layers=%u kv_dim=%u blocks=%llu bytes=%llu bad_files=%llu expired=%llu "
                   "temporaries=%llu\n", dir, de->d_name, fp, nl, kd, (unsigned long long)st.blocks,
                   (unsigned long long)st.bytes, (unsigned long long)st.bad_files, (unsigned long long)st.expired,
                   (unsigned long long)st.temporaries);
            tot_blocks += st.blocks;
            tot_bytes += st.bytes;
            continue;
        }
        kvdisk *d;
        if (kvdisk_open(&d, dir, fp, nl, kd, UINT64_MAX, now, err, sizeof err)) {
            fprintf(stderr, "pcache cache: %s\n", err);
            rc = 1;
            continue;
        }
        kvdisk_stats st;
        kvdisk_get_stats(d, &st);
        n_stores++;
        int n = kvdisk_clear(d);
        printf("%s: cleared %d blocks (%llu bytes); bad_files=%llu expired=%llu temporaries=%llu\n", kvdisk_path(d), n,
               (unsigned long long)st.bytes, (unsigned long long)st.bad_files, (unsigned long long)st.expired,
               (unsigned long long)st.temporaries);
        char p[4096];
        snprintf(p, sizeof p, "%s", kvdisk_path(d));
        kvdisk_close(d);
        rmdir(p);
    }
    closedir(dh);
    if (stats)
        printf("total: stores=%d blocks=%llu bytes=%llu\n", n_stores, (unsigned long long)tot_blocks, (unsigned long long)tot_bytes);
    else if (!n_stores) printf("nothing to clear under %s\n", dir);
    return rc;
}

int main(int argc, char **argv) {
    if (argc < 2) { usage(stderr); return 2; }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "run")) return cmd_run(argc - 2, argv + 2);
    if (!strcmp(cmd, "tokenize")) return cmd_tokenize(argc - 2, argv + 2);
    if (!strcmp(cmd, "serve")) return server_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "route")) return router_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "cache")) return cmd_cache(argc - 2, argv + 2);
    if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) { usage(stdout); return 0; }
    fprintf(stderr, "pcache: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
