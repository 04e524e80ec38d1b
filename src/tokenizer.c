/* tokenizer: text <-> token ids from a GGUF file's tokenizer.ggml.* metadata.
 *
 * Design. Everything the tokenizer needs is copied out of the GGUF at load time into one arena
 * (token text, decoded token bytes), one open-addressing hash from token text to id, and (for
 * byte-level BPE) one open-addressing hash from a pair of ids to (merge rank, merged id). The
 * tokenizer is immutable after load, so one instance may be shared by many threads; every
 * encode call keeps its scratch state on its own.
 *
 * Encoding follows Hugging Face `tokenizers` as built by transformers' GGUF converter, which is
 * our reference (the tests compare ids with it):
 *   1. Input bytes are made valid UTF-8 the way Python's bytes.decode("utf-8", "replace") does
 *      (each maximal invalid subpart becomes U+FFFD), so the regex engine only sees valid text.
 *   2. Special tokens (control, type 3, only when parse_special; user-defined, type 4, always)
 *      are cut out first, leftmost-longest, as HF's added-vocabulary does.
 *   3. Byte-level BPE ("gpt2"): each remaining fragment is split by a sequence of PCRE2 regexes
 *      (UTF + UCP, JIT when available) chosen by tokenizer.ggml.pre, with HF's "Isolated"
 *      behaviour: matches and the gaps between them both become pieces, and each stage's regex
 *      runs on each piece of the previous stage as its own subject (so lookaheads stop at the
 *      piece's end). Each piece's bytes are then merged by rank with a binary heap over a
 *      linked list of symbols: O(n log n), so a 100k-space piece is no problem. Ties on rank go
 *      to the leftmost pair, as in HF's BPE::merge_all.
 *   4. SentencePiece BPE ("llama"): spaces become U+2581, U+2581 is prepended to the fragment
 *      that starts the text (HF's Metaspace prepend_scheme "first") when add_space_prefix, the
 *      fragment is split into UTF-8 characters and adjacent symbols whose concatenation is in
 *      the vocabulary merge best-score-first (leftmost on ties); characters outside the vocab
 *      become <0xXX> byte tokens (byte fallback) and never merge.
 * Trade-offs: no cache of pre-token results (simple, and BPE on short pieces is cheap); the
 * special-token scan is a first-byte bucketed linear scan, fine for the few hundred special
 * tokens real vocabularies have.
 *
 * Decoding: tokenizer_piece gives a token's raw bytes (byte-level chars mapped back to bytes,
 * U+2581 to space, <0xXX> to the byte). The streaming detokenizer holds back an incomplete UTF-8
 * tail between calls so callers only ever see whole characters; invalid bytes become U+FFFD.
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer.h"
#include "util.h"
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { KIND_BPE = 1, KIND_SPM = 2 };
enum { TT_NORMAL = 1, TT_UNKNOWN = 2, TT_CONTROL = 3, TT_USER = 4, TT_UNUSED = 5, TT_BYTE = 6 };
#define MAX_RE 2
#define MAX_EOG 16

typedef struct { uint32_t off, len; } span;

struct tokenizer {
    int kind;
    int n_vocab;
    char *arena;            /* all token texts and pieces, each NUL-terminated */
    size_t arena_len, arena_cap;
    span *text;             /* token text as stored in the GGUF */
    span *piece;            /* decoded bytes */
    uint8_t *type;
    float *scores;          /* SPM only (NULL otherwise) */
    /* text -> id */
    int32_t *vmap;
    uint32_t vmap_mask;
    /* BPE merges: (left id, right id) -> rank, merged id */
    uint64_t *mkey;
    int32_t *mrank, *mres;
    uint32_t mmask;
    int32_t byte_tok[256];  /* BPE: single-byte token; SPM: <0xXX> token; -1 if none */
    pcre2_code *re[MAX_RE];
    int n_re;
    /* special tokens matched in text, bucketed by first byte, longest first in each bucket */
    int32_t *special;
    int n_special;
    int bucket_start[257];
    int32_t bos, eos, eot, unk;
    bool add_bos, add_space_prefix;
    int32_t eog[MAX_EOG];
    int n_eog;
};

/* ---------- small utilities ---------- */

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) { h ^= (uint8_t)s[i]; h *= 1099511628211ull; }
    return h ^ (h >> 29);
}

static uint64_t hash_u64(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull; x ^= x >> 33;
    return x;
}

static int utf8_len_lead(uint8_t c) {
    if (c < 0x80) return 1;
    if ((c & 0xE0) == 0xC0) return 2;
    if ((c & 0xF0) == 0xE0) return 3;
    if ((c & 0xF8) == 0xF0) return 4;
    return 1;
}

static int utf8_put(uint32_t cp, char *o) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xC0 | (cp >> 6)); o[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12)); o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F)); return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18)); o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); o[3] = (char)(0x80 | (cp & 0x3F)); return 4;
}

