/* toolcall: tool-call formats, parser and grammar (see toolcall.h).
 *
 * The parser is a small state machine over the text not yet decided: outside a call it looks
 * for the opening marker and releases what precedes it (holding back a tail that may be the
 * marker's beginning); inside, it waits for the closing marker and then parses the JSON between
 * them. The grammar of the LAZY mode lets free text run in any way that does not contain the
 * opening marker (the rules are the states of the marker's KMP automaton), so the first marker
 * the model writes is where a constrained call begins: a "lazy" grammar without a trigger
 * mechanism in the engine.
 */
#include "toolcall.h"
#include "jsonschema.h"
#include "util.h"
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HERMES_OPEN "<tool_call>"
#define HERMES_CLOSE "</tool_call>"

/* ---------------------------------------------------------------- growable text */
typedef struct { char *p; size_t n, cap; bool oom; } tbuf;
static void tb_add(tbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t c = b->cap ? b->cap : 64;
        while (c < b->n + n + 1) c *= 2;
        char *q = realloc(b->p, c);
        if (!q) { b->oom = true; return; }
        b->p = q;
        b->cap = c;
    }
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}
static void tb_str(tbuf *b, const char *s) { tb_add(b, s, strlen(s)); }
static char *tb_take(tbuf *b) {
    tb_add(b, "", 0);
    if (b->oom) { free(b->p); return NULL; }
    return b->p;
}

/* ---------------------------------------------------------------- Python-style JSON */
static void py_string(tbuf *b, const char *s) {
    tb_add(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char esc[8];
        switch (*p) {
        case '"': tb_add(b, "\\\"", 2); break;
        case '\\': tb_add(b, "\\\\", 2); break;
        case '\n': tb_add(b, "\\n", 2); break;
        case '\r': tb_add(b, "\\r", 2); break;
        case '\t': tb_add(b, "\\t", 2); break;
        case '\b': tb_add(b, "\\b", 2); break;
        case '\f': tb_add(b, "\\f", 2); break;
        default:
            if (*p < 0x20) {
                snprintf(esc, sizeof esc, "\\u%04x", *p);
                tb_str(b, esc);
            } else {
                tb_add(b, (const char *)p, 1);
            }
        }
    }
    tb_add(b, "\"", 1);
}

static void py_number(tbuf *b, double d) {
    char s[40];
    if (!isfinite(d)) snprintf(s, sizeof s, d != d ? "NaN" : d > 0 ? "Infinity" : "-Infinity");
    else if (d == floor(d) && fabs(d) < 9007199254740992.0) snprintf(s, sizeof s, "%lld", (long long)d);
    else
        for (int prec = 1; prec <= 17; prec++) {
            snprintf(s, sizeof s, "%.*g", prec, d);
            if (strtod(s, NULL) == d) break;
        }
    tb_str(b, s);
}

static void py_indent(tbuf *b, int indent, int level) {
    tb_add(b, "\n", 1);
    for (int i = 0; i < indent * level; i++) tb_add(b, " ", 1);
}

static void py_value(tbuf *b, const cJSON *v, int indent, int level) {
    if (cJSON_IsString(v)) py_string(b, v->valuestring);
    else if (cJSON_IsNumber(v)) py_number(b, v->valuedouble);
    else if (cJSON_IsTrue(v)) tb_str(b, "true");
    else if (cJSON_IsFalse(v)) tb_str(b, "false");
    else if (cJSON_IsObject(v) || cJSON_IsArray(v)) {
        const bool obj = cJSON_IsObject(v);
        tb_add(b, obj ? "{" : "[", 1);
        const cJSON *x;
        bool first = true;
        cJSON_ArrayForEach(x, v) {
            if (!first) tb_str(b, indent >= 0 ? "," : ", ");
            if (indent >= 0) py_indent(b, indent, level + 1);
            first = false;
            if (obj) {
                py_string(b, x->string ? x->string : "");
                tb_str(b, ": ");
            }
            py_value(b, x, indent, level + 1);
        }
        if (!first && indent >= 0) py_indent(b, indent, level);
        tb_add(b, obj ? "}" : "]", 1);
    } else tb_str(b, "null");
}

char *toolcall_pyjson(const cJSON *v, int indent) {
    tbuf b = { 0 };
    py_value(&b, v, indent, 0);
    return tb_take(&b);
}

char *toolcall_pyjson_text(const char *json) {
    cJSON *v = json ? cJSON_Parse(json) : NULL;
    if (!v) return strdup(json ? json : "");
    char *s = toolcall_pyjson(v, -1);
    cJSON_Delete(v);
    return s;
}

