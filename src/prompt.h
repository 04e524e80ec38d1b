/* prompt: an API request's prompt as the engine sees it: parsed body -> chat template -> token ids.
 *
 * One step that two processes must take identically: `pcache serve` tokenizes a request before
 * handing it to the engine, and `pcache route` tokenizes the same request to compute the chain
 * hashes (kvevent.h) a replica will cache it under. Any difference (BOS, template, special
 * tokens) would name other blocks and the router would never see a hit, so both call these
 * functions instead of each carrying a copy.
 *
 * The namespace a prompt is cached under is part of the same contract: the caller's credential
 * namespace (server_key_namespace), split by the request's cache_salt. */
#ifndef PCACHE_PROMPT_H
#define PCACHE_PROMPT_H
#include "api.h"
#include "gguf.h"
#include "tokenizer.h"

/* What tokenizing needs of the model (all borrowed, read-only: shareable across threads). */
typedef struct prompt_model {
    const tokenizer *tok;
    const gguf_file *gf;
    chat_tmpl tmpl;
    chat_think think;         /* chat_think_detect: what the template does with <think> blocks */
} prompt_model;

/* The model's chat template family and thinking behaviour, detected once: the one place that
 * decides how the server, the router and the tools render prompts. */
prompt_model prompt_model_of(const tokenizer *t, const gguf_file *f);

/* A request's prompt. tokens (n of them) and text are owned: prompt_free. */
typedef struct rendered_prompt {
    int32_t *tokens;
    int n;
    bool add_bos;             /* the model wants a BOS and the template did not write one */
    char *text;               /* the rendered prompt; NULL when given as token ids */
    size_t text_len;
    api_bp bps[ENGINE_MAX_BREAKPOINTS]; /* cache breakpoints as byte offsets into text */
    int n_bps;
} rendered_prompt;

/* A conversation continued from a stored response (Responses previous_response_id): when the
 * rendered text starts with prefix, its tokens are exactly `tokens` (the stored prompt and
 * output, all in the prompt cache) and only the rest is tokenized. */
typedef struct prompt_prev {
    const char *prefix;
    const int32_t *tokens;
    int n_tokens;
} prompt_prev;

/* api_parse, with the error's type in Anthropic's words for Anthropic kinds. */
int prompt_parse(api_kind kind, const char *body, size_t len, api_request *req, api_error *e);

/* The prompt of a parsed request: token ids given (completions) are checked against the
 * vocabulary and taken over (req->prompt_ids becomes NULL); otherwise the request is rendered
 * with the model's chat template (enable_thinking as the request sets it) and tokenized (BOS
 * only if the model wants one and the template did not write it). prev may be NULL. Returns 0, or -1 with *e (a 400 in the
 * request's API's words) and *out empty. */
int prompt_tokens(const prompt_model *m, api_request *req, const prompt_prev *prev, rendered_prompt *out, api_error *e);
void prompt_free(rendered_prompt *p);

/* The cache namespace of a request: the credential's namespace ns, or, with a cache_salt, "s" +
 * FNV-1a-64 over ns, 0x1f and the salt. out needs 18 bytes. */
void prompt_namespace(const char *ns, const char *salt, char out[18]);
#endif
