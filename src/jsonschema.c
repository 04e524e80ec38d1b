/* jsonschema: see jsonschema.h. One recursive pass over the schema; each subschema becomes a
 * rule matching exactly its JSON values (no surrounding whitespace); containers put the
 * whitespace between members. Shared building blocks (ws, string, number, any value) are rules
 * made once per grammar. A rule's alternatives are built only after the rules they refer to, as
 * the builder appends to the alternative begun last. */
#include "jsonschema.h"
#include "util.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define JS_MAX_DEPTH 64
#define JS_MAX_REPEAT 4096
#define JS_MAX_REFS 256

typedef struct {
    gbuild *b;
    const cJSON *root;
    char *err;
    size_t errlen;
    int ws, chr, str, integer, number, value, obj_any, arr_any;   /* shared rules, -1 until made */
    struct { char *ref; int rule; } refs[JS_MAX_REFS];
    int n_refs;
} jsctx;

static int fail(jsctx *c, const char *path, const char *fmt, const char *what) {
    char msg[256];
    snprintf(msg, sizeof msg, fmt, what);
    errf(c->err, c->errlen, "%s%s%s", msg, *path ? " at " : "", path);
    return -1;
}

/* ---- building blocks */
static int lit_rule(jsctx *c, const char *s) {
    const int r = gb_rule(c->b);
    gb_alt(c->b, r);
    gb_lit(c->b, s, strlen(s));
    return r;
}

static int ws_rule(jsctx *c) {   /* "" | " " | "\n" " "{0,20} */
    if (c->ws >= 0) return c->ws;
    const int sp = gb_rule(c->b);
    gb_alt(c->b, sp);
    gb_lit(c->b, " ", 1);
    const int ind = gb_repeat(c->b, sp, 0, 20);
    const int r = gb_rule(c->b);
    gb_alt(c->b, r);
    gb_alt(c->b, r);
    gb_lit(c->b, " ", 1);
    gb_alt(c->b, r);
    gb_lit(c->b, "\n", 1);
    gb_ref(c->b, ind);
    return c->ws = r;
}

static int char_rule(jsctx *c) {   /* one JSON string character: UTF-8 or an escape */
    if (c->chr >= 0) return c->chr;
    gbuild *b = c->b;
    const int hex = gb_rule(b);
    uint64_t hs[4] = { 0 };
    for (const char *p = "0123456789abcdefABCDEF"; *p; p++) hs[(uint8_t)*p >> 6] |= 1ull << ((uint8_t)*p & 63);
    gb_alt(b, hex);
    gb_set(b, hs);
    const int r = gb_rule(b);
    gb_alt(b, r);   /* printable ASCII except " and backslash */
    uint64_t a[4] = { 0 };
    for (int ch = 0x20; ch < 0x80; ch++)
        if (ch != '"' && ch != '\\') a[ch >> 6] |= 1ull << (ch & 63);
    gb_set(b, a);
    gb_alt(b, r);
    gb_byte_range(b, 0xc2, 0xdf);
    gb_byte_range(b, 0x80, 0xbf);
    gb_alt(b, r);
    gb_byte_range(b, 0xe0, 0xef);
    gb_byte_range(b, 0x80, 0xbf);
    gb_byte_range(b, 0x80, 0xbf);
    gb_alt(b, r);
    gb_byte_range(b, 0xf0, 0xf4);
    gb_byte_range(b, 0x80, 0xbf);
    gb_byte_range(b, 0x80, 0xbf);
    gb_byte_range(b, 0x80, 0xbf);
    gb_alt(b, r);   /* escapes */
    gb_lit(b, "\\", 1);
    uint64_t e[4] = { 0 };
    for (const char *p = "\"\\/bfnrt"; *p; p++) e[(uint8_t)*p >> 6] |= 1ull << ((uint8_t)*p & 63);
    gb_set(b, e);
    /* \uXXXX, never a surrogate (D800-DFFF): a pair would be one character to a validator but
     * two here, and a lone one is not a character at all */
    uint64_t h1[4] = { 0 };
    for (const char *p = "0123456789abcefABCEF"; *p; p++) h1[(uint8_t)*p >> 6] |= 1ull << ((uint8_t)*p & 63);
    uint64_t dd[4] = { 0 };
    dd['d' >> 6] |= 1ull << ('d' & 63);
    dd['D' >> 6] |= 1ull << ('D' & 63);
    gb_alt(b, r);
    gb_lit(b, "\\u", 2);
    gb_set(b, h1);
    gb_ref(b, hex);
    gb_ref(b, hex);
    gb_ref(b, hex);
    gb_alt(b, r);
    gb_lit(b, "\\u", 2);
    gb_set(b, dd);
    gb_byte_range(b, '0', '7');
    gb_ref(b, hex);
    gb_ref(b, hex);
    return c->chr = r;
}

