/* api: OpenAI and Anthropic request parsing and response formatting, with no HTTP in sight.
 *
 * Pure functions over bytes and structs, so they are easy to unit test and to fuzz: the HTTP
 * server (server.c) reads a body, calls api_parse, renders the prompt with api_render (the chat
 * template is passed in as a function, so tests need no model), and formats engine results back
 * with the api_format_* functions. Every parser failure is an api_error carrying the HTTP
 * status and the fields each API puts in its error body; no input makes these functions crash.
 */
#ifndef PCACHE_API_H
#define PCACHE_API_H
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include "engine.h"

typedef enum {
    API_OPENAI_CHAT,            /* POST /v1/chat/completions */
    API_OPENAI_COMPLETION,      /* POST /v1/completions */
    API_OPENAI_RESPONSES,       /* POST /v1/responses */
    API_ANTHROPIC_MESSAGES,     /* POST /v1/messages */
    API_ANTHROPIC_COUNT_TOKENS, /* POST /v1/messages/count_tokens */
} api_kind;

static inline bool api_is_anthropic(api_kind k) {
    return k == API_ANTHROPIC_MESSAGES || k == API_ANTHROPIC_COUNT_TOKENS;
}

/* An error as both APIs report it: HTTP status, the error type string ("invalid_request_error",
 * "authentication_error", "not_found_error", ...), OpenAI's param and code (may be empty). */
