/* api: OpenAI / Anthropic request parsing and response formatting (see api.h).
 *
 * Parsing is strict about types (a wrong type is a 400 naming the parameter, as both APIs do)
 * and lenient about unknown fields (ignored, so newer SDKs keep working). Requests become one
 * api_request: chat messages with their text already joined, sampling parameters on top of
 * sample_params_default, stop strings, and for Anthropic the cache_control breakpoints as byte
 * offsets inside message content. Anthropic's `tools` are rendered deterministically as text at
 * the start of the system message (tools come before system in Anthropic's cache prefix order),
 * with cache_control removed so that marking a block never changes the prompt itself.
 *
 * Breakpoint offsets in the rendered prompt come from a second rendering with a marker byte
 * string at each breakpoint: markers are located, removed, and the result must equal the plain
 * rendering (so templates that trim or rewrite content cannot silently misplace a breakpoint).
 */
#include "api.h"
#include <cjson/cJSON.h>
#include <math.h>
#include <stddef.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void api_error_set(api_error *e, int status, const char *type, const char *param, const char *code,
                   const char *fmt, ...) {
    if (!e) return;
    e->status = status;
    snprintf(e->type, sizeof e->type, "%s", type ? type : "invalid_request_error");
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    snprintf(e->code, sizeof e->code, "%s", code ? code : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
}

#include <stdint.h>
#define BAD(param, ...) do { api_error_set(err, 400, "invalid_request_error", param, NULL, __VA_ARGS__); goto fail; } while (0)

char *api_format_error(bool anthropic, const api_error *e) {
    cJSON *root = cJSON_CreateObject(), *o = cJSON_CreateObject();
    if (anthropic) {
        cJSON_AddStringToObject(root, "type", "error");
        cJSON_AddStringToObject(o, "type", e->type);
        cJSON_AddStringToObject(o, "message", e->message);
    } else {
        cJSON_AddStringToObject(o, "message", e->message);
        cJSON_AddStringToObject(o, "type", e->type);
        if (e->param[0]) cJSON_AddStringToObject(o, "param", e->param); else cJSON_AddNullToObject(o, "param");
        if (e->code[0]) cJSON_AddStringToObject(o, "code", e->code); else cJSON_AddNullToObject(o, "code");
    }
    cJSON_AddItemToObject(root, "error", o);
    char *s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return s;
}

const char *api_anthropic_type(int status) {
    switch (status) {
    case 401: return "authentication_error";
    case 403: return "permission_error";
    case 404: return "not_found_error";
    case 413: return "request_too_large";
    case 429: return "rate_limit_error";
    case 500: return "api_error";
    case 503: case 529: return "overloaded_error";
    default: return "invalid_request_error";
    }
}

char *api_format_stream_error(bool anthropic, const char *msg) {
    api_error e;
    api_error_set(&e, 500, anthropic ? "api_error" : "server_error", NULL, NULL, "%s", msg);
    char *js = api_format_error(anthropic, &e);
    if (!js) return NULL;
    size_t n = strlen(js) + 64;
    char *out = malloc(n);
    if (out) snprintf(out, n, anthropic ? "event: error\ndata: %s\n\n" : "data: %s\n\n", js);
    free(js);
    return out;
}

/* ---------------------------------------------------------------- small growable string */
typedef struct { char *p; size_t n, cap; bool oom; } sbuf;
static void sb_add(sbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t c = b->cap ? b->cap : 256;
        while (c < b->n + n + 1) c *= 2;
        char *q = realloc(b->p, c);
        if (!q) { b->oom = true; return; }
        b->p = q; b->cap = c;
    }
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}
static void sb_str(sbuf *b, const char *s) { sb_add(b, s, strlen(s)); }
static char *sb_take(sbuf *b) {
    if (b->oom) { free(b->p); return NULL; }
    if (!b->p) sb_add(b, "", 0);
    if (b->oom) { free(b->p); return NULL; }
    return b->p;
}

/* ---------------------------------------------------------------- typed field access */
/* Each getter: absent or null -> leaves *out, returns 0; wrong type/range -> 400, returns -1. */
static int get_number(const cJSON *o, const char *key, double lo, double hi, double *out, api_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble)) {
        api_error_set(err, 400, "invalid_request_error", key, "invalid_type", "%s: expected a number", key);
        return -1;
    }
    if (v->valuedouble < lo || v->valuedouble > hi) {
        api_error_set(err, 400, "invalid_request_error", key, "invalid_value",
                      "%s: %g is out of range [%g, %g]", key, v->valuedouble, lo, hi);
        return -1;
    }
    *out = v->valuedouble;
    return 1;
}
static int get_int(const cJSON *o, const char *key, double lo, double hi, long long *out, api_error *err) {
    double d;
    int r = get_number(o, key, lo, hi, &d, err);
    if (r <= 0) return r;
    if (d != floor(d)) {
        api_error_set(err, 400, "invalid_request_error", key, "invalid_type", "%s: expected an integer", key);
        return -1;
    }
    *out = (long long)d;
    return 1;
}
static int get_bool(const cJSON *o, const char *key, bool *out, api_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsBool(v)) {
        api_error_set(err, 400, "invalid_request_error", key, "invalid_type", "%s: expected a boolean", key);
        return -1;
    }
    *out = cJSON_IsTrue(v);
    return 1;
}
static int get_string(const cJSON *o, const char *key, const char **out, api_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsString(v)) {
        api_error_set(err, 400, "invalid_request_error", key, "invalid_type", "%s: expected a string", key);
        return -1;
    }
    *out = v->valuestring;
    return 1;
}

/* Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing above U+10FFFF. Returns
 * the offset of the first bad byte, or len when all is well. */
static size_t utf8_bad_at(const unsigned char *s, size_t len) {
    size_t i = 0;
    while (i < len) {
        unsigned c = s[i];
        if (c < 0x80) { i++; continue; }
        size_t n;
        unsigned lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) n = 1;
        else if (c == 0xE0) { n = 2; lo = 0xA0; }
        else if (c >= 0xE1 && c <= 0xEC) n = 2;
        else if (c == 0xED) { n = 2; hi = 0x9F; }            /* U+D800..DFFF are not characters */
        else if (c >= 0xEE && c <= 0xEF) n = 2;
        else if (c == 0xF0) { n = 3; lo = 0x90; }
        else if (c >= 0xF1 && c <= 0xF3) n = 3;
        else if (c == 0xF4) { n = 3; hi = 0x8F; }            /* <= U+10FFFF */
        else return i;
        if (i + n >= len) return i;                          /* truncated sequence */
        if (s[i + 1] < lo || s[i + 1] > hi) return i;
        for (size_t k = 2; k <= n; k++)
            if (s[i + k] < 0x80 || s[i + k] > 0xBF) return i;
        i += n + 1;
    }
    return len;
}

/* A parameter pcache does not implement: 400 naming it. */
static int refuse(api_error *err, const char *param, const char *what) {
    api_error_set(err, 400, "invalid_request_error", param, "unsupported_parameter",
                  "%s: %s is not supported by pcache", param, what);
    return -1;
}

static bool present(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return v && !cJSON_IsNull(v);
}

static int parse_cache_salt(const cJSON *root, api_request *r, api_error *err) {
    const char *s = NULL;
    if (get_string(root, "cache_salt", &s, err) < 0) return -1;
    if (!s) return 0;
    if (strlen(s) > API_MAX_CACHE_SALT) {
        api_error_set(err, 400, "invalid_request_error", "cache_salt", "invalid_value",
                      "cache_salt: at most %d bytes", API_MAX_CACHE_SALT);
        return -1;
    }
    if (!(r->cache_salt = strdup(s))) { api_error_set(err, 500, "api_error", NULL, NULL, "out of memory"); return -1; }
    return 0;
}

/* logit_bias: {"token id": bias in [-100, 100], ...} */
static int parse_logit_bias(const cJSON *root, api_request *r, api_error *err) {
    const cJSON *lb = cJSON_GetObjectItemCaseSensitive(root, "logit_bias");
    if (!lb || cJSON_IsNull(lb)) return 0;
    if (!cJSON_IsObject(lb)) {
        api_error_set(err, 400, "invalid_request_error", "logit_bias", "invalid_type", "logit_bias: expected an object mapping token ids to numbers");
        return -1;
    }
    int n = cJSON_GetArraySize(lb);
    if (n > API_MAX_LOGIT_BIAS) {
        api_error_set(err, 400, "invalid_request_error", "logit_bias", "invalid_value", "logit_bias: at most %d entries", API_MAX_LOGIT_BIAS);
        return -1;
    }
    if (n == 0) return 0;
    if (!(r->logit_bias = calloc((size_t)n, sizeof *r->logit_bias))) { api_error_set(err, 500, "api_error", NULL, NULL, "out of memory"); return -1; }
    const cJSON *e;
    cJSON_ArrayForEach(e, lb) {
        const char *k = e->string;
        char *end = NULL;
        long long id = k && *k >= '0' && *k <= '9' ? strtoll(k, &end, 10) : -1;
        if (id < 0 || id > INT32_MAX || !end || *end) {
            api_error_set(err, 400, "invalid_request_error", "logit_bias", "invalid_value", "logit_bias: key '%.40s' is not a token id", k ? k : "");
            return -1;
        }
        if (!cJSON_IsNumber(e) || !isfinite(e->valuedouble) || e->valuedouble < -100 || e->valuedouble > 100) {
            api_error_set(err, 400, "invalid_request_error", "logit_bias", "invalid_value", "logit_bias: the bias of token %lld must be a number in [-100, 100]", id);
            return -1;
        }
        r->logit_bias[r->n_logit_bias].token = (int32_t)id;
        r->logit_bias[r->n_logit_bias].bias = (float)e->valuedouble;
        r->n_logit_bias++;
    }
    return 0;
}

/* response_format: text, json_object, or json_schema {name, schema, strict}. The schema is kept
 * as compact JSON text; the server compiles it (jsonschema.c, cached by text) and answers a
 * schema it cannot honour with a 400. */
static int parse_response_format(const cJSON *rf, const char *t, api_request *r, api_error *err) {
    if (!strcmp(t, "text")) return 0;
    if (!strcmp(t, "json_object")) {
        r->format = API_FORMAT_JSON_OBJECT;
        return 0;
    }
    if (strcmp(t, "json_schema")) {
        api_error_set(err, 400, "invalid_request_error", "response_format.type", "invalid_value",
                      "response_format.type: '%.40s' is not one of text, json_object, json_schema", t);
        return -1;
    }
    const cJSON *js = cJSON_GetObjectItemCaseSensitive(rf, "json_schema");
    if (!cJSON_IsObject(js)) {
        api_error_set(err, 400, "invalid_request_error", "response_format.json_schema", "missing_required_parameter",
                      "response_format.json_schema: required, an object with a schema");
        return -1;
    }
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(js, "name");
    if (name && !cJSON_IsString(name)) {
        api_error_set(err, 400, "invalid_request_error", "response_format.json_schema.name", "invalid_type",
                      "response_format.json_schema.name: expected a string");
        return -1;
    }
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(js, "strict");
    if (st && !cJSON_IsBool(st) && !cJSON_IsNull(st)) {
        api_error_set(err, 400, "invalid_request_error", "response_format.json_schema.strict", "invalid_type",
                      "response_format.json_schema.strict: expected a boolean");
        return -1;
    }
    const cJSON *sc = cJSON_GetObjectItemCaseSensitive(js, "schema");
    if (sc && !cJSON_IsObject(sc) && !cJSON_IsBool(sc)) {
        api_error_set(err, 400, "invalid_request_error", "response_format.json_schema.schema", "invalid_type",
                      "response_format.json_schema.schema: expected an object");
        return -1;
    }
    char *text = sc ? cJSON_PrintUnformatted(sc) : strdup("{}");   /* no schema: any JSON value */
    if (!text) {
        api_error_set(err, 500, "api_error", NULL, NULL, "out of memory");
        return -1;
    }
    r->format = API_FORMAT_JSON_SCHEMA;
    r->schema = text;
    return 0;
}

/* What OpenAI offers and pcache does not do yet. */
static int openai_refusals(const cJSON *root, api_request *r, api_error *err) {
    long long ll;
    int k;
    bool b = false;
    if ((k = get_int(root, "best_of", 1, 1e9, &ll, err)) < 0) return -1;
    if (k && ll > 1) return refuse(err, "best_of", "best_of > 1");
    if (get_bool(root, "echo", &b, err) < 0) return -1;
    if (b) return refuse(err, "echo", "echo");
    const char *sfx = NULL;
    if (get_string(root, "suffix", &sfx, err) < 0) return -1;
    if (sfx && *sfx) return refuse(err, "suffix", "suffix (fill-in-the-middle)");
    const cJSON *rf = cJSON_GetObjectItemCaseSensitive(root, "response_format");
    if (rf && !cJSON_IsNull(rf)) {
        const char *t = NULL;
        if (!cJSON_IsObject(rf) || get_string(rf, "type", &t, err) < 0 || !t) {
            api_error_set(err, 400, "invalid_request_error", "response_format", "invalid_type", "response_format: expected an object with a type");
            return -1;
        }
        if (parse_response_format(rf, t, r, err) < 0) return -1;
    }
    const cJSON *fc = cJSON_GetObjectItemCaseSensitive(root, "function_call");
    if (fc && !cJSON_IsNull(fc) && !(cJSON_IsString(fc) && (!strcmp(fc->valuestring, "none") || !strcmp(fc->valuestring, "auto"))))
        return refuse(err, "function_call", "function_call forcing a function (tool calls)");
    if (present(root, "audio")) return refuse(err, "audio", "audio output");
    const cJSON *mod = cJSON_GetObjectItemCaseSensitive(root, "modalities");
    if (mod && !cJSON_IsNull(mod)) {
        if (!cJSON_IsArray(mod)) {
            api_error_set(err, 400, "invalid_request_error", "modalities", "invalid_type", "modalities: expected an array");
            return -1;
        }
        const cJSON *x;
        cJSON_ArrayForEach(x, mod)
            if (!cJSON_IsString(x) || strcmp(x->valuestring, "text")) return refuse(err, "modalities", "an output modality other than text");
    }
    if (present(root, "prediction")) return refuse(err, "prediction", "prediction (predicted outputs)");
    if (present(root, "web_search_options")) return refuse(err, "web_search_options", "web search");
    if (api_tools_active(r) && r->format != API_FORMAT_TEXT)
        return refuse(err, "response_format", "response_format other than text together with tools");
    return 0;
}

static int anthropic_refusals(const cJSON *root, api_error *err) {
    const cJSON *mcp = cJSON_GetObjectItemCaseSensitive(root, "mcp_servers");
    if (cJSON_IsArray(mcp) && cJSON_GetArraySize(mcp) > 0) return refuse(err, "mcp_servers", "MCP servers");
    return 0;
}

static int add_stop(api_request *r, const char *s, int max, const char *param, api_error *err) {
    if (r->n_stop >= max) {
        api_error_set(err, 400, "invalid_request_error", param, "invalid_value",
                      "%s: at most %d stop sequences are supported", param, max);
        return -1;
    }
    if (!s[0]) return 0; /* an empty stop string can never match usefully: ignore it */
    if (!(r->stop[r->n_stop] = strdup(s))) {
        api_error_set(err, 500, "api_error", NULL, NULL, "out of memory");
        return -1;
    }
    r->n_stop++;
    return 0;
}

static int add_msg(api_request *r, const char *role, char *content /* owned */, api_error *err) {
    api_msg *m = realloc(r->msgs, (size_t)(r->n_msgs + 1) * sizeof *m);
    char *rl = strdup(role);
    if (!m || !rl || !content) {
        if (m) r->msgs = m;
        free(rl); free(content);
        api_error_set(err, 500, "api_error", NULL, NULL, "out of memory");
        return -1;
    }
    r->msgs = m;
    memset(&m[r->n_msgs], 0, sizeof *m);
    m[r->n_msgs].role = rl;
    m[r->n_msgs].content = content;
    r->n_msgs++;
    return 0;
}

