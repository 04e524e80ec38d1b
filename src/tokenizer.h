/* tokenizer: text <-> token ids, built from a GGUF file's tokenizer.ggml.* metadata.
 *
 * Supports byte-level BPE ("gpt2", pre-tokenizer chosen by tokenizer.ggml.pre: smollm, gpt2,
 * llama3 / llama-bpe, qwen2, default) and SentencePiece BPE ("llama"). Pre-tokenizer regexes
 * run on PCRE2 with Unicode properties. Special/control tokens in the text (e.g. <|im_start|>)
 * are matched as whole tokens when parse_special is set. Ids equal Hugging Face's.
 */
#ifndef PCACHE_TOKENIZER_H
#define PCACHE_TOKENIZER_H
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include "gguf.h"

typedef struct tokenizer tokenizer;

int tokenizer_load(tokenizer **out, const gguf_file *f, char *err, size_t errlen);
void tokenizer_free(tokenizer *t);

/* Encodes text (len bytes, need not be NUL-terminated; invalid UTF-8 is handled as HF does,
 * never a crash). Adds BOS if add_bos (use tokenizer_add_bos for the model's default).
 * Returns the number of tokens written to *out (malloc'ed, caller frees), or -1 with err. */
int tokenizer_encode(const tokenizer *t, const char *text, size_t len, bool add_bos,
                     bool parse_special, int32_t **out, char *err, size_t errlen);

/* The raw bytes of one token (byte-level tokens decoded to bytes; SPM "▁" to space and <0xXX>
 * byte tokens to the byte). Control tokens return their text only if render_special. */
const char *tokenizer_piece(const tokenizer *t, int32_t id, bool render_special, size_t *len);

int tokenizer_n_vocab(const tokenizer *t);
int32_t tokenizer_bos(const tokenizer *t);
int32_t tokenizer_eos(const tokenizer *t);
bool tokenizer_add_bos(const tokenizer *t);
bool tokenizer_is_eog(const tokenizer *t, int32_t id);  /* EOS, EOT, <|im_end|>, <|eot_id|> ... */
int32_t tokenizer_find(const tokenizer *t, const char *piece); /* exact vocab lookup, -1 if none */

/* Streaming detokenizer: feeds token pieces, emits only complete UTF-8 sequences. */
typedef struct {
    char pending[8];
    int n_pending;
} detok_state;
/* Appends the text of token id to out (cap bytes), returns bytes written (complete UTF-8 only;
 * an incomplete tail is held in st until the next call). */
size_t detok_feed(const tokenizer *t, detok_state *st, int32_t id, char *out, size_t cap);
/* Flushes what is held (invalid leftovers become U+FFFD). */
size_t detok_flush(detok_state *st, char *out, size_t cap);

/* Chat templates. A message's role is system, user, assistant or tool (a tool's result); an
 * assistant message may carry tool calls (arguments: JSON text), rendered in the template's
 * tool-call format (toolcall.h). */
typedef struct { const char *name; const char *arguments; } chat_tool_call;
typedef struct {
    const char *role;
    const char *content;
    const chat_tool_call *tool_calls;
    int n_tool_calls;
} chat_msg;
typedef enum { CHAT_TMPL_CHATML, CHAT_TMPL_LLAMA3, CHAT_TMPL_LLAMA2, CHAT_TMPL_MISTRAL, CHAT_TMPL_NONE } chat_tmpl;
/* Detects the family from tokenizer.chat_template (and the vocab); CHATML is the fallback. */
chat_tmpl chat_template_detect(const gguf_file *f, const tokenizer *t);
/* Renders messages to a prompt (malloc'ed NUL-terminated string), adding the assistant
 * generation prefix if add_generation_prompt. SmolLM2's template adds its default system
 * message when the first message is not a system one, as its Jinja template does. */
char *chat_apply(chat_tmpl tmpl, const gguf_file *f, const chat_msg *msgs, int n, bool add_generation_prompt);
/* The same with tools (each the JSON text of a tool in OpenAI's form, {"type": "function",
 * "function": {...}}) rendered as the model's template renders them: ChatML in Qwen2.5's and
 * Qwen3's words (<tools> in the system message, calls as <tool_call>, results as
 * <tool_response> in a user turn), Llama 3 as Llama 3.1's template does (tools in the first
 * user message, calls as JSON, results in ipython turns), the other families in the ChatML
 * words folded into their system text. NULL when the conversation cannot be rendered (Llama 3
 * with tools and no message to put them in). */
char *chat_apply_tools(chat_tmpl tmpl, const gguf_file *f, const chat_msg *msgs, int n, const char *const *tools,
                       int n_tools, bool add_generation_prompt);

/* Thinking models: what the template does with reasoning blocks (<think> ... </think>, see
 * reasoning.h). Detected from the template's text (and the vocabulary), as the family is. */
typedef struct chat_think {
    bool thinks;      /* the template writes <think>, or the vocabulary has <think> and </think> */
    bool gen_opens;   /* ChatML: the generation prompt ends with "<think>\n" (QwQ, Qwen3 thinking-only
                         templates): the reply starts inside the block */
    bool can_disable; /* the template takes enable_thinking (Qwen3): false ends the generation
                         prompt with an empty block, "<think>\n\n</think>\n\n" */
} chat_think;
chat_think chat_think_detect(const gguf_file *f, const tokenizer *t);
/* What the template writes after the generation prompt ("" when nothing): no_thinking is the
 * template argument enable_thinking = false (no effect where the template does not take it, as
 * with Jinja). */
const char *chat_think_suffix(const chat_think *th, bool no_thinking);
/* chat_apply_tools, then that suffix when add_generation_prompt (th may be NULL: none). */
char *chat_render(chat_tmpl tmpl, const gguf_file *f, const chat_think *th, const chat_msg *msgs, int n,
                  const char *const *tools, int n_tools, bool add_generation_prompt, bool no_thinking);
#endif