/* ---------------------------------------------------------------- parsing */
enum { P_TEXT, P_CALL, P_AFTER_CALL, P_L3_START, P_L3_JSON, P_L3_TEXT };

void toolcall_parser_init(toolcall_parser *p, toolfmt fmt) {
    memset(p, 0, sizeof *p);
    p->fmt = fmt;
    p->state = fmt == TOOLFMT_LLAMA3 ? P_L3_START : P_TEXT;
}

void toolcall_parser_free(toolcall_parser *p) {
    free(p->buf);
    free(p->content);
    for (int i = 0; i < p->n_calls; i++) { free(p->calls[i].name); free(p->calls[i].arguments); }
    free(p->calls);
    memset(p, 0, sizeof *p);
}

static bool grow_to(char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return true;
    size_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    char *q = realloc(*buf, c);
    if (!q) return false;
    *buf = q;
    *cap = c;
    return true;
}

static void release(toolcall_parser *p, const char *s, size_t n) {
    if (!n || p->oom) return;
    if (!grow_to(&p->content, &p->cap_content, p->n_content + n + 1)) { p->oom = true; return; }
    memcpy(p->content + p->n_content, s, n);
    p->n_content += n;
    p->content[p->n_content] = 0;
}

static void consume(toolcall_parser *p, size_t n) {
    memmove(p->buf, p->buf + n, p->n_buf - n);
    p->n_buf -= n;
}

static bool is_ws(char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; }

/* The end of the JSON value starting at s[i] (after whitespace), or 0 when there is none: a
 * scan of brackets and strings only; cJSON checks the value itself. */
static size_t value_end(const char *s, size_t n, size_t i) {
    while (i < n && is_ws(s[i])) i++;
    if (i >= n) return 0;
    int depth = 0;
    bool str = false;
    for (size_t k = i; k < n; k++) {
        char c = s[k];
        if (str) {
            if (c == '\\') k++;
            else if (c == '"') { str = false; if (depth == 0) return k + 1; }
            continue;
        }
        if (c == '"') str = true;
        else if (c == '{' || c == '[') depth++;
        else if (c == '}' || c == ']') { if (--depth == 0) return k + 1; if (depth < 0) return 0; }
        else if (depth == 0 && (c == ',' || is_ws(c))) return k;
    }
    return depth == 0 && !str ? n : 0;
}

/* A call from JSON text {"name": "...", "arguments"|"parameters": {...}}: the arguments as the
 * model wrote them (the text of that member's value). */
static bool parse_call(toolcall_parser *p, const char *s, size_t n) {
    cJSON *o = cJSON_ParseWithLength(s, n);
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(o, "name");
    const char *key = "arguments";
    const cJSON *args = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!args) args = cJSON_GetObjectItemCaseSensitive(o, key = "parameters");
    bool ok = cJSON_IsObject(o) && cJSON_IsString(name) && name->valuestring[0] && (!args || cJSON_IsObject(args));
    char *a = NULL;
    if (ok && args) {
        /* find "key": at the top level and take its value's text */
        char pat[16];
        snprintf(pat, sizeof pat, "\"%s\"", key);
        size_t at = 0, plen = strlen(pat);
        int depth = 0;
        bool str = false, found = false;
        for (size_t k = 0; k < n && !found; k++) {
            char c = s[k];
            if (str) { if (c == '\\') k++; else if (c == '"') str = false; continue; }
            if (c == '{' || c == '[') depth++;
            else if (c == '}' || c == ']') depth--;
            else if (c == '"') {
                if (depth == 1 && k + plen <= n && !memcmp(s + k, pat, plen)) {
                    size_t j = k + plen;
                    while (j < n && is_ws(s[j])) j++;
                    if (j < n && s[j] == ':') { at = j + 1; found = true; break; }
                }
                str = true;
            }
        }
        size_t end = found ? value_end(s, n, at) : 0;
        while (found && at < end && is_ws(s[at])) at++;
        if (end > at) { a = malloc(end - at + 1); if (a) { memcpy(a, s + at, end - at); a[end - at] = 0; } }
        else a = cJSON_PrintUnformatted(args);
    } else if (ok) {
        a = strdup("{}");
    }
    if (ok && a) {
        if (p->n_calls == p->cap_calls) {
            int c = p->cap_calls ? 2 * p->cap_calls : 4;
            toolcall *q = realloc(p->calls, (size_t)c * sizeof *q);
            if (!q) ok = false; else { p->calls = q; p->cap_calls = c; }
        }
        char *nm = ok ? strdup(name->valuestring) : NULL;
        if (nm) {
            p->calls[p->n_calls].name = nm;
            p->calls[p->n_calls].arguments = a;
            p->calls[p->n_calls].at = p->n_content;
            p->n_calls++;
            a = NULL;
        } else if (ok) {
            p->oom = true;
            ok = false;
        }
    }
    free(a);
    cJSON_Delete(o);
    return ok;
}

