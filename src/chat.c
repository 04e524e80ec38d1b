/* chat: renders chat messages to a prompt the way the model's own Jinja template does.
 *
 * We do not embed a Jinja interpreter. Instead the template family is detected from marker
 * substrings of tokenizer.chat_template (ChatML, Llama 3, Llama 2, Mistral) and each family is
 * rendered by hand-written code that reproduces its reference template byte for byte. The one
 * per-model detail that matters in practice, a ChatML default system message injected when the
 * conversation has none (SmolLM2, Qwen2.5), is read out of the template text itself: the literal
 * that follows "<|im_start|>system" up to "<|im_end|>", if it is a plain string literal.
 * Trade-off: templates with logic beyond these families (tools, multimodal parts) are not
 * reproduced exactly; tests/py/test_tokenizer_hf.py checks SmolLM2's rendering against jinja2.
 */
#include "tokenizer.h"
#include <stdlib.h>
#include <string.h>
#include <ctype.h>

typedef struct { char *p; size_t n, cap; bool oom; } sbuf;

static void sb_add(sbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t c = b->cap ? b->cap : 256;
        while (b->n + n + 1 > c) c *= 2;
        char *p = realloc(b->p, c);
        if (!p) { b->oom = true; return; }
        b->p = p;
        b->cap = c;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}
static void sb_str(sbuf *b, const char *s) { sb_add(b, s ? s : "", s ? strlen(s) : 0); }

/* Appends s with leading/trailing whitespace removed (Jinja's trim / Python's strip). */
static void sb_trim(sbuf *b, const char *s) {
    if (!s) return;
    size_t n = strlen(s), i = 0;
    while (i < n && isspace((unsigned char)s[i])) i++;
    while (n > i && isspace((unsigned char)s[n - 1])) n--;
    sb_add(b, s + i, n - i);
}

static const char *memmem_g(gguf_str h, const char *needle) {
    if (!h.ptr) return NULL;
    return memmem(h.ptr, h.len, needle, strlen(needle));
}

static gguf_str template_of(const gguf_file *f) {
    gguf_str s = { NULL, 0 };
    if (f) gguf_get_str(f, "tokenizer.chat_template", &s);
    return s;
}

chat_tmpl chat_template_detect(const gguf_file *f, const tokenizer *t) {
    gguf_str s = template_of(f);
    if (s.ptr) {
        if (memmem_g(s, "<|im_start|>")) return CHAT_TMPL_CHATML;
        if (memmem_g(s, "<|start_header_id|>")) return CHAT_TMPL_LLAMA3;
        if (memmem_g(s, "[INST]")) return memmem_g(s, "<<SYS>>") ? CHAT_TMPL_LLAMA2 : CHAT_TMPL_MISTRAL;
    }
    if (t) {
        if (tokenizer_find(t, "<|im_start|>") >= 0) return CHAT_TMPL_CHATML;
        if (tokenizer_find(t, "<|start_header_id|>") >= 0) return CHAT_TMPL_LLAMA3;
        if (tokenizer_find(t, "[INST]") >= 0) return CHAT_TMPL_MISTRAL;
    }
    return CHAT_TMPL_CHATML;
}

/* The ChatML default system message written literally in the template, or NULL. */
static char *default_system(const gguf_file *f) {
    gguf_str s = template_of(f);
    const char *mark = "<|im_start|>system";
    for (const char *p = memmem_g(s, mark); p; ) {
        const char *end = s.ptr + s.len, *q = p + strlen(mark);
        size_t skip = 0;
        if (q < end && *q == '\n') skip = 1;
        else if (q + 1 < end && q[0] == '\\' && q[1] == 'n') skip = 2;
        if (skip) {
            q += skip;
            gguf_str rest = { q, (uint64_t)(end - q) };
            const char *e = memmem_g(rest, "<|im_end|>");
            bool plain = e && e > q;
            for (const char *c = q; plain && c < e; c++)
                if (*c == '\'' || *c == '"' || *c == '{' || *c == '}' || *c == '+') plain = false;
            if (plain) {
                char *out = malloc((size_t)(e - q) + 1);
                if (!out) return NULL;
                size_t n = 0;
                for (const char *c = q; c < e; c++) {
                    if (skip == 2 && c + 1 < e && c[0] == '\\' && c[1] == 'n') { out[n++] = '\n'; c++; }
                    else out[n++] = *c;
                }
                out[n] = 0;
                return out;
            }
        }
        gguf_str rest = { p + 1, (uint64_t)(end - p - 1) };
        p = memmem_g(rest, mark);
    }
    return NULL;
}