/* Length of the valid UTF-8 sequence at s (n bytes available): >0 valid length; otherwise
 * -k where k >= 1 is the length of the maximal invalid subpart (what Python's "replace" turns
 * into one U+FFFD). *incomplete is set when the sequence is a valid prefix cut by the end. */
static int utf8_check(const uint8_t *s, size_t n, bool *incomplete) {
    *incomplete = false;
    uint8_t c = s[0];
    if (c < 0x80) return 1;
    int need;
    uint8_t lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c == 0xE0) { need = 2; lo = 0xA0; }
    else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) need = 2;
    else if (c == 0xED) { need = 2; hi = 0x9F; }
    else if (c == 0xF0) { need = 3; lo = 0x90; }
    else if (c >= 0xF1 && c <= 0xF3) need = 3;
    else if (c == 0xF4) { need = 3; hi = 0x8F; }
    else return -1;
    for (int i = 1; i <= need; i++) {
        if ((size_t)i >= n) { *incomplete = true; return -i; }
        uint8_t b = s[i];
        if (i == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) return -i;
    }
    return need + 1;
}

/* Valid UTF-8 copy of s with invalid subparts replaced by U+FFFD; *outlen set. */
static char *utf8_sanitize(const char *s, size_t n, size_t *outlen) {
    char *o = malloc(n * 3 + 1);
    if (!o) return NULL;
    size_t j = 0;
    for (size_t i = 0; i < n;) {
        bool inc;
        int k = utf8_check((const uint8_t *)s + i, n - i, &inc);
        if (k > 0) { memcpy(o + j, s + i, (size_t)k); j += (size_t)k; i += (size_t)k; }
        else { j += (size_t)utf8_put(0xFFFD, o + j); i += (size_t)(-k); }
    }
    o[j] = 0;
    *outlen = j;
    return o;
}

/* GPT-2 bytes_to_unicode: byte -> code point, and its inverse for code points < 324. */
static void byte_unicode_tables(uint32_t b2u[256], int16_t u2b[324]) {
    for (int i = 0; i < 324; i++) u2b[i] = -1;
    int n = 0;
    for (int b = 0; b < 256; b++) {
        bool keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        b2u[b] = keep ? (uint32_t)b : (uint32_t)(256 + n++);
        u2b[b2u[b]] = (int16_t)b;
    }
}

/* ---------- load ---------- */

static int arena_add(tokenizer *t, const char *s, size_t n, span *out) {
    if (t->arena_len + n + 1 > t->arena_cap) {
        size_t cap = t->arena_cap ? t->arena_cap : 1 << 16;
        while (t->arena_len + n + 1 > cap) cap *= 2;
        char *a = realloc(t->arena, cap);
        if (!a) return -1;
        t->arena = a;
        t->arena_cap = cap;
    }
    memcpy(t->arena + t->arena_len, s, n);
    t->arena[t->arena_len + n] = 0;
    out->off = (uint32_t)t->arena_len;
    out->len = (uint32_t)n;
    t->arena_len += n + 1;
    return 0;
}

static int32_t vmap_find(const tokenizer *t, const char *s, size_t n) {
    if (!t->vmap) return -1;
    for (uint32_t i = (uint32_t)hash_bytes(s, n) & t->vmap_mask;; i = (i + 1) & t->vmap_mask) {
        int32_t id = t->vmap[i];
        if (id < 0) return -1;
        if (t->text[id].len == n && memcmp(t->arena + t->text[id].off, s, n) == 0) return id;
    }
}

static int32_t merge_find(const tokenizer *t, int32_t a, int32_t b, int32_t *res) {
    if (!t->mkey) return -1;
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    for (uint32_t i = (uint32_t)hash_u64(key) & t->mmask;; i = (i + 1) & t->mmask) {
        if (t->mrank[i] < 0) return -1;
        if (t->mkey[i] == key) { *res = t->mres[i]; return t->mrank[i]; }
    }
}

static int32_t get_id(const gguf_file *f, const char *key, int32_t n_vocab) {
    uint32_t v;
    if (gguf_get_u32(f, key, &v) != GGUF_OK || (int64_t)v >= n_vocab) return -1;
    return (int32_t)v;
}

static bool get_bool_default(const gguf_file *f, const char *key, bool dflt) {
    bool b;
    return gguf_get_bool(f, key, &b) == GGUF_OK ? b : dflt;
}

static const char *RE_GPT2 =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char *RE_LLAMA3 =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char *RE_QWEN2 =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char *RE_DIGIT = "\\p{N}";