static int string_rule(jsctx *c, int min, int max) {
    const int ch = char_rule(c);
    const int body = gb_repeat(c->b, ch, min, max);
    const int r = gb_rule(c->b);
    gb_alt(c->b, r);
    gb_lit(c->b, "\"", 1);
    gb_ref(c->b, body);
    gb_lit(c->b, "\"", 1);
    return r;
}

static int digits(jsctx *c, int min, int max) {
    const int d = gb_rule(c->b);
    gb_alt(c->b, d);
    gb_byte_range(c->b, '0', '9');
    return gb_repeat(c->b, d, min, max);
}

/* integer: "-"? ("0" | [1-9][0-9]{0,15}); nonneg: no sign; positive: [1-9][0-9]{0,15} */
static int integer_rule(jsctx *c, bool nonneg, bool positive) {
    const int rest = digits(c, 0, 15);
    const int mag = gb_rule(c->b);
    if (!positive) {
        gb_alt(c->b, mag);
        gb_lit(c->b, "0", 1);
    }
    gb_alt(c->b, mag);
    gb_byte_range(c->b, '1', '9');
    gb_ref(c->b, rest);
    if (nonneg || positive) return mag;
    const int r = gb_rule(c->b);
    gb_alt(c->b, r);
    gb_ref(c->b, mag);
    gb_alt(c->b, r);
    gb_lit(c->b, "-", 1);
    gb_ref(c->b, mag);
    return r;
}

static int number_rule(jsctx *c, bool nonneg) {
    const int in = integer_rule(c, nonneg, false);
    const int fd = digits(c, 1, 16), ed = digits(c, 1, 3);
    const int frac = gb_rule(c->b);
    gb_alt(c->b, frac);
    gb_alt(c->b, frac);
    gb_lit(c->b, ".", 1);
    gb_ref(c->b, fd);
    const int ex = gb_rule(c->b);
    gb_alt(c->b, ex);
    uint64_t e[4] = { 0 }, s[4] = { 0 };
    e['e' >> 6] |= 1ull << ('e' & 63);
    e['E' >> 6] |= 1ull << ('E' & 63);
    s['+' >> 6] |= 1ull << ('+' & 63);
    s['-' >> 6] |= 1ull << ('-' & 63);
    for (int k = 0; k < 2; k++) {
        gb_alt(c->b, ex);
        gb_set(c->b, e);
        if (k) gb_set(c->b, s);
        gb_ref(c->b, ed);
    }
    const int r = gb_rule(c->b);
    gb_alt(c->b, r);
    gb_ref(c->b, in);
    gb_ref(c->b, frac);
    gb_ref(c->b, ex);
    return r;
}

/* "[" ws ( item ws ( "," ws item ws ){min-1, max-1} )? "]", min items >= 0 */
static int array_of(jsctx *c, int item, int min, int max) {
    const int ws = ws_rule(c);
    const int more1 = gb_rule(c->b);   /* "," ws item ws */
    gb_alt(c->b, more1);
    gb_lit(c->b, ",", 1);
    gb_ref(c->b, ws);
    gb_ref(c->b, item);
    gb_ref(c->b, ws);
    const int more = gb_repeat(c->b, more1, min > 1 ? min - 1 : 0, max < 0 ? -1 : max - 1);
    const int r = gb_rule(c->b);
    if (min == 0) {
        gb_alt(c->b, r);
        gb_lit(c->b, "[", 1);
        gb_ref(c->b, ws);
        gb_lit(c->b, "]", 1);
    }
    if (max != 0) {
        gb_alt(c->b, r);
        gb_lit(c->b, "[", 1);
        gb_ref(c->b, ws);
        gb_ref(c->b, item);
        gb_ref(c->b, ws);
        gb_ref(c->b, more);
        gb_lit(c->b, "]", 1);
    }
    return r;
}