/* ---------------------------------------------------------------- tools */
static int oom_err(api_error *err) {
    api_error_set(err, 500, "api_error", NULL, NULL, "out of memory");
    return -1;
}

/* Function names as both APIs allow them: letters, digits, _ and -, 1 to 64 (Anthropic 128). */
static bool tool_name_ok(const char *s, size_t max) {
    size_t n = strlen(s);
    if (n == 0 || n > max) return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '.'))
            return false;
    }
    return true;
}

/* Adds a tool; json (the OpenAI-form rendering) is taken over. */
static int push_tool(api_request *r, const char *name, char *json, const cJSON *params, bool strict, const char *param,
                     api_error *err) {
    for (int i = 0; i < r->n_tools; i++)
        if (!strcmp(r->tools[i].name, name)) {
            free(json);
            api_error_set(err, 400, "invalid_request_error", param, "invalid_value", "%s: the tool name '%.64s' is used twice", param, name);
            return -1;
        }
    api_tool *t = realloc(r->tools, (size_t)(r->n_tools + 1) * sizeof *t);
    if (!t) { free(json); return oom_err(err); }
    r->tools = t;
    t = &r->tools[r->n_tools];
    memset(t, 0, sizeof *t);
    t->json = json;
    t->strict = strict;
    t->name = strdup(name);
    if (params) t->parameters = cJSON_PrintUnformatted(params);
    r->n_tools++;
    if (!json || !t->name || (params && !t->parameters)) return oom_err(err);
    return 0;
}

static int push_call(api_msg *m, const char *id, const char *name, const char *args, api_error *err) {
    api_tool_call *c = realloc(m->calls, (size_t)(m->n_calls + 1) * sizeof *c);
    if (!c) return oom_err(err);
    m->calls = c;
    c = &m->calls[m->n_calls++];
    c->id = id ? strdup(id) : NULL;
    c->name = strdup(name);
    c->arguments = strdup(args && *args ? args : "{}");
    if ((id && !c->id) || !c->name || !c->arguments) return oom_err(err);
    return 0;
}

static int tool_choice_named(api_request *r, const char *name, const char *param, api_error *err) {
    for (int i = 0; i < r->n_tools; i++)
        if (!strcmp(r->tools[i].name, name)) {
            r->tool_choice = API_TOOL_NAMED;
            if (!(r->tool_name = strdup(name))) return oom_err(err);
            return 0;
        }
    api_error_set(err, 400, "invalid_request_error", param, "invalid_value", "%s: the tool '%.64s' is not among the tools given", param, name);
    return -1;
}

/* tools: [{type: "function", function: {name, description?, parameters?, strict?}}];
 * tool_choice: "none" | "auto" | "required" | {type: "function", function: {name}};
 * parallel_tool_calls: bool. */