typedef struct api_error {
    int status;
    char type[40];
    char param[48];
    char code[40];
    char message[256];
} api_error;
void api_error_set(api_error *e, int status, const char *type, const char *param, const char *code,
                   const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* The error body in the shape of the API (malloc'ed JSON). */
char *api_format_error(bool anthropic, const api_error *e);
/* Anthropic's error type for an HTTP status (invalid_request_error, authentication_error, ...). */
const char *api_anthropic_type(int status);
/* The event that ends a stream that failed midway (malloc'ed): OpenAI `data: {"error": ...}`
 * (the caller adds `data: [DONE]`), Anthropic `event: error` with an api_error. */
char *api_format_stream_error(bool anthropic, const char *msg);

#define API_MAX_STOP 16
#define API_MAX_BODY (8u << 20)

/* A cache breakpoint inside one message: the prompt prefix up to byte `off` of the message's
 * content (the end of a content block) is to be cached for ttl_s seconds. */
typedef struct { size_t off; double ttl_s; } api_msg_bp;

/* A tool call: in an assistant message of the conversation, or made by the model. */
typedef struct api_tool_call {
    char *id;                 /* OpenAI call_..., Anthropic toolu_... (may be NULL in requests) */
    char *name;
    char *arguments;          /* JSON text of the arguments object */
} api_tool_call;

/* A function the model may call. */
typedef struct api_tool {
    char *name;
    char *json;               /* the tool in OpenAI's form, {"type": "function", "function": {...}},
                                 as the chat template renders it */
    char *parameters;         /* its JSON schema as compact text (NULL: none given) */
    bool strict;              /* OpenAI function.strict: arguments must follow the schema */
} api_tool;
enum { API_TOOL_AUTO = 0, API_TOOL_NONE, API_TOOL_REQUIRED, API_TOOL_NAMED };

typedef struct api_msg {
    char *role;               /* "system", "user", "assistant", "tool" */
    char *content;            /* all text blocks of the message, joined */
    api_tool_call *calls;     /* assistant: the tool calls it made */
    int n_calls;
    api_msg_bp bp[ENGINE_MAX_BREAKPOINTS];
    int n_bp;
} api_msg;

typedef struct api_request {
    api_kind kind;
    char *model;              /* NULL when the body has none (the server decides: see server.c) */
    api_msg *msgs;            /* chat kinds (Anthropic: system + tools folded into msgs[0]) */
    int n_msgs;
    bool assistant_prefill;   /* Anthropic: last message is assistant text to continue */
    char *prompt;             /* completions: the raw prompt (NULL when given as token ids) */
    size_t prompt_len;
    int32_t *prompt_ids;      /* completions: the prompt as token ids, used as they are (no BOS,
                                 no tokenization); each >= 0, checked against the vocabulary by
                                 the server */
    int n_prompt_ids;
    sample_params sp;
    bool has_seed;
    int max_tokens;           /* -1: not given */
    char *stop[API_MAX_STOP];
    int n_stop;
    bool stream;
    bool include_usage;       /* OpenAI stream_options.include_usage */
    char *cache_key;          /* OpenAI prompt_cache_key (a routing hint; see server.c) */
    int n_breakpoints;        /* Anthropic cache_control blocks */
    /* Log-probabilities: -1 = off; else how many top alternatives each token lists. Chat:
     * logprobs true + top_logprobs (0..20); completions: logprobs (0..5). */
    int logprobs;
    engine_logit_bias *logit_bias; /* OpenAI logit_bias: token id -> bias in [-100, 100]. Ids are
                                      checked against the vocabulary by the engine (a 400). */
    int n_logit_bias;
    char *cache_salt;         /* any API: splits the caller's cache namespace (vLLM's name) */
    bool ignore_eos;          /* extension (llama.cpp, vLLM): generate past end-of-generation */
    int format;               /* response_format: API_FORMAT_TEXT, _JSON_OBJECT, _JSON_SCHEMA */
    char *schema;             /* json_schema: the schema as compact JSON text */
    api_tool *tools;          /* OpenAI tools / Anthropic tools (custom ones) */
    int n_tools;
    int tool_choice;          /* API_TOOL_*: OpenAI none/auto/required/{function}, Anthropic
                                 none/auto/any/{tool} */
    char *tool_name;          /* API_TOOL_NAMED: the function (one of tools) */
    bool parallel_tool_calls; /* OpenAI parallel_tool_calls (default true); Anthropic
                                 !disable_parallel_tool_use */
    /* Responses API */
    char *instructions;       /* the system message of this turn (not carried to the next) */
    char *prev_id;            /* previous_response_id */
    bool store;               /* keep the response (and its conversation) for retrieval and
                                 previous_response_id; default true */
    char *items;              /* the conversation's input items as a JSON array (the previous
                                 responses' items and outputs, then this request's input) */
    /* Thinking models (reasoning.h) */
    int reasoning_format;     /* llama.cpp's reasoning_format: API_REASONING_SPLIT ("auto",
                                 "deepseek", the default) or API_REASONING_NONE (left inline) */
    bool no_thinking;         /* the template argument enable_thinking = false: chat_template_kwargs
                                 {"enable_thinking": false}, Anthropic thinking disabled, Responses
                                 reasoning.effort "none" */
    const char *want_thinking;/* the parameter that asks for reasoning (Anthropic "thinking" enabled,
                                 Responses "reasoning"), NULL when none: the server refuses it for a
                                 model that does not reason. Its level (budget_tokens, effort) is
                                 not used: nothing bounds the reasoning but max_tokens. */
    bool think;               /* set by the server: the output is split into reasoning and content
                                 (a thinking model, a chat kind, reasoning_format not none, no
                                 grammar from the first token) */
} api_request;
/* Whether the reply is parsed for tool calls: tools given and tool_choice not none. */
static inline bool api_tools_active(const struct api_request *r) { return r->n_tools > 0 && r->tool_choice != API_TOOL_NONE; }
enum { API_REASONING_SPLIT = 0, API_REASONING_NONE };
/* Whether content blocks (Anthropic) and output items are opened as text comes (api_stream):
 * with tool calls or a reasoning block before the text. */
static inline bool api_stream_blocks(const struct api_request *r) {
    return api_tools_active(r) || r->think;
}
enum { API_FORMAT_TEXT = 0, API_FORMAT_JSON_OBJECT, API_FORMAT_JSON_SCHEMA };
#define API_MAX_LOGIT_BIAS 1024
#define API_MAX_CACHE_SALT 256

/* Parses a request body. On failure returns -1 with *err filled (status 400 for malformed JSON
 * or wrong types); *out is then empty. On success the caller frees with api_request_free.
 * Every parameter is honoured or refused: a body that is not valid UTF-8 is a 400, and so is
 * any feature pcache does not implement yet, naming the parameter (OpenAI: n > 1, best_of > 1,
 * echo, suffix, functions with a function_call forcing one (use tools), tools of a type other
 * than function, response_format other than text together with tools, audio, modalities other
 * than text, prediction, web_search_options; Anthropic: server tools (web search, bash, text
 * editor, ...), mcp_servers). Asking for reasoning (Anthropic thinking, Responses reasoning.effort)
 * is parsed here and refused by the server when the model does not reason.
 * Unknown fields are ignored (newer SDKs send fields older servers do not know). */
int api_parse(api_kind kind, const char *body, size_t len, api_request *out, api_error *err);
/* A Responses request continuing a stored conversation: history is the earlier items (a JSON
 * array: inputs and outputs), rendered before this request's input (after its instructions). */
int api_parse_responses(const char *body, size_t len, const char *history, api_request *out, api_error *err);

void api_request_free(api_request *r);

/* The chat template, as a function (server: chat_apply_tools over the model's template), with
 * the tools' JSON texts (none when tool_choice is none). Returns a malloc'ed NUL-terminated
 * prompt, or NULL. */
typedef char *(*api_template_fn)(void *ctx, const chat_msg *msgs, int n, const char *const *tools, int n_tools,
                                 bool add_generation_prompt);

/* A breakpoint as a byte offset into the rendered prompt. */
typedef struct { size_t off; double ttl_s; } api_bp;

/* Renders the request to prompt text (*prompt malloc'ed, NUL-terminated) and maps each message
 * breakpoint to its byte offset in that text (bps has room for ENGINE_MAX_BREAKPOINTS). Offsets
 * are found by rendering once more with a marker at each breakpoint and checking that removing
 * the markers gives the same prompt; if a template rewrites content so that check fails, each
 * breakpoint falls back to the end of the longest rendered prefix that ends within its message. */
int api_render(const api_request *r, api_template_fn fn, void *ctx, char **prompt, size_t *len,
               api_bp *bps, int *n_bps, api_error *err);

/* Number of whole tokens inside the first `off` bytes, given each token's end byte offset
 * (non-decreasing) in the text: the token position a byte breakpoint maps to. */
int api_byte_to_token(const size_t *tok_end, int n_tok, size_t off);

/* Formatting. `text` is the generated text (not NUL-terminated), `stop_matched` is 0 or the
 * 1-based index of the stop string that ended generation. All return malloc'ed strings. */
typedef struct api_result {
    const char *id;
    long long created;
    const char *model;
    const char *text;
    size_t text_len;
    finish_reason why;
    int stop_matched;
    const engine_usage *usage;
    /* With logprobs: the tokens this response (or this stream delta) covers, their text as
     * tok_text gives it (raw bytes, may be part of a UTF-8 character), and for completions the
     * byte offset of lps[0] in the whole generated text (text_offset). */
    const engine_token_info *lps;
    int n_lps;
    size_t text_offset0;
    const char *(*tok_text)(void *ctx, int32_t id, size_t *len);
    void *tok_ctx;
    /* Tool calls the model made (text is then the content outside them); finish reasons become
     * tool_calls / tool_use. */
    const api_tool_call *calls;
    int n_calls;
    /* The reasoning (req.think; text is then the content after it): all of it so far when
     * streaming. reasoning_tokens: the tokens it took (usage's reasoning_tokens). */
    const char *reasoning;
    size_t reasoning_len;
    int reasoning_tokens;
} api_result;

/* Non-streamed response bodies (JSON). */
char *api_format_response(const api_request *r, const api_result *res);
/* Streaming: the first SSE event(s) (role chunk / message_start + content_block_start + ping),
 * one delta event, and the last events (finish chunk, usage chunk, [DONE] / content_block_stop,
 * message_delta, message_stop). n_prompt is known before the usage is. */
char *api_format_stream_start(const api_request *r, const api_result *res, int n_prompt);
char *api_format_stream_delta(const api_request *r, const api_result *res, const char *text, size_t len);
char *api_format_stream_end(const api_request *r, const api_result *res);

/* Streaming with tools (api_tools_active): text and calls interleave. Anthropic puts each in
 * its own content block (text blocks opened as text comes, tool_use blocks with their input as
 * one input_json_delta); OpenAI sends delta.content, and per call a chunk with index, id, type
 * and function.name (arguments "") and one with function.arguments. api_format_stream_start
 * opens no text block for such requests; st starts zeroed. */
typedef struct api_stream {
    int block; bool text_open; int calls;
    bool think_open;          /* a thinking block (Anthropic) / reasoning item (Responses) is open */
    int reasoning_item;       /* Responses: the reasoning item's output_index + 1 (0: none yet) */
    size_t reasoning_sent;    /* bytes of reasoning sent */
    int seq;                  /* Responses: the next event's sequence_number */
    int items;                /* Responses: output items opened so far */
    int msg_item;             /* Responses: the message item's output_index + 1 (0: none yet) */
} api_stream;
char *api_format_stream_text(const api_request *r, const api_result *res, api_stream *st, const char *text, size_t len);
char *api_format_stream_call(const api_request *r, const api_result *res, api_stream *st, const api_tool_call *c);
/* Reasoning (req.think): res->reasoning[st->reasoning_sent .. res->reasoning_len) as OpenAI
 * delta.reasoning_content, an Anthropic thinking block's thinking_delta (the block opened first)
 * or a Responses reasoning item's response.reasoning_text.delta (the item opened first). Text
 * and calls after it close the block / item (with res->reasoning then complete). "" when
 * nothing is new. */
char *api_format_stream_reasoning(const api_request *r, const api_result *res, api_stream *st);
char *api_format_stream_finish(const api_request *r, const api_result *res, api_stream *st);
/* Responses: the output items of a finished response (its message and function calls, as the
 * response lists them; msg_item as api_stream's, 0 for a response not streamed), as a JSON
 * array (malloc'ed), to store with the conversation. */
char *api_responses_output_items(const api_request *r, const api_result *res, int msg_item);

/* Usage objects (cJSON is kept out of this header: these return JSON text). */
char *api_format_usage_openai(const engine_usage *u);
char *api_format_usage_anthropic(const engine_usage *u);

/* OpenAI finish_reason / Anthropic stop_reason strings (without tool calls). */
const char *api_openai_finish(finish_reason why);
const char *api_anthropic_stop(finish_reason why, int stop_matched);
/* A generated tool-call id: prefix ("call_" / "toolu_") + 24 characters from r (random bits). */
void api_tool_call_id(char out[40], bool anthropic, uint64_t r1, uint64_t r2);
#endif