/* "{" ws ( key ws ":" ws value ws ( "," ws key ws ":" ws value ws )* )? "}" with any string keys */
static int map_of(jsctx *c, int value) {
    const int ws = ws_rule(c), key = c->str >= 0 ? c->str : (c->str = string_rule(c, 0, -1));
    const int kv = gb_rule(c->b);
    gb_alt(c->b, kv);
    gb_ref(c->b, key);
    gb_ref(c->b, ws);
    gb_lit(c->b, ":", 1);
    gb_ref(c->b, ws);
    gb_ref(c->b, value);
    gb_ref(c->b, ws);
    const int more1 = gb_rule(c->b);
    gb_alt(c->b, more1);
    gb_lit(c->b, ",", 1);
    gb_ref(c->b, ws);
    gb_ref(c->b, kv);
    const int more = gb_repeat(c->b, more1, 0, -1);
    const int r = gb_rule(c->b);
    gb_alt(c->b, r);
    gb_lit(c->b, "{", 1);
    gb_ref(c->b, ws);
    gb_lit(c->b, "}", 1);
    gb_alt(c->b, r);
    gb_lit(c->b, "{", 1);
    gb_ref(c->b, ws);
    gb_ref(c->b, kv);
    gb_ref(c->b, more);
    gb_lit(c->b, "}", 1);
    return r;
}

/* any JSON value: object | array | string | number | true | false | null (recursive) */
static int value_rule(jsctx *c) {
    if (c->value >= 0) return c->value;
    const int v = c->value = gb_rule(c->b);   /* declared first: containers refer to it */
    if (c->str < 0) c->str = string_rule(c, 0, -1);
    if (c->number < 0) c->number = number_rule(c, false);
    const int obj = map_of(c, v), arr = array_of(c, v, 0, -1);
    c->obj_any = obj;
    c->arr_any = arr;
    const int lits[3] = { lit_rule(c, "true"), lit_rule(c, "false"), lit_rule(c, "null") };
    const int alts[5] = { obj, arr, c->str, c->number, -1 };
    for (int i = 0; i < 4; i++) {
        gb_alt(c->b, v);
        gb_ref(c->b, alts[i]);
    }
    for (int i = 0; i < 3; i++) {
        gb_alt(c->b, v);
        gb_ref(c->b, lits[i]);
    }
    return v;
}

/* ---- schemas */
static int compile(jsctx *c, const cJSON *s, const char *path, int depth);

static bool is_annotation(const char *k) {
    static const char *const ann[] = { "title", "description", "default", "examples", "$schema", "$id", "$comment",
                                       "deprecated", "readOnly", "writeOnly", "$defs", "definitions", NULL };
    for (int i = 0; ann[i]; i++)
        if (!strcmp(k, ann[i])) return true;
    return false;
}

/* the rule of a literal JSON value (enum / const member) */
static int literal(jsctx *c, const cJSON *v, const char *path) {
    char *t = cJSON_PrintUnformatted(v);
    if (!t) return fail(c, path, "%s", "out of memory");
    const int r = lit_rule(c, t);
    free(t);
    return r;
}

static const cJSON *resolve(jsctx *c, const char *ref) {
    if (!strcmp(ref, "#")) return c->root;
    if (strncmp(ref, "#/", 2)) return NULL;
    const cJSON *cur = c->root;
    const char *p = ref + 2;
    while (cur && *p) {
        char seg[256];
        size_t n = 0;
        for (; *p && *p != '/'; p++) {
            char ch = *p;
            if (ch == '~' && p[1] == '0') ch = '~', p++;
            else if (ch == '~' && p[1] == '1') ch = '/', p++;
            if (n + 1 < sizeof seg) seg[n++] = ch;
        }
        seg[n] = 0;
        if (*p == '/') p++;
        cur = cJSON_IsObject(cur) ? cJSON_GetObjectItemCaseSensitive(cur, seg) : NULL;
    }
    return cur;
}

static int compile_ref(jsctx *c, const char *ref, const char *path, int depth) {
    for (int i = 0; i < c->n_refs; i++)
        if (!strcmp(c->refs[i].ref, ref)) return c->refs[i].rule;
    const cJSON *t = resolve(c, ref);
    if (!t) return fail(c, path, "$ref '%.100s' does not resolve (only local references: #, #/$defs/..., #/definitions/...)", ref);
    if (c->n_refs == JS_MAX_REFS) return fail(c, path, "%s", "too many $ref targets");
    const int r = gb_rule(c->b);   /* declared first: recursion refers to it */
    c->refs[c->n_refs].ref = strdup(ref);
    if (!c->refs[c->n_refs].ref) return fail(c, path, "%s", "out of memory");
    c->refs[c->n_refs++].rule = r;
    const int body = compile(c, t, ref, depth + 1);
    if (body < 0) return -1;
    gb_alt(c->b, r);
    gb_ref(c->b, body);
    return r;
}

