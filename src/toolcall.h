/* toolcall: the text formats in which chat models call tools, and the way back.
 *
 * A model calls a tool by writing text in the format its chat template taught it; the server
 * turns that text into structured calls (OpenAI tool_calls, Anthropic tool_use blocks), and
 * when a call is forced (tool_choice required / a named function / Anthropic any / tool) or a
 * function is `strict`, it constrains the text with a grammar (grammar.h) whose sentences are
 * exactly well-formed calls whose arguments validate against the function's JSON schema.
 *
 * Two formats, one per template family (chat.c renders the same formats into prompts):
 * - TOOLFMT_HERMES (ChatML: Qwen2.5, Qwen3, SmolLM2, and the fallback for the others): any
 *   text, then one or more
 *       <tool_call>\n{"name": "NAME", "arguments": {...}}\n</tool_call>
 *   separated by a newline.
 * - TOOLFMT_LLAMA3 (Llama 3.1+): the whole reply is one JSON object
 *       {"name": "NAME", "parameters": {...}}
 *   (a reply that does not start with "{" is plain text).
 *
 * Parsing is incremental (for streaming) and never loses text: content outside calls is
 * released as soon as it cannot be the start of a call marker (the tail that may be is held
 * back, as stop strings are); a call is released when it is complete and parses; call text
 * that does not parse (or is cut off by max_tokens) is released as content, as it was written.
 * Non-streamed responses run the same parser over the whole text, so both agree.
 *
 * JSON is rendered into prompts the way Hugging Face's `tojson` filter writes it (Python's
 * json.dumps with ensure_ascii=False: ", " and ": " separators, or indent), so prompts match
 * the models' Jinja templates byte for byte and stay identical across turns (prompt caching).
 */
#ifndef PCACHE_TOOLCALL_H
#define PCACHE_TOOLCALL_H
#include <stddef.h>
#include <stdbool.h>
#include <cjson/cJSON.h>
#include "grammar.h"

typedef enum { TOOLFMT_HERMES, TOOLFMT_LLAMA3 } toolfmt;

/* JSON text as Python's json.dumps(v, ensure_ascii=False, indent=indent) writes it (indent < 0:
 * one line with ", " and ": "). Integral numbers are written as integers (cJSON keeps no
 * int/float distinction), others in the shortest %g form that reads back. malloc'ed. */
char *toolcall_pyjson(const cJSON *v, int indent);
/* The arguments of a call (JSON text, as clients send them) in that form; text that is not
 * JSON is returned as it is. malloc'ed. */
char *toolcall_pyjson_text(const char *json);

/* ---- parsing the model's output */
typedef struct toolcall {
    char *name;
    char *arguments;   /* JSON text of the arguments object, as the model wrote it */
    size_t at;         /* the content released before it (its place among the text) */
} toolcall;

typedef struct toolcall_parser {
    toolfmt fmt;
    int state;
    char *buf;           /* text fed and not yet decided */
    size_t n_buf, cap_buf;
    char *content;       /* all content released so far (text outside calls) */
    size_t n_content, cap_content;
    toolcall *calls;     /* every call parsed so far */
    int n_calls, cap_calls;
    bool oom;
} toolcall_parser;

void toolcall_parser_init(toolcall_parser *p, toolfmt fmt);
void toolcall_parser_free(toolcall_parser *p);
/* Feeds generated text; final: it is the end of the output (everything held is decided).
 * Released content is appended to p->content, complete calls to p->calls (each knowing where
 * it falls in the content). false: out of memory. */
bool toolcall_feed(toolcall_parser *p, const char *text, size_t len, bool final);

/* ---- constraining the output */
typedef struct toolcall_tool {
    const char *name;
    const cJSON *parameters;   /* the arguments' JSON schema; NULL: any JSON object */
} toolcall_tool;

enum {
    TOOLCALL_FORCED,   /* the reply is one or more calls (one if !parallel) */
    TOOLCALL_LAZY,     /* free text, then optionally calls: a call, once begun, is constrained */
};
/* The grammar of replies in format fmt calling tools[0..n) (mode as above). NULL with err when
 * a schema is refused (jsonschema.h: the error names the keyword and the tool). */
grammar *toolcall_grammar(toolfmt fmt, const toolcall_tool *tools, int n, int mode, bool parallel, char *err,
                          size_t errlen);
#endif