static int parse_openai_tools(const cJSON *root, api_request *r, api_error *err) {
    r->parallel_tool_calls = true;
    if (get_bool(root, "parallel_tool_calls", &r->parallel_tool_calls, err) < 0) return -1;
    const cJSON *tools = cJSON_GetObjectItemCaseSensitive(root, "tools");
    if (tools && !cJSON_IsNull(tools)) {
        if (!cJSON_IsArray(tools)) {
            api_error_set(err, 400, "invalid_request_error", "tools", "invalid_type", "tools: expected an array");
            return -1;
        }
        const cJSON *t;
        int i = 0;
        cJSON_ArrayForEach(t, tools) {
            char param[48];
            snprintf(param, sizeof param, "tools[%d]", i++);
            const char *type = NULL, *name = NULL, *desc = NULL;
            if (!cJSON_IsObject(t) || get_string(t, "type", &type, err) < 0 || !type) {
                api_error_set(err, 400, "invalid_request_error", param, "invalid_type", "%s: expected an object with a type", param);
                return -1;
            }
            if (strcmp(type, "function")) return refuse(err, param, "a tool whose type is not function");
            const cJSON *fn = cJSON_GetObjectItemCaseSensitive(t, "function");
            if (!cJSON_IsObject(fn)) {
                api_error_set(err, 400, "invalid_request_error", param, "missing_required_parameter", "%s.function: required, an object", param);
                return -1;
            }
            if (get_string(fn, "name", &name, err) < 0 || !name || !tool_name_ok(name, 64)) {
                api_error_set(err, 400, "invalid_request_error", param, "invalid_value",
                              "%s.function.name: required, 1 to 64 letters, digits, underscores or dashes", param);
                return -1;
            }
            if (get_string(fn, "description", &desc, err) < 0) return -1;
            bool strict = false;
            if (get_bool(fn, "strict", &strict, err) < 0) return -1;
            const cJSON *params = cJSON_GetObjectItemCaseSensitive(fn, "parameters");
            if (params && cJSON_IsNull(params)) params = NULL;
            if (params && !cJSON_IsObject(params)) {
                api_error_set(err, 400, "invalid_request_error", param, "invalid_type", "%s.function.parameters: expected a JSON schema object", param);
                return -1;
            }
            if (push_tool(r, name, cJSON_PrintUnformatted(t), params, strict, param, err) < 0) return -1;
        }
    }
    const cJSON *tc = cJSON_GetObjectItemCaseSensitive(root, "tool_choice");
    if (!tc || cJSON_IsNull(tc)) return 0;
    if (cJSON_IsString(tc)) {
        const char *v = tc->valuestring;
        if (!strcmp(v, "none")) r->tool_choice = API_TOOL_NONE;
        else if (!strcmp(v, "auto")) r->tool_choice = API_TOOL_AUTO;
        else if (!strcmp(v, "required")) r->tool_choice = API_TOOL_REQUIRED;
        else {
            api_error_set(err, 400, "invalid_request_error", "tool_choice", "invalid_value", "tool_choice: expected none, auto, required or a function");
            return -1;
        }
    } else if (cJSON_IsObject(tc)) {
        const char *type = NULL, *name = NULL;
        const cJSON *fn = cJSON_GetObjectItemCaseSensitive(tc, "function");
        if (get_string(tc, "type", &type, err) < 0 || !type || strcmp(type, "function") || !cJSON_IsObject(fn) ||
            get_string(fn, "name", &name, err) < 0 || !name) {
            api_error_set(err, 400, "invalid_request_error", "tool_choice", "invalid_value",
                          "tool_choice: expected {\"type\": \"function\", \"function\": {\"name\": ...}}");
            return -1;
        }
        if (tool_choice_named(r, name, "tool_choice", err) < 0) return -1;
    } else {
        api_error_set(err, 400, "invalid_request_error", "tool_choice", "invalid_type", "tool_choice: expected a string or an object");
        return -1;
    }
    if ((r->tool_choice == API_TOOL_REQUIRED || r->tool_choice == API_TOOL_NAMED) && r->n_tools == 0) {
        api_error_set(err, 400, "invalid_request_error", "tool_choice", "invalid_value", "tool_choice: only allowed when tools are specified");
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- OpenAI */
/* content: string | array of {type:"text" | "input_text", text} (other part types: 400); null
 * (no content) too, unless null_ok is false; output_ok also takes "output_text" parts (the
 * Responses API, where an earlier reply comes back as input). */
static int content_parts(const cJSON *c, bool null_ok, bool output_ok, sbuf *out, const char *param, api_error *err) {
    if (null_ok && (!c || cJSON_IsNull(c))) return 0;
    if (cJSON_IsString(c)) { sb_str(out, c->valuestring); return 0; }
    if (!cJSON_IsArray(c)) {
        api_error_set(err, 400, "invalid_request_error", param, "invalid_type", "%s: expected a string or an array of content parts", param);
        return -1;
    }
    const cJSON *part;
    cJSON_ArrayForEach(part, c) {
        const char *type = NULL, *text = NULL;
        if (!cJSON_IsObject(part) || get_string(part, "type", &type, err) < 0 || !type) {
            api_error_set(err, 400, "invalid_request_error", param, "invalid_type", "%s: each content part must be an object with a type", param);
            return -1;
        }
        if (strcmp(type, "text") && strcmp(type, "input_text") && !(output_ok && !strcmp(type, "output_text"))) {
            api_error_set(err, 400, "invalid_request_error", param, "invalid_value", "%s: content part type '%.40s' is not supported (text only)", param, type);
            return -1;
        }
        if (get_string(part, "text", &text, err) <= 0) {
            api_error_set(err, 400, "invalid_request_error", param, "invalid_type", "%s: text part without a string 'text'", param);
            return -1;
        }
        sb_str(out, text);
    }
    return 0;
}

static int parse_openai_messages(const cJSON *root, api_request *r, api_error *err) {
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(root, "messages");
    if (!msgs) { api_error_set(err, 400, "invalid_request_error", "messages", "missing_required_parameter", "messages: required"); return -1; }
    if (!cJSON_IsArray(msgs)) { api_error_set(err, 400, "invalid_request_error", "messages", "invalid_type", "messages: expected an array"); return -1; }
    if (cJSON_GetArraySize(msgs) == 0) { api_error_set(err, 400, "invalid_request_error", "messages", "invalid_value", "messages: must not be empty"); return -1; }
    const cJSON *m;
    int i = 0;
    cJSON_ArrayForEach(m, msgs) {
        char param[48];
        snprintf(param, sizeof param, "messages[%d]", i++);
        const char *role = NULL;
        if (!cJSON_IsObject(m)) { api_error_set(err, 400, "invalid_request_error", param, "invalid_type", "%s: expected an object", param); return -1; }
        if (get_string(m, "role", &role, err) < 0) return -1;
        if (!role) { api_error_set(err, 400, "invalid_request_error", param, "missing_required_parameter", "%s.role: required", param); return -1; }
        sbuf b = {0};
        const char *out_role;
        if (!strcmp(role, "system") || !strcmp(role, "developer")) out_role = "system";
        else if (!strcmp(role, "user")) out_role = "user";
        else if (!strcmp(role, "assistant")) out_role = "assistant";
        else if (!strcmp(role, "tool") || !strcmp(role, "function")) out_role = "tool";
        else { api_error_set(err, 400, "invalid_request_error", param, "invalid_value", "%s.role: '%.40s' is not one of system, developer, user, assistant, tool", param, role); return -1; }
        if (content_parts(cJSON_GetObjectItemCaseSensitive(m, "content"), true, false, &b, param, err) < 0) { free(b.p); return -1; }
        if (add_msg(r, out_role, sb_take(&b), err) < 0) return -1;
        const cJSON *calls = cJSON_GetObjectItemCaseSensitive(m, "tool_calls");
        if (calls && !cJSON_IsNull(calls) && !strcmp(out_role, "assistant")) {
            if (!cJSON_IsArray(calls)) {
                api_error_set(err, 400, "invalid_request_error", param, "invalid_type", "%s.tool_calls: expected an array", param);
                return -1;
            }
            const cJSON *c;
            int k = 0;
            cJSON_ArrayForEach(c, calls) {
                const char *id = NULL, *name = NULL;
                const cJSON *fn = cJSON_GetObjectItemCaseSensitive(c, "function");
                if (!cJSON_IsObject(c) || get_string(c, "id", &id, err) < 0 || !cJSON_IsObject(fn) ||
                    get_string(fn, "name", &name, err) < 0 || !name) {
                    api_error_set(err, 400, "invalid_request_error", param, "invalid_value",
                                  "%s.tool_calls[%d]: expected {id, type: \"function\", function: {name, arguments}}", param, k);
                    return -1;
                }
                const cJSON *a = cJSON_GetObjectItemCaseSensitive(fn, "arguments");
                char *printed = a && !cJSON_IsString(a) && !cJSON_IsNull(a) ? cJSON_PrintUnformatted(a) : NULL;
                int rc = push_call(&r->msgs[r->n_msgs - 1], id, name, cJSON_IsString(a) ? a->valuestring : printed, err);
                free(printed);
                if (rc < 0) return -1;
                k++;
            }
        }
    }
    return 0;
}

/* Completions' prompt: a string, an array of one string, or one prompt as token ids (an array
 * of integers, or an array holding one such array). OpenAI also takes a batch (several strings
 * or several arrays of ids: one completion each), which needs n > 1 and is refused. */
static int parse_completion_prompt(const cJSON *p, api_request *r, api_error *err) {
    if (!p) { api_error_set(err, 400, "invalid_request_error", "prompt", "missing_required_parameter", "prompt: required"); return -1; }
    if (cJSON_IsArray(p) && cJSON_GetArraySize(p) == 1 && (cJSON_IsString(p->child) || cJSON_IsArray(p->child))) p = p->child;
    if (cJSON_IsString(p)) {
        r->prompt_len = strlen(p->valuestring);
        if (!(r->prompt = strdup(p->valuestring))) { api_error_set(err, 500, "api_error", NULL, NULL, "out of memory"); return -1; }
        return 0;
    }
    if (!cJSON_IsArray(p)) {
        api_error_set(err, 400, "invalid_request_error", "prompt", "invalid_type",
                      "prompt: expected a string, an array of one string, or an array of token ids (integers)");
        return -1;
    }
    int n = cJSON_GetArraySize(p);
    if (n == 0) { api_error_set(err, 400, "invalid_request_error", "prompt", "invalid_value", "prompt: the array of token ids is empty"); return -1; }
    bool batch = n > 1;
    const cJSON *x;
    cJSON_ArrayForEach(x, p) batch = batch && (cJSON_IsString(x) || cJSON_IsArray(x));
    if (batch) {
        api_error_set(err, 400, "invalid_request_error", "prompt", "unsupported_parameter",
                      "prompt: a batch of %d prompts is not supported by pcache (one completion each, as with n > 1); "
                      "send one prompt per request", n);
        return -1;
    }
    if (!(r->prompt_ids = malloc((size_t)n * sizeof *r->prompt_ids))) { api_error_set(err, 500, "api_error", NULL, NULL, "out of memory"); return -1; }
    int i = 0;
    cJSON_ArrayForEach(x, p) {
        char param[32];
        snprintf(param, sizeof param, "prompt[%d]", i);
        if (!cJSON_IsNumber(x)) {
            api_error_set(err, 400, "invalid_request_error", param, "invalid_type",
                          "%s: expected a token id (an integer): a prompt is a string or one array of token ids, not a mix of types or nested arrays", param);
            return -1;
        }
        double d = x->valuedouble;
        if (!isfinite(d) || d != floor(d)) {
            api_error_set(err, 400, "invalid_request_error", param, "invalid_type", "%s: token id %g is not an integer", param, d);
            return -1;
        }
        if (d < 0 || d > INT32_MAX) {   /* the vocabulary bound is the server's to check */
            api_error_set(err, 400, "invalid_request_error", param, "invalid_value", "%s: token id %g is out of range", param, d);
            return -1;
        }
        r->prompt_ids[i++] = (int32_t)d;
    }
    r->n_prompt_ids = n;
    return 0;
}

static int parse_openai(const cJSON *root, api_request *r, api_error *err) {
    double d;
    long long ll;
    int k;
    const char *s;
    if (r->kind == API_OPENAI_CHAT) {
        if (parse_openai_messages(root, r, err) < 0) return -1;
    } else {
        if (parse_completion_prompt(cJSON_GetObjectItemCaseSensitive(root, "prompt"), r, err) < 0) return -1;
    }
    if ((k = get_number(root, "temperature", 0, 2, &d, err)) < 0) return -1; else if (k) r->sp.temperature = (float)d;
    if ((k = get_number(root, "top_p", 0, 1, &d, err)) < 0) return -1; else if (k) r->sp.top_p = (float)d;
    if ((k = get_int(root, "top_k", -1, 1e9, &ll, err)) < 0) return -1; else if (k) r->sp.top_k = (int)ll;
    if ((k = get_number(root, "min_p", 0, 1, &d, err)) < 0) return -1; else if (k) r->sp.min_p = (float)d;
    if ((k = get_number(root, "presence_penalty", -2, 2, &d, err)) < 0) return -1; else if (k) r->sp.presence_penalty = (float)d;
    if ((k = get_number(root, "frequency_penalty", -2, 2, &d, err)) < 0) return -1; else if (k) r->sp.frequency_penalty = (float)d;
    if ((k = get_number(root, "repeat_penalty", 0, 10, &d, err)) < 0) return -1; else if (k) r->sp.repeat_penalty = (float)d;
    if ((k = get_int(root, "seed", -9.2e18, 9.2e18, &ll, err)) < 0) return -1; else if (k) { r->sp.seed = (uint64_t)ll; r->has_seed = true; }
    if ((k = get_int(root, "n", 1, 1, &ll, err)) < 0) { snprintf(err->message, sizeof err->message, "n: only n=1 is supported"); return -1; }
    if ((k = get_int(root, "max_tokens", 1, 1e9, &ll, err)) < 0) return -1; else if (k) r->max_tokens = (int)ll;
    if ((k = get_int(root, "max_completion_tokens", 1, 1e9, &ll, err)) < 0) return -1; else if (k) r->max_tokens = (int)ll;
    if (get_bool(root, "stream", &r->stream, err) < 0) return -1;
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(root, "stream_options");
    if (so && !cJSON_IsNull(so)) {
        if (!cJSON_IsObject(so)) { api_error_set(err, 400, "invalid_request_error", "stream_options", "invalid_type", "stream_options: expected an object"); return -1; }
        if (!r->stream) { api_error_set(err, 400, "invalid_request_error", "stream_options", "invalid_value", "The 'stream_options' parameter is only allowed when 'stream' is enabled."); return -1; }
        if (get_bool(so, "include_usage", &r->include_usage, err) < 0) { snprintf(err->param, sizeof err->param, "stream_options.include_usage"); return -1; }
    }
    const cJSON *stop = cJSON_GetObjectItemCaseSensitive(root, "stop");
    if (stop && !cJSON_IsNull(stop)) {
        if (cJSON_IsString(stop)) { if (add_stop(r, stop->valuestring, 4, "stop", err) < 0) return -1; }
        else if (cJSON_IsArray(stop)) {
            const cJSON *x;
            cJSON_ArrayForEach(x, stop) {
                if (!cJSON_IsString(x)) { api_error_set(err, 400, "invalid_request_error", "stop", "invalid_type", "stop: expected a string or an array of strings"); return -1; }
                if (add_stop(r, x->valuestring, 4, "stop", err) < 0) return -1;
            }
        } else { api_error_set(err, 400, "invalid_request_error", "stop", "invalid_type", "stop: expected a string or an array of strings"); return -1; }
    }
    s = NULL;
    if (get_string(root, "prompt_cache_key", &s, err) < 0) return -1;
    if (s && !(r->cache_key = strdup(s))) { api_error_set(err, 500, "api_error", NULL, NULL, "out of memory"); return -1; }
    if (r->kind == API_OPENAI_CHAT) {
        bool lp = false;
        if (get_bool(root, "logprobs", &lp, err) < 0) return -1;
        if ((k = get_int(root, "top_logprobs", 0, ENGINE_MAX_TOP_LOGPROBS, &ll, err)) < 0) return -1;
        if (k && !lp) {
            api_error_set(err, 400, "invalid_request_error", "top_logprobs", "invalid_value", "top_logprobs: requires logprobs to be true");
            return -1;
        }
        r->logprobs = lp ? (k ? (int)ll : 0) : -1;
    } else {
        if ((k = get_int(root, "logprobs", 0, 5, &ll, err)) < 0) return -1;
        r->logprobs = k ? (int)ll : -1;
    }
    if (parse_logit_bias(root, r, err) < 0) return -1;
    if (get_bool(root, "ignore_eos", &r->ignore_eos, err) < 0) return -1;
    if (r->kind == API_OPENAI_CHAT && parse_openai_tools(root, r, err) < 0) return -1;
    return openai_refusals(root, r, err);
}


/* ---------------------------------------------------------------- OpenAI Responses */
/* A Responses request is parsed as the Chat Completions request it amounts to: instructions
 * become the system message, input items become messages (message items, function_call items
 * as an assistant's tool_calls, function_call_output items as tool messages), tools are
 * unwrapped from Responses' flat form, text.format becomes response_format and
 * max_output_tokens max_completion_tokens. The normalized items (history first) are kept in
 * r->items for the conversation store. */

/* Appends the chat messages of items (an array) to msgs; also appends each item, normalized,
 * to norm. */
static int responses_items(const cJSON *items, cJSON *msgs, cJSON *norm, const char *what, api_error *err) {
    const cJSON *it;
    int i = 0;
    cJSON_ArrayForEach(it, items) {
        char param[48];
        snprintf(param, sizeof param, "%s[%d]", what, i++);
        const char *type = NULL, *role = NULL;
        if (!cJSON_IsObject(it) || get_string(it, "type", &type, err) < 0 || get_string(it, "role", &role, err) < 0) {
            api_error_set(err, 400, "invalid_request_error", param, "invalid_type", "%s: expected an item object", param);
            return -1;
        }
        if (!type) type = "message";
        cJSON *last = cJSON_GetArrayItem(msgs, cJSON_GetArraySize(msgs) - 1);
        if (!strcmp(type, "message")) {
            if (!role || (strcmp(role, "user") && strcmp(role, "assistant") && strcmp(role, "system") && strcmp(role, "developer"))) {
                api_error_set(err, 400, "invalid_request_error", param, "invalid_value", "%s.role: expected user, assistant, system or developer", param);
                return -1;
            }
            sbuf b = {0};
            sb_add(&b, "", 0);
            if (content_parts(cJSON_GetObjectItemCaseSensitive(it, "content"), false, true, &b, param, err) < 0) { free(b.p); return -1; }
            if (b.oom) { free(b.p); return oom_err(err); }
            cJSON *m = cJSON_CreateObject();
            cJSON_AddStringToObject(m, "role", role);
            cJSON_AddStringToObject(m, "content", b.p);
            cJSON_AddItemToArray(msgs, m);
            cJSON *n = cJSON_CreateObject();   /* normalized: a string content (roles and text are what matter) */
            cJSON_AddStringToObject(n, "type", "message");
            cJSON_AddStringToObject(n, "role", role);
            cJSON_AddStringToObject(n, "content", b.p);
            cJSON_AddItemToArray(norm, n);
            free(b.p);
        } else if (!strcmp(type, "function_call")) {
            const char *call_id = NULL, *name = NULL, *args = NULL;
            if (get_string(it, "call_id", &call_id, err) < 0 || get_string(it, "name", &name, err) < 0 || !name ||
                get_string(it, "arguments", &args, err) < 0) {
                api_error_set(err, 400, "invalid_request_error", param, "invalid_value", "%s: a function_call needs call_id, name and arguments (strings)", param);
                return -1;
            }
            /* calls join the assistant message before them, or make one */
            const char *lr = last ? cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(last, "role")) : NULL;
            if (!lr || strcmp(lr, "assistant")) {
                last = cJSON_CreateObject();
                cJSON_AddStringToObject(last, "role", "assistant");
                cJSON_AddNullToObject(last, "content");
                cJSON_AddItemToArray(msgs, last);
            }
            cJSON *calls = cJSON_GetObjectItemCaseSensitive(last, "tool_calls");
            if (!calls) calls = cJSON_AddArrayToObject(last, "tool_calls");
            cJSON *c = cJSON_CreateObject(), *fn;
            cJSON_AddStringToObject(c, "id", call_id ? call_id : "");
            cJSON_AddStringToObject(c, "type", "function");
            fn = cJSON_AddObjectToObject(c, "function");
            cJSON_AddStringToObject(fn, "name", name);
            cJSON_AddStringToObject(fn, "arguments", args ? args : "{}");
            cJSON_AddItemToArray(calls, c);
            cJSON *n = cJSON_CreateObject();
            cJSON_AddStringToObject(n, "type", "function_call");
            cJSON_AddStringToObject(n, "call_id", call_id ? call_id : "");
            cJSON_AddStringToObject(n, "name", name);
            cJSON_AddStringToObject(n, "arguments", args ? args : "{}");
            cJSON_AddItemToArray(norm, n);
        } else if (!strcmp(type, "function_call_output")) {
            const char *call_id = NULL, *out = NULL;
            const cJSON *o = cJSON_GetObjectItemCaseSensitive(it, "output");
            if (get_string(it, "call_id", &call_id, err) < 0 || !call_id) {
                api_error_set(err, 400, "invalid_request_error", param, "missing_required_parameter", "%s.call_id: required", param);
                return -1;
            }
            sbuf b = {0};
            sb_add(&b, "", 0);
            if (cJSON_IsString(o)) out = o->valuestring;
            else if (o && content_parts(o, false, true, &b, param, err) < 0) { free(b.p); return -1; }
            cJSON *m = cJSON_CreateObject();
            cJSON_AddStringToObject(m, "role", "tool");
            cJSON_AddStringToObject(m, "tool_call_id", call_id);
            cJSON_AddStringToObject(m, "content", out ? out : b.p);
            cJSON_AddItemToArray(msgs, m);
            cJSON *n = cJSON_CreateObject();
            cJSON_AddStringToObject(n, "type", "function_call_output");
            cJSON_AddStringToObject(n, "call_id", call_id);
            cJSON_AddStringToObject(n, "output", out ? out : b.p);
            cJSON_AddItemToArray(norm, n);
            free(b.p);
        } else if (!strcmp(type, "reasoning")) {
            /* an earlier turn's reasoning (as responses return it, and clients that manage the
             * conversation send it back): not part of the prompt, as thinking models' templates
             * drop the reasoning of earlier turns (and Anthropic thinking blocks are dropped) */
        } else {
            api_error_set(err, 400, "invalid_request_error", param, "unsupported_parameter",
                          "%s: input items of type '%.40s' are not supported by pcache (message, function_call, function_call_output, reasoning)", param, type);
            return -1;
        }
    }
    return 0;
}

/* The Chat Completions body a Responses body amounts to (NULL with err). */
static cJSON *responses_to_chat(const cJSON *root, const cJSON *history, api_request *r, api_error *err) {
    static const char *const refused[] = { "background", "conversation", "prompt", "max_tool_calls", NULL };
    for (int i = 0; refused[i]; i++) {
        const cJSON *x = cJSON_GetObjectItemCaseSensitive(root, refused[i]);
        if (x && !cJSON_IsNull(x) && !cJSON_IsFalse(x)) { refuse(err, refused[i], refused[i]); return NULL; }
    }
    const char *tr = NULL;
    if (get_string(root, "truncation", &tr, err) < 0) return NULL;
    if (tr && strcmp(tr, "disabled")) { refuse(err, "truncation", "truncation other than disabled"); return NULL; }
    cJSON *c = cJSON_CreateObject(), *msgs = cJSON_AddArrayToObject(c, "messages"), *norm = cJSON_CreateArray();
    const char *ins = NULL;
    if (get_string(root, "instructions", &ins, err) < 0) goto fail;
    if (ins && *ins) {
        cJSON *m = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "role", "system");
        cJSON_AddStringToObject(m, "content", ins);
        cJSON_AddItemToArray(msgs, m);
        if (!(r->instructions = strdup(ins))) { oom_err(err); goto fail; }
    }
    if (history && responses_items(history, msgs, norm, "previous_response", err) < 0) goto fail;
    const cJSON *in = cJSON_GetObjectItemCaseSensitive(root, "input");
    if (!in) { api_error_set(err, 400, "invalid_request_error", "input", "missing_required_parameter", "input: required"); goto fail; }
    if (cJSON_IsString(in)) {
        cJSON *one = cJSON_CreateArray(), *m = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "role", "user");
        cJSON_AddStringToObject(m, "content", in->valuestring);
        cJSON_AddItemToArray(one, m);
        int rc = responses_items(one, msgs, norm, "input", err);
        cJSON_Delete(one);
        if (rc < 0) goto fail;
    } else if (cJSON_IsArray(in)) {
        if (responses_items(in, msgs, norm, "input", err) < 0) goto fail;
    } else {
        api_error_set(err, 400, "invalid_request_error", "input", "invalid_type", "input: expected a string or an array of items");
        goto fail;
    }
    if (cJSON_GetArraySize(msgs) == 0 || (cJSON_GetArraySize(msgs) == 1 && ins && *ins)) {
        api_error_set(err, 400, "invalid_request_error", "input", "invalid_value", "input: must not be empty");
        goto fail;
    }
    /* sampling and limits */
    static const char *const same[] = { "temperature", "top_p", "stream", "parallel_tool_calls", "seed", "top_k", "min_p",
                                        "presence_penalty", "frequency_penalty", "stop", "logit_bias", "prompt_cache_key",
                                        "cache_salt", NULL };
    for (int i = 0; same[i]; i++) {
        const cJSON *x = cJSON_GetObjectItemCaseSensitive(root, same[i]);
        if (x) cJSON_AddItemToObject(c, same[i], cJSON_Duplicate(x, true));
    }
    const cJSON *mo = cJSON_GetObjectItemCaseSensitive(root, "max_output_tokens");
    if (mo && !cJSON_IsNull(mo)) cJSON_AddItemToObject(c, "max_completion_tokens", cJSON_Duplicate(mo, true));
    /* tools: {type: function, name, description, parameters, strict} */
    const cJSON *tools = cJSON_GetObjectItemCaseSensitive(root, "tools");
    if (tools && !cJSON_IsNull(tools)) {
        if (!cJSON_IsArray(tools)) { api_error_set(err, 400, "invalid_request_error", "tools", "invalid_type", "tools: expected an array"); goto fail; }
        cJSON *ct = cJSON_AddArrayToObject(c, "tools");
        const cJSON *t;
        int i = 0;
        cJSON_ArrayForEach(t, tools) {
            char param[32];
            snprintf(param, sizeof param, "tools[%d]", i++);
            const char *type = NULL;
            if (!cJSON_IsObject(t) || get_string(t, "type", &type, err) < 0 || !type) {
                api_error_set(err, 400, "invalid_request_error", param, "invalid_type", "%s: expected an object with a type", param);
                goto fail;
            }
            if (strcmp(type, "function")) { refuse(err, param, "tools other than function tools (web search, file search, ...)"); goto fail; }
            cJSON *w = cJSON_CreateObject(), *fn;
            cJSON_AddStringToObject(w, "type", "function");
            fn = cJSON_AddObjectToObject(w, "function");
            static const char *const keys[] = { "name", "description", "parameters", "strict", NULL };
            for (int k = 0; keys[k]; k++) {
                const cJSON *x = cJSON_GetObjectItemCaseSensitive(t, keys[k]);
                if (x) cJSON_AddItemToObject(fn, keys[k], cJSON_Duplicate(x, true));
            }
            cJSON_AddItemToArray(ct, w);
        }
    }
    const cJSON *tc = cJSON_GetObjectItemCaseSensitive(root, "tool_choice");
    if (cJSON_IsObject(tc)) {   /* {type: function, name} */
        const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(tc, "name"));
        cJSON *w = cJSON_CreateObject();
        cJSON_AddStringToObject(w, "type", "function");
        cJSON_AddStringToObject(cJSON_AddObjectToObject(w, "function"), "name", name ? name : "");
        cJSON_AddItemToObject(c, "tool_choice", w);
    } else if (tc) {
        cJSON_AddItemToObject(c, "tool_choice", cJSON_Duplicate(tc, true));
    }
    /* text.format: {type: text | json_object | json_schema, name, schema, strict} */
    const cJSON *text = cJSON_GetObjectItemCaseSensitive(root, "text");
    const cJSON *fmt = cJSON_IsObject(text) ? cJSON_GetObjectItemCaseSensitive(text, "format") : NULL;
    if (fmt && !cJSON_IsNull(fmt)) {
        const char *ft = cJSON_IsObject(fmt) ? cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(fmt, "type")) : NULL;
        if (!ft) { api_error_set(err, 400, "invalid_request_error", "text.format", "invalid_type", "text.format: expected an object with a type"); goto fail; }
        cJSON *rf = cJSON_CreateObject();
        cJSON_AddStringToObject(rf, "type", ft);
        if (!strcmp(ft, "json_schema")) {
            cJSON *js = cJSON_AddObjectToObject(rf, "json_schema");
            static const char *const keys[] = { "name", "schema", "strict", NULL };
            for (int k = 0; keys[k]; k++) {
                const cJSON *x = cJSON_GetObjectItemCaseSensitive(fmt, keys[k]);
                if (x) cJSON_AddItemToObject(js, keys[k], cJSON_Duplicate(x, true));
            }
        }
        cJSON_AddItemToObject(c, "response_format", rf);
    }
    bool store = true;
    if (get_bool(root, "store", &store, err) < 0) goto fail;
    r->store = store;
    const char *prev = NULL;
    if (get_string(root, "previous_response_id", &prev, err) < 0) goto fail;
    if (prev && !(r->prev_id = strdup(prev))) { oom_err(err); goto fail; }
    if (!(r->items = cJSON_PrintUnformatted(norm))) { oom_err(err); goto fail; }
    cJSON_Delete(norm);
    return c;