static int get_count(jsctx *c, const cJSON *s, const char *key, int dflt, const char *path) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(s, key);
    if (!v) return dflt;
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble != (double)(long long)v->valuedouble)
        return fail(c, path, "'%s' must be a non-negative integer", key), -2;
    if (v->valuedouble > JS_MAX_REPEAT) return fail(c, path, "'%s' is over 4096 (not supported)", key), -2;
    return (int)v->valuedouble;
}

static int compile_object(jsctx *c, const cJSON *s, const char *path, int depth) {
    const cJSON *props = cJSON_GetObjectItemCaseSensitive(s, "properties");
    const cJSON *req = cJSON_GetObjectItemCaseSensitive(s, "required");
    const cJSON *addl = cJSON_GetObjectItemCaseSensitive(s, "additionalProperties");
    if (props && !cJSON_IsObject(props)) return fail(c, path, "%s", "'properties' must be an object");
    if (req && !cJSON_IsArray(req)) return fail(c, path, "%s", "'required' must be an array of property names");
    if (addl && !cJSON_IsBool(addl) && !cJSON_IsObject(addl)) return fail(c, path, "%s", "'additionalProperties' must be a boolean or a schema");
    const int n = props ? cJSON_GetArraySize(props) : 0;
    const cJSON *r;
    cJSON_ArrayForEach(r, req) {
        if (!cJSON_IsString(r)) return fail(c, path, "%s", "'required' must be an array of property names");
        if (!props || !cJSON_GetObjectItemCaseSensitive(props, r->valuestring))
            return fail(c, path, "required property '%.100s' is not in 'properties'", r->valuestring);
    }
    if (n == 0) {
        if (addl && cJSON_IsFalse(addl)) return lit_rule(c, "{}");
        if (addl && cJSON_IsObject(addl)) {
            const int v = compile(c, addl, path, depth + 1);
            return v < 0 ? -1 : map_of(c, v);
        }
        value_rule(c);
        return c->obj_any;
    }
    /* kv_i ::= "\"name\"" ws ":" ws value_i ws */
    const int ws = ws_rule(c);
    int *kv = malloc((size_t)n * sizeof *kv);
    bool *must = malloc((size_t)n * sizeof *must);
    if (!kv || !must) { free(kv), free(must); return fail(c, path, "%s", "out of memory"); }
    int i = 0;
    const cJSON *p;
    cJSON_ArrayForEach(p, props) {
        char sub[512];
        snprintf(sub, sizeof sub, "%s/properties/%.100s", path, p->string);
        const int v = compile(c, p, sub, depth + 1);
        if (v < 0) { free(kv), free(must); return -1; }
        cJSON *key = cJSON_CreateString(p->string);
        char *kt = key ? cJSON_PrintUnformatted(key) : NULL;
        cJSON_Delete(key);
        if (!kt) { free(kv), free(must); return fail(c, path, "%s", "out of memory"); }
        kv[i] = gb_rule(c->b);
        gb_alt(c->b, kv[i]);
        gb_lit(c->b, kt, strlen(kt));
        gb_ref(c->b, ws);
        gb_lit(c->b, ":", 1);
        gb_ref(c->b, ws);
        gb_ref(c->b, v);
        gb_ref(c->b, ws);
        free(kt);
        must[i] = false;
        cJSON_ArrayForEach(r, req) if (!strcmp(r->valuestring, p->string)) must[i] = true;
        i++;
    }
    /* rest_i: members i.. after at least one was written; first_i: none written yet */
    int rest = gb_rule(c->b), first = gb_rule(c->b);
    gb_alt(c->b, rest);
    gb_alt(c->b, first);
    for (i = n - 1; i >= 0; i--) {
        const int nr = gb_rule(c->b), nf = gb_rule(c->b);
        gb_alt(c->b, nr);          /* "," ws kv_i rest_{i+1} */
        gb_lit(c->b, ",", 1);
        gb_ref(c->b, ws);
        gb_ref(c->b, kv[i]);
        gb_ref(c->b, rest);
        if (!must[i]) {            /* | rest_{i+1} */
            gb_alt(c->b, nr);
            gb_ref(c->b, rest);
        }
        gb_alt(c->b, nf);          /* kv_i rest_{i+1} */
        gb_ref(c->b, kv[i]);
        gb_ref(c->b, rest);
        if (!must[i]) {            /* | first_{i+1} */
            gb_alt(c->b, nf);
            gb_ref(c->b, first);
        }
        rest = nr;
        first = nf;
    }
    free(kv);
    free(must);
    const int o = gb_rule(c->b);
    gb_alt(c->b, o);
    gb_lit(c->b, "{", 1);
    gb_ref(c->b, ws);
    gb_ref(c->b, first);
    gb_lit(c->b, "}", 1);
    return o;
}

