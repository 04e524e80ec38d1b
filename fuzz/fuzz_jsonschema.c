/* fuzz_jsonschema: libFuzzer harness for structured outputs (src/jsonschema.c, src/grammar.c).
 * The input is a schema and a text separated by a NUL byte. The schema is compiled (any input
 * must give a grammar or an error, never a crash or a runaway); the text is fed byte by byte,
 * and: a text the grammar calls complete must be a JSON text (cJSON parses it whole); at every
 * prefix, the token mask over a small vocabulary must agree with stepping each token's bytes.
 * Run: scripts/fuzz-jsonschema.sh SECONDS. */
#include "grammar.h"
#include "jsonschema.h"
#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const char *const VOCAB[] = { "{", "}", "[", "]", "\"", ":", ",", " ", "\n", "a", "\"a\"", "1", "-", ".", "e",
                                     "true", "null", "\\", "u", "0", "\xc3\xa9", "\xc3", "{\"", "\":", "\", \"", "12" };
#define NV ((int)(sizeof VOCAB / sizeof VOCAB[0]))
static const char *vpiece(void *user, int32_t id, size_t *len) {
    (void)user;
    *len = strlen(VOCAB[id]);
    return VOCAB[id];
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static vocab_trie *trie;
    if (!trie) trie = vocab_trie_build(NV, vpiece, NULL);
    const uint8_t *sep = memchr(data, 0, size);
    const size_t slen = sep ? (size_t)(sep - data) : size;
    const char *text = sep ? (const char *)sep + 1 : "";
    const size_t tlen = sep ? size - slen - 1 : 0;
    char *stext = malloc(slen + 1);
    if (!stext) return 0;
    memcpy(stext, data, slen);
    stext[slen] = 0;
    cJSON *s = cJSON_Parse(stext);
    free(stext);
    char err[256];
    grammar *g = s ? jsonschema_compile(s, err, sizeof err) : (slen == 0 ? jsonschema_any_object(err, sizeof err) : NULL);
    cJSON_Delete(s);
    if (!g) return 0;
    int st = grammar_start(g);
    for (size_t i = 0; i <= tlen && st > 0; i++) {
        if (i % 7 == 0) {   /* masks against stepping each token, at some prefixes */
            const uint64_t *m = grammar_can_continue(g, st) ? grammar_mask(g, trie, st) : NULL;
            for (int t = 0; m && t < NV; t++) {
                const bool alive = grammar_advance(g, st, VOCAB[t], strlen(VOCAB[t])) > 0;
                if (alive != (bool)(m[t >> 6] >> (t & 63) & 1)) abort();
            }
        }
        if (i < tlen) st = grammar_step(g, st, (uint8_t)text[i]);
    }
    if (st > 0 && grammar_accepting(g, st)) {   /* complete: a whole JSON text */
        const char *end = NULL;
        cJSON *j = cJSON_ParseWithLengthOpts(text, tlen, &end, 0);
        if (!j) abort();
        while (end < text + tlen && (*end == ' ' || *end == '\n')) end++;
        if (end != text + tlen) abort();
        cJSON_Delete(j);
    }
    grammar_unref(g);
    return 0;
}