static int compile_re(tokenizer *t, const char *pat, char *err, size_t errlen) {
    int ec;
    PCRE2_SIZE eo;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP,
                                   &ec, &eo, NULL);
    if (!re) {
        PCRE2_UCHAR msg[128];
        pcre2_get_error_message(ec, msg, sizeof msg);
        errf(err, errlen, "tokenizer: regex compile failed at %zu: %s", (size_t)eo, (char *)msg);
        return -1;
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* best effort: falls back to the interpreter */
    t->re[t->n_re++] = re;
    return 0;
}

static int cmp_special(const void *a, const void *b, void *ctx) {
    const tokenizer *t = ctx;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    uint8_t fx = (uint8_t)t->arena[t->text[x].off], fy = (uint8_t)t->arena[t->text[y].off];
    if (fx != fy) return fx < fy ? -1 : 1;
    if (t->text[x].len != t->text[y].len) return t->text[x].len > t->text[y].len ? -1 : 1;
    return x < y ? -1 : x > y;
}

int tokenizer_load(tokenizer **out, const gguf_file *f, char *err, size_t errlen) {
    *out = NULL;
    gguf_str model;
    if (gguf_get_str(f, "tokenizer.ggml.model", &model) != GGUF_OK) {
        errf(err, errlen, "tokenizer: missing tokenizer.ggml.model");
        return -1;
    }
    int kind = gguf_str_eq(model, "gpt2") ? KIND_BPE : gguf_str_eq(model, "llama") ? KIND_SPM : 0;
    if (!kind) {
        errf(err, errlen, "tokenizer: unsupported tokenizer model '%.*s'", (int)(model.len > 64 ? 64 : model.len),
               model.ptr);
        return -1;
    }
    const gguf_kv *kt = gguf_get_kv(f, "tokenizer.ggml.tokens");
    if (!kt || kt->type != GGUF_TYPE_ARRAY || kt->arr_type != GGUF_TYPE_STRING || !kt->strs ||
        kt->arr_n == 0 || kt->arr_n > (1u << 24)) {
        errf(err, errlen, "tokenizer: missing or bad tokenizer.ggml.tokens");
        return -1;
    }
    int n = (int)kt->arr_n;
    tokenizer *t = calloc(1, sizeof *t);
    if (!t) goto oom;
    t->kind = kind;
    t->n_vocab = n;
    t->text = calloc((size_t)n, sizeof *t->text);
    t->piece = calloc((size_t)n, sizeof *t->piece);
    t->type = malloc((size_t)n);
    if (!t->text || !t->piece || !t->type) goto oom;

    /* token types (default normal) and scores */
    memset(t->type, TT_NORMAL, (size_t)n);
    const gguf_kv *ktt = gguf_get_kv(f, "tokenizer.ggml.token_type");
    if (ktt && ktt->type == GGUF_TYPE_ARRAY && ktt->arr_n == (uint64_t)n &&
        (ktt->arr_type == GGUF_TYPE_INT32 || ktt->arr_type == GGUF_TYPE_UINT32)) {
        for (int i = 0; i < n; i++) {
            int32_t v;
            memcpy(&v, ktt->data + 4 * (size_t)i, 4);
            t->type[i] = (v >= 1 && v <= 6) ? (uint8_t)v : TT_NORMAL;
        }
    }
    if (kind == KIND_SPM) {
        t->scores = calloc((size_t)n, sizeof(float));
        if (!t->scores) goto oom;
        const gguf_kv *ks = gguf_get_kv(f, "tokenizer.ggml.scores");
        if (ks && ks->type == GGUF_TYPE_ARRAY && ks->arr_type == GGUF_TYPE_FLOAT32 && ks->arr_n == (uint64_t)n)
            memcpy(t->scores, ks->data, (size_t)n * sizeof(float));
    }

    /* texts, pieces, text->id map */
    uint32_t b2u[256];
    int16_t u2b[324];
    byte_unicode_tables(b2u, u2b);
    char *tmp = NULL;
    size_t tmp_cap = 0;
    uint32_t cap = 1;
    while (cap < (uint32_t)n * 2) cap <<= 1;
    t->vmap = malloc(cap * sizeof(int32_t));
    if (!t->vmap) goto oom;
    memset(t->vmap, 0xff, cap * sizeof(int32_t));
    t->vmap_mask = cap - 1;
    bool *byte_ok = calloc((size_t)n, 1); /* BPE: text is entirely in the byte alphabet */
    if (!byte_ok) goto oom;
    for (int i = 0; i < n; i++) {
        gguf_str s = kt->strs[i];
        if (s.len > (1u << 20)) { free(byte_ok); free(tmp); errf(err, errlen, "tokenizer: token %d too long", i); tokenizer_free(t); return -1; }
        if (arena_add(t, s.ptr ? s.ptr : "", s.ptr ? s.len : 0, &t->text[i])) { free(byte_ok); free(tmp); goto oom; }
        if (tmp_cap < s.len + 8) {
            tmp_cap = s.len * 2 + 8;
            char *nt = realloc(tmp, tmp_cap);
            if (!nt) { free(byte_ok); free(tmp); goto oom; }
            tmp = nt;
        }
        const char *tx = t->arena + t->text[i].off;
        size_t tl = t->text[i].len, pl = 0;
        int ty = t->type[i];
        if (kind == KIND_BPE) {
            /* byte-level: map each char back to its byte; a text outside the alphabet is kept raw */
            bool ok = true;
            for (size_t k = 0; k < tl;) {
                bool inc;
                int cl = utf8_check((const uint8_t *)tx + k, tl - k, &inc);
                if (cl <= 0) { ok = false; break; }
                uint32_t cp = (uint8_t)tx[k];
                if (cl == 2) cp = ((cp & 0x1F) << 6) | ((uint8_t)tx[k + 1] & 0x3F);
                else if (cl > 2) { ok = false; break; }
                if (cp >= 324 || u2b[cp] < 0) { ok = false; break; }
                tmp[pl++] = (char)u2b[cp];
                k += (size_t)cl;
            }
            byte_ok[i] = ok;
            if (!ok || ty == TT_USER || ty == TT_CONTROL) { memcpy(tmp, tx, tl); pl = tl; }
        } else {
            unsigned bv;
            if (ty == TT_BYTE && tl == 6 && sscanf(tx, "<0x%2X>", &bv) == 1) { tmp[0] = (char)bv; pl = 1; }
            else {
                for (size_t k = 0; k < tl;) {
                    if (k + 3 <= tl && memcmp(tx + k, "\xE2\x96\x81", 3) == 0) { tmp[pl++] = ' '; k += 3; }
                    else tmp[pl++] = tx[k++];
                }
            }
        }
        if (arena_add(t, tmp, pl, &t->piece[i])) { free(byte_ok); free(tmp); goto oom; }
        /* insert, last duplicate wins (as a Python dict built from the token list) */
        uint32_t h = (uint32_t)hash_bytes(t->arena + t->text[i].off, tl) & t->vmap_mask;
        for (;; h = (h + 1) & t->vmap_mask) {
            int32_t o = t->vmap[h];
            if (o < 0) { t->vmap[h] = i; break; }
            if (t->text[o].len == tl && memcmp(t->arena + t->text[o].off, t->arena + t->text[i].off, tl) == 0) {
                t->vmap[h] = i;
                break;
            }
        }
    }
    free(tmp);

    /* byte tokens */
    for (int b = 0; b < 256; b++) {
        char buf[8];
        int l;
        if (kind == KIND_BPE) l = utf8_put(b2u[b], buf);
        else l = snprintf(buf, sizeof buf, "<0x%02X>", b);
        t->byte_tok[b] = vmap_find(t, buf, (size_t)l);
    }

    /* merges */
    if (kind == KIND_BPE) {
        const gguf_kv *km = gguf_get_kv(f, "tokenizer.ggml.merges");
        if (km && km->type == GGUF_TYPE_ARRAY && km->arr_type == GGUF_TYPE_STRING && km->strs && km->arr_n < (1u << 24)) {
            uint32_t mc = 1;
            while (mc < km->arr_n * 2 + 2) mc <<= 1;
            t->mkey = malloc(mc * sizeof(uint64_t));
            t->mrank = malloc(mc * sizeof(int32_t));
            t->mres = malloc(mc * sizeof(int32_t));
            if (!t->mkey || !t->mrank || !t->mres) { free(byte_ok); goto oom; }
            memset(t->mrank, 0xff, mc * sizeof(int32_t));
            t->mmask = mc - 1;
            char *cat = NULL;
            size_t cat_cap = 0;
            for (uint64_t r = 0; r < km->arr_n; r++) {
                gguf_str m = km->strs[r];
                if (!m.ptr) continue;
                const char *sp = memchr(m.ptr, ' ', m.len);
                if (!sp) continue;
                size_t la = (size_t)(sp - m.ptr), lb = m.len - la - 1;
                int32_t a = vmap_find(t, m.ptr, la), b = vmap_find(t, sp + 1, lb);
                if (a < 0 || b < 0) continue;
                if (cat_cap < la + lb) {
                    cat_cap = (la + lb) * 2;
                    char *nc = realloc(cat, cat_cap);
                    if (!nc) { free(cat); free(byte_ok); goto oom; }
                    cat = nc;
                }
                memcpy(cat, m.ptr, la);
                memcpy(cat + la, sp + 1, lb);
                int32_t res = vmap_find(t, cat, la + lb);
                if (res < 0) continue;
                uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
                for (uint32_t h = (uint32_t)hash_u64(key) & t->mmask;; h = (h + 1) & t->mmask) {
                    if (t->mrank[h] < 0) { t->mkey[h] = key; t->mrank[h] = (int32_t)r; t->mres[h] = res; break; }
                    if (t->mkey[h] == key) break; /* first (lowest rank) wins */
                }
            }
            free(cat);
        }
        /* pre-tokenizer */
        gguf_str pre = { "default", 7 };
        gguf_get_str(f, "tokenizer.ggml.pre", &pre);
        int rc = 0;
        if (gguf_str_eq(pre, "smollm") || gguf_str_eq(pre, "starcoder") || gguf_str_eq(pre, "refact") ||
            gguf_str_eq(pre, "command-r")) {
            rc = compile_re(t, RE_DIGIT, err, errlen);
            if (!rc) rc = compile_re(t, RE_GPT2, err, errlen);
        } else if (gguf_str_eq(pre, "llama3") || gguf_str_eq(pre, "llama-bpe") || gguf_str_eq(pre, "llama-v3") ||
                   gguf_str_eq(pre, "smaug-bpe") || gguf_str_eq(pre, "dbrx") || gguf_str_eq(pre, "falcon3")) {
            rc = compile_re(t, RE_LLAMA3, err, errlen);
        } else if (gguf_str_eq(pre, "qwen2") || gguf_str_eq(pre, "deepseek-r1-qwen") || gguf_str_eq(pre, "megrez")) {
            rc = compile_re(t, RE_QWEN2, err, errlen);
        } else {
            rc = compile_re(t, RE_GPT2, err, errlen);
        }
        if (rc) { free(byte_ok); tokenizer_free(t); return -1; }
    }

    /* special tokens: control (HF skips byte-level ones outside the byte alphabet) and user-defined */
    t->special = malloc((size_t)n * sizeof(int32_t));
    if (!t->special) { free(byte_ok); goto oom; }
    for (int i = 0; i < n; i++) {
        if (t->text[i].len == 0) continue;
        if (t->type[i] == TT_CONTROL && (kind != KIND_BPE || byte_ok[i])) t->special[t->n_special++] = i;
        else if (t->type[i] == TT_USER) t->special[t->n_special++] = i;
    }
    free(byte_ok);
    qsort_r(t->special, (size_t)t->n_special, sizeof(int32_t), cmp_special, t);
    for (int b = 0, k = 0; b <= 256; b++) {
        while (k < t->n_special && (uint8_t)t->arena[t->text[t->special[k]].off] < b) k++;
        t->bucket_start[b] = k;
    }

    /* ids and flags */
    t->bos = get_id(f, "tokenizer.ggml.bos_token_id", n);
    t->eos = get_id(f, "tokenizer.ggml.eos_token_id", n);
    t->eot = get_id(f, "tokenizer.ggml.eot_token_id", n);
    t->unk = get_id(f, "tokenizer.ggml.unknown_token_id", n);
    t->add_bos = get_bool_default(f, "tokenizer.ggml.add_bos_token", kind == KIND_SPM);
    t->add_space_prefix = get_bool_default(f, "tokenizer.ggml.add_space_prefix", true);
    if (t->eos >= 0) t->eog[t->n_eog++] = t->eos;
    if (t->eot >= 0 && t->eot != t->eos) t->eog[t->n_eog++] = t->eot;
    static const char *const eog_names[] = { "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>", "<end_of_turn>",
                                             "<|end|>", "<|end_of_text|>", "<|eom_id|>" };
    for (size_t k = 0; k < sizeof eog_names / sizeof *eog_names && t->n_eog < MAX_EOG; k++) {
        int32_t id = vmap_find(t, eog_names[k], strlen(eog_names[k]));
        bool dup = false;
        for (int j = 0; j < t->n_eog; j++) dup |= t->eog[j] == id;
        if (id >= 0 && !dup) t->eog[t->n_eog++] = id;
    }
    *out = t;
    return 0;
oom:
    errf(err, errlen, "tokenizer: out of memory");
    tokenizer_free(t);
    return -1;
}