static int compile_type(jsctx *c, const cJSON *s, const char *type, const char *path, int depth) {
    if (!strcmp(type, "null")) return lit_rule(c, "null");
    if (!strcmp(type, "boolean")) {
        const int t = lit_rule(c, "true"), f = lit_rule(c, "false"), r = gb_rule(c->b);
        gb_alt(c->b, r);
        gb_ref(c->b, t);
        gb_alt(c->b, r);
        gb_ref(c->b, f);
        return r;
    }
    if (!strcmp(type, "integer") || !strcmp(type, "number")) {
        const cJSON *mn = cJSON_GetObjectItemCaseSensitive(s, "minimum");
        bool nonneg = false, positive = false;
        if (mn) {
            const bool integer = !strcmp(type, "integer");
            if (cJSON_IsNumber(mn) && mn->valuedouble == 0) nonneg = true;
            else if (cJSON_IsNumber(mn) && mn->valuedouble == 1 && integer) positive = true;
            else return fail(c, path, "%s", "'minimum' is supported only as 0 (and 1 for integers)");
        }
        return !strcmp(type, "integer") ? integer_rule(c, nonneg, positive) : number_rule(c, nonneg);
    }
    if (!strcmp(type, "string")) {
        const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(s, "format");
        if (fmt) {
            if (!cJSON_IsString(fmt)) return fail(c, path, "%s", "'format' must be a string");
            const char *f = fmt->valuestring;
            /* date: YYYY-MM-DD with day 01-28 (valid in every month); time: hh:mm:ssZ; uuid:
             * 8-4-4-4-12 lowercase hex. Narrower than the formats, never wider. */
            if (strcmp(f, "date") && strcmp(f, "time") && strcmp(f, "date-time") && strcmp(f, "uuid"))
                return fail(c, path, "string format '%.60s' is not supported (date, time, date-time, uuid)", f);
            gbuild *b = c->b;
            const int d = gb_rule(b), d05 = gb_rule(b), mon = gb_rule(b), day = gb_rule(b), hour = gb_rule(b);
            gb_alt(b, d), gb_byte_range(b, '0', '9');
            gb_alt(b, d05), gb_byte_range(b, '0', '5'), gb_ref(b, d);
            gb_alt(b, mon), gb_lit(b, "0", 1), gb_byte_range(b, '1', '9');
            gb_alt(b, mon), gb_lit(b, "1", 1), gb_byte_range(b, '0', '2');
            gb_alt(b, day), gb_lit(b, "0", 1), gb_byte_range(b, '1', '9');
            gb_alt(b, day), gb_lit(b, "1", 1), gb_ref(b, d);
            gb_alt(b, day), gb_lit(b, "2", 1), gb_byte_range(b, '0', '8');
            gb_alt(b, hour), gb_byte_range(b, '0', '1'), gb_ref(b, d);
            gb_alt(b, hour), gb_lit(b, "2", 1), gb_byte_range(b, '0', '3');
            const int r = gb_rule(b);
            gb_alt(b, r);
            gb_lit(b, "\"", 1);
            if (!strcmp(f, "date") || !strcmp(f, "date-time")) {
                gb_byte_range(b, '1', '2'), gb_ref(b, d), gb_ref(b, d), gb_ref(b, d);
                gb_lit(b, "-", 1), gb_ref(b, mon), gb_lit(b, "-", 1), gb_ref(b, day);
                if (!strcmp(f, "date-time")) gb_lit(b, "T", 1);
            }
            if (!strcmp(f, "time") || !strcmp(f, "date-time")) {
                gb_ref(b, hour), gb_lit(b, ":", 1), gb_ref(b, d05), gb_lit(b, ":", 1), gb_ref(b, d05), gb_lit(b, "Z", 1);
            } else if (!strcmp(f, "uuid")) {
                uint64_t h[4] = { 0 };
                for (const char *q = "0123456789abcdef"; *q; q++) h[(uint8_t)*q >> 6] |= 1ull << ((uint8_t)*q & 63);
                const int groups[5] = { 8, 4, 4, 4, 12 };
                for (int g = 0; g < 5; g++) {
                    if (g) gb_lit(b, "-", 1);
                    for (int k = 0; k < groups[g]; k++) gb_set(b, h);
                }
            }
            gb_lit(c->b, "\"", 1);
            return r;
        }
        const int mn = get_count(c, s, "minLength", 0, path), mx = get_count(c, s, "maxLength", -1, path);
        if (mn == -2 || mx == -2) return -1;
        if (mx >= 0 && mx < mn) return fail(c, path, "%s", "'maxLength' is less than 'minLength'");
        if (mn == 0 && mx < 0) return c->str >= 0 ? c->str : (c->str = string_rule(c, 0, -1));
        return string_rule(c, mn, mx);
    }
    if (!strcmp(type, "array")) {
        const cJSON *items = cJSON_GetObjectItemCaseSensitive(s, "items");
        int item;
        if (!items || cJSON_IsTrue(items)) item = value_rule(c);
        else if (cJSON_IsObject(items)) {
            char sub[512];
            snprintf(sub, sizeof sub, "%s/items", path);
            if ((item = compile(c, items, sub, depth + 1)) < 0) return -1;
        } else return fail(c, path, "%s", "'items' must be a schema");
        const int mn = get_count(c, s, "minItems", 0, path), mx = get_count(c, s, "maxItems", -1, path);
        if (mn == -2 || mx == -2) return -1;
        if (mx >= 0 && mx < mn) return fail(c, path, "%s", "'maxItems' is less than 'minItems'");
        return array_of(c, item, mn, mx);
    }
    if (!strcmp(type, "object")) return compile_object(c, s, path, depth);
    return fail(c, path, "type '%.40s' is not a JSON schema type", type);
}