fail:
    cJSON_Delete(norm);
    cJSON_Delete(c);
    return NULL;
}

/* ---------------------------------------------------------------- Anthropic */
typedef struct { int n; bool seen_5m; } bp_count;

/* cache_control: absent/null -> 0; {type:"ephemeral", ttl?:"5m"|"1h"} -> 1 with *ttl; else -1. */
static int cache_control(const cJSON *blk, const char *param, bp_count *bc, double *ttl, api_error *err) {
    const cJSON *cc = cJSON_GetObjectItemCaseSensitive(blk, "cache_control");
    if (!cc || cJSON_IsNull(cc)) return 0;
    const char *type = NULL, *t = NULL;
    if (!cJSON_IsObject(cc) || get_string(cc, "type", &type, err) < 0 || !type || strcmp(type, "ephemeral")) {
        api_error_set(err, 400, "invalid_request_error", param, NULL, "%s.cache_control: expected {\"type\": \"ephemeral\"}", param);
        return -1;
    }
    if (get_string(cc, "ttl", &t, err) < 0) { api_error_set(err, 400, "invalid_request_error", param, NULL, "%s.cache_control.ttl: expected \"5m\" or \"1h\"", param); return -1; }
    if (!t || !strcmp(t, "5m")) *ttl = 300;
    else if (!strcmp(t, "1h")) *ttl = 3600;
    else { api_error_set(err, 400, "invalid_request_error", param, NULL, "%s.cache_control.ttl: expected \"5m\" or \"1h\"", param); return -1; }
    /* Anthropic: longer-lived entries must come before shorter ones in the prompt. */
    if (*ttl == 3600 && bc->seen_5m) {
        api_error_set(err, 400, "invalid_request_error", param, NULL, "a ttl='1h' cache_control block must not come after a ttl='5m' cache_control block");
        return -1;
    }
    if (*ttl == 300) bc->seen_5m = true;
    bc->n++;
    return 1;
}

static void msg_add_bp(api_msg *m, size_t off, double ttl) {
    if (m->n_bp < ENGINE_MAX_BREAKPOINTS) { m->bp[m->n_bp].off = off; m->bp[m->n_bp].ttl_s = ttl; m->n_bp++; }
}

/* Text of one content block into b; a breakpoint at its end goes to bps. */
static int anthropic_block(const cJSON *blk, const char *param, bool in_system, sbuf *b, api_msg *bpm,
                           bp_count *bc, api_error *err) {
    const char *type = NULL, *text = NULL;
    if (!cJSON_IsObject(blk)) { api_error_set(err, 400, "invalid_request_error", param, NULL, "%s: expected a content block object", param); return -1; }
    if (get_string(blk, "type", &type, err) < 0 || !type) { api_error_set(err, 400, "invalid_request_error", param, NULL, "%s.type: Field required", param); return -1; }
    if (b->n) sb_str(b, "\n");
    if (!strcmp(type, "text")) {
        if (get_string(blk, "text", &text, err) <= 0) { api_error_set(err, 400, "invalid_request_error", param, NULL, "%s.text: Field required (a string)", param); return -1; }
        sb_str(b, text);
    } else if (in_system) {
        api_error_set(err, 400, "invalid_request_error", param, NULL, "%s.type: system blocks must be of type 'text'", param);
        return -1;
    } else if (!strcmp(type, "thinking") || !strcmp(type, "redacted_thinking")) {
        /* previous thinking is not part of the prompt */
    } else {
        api_error_set(err, 400, "invalid_request_error", param, NULL, "%s.type: content block type '%.40s' is not supported", param, type);
        return -1;
    }
    double ttl;
    int k = cache_control(blk, param, bc, &ttl, err);
    if (k < 0) return -1;
    if (k) msg_add_bp(bpm, b->n, ttl);
    return 0;
}

/* Anthropic tools: [{name, description?, input_schema, cache_control?, type?: "custom"}] become
 * OpenAI-form tools (the chat templates' form). Server tools (web search, bash, text editor,
 * ...) are refused. A cache_control on a tool marks the prompt up to the end of the tools:
 * *tools_ttl gets its ttl (the last one), 0 when none. */
static int anthropic_tools(const cJSON *root, api_request *r, bp_count *bc, double *tools_ttl, api_error *err) {
    *tools_ttl = 0;
    r->parallel_tool_calls = true;
    const cJSON *tools = cJSON_GetObjectItemCaseSensitive(root, "tools");
    if (tools && !cJSON_IsNull(tools)) {
        if (!cJSON_IsArray(tools)) { api_error_set(err, 400, "invalid_request_error", "tools", NULL, "tools: Input should be a valid list"); return -1; }
        const cJSON *t;
        int i = 0;
        cJSON_ArrayForEach(t, tools) {
            char param[32];
            snprintf(param, sizeof param, "tools.%d", i++);
            const char *name = NULL, *type = NULL, *desc = NULL;
            if (!cJSON_IsObject(t) || get_string(t, "name", &name, err) < 0 || !name) {
                api_error_set(err, 400, "invalid_request_error", param, NULL, "%s.name: Field required", param);
                return -1;
            }
            if (get_string(t, "type", &type, err) < 0) return -1;
            if (type && strcmp(type, "custom")) return refuse(err, param, "a server tool (type other than custom)");
            if (!tool_name_ok(name, 128)) {
                api_error_set(err, 400, "invalid_request_error", param, NULL, "%s.name: String should match pattern '^[a-zA-Z0-9_-]{1,128}$'", param);
                return -1;
            }
            if (get_string(t, "description", &desc, err) < 0) return -1;
            const cJSON *schema = cJSON_GetObjectItemCaseSensitive(t, "input_schema");
            if (!cJSON_IsObject(schema)) {
                api_error_set(err, 400, "invalid_request_error", param, NULL, "%s.input_schema: Field required (a JSON schema object)", param);
                return -1;
            }
            double ttl;
            int k = cache_control(t, param, bc, &ttl, err);
            if (k < 0) return -1;
            if (k) *tools_ttl = ttl;
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "type", "function");
            cJSON *fn = cJSON_AddObjectToObject(o, "function");
            cJSON_AddStringToObject(fn, "name", name);
            if (desc) cJSON_AddStringToObject(fn, "description", desc);
            cJSON_AddItemToObject(fn, "parameters", cJSON_Duplicate(schema, 1));
            char *json = cJSON_PrintUnformatted(o);
            cJSON_Delete(o);
            if (push_tool(r, name, json, schema, false, param, err) < 0) return -1;
        }
    }
    const cJSON *tc = cJSON_GetObjectItemCaseSensitive(root, "tool_choice");
    if (!tc || cJSON_IsNull(tc)) return 0;
    const char *t = NULL, *name = NULL;
    if (!cJSON_IsObject(tc) || get_string(tc, "type", &t, err) < 0 || !t) {
        api_error_set(err, 400, "invalid_request_error", "tool_choice", NULL, "tool_choice: expected an object with a type");
        return -1;
    }
    bool no_parallel = false;
    if (get_bool(tc, "disable_parallel_tool_use", &no_parallel, err) < 0) return -1;
    r->parallel_tool_calls = !no_parallel;
    if (!strcmp(t, "auto")) r->tool_choice = API_TOOL_AUTO;
    else if (!strcmp(t, "none")) r->tool_choice = API_TOOL_NONE;
    else if (!strcmp(t, "any")) r->tool_choice = API_TOOL_REQUIRED;
    else if (!strcmp(t, "tool")) {
        if (get_string(tc, "name", &name, err) < 0 || !name) {
            api_error_set(err, 400, "invalid_request_error", "tool_choice.name", NULL, "tool_choice.name: Field required");
            return -1;
        }
        if (tool_choice_named(r, name, "tool_choice.name", err) < 0) return -1;
    } else {
        api_error_set(err, 400, "invalid_request_error", "tool_choice.type", NULL, "tool_choice.type: expected 'auto', 'any', 'tool' or 'none'");
        return -1;
    }
    if ((r->tool_choice == API_TOOL_REQUIRED || r->tool_choice == API_TOOL_NAMED) && r->n_tools == 0) {
        api_error_set(err, 400, "invalid_request_error", "tool_choice", NULL, "tool_choice: a forced tool call needs tools");
        return -1;
    }
    return 0;
}

/* System message = the system text; breakpoints inside it. */
static int anthropic_system(const cJSON *root, api_request *r, bp_count *bc, api_error *err) {
    const cJSON *sys = cJSON_GetObjectItemCaseSensitive(root, "system");
    if (sys && cJSON_IsNull(sys)) sys = NULL;
    if (sys && !cJSON_IsString(sys) && !cJSON_IsArray(sys)) { api_error_set(err, 400, "invalid_request_error", "system", NULL, "system: expected a string or an array of text blocks"); return -1; }
    if (!sys) return 0;
    sbuf b = {0};
    api_msg m = {0};
    {
        if (cJSON_IsString(sys)) sb_str(&b, sys->valuestring);
        else {
            sbuf sb = {0};
            const cJSON *blk;
            int i = 0;
            size_t base = b.n;
            api_msg tmp = {0};
            cJSON_ArrayForEach(blk, sys) {
                char param[32];
                snprintf(param, sizeof param, "system.%d", i++);
                if (anthropic_block(blk, param, true, &sb, &tmp, bc, err) < 0) { free(sb.p); free(b.p); return -1; }
            }
            if (sb.p) sb_add(&b, sb.p, sb.n);
            free(sb.p);
            for (int j = 0; j < tmp.n_bp; j++) msg_add_bp(&m, base + tmp.bp[j].off, tmp.bp[j].ttl_s);
        }
    }
    int nbp = m.n_bp;
    if (add_msg(r, "system", sb_take(&b), err) < 0) return -1;
    api_msg *dst = &r->msgs[r->n_msgs - 1];
    memcpy(dst->bp, m.bp, sizeof m.bp);
    dst->n_bp = nbp;
    return 0;
}

static void free_calls(api_msg *m) {
    for (int i = 0; i < m->n_calls; i++) { free(m->calls[i].id); free(m->calls[i].name); free(m->calls[i].arguments); }
    free(m->calls);
    m->calls = NULL;
    m->n_calls = 0;
}

/* Adds the turn built so far (text b, breakpoints and calls in tmp, both taken over and reset). */
static int flush_turn(api_request *r, const char *role, sbuf *b, api_msg *tmp, api_error *err) {
    char *text = sb_take(b);
    memset(b, 0, sizeof *b);
    if (add_msg(r, role, text, err) < 0) { free_calls(tmp); return -1; }
    api_msg *dst = &r->msgs[r->n_msgs - 1];
    memcpy(dst->bp, tmp->bp, sizeof tmp->bp);
    dst->n_bp = tmp->n_bp;
    dst->calls = tmp->calls;
    dst->n_calls = tmp->n_calls;
    memset(tmp, 0, sizeof *tmp);
    return 0;
}

/* tool_use {id, name, input}: a call of the assistant turn. */
static int anthropic_tool_use(const cJSON *blk, const char *param, bool assistant, sbuf *b, api_msg *tmp, bp_count *bc,
                              api_error *err) {
    const char *id = NULL, *name = NULL;
    if (!assistant) { api_error_set(err, 400, "invalid_request_error", param, NULL, "%s: tool_use blocks belong in assistant messages", param); return -1; }
    if (get_string(blk, "id", &id, err) < 0 || get_string(blk, "name", &name, err) < 0) return -1;
    if (!id || !name) { api_error_set(err, 400, "invalid_request_error", param, NULL, "%s: tool_use needs an id and a name", param); return -1; }
    const cJSON *input = cJSON_GetObjectItemCaseSensitive(blk, "input");
    if (input && !cJSON_IsObject(input)) { api_error_set(err, 400, "invalid_request_error", param, NULL, "%s.input: Input should be a valid dictionary", param); return -1; }
    char *js = input ? cJSON_PrintUnformatted(input) : NULL;
    int rc = push_call(tmp, id, name, js ? js : "{}", err);
    free(js);
    if (rc < 0) return -1;
    double ttl;
    int k = cache_control(blk, param, bc, &ttl, err);   /* the calls follow the text: its end */
    if (k < 0) return -1;
    if (k) msg_add_bp(tmp, b->n, ttl);
    return 0;
}

/* tool_result {tool_use_id, content (string | text blocks), is_error}: a tool turn. */
static int anthropic_tool_result(const cJSON *blk, const char *param, api_request *r, bp_count *bc, api_error *err) {
    const char *id = NULL;
    bool is_error = false;
    if (get_string(blk, "tool_use_id", &id, err) < 0 || get_bool(blk, "is_error", &is_error, err) < 0) return -1;
    sbuf t = {0};
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(blk, "content");
    if (cJSON_IsString(c)) sb_str(&t, c->valuestring);
    else if (cJSON_IsArray(c)) {
        const cJSON *x;
        cJSON_ArrayForEach(x, c) {
            const char *type = NULL, *text = NULL;
            if (!cJSON_IsObject(x) || get_string(x, "type", &type, err) < 0 || !type || strcmp(type, "text") ||
                get_string(x, "text", &text, err) < 0 || !text) {
                free(t.p);
                api_error_set(err, 400, "invalid_request_error", param, NULL, "%s.content: only text blocks are supported", param);
                return -1;
            }
            if (t.n) sb_str(&t, "\n");
            sb_str(&t, text);
        }
    } else if (c && !cJSON_IsNull(c)) {
        api_error_set(err, 400, "invalid_request_error", param, NULL, "%s.content: expected a string or an array", param);
        return -1;
    }
    api_msg tmp = {0};
    double ttl;
    int k = cache_control(blk, param, bc, &ttl, err);
    if (k < 0) { free(t.p); return -1; }
    if (k) msg_add_bp(&tmp, t.n, ttl);
    return flush_turn(r, "tool", &t, &tmp, err);
}