void tokenizer_free(tokenizer *t) {
    if (!t) return;
    for (int i = 0; i < t->n_re; i++) pcre2_code_free(t->re[i]);
    free(t->arena); free(t->text); free(t->piece); free(t->type); free(t->scores);
    free(t->vmap); free(t->mkey); free(t->mrank); free(t->mres); free(t->special);
    free(t);
}

/* ---------- encode ---------- */

typedef struct { int32_t id; int prev, next; uint32_t start, len; } symbol;
typedef struct { double prio; int left, right; int32_t lid, rid, res; } cand;

/* A BPE piece's ids, remembered for the rest of one encode call: a long text repeats its words,
 * and a piece's ids depend on its bytes alone. Pieces of up to PC_KEY bytes giving up to PC_IDS
 * ids; a direct-mapped table of PC_SLOTS, made once a call has merged PC_AFTER pieces (short
 * texts never pay for it). */
#define PC_SLOTS 2048
#define PC_KEY 22
#define PC_IDS 8
#define PC_AFTER 64
typedef struct { uint32_t h; uint8_t klen, nid; char key[PC_KEY]; int32_t ids[PC_IDS]; } piece_memo;

typedef struct {
    const tokenizer *t;
    int32_t *ids;
    size_t n, cap;
    symbol *sym;
    size_t sym_cap;
    cand *heap;
    size_t nheap, heap_cap;
    pcre2_match_data *md;
    piece_memo *memo;
    size_t pieces;
    bool oom;
} enc;