/* keywords allowed with each type (beyond type, enum, const, nullable and annotations) */
static bool allowed_for(const char *k, const char *type) {
    static const struct { const char *type, *keys[6]; } tab[] = {
        { "object", { "properties", "required", "additionalProperties", NULL } },
        { "array", { "items", "minItems", "maxItems", NULL } },
        { "string", { "minLength", "maxLength", "format", NULL } },
        { "integer", { "minimum", NULL } },
        { "number", { "minimum", NULL } },
    };
    for (size_t i = 0; i < sizeof tab / sizeof tab[0]; i++) {
        if (type && strcmp(type, tab[i].type)) continue;
        for (int j = 0; tab[i].keys[j]; j++)
            if (!strcmp(k, tab[i].keys[j])) return true;
    }
    return false;
}

static int compile(jsctx *c, const cJSON *s, const char *path, int depth) {
    if (depth > JS_MAX_DEPTH) return fail(c, path, "%s", "the schema is nested too deeply");
    if (cJSON_IsTrue(s)) return value_rule(c);
    if (cJSON_IsFalse(s)) return fail(c, path, "%s", "a false schema accepts nothing");
    if (!cJSON_IsObject(s)) return fail(c, path, "%s", "a schema must be an object or a boolean");
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(s, "type");
    const cJSON *any = cJSON_GetObjectItemCaseSensitive(s, "anyOf");
    const cJSON *en = cJSON_GetObjectItemCaseSensitive(s, "enum");
    const cJSON *cn = cJSON_GetObjectItemCaseSensitive(s, "const");
    const cJSON *ref = cJSON_GetObjectItemCaseSensitive(s, "$ref");
    const cJSON *nullable = cJSON_GetObjectItemCaseSensitive(s, "nullable");
    /* every keyword must be understood */
    const char *single_type = cJSON_IsString(type) ? type->valuestring : NULL;
    const cJSON *k;
    cJSON_ArrayForEach(k, s) {
        const char *n = k->string;
        if (is_annotation(n) || !strcmp(n, "type") || !strcmp(n, "enum") || !strcmp(n, "const") || !strcmp(n, "anyOf") ||
            !strcmp(n, "$ref") || !strcmp(n, "nullable"))
            continue;
        if (!type) {
            /* a schema without type: object / array / string keywords imply the type */
            if (allowed_for(n, NULL)) continue;
        } else if (single_type ? allowed_for(n, single_type) : allowed_for(n, NULL)) {
            continue;
        }
        return fail(c, path, "unsupported JSON schema keyword '%.60s'", n);
    }
    if (nullable && !cJSON_IsBool(nullable)) return fail(c, path, "%s", "'nullable' must be a boolean");
    int r;
    if (ref) {
        if (!cJSON_IsString(ref)) return fail(c, path, "%s", "'$ref' must be a string");
        r = compile_ref(c, ref->valuestring, path, depth);
    } else if (cn) {
        r = literal(c, cn, path);
    } else if (en) {
        if (!cJSON_IsArray(en) || cJSON_GetArraySize(en) == 0) return fail(c, path, "%s", "'enum' must be a non-empty array");
        int lits[256], nl = 0;
        const cJSON *v;
        cJSON_ArrayForEach(v, en) {
            if (nl == 256) return fail(c, path, "%s", "'enum' has more than 256 values (not supported)");
            if ((lits[nl++] = literal(c, v, path)) < 0) return -1;
        }
        r = gb_rule(c->b);
        for (int i = 0; i < nl; i++) {
            gb_alt(c->b, r);
            gb_ref(c->b, lits[i]);
        }
    } else if (any) {
        if (!cJSON_IsArray(any) || cJSON_GetArraySize(any) == 0) return fail(c, path, "%s", "'anyOf' must be a non-empty array");
        if (type) return fail(c, path, "%s", "'anyOf' together with 'type' is not supported (put the type in each branch)");
        int alts[64], na = 0, i = 0;
        const cJSON *v;
        cJSON_ArrayForEach(v, any) {
            char sub[512];
            snprintf(sub, sizeof sub, "%s/anyOf/%d", path, i++);
            if (na == 64) return fail(c, path, "%s", "'anyOf' has more than 64 branches (not supported)");
            if ((alts[na++] = compile(c, v, sub, depth + 1)) < 0) return -1;
        }
        r = gb_rule(c->b);
        for (i = 0; i < na; i++) {
            gb_alt(c->b, r);
            gb_ref(c->b, alts[i]);
        }
    } else if (cJSON_IsString(type)) {
        r = compile_type(c, s, type->valuestring, path, depth);
    } else if (cJSON_IsArray(type)) {
        int alts[8], na = 0;
        const cJSON *t;
        cJSON_ArrayForEach(t, type) {
            if (!cJSON_IsString(t)) return fail(c, path, "%s", "'type' must be a string or an array of strings");
            if (na == 8) return fail(c, path, "%s", "'type' lists too many types");
            if ((alts[na++] = compile_type(c, s, t->valuestring, path, depth)) < 0) return -1;
        }
        if (!na) return fail(c, path, "%s", "'type' is an empty array");
        r = gb_rule(c->b);
        for (int i = 0; i < na; i++) {
            gb_alt(c->b, r);
            gb_ref(c->b, alts[i]);
        }
    } else if (type) {
        return fail(c, path, "%s", "'type' must be a string or an array of strings");
    } else if (cJSON_GetObjectItemCaseSensitive(s, "properties") || cJSON_GetObjectItemCaseSensitive(s, "required") ||
               cJSON_GetObjectItemCaseSensitive(s, "additionalProperties")) {
        r = compile_object(c, s, path, depth);
    } else if (cJSON_GetObjectItemCaseSensitive(s, "items") || cJSON_GetObjectItemCaseSensitive(s, "minItems") ||
               cJSON_GetObjectItemCaseSensitive(s, "maxItems")) {
        r = compile_type(c, s, "array", path, depth);
    } else if (cJSON_GetObjectItemCaseSensitive(s, "minLength") || cJSON_GetObjectItemCaseSensitive(s, "maxLength") ||
               cJSON_GetObjectItemCaseSensitive(s, "format")) {
        r = compile_type(c, s, "string", path, depth);
    } else if (cJSON_GetObjectItemCaseSensitive(s, "minimum")) {
        r = compile_type(c, s, "number", path, depth);
    } else {
        r = value_rule(c);   /* {} : any value */
    }
    if (r < 0 || !(nullable && cJSON_IsTrue(nullable))) return r;
    const int nu = lit_rule(c, "null"), o = gb_rule(c->b);
    gb_alt(c->b, o);
    gb_ref(c->b, r);
    gb_alt(c->b, o);
    gb_ref(c->b, nu);
    return o;
}