static int parse_anthropic(const cJSON *root, api_request *r, api_error *err) {
    bp_count bc = {0};
    double d;
    long long ll;
    int k;
    double tools_ttl = 0;
    if (anthropic_tools(root, r, &bc, &tools_ttl, err) < 0) return -1;
    if (anthropic_system(root, r, &bc, err) < 0) return -1;
    const int first_turn = r->n_msgs;
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(root, "messages");
    if (!msgs) { api_error_set(err, 400, "invalid_request_error", "messages", NULL, "messages: Field required"); return -1; }
    if (!cJSON_IsArray(msgs)) { api_error_set(err, 400, "invalid_request_error", "messages", NULL, "messages: Input should be a valid list"); return -1; }
    if (cJSON_GetArraySize(msgs) == 0) { api_error_set(err, 400, "invalid_request_error", "messages", NULL, "messages: at least one message is required"); return -1; }
    const cJSON *m;
    int i = 0, n = cJSON_GetArraySize(msgs);
    cJSON_ArrayForEach(m, msgs) {
        char param[40];
        snprintf(param, sizeof param, "messages.%d", i++);
        const char *role = NULL;
        if (!cJSON_IsObject(m)) { api_error_set(err, 400, "invalid_request_error", param, NULL, "%s: Input should be a valid dictionary", param); return -1; }
        if (get_string(m, "role", &role, err) < 0 || !role || (strcmp(role, "user") && strcmp(role, "assistant"))) {
            api_error_set(err, 400, "invalid_request_error", param, NULL, "%s.role: Input should be 'user' or 'assistant'", param);
            return -1;
        }
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(m, "content");
        sbuf b = {0};
        api_msg tmp = {0};
        const bool assistant = !strcmp(role, "assistant");
        if (cJSON_IsString(c)) sb_str(&b, c->valuestring);
        else if (cJSON_IsArray(c)) {
            const cJSON *blk;
            int j = 0;
            cJSON_ArrayForEach(blk, c) {
                char p2[64];
                snprintf(p2, sizeof p2, "%s.content.%d", param, j++);
                const char *type = NULL;
                if (cJSON_IsObject(blk) && get_string(blk, "type", &type, err) < 0) { free(b.p); free_calls(&tmp); return -1; }
                int rc = 0;
                if (type && !strcmp(type, "tool_use")) rc = anthropic_tool_use(blk, p2, assistant, &b, &tmp, &bc, err);
                else if (type && !strcmp(type, "tool_result")) {
                    /* a tool's result is a turn of its own (role tool), after the text before it */
                    if (assistant) { api_error_set(err, 400, "invalid_request_error", p2, NULL, "%s: tool_result blocks belong in user messages", p2); rc = -1; }
                    else if (b.n || tmp.n_bp) rc = flush_turn(r, role, &b, &tmp, err);
                    if (rc == 0) rc = anthropic_tool_result(blk, p2, r, &bc, err);
                } else rc = anthropic_block(blk, p2, false, &b, &tmp, &bc, err);
                if (rc < 0) { free(b.p); free_calls(&tmp); return -1; }
            }
            if (!b.n && !tmp.n_calls && !tmp.n_bp && r->n_msgs > 0 && !strcmp(r->msgs[r->n_msgs - 1].role, "tool")) {
                free(b.p);   /* only tool results: no empty user turn after them */
                continue;
            }
        } else { api_error_set(err, 400, "invalid_request_error", param, NULL, "%s.content: expected a string or a list of content blocks", param); return -1; }
        if (i == n && !strcmp(role, "assistant")) {
            /* Prefill: the reply continues this text. Anthropic rejects trailing whitespace. */
            if (b.n && (b.p[b.n - 1] == ' ' || b.p[b.n - 1] == '\n' || b.p[b.n - 1] == '\t' || b.p[b.n - 1] == '\r')) {
                free(b.p);
                api_error_set(err, 400, "invalid_request_error", param, NULL, "messages: final assistant content cannot end with trailing whitespace");
                return -1;
            }
            r->assistant_prefill = !tmp.n_calls;
        }
        if (flush_turn(r, role, &b, &tmp, err) < 0) return -1;
    }
    /* A breakpoint on the tools: they are rendered before the first turn's text (in the system
     * message, or Llama 3.1's first user message), so it goes at the start of that text. */
    if (tools_ttl > 0 && first_turn < r->n_msgs) {
        api_msg *fm = &r->msgs[first_turn];
        if (fm->n_bp < ENGINE_MAX_BREAKPOINTS) {
            memmove(&fm->bp[1], &fm->bp[0], (size_t)fm->n_bp * sizeof fm->bp[0]);
            fm->bp[0].off = 0;
            fm->bp[0].ttl_s = tools_ttl;
            fm->n_bp++;
        }
    }
    /* Top-level cache_control (Anthropic's automatic caching): a breakpoint at the end of the
     * last block of the last message. */
    {
        double ttl;
        int k2 = cache_control(root, "cache_control", &bc, &ttl, err);
        if (k2 < 0) return -1;
        if (k2 && r->n_msgs > 0) {
            api_msg *last = &r->msgs[r->n_msgs - 1];
            size_t end = strlen(last->content);
            if (last->n_bp == 0 || last->bp[last->n_bp - 1].off != end) msg_add_bp(last, end, ttl);
            else bc.n--; /* the same position is already a breakpoint */
        }
    }
    if (bc.n > ENGINE_MAX_BREAKPOINTS) {
        api_error_set(err, 400, "invalid_request_error", NULL, NULL, "A maximum of %d blocks with cache_control may be provided. Found %d.", ENGINE_MAX_BREAKPOINTS, bc.n);
        return -1;
    }
    r->n_breakpoints = bc.n;
    if (r->kind == API_ANTHROPIC_MESSAGES) {
        const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, "max_tokens");
        if (!mt) { api_error_set(err, 400, "invalid_request_error", "max_tokens", NULL, "max_tokens: Field required"); return -1; }
        if ((k = get_int(root, "max_tokens", 1, 1e9, &ll, err)) < 0) return -1; else if (k) r->max_tokens = (int)ll;
    }
    if ((k = get_number(root, "temperature", 0, 1, &d, err)) < 0) return -1; else if (k) r->sp.temperature = (float)d;
    if ((k = get_number(root, "top_p", 0, 1, &d, err)) < 0) return -1; else if (k) r->sp.top_p = (float)d;
    if ((k = get_int(root, "top_k", 0, 1e9, &ll, err)) < 0) return -1; else if (k) r->sp.top_k = (int)ll;
    if ((k = get_int(root, "seed", -9.2e18, 9.2e18, &ll, err)) < 0) return -1; else if (k) { r->sp.seed = (uint64_t)ll; r->has_seed = true; }
    if (get_bool(root, "stream", &r->stream, err) < 0) return -1;
    const cJSON *stop = cJSON_GetObjectItemCaseSensitive(root, "stop_sequences");
    if (stop && !cJSON_IsNull(stop)) {
        if (!cJSON_IsArray(stop)) { api_error_set(err, 400, "invalid_request_error", "stop_sequences", NULL, "stop_sequences: Input should be a valid list"); return -1; }
        const cJSON *x;
        cJSON_ArrayForEach(x, stop) {
            if (!cJSON_IsString(x)) { api_error_set(err, 400, "invalid_request_error", "stop_sequences", NULL, "stop_sequences: Input should be a valid string"); return -1; }
            if (add_stop(r, x->valuestring, API_MAX_STOP, "stop_sequences", err) < 0) return -1;
        }
    }
    return anthropic_refusals(root, err);
}

/* ---------------------------------------------------------------- thinking models */
/* What a request says about reasoning blocks: reasoning_format (llama.cpp's: "none" leaves the
 * block inline in the content), chat_template_kwargs.enable_thinking (vLLM's and llama.cpp's
 * way to turn Qwen3's thinking off), Anthropic `thinking` and Responses `reasoning` (their
 * levels, budget_tokens and effort, are not used: see want_thinking). Whether the model reasons
 * at all is the server's to check. */