static void push_id(enc *e, int32_t id) {
    if (e->n == e->cap) {
        size_t c = e->cap ? e->cap * 2 : 64;
        int32_t *p = realloc(e->ids, c * sizeof *p);
        if (!p) { e->oom = true; return; }
        e->ids = p;
        e->cap = c;
    }
    e->ids[e->n++] = id;
}

static bool cand_less(const cand *a, const cand *b) {
    if (a->prio != b->prio) return a->prio < b->prio;
    return a->left < b->left;
}

static void heap_push(enc *e, cand c) {
    if (e->nheap == e->heap_cap) {
        size_t nc = e->heap_cap ? e->heap_cap * 2 : 64;
        cand *p = realloc(e->heap, nc * sizeof *p);
        if (!p) { e->oom = true; return; }
        e->heap = p;
        e->heap_cap = nc;
    }
    size_t i = e->nheap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!cand_less(&c, &e->heap[p])) break;
        e->heap[i] = e->heap[p];
        i = p;
    }
    e->heap[i] = c;
}

static cand heap_pop(enc *e) {
    cand top = e->heap[0], last = e->heap[--e->nheap];
    size_t i = 0, n = e->nheap;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const cand *best = &last;
        if (l < n && cand_less(&e->heap[l], best)) { m = l; best = &e->heap[l]; }
        if (r < n && cand_less(&e->heap[r], best)) { m = r; }
        if (m == i) break;
        e->heap[i] = e->heap[m];
        i = m;
    }
    if (n) e->heap[i] = last;
    return top;
}

