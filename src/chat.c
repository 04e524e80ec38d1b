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