static int parse_reasoning(const cJSON *root, api_kind kind, api_request *r, api_error *err) {
    const char *rf = NULL;
    if (get_string(root, "reasoning_format", &rf, err) < 0) return -1;
    if (rf) {
        if (!strcmp(rf, "none")) r->reasoning_format = API_REASONING_NONE;
        else if (!strcmp(rf, "auto") || !strcmp(rf, "deepseek")) r->reasoning_format = API_REASONING_SPLIT;
        else {
            api_error_set(err, 400, "invalid_request_error", "reasoning_format", "invalid_value",
                          "reasoning_format: '%.60s' is not supported (none, auto or deepseek)", rf);
            return -1;
        }
    }
    const cJSON *kw = cJSON_GetObjectItemCaseSensitive(root, "chat_template_kwargs");
    if (kw && !cJSON_IsNull(kw)) {
        if (!cJSON_IsObject(kw)) {
            api_error_set(err, 400, "invalid_request_error", "chat_template_kwargs", "invalid_type", "chat_template_kwargs: expected an object");
            return -1;
        }
        const cJSON *x;
        cJSON_ArrayForEach(x, kw) {
            if (!strcmp(x->string, "enable_thinking")) {
                if (!cJSON_IsBool(x)) {
                    api_error_set(err, 400, "invalid_request_error", "chat_template_kwargs.enable_thinking", "invalid_type",
                                  "chat_template_kwargs.enable_thinking: expected a boolean");
                    return -1;
                }
                r->no_thinking = cJSON_IsFalse(x);
            } else {   /* templates are rendered by pcache's own code, which knows only this one */
                api_error_set(err, 400, "invalid_request_error", "chat_template_kwargs", "unsupported_parameter",
                              "chat_template_kwargs: the template argument '%.60s' is not supported by pcache (only enable_thinking)", x->string);
                return -1;
            }
        }
    }
    if (api_is_anthropic(kind)) {
        const cJSON *th = cJSON_GetObjectItemCaseSensitive(root, "thinking");
        if (th && !cJSON_IsNull(th)) {
            const char *t = NULL;
            if (!cJSON_IsObject(th) || get_string(th, "type", &t, err) < 0 || !t) {
                api_error_set(err, 400, "invalid_request_error", "thinking", NULL, "thinking: expected an object with a type");
                return -1;
            }
            if (!strcmp(t, "enabled") || !strcmp(t, "adaptive")) r->want_thinking = "thinking";
            else if (!strcmp(t, "disabled")) r->no_thinking = true;
            else {
                api_error_set(err, 400, "invalid_request_error", "thinking.type", NULL,
                              "thinking.type: expected 'enabled', 'adaptive' or 'disabled', not '%.40s'", t);
                return -1;
            }
        }
    }
    if (kind == API_OPENAI_RESPONSES) {
        const cJSON *rs = cJSON_GetObjectItemCaseSensitive(root, "reasoning");
        if (rs && !cJSON_IsNull(rs)) {
            const char *effort = NULL, *summary = NULL;
            if (!cJSON_IsObject(rs) || get_string(rs, "effort", &effort, err) < 0 || get_string(rs, "summary", &summary, err) < 0) {
                api_error_set(err, 400, "invalid_request_error", "reasoning", "invalid_type", "reasoning: expected an object (effort, summary)");
                return -1;
            }
            static const char *const efforts[] = { "minimal", "low", "medium", "high", "xhigh", NULL };
            bool known = !effort || !strcmp(effort, "none");
            for (int i = 0; efforts[i] && !known; i++) known = !strcmp(effort, efforts[i]);
            if (!known) {
                api_error_set(err, 400, "invalid_request_error", "reasoning.effort", "invalid_value",
                              "reasoning.effort: '%.40s' is not one of none, minimal, low, medium, high, xhigh", effort);
                return -1;
            }
            /* summary: the reasoning is returned whole (as reasoning_text), never summarized */
            if (effort && !strcmp(effort, "none")) r->no_thinking = true;
            else if (effort) r->want_thinking = "reasoning";
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- entry points */
void api_request_free(api_request *r) {
    if (!r) return;
    free(r->model);
    for (int i = 0; i < r->n_msgs; i++) { free(r->msgs[i].role); free(r->msgs[i].content); free_calls(&r->msgs[i]); }
    free(r->msgs);
    for (int i = 0; i < r->n_tools; i++) { free(r->tools[i].name); free(r->tools[i].json); free(r->tools[i].parameters); }
    free(r->tools);
    free(r->tool_name);
    free(r->prompt);
    free(r->prompt_ids);
    for (int i = 0; i < r->n_stop; i++) free(r->stop[i]);
    free(r->cache_key);
    free(r->logit_bias);
    free(r->cache_salt);
    free(r->schema);
    free(r->instructions);
    free(r->prev_id);
    free(r->items);
    memset(r, 0, sizeof *r);
    r->logprobs = -1;
}

static int parse_body(api_kind kind, const char *body, size_t len, const char *history, api_request *out, api_error *err);
int api_parse(api_kind kind, const char *body, size_t len, api_request *out, api_error *err) {
    return parse_body(kind, body, len, NULL, out, err);
}
int api_parse_responses(const char *body, size_t len, const char *history, api_request *out, api_error *err) {
    return parse_body(API_OPENAI_RESPONSES, body, len, history, out, err);
}

static int parse_body(api_kind kind, const char *body, size_t len, const char *history, api_request *out, api_error *err) {
    memset(out, 0, sizeof *out);
    out->kind = kind;
    out->max_tokens = -1;
    out->logprobs = -1;
    sample_params_default(&out->sp);
    cJSON *root = NULL;
    const char *end = NULL;
    if (!body || len == 0) BAD(NULL, "request body is empty; expected a JSON object");
    if (len > API_MAX_BODY) {
        api_error_set(err, 413, api_is_anthropic(kind) ? "request_too_large" : "invalid_request_error", NULL, NULL,
                      "request body is larger than %u bytes", API_MAX_BODY);
        goto fail;
    }
    if (memchr(body, 0, len)) BAD(NULL, "request body is not valid JSON (NUL byte)");
    size_t bad = utf8_bad_at((const unsigned char *)body, len);
    if (bad < len) BAD(NULL, "request body is not valid UTF-8 (byte %zu)", bad);
    /* \u0000 would become a NUL that silently cuts a C string short (two different salts or
     * stop strings could end up equal): refused. An escape is one preceded by an odd number of
     * backslashes. */
    for (const char *q = body; (q = memmem(q, (size_t)(body + len - q), "u0000", 5)) != NULL; q += 5) {
        size_t at = (size_t)(q - body), nb = 0;
        while (nb < at && body[at - nb - 1] == '\\') nb++;
        if (nb % 2 == 1) BAD(NULL, "request body: \\u0000 (NUL) is not allowed in strings");
    }
    root = cJSON_ParseWithLengthOpts(body, len, &end, false);
    if (!root) BAD(NULL, "request body is not valid JSON (error near byte %zu)", end && end >= body ? (size_t)(end - body) : (size_t)0);
    for (const char *p = end; p && p < body + len; p++)
        if (*p != ' ' && *p != '\n' && *p != '\r' && *p != '\t') BAD(NULL, "request body is not valid JSON (trailing data)");
    if (!cJSON_IsObject(root)) BAD(NULL, "request body must be a JSON object");
    const char *model = NULL;
    if (get_string(root, "model", &model, err) < 0) goto fail;
    if (model && !(out->model = strdup(model))) { api_error_set(err, 500, "api_error", NULL, NULL, "out of memory"); goto fail; }
    if (kind == API_OPENAI_RESPONSES) {   /* parsed as the chat request it amounts to */
        cJSON *hist = history ? cJSON_Parse(history) : NULL;
        if (history && !cJSON_IsArray(hist)) { cJSON_Delete(hist); api_error_set(err, 500, "api_error", NULL, NULL, "a stored conversation is unreadable"); goto fail; }
        cJSON *chat = responses_to_chat(root, hist, out, err);
        cJSON_Delete(hist);
        if (!chat) goto fail;
        out->kind = API_OPENAI_CHAT;
        int rc = parse_openai(chat, out, err);
        out->kind = API_OPENAI_RESPONSES;
        cJSON_Delete(chat);
        if (rc < 0) goto fail;
    } else if ((api_is_anthropic(kind) ? parse_anthropic(root, out, err) : parse_openai(root, out, err)) < 0) {
        goto fail;
    }
    if (parse_cache_salt(root, out, err) < 0) goto fail;
    if (parse_reasoning(root, kind, out, err) < 0) goto fail;
    cJSON_Delete(root);
    return 0;
fail:
    cJSON_Delete(root);
    api_request_free(out);
    out->kind = kind;
    return -1;
}

/* ---------------------------------------------------------------- rendering */
int api_byte_to_token(const size_t *tok_end, int n_tok, size_t off) {
    int lo = 0, hi = n_tok; /* first index with tok_end > off */
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (tok_end[mid] <= off) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* Renders msgs (the last one raw after a generation prompt if prefill), with the tools unless
 * tool_choice is none (the model is then not to call any: it is not shown them, as vLLM does). */
static char *render_n(const api_request *r, const chat_msg *cm, int n, api_template_fn fn, void *ctx, bool gen) {
    const char **tools = NULL;
    int nt = r->tool_choice == API_TOOL_NONE ? 0 : r->n_tools;
    if (nt > 0 && !(tools = malloc((size_t)nt * sizeof *tools))) return NULL;
    for (int i = 0; i < nt; i++) tools[i] = r->tools[i].json;
    char *s = fn(ctx, cm, n, tools, nt, gen);
    free(tools);
    return s;
}

static char *render_msgs(const api_request *r, const chat_msg *cm, api_template_fn fn, void *ctx) {
    int n = r->n_msgs;
    if (!r->assistant_prefill) return render_n(r, cm, n, fn, ctx, true);
    char *head = render_n(r, cm, n - 1, fn, ctx, true);
    if (!head) return NULL;
    size_t a = strlen(head), b = strlen(cm[n - 1].content);
    char *s = realloc(head, a + b + 1);
    if (!s) { free(head); return NULL; }
    memcpy(s + a, cm[n - 1].content, b + 1);
    return s;
}

/* A marker no content contains: \x1f + "PCBP" + \x1f (checked). */
#define MARK "\x1fPCBP\x1f"
#define MARK_LEN 6

int api_render(const api_request *r, api_template_fn fn, void *ctx, char **prompt, size_t *len,
               api_bp *bps, int *n_bps, api_error *err) {
    *prompt = NULL; *len = 0; *n_bps = 0;
    if (r->kind == API_OPENAI_COMPLETION) {
        if (!(*prompt = strdup(r->prompt ? r->prompt : ""))) goto oom;
        *len = strlen(*prompt);
        return 0;
    }
    if (r->n_msgs <= 0) { api_error_set(err, 400, "invalid_request_error", "messages", NULL, "no messages"); return -1; }
    chat_msg *cm = calloc((size_t)r->n_msgs, sizeof *cm);
    char **marked = calloc((size_t)r->n_msgs, sizeof *marked);
    int n_calls = 0;
    for (int i = 0; i < r->n_msgs; i++) n_calls += r->msgs[i].n_calls;
    chat_tool_call *tc = calloc((size_t)n_calls + 1, sizeof *tc);
    char *plain = NULL, *mk = NULL;
    if (!cm || !marked || !tc) { free(cm); free(marked); free(tc); goto oom; }
    int total_bp = 0;
    bool marker_ok = true;
    for (int i = 0, k = 0; i < r->n_msgs; i++) {
        cm[i].role = r->msgs[i].role;
        cm[i].content = r->msgs[i].content;
        cm[i].tool_calls = tc + k;
        cm[i].n_tool_calls = r->msgs[i].n_calls;
        for (int j = 0; j < r->msgs[i].n_calls; j++, k++) {
            tc[k].name = r->msgs[i].calls[j].name;
            tc[k].arguments = r->msgs[i].calls[j].arguments;
        }
        total_bp += r->msgs[i].n_bp;
        if (strstr(r->msgs[i].content, "\x1f")) marker_ok = false;
    }
    plain = render_msgs(r, cm, fn, ctx);
    if (!plain) { api_error_set(err, 500, "api_error", NULL, NULL, "chat template rendering failed"); goto fail; }
    if (total_bp > 0) {
        if (total_bp > ENGINE_MAX_BREAKPOINTS) total_bp = ENGINE_MAX_BREAKPOINTS;
        /* Content with markers at each breakpoint. */
        for (int i = 0; i < r->n_msgs && marker_ok; i++) {
            const api_msg *m = &r->msgs[i];
            if (!m->n_bp) continue;
            size_t cl = strlen(m->content);
            sbuf b = {0};
            size_t at = 0;
            for (int j = 0; j < m->n_bp; j++) {
                size_t off = m->bp[j].off < cl ? m->bp[j].off : cl;
                if (off < at) off = at;
                sb_add(&b, m->content + at, off - at);
                sb_add(&b, MARK, MARK_LEN);
                at = off;
            }
            sb_add(&b, m->content + at, cl - at);
            if (!(marked[i] = sb_take(&b))) { marker_ok = false; break; }
            cm[i].content = marked[i];
        }
        if (marker_ok) mk = render_msgs(r, cm, fn, ctx);
        /* Strip markers, recording where they were. */
        int nb = 0;
        if (mk) {
            size_t w = 0, pl = strlen(plain);
            char *p = mk;
            for (char *q; (q = strstr(p, MARK)) != NULL; p = q + MARK_LEN) {
                w += (size_t)(q - p);
                if (nb < total_bp) bps[nb].off = w;
                nb++;
            }
            w += strlen(p);
            /* verify: stripped == plain */
            bool same = (w == pl) && nb == total_bp;
            if (same) {
                size_t k = 0;
                p = mk;
                for (char *q; same && (q = strstr(p, MARK)) != NULL; p = q + MARK_LEN) {
                    size_t seg = (size_t)(q - p);
                    if (memcmp(plain + k, p, seg)) same = false;
                    k += seg;
                }
                if (same && memcmp(plain + k, p, strlen(p))) same = false;
            }
            if (!same) nb = 0;
        }
        if (nb == total_bp) {
            int j = 0;
            for (int i = 0; i < r->n_msgs; i++)
                for (int t = 0; t < r->msgs[i].n_bp && j < total_bp; t++) bps[j++].ttl_s = r->msgs[i].bp[t].ttl_s;
        } else {
            /* Fallback: a breakpoint in message i covers the rendering of messages [0, i]
             * (as far as it is a prefix of the whole prompt). */
            int j = 0;
            for (int i = 0; i < r->n_msgs; i++) cm[i].content = r->msgs[i].content;
            for (int i = 0; i < r->n_msgs && j < total_bp; i++) {
                if (!r->msgs[i].n_bp) continue;
                char *pre = render_n(r, cm, i + 1, fn, ctx, false);
                size_t k = 0;
                if (pre) while (pre[k] && plain[k] == pre[k]) k++;
                free(pre);
                for (int t = 0; t < r->msgs[i].n_bp && j < total_bp; t++) { bps[j].off = k; bps[j].ttl_s = r->msgs[i].bp[t].ttl_s; j++; }
            }
            total_bp = j;
        }
        *n_bps = total_bp;
    }
    for (int i = 0; i < r->n_msgs; i++) free(marked[i]);
    free(marked); free(cm); free(mk); free(tc);
    *prompt = plain;
    *len = strlen(plain);
    return 0;
fail:
    for (int i = 0; i < r->n_msgs; i++) free(marked[i]);
    free(marked); free(cm); free(mk); free(plain); free(tc);
    return -1;
oom:
    api_error_set(err, 500, "api_error", NULL, NULL, "out of memory");
    return -1;
}

/* ---------------------------------------------------------------- formatting */
const char *api_openai_finish(finish_reason why) {
    switch (why) {
    case FINISH_LENGTH: return "length";
    default: return "stop";
    }
}

const char *api_anthropic_stop(finish_reason why, int stop_matched) {
    if (why == FINISH_LENGTH) return "max_tokens";
    if (why == FINISH_STOP && stop_matched > 0) return "stop_sequence";
    return "end_turn";
}

/* With tool calls made (and not cut off by max_tokens): tool_calls / tool_use. */
static const char *openai_finish_res(const api_result *res) {
    return res->n_calls > 0 && res->why != FINISH_LENGTH ? "tool_calls" : api_openai_finish(res->why);
}
static const char *anthropic_stop_res(const api_result *res) {
    return res->n_calls > 0 && res->why != FINISH_LENGTH ? "tool_use" : api_anthropic_stop(res->why, res->stop_matched);
}

void api_tool_call_id(char out[40], bool anthropic, uint64_t r1, uint64_t r2) {
    static const char al[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    char t[25];
    for (int i = 0; i < 24; i++) {
        uint64_t *r = i < 12 ? &r1 : &r2;
        t[i] = al[*r % 62];
        *r /= 62;
    }
    t[24] = 0;
    snprintf(out, 40, "%s%s", anthropic ? "toolu_" : "call_", t);
}

/* A call's arguments as a JSON value (Anthropic's input); {} when they do not parse. */
static cJSON *call_input(const api_tool_call *c) {
    cJSON *v = c->arguments ? cJSON_Parse(c->arguments) : NULL;
    if (!v) v = cJSON_CreateObject();
    return v;
}

static cJSON *openai_call(const api_tool_call *c, int index, bool stream_head, bool stream_args) {
    cJSON *o = cJSON_CreateObject();
    if (index >= 0) cJSON_AddNumberToObject(o, "index", index);
    if (!stream_args) {
        cJSON_AddStringToObject(o, "id", c->id ? c->id : "");
        cJSON_AddStringToObject(o, "type", "function");
    }
    cJSON *fn = cJSON_AddObjectToObject(o, "function");
    if (!stream_args) cJSON_AddStringToObject(fn, "name", c->name);
    cJSON_AddStringToObject(fn, "arguments", stream_head ? "" : c->arguments ? c->arguments : "{}");
    return o;
}

static cJSON *usage_openai(const engine_usage *u, int reasoning_tokens) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "prompt_tokens", u->prompt_tokens);
    cJSON_AddNumberToObject(o, "completion_tokens", u->completion_tokens);
    cJSON_AddNumberToObject(o, "total_tokens", u->prompt_tokens + u->completion_tokens);
    cJSON *pd = cJSON_AddObjectToObject(o, "prompt_tokens_details");
    cJSON_AddNumberToObject(pd, "cached_tokens", u->cached_tokens);
    cJSON_AddNumberToObject(pd, "audio_tokens", 0);
    cJSON *cd = cJSON_AddObjectToObject(o, "completion_tokens_details");
    cJSON_AddNumberToObject(cd, "reasoning_tokens", reasoning_tokens);
    cJSON_AddNumberToObject(cd, "audio_tokens", 0);
    cJSON_AddNumberToObject(cd, "accepted_prediction_tokens", 0);
    cJSON_AddNumberToObject(cd, "rejected_prediction_tokens", 0);
    return o;
}

/* input_tokens: prompt tokens neither read from nor written to the cache. */
static cJSON *usage_anthropic(const engine_usage *u, bool with_output) {
    cJSON *o = cJSON_CreateObject();
    int created = u->cache_write_5m + u->cache_write_1h;
    int input = u->prompt_tokens - u->cached_tokens - created;
    if (input < 0) input = 0;
    cJSON_AddNumberToObject(o, "input_tokens", input);
    cJSON_AddNumberToObject(o, "cache_creation_input_tokens", created);
    cJSON_AddNumberToObject(o, "cache_read_input_tokens", u->cached_tokens);
    cJSON *cc = cJSON_AddObjectToObject(o, "cache_creation");
    cJSON_AddNumberToObject(cc, "ephemeral_5m_input_tokens", u->cache_write_5m);
    cJSON_AddNumberToObject(cc, "ephemeral_1h_input_tokens", u->cache_write_1h);
    if (with_output) cJSON_AddNumberToObject(o, "output_tokens", u->completion_tokens);
    cJSON_AddStringToObject(o, "service_tier", "standard");
    return o;
}

char *api_format_usage_openai(const engine_usage *u) {
    cJSON *o = usage_openai(u, 0);
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}
char *api_format_usage_anthropic(const engine_usage *u) {
    cJSON *o = usage_anthropic(u, true);
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

/* A JSON string value from (ptr, len) text; cJSON wants NUL-terminated. */
static cJSON *str_n(const char *s, size_t n) {
    char *t = malloc(n + 1);
    if (!t) return cJSON_CreateString("");
    if (n) memcpy(t, s, n);
    t[n] = 0;
    cJSON *v = cJSON_CreateString(t);
    free(t);
    return v;
}

/* ---- logprobs ---- */
/* A token's text as a JSON string: its bytes where they are valid UTF-8, U+FFFD for each byte
 * that is not (a token may hold part of a character); the exact bytes go in "bytes". */
static cJSON *token_string(const char *p, size_t n) {
    sbuf b = {0};
    size_t i = 0;
    while (i < n) {
        size_t bad = utf8_bad_at((const unsigned char *)p + i, n - i);
        sb_add(&b, p + i, bad);
        i += bad;
        if (i < n) { sb_str(&b, "\xEF\xBF\xBD"); i++; }
    }
    char *t = sb_take(&b);
    cJSON *v = cJSON_CreateString(t ? t : "");
    free(t);
    return v;
}

static cJSON *token_bytes(const char *p, size_t n) {
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber((unsigned char)p[i]));
    return a;
}

/* A logprob as JSON: -inf (or NaN) has no JSON number; OpenAI reports -9999 for such. */
static double lp_json(float x) { return isfinite(x) && x > -9999.0f ? (double)x : -9999.0; }

static const char *tok_piece(const api_result *res, int32_t id, size_t *len) {
    *len = 0;
    const char *p = res->tok_text ? res->tok_text(res->tok_ctx, id, len) : NULL;
    if (!p) *len = 0;
    return p ? p : "";
}

/* Chat: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": null} */
static cJSON *chat_logprobs(const api_result *res) {
    cJSON *o = cJSON_CreateObject(), *content = cJSON_AddArrayToObject(o, "content");
    for (int i = 0; i < res->n_lps; i++) {
        const engine_token_info *t = &res->lps[i];
        size_t n;
        const char *p = tok_piece(res, t->token, &n);
        cJSON *e = cJSON_CreateObject();
        cJSON_AddItemToObject(e, "token", token_string(p, n));
        cJSON_AddNumberToObject(e, "logprob", lp_json(t->logprob));
        cJSON_AddItemToObject(e, "bytes", token_bytes(p, n));
        cJSON *top = cJSON_AddArrayToObject(e, "top_logprobs");
        for (int k = 0; k < t->n_top && k < ENGINE_MAX_TOP_LOGPROBS; k++) {
            const char *q = tok_piece(res, t->top[k].token, &n);
            cJSON *x = cJSON_CreateObject();
            cJSON_AddItemToObject(x, "token", token_string(q, n));
            cJSON_AddNumberToObject(x, "logprob", lp_json(t->top[k].logprob));
            cJSON_AddItemToObject(x, "bytes", token_bytes(q, n));
            cJSON_AddItemToArray(top, x);
        }
        cJSON_AddItemToArray(content, e);
    }
    cJSON_AddNullToObject(o, "refusal");
    return o;
}

/* Completions (legacy): {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset} */
static cJSON *completion_logprobs(const api_result *res) {
    cJSON *o = cJSON_CreateObject();
    cJSON *toks = cJSON_AddArrayToObject(o, "tokens"), *lps = cJSON_AddArrayToObject(o, "token_logprobs");
    cJSON *tops = cJSON_AddArrayToObject(o, "top_logprobs"), *offs = cJSON_AddArrayToObject(o, "text_offset");
    size_t off = res->text_offset0;
    for (int i = 0; i < res->n_lps; i++) {
        const engine_token_info *t = &res->lps[i];
        size_t n;
        const char *p = tok_piece(res, t->token, &n);
        cJSON_AddItemToArray(toks, token_string(p, n));
        cJSON_AddItemToArray(lps, cJSON_CreateNumber(lp_json(t->logprob)));
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)off));
        off += n;
        cJSON *d = cJSON_CreateObject();
        for (int k = 0; k < t->n_top && k < ENGINE_MAX_TOP_LOGPROBS; k++) {
            size_t m;
            const char *q = tok_piece(res, t->top[k].token, &m);
            cJSON *key = token_string(q, m);
            if (!cJSON_GetObjectItemCaseSensitive(d, key->valuestring))   /* two ids, one text */
                cJSON_AddNumberToObject(d, key->valuestring, lp_json(t->top[k].logprob));
            cJSON_Delete(key);
        }
        cJSON_AddItemToArray(tops, d);
    }
    return o;
}

static void add_logprobs(cJSON *choice, const api_request *r, const api_result *res, bool with) {
    if (!with || r->logprobs < 0) { cJSON_AddNullToObject(choice, "logprobs"); return; }
    cJSON_AddItemToObject(choice, "logprobs", r->kind == API_OPENAI_CHAT ? chat_logprobs(res) : completion_logprobs(res));
}