/* Pushes the merge candidate for adjacent symbols l and r, if any. */
static void try_pair(enc *e, const char *text, int l, int r) {
    if (l < 0 || r < 0) return;
    const tokenizer *t = e->t;
    symbol *a = &e->sym[l], *b = &e->sym[r];
    if (a->id < 0 || b->id < 0) return;
    cand c = { 0, l, r, a->id, b->id, -1 };
    if (t->kind == KIND_BPE) {
        int32_t rank = merge_find(t, a->id, b->id, &c.res);
        if (rank < 0) return;
        c.prio = rank;
    } else {
        int32_t id = vmap_find(t, text + a->start, a->len + b->len);
        if (id < 0) return;
        c.res = id;
        c.prio = -(double)t->scores[id];
    }
    heap_push(e, c);
}

/* Merges the symbols e->sym[0..ns) (a linked list in order) and emits the result. */
static void merge_symbols(enc *e, const char *text, int ns) {
    e->nheap = 0;
    for (int i = 0; i + 1 < ns; i++) try_pair(e, text, i, i + 1);
    while (e->nheap && !e->oom) {
        cand c = heap_pop(e);
        symbol *a = &e->sym[c.left], *b = &e->sym[c.right];
        if (a->len == 0 || b->len == 0 || a->next != c.right || a->id != c.lid || b->id != c.rid) continue;
        a->id = c.res;
        a->len += b->len;
        a->next = b->next;
        if (b->next >= 0) e->sym[b->next].prev = c.left;
        b->len = 0;
        try_pair(e, text, a->prev, c.left);
        try_pair(e, text, c.left, a->next);
    }
    for (int i = 0; i >= 0 && ns > 0; i = e->sym[i].next) {
        symbol *s = &e->sym[i];
        if (s->id >= 0) push_id(e, s->id);
        else { /* SPM char outside the vocab: byte fallback, else unk */
            for (uint32_t k = 0; k < s->len; k++) {
                int32_t bt = e->t->byte_tok[(uint8_t)text[s->start + k]];
                if (bt >= 0) push_id(e, bt);
                else if (e->t->unk >= 0) { push_id(e, e->t->unk); break; }
            }
        }
    }
}

static bool ensure_sym(enc *e, size_t n) {
    if (n <= e->sym_cap) return true;
    size_t c = e->sym_cap ? e->sym_cap : 64;
    while (c < n) c *= 2;
    symbol *p = realloc(e->sym, c * sizeof *p);
    if (!p) { e->oom = true; return false; }
    e->sym = p;
    e->sym_cap = c;
    return true;
}

