/* sample: turning logits into the next token.
 * Order (as llama.cpp's default chain): penalties -> top-k -> temperature -> softmax ->
 * top-p -> min-p -> draw. temperature <= 0 is greedy (argmax, lowest id wins ties).
 * The RNG is a per-sequence xoshiro256** seeded from `seed`: same seed, same text.
 */
#ifndef PCACHE_SAMPLE_H
#define PCACHE_SAMPLE_H
#include <stdint.h>
#include <stdbool.h>

typedef struct sample_params {
    float temperature;       /* <= 0: greedy */
    int top_k;               /* <= 0: off */
    float top_p;             /* >= 1: off */
    float min_p;             /* <= 0: off */
    float repeat_penalty;    /* 1: off (llama.cpp style, over the last repeat_last_n tokens) */
    int repeat_last_n;
    float presence_penalty;  /* OpenAI style, 0: off */
    float frequency_penalty; /* OpenAI style, 0: off */
    uint64_t seed;
} sample_params;

void sample_params_default(sample_params *sp);  /* temp 0.8, top_k 40, top_p 0.95, min_p 0.05, seed 0 */

typedef struct { uint64_t s[4]; } sample_rng;
void sample_rng_seed(sample_rng *r, uint64_t seed);
double sample_rng_uniform(sample_rng *r);  /* [0,1) */

/* Picks a token from logits[n_vocab] (modified in place). history: previous tokens
 * (prompt + generated) for penalties. scratch: at least n_vocab entries of workspace. */
typedef struct { float logit; int32_t id; } sample_cand;
int32_t sample_token(float *logits, int n_vocab, const sample_params *sp, sample_rng *rng,
                     const int32_t *history, int n_history, sample_cand *scratch);
/* sample_token in two halves, for callers that look at the logits in between (logprobs):
 * sample_penalize applies the repetition / presence / frequency penalties in place;
 * sample_pick does the rest of the chain (top-k, temperature, top-p, min-p, draw). */
void sample_penalize(float *logits, int n_vocab, const sample_params *sp, const int32_t *history,
                     int n_history);
/* The first index of the largest logit (NaNs never win; all NaN: 0): what sample_pick draws
 * when sample_is_greedy (temperature <= 0 or top_k 1), whatever the rng. */
int32_t sample_argmax(const float *logits, int n_vocab);
bool sample_is_greedy(const sample_params *sp);
/* Whether sample_penalize changes any logit (a repeat, presence or frequency penalty is set). */
bool sample_penalizes(const sample_params *sp);
int32_t sample_pick(const float *logits, int n_vocab, const sample_params *sp, sample_rng *rng,
                    sample_cand *scratch);

/* Log-softmax of logits at `chosen` (returned), and the n_top (<= n_vocab) most likely tokens
 * with their log-probabilities, best first, ties by lower id, into top_id/top_lp. The sum runs
 * in double over the whole vocabulary. scratch: n_vocab entries. */
float sample_logprobs(const float *logits, int n_vocab, int32_t chosen, int n_top, int32_t *top_id,
                      float *top_lp, sample_cand *scratch);
#endif