static grammar *finish(jsctx *c, int value) {
    grammar *g = NULL;
    if (value >= 0) {   /* root ::= ws value ws */
        const int ws = ws_rule(c), root = gb_rule(c->b);
        gb_alt(c->b, root);
        gb_ref(c->b, ws);
        gb_ref(c->b, value);
        gb_ref(c->b, ws);
        g = gb_finish(c->b, root, c->err, c->errlen);
    } else {
        gb_free(c->b);
    }
    for (int i = 0; i < c->n_refs; i++) free(c->refs[i].ref);
    return g;
}

static bool ctx_init(jsctx *c, const cJSON *root, char *err, size_t errlen) {
    memset(c, 0, sizeof *c);
    c->b = gb_new();
    c->root = root;
    c->err = err;
    c->errlen = errlen;
    c->ws = c->chr = c->str = c->integer = c->number = c->value = c->obj_any = c->arr_any = -1;
    if (!c->b) errf(err, errlen, "out of memory");
    return c->b != NULL;
}

grammar *jsonschema_compile(const cJSON *schema, char *err, size_t errlen) {
    jsctx c;
    if (!ctx_init(&c, schema, err, errlen)) return NULL;
    return finish(&c, compile(&c, schema, "", 0));
}

int jsonschema_compile_into(gbuild *b, const cJSON *schema, char *err, size_t errlen) {
    jsctx c;
    memset(&c, 0, sizeof c);
    c.b = b;
    c.root = schema;
    c.err = err;
    c.errlen = errlen;
    c.ws = c.chr = c.str = c.integer = c.number = c.value = c.obj_any = c.arr_any = -1;
    int r;
    if (schema) {
        r = compile(&c, schema, "", 0);
    } else {
        value_rule(&c);
        r = c.obj_any;
    }
    for (int i = 0; i < c.n_refs; i++) free(c.refs[i].ref);
    return r;
}