/* Text of a special token named by an id key (e.g. tokenizer.ggml.bos_token_id), or dflt. */
static void sb_token(sbuf *b, const gguf_file *f, const char *key, const char *dflt) {
    uint32_t id;
    const gguf_kv *kv = f ? gguf_get_kv(f, "tokenizer.ggml.tokens") : NULL;
    if (f && kv && kv->strs && gguf_get_u32(f, key, &id) == GGUF_OK && id < kv->arr_n && kv->strs[id].ptr) {
        sb_add(b, kv->strs[id].ptr, kv->strs[id].len);
        return;
    }
    sb_str(b, dflt);
}

static bool role_is(const chat_msg *m, const char *r) { return m->role && strcmp(m->role, r) == 0; }

char *chat_apply(chat_tmpl tmpl, const gguf_file *f, const chat_msg *msgs, int n, bool add_generation_prompt) {
    sbuf b = { 0 };
    sb_add(&b, "", 0);
    if (n < 0 || (n > 0 && !msgs)) n = 0;
    switch (tmpl) {
    case CHAT_TMPL_LLAMA3:
        sb_token(&b, f, "tokenizer.ggml.bos_token_id", "<|begin_of_text|>");
        for (int i = 0; i < n; i++) {
            sb_str(&b, "<|start_header_id|>");
            sb_str(&b, msgs[i].role);
            sb_str(&b, "<|end_header_id|>\n\n");
            sb_trim(&b, msgs[i].content);
            sb_str(&b, "<|eot_id|>");
        }
        if (add_generation_prompt) sb_str(&b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
        break;
    case CHAT_TMPL_LLAMA2: {
        /* Meta's template: system folded into the first user turn inside <<SYS>>. */
        int i = 0;
        const char *sys = NULL;
        if (n > 0 && role_is(&msgs[0], "system")) { sys = msgs[0].content; i = 1; }
        for (int k = 0; i < n; i++, k++) {
            if (role_is(&msgs[i], "user")) {
                sb_token(&b, f, "tokenizer.ggml.bos_token_id", "<s>");
                sb_str(&b, "[INST] ");
                if (k == 0 && sys) {
                    sbuf c = { 0 };
                    sb_str(&c, "<<SYS>>\n"); sb_str(&c, sys); sb_str(&c, "\n<</SYS>>\n\n"); sb_str(&c, msgs[i].content);
                    sb_trim(&b, c.p);
                    b.oom |= c.oom;
                    free(c.p);
                } else sb_trim(&b, msgs[i].content);
                sb_str(&b, " [/INST]");
            } else if (role_is(&msgs[i], "assistant")) {
                sb_str(&b, " ");
                sb_trim(&b, msgs[i].content);
                sb_str(&b, " ");
                sb_token(&b, f, "tokenizer.ggml.eos_token_id", "</s>");
            }
        }
        break;
    }
    case CHAT_TMPL_MISTRAL: {
        /* Mistral v0.1 style; a system message is prepended to the first user message. */
        sb_token(&b, f, "tokenizer.ggml.bos_token_id", "<s>");
        const char *sys = NULL;
        int i = 0;
        if (n > 0 && role_is(&msgs[0], "system")) { sys = msgs[0].content; i = 1; }
        for (; i < n; i++) {
            if (role_is(&msgs[i], "user")) {
                sb_str(&b, "[INST] ");
                if (sys) { sb_str(&b, sys); sb_str(&b, "\n\n"); sys = NULL; }
                sb_str(&b, msgs[i].content);
                sb_str(&b, " [/INST]");
            } else if (role_is(&msgs[i], "assistant")) {
                sb_str(&b, msgs[i].content);
                sb_token(&b, f, "tokenizer.ggml.eos_token_id", "</s>");
            }
        }
        break;
    }
    case CHAT_TMPL_CHATML:
    case CHAT_TMPL_NONE:
    default: {
        if (tmpl == CHAT_TMPL_NONE) { /* plain concatenation */
            for (int i = 0; i < n; i++) { sb_str(&b, msgs[i].content); if (i + 1 < n) sb_str(&b, "\n"); }
            break;
        }
        char *sys = n > 0 && !role_is(&msgs[0], "system") ? default_system(f) : NULL;
        if (sys) {
            sb_str(&b, "<|im_start|>system\n");
            sb_str(&b, sys);
            sb_str(&b, "<|im_end|>\n");
            free(sys);
        }
        for (int i = 0; i < n; i++) {
            sb_str(&b, "<|im_start|>");
            sb_str(&b, msgs[i].role);
            sb_str(&b, "\n");
            sb_str(&b, msgs[i].content);
            sb_str(&b, "<|im_end|>\n");
        }
        if (add_generation_prompt) sb_str(&b, "<|im_start|>assistant\n");
        break;
    }
    }
    if (b.oom) { free(b.p); return NULL; }
    return b.p;
}

/* ---------------------------------------------------------------- tools */
#include "toolcall.h"

#define HERMES_TOOLS_HEAD "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n" \
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
#define HERMES_TOOLS_TAIL "\n</tools>\n\nFor each function call, return a json object with function name and " \
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, " \
    "\"arguments\": <args-json-object>}\n</tool_call>"
#define LLAMA31_TOOLS_HEAD "Given the following functions, please respond with a JSON for a function call " \
    "with its proper arguments that best answers the given prompt.\n\n" \
    "Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}." \
    "Do not use variables.\n\n"

/* A tool (JSON text) as the template's tojson writes it; indent < 0: one line. */
static void sb_tool(sbuf *b, const char *tool, int indent) {
    cJSON *v = cJSON_Parse(tool);
    char *s = v ? toolcall_pyjson(v, indent) : NULL;
    if (v && !s) b->oom = true;
    sb_str(b, s ? s : tool);
    free(s);
    cJSON_Delete(v);
}

static void sb_args(sbuf *b, const char *args) {
    char *s = toolcall_pyjson_text(args && *args ? args : "{}");
    if (!s) { b->oom = true; return; }
    sb_str(b, s);
    free(s);
}

static void sb_hermes_tools(sbuf *b, const char *const *tools, int n_tools) {
    sb_str(b, HERMES_TOOLS_HEAD);
    for (int i = 0; i < n_tools; i++) { sb_str(b, "\n"); sb_tool(b, tools[i], -1); }
    sb_str(b, HERMES_TOOLS_TAIL);
}

static void sb_hermes_call(sbuf *b, const chat_tool_call *c) {
    sb_str(b, "<tool_call>\n{\"name\": \"");
    sb_str(b, c->name);
    sb_str(b, "\", \"arguments\": ");
    sb_args(b, c->arguments);
    sb_str(b, "}\n</tool_call>");
}

static bool is_tool_role(const chat_msg *m) { return role_is(m, "tool") || role_is(m, "ipython"); }

/* Qwen2.5's / Qwen3's template (their renderings agree for these conversations). */
static char *chatml_tools(const gguf_file *f, const chat_msg *msgs, int n, const char *const *tools, int n_tools,
                          bool gen) {
    sbuf b = { 0 };
    sb_add(&b, "", 0);
    int i0 = 0;
    if (n_tools > 0) {
        sb_str(&b, "<|im_start|>system\n");
        if (n > 0 && role_is(&msgs[0], "system")) {
            sb_str(&b, msgs[0].content);
            sb_str(&b, "\n\n");
            i0 = 1;
        } else {
            char *sys = default_system(f);
            if (sys) { sb_str(&b, sys); sb_str(&b, "\n\n"); free(sys); }
        }
        sb_hermes_tools(&b, tools, n_tools);
        sb_str(&b, "<|im_end|>\n");
    } else if (n > 0 && !role_is(&msgs[0], "system")) {
        char *sys = default_system(f);
        if (sys) { sb_str(&b, "<|im_start|>system\n"); sb_str(&b, sys); sb_str(&b, "<|im_end|>\n"); free(sys); }
    }
    for (int i = i0; i < n; i++) {
        const chat_msg *m = &msgs[i];
        if (is_tool_role(m)) {
            if (i == 0 || !is_tool_role(&msgs[i - 1])) sb_str(&b, "<|im_start|>user");
            sb_str(&b, "\n<tool_response>\n");
            sb_str(&b, m->content);
            sb_str(&b, "\n</tool_response>");
            if (i + 1 == n || !is_tool_role(&msgs[i + 1])) sb_str(&b, "<|im_end|>\n");
        } else if (role_is(m, "assistant") && m->n_tool_calls > 0) {
            sb_str(&b, "<|im_start|>assistant");
            if (m->content && *m->content) { sb_str(&b, "\n"); sb_str(&b, m->content); }
            for (int k = 0; k < m->n_tool_calls; k++) { sb_str(&b, "\n"); sb_hermes_call(&b, &m->tool_calls[k]); }
            sb_str(&b, "<|im_end|>\n");
        } else {
            sb_str(&b, "<|im_start|>");
            sb_str(&b, m->role);
            sb_str(&b, "\n");
            sb_str(&b, m->content);
            sb_str(&b, "<|im_end|>\n");
        }
    }
    if (gen) sb_str(&b, "<|im_start|>assistant\n");
    if (b.oom) { free(b.p); return NULL; }
    return b.p;
}

/* The date Llama 3.1's template writes when none is given: its `date_string` literal. */
static void sb_llama_date(sbuf *b, const gguf_file *f) {
    gguf_str s = template_of(f);
    const char *p = memmem_g(s, "set date_string = \"");
    if (p) {
        p += strlen("set date_string = \"");
        const char *e = memchr(p, '"', (size_t)(s.ptr + s.len - p));
        if (e && e - p < 40) { sb_add(b, p, (size_t)(e - p)); return; }
    }
    sb_str(b, "26 Jul 2024");
}

/* Llama 3.1's template (tools_in_user_message, its default). */
static char *llama31_tools(const gguf_file *f, const chat_msg *msgs, int n, const char *const *tools, int n_tools,
                           bool gen) {
    sbuf b = { 0 };
    sb_add(&b, "", 0);
    sb_token(&b, f, "tokenizer.ggml.bos_token_id", "<|begin_of_text|>");
    sb_str(&b, "<|start_header_id|>system<|end_header_id|>\n\n");
    if (n_tools > 0) sb_str(&b, "Environment: ipython\n");
    sb_str(&b, "Cutting Knowledge Date: December 2023\nToday Date: ");
    sb_llama_date(&b, f);
    sb_str(&b, "\n\n");
    int i = 0;
    if (n > 0 && role_is(&msgs[0], "system")) { sb_trim(&b, msgs[0].content); i = 1; }
    sb_str(&b, "<|eot_id|>");
    if (n_tools > 0) {
        if (i >= n) { free(b.p); return NULL; }   /* the template raises: no first user message */
        sb_str(&b, "<|start_header_id|>user<|end_header_id|>\n\n" LLAMA31_TOOLS_HEAD);
        for (int k = 0; k < n_tools; k++) { sb_tool(&b, tools[k], 4); sb_str(&b, "\n\n"); }
        sb_trim(&b, msgs[i].content);
        sb_str(&b, "<|eot_id|>");
        i++;
    }
    for (; i < n; i++) {
        const chat_msg *m = &msgs[i];
        if (is_tool_role(m)) {   /* a string is iterable in Jinja: the template writes it | tojson */
            sb_str(&b, "<|start_header_id|>ipython<|end_header_id|>\n\n");
            cJSON *s = cJSON_CreateString(m->content ? m->content : "");
            char *js = s ? toolcall_pyjson(s, -1) : NULL;
            if (!js) b.oom = true; else sb_str(&b, js);
            free(js);
            cJSON_Delete(s);
            sb_str(&b, "<|eot_id|>");
        } else if (role_is(m, "assistant") && m->n_tool_calls > 0) {
            /* The template takes one call per message; more are rendered as consecutive turns. */
            for (int k = 0; k < m->n_tool_calls; k++) {
                sb_str(&b, "<|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"");
                sb_str(&b, m->tool_calls[k].name);
                sb_str(&b, "\", \"parameters\": ");
                sb_args(&b, m->tool_calls[k].arguments);
                sb_str(&b, "}<|eot_id|>");
            }
        } else {
            sb_str(&b, "<|start_header_id|>");
            sb_str(&b, m->role);
            sb_str(&b, "<|end_header_id|>\n\n");
            sb_trim(&b, m->content);
            sb_str(&b, "<|eot_id|>");
        }
    }
    if (gen) sb_str(&b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    if (b.oom) { free(b.p); return NULL; }
    return b.p;
}

/* Other families: the ChatML words as plain text in their own messages. */
static char *generic_tools(chat_tmpl tmpl, const gguf_file *f, const chat_msg *msgs, int n, const char *const *tools,
                           int n_tools, bool gen) {
    chat_msg *mm = calloc((size_t)n + 1, sizeof *mm);
    sbuf *txt = calloc((size_t)n + 1, sizeof *txt);
    int k = 0, i = 0;
    char *out = NULL;
    if (!mm || !txt) goto done;
    if (n_tools > 0) {
        if (n > 0 && role_is(&msgs[0], "system")) { sb_str(&txt[k], msgs[0].content); sb_str(&txt[k], "\n\n"); i = 1; }
        sb_hermes_tools(&txt[k], tools, n_tools);
        mm[k].role = "system";
        k++;
    }
    for (; i < n; i++) {
        const chat_msg *m = &msgs[i];
        sb_add(&txt[k], "", 0);
        if (is_tool_role(m)) {
            mm[k].role = "user";
            for (; i < n && is_tool_role(&msgs[i]); i++) {
                if (txt[k].n) sb_str(&txt[k], "\n");
                sb_str(&txt[k], "<tool_response>\n");
                sb_str(&txt[k], msgs[i].content);
                sb_str(&txt[k], "\n</tool_response>");
            }
            i--;
        } else {
            mm[k].role = m->role;
            sb_str(&txt[k], m->content);
            for (int c = 0; c < m->n_tool_calls; c++) {
                if (txt[k].n) sb_str(&txt[k], "\n");
                sb_hermes_call(&txt[k], &m->tool_calls[c]);
            }
        }
        k++;
    }
    bool oom = false;
    for (int j = 0; j < k; j++) { oom |= txt[j].oom; mm[j].content = txt[j].p ? txt[j].p : ""; }
    if (!oom) out = chat_apply(tmpl, f, mm, k, gen);
done:
    if (txt) for (int j = 0; j <= n; j++) free(txt[j].p);
    free(txt);
    free(mm);
    return out;
}

char *chat_apply_tools(chat_tmpl tmpl, const gguf_file *f, const chat_msg *msgs, int n, const char *const *tools,
                       int n_tools, bool add_generation_prompt) {
    bool parts = n_tools > 0;
    for (int i = 0; i < n && !parts; i++) parts = msgs[i].n_tool_calls > 0 || is_tool_role(&msgs[i]);
    if (!parts) return chat_apply(tmpl, f, msgs, n, add_generation_prompt);
    if (n < 0 || (n > 0 && !msgs)) n = 0;
    switch (tmpl) {
    case CHAT_TMPL_CHATML: return chatml_tools(f, msgs, n, tools, n_tools, add_generation_prompt);
    case CHAT_TMPL_LLAMA3: return llama31_tools(f, msgs, n, tools, n_tools, add_generation_prompt);
    default: return generic_tools(tmpl, f, msgs, n, tools, n_tools, add_generation_prompt);
    }
}

/* ---------------------------------------------------------------- thinking models */
/* A literal of the template's Jinja source, with its newlines written as the escape "\n" (as
 * templates write them) or as they are. */
static bool tmpl_has_text(gguf_str s, const char *lit) {
    if (memmem_g(s, lit)) return true;
    char esc[128];
    size_t n = 0;
    for (const char *p = lit; *p && n + 2 < sizeof esc; p++) {
        if (*p == '\n') { esc[n++] = '\\'; esc[n++] = 'n'; }
        else esc[n++] = *p;
    }
    esc[n] = 0;
    return memmem_g(s, esc) != NULL;
}

chat_think chat_think_detect(const gguf_file *f, const tokenizer *t) {
    chat_think th = { 0 };
    gguf_str s = template_of(f);
    th.thinks = memmem_g(s, "<think>") || (t && tokenizer_find(t, "<think>") >= 0 && tokenizer_find(t, "</think>") >= 0);
    if (!th.thinks) return th;
    th.gen_opens = tmpl_has_text(s, "<|im_start|>assistant\n<think>\n");
    th.can_disable = memmem_g(s, "enable_thinking") && tmpl_has_text(s, "<think>\n\n</think>\n\n");
    return th;
}

const char *chat_think_suffix(const chat_think *th, bool no_thinking) {
    if (!th) return "";
    if (no_thinking && th->can_disable) return "<think>\n\n</think>\n\n";
    if (th->gen_opens) return "<think>\n";
    return "";
}

char *chat_render(chat_tmpl tmpl, const gguf_file *f, const chat_think *th, const chat_msg *msgs, int n,
                  const char *const *tools, int n_tools, bool add_generation_prompt, bool no_thinking) {
    char *s = chat_apply_tools(tmpl, f, msgs, n, tools, n_tools, add_generation_prompt);
    const char *sfx = add_generation_prompt ? chat_think_suffix(th, no_thinking) : "";
    if (!s || !*sfx) return s;
    size_t a = strlen(s), b = strlen(sfx);
    char *o = realloc(s, a + b + 1);
    if (!o) { free(s); return NULL; }
    memcpy(o + a, sfx, b + 1);
    return o;
}
