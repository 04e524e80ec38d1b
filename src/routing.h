/* routing: the router's choice of a replica for one request, as a pure function (no I/O, no
 * clock, no locks), so the policy can be read in one place and unit tested.
 *
 * Inputs per replica: whether it is healthy, its load (requests it is running or queueing, as
 * its /health last said plus what this router sent since), and how many leading blocks of the
 * request's prompt it holds (kvindex.h), plus a stable id for hashing. The cache policy (the
 * default; SGLang's cache-aware router is the model, with its load guard and its cache
 * threshold):
 *   1. prefer the replica holding the longest prefix of the prompt; among equal holders the
 *      least loaded; among equally loaded ones the affinity order (below). A prefix counts only
 *      from min_match blocks on (the router asks for half the prompt): otherwise the chat
 *      template's preamble, which every chat prompt starts with, would pull every new
 *      conversation to the first replica that served one;
 *   2. when no replica holds such a prefix, prefer the affinity replica: rendezvous hashing
 *      of the request's affinity key (prompt_cache_key, else the API key, else the prompt
 *      itself) over the healthy replicas, so the same key lands on the same replica while it
 *      is up, and losing a replica moves only the keys that were on it;
 *   3. unless the preferred replica's load exceeds the least loaded one's by more than the
 *      threshold: then the least loaded (ties: the longer prefix, then affinity order).
 * round-robin and least-loaded are the baselines the benchmark compares against (and the
 * fallbacks a deployment without events may want). */
#ifndef PCACHE_ROUTING_H
#define PCACHE_ROUTING_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum { ROUTE_CACHE = 0, ROUTE_ROUND_ROBIN, ROUTE_LEAST_LOADED } route_policy;

/* Why a replica was chosen (a /metrics label each). */
typedef enum {
    RR_PREFIX = 0,    /* it holds the longest prefix */
    RR_AFFINITY,      /* no prefix anywhere: the affinity key's replica */
    RR_LOAD,          /* the preferred one was overloaded: the least loaded */
    RR_ROUND_ROBIN,   /* --policy round-robin */
    RR_LEAST_LOADED,  /* --policy least-loaded */
    RR_RESPONSE,      /* Responses previous_response_id: the replica that stored it */
    RR_OTHER,         /* not a generation (models, count_tokens ...): the least loaded */
    RR_N
} route_reason;

const char *route_reason_name(route_reason r);
/* "cache", "round-robin", "least-loaded" -> policy; -1 for another name. */
int route_policy_parse(const char *s);
const char *route_policy_name(route_policy p);

typedef struct route_cand {
    bool healthy;
    int load;
    int match;        /* leading prompt blocks held */
    uint64_t id;      /* a stable hash of the replica (its URL) */
} route_cand;

typedef struct route_params {
    route_policy policy;
    int threshold;    /* cache: the load difference tolerated for a prefix or the affinity */
    int min_match;    /* cache: the fewest leading blocks that count as a prefix (>= 1) */
    uint64_t affinity;/* route_affinity */
    uint64_t rr;      /* a counter the caller increments per request (round-robin, ties) */
} route_params;

/* The replica to send a request to: an index into c[0..n), or -1 when none is healthy. *why
 * gets the reason. */
int route_choose(const route_params *p, const route_cand *c, int n, route_reason *why);

/* The affinity key of a request: FNV-1a-64 over its cache namespace (prompt.h) and, in order of
 * preference, prompt_cache_key (non-NULL and non-empty), else nothing more when the namespace
 * is a credential's or a cache_salt's (the tenant is the hint), else the prompt's token ids. */
uint64_t route_affinity(const char *ns, const char *cache_key, const int32_t *tokens, int n);
/* A stable 64-bit id of a string (a replica's URL). */
uint64_t route_hash(const char *s);

/* A --replica URL, checked: http://host[:port][/path], host a name (letters, digits, '-', '.',
 * '_'), an IPv4 address or a bracketed IPv6 address, port 1-65535; no user info, query,
 * fragment, space, control character, quote or backslash (the URL is a /metrics label and the
 * prefix of every forwarded request's URL). out (cap bytes) gets it without trailing slashes,
 * the base the request paths are appended to. Returns 0, or -1 with the reason in err. */
int route_replica_url(const char *s, char *out, size_t cap, char *err, size_t errlen);
#endif