static void bpe_piece(enc *e, const char *s, size_t n) {
    if (n == 0) return;
    piece_memo *m = NULL;
    uint32_t h = 0;
    if (n <= PC_KEY) {
        if (!e->memo && ++e->pieces > PC_AFTER) e->memo = calloc(PC_SLOTS, sizeof *e->memo);   /* (NULL: no memo) */
        if (e->memo) {
            h = (uint32_t)hash_bytes(s, n);
            m = &e->memo[h % PC_SLOTS];
            if (m->klen == n && m->h == h && memcmp(m->key, s, n) == 0) {
                for (int i = 0; i < m->nid; i++) push_id(e, m->ids[i]);
                return;
            }
        }
    }
    if (!ensure_sym(e, n)) return;
    const size_t n0 = e->n;
    /* A byte with no token (SmolLM2 lacks e.g. 0x13, 0xC0, 0xFF) is dropped before merging, as
     * HF's BPE does when it has no unk token; its neighbours become adjacent. */
    int ns = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = e->t->byte_tok[(uint8_t)s[i]];
        if (id < 0) continue;
        e->sym[ns] = (symbol){ id, ns - 1, -1, (uint32_t)i, 1 };
        if (ns > 0) e->sym[ns - 1].next = ns;
        ns++;
    }
    merge_symbols(e, s, ns);
    if (m && !e->oom && e->n - n0 <= PC_IDS) {
        m->h = h;
        m->klen = (uint8_t)n;
        m->nid = (uint8_t)(e->n - n0);
        memcpy(m->key, s, n);
        memcpy(m->ids, e->ids + n0, (e->n - n0) * sizeof(int32_t));
    }
}

/* Splits s[0..n) with regex stage k (HF "Isolated": matches and gaps are pieces), recursing
 * into the next stage for each piece; after the last stage each piece is BPE-merged. */
