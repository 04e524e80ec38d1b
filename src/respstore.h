/* respstore: the Responses API's stored responses (store: true), for GET /v1/responses/{id} and
 * for previous_response_id. A response is kept with its namespace (only the tenant that made it
 * can read or continue it), its conversation (every input and output item so far, JSON), the
 * exact tokens of its prompt and output with the text they render (so a follow-up turn extends
 * exactly those tokens and the prompt cache serves all of them), the response body, and an
 * expiry: as long as its prompt cache entry lives (the cache TTL, refreshed on each use).
 * Bounded by entries and bytes, least recently used first out. Thread-safe. */
#ifndef PCACHE_RESPSTORE_H
#define PCACHE_RESPSTORE_H
#include <stddef.h>
#include <stdint.h>

typedef struct respstore respstore;

typedef struct resp_entry {
    char *items;        /* the conversation's items (JSON array), this response's outputs last */
    char *prefix;       /* the text tokens render (prompt + output), or NULL */
    int32_t *tokens;    /* prompt + output tokens (n_tokens), or NULL */
    int n_tokens;
    char *body;         /* the response object (JSON) */
} resp_entry;

respstore *respstore_new(int max_entries, size_t max_bytes);
void respstore_free(respstore *s);
/* Stores (copies) an entry under id and namespace ns until expiry (seconds, the caller's
 * clock). Returns 0, or -1 when out of memory or larger than the whole bound (not stored). */
int respstore_put(respstore *s, const char *id, const char *ns, double expiry, const resp_entry *e);
/* A copy of the entry of id in namespace ns, if it is there and unexpired (its expiry is then
 * moved to new_expiry when that is later). 1 found, 0 not. resp_entry_free the copy. */
int respstore_get(respstore *s, const char *id, const char *ns, double now, double new_expiry, resp_entry *out);
/* Removes it (1) or says it was not there (0). */
int respstore_delete(respstore *s, const char *id, const char *ns, double now);
void resp_entry_free(resp_entry *e);
#endif