grammar *jsonschema_any_object(char *err, size_t errlen) {
    jsctx c;
    if (!ctx_init(&c, NULL, err, errlen)) return NULL;
    value_rule(&c);
    return finish(&c, c.obj_any);
}

/* ---- the cache of compiled schemas */
#include <pthread.h>
typedef struct { char *text; grammar *g; uint64_t used; } sc_entry;
struct schema_cache {
    pthread_mutex_t mu;
    sc_entry *e;
    int n, cap;
    uint64_t tick;
};

schema_cache *schema_cache_new(int cap) {
    schema_cache *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->cap = cap > 0 ? cap : 64;
    if (!(c->e = calloc((size_t)c->cap, sizeof *c->e))) { free(c); return NULL; }
    pthread_mutex_init(&c->mu, NULL);
    return c;
}

void schema_cache_free(schema_cache *c) {
    if (!c) return;
    for (int i = 0; i < c->n; i++) {
        free(c->e[i].text);
        grammar_unref(c->e[i].g);
    }
    free(c->e);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

grammar *schema_cache_get(schema_cache *c, const char *schema_text, char *err, size_t errlen) {
    const char *key = schema_text ? schema_text : "";   /* "" (never a schema's text): json_object */
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < c->n; i++)
        if (!strcmp(c->e[i].text, key)) {
            c->e[i].used = ++c->tick;
            grammar *g = grammar_ref(c->e[i].g);
            pthread_mutex_unlock(&c->mu);
            return g;
        }
    pthread_mutex_unlock(&c->mu);
    /* compile outside the lock (a big schema must not stall other requests' lookups) */
    grammar *g;
    if (!schema_text) {
        g = jsonschema_any_object(err, errlen);
    } else {
        cJSON *s = cJSON_Parse(schema_text);
        if (!s) { errf(err, errlen, "the schema is not valid JSON"); return NULL; }
        g = jsonschema_compile(s, err, errlen);
        cJSON_Delete(s);
    }
    if (!g) return NULL;
    char *text = strdup(key);
    if (!text) return g;   /* served, just not cached */
    pthread_mutex_lock(&c->mu);
    int slot = c->n;
    if (c->n == c->cap) {   /* evict the least recently used */
        slot = 0;
        for (int i = 1; i < c->n; i++)
            if (c->e[i].used < c->e[slot].used) slot = i;
        free(c->e[slot].text);
        grammar_unref(c->e[slot].g);
    } else {
        c->n++;
    }
    c->e[slot] = (sc_entry){ text, grammar_ref(g), ++c->tick };
    pthread_mutex_unlock(&c->mu);
    return g;
}