static void pretokenize(enc *e, int k, const char *s, size_t n) {
    if (n == 0 || e->oom) return;
    if (k >= e->t->n_re) { bpe_piece(e, s, n); return; }
    size_t pos = 0, last = 0;
    while (pos < n) {
        int rc = pcre2_match(e->t->re[k], (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK, e->md, NULL);
        if (rc < 0) break; /* no match (or a matching error): the rest is one piece */
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
        size_t ms = ov[0], me = ov[1];
        if (ms > n || me > n || me < ms) break;
        if (me == ms) { /* empty match: step one character; it stays in the gap */
            pos = ms + (size_t)utf8_len_lead((uint8_t)s[ms]);
            continue;
        }
        if (ms > last) pretokenize(e, k + 1, s + last, ms - last);
        pretokenize(e, k + 1, s + ms, me - ms);
        last = pos = me;
    }
    if (last < n) pretokenize(e, k + 1, s + last, n - last);
}

/* SentencePiece fragment: spaces -> U+2581, optional U+2581 prefix, merge by score. */
static void spm_fragment(enc *e, const char *s, size_t n, bool at_start) {
    if (n == 0) return;
    size_t cap = n * 3 + 4, m = 0;
    char *b = malloc(cap);
    if (!b) { e->oom = true; return; }
    /* HF Metaspace: no prefix when the text already starts with a space (or U+2581) */
    if (at_start && e->t->add_space_prefix && s[0] != ' ' && !(n >= 3 && memcmp(s, "\xE2\x96\x81", 3) == 0)) { memcpy(b, "\xE2\x96\x81", 3); m = 3; }
    for (size_t i = 0; i < n; i++) {
        if (s[i] == ' ') { memcpy(b + m, "\xE2\x96\x81", 3); m += 3; }
        else b[m++] = s[i];
    }
    if (!ensure_sym(e, m)) { free(b); return; }
    int ns = 0;
    for (size_t i = 0; i < m;) {
        size_t cl = (size_t)utf8_len_lead((uint8_t)b[i]);
        if (i + cl > m) cl = m - i;
        e->sym[ns] = (symbol){ vmap_find(e->t, b + i, cl), ns - 1, -1, (uint32_t)i, (uint32_t)cl };
        if (ns > 0) e->sym[ns - 1].next = ns;
        ns++;
        i += cl;
    }
    merge_symbols(e, b, ns);
    free(b);
}

static void encode_fragment(enc *e, const char *s, size_t n, bool at_start) {
    if (e->t->kind == KIND_BPE) pretokenize(e, 0, s, n);
    else spm_fragment(e, s, n, at_start);
}

int tokenizer_encode(const tokenizer *t, const char *text, size_t len, bool add_bos, bool parse_special,
                     int32_t **out, char *err, size_t errlen) {
    *out = NULL;
    if (!t || (!text && len)) { errf(err, errlen, "tokenizer: bad arguments"); return -1; }
    if (len > (1u << 28)) { errf(err, errlen, "tokenizer: input too long (%zu bytes)", len); return -1; }
    size_t n;
    char *buf = utf8_sanitize(text ? text : "", len, &n);
    if (!buf) { errf(err, errlen, "tokenizer: out of memory"); return -1; }
    enc e = { .t = t };
    if (t->n_re > 0) {
        e.md = pcre2_match_data_create_from_pattern(t->re[0], NULL);
        if (!e.md) e.oom = true;
    }
    if (add_bos && t->bos >= 0) push_id(&e, t->bos);
    size_t frag = 0;
    for (size_t i = 0; i < n && !e.oom;) {
        uint8_t c = (uint8_t)buf[i];
        int32_t hit = -1;
        for (int k = t->bucket_start[c]; k < t->bucket_start[c + 1]; k++) {
            int32_t id = t->special[k];
            if (t->type[id] == TT_CONTROL && !parse_special) continue;
            span sp = t->text[id];
            if (sp.len <= n - i && memcmp(buf + i, t->arena + sp.off, sp.len) == 0) { hit = id; break; }
        }
        if (hit < 0) { i++; continue; }
        encode_fragment(&e, buf + frag, i - frag, frag == 0);
        push_id(&e, hit);
        i += t->text[hit].len;
        frag = i;
    }
    if (frag < n && !e.oom) encode_fragment(&e, buf + frag, n - frag, frag == 0);
    free(buf);
    free(e.sym);
    free(e.heap);
    free(e.memo);
    pcre2_match_data_free(e.md);
    if (e.oom) {
        free(e.ids);
        errf(err, errlen, "tokenizer: out of memory");
        return -1;
    }
    if (!e.ids) e.ids = malloc(sizeof(int32_t));
    if (!e.ids) { errf(err, errlen, "tokenizer: out of memory"); return -1; }
    *out = e.ids;
    return (int)e.n;
}

/* ---------- decode ---------- */

const char *tokenizer_piece(const tokenizer *t, int32_t id, bool render_special, size_t *len) {
    *len = 0;
    if (!t || id < 0 || id >= t->n_vocab) return "";
    int ty = t->type[id];
    if ((ty == TT_CONTROL || ty == TT_UNKNOWN || ty == TT_UNUSED) && !render_special) return "";
    *len = t->piece[id].len;
    return t->arena + t->piece[id].off;
}

int tokenizer_n_vocab(const tokenizer *t) { return t->n_vocab; }
int32_t tokenizer_bos(const tokenizer *t) { return t->bos; }
int32_t tokenizer_eos(const tokenizer *t) { return t->eos; }
bool tokenizer_add_bos(const tokenizer *t) { return t->add_bos; }

bool tokenizer_is_eog(const tokenizer *t, int32_t id) {
    for (int i = 0; i < t->n_eog; i++)
        if (t->eog[i] == id) return true;
    return false;
}

int32_t tokenizer_find(const tokenizer *t, const char *piece) {
    return piece ? vmap_find(t, piece, strlen(piece)) : -1;
}

/* Writes whole characters of in[0..n) to out; an incomplete valid tail (at most 3 bytes) goes
 * to st->pending when hold_tail, else becomes U+FFFD. Returns bytes written. */
static size_t emit_utf8(detok_state *st, const uint8_t *in, size_t n, char *out, size_t cap, bool hold_tail) {
    size_t w = 0;
    for (size_t i = 0; i < n;) {
        bool inc;
        int k = utf8_check(in + i, n - i, &inc);
        if (k > 0) {
            if (w + (size_t)k > cap) break;
            memcpy(out + w, in + i, (size_t)k);
            w += (size_t)k;
            i += (size_t)k;
        } else if (inc && hold_tail) {
            memcpy(st->pending, in + i, n - i);
            st->n_pending = (int)(n - i);
            break;
        } else {
            if (w + 3 > cap) break;
            w += (size_t)utf8_put(0xFFFD, out + w);
            i += (size_t)(-k);
        }
    }
    if (w < cap) out[w] = 0;
    return w;
}

size_t detok_feed(const tokenizer *t, detok_state *st, int32_t id, char *out, size_t cap) {
    size_t plen;
    const char *p = tokenizer_piece(t, id, false, &plen);
    int np = st->n_pending < 0 || st->n_pending > 4 ? 0 : st->n_pending;
    size_t n = (size_t)np + plen;
    uint8_t small[256];
    uint8_t *buf = n <= sizeof small ? small : malloc(n);
    if (!buf) return 0;
    memcpy(buf, st->pending, (size_t)np);
    memcpy(buf + np, p, plen);
    st->n_pending = 0;
    size_t w = emit_utf8(st, buf, n, out, cap, true);
    if (buf != small) free(buf);
    return w;
}

size_t detok_flush(detok_state *st, char *out, size_t cap) {
    int np = st->n_pending < 0 || st->n_pending > 4 ? 0 : st->n_pending;
    st->n_pending = 0;
    return emit_utf8(st, (const uint8_t *)st->pending, (size_t)np, out, cap, false);
}