/* Length of the longest suffix of s[0..n) that is a proper prefix of m. */
static size_t partial_tail(const char *s, size_t n, const char *m) {
    size_t L = strlen(m);
    for (size_t k = L - 1 < n ? L - 1 : n; k > 0; k--)
        if (!memcmp(s + n - k, m, k)) return k;
    return 0;
}

static void step_hermes(toolcall_parser *p, bool final) {
    for (;;) {
        if (p->state == P_AFTER_CALL) {   /* whitespace after a call: dropped before another call or the end */
            size_t w = 0;
            while (w < p->n_buf && is_ws(p->buf[w])) w++;
            size_t rest = p->n_buf - w, ol = strlen(HERMES_OPEN);
            if (rest == 0) { if (final) { consume(p, w); } return; }
            if (rest >= ol ? !memcmp(p->buf + w, HERMES_OPEN, ol) : !memcmp(p->buf + w, HERMES_OPEN, rest)) {
                if (rest < ol && !final) return;    /* may still become a call */
                if (rest >= ol) consume(p, w);
            }
            p->state = P_TEXT;
        }
        if (p->state == P_TEXT) {
            char *m = p->n_buf ? memmem(p->buf, p->n_buf, HERMES_OPEN, strlen(HERMES_OPEN)) : NULL;
            if (!m) {
                size_t hold = final ? 0 : partial_tail(p->buf, p->n_buf, HERMES_OPEN);
                release(p, p->buf, p->n_buf - hold);
                consume(p, p->n_buf - hold);
                return;
            }
            size_t at = (size_t)(m - p->buf);
            release(p, p->buf, at);
            consume(p, at);
            p->state = P_CALL;
        }
        if (p->state == P_CALL) {   /* buf starts with the opening marker */
            size_t ol = strlen(HERMES_OPEN), cl = strlen(HERMES_CLOSE);
            char *e = memmem(p->buf + ol, p->n_buf - ol, HERMES_CLOSE, cl);
            if (!e && !final) return;
            size_t body = ol, body_end = e ? (size_t)(e - p->buf) : p->n_buf;
            size_t end = e ? body_end + cl : p->n_buf;
            if (parse_call(p, p->buf + body, body_end - body)) {
                consume(p, end);
                p->state = P_AFTER_CALL;
            } else {   /* not a call after all: its text is content */
                release(p, p->buf, end);
                consume(p, end);
                p->state = P_TEXT;
            }
            if (!e) return;
        }
    }
}

static void step_llama3(toolcall_parser *p, bool final) {
    if (p->state == P_L3_START) {
        size_t w = 0;
        while (w < p->n_buf && is_ws(p->buf[w])) w++;
        if (w == p->n_buf && !final) return;
        p->state = w < p->n_buf && p->buf[w] == '{' ? P_L3_JSON : P_L3_TEXT;
    }
    if (p->state == P_L3_JSON) {
        if (!final) return;
        size_t a = 0, b = p->n_buf;
        while (a < b && is_ws(p->buf[a])) a++;
        while (b > a && is_ws(p->buf[b - 1])) b--;
        if (parse_call(p, p->buf + a, b - a)) { consume(p, p->n_buf); return; }
        p->state = P_L3_TEXT;
    }
    release(p, p->buf, p->n_buf);
    consume(p, p->n_buf);
}

bool toolcall_feed(toolcall_parser *p, const char *text, size_t len, bool final) {
    if (p->oom) return false;
    if (!grow_to(&p->buf, &p->cap_buf, p->n_buf + len + 1)) { p->oom = true; return false; }
    if (len) memcpy(p->buf + p->n_buf, text, len);
    p->n_buf += len;
    p->buf[p->n_buf] = 0;
    if (p->fmt == TOOLFMT_LLAMA3) step_llama3(p, final);
    else step_hermes(p, final);
    if (p->buf) p->buf[p->n_buf] = 0;
    return !p->oom;
}

/* ---------------------------------------------------------------- grammar */
static void lit(gbuild *b, const char *s) { gb_lit(b, s, strlen(s)); }