static char *print_free(cJSON *o) {
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

static cJSON *anthropic_message(const api_request *r, const api_result *res, bool final) {
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "id", res->id);
    cJSON_AddStringToObject(m, "type", "message");
    cJSON_AddStringToObject(m, "role", "assistant");
    cJSON_AddStringToObject(m, "model", res->model);
    cJSON *content = cJSON_AddArrayToObject(m, "content");
    if (final) {
        if (res->reasoning_len > 0) {   /* no signature: nothing to verify it with */
            cJSON *blk = cJSON_CreateObject();
            cJSON_AddStringToObject(blk, "type", "thinking");
            cJSON_AddItemToObject(blk, "thinking", str_n(res->reasoning, res->reasoning_len));
            cJSON_AddStringToObject(blk, "signature", "");
            cJSON_AddItemToArray(content, blk);
        }
        if (res->text_len > 0 || (res->n_calls == 0 && res->reasoning_len == 0)) {
            cJSON *blk = cJSON_CreateObject();
            cJSON_AddStringToObject(blk, "type", "text");
            cJSON_AddItemToObject(blk, "text", str_n(res->text, res->text_len));
            cJSON_AddItemToArray(content, blk);
        }
        for (int i = 0; i < res->n_calls; i++) {
            cJSON *blk = cJSON_CreateObject();
            cJSON_AddStringToObject(blk, "type", "tool_use");
            cJSON_AddStringToObject(blk, "id", res->calls[i].id ? res->calls[i].id : "");
            cJSON_AddStringToObject(blk, "name", res->calls[i].name);
            cJSON_AddItemToObject(blk, "input", call_input(&res->calls[i]));
            cJSON_AddItemToArray(content, blk);
        }
        cJSON_AddStringToObject(m, "stop_reason", anthropic_stop_res(res));
        if (res->why == FINISH_STOP && res->stop_matched > 0 && res->stop_matched <= r->n_stop)
            cJSON_AddStringToObject(m, "stop_sequence", r->stop[res->stop_matched - 1]);
        else cJSON_AddNullToObject(m, "stop_sequence");
    } else {
        cJSON_AddNullToObject(m, "stop_reason");
        cJSON_AddNullToObject(m, "stop_sequence");
    }
    return m;
}


static void sse_event(sbuf *b, const char *event, cJSON *o);

/* ---- Responses API output: a response object of output items (a message with output_text,
 * function_call items), and its streamed events (each with a type and a sequence_number). */
static void resp_id(char *out, size_t n, const char *prefix, const char *id) {
    const char *u = strchr(id ? id : "", '_');
    snprintf(out, n, "%s%s", prefix, u ? u + 1 : id ? id : "");
}

static cJSON *resp_message(const api_result *res, const char *text, size_t len, bool done) {
    char mid[64];
    resp_id(mid, sizeof mid, "msg_", res->id);
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "id", mid);
    cJSON_AddStringToObject(m, "type", "message");
    cJSON_AddStringToObject(m, "status", done ? "completed" : "in_progress");
    cJSON_AddStringToObject(m, "role", "assistant");
    cJSON *content = cJSON_AddArrayToObject(m, "content");
    if (done) {
        cJSON *part = cJSON_CreateObject();
        cJSON_AddStringToObject(part, "type", "output_text");
        cJSON_AddItemToObject(part, "text", str_n(text, len));
        cJSON_AddArrayToObject(part, "annotations");
        cJSON_AddArrayToObject(part, "logprobs");
        cJSON_AddItemToArray(content, part);
    }
    return m;
}

static cJSON *resp_call(const api_tool_call *c, bool done) {
    char fid[64];
    resp_id(fid, sizeof fid, "fc_", c->id);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", fid);
    cJSON_AddStringToObject(o, "type", "function_call");
    cJSON_AddStringToObject(o, "status", done ? "completed" : "in_progress");
    cJSON_AddStringToObject(o, "call_id", c->id ? c->id : "");
    cJSON_AddStringToObject(o, "name", c->name);
    cJSON_AddStringToObject(o, "arguments", done ? (c->arguments ? c->arguments : "{}") : "");
    return o;
}

static cJSON *resp_reasoning(const api_result *res, bool done) {
    char rid[64];
    resp_id(rid, sizeof rid, "rs_", res->id);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", rid);
    cJSON_AddStringToObject(o, "type", "reasoning");
    cJSON_AddArrayToObject(o, "summary");
    cJSON *content = cJSON_AddArrayToObject(o, "content");
    if (done) {
        cJSON *part = cJSON_CreateObject();
        cJSON_AddStringToObject(part, "type", "reasoning_text");
        cJSON_AddItemToObject(part, "text", str_n(res->reasoning, res->reasoning_len));
        cJSON_AddItemToArray(content, part);
    }
    cJSON_AddStringToObject(o, "status", done ? "completed" : "in_progress");
    return o;
}

/* The output items: the reasoning (if any) first; the message (if there is text, or nothing
 * else) at position msg_item - 1 (0: first after the reasoning), the calls in order around it. */
static cJSON *resp_output(const api_result *res, int msg_item) {
    cJSON *out = cJSON_CreateArray();
    const bool msg = res->text_len > 0 || res->n_calls == 0;
    const int first = res->reasoning_len > 0;
    if (first) cJSON_AddItemToArray(out, resp_reasoning(res, true));
    const int at = msg_item > first ? msg_item - 1 - first : 0;
    for (int i = 0; i <= res->n_calls; i++) {
        if (msg && i == (at < res->n_calls ? at : res->n_calls)) cJSON_AddItemToArray(out, resp_message(res, res->text, res->text_len, true));
        if (i < res->n_calls) cJSON_AddItemToArray(out, resp_call(&res->calls[i], true));
    }
    return out;
}

static cJSON *resp_object(const api_request *r, const api_result *res, bool final, int msg_item) {
    engine_usage zero = {0};
    const engine_usage *u = res->usage ? res->usage : &zero;
    const bool incomplete = final && res->why == FINISH_LENGTH;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", res->id);
    cJSON_AddStringToObject(o, "object", "response");
    cJSON_AddNumberToObject(o, "created_at", (double)res->created);
    cJSON_AddStringToObject(o, "status", !final ? "in_progress" : incomplete ? "incomplete" : "completed");
    cJSON_AddNullToObject(o, "error");
    if (incomplete) cJSON_AddStringToObject(cJSON_AddObjectToObject(o, "incomplete_details"), "reason", "max_output_tokens");
    else cJSON_AddNullToObject(o, "incomplete_details");
    if (r->instructions) cJSON_AddStringToObject(o, "instructions", r->instructions); else cJSON_AddNullToObject(o, "instructions");
    if (r->max_tokens > 0) cJSON_AddNumberToObject(o, "max_output_tokens", r->max_tokens); else cJSON_AddNullToObject(o, "max_output_tokens");
    cJSON_AddStringToObject(o, "model", res->model);
    cJSON_AddItemToObject(o, "output", final ? resp_output(res, msg_item) : cJSON_CreateArray());
    cJSON_AddBoolToObject(o, "parallel_tool_calls", r->parallel_tool_calls);
    if (r->prev_id) cJSON_AddStringToObject(o, "previous_response_id", r->prev_id); else cJSON_AddNullToObject(o, "previous_response_id");
    cJSON *rs = cJSON_AddObjectToObject(o, "reasoning");
    cJSON_AddNullToObject(rs, "effort");
    cJSON_AddNullToObject(rs, "summary");
    cJSON_AddBoolToObject(o, "store", r->store);
    cJSON_AddNumberToObject(o, "temperature", r->sp.temperature);
    cJSON *tf = cJSON_AddObjectToObject(cJSON_AddObjectToObject(o, "text"), "format");
    cJSON_AddStringToObject(tf, "type", r->format == API_FORMAT_JSON_SCHEMA ? "json_schema" : r->format == API_FORMAT_JSON_OBJECT ? "json_object" : "text");
    if (r->format == API_FORMAT_JSON_SCHEMA && r->schema) cJSON_AddItemToObject(tf, "schema", cJSON_Parse(r->schema));
    cJSON_AddStringToObject(o, "tool_choice", r->tool_choice == API_TOOL_NONE ? "none" : r->tool_choice == API_TOOL_REQUIRED ? "required" : "auto");
    cJSON *tools = cJSON_AddArrayToObject(o, "tools");
    for (int i = 0; i < r->n_tools; i++) {   /* back to Responses' flat form */
        cJSON *t = cJSON_Parse(r->tools[i].json), *fn = cJSON_GetObjectItemCaseSensitive(t, "function");
        if (fn) {
            cJSON *flat = cJSON_Duplicate(fn, true);
            cJSON_AddStringToObject(flat, "type", "function");
            cJSON_AddItemToArray(tools, flat);
        }
        cJSON_Delete(t);
    }
    cJSON_AddNumberToObject(o, "top_p", r->sp.top_p);
    cJSON_AddStringToObject(o, "truncation", "disabled");
    if (final) {
        cJSON *us = cJSON_AddObjectToObject(o, "usage");
        cJSON_AddNumberToObject(us, "input_tokens", u->prompt_tokens);
        cJSON_AddNumberToObject(cJSON_AddObjectToObject(us, "input_tokens_details"), "cached_tokens", u->cached_tokens);
        cJSON_AddNumberToObject(us, "output_tokens", u->completion_tokens);
        cJSON_AddNumberToObject(cJSON_AddObjectToObject(us, "output_tokens_details"), "reasoning_tokens", res->reasoning_tokens);
        cJSON_AddNumberToObject(us, "total_tokens", u->prompt_tokens + u->completion_tokens);
    } else {
        cJSON_AddNullToObject(o, "usage");
    }
    cJSON_AddNullToObject(o, "user");
    cJSON_AddObjectToObject(o, "metadata");
    return o;
}

char *api_responses_output_items(const api_request *r, const api_result *res, int msg_item) {
    (void)r;
    return print_free(resp_output(res, msg_item));
}

static void resp_event(sbuf *b, api_stream *st, const char *type, cJSON *o) {
    if (st->seq < 2) st->seq = 2;   /* 0 and 1: response.created, response.in_progress */
    cJSON *e = cJSON_CreateObject();
    cJSON_AddStringToObject(e, "type", type);
    cJSON_AddNumberToObject(e, "sequence_number", st->seq++);
    for (cJSON *x = o ? o->child : NULL; x;) {   /* move o's members after type and sequence_number */
        cJSON *next = x->next;
        cJSON_AddItemToObject(e, x->string, cJSON_DetachItemViaPointer(o, x));
        x = next;
    }
    cJSON_Delete(o);
    sse_event(b, type, e);
}

static cJSON *resp_where(const api_result *res, int index, bool content) {
    char mid[64];
    resp_id(mid, sizeof mid, "msg_", res->id);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "item_id", mid);
    cJSON_AddNumberToObject(o, "output_index", index);
    if (content) cJSON_AddNumberToObject(o, "content_index", 0);
    return o;
}

static char *resp_stream_start(const api_request *r, const api_result *res) {
    sbuf b = {0};
    for (int k = 0; k < 2; k++) {
        cJSON *e = cJSON_CreateObject();
        const char *type = k ? "response.in_progress" : "response.created";
        cJSON_AddStringToObject(e, "type", type);
        cJSON_AddNumberToObject(e, "sequence_number", k);
        cJSON_AddItemToObject(e, "response", resp_object(r, res, false, 0));
        sse_event(&b, type, e);
    }
    return sb_take(&b);
}

static cJSON *resp_reasoning_where(const api_result *res, const api_stream *st) {
    char rid[64];
    resp_id(rid, sizeof rid, "rs_", res->id);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "item_id", rid);
    cJSON_AddNumberToObject(o, "output_index", st->reasoning_item - 1);
    cJSON_AddNumberToObject(o, "content_index", 0);
    return o;
}

static void resp_stream_reasoning(sbuf *b, const api_result *res, api_stream *st, const char *text, size_t len) {
    if (!st->reasoning_item) {
        st->reasoning_item = ++st->items;
        st->think_open = true;
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "output_index", st->reasoning_item - 1);
        cJSON_AddItemToObject(o, "item", resp_reasoning(res, false));
        resp_event(b, st, "response.output_item.added", o);
        o = resp_reasoning_where(res, st);
        cJSON *part = cJSON_AddObjectToObject(o, "part");
        cJSON_AddStringToObject(part, "type", "reasoning_text");
        cJSON_AddStringToObject(part, "text", "");
        resp_event(b, st, "response.content_part.added", o);
    }
    cJSON *o = resp_reasoning_where(res, st);
    cJSON_AddItemToObject(o, "delta", str_n(text, len));
    resp_event(b, st, "response.reasoning_text.delta", o);
}

/* The reasoning item's last events (res->reasoning is then all of it). */
static void resp_close_reasoning(sbuf *b, const api_result *res, api_stream *st) {
    if (!st->think_open) return;
    st->think_open = false;
    cJSON *o = resp_reasoning_where(res, st);
    cJSON_AddItemToObject(o, "text", str_n(res->reasoning, res->reasoning_len));
    resp_event(b, st, "response.reasoning_text.done", o);
    o = resp_reasoning_where(res, st);
    cJSON *part = cJSON_AddObjectToObject(o, "part");
    cJSON_AddStringToObject(part, "type", "reasoning_text");
    cJSON_AddItemToObject(part, "text", str_n(res->reasoning, res->reasoning_len));
    resp_event(b, st, "response.content_part.done", o);
    o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "output_index", st->reasoning_item - 1);
    cJSON_AddItemToObject(o, "item", resp_reasoning(res, true));
    resp_event(b, st, "response.output_item.done", o);
}

static char *resp_stream_text(const api_result *res, api_stream *st, const char *text, size_t len) {
    sbuf b = {0};
    sb_add(&b, "", 0);
    resp_close_reasoning(&b, res, st);
    if (!st->msg_item) {
        st->msg_item = ++st->items;
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "output_index", st->msg_item - 1);
        cJSON_AddItemToObject(o, "item", resp_message(res, "", 0, false));
        resp_event(&b, st, "response.output_item.added", o);
        o = resp_where(res, st->msg_item - 1, true);
        cJSON *part = cJSON_AddObjectToObject(o, "part");
        cJSON_AddStringToObject(part, "type", "output_text");
        cJSON_AddStringToObject(part, "text", "");
        cJSON_AddArrayToObject(part, "annotations");
        resp_event(&b, st, "response.content_part.added", o);
    }
    cJSON *o = resp_where(res, st->msg_item - 1, true);
    cJSON_AddItemToObject(o, "delta", str_n(text, len));
    cJSON_AddArrayToObject(o, "logprobs");
    resp_event(&b, st, "response.output_text.delta", o);
    return sb_take(&b);
}

static char *resp_stream_call(const api_result *res, const api_tool_call *c, api_stream *st) {
    sbuf b = {0};
    sb_add(&b, "", 0);
    resp_close_reasoning(&b, res, st);
    const int idx = st->items++;
    char fid[64];
    resp_id(fid, sizeof fid, "fc_", c->id);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "output_index", idx);
    cJSON_AddItemToObject(o, "item", resp_call(c, false));
    resp_event(&b, st, "response.output_item.added", o);
    for (int k = 0; k < 2; k++) {
        o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "item_id", fid);
        cJSON_AddNumberToObject(o, "output_index", idx);
        cJSON_AddStringToObject(o, k ? "arguments" : "delta", c->arguments ? c->arguments : "{}");
        resp_event(&b, st, k ? "response.function_call_arguments.done" : "response.function_call_arguments.delta", o);
    }
    o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "output_index", idx);
    cJSON_AddItemToObject(o, "item", resp_call(c, true));
    resp_event(&b, st, "response.output_item.done", o);
    st->calls++;
    return sb_take(&b);
}

