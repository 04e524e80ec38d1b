/* grammar: constrained decoding. A context-free grammar over bytes masks the logits at every
 * step so that the generated text is always a prefix of a sentence of the grammar, and ends only
 * where a sentence ends (structured outputs: jsonschema.c compiles a JSON schema to one).
 *
 * Rules are alternatives of sequences of elements; an element is a byte set (256 bits) or a
 * reference to a rule. Matching is a pushdown automaton with a set of stacks (the grammar may be
 * ambiguous for a while, e.g. anyOf): a stack is the position of the next element to match and
 * the return positions below it. Stacks are interned (hash-consed nodes: position + parent), so
 * equal stacks are one id, and sets of stacks are interned too: a set of stacks is a state of a
 * DFA that is built lazily, one transition (state, byte) at a time. Right recursion is a tail
 * call (no return frame is pushed where the rest of an alternative is empty), so repetitions do
 * not grow the stacks.
 *
 * The token mask of a state is a walk over a trie of the vocabulary's byte strings, following
 * DFA transitions and pruning where the state dies; masks are cached per state. A grammar's
 * runtime (interned stacks, states, transitions, masks) lives as long as the grammar, and
 * compiled grammars are shared by every request with the same schema, so a schema's masks are
 * computed once per process, not once per request.
 *
 * Threads: building a grammar (gb_*) is done by any thread; a built grammar's rules are
 * immutable. The runtime (grammar_start, grammar_advance, grammar_mask) is for one thread at a
 * time (the engine thread). */
#ifndef PCACHE_GRAMMAR_H
#define PCACHE_GRAMMAR_H
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

typedef struct grammar grammar;
typedef struct gbuild gbuild;

/* ---- building */
gbuild *gb_new(void);
void gb_free(gbuild *b);
/* A new rule (no alternatives yet); returns its id. */
int gb_rule(gbuild *b);
/* Starts a new alternative of rule r; the elements added next go to it. */
void gb_alt(gbuild *b, int r);
/* Elements appended to the current alternative. */
void gb_set(gbuild *b, const uint64_t set[4]);            /* one byte from the set */
void gb_byte_range(gbuild *b, uint8_t lo, uint8_t hi);    /* one byte in [lo, hi] */
void gb_lit(gbuild *b, const char *s, size_t n);          /* these bytes in order */
void gb_ref(gbuild *b, int r);
/* Convenience: a new rule matching x{min,max} of rule x (max < 0: unbounded). */
int gb_repeat(gbuild *b, int x, int min, int max);
/* Finishes: the grammar of rule root. Returns NULL with err (an empty or unreachable-only
 * grammar, left recursion found at start, out of memory). b is freed either way. */
grammar *gb_finish(gbuild *b, int root, char *err, size_t errlen);

/* Reference counting (a grammar is shared by requests and a cache). */
grammar *grammar_ref(grammar *g);
void grammar_unref(grammar *g);

/* ---- matching */
enum { GRAMMAR_DEAD = 0 };   /* the state in which nothing more can be matched */
/* The initial state (> 0), or -1 when a limit was hit. */
int grammar_start(grammar *g);
/* The state after byte c (GRAMMAR_DEAD when c cannot come next), or -1 on a limit. */
int grammar_step(grammar *g, int state, uint8_t c);
/* The state after n bytes. */
int grammar_advance(grammar *g, int state, const char *bytes, size_t n);
/* Whether a sentence may end in this state. */
bool grammar_accepting(grammar *g, int state);
/* Whether anything may follow (false: the sentence is complete, only the end remains). */
bool grammar_can_continue(grammar *g, int state);

/* ---- the vocabulary */
typedef struct vocab_trie vocab_trie;
/* Builds the trie of n tokens' byte strings (piece(user, id, &len) gives them; NULL or len 0:
 * the token can never be produced under a grammar, e.g. control tokens). */
vocab_trie *vocab_trie_build(int n_vocab, const char *(*piece)(void *user, int32_t id, size_t *len), void *user);
void vocab_trie_free(vocab_trie *t);

/* The tokens allowed in `state`: a bitmask of n_vocab bits (bit i of word i/64) owned by the
 * grammar (valid until the grammar is freed), the tokens whose bytes keep the state alive. The
 * end of generation is not in it: the caller allows its end tokens when grammar_accepting.
 * Valid until the next grammar_mask call on g (the cache of masks is bounded). NULL on a limit.
 * A grammar is used with one trie only. */
const uint64_t *grammar_mask(grammar *g, const vocab_trie *t, int state);

typedef struct grammar_stats {
    int rules, elems;
    int stacks, states, masks;     /* interned so far */
    size_t bytes;                  /* runtime memory */
} grammar_stats;
void grammar_get_stats(const grammar *g, grammar_stats *s);
#endif
