/* prompt: see prompt.h. */
#include "prompt.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

prompt_model prompt_model_of(const tokenizer *t, const gguf_file *f) {
    return (prompt_model){ t, f, chat_template_detect(f, t), chat_think_detect(f, t) };
}

int prompt_parse(api_kind kind, const char *body, size_t len, api_request *req, api_error *e) {
    if (api_parse(kind, body, len, req, e) == 0) return 0;
    if (api_is_anthropic(kind)) snprintf(e->type, sizeof e->type, "%s", api_anthropic_type(e->status));
    return -1;
}

typedef struct { const prompt_model *m; bool no_thinking; } render_ctx;
static char *render_tmpl(void *ctx, const chat_msg *msgs, int n, const char *const *tools, int n_tools, bool add_gen) {
    const render_ctx *rc = ctx;
    return chat_render(rc->m->tmpl, rc->m->gf, &rc->m->think, msgs, n, tools, n_tools, add_gen, rc->no_thinking);
}

int prompt_tokens(const prompt_model *m, api_request *req, const prompt_prev *prev, rendered_prompt *out, api_error *e) {
    memset(out, 0, sizeof *out);
    const bool anth = api_is_anthropic(req->kind);
    if (req->prompt_ids) {
        /* A prompt given as token ids goes to the engine as it is: no BOS, no tokenization. */
        int nv = tokenizer_n_vocab(m->tok);
        for (int i = 0; i < req->n_prompt_ids; i++)
            if (req->prompt_ids[i] >= nv) {
                char param[32];
                snprintf(param, sizeof param, "prompt[%d]", i);
                api_error_set(e, 400, "invalid_request_error", param, "invalid_value",
                              "%s: token id %d is out of range: the vocabulary has %d tokens (ids 0 to %d)", param,
                              req->prompt_ids[i], nv, nv - 1);
                return -1;
            }
        out->tokens = req->prompt_ids;
        out->n = req->n_prompt_ids;
        req->prompt_ids = NULL;
        req->n_prompt_ids = 0;
        return 0;
    }
    char *text = NULL;
    size_t tlen = 0;
    render_ctx rc = { m, req->no_thinking };
    if (api_render(req, render_tmpl, &rc, &text, &tlen, out->bps, &out->n_bps, e) < 0) {
        if (anth) snprintf(e->type, sizeof e->type, "%s", api_anthropic_type(e->status));
        return -1;
    }
    /* Tokenize once; BOS only if the model wants it and the template did not write it. */
    char terr[256] = "";
    bool add_bos = tokenizer_add_bos(m->tok);
    if (add_bos) {
        size_t bl = 0;
        const char *bp = tokenizer_piece(m->tok, tokenizer_bos(m->tok), true, &bl);
        if (bp && bl && tlen >= bl && !memcmp(text, bp, bl)) add_bos = false;
    }
    const size_t plen = prev && prev->prefix ? strlen(prev->prefix) : 0;
    int n;
    if (plen && prev->n_tokens > 0 && tlen >= plen && !memcmp(text, prev->prefix, plen)) {
        /* the conversation goes on from exactly the tokens of the previous response (its
         * prompt and output, all in the prompt cache); only the rest is tokenized */
        int32_t *rest = NULL;
        int nr = tokenizer_encode(m->tok, text + plen, tlen - plen, false, true, &rest, terr, sizeof terr);
        n = -1;
        if (nr >= 0 && (out->tokens = malloc(((size_t)prev->n_tokens + (size_t)nr + 1) * sizeof *out->tokens))) {
            memcpy(out->tokens, prev->tokens, (size_t)prev->n_tokens * sizeof *out->tokens);
            if (nr) memcpy(out->tokens + prev->n_tokens, rest, (size_t)nr * sizeof *rest);
            n = prev->n_tokens + nr;
        }
        free(rest);
    } else {
        n = tokenizer_encode(m->tok, text, tlen, add_bos, true, &out->tokens, terr, sizeof terr);
    }
    if (n < 0) {
        free(text);
        free(out->tokens);
        memset(out, 0, sizeof *out);
        api_error_set(e, 400, "invalid_request_error", NULL, NULL, "could not tokenize the prompt: %s", terr);
        return -1;
    }
    out->n = n;
    out->add_bos = add_bos;
    out->text = text;
    out->text_len = tlen;
    return 0;
}

void prompt_free(rendered_prompt *p) {
    free(p->tokens);
    free(p->text);
    memset(p, 0, sizeof *p);
}

void prompt_namespace(const char *ns, const char *salt, char out[18]) {
    if (!salt) { snprintf(out, 18, "%s", ns); return; }
    uint64_t h = 1469598103934665603ull;
    for (const unsigned char *p = (const unsigned char *)ns; *p; p++) { h ^= *p; h *= 1099511628211ull; }
    h ^= 0x1f; h *= 1099511628211ull;
    for (const unsigned char *p = (const unsigned char *)salt; *p; p++) { h ^= *p; h *= 1099511628211ull; }
    snprintf(out, 18, "s%016llx", (unsigned long long)h);
}