/* res->text: the whole content (outside calls), res->calls: the calls */
static char *resp_stream_finish(const api_request *r, const api_result *res, api_stream *st) {
    sbuf b = {0};
    sb_add(&b, "", 0);
    resp_close_reasoning(&b, res, st);
    if (!st->msg_item && res->n_calls == 0) {   /* no text at all: still one (empty) message */
        char *t = resp_stream_text(res, st, "", 0);
        if (t) sb_str(&b, t);
        free(t);
    }
    if (st->msg_item) {
        const int idx = st->msg_item - 1;
        cJSON *o = resp_where(res, idx, true);
        cJSON_AddItemToObject(o, "text", str_n(res->text, res->text_len));
        cJSON_AddArrayToObject(o, "logprobs");
        resp_event(&b, st, "response.output_text.done", o);
        o = resp_where(res, idx, true);
        cJSON *part = cJSON_AddObjectToObject(o, "part");
        cJSON_AddStringToObject(part, "type", "output_text");
        cJSON_AddItemToObject(part, "text", str_n(res->text, res->text_len));
        cJSON_AddArrayToObject(part, "annotations");
        resp_event(&b, st, "response.content_part.done", o);
        o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "output_index", idx);
        cJSON_AddItemToObject(o, "item", resp_message(res, res->text, res->text_len, true));
        resp_event(&b, st, "response.output_item.done", o);
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddItemToObject(o, "response", resp_object(r, res, true, st->msg_item));
    resp_event(&b, st, res->why == FINISH_LENGTH ? "response.incomplete" : "response.completed", o);
    return sb_take(&b);
}

char *api_format_response(const api_request *r, const api_result *res) {
    engine_usage zero = {0};
    const engine_usage *u = res->usage ? res->usage : &zero;
    if (r->kind == API_ANTHROPIC_COUNT_TOKENS) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "input_tokens", u->prompt_tokens);
        return print_free(o);
    }
    if (r->kind == API_OPENAI_RESPONSES) return print_free(resp_object(r, res, true, 0));
    if (api_is_anthropic(r->kind)) {
        cJSON *m = anthropic_message(r, res, true);
        cJSON_AddItemToObject(m, "usage", usage_anthropic(u, true));
        return print_free(m);
    }
    bool chat = r->kind == API_OPENAI_CHAT;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", res->id);
    cJSON_AddStringToObject(o, "object", chat ? "chat.completion" : "text_completion");
    cJSON_AddNumberToObject(o, "created", (double)res->created);
    cJSON_AddStringToObject(o, "model", res->model);
    cJSON *choices = cJSON_AddArrayToObject(o, "choices");
    cJSON *c = cJSON_CreateObject();
    if (chat) {
        cJSON_AddNumberToObject(c, "index", 0);
        cJSON *msg = cJSON_AddObjectToObject(c, "message");
        cJSON_AddStringToObject(msg, "role", "assistant");
        if (res->n_calls > 0 && res->text_len == 0) cJSON_AddNullToObject(msg, "content");
        else cJSON_AddItemToObject(msg, "content", str_n(res->text, res->text_len));
        if (r->think) {
            if (res->reasoning_len > 0) cJSON_AddItemToObject(msg, "reasoning_content", str_n(res->reasoning, res->reasoning_len));
            else cJSON_AddNullToObject(msg, "reasoning_content");
        }
        cJSON_AddNullToObject(msg, "refusal");
        if (res->n_calls > 0) {
            cJSON *calls = cJSON_AddArrayToObject(msg, "tool_calls");
            for (int i = 0; i < res->n_calls; i++) cJSON_AddItemToArray(calls, openai_call(&res->calls[i], -1, false, false));
        }
    } else {
        cJSON_AddItemToObject(c, "text", str_n(res->text, res->text_len));
        cJSON_AddNumberToObject(c, "index", 0);
    }
    add_logprobs(c, r, res, true);
    cJSON_AddStringToObject(c, "finish_reason", openai_finish_res(res));
    cJSON_AddItemToArray(choices, c);
    cJSON_AddItemToObject(o, "usage", usage_openai(u, res->reasoning_tokens));
    cJSON_AddNullToObject(o, "system_fingerprint");
    return print_free(o);
}

/* One OpenAI stream chunk; delta_text NULL -> no content; finish NULL -> null. */
static cJSON *openai_chunk(const api_request *r, const api_result *res, bool role, const char *text,
                           size_t len, const char *finish, bool with_lp) {
    bool chat = r->kind == API_OPENAI_CHAT;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", res->id);
    cJSON_AddStringToObject(o, "object", chat ? "chat.completion.chunk" : "text_completion");
    cJSON_AddNumberToObject(o, "created", (double)res->created);
    cJSON_AddStringToObject(o, "model", res->model);
    cJSON_AddNullToObject(o, "system_fingerprint");
    cJSON *choices = cJSON_AddArrayToObject(o, "choices");
    cJSON *c = cJSON_CreateObject();
    if (chat) {
        cJSON_AddNumberToObject(c, "index", 0);
        cJSON *d = cJSON_AddObjectToObject(c, "delta");
        if (role) cJSON_AddStringToObject(d, "role", "assistant");
        if (text) cJSON_AddItemToObject(d, "content", str_n(text, len));
    } else {
        cJSON_AddItemToObject(c, "text", str_n(text ? text : "", text ? len : 0));
        cJSON_AddNumberToObject(c, "index", 0);
    }
    add_logprobs(c, r, res, with_lp);
    if (finish) cJSON_AddStringToObject(c, "finish_reason", finish); else cJSON_AddNullToObject(c, "finish_reason");
    cJSON_AddItemToArray(choices, c);
    if (r->include_usage) cJSON_AddNullToObject(o, "usage");
    return o;
}

static void sse_data(sbuf *b, cJSON *o) {
    char *s = print_free(o);
    if (!s) { b->oom = true; return; }
    sb_str(b, "data: "); sb_str(b, s); sb_str(b, "\n\n");
    free(s);
}

static void sse_event(sbuf *b, const char *event, cJSON *o) {
    sb_str(b, "event: "); sb_str(b, event); sb_str(b, "\n");
    sse_data(b, o);
}

char *api_format_stream_start(const api_request *r, const api_result *res, int n_prompt) {
    if (r->kind == API_OPENAI_RESPONSES) return resp_stream_start(r, res);
    sbuf b = {0};
    if (api_is_anthropic(r->kind)) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "type", "message_start");
        cJSON *m = anthropic_message(r, res, false);
        /* The server sends this once the engine reports the prompt's cache split (res->usage);
         * without it (an error before the prompt was read) the whole prompt counts as input. */
        engine_usage u = {0};
        u.prompt_tokens = n_prompt;
        u.completion_tokens = 1;
        cJSON_AddItemToObject(m, "usage", usage_anthropic(res->usage ? res->usage : &u, true));
        cJSON_AddItemToObject(o, "message", m);
        sse_event(&b, "message_start", o);
        if (!api_stream_blocks(r)) {   /* with tools or reasoning, blocks open as they come */
            o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "type", "content_block_start");
            cJSON_AddNumberToObject(o, "index", 0);
            cJSON *blk = cJSON_AddObjectToObject(o, "content_block");
            cJSON_AddStringToObject(blk, "type", "text");
            cJSON_AddStringToObject(blk, "text", "");
            sse_event(&b, "content_block_start", o);
        }
        o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "type", "ping");
        sse_event(&b, "ping", o);
    } else if (r->kind == API_OPENAI_CHAT) {
        sse_data(&b, openai_chunk(r, res, true, "", 0, NULL, false));
    } else {
        sb_add(&b, "", 0); /* completions: no preamble chunk */
    }
    return sb_take(&b);
}

char *api_format_stream_delta(const api_request *r, const api_result *res, const char *text, size_t len) {
    sbuf b = {0};
    if (api_is_anthropic(r->kind)) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "type", "content_block_delta");
        cJSON_AddNumberToObject(o, "index", 0);
        cJSON *d = cJSON_AddObjectToObject(o, "delta");
        cJSON_AddStringToObject(d, "type", "text_delta");
        cJSON_AddItemToObject(d, "text", str_n(text, len));
        sse_event(&b, "content_block_delta", o);
    } else {
        sse_data(&b, openai_chunk(r, res, false, text, len, NULL, true));
    }
    return sb_take(&b);
}

char *api_format_stream_end(const api_request *r, const api_result *res) {
    sbuf b = {0};
    engine_usage zero = {0};
    const engine_usage *u = res->usage ? res->usage : &zero;
    if (api_is_anthropic(r->kind)) {
        cJSON *o;
        if (!api_stream_blocks(r)) {   /* else api_format_stream_finish closes the open block */
            o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "type", "content_block_stop");
            cJSON_AddNumberToObject(o, "index", 0);
            sse_event(&b, "content_block_stop", o);
        }
        o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "type", "message_delta");
        cJSON *d = cJSON_AddObjectToObject(o, "delta");
        cJSON_AddStringToObject(d, "stop_reason", anthropic_stop_res(res));
        if (res->why == FINISH_STOP && res->stop_matched > 0 && res->stop_matched <= r->n_stop)
            cJSON_AddStringToObject(d, "stop_sequence", r->stop[res->stop_matched - 1]);
        else cJSON_AddNullToObject(d, "stop_sequence");
        cJSON *us = usage_anthropic(u, true);
        cJSON_DeleteItemFromObjectCaseSensitive(us, "service_tier");
        cJSON_AddItemToObject(o, "usage", us);
        sse_event(&b, "message_delta", o);
        o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "type", "message_stop");
        sse_event(&b, "message_stop", o);
    } else {
        sse_data(&b, openai_chunk(r, res, false, r->kind == API_OPENAI_CHAT ? NULL : "", 0, openai_finish_res(res), false));
        if (r->include_usage) {
            cJSON *o = cJSON_CreateObject();
            bool chat = r->kind == API_OPENAI_CHAT;
            cJSON_AddStringToObject(o, "id", res->id);
            cJSON_AddStringToObject(o, "object", chat ? "chat.completion.chunk" : "text_completion");
            cJSON_AddNumberToObject(o, "created", (double)res->created);
            cJSON_AddStringToObject(o, "model", res->model);
            cJSON_AddNullToObject(o, "system_fingerprint");
            cJSON_AddArrayToObject(o, "choices");
            cJSON_AddItemToObject(o, "usage", usage_openai(u, res->reasoning_tokens));
            sse_data(&b, o);
        }
        sb_str(&b, "data: [DONE]\n\n");
    }
    return sb_take(&b);
}

/* ---- streaming with tools */
static void anth_block_event(sbuf *b, const char *type, int index, cJSON *block) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "type", type);
    cJSON_AddNumberToObject(o, "index", index);
    if (block) cJSON_AddItemToObject(o, !strcmp(type, "content_block_delta") ? "delta" : "content_block", block);
    sse_event(b, type, o);
}

/* Anthropic: closes the thinking block (no signature_delta: there is no signature). */
static void anth_close_thinking(sbuf *b, api_stream *st) {
    if (!st->think_open) return;
    anth_block_event(b, "content_block_stop", st->block++, NULL);
    st->think_open = false;
}


/* One Anthropic streamed piece of a text-like block (kind "text" or "thinking"): the block's
 * content_block_start first when *open is false (a thinking block with an empty signature),
 * then a <kind>_delta. */
static void anth_stream_piece(sbuf *b, api_stream *st, bool *open, const char *kind, const char *text, size_t len) {
    if (!*open) {
        cJSON *blk = cJSON_CreateObject();
        cJSON_AddStringToObject(blk, "type", kind);
        cJSON_AddStringToObject(blk, kind, "");
        if (!strcmp(kind, "thinking")) cJSON_AddStringToObject(blk, "signature", "");
        anth_block_event(b, "content_block_start", st->block, blk);
        *open = true;
    }
    char type[16];
    snprintf(type, sizeof type, "%s_delta", kind);
    cJSON *d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "type", type);
    cJSON_AddItemToObject(d, kind, str_n(text, len));
    anth_block_event(b, "content_block_delta", st->block, d);
}

char *api_format_stream_reasoning(const api_request *r, const api_result *res, api_stream *st) {
    sbuf b = {0};
    sb_add(&b, "", 0);
    if (res->reasoning_len <= st->reasoning_sent) return sb_take(&b);
    const char *text = res->reasoning + st->reasoning_sent;
    const size_t len = res->reasoning_len - st->reasoning_sent;
    st->reasoning_sent = res->reasoning_len;
    if (r->kind == API_OPENAI_RESPONSES) {
        resp_stream_reasoning(&b, res, st, text, len);
    } else if (api_is_anthropic(r->kind)) {
        anth_stream_piece(&b, st, &st->think_open, "thinking", text, len);
    } else {   /* delta.reasoning_content, as vLLM, llama.cpp and DeepSeek stream it */
        cJSON *o = openai_chunk(r, res, false, NULL, 0, NULL, true);
        cJSON *delta = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(o, "choices"), 0), "delta");
        cJSON *rc = str_n(text, len);
        if (!cJSON_AddItemToObject(delta, "reasoning_content", rc)) cJSON_Delete(rc);   /* no delta: not chat */
        sse_data(&b, o);
    }
    return sb_take(&b);
}

char *api_format_stream_text(const api_request *r, const api_result *res, api_stream *st, const char *text, size_t len) {
    if (r->kind == API_OPENAI_RESPONSES) return resp_stream_text(res, st, text, len);
    if (!api_is_anthropic(r->kind)) return api_format_stream_delta(r, res, text, len);
    sbuf b = {0};
    sb_add(&b, "", 0);
    anth_close_thinking(&b, st);
    anth_stream_piece(&b, st, &st->text_open, "text", text, len);
    return sb_take(&b);
}

char *api_format_stream_call(const api_request *r, const api_result *res, api_stream *st, const api_tool_call *c) {
    if (r->kind == API_OPENAI_RESPONSES) return resp_stream_call(res, c, st);
    sbuf b = {0};
    sb_add(&b, "", 0);
    if (api_is_anthropic(r->kind)) {
        anth_close_thinking(&b, st);
        if (st->text_open) {
            anth_block_event(&b, "content_block_stop", st->block++, NULL);
            st->text_open = false;
        }
        cJSON *blk = cJSON_CreateObject();
        cJSON_AddStringToObject(blk, "type", "tool_use");
        cJSON_AddStringToObject(blk, "id", c->id ? c->id : "");
        cJSON_AddStringToObject(blk, "name", c->name);
        cJSON_AddItemToObject(blk, "input", cJSON_CreateObject());
        anth_block_event(&b, "content_block_start", st->block, blk);
        cJSON *d = cJSON_CreateObject();
        cJSON_AddStringToObject(d, "type", "input_json_delta");
        cJSON_AddStringToObject(d, "partial_json", c->arguments ? c->arguments : "{}");
        anth_block_event(&b, "content_block_delta", st->block, d);
        anth_block_event(&b, "content_block_stop", st->block++, NULL);
    } else {
        for (int part = 0; part < 2; part++) {
            cJSON *o = openai_chunk(r, res, false, NULL, 0, NULL, false);
            cJSON *delta = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(o, "choices"), 0), "delta");
            cJSON *calls = cJSON_AddArrayToObject(delta, "tool_calls");
            cJSON_AddItemToArray(calls, openai_call(c, st->calls, part == 0, part == 1));
            sse_data(&b, o);
        }
    }
    st->calls++;
    return sb_take(&b);
}

char *api_format_stream_finish(const api_request *r, const api_result *res, api_stream *st) {
    if (r->kind == API_OPENAI_RESPONSES) return resp_stream_finish(r, res, st);
    sbuf b = {0};
    sb_add(&b, "", 0);
    if (api_is_anthropic(r->kind)) {
        anth_close_thinking(&b, st);
        if (!st->text_open && st->block == 0 && res->n_calls == 0) {
            /* nothing at all: one empty text block, as the response has when not streamed */
            cJSON *blk = cJSON_CreateObject();
            cJSON_AddStringToObject(blk, "type", "text");
            cJSON_AddStringToObject(blk, "text", "");
            anth_block_event(&b, "content_block_start", st->block, blk);
            st->text_open = true;
        }
        if (st->text_open) {
            anth_block_event(&b, "content_block_stop", st->block++, NULL);
            st->text_open = false;
        }
    }
    char *end = api_format_stream_end(r, res);
    if (!end) { free(b.p); return NULL; }
    sb_str(&b, end);
    free(end);
    return sb_take(&b);
}
