/* reasoning: splits a thinking model's output into its reasoning and its answer.
 *
 * Thinking models (Qwen3, QwQ, DeepSeek-R1 and their distills) write their chain of thought
 * first, between <think> and </think>, then the answer. The APIs return the two apart: OpenAI-
 * compatible servers as message.reasoning_content, Anthropic as a `thinking` content block, the
 * Responses API as a `reasoning` output item. This module is the streaming splitter that all
 * three use: it is fed the generated text in pieces as they come, releases each byte as reasoning
 * or as content as soon as that is decided, and holds back only what is not decided yet.
 *
 * The rules (llama.cpp's, so clients see the same split from either server):
 * - A reasoning block is recognised only at the start of the output (after optional whitespace):
 *   text before a <think> means there is no block, and the whole output is content, tags and all.
 *   When the prompt already ends inside the block (Qwen3 thinking templates end the generation
 *   prompt with "<think>\n"), the output starts as reasoning; an opening tag written anyway is
 *   skipped.
 * - The block ends at the first </think>; nothing nests: a <think> inside the reasoning is
 *   reasoning text, and tags after the block are content text.
 * - No </think> ever: everything after the opening is reasoning (a reply cut off by max_tokens
 *   while thinking has no content).
 * - Whitespace around the reasoning and at the start of the content is not part of either
 *   (the templates' "\n" after <think> and "\n\n" after </think>).
 *
 * Held back while streaming: a tail that may be the start of the tag being looked for ("<thi",
 * "</thin"), and in the reasoning a run of trailing whitespace (it may precede </think>). So a
 * tag split across any pieces is never released as text, and the split is the same whatever the
 * pieces were: the streamed pieces concatenate to exactly what one feed of the whole text gives.
 */
#ifndef PCACHE_REASONING_H
#define PCACHE_REASONING_H
#include <stdbool.h>
#include <stddef.h>

#define REASONING_OPEN "<think>"
#define REASONING_CLOSE "</think>"

typedef struct reasoning_parser {
    int state;
    char *buf;            /* fed and not yet decided */
    size_t n_buf, cap_buf;
    char *reasoning;      /* all reasoning released so far (NUL-terminated when not NULL) */
    size_t n_reasoning, cap_reasoning;
    char *content;        /* all content released so far (NUL-terminated when not NULL) */
    size_t n_content, cap_content;
    size_t fed;           /* bytes fed */
    size_t reasoning_end; /* bytes of the output up to the end of the block (its </think>, or all
                             of it while the block is open); 0 when there is none */
    bool oom;
} reasoning_parser;

/* started_inside: the prompt ends inside a <think> block (the output starts as reasoning). */
void reasoning_init(reasoning_parser *p, bool started_inside);
void reasoning_free(reasoning_parser *p);
/* Feeds generated text; final: it is the end of the output (everything held is decided).
 * Released text is appended to p->reasoning / p->content. false: out of memory. */
bool reasoning_feed(reasoning_parser *p, const char *text, size_t len, bool final);
#endif