/* One call of the format with any of the tools: alternatives per tool. */
static int call_rule(gbuild *b, toolfmt fmt, const toolcall_tool *tools, int n, char *err, size_t errlen) {
    int *args = malloc((size_t)n * sizeof *args);
    if (!args) { errf(err, errlen, "out of memory"); return -1; }
    for (int i = 0; i < n; i++) {
        char e2[256] = "";
        if ((args[i] = jsonschema_compile_into(b, tools[i].parameters, e2, sizeof e2)) < 0) {
            errf(err, errlen, "tool '%.64s': parameters: %s", tools[i].name, e2);
            free(args);
            return -1;
        }
    }
    const int r = gb_rule(b);
    for (int i = 0; i < n; i++) {
        cJSON *nm = cJSON_CreateString(tools[i].name);
        char *q = nm ? cJSON_PrintUnformatted(nm) : NULL;   /* the name as a JSON string */
        cJSON_Delete(nm);
        if (!q) { free(args); errf(err, errlen, "out of memory"); return -1; }
        gb_alt(b, r);
        if (fmt == TOOLFMT_LLAMA3) {
            lit(b, "{\"name\": ");
            lit(b, q);
            lit(b, ", \"parameters\": ");
        } else {
            lit(b, HERMES_OPEN "\n{\"name\": ");
            lit(b, q);
            lit(b, ", \"arguments\": ");
        }
        gb_ref(b, args[i]);
        lit(b, fmt == TOOLFMT_LLAMA3 ? "}" : "}\n" HERMES_CLOSE);
        free(q);
    }
    free(args);
    return r;
}

/* Text that does not contain `m`: rule k = "m[0..k) was just matched" (KMP automaton); every
 * rule may end, and where it ends `then` may follow. Returns rule 0. */
static int text_without(gbuild *b, const char *m, int then) {
    const int L = (int)strlen(m);
    int fail[64] = { 0 };
    for (int i = 1, k = 0; i < L; i++) {
        while (k > 0 && m[i] != m[k]) k = fail[k - 1];
        if (m[i] == m[k]) k++;
        fail[i] = k;
    }
    int rule[64];
    for (int k = 0; k < L; k++) rule[k] = gb_rule(b);
    for (int k = 0; k < L; k++) {
        uint64_t set[64][4];
        memset(set, 0, sizeof set);
        for (int c = 0; c < 256; c++) {
            int s = k;
            while (s > 0 && (unsigned char)m[s] != c) s = fail[s - 1];
            if ((unsigned char)m[s] == c) s++;
            if (s < L) set[s][c >> 6] |= 1ull << (c & 63);
        }
        gb_alt(b, rule[k]);                 /* the end of the text */
        if (then >= 0) { gb_alt(b, rule[k]); gb_ref(b, then); }
        for (int s = 0; s < L; s++) {
            if (!(set[s][0] | set[s][1] | set[s][2] | set[s][3])) continue;
            gb_alt(b, rule[k]);
            gb_set(b, set[s]);
            gb_ref(b, rule[s]);
        }
    }
    return rule[0];
}

grammar *toolcall_grammar(toolfmt fmt, const toolcall_tool *tools, int n, int mode, bool parallel, char *err,
                          size_t errlen) {
    if (n <= 0) { errf(err, errlen, "no tools to call"); return NULL; }
    gbuild *b = gb_new();
    if (!b) { errf(err, errlen, "out of memory"); return NULL; }
    const int call = call_rule(b, fmt, tools, n, err, errlen);
    if (call < 0) { gb_free(b); return NULL; }
    int calls = call;
    if (parallel && fmt == TOOLFMT_HERMES) {   /* calls ::= call ("\n" call)* */
        const int more = gb_rule(b), sep = gb_rule(b);
        gb_alt(b, sep);
        lit(b, "\n");
        gb_ref(b, call);
        gb_alt(b, more);
        gb_alt(b, more);
        gb_ref(b, sep);
        gb_ref(b, more);
        calls = gb_rule(b);
        gb_alt(b, calls);
        gb_ref(b, call);
        gb_ref(b, more);
    }
    int root = calls;
    if (mode == TOOLCALL_LAZY) {
        if (fmt == TOOLFMT_LLAMA3) {   /* root ::= calls | "" | [^{] any* */
            const int any = gb_rule(b);
            gb_alt(b, any);
            gb_alt(b, any);
            gb_byte_range(b, 0, 255);
            gb_ref(b, any);
            root = gb_rule(b);
            gb_alt(b, root);
            gb_ref(b, calls);
            gb_alt(b, root);
            gb_alt(b, root);
            uint64_t s[4] = { ~0ull, ~0ull, ~0ull, ~0ull };
            s['{' >> 6] &= ~(1ull << ('{' & 63));
            gb_set(b, s);
            gb_ref(b, any);
        } else {
            root = text_without(b, HERMES_OPEN, calls);
        }
    }
    return gb_finish(b, root, err, errlen);
}
