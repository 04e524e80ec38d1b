/* grammar: see grammar.h for the design. Data first:
 *
 *   elems[]     the rules flattened: each alternative's elements, then an END element
 *   alt_pos[]   where each alternative starts; rule r's are alt_pos[alt_first[r] .. + alt_n[r]]
 *   sets[]      the distinct byte sets (4 x 64 bits)
 *   nodes       interned stack nodes: (pos, parent) -> id; node 0 is the empty stack
 *   states      interned sorted sets of stack-top nodes; state 0 is the dead state
 *   trans[s]    256 next states of state s, filled as they are asked for (-2: not yet)
 *   masks[s]    the token mask of state s, computed once
 *
 * Limits keep a hostile or huge schema from eating the process: at most GRAMMAR_MAX_NODES
 * stack nodes and GRAMMAR_MAX_STATES states (past them a call returns -1 / NULL and the request
 * fails with an error), and GRAMMAR_MAX_MASKS cached masks (past them the cache starts over). */
#include "grammar.h"
#include <stdlib.h>
#include <string.h>
#include <stdio.h>

#define GRAMMAR_MAX_NODES (1 << 18)
#define GRAMMAR_MAX_STATES (1 << 14)      /* with their transitions: at most 16 MB */
#define GRAMMAR_MAX_MASKS 1024            /* cached masks (6 KB each for a 49k vocabulary) */
#define GRAMMAR_MAX_DEPTH 256

enum { E_END = 0, E_SET = 1, E_REF = 2 };
typedef struct { uint8_t t; int32_t a; } gelem;

/* ---------------------------------------------------------------- building */
typedef struct { gelem *e; int n, cap; } evec;
typedef struct { evec *alts; int n, cap; } brule;
struct gbuild {
    brule *rules;
    int n_rules, cap_rules;
    uint64_t (*sets)[4];
    int n_sets, cap_sets;
    int cur_rule;            /* the alternative being built: rules[cur_rule].alts[last] */
    bool oom;
};

static bool grow(void **p, int *cap, int need, size_t elem) {
    if (need <= *cap) return true;
    int nc = *cap ? *cap : 8;
    while (nc < need) nc *= 2;
    void *q = realloc(*p, (size_t)nc * elem);
    if (!q) return false;
    *p = q;
    *cap = nc;
    return true;
}

gbuild *gb_new(void) {
    gbuild *b = calloc(1, sizeof *b);
    if (b) b->cur_rule = -1;
    return b;
}

void gb_free(gbuild *b) {
    if (!b) return;
    for (int r = 0; r < b->n_rules; r++) {
        for (int a = 0; a < b->rules[r].n; a++) free(b->rules[r].alts[a].e);
        free(b->rules[r].alts);
    }
    free(b->rules);
    free(b->sets);
    free(b);
}

int gb_rule(gbuild *b) {
    if (!grow((void **)&b->rules, &b->cap_rules, b->n_rules + 1, sizeof *b->rules)) { b->oom = true; return 0; }
    memset(&b->rules[b->n_rules], 0, sizeof *b->rules);
    return b->n_rules++;
}

void gb_alt(gbuild *b, int r) {
    if (r < 0 || r >= b->n_rules) { b->oom = true; return; }
    brule *ru = &b->rules[r];
    if (!grow((void **)&ru->alts, &ru->cap, ru->n + 1, sizeof *ru->alts)) { b->oom = true; return; }
    memset(&ru->alts[ru->n++], 0, sizeof(evec));
    b->cur_rule = r;
}

static void push_elem(gbuild *b, gelem e) {
    if (b->cur_rule < 0) { b->oom = true; return; }
    brule *ru = &b->rules[b->cur_rule];
    evec *v = &ru->alts[ru->n - 1];
    if (!grow((void **)&v->e, &v->cap, v->n + 1, sizeof *v->e)) { b->oom = true; return; }
    v->e[v->n++] = e;
}

void gb_set(gbuild *b, const uint64_t set[4]) {
    int i;
    for (i = 0; i < b->n_sets; i++)
        if (!memcmp(b->sets[i], set, 32)) break;
    if (i == b->n_sets) {
        if (!grow((void **)&b->sets, &b->cap_sets, b->n_sets + 1, sizeof *b->sets)) { b->oom = true; return; }
        memcpy(b->sets[b->n_sets++], set, 32);
    }
    push_elem(b, (gelem){ E_SET, i });
}

void gb_byte_range(gbuild *b, uint8_t lo, uint8_t hi) {
    uint64_t s[4] = { 0 };
    for (int c = lo; c <= hi; c++) s[c >> 6] |= 1ull << (c & 63);
    gb_set(b, s);
}

void gb_lit(gbuild *b, const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) gb_byte_range(b, (uint8_t)s[i], (uint8_t)s[i]);
}

void gb_ref(gbuild *b, int r) { push_elem(b, (gelem){ E_REF, r }); }

int gb_repeat(gbuild *b, int x, int min, int max) {
    /* x{min,max}: min copies, then (max - min) nested optionals, or a tail-recursive star */
    const int saved = b->cur_rule;
    int tail;
    if (max < 0) {                       /* star ::= "" | x star */
        tail = gb_rule(b);
        gb_alt(b, tail);
        gb_alt(b, tail);
        gb_ref(b, x);
        gb_ref(b, tail);
    } else {                             /* opt_k ::= "" | x opt_{k-1}, opt_0 ::= "" */
        tail = gb_rule(b);
        gb_alt(b, tail);
        for (int k = 0; k < max - min; k++) {
            const int o = gb_rule(b);
            gb_alt(b, o);
            gb_alt(b, o);
            gb_ref(b, x);
            gb_ref(b, tail);
            tail = o;
        }
    }
    const int r = gb_rule(b);
    gb_alt(b, r);
    for (int k = 0; k < min; k++) gb_ref(b, x);
    gb_ref(b, tail);
    b->cur_rule = saved;
    return r;
}

/* ---------------------------------------------------------------- the grammar */
typedef struct { uint64_t key; int32_t id; } hslot;   /* open addressing; id < 0: empty */
typedef struct { hslot *s; size_t cap, n; } htab;

struct grammar {
    int refs;
    gelem *elems;
    int n_elems;
    int32_t *alt_pos, *alt_first, *alt_n;
    int n_rules, root;
    uint64_t (*sets)[4];
    /* runtime */
    int32_t *npos, *nparent;
    int n_nodes, cap_nodes;
    htab nodes_h;
    int32_t *st_off, *st_len;     /* state s: members st_pool[st_off[s] .. + st_len[s]] */
    int32_t *st_pool;
    size_t pool_n, pool_cap;
    int n_states, cap_states;
    htab states_h;
    int32_t **trans;
    uint64_t **masks;
    int n_masks, n_vocab;
    int start;                    /* 0 until computed */
    int32_t *tmp;                 /* expansion buffer */
    int tmp_n, tmp_cap;
    bool bad;                     /* a limit or allocation failed */
};

static uint64_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

static bool ht_init(htab *h, size_t cap) {
    h->s = malloc(cap * sizeof *h->s);
    if (!h->s) return false;
    for (size_t i = 0; i < cap; i++) h->s[i].id = -1;
    h->cap = cap;
    h->n = 0;
    return true;
}

static bool ht_grow(htab *h) {
    htab n;
    if (!ht_init(&n, h->cap * 2)) return false;
    for (size_t i = 0; i < h->cap; i++) {
        if (h->s[i].id < 0) continue;
        size_t j = mix64(h->s[i].key) & (n.cap - 1);
        while (n.s[j].id >= 0) j = (j + 1) & (n.cap - 1);
        n.s[j] = h->s[i];
    }
    n.n = h->n;
    free(h->s);
    *h = n;
    return true;
}

/* ---- stack nodes */
static int node_intern(grammar *g, int32_t pos, int32_t parent) {
    const uint64_t key = ((uint64_t)(uint32_t)pos << 32) | (uint32_t)parent;
    htab *h = &g->nodes_h;
    size_t j = mix64(key) & (h->cap - 1);
    for (; h->s[j].id >= 0; j = (j + 1) & (h->cap - 1))
        if (h->s[j].key == key) return h->s[j].id;
    if (g->n_nodes >= GRAMMAR_MAX_NODES) { g->bad = true; return -1; }
    if (g->n_nodes + 1 > g->cap_nodes) {
        const int nc = g->cap_nodes * 2;
        int32_t *a = realloc(g->npos, (size_t)nc * sizeof *a);
        if (a) g->npos = a;
        int32_t *b = realloc(g->nparent, (size_t)nc * sizeof *b);
        if (b) g->nparent = b;
        if (!a || !b) { g->bad = true; return -1; }
        g->cap_nodes = nc;
    }
    const int id = g->n_nodes++;
    g->npos[id] = pos;
    g->nparent[id] = parent;
    h->s[j].key = key;
    h->s[j].id = id;
    if (++h->n * 2 > h->cap && !ht_grow(h)) { g->bad = true; return -1; }
    return id;
}

static bool tmp_push(grammar *g, int32_t v) {
    if (!grow((void **)&g->tmp, &g->tmp_cap, g->tmp_n + 1, sizeof *g->tmp)) { g->bad = true; return false; }
    g->tmp[g->tmp_n++] = v;
    return true;
}

/* Adds to tmp the stack tops reached from "next element at pos, return frame parent": END pops
 * (continues at the parent's position), a byte set is a top, a reference expands into its rule's
 * alternatives with a return frame at pos + 1 (none when pos + 1 ends the alternative: a tail
 * call, so right recursion does not grow the stack). */
static bool expand(grammar *g, int32_t pos, int32_t parent, int depth) {
    if (depth > GRAMMAR_MAX_DEPTH) { g->bad = true; return false; }
    const gelem e = g->elems[pos];
    if (e.t == E_END) {
        if (parent == 0) return tmp_push(g, 0);
        return expand(g, g->npos[parent], g->nparent[parent], depth + 1);
    }
    if (e.t == E_SET) {
        const int id = node_intern(g, pos, parent);
        return id >= 0 && tmp_push(g, id);
    }
    int32_t ret = parent;
    if (g->elems[pos + 1].t != E_END && (ret = node_intern(g, pos + 1, parent)) < 0) return false;
    for (int a = 0; a < g->alt_n[e.a]; a++)
        if (!expand(g, g->alt_pos[g->alt_first[e.a] + a], ret, depth + 1)) return false;
    return true;
}

static int cmp_i32(const void *a, const void *b) {
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* Interns the set in tmp (sorted and deduplicated here) as a state. */
static int state_intern(grammar *g) {
    if (g->bad) return -1;
    qsort(g->tmp, (size_t)g->tmp_n, sizeof *g->tmp, cmp_i32);
    int n = 0;
    for (int i = 0; i < g->tmp_n; i++)
        if (!n || g->tmp[i] != g->tmp[n - 1]) g->tmp[n++] = g->tmp[i];
    g->tmp_n = n;
    if (n == 0) return GRAMMAR_DEAD;
    uint64_t key = 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < n; i++) key = mix64(key ^ (uint64_t)(uint32_t)g->tmp[i]);
    htab *h = &g->states_h;
    size_t j = key & (h->cap - 1);
    for (; h->s[j].id >= 0; j = (j + 1) & (h->cap - 1)) {
        const int s = h->s[j].id;
        if (h->s[j].key == key && g->st_len[s] == n && !memcmp(g->st_pool + g->st_off[s], g->tmp, (size_t)n * sizeof *g->tmp))
            return s;
    }
    if (g->n_states >= GRAMMAR_MAX_STATES) { g->bad = true; return -1; }
    if (g->n_states + 1 > g->cap_states) {
        const int nc = g->cap_states ? g->cap_states * 2 : 64;
        int32_t *a = realloc(g->st_off, (size_t)nc * sizeof *a);
        if (a) g->st_off = a;
        int32_t *b2 = realloc(g->st_len, (size_t)nc * sizeof *b2);
        if (b2) g->st_len = b2;
        int32_t **t = realloc(g->trans, (size_t)nc * sizeof *t);
        if (t) g->trans = t;
        uint64_t **m = realloc(g->masks, (size_t)nc * sizeof *m);
        if (m) g->masks = m;
        if (!a || !b2 || !t || !m) { g->bad = true; return -1; }
        for (int i = g->cap_states; i < nc; i++) g->trans[i] = NULL, g->masks[i] = NULL;
        g->cap_states = nc;
    }
    if (g->pool_n + (size_t)n > g->pool_cap) {
        size_t nc = g->pool_cap ? g->pool_cap * 2 : 1024;
        while (nc < g->pool_n + (size_t)n) nc *= 2;
        int32_t *p = realloc(g->st_pool, nc * sizeof *p);
        if (!p) { g->bad = true; return -1; }
        g->st_pool = p;
        g->pool_cap = nc;
    }
    const int s = g->n_states++;
    g->st_off[s] = (int32_t)g->pool_n;
    g->st_len[s] = n;
    memcpy(g->st_pool + g->pool_n, g->tmp, (size_t)n * sizeof *g->tmp);
    g->pool_n += (size_t)n;
    h->s[j].key = key;
    h->s[j].id = s;
    if (++h->n * 2 > h->cap && !ht_grow(h)) { g->bad = true; return -1; }
    return s;
}

grammar *gb_finish(gbuild *b, int root, char *err, size_t errlen) {
    grammar *g = NULL;
    if (!b) { snprintf(err, errlen, "grammar: out of memory"); return NULL; }
    if (b->oom) { snprintf(err, errlen, "grammar: out of memory"); goto fail; }
    if (root < 0 || root >= b->n_rules || b->rules[root].n == 0) { snprintf(err, errlen, "grammar: the root rule is empty"); goto fail; }
    g = calloc(1, sizeof *g);
    if (!g) { snprintf(err, errlen, "grammar: out of memory"); goto fail; }
    g->refs = 1;
    int n_alts = 0, n_elems = 0;
    for (int r = 0; r < b->n_rules; r++) {
        if (b->rules[r].n == 0) { snprintf(err, errlen, "grammar: rule %d has no alternative", r); goto fail; }
        n_alts += b->rules[r].n;
        for (int a = 0; a < b->rules[r].n; a++) {
            n_elems += b->rules[r].alts[a].n + 1;
            for (int i = 0; i < b->rules[r].alts[a].n; i++) {
                const gelem e = b->rules[r].alts[a].e[i];
                if (e.t == E_REF && (e.a < 0 || e.a >= b->n_rules)) { snprintf(err, errlen, "grammar: bad rule reference"); goto fail; }
            }
        }
    }
    g->elems = malloc((size_t)(n_elems + 1) * sizeof *g->elems);
    g->alt_pos = malloc((size_t)n_alts * sizeof *g->alt_pos);
    g->alt_first = malloc((size_t)b->n_rules * sizeof *g->alt_first);
    g->alt_n = malloc((size_t)b->n_rules * sizeof *g->alt_n);
    g->sets = malloc((size_t)(b->n_sets ? b->n_sets : 1) * sizeof *g->sets);
    if (!g->elems || !g->alt_pos || !g->alt_first || !g->alt_n || !g->sets) { snprintf(err, errlen, "grammar: out of memory"); goto fail; }
    if (b->n_sets) memcpy(g->sets, b->sets, (size_t)b->n_sets * sizeof *g->sets);
    int ne = 0, na = 0;
    for (int r = 0; r < b->n_rules; r++) {
        g->alt_first[r] = na;
        g->alt_n[r] = b->rules[r].n;
        for (int a = 0; a < b->rules[r].n; a++) {
            g->alt_pos[na++] = ne;
            for (int i = 0; i < b->rules[r].alts[a].n; i++) g->elems[ne++] = b->rules[r].alts[a].e[i];
            g->elems[ne++] = (gelem){ E_END, 0 };
        }
    }
    g->elems[ne] = (gelem){ E_END, 0 };
    g->n_elems = ne;
    g->n_rules = b->n_rules;
    g->root = root;
    if (!ht_init(&g->nodes_h, 1024) || !ht_init(&g->states_h, 256)) { snprintf(err, errlen, "grammar: out of memory"); goto fail; }
    /* node 0: the empty stack; state 0: dead (no members, not in the hash table: state_intern
     * returns it for an empty set) */
    g->cap_nodes = 1024;
    g->npos = malloc((size_t)g->cap_nodes * sizeof *g->npos);
    g->nparent = malloc((size_t)g->cap_nodes * sizeof *g->nparent);
    g->cap_states = 64;
    g->st_off = calloc(64, sizeof *g->st_off);
    g->st_len = calloc(64, sizeof *g->st_len);
    g->trans = calloc(64, sizeof *g->trans);
    g->masks = calloc(64, sizeof *g->masks);
    if (!g->npos || !g->nparent || !g->st_off || !g->st_len || !g->trans || !g->masks) { snprintf(err, errlen, "grammar: out of memory"); goto fail; }
    g->npos[0] = -1;
    g->nparent[0] = 0;
    g->n_nodes = 1;
    g->n_states = 1;
    if (grammar_start(g) < 0) { snprintf(err, errlen, "grammar: too deep or left-recursive at its start"); goto fail; }
    gb_free(b);
    return g;
fail:
    gb_free(b);
    if (g) { g->refs = 1; grammar_unref(g); }
    return NULL;
}

grammar *grammar_ref(grammar *g) {
    if (g) __atomic_add_fetch(&g->refs, 1, __ATOMIC_RELAXED);
    return g;
}

void grammar_unref(grammar *g) {
    if (!g || __atomic_sub_fetch(&g->refs, 1, __ATOMIC_ACQ_REL) > 0) return;
    for (int s = 0; s < g->n_states && g->trans; s++) free(g->trans[s]);
    for (int s = 0; s < g->n_states && g->masks; s++) free(g->masks[s]);
    free(g->trans);
    free(g->masks);
    free(g->st_off);
    free(g->st_len);
    free(g->st_pool);
    free(g->states_h.s);
    free(g->nodes_h.s);
    free(g->npos);
    free(g->nparent);
    free(g->tmp);
    free(g->elems);
    free(g->alt_pos);
    free(g->alt_first);
    free(g->alt_n);
    free(g->sets);
    free(g);
}

/* ---------------------------------------------------------------- matching */
int grammar_start(grammar *g) {
    if (g->start) return g->start;
    if (g->bad) return -1;
    g->tmp_n = 0;
    for (int a = 0; a < g->alt_n[g->root]; a++)
        if (!expand(g, g->alt_pos[g->alt_first[g->root] + a], 0, 0)) return -1;
    const int s = state_intern(g);
    if (s < 0) return -1;
    return g->start = s;
}

int grammar_step(grammar *g, int state, uint8_t c) {
    if (state <= 0 || state >= g->n_states) return state == GRAMMAR_DEAD ? GRAMMAR_DEAD : -1;
    int32_t *t = g->trans[state];
    if (!t) {
        if (!(t = malloc(256 * sizeof *t))) { g->bad = true; return -1; }
        for (int i = 0; i < 256; i++) t[i] = -2;
        g->trans[state] = t;
    }
    if (t[c] != -2) return t[c];
    if (g->bad) return -1;
    g->tmp_n = 0;
    /* st_pool may move while expanding (it does not: only state_intern appends, after), but
     * copy the members' count and offset first */
    const int32_t off = g->st_off[state], len = g->st_len[state];
    for (int i = 0; i < len; i++) {
        const int32_t nd = g->st_pool[off + i];
        if (nd == 0) continue;
        const int32_t pos = g->npos[nd];
        const uint64_t *set = g->sets[g->elems[pos].a];
        if (!(set[c >> 6] >> (c & 63) & 1)) continue;
        if (!expand(g, pos + 1, g->nparent[nd], 0)) return -1;
    }
    const int s = state_intern(g);
    if (s < 0) return -1;
    g->trans[state][c] = s;   /* trans may have been reallocated by state_intern */
    return s;
}

int grammar_advance(grammar *g, int state, const char *bytes, size_t n) {
    for (size_t i = 0; i < n && state > 0; i++) state = grammar_step(g, state, (uint8_t)bytes[i]);
    return state;
}

bool grammar_accepting(grammar *g, int state) {
    return state > 0 && state < g->n_states && g->st_pool[g->st_off[state]] == 0;   /* sorted: node 0 first */
}

bool grammar_can_continue(grammar *g, int state) {
    if (state <= 0 || state >= g->n_states) return false;
    return g->st_len[state] > 1 || g->st_pool[g->st_off[state]] != 0;
}

/* ---------------------------------------------------------------- the vocabulary trie */
struct vocab_trie {
    int n_vocab, n_nodes;
    int32_t *child_first, *child_n;   /* node -> its children's edges */
    uint8_t *edge_byte;               /* edge e: byte, target node */
    int32_t *edge_node;
    int32_t *tok_first, *tok_n;       /* node -> tokens whose bytes end here */
    int32_t *toks;
};

typedef struct { int32_t id; const char *p; size_t len; } tpiece;
static int cmp_piece(const void *a, const void *b) {
    const tpiece *x = a, *y = b;
    const size_t n = x->len < y->len ? x->len : y->len;
    const int c = memcmp(x->p, y->p, n);
    if (c) return c;
    if (x->len != y->len) return x->len < y->len ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* Built from the pieces sorted by bytes: a node is a distinct prefix; children of a node are
 * contiguous in sorted order, so one pass with a stack of open prefixes builds the trie in
 * pre-order with edges grouped per node. */
vocab_trie *vocab_trie_build(int n_vocab, const char *(*piece)(void *user, int32_t id, size_t *len), void *user) {
    vocab_trie *t = calloc(1, sizeof *t);
    tpiece *ps = malloc((size_t)(n_vocab > 0 ? n_vocab : 1) * sizeof *ps);
    if (!t || !ps) goto fail;
    t->n_vocab = n_vocab;
    int n = 0;
    size_t total = 0;
    for (int32_t i = 0; i < n_vocab; i++) {
        size_t len = 0;
        const char *p = piece(user, i, &len);
        if (!p || !len) continue;
        ps[n++] = (tpiece){ i, p, len };
        total += len;
    }
    qsort(ps, (size_t)n, sizeof *ps, cmp_piece);
    /* nodes: at most total + 1 */
    const size_t cap = total + 1;
    int32_t *parent = malloc(cap * sizeof *parent);
    uint8_t *byte = malloc(cap);
    t->tok_first = calloc(cap, sizeof *t->tok_first);
    t->tok_n = calloc(cap, sizeof *t->tok_n);
    t->toks = malloc((size_t)(n ? n : 1) * sizeof *t->toks);
    if (!parent || !byte || !t->tok_first || !t->tok_n || !t->toks) { free(parent), free(byte); goto fail; }
    int nn = 1;                      /* node 0: the root */
    parent[0] = -1;
    int32_t path[4096];              /* path[d]: the node of prefix length d of the previous piece */
    path[0] = 0;
    size_t prev_len = 0;
    const char *prev = NULL;
    for (int i = 0; i < n; i++) {
        size_t common = 0;
        if (prev)
            while (common < prev_len && common < ps[i].len && prev[common] == ps[i].p[common]) common++;
        if (ps[i].len >= 4096) continue;   /* no real token is that long */
        for (size_t d = common; d < ps[i].len; d++) {
            parent[nn] = path[d];
            byte[nn] = (uint8_t)ps[i].p[d];
            path[d + 1] = nn++;
        }
        const int32_t end = path[ps[i].len];
        if (!t->tok_n[end]) t->tok_first[end] = i;   /* same-bytes pieces are adjacent */
        t->tok_n[end]++;
        t->toks[i] = ps[i].id;
        prev = ps[i].p;
        prev_len = ps[i].len;
    }
    /* edges grouped by parent: nodes were created in pre-order, so a node's children appear in
     * increasing id order; count then fill */
    t->n_nodes = nn;
    t->child_first = calloc((size_t)nn, sizeof *t->child_first);
    t->child_n = calloc((size_t)nn, sizeof *t->child_n);
    t->edge_byte = malloc((size_t)nn);
    t->edge_node = malloc((size_t)nn * sizeof *t->edge_node);
    if (!t->child_first || !t->child_n || !t->edge_byte || !t->edge_node) { free(parent), free(byte); goto fail; }
    for (int v = 1; v < nn; v++) t->child_n[parent[v]]++;
    int e = 0;
    for (int v = 0; v < nn; v++) { t->child_first[v] = e; e += t->child_n[v]; t->child_n[v] = 0; }
    for (int v = 1; v < nn; v++) {
        const int p = parent[v], k = t->child_first[p] + t->child_n[p]++;
        t->edge_byte[k] = byte[v];
        t->edge_node[k] = v;
    }
    free(parent);
    free(byte);
    free(ps);
    return t;
fail:
    free(ps);
    vocab_trie_free(t);
    return NULL;
}

void vocab_trie_free(vocab_trie *t) {
    if (!t) return;
    free(t->child_first);
    free(t->child_n);
    free(t->edge_byte);
    free(t->edge_node);
    free(t->tok_first);
    free(t->tok_n);
    free(t->toks);
    free(t);
}

const uint64_t *grammar_mask(grammar *g, const vocab_trie *t, int state) {
    if (state <= 0 || state >= g->n_states || !t) return NULL;
    if (g->masks[state]) return g->masks[state];
    if (g->n_vocab && g->n_vocab != t->n_vocab) return NULL;
    if (g->n_masks >= GRAMMAR_MAX_MASKS) {   /* a bound on memory: start the cache over */
        for (int i = 0; i < g->n_states; i++) free(g->masks[i]), g->masks[i] = NULL;
        g->n_masks = 0;
    }
    g->n_vocab = t->n_vocab;
    const size_t words = ((size_t)t->n_vocab + 63) / 64;
    uint64_t *m = calloc(words, sizeof *m);
    /* depth-first over the trie, carrying the grammar state of each prefix */
    typedef struct { int32_t node, st; } item;
    size_t cap = 1024, sp = 0;
    item *stack = malloc(cap * sizeof *stack);
    if (!m || !stack) { free(m), free(stack); g->bad = true; return NULL; }
    stack[sp++] = (item){ 0, state };
    while (sp) {
        const item it = stack[--sp];
        const int32_t f = t->child_first[it.node], cn = t->child_n[it.node];
        for (int32_t k = 0; k < cn; k++) {
            const int s2 = grammar_step(g, it.st, t->edge_byte[f + k]);
            if (s2 < 0) { free(m), free(stack); return NULL; }
            if (s2 == GRAMMAR_DEAD) continue;
            const int32_t c = t->edge_node[f + k];
            for (int32_t j = 0; j < t->tok_n[c]; j++) {
                const int32_t id = t->toks[t->tok_first[c] + j];
                m[id >> 6] |= 1ull << (id & 63);
            }
            if (t->child_n[c]) {
                if (sp == cap) {
                    item *ns = realloc(stack, 2 * cap * sizeof *ns);
                    if (!ns) { free(m), free(stack); g->bad = true; return NULL; }
                    stack = ns;
                    cap *= 2;
                }
                stack[sp++] = (item){ c, s2 };
            }
        }
    }
    free(stack);
    g->masks[state] = m;   /* masks may have been reallocated by new states: index again */
    g->n_masks++;
    return m;
}

void grammar_get_stats(const grammar *g, grammar_stats *s) {
    memset(s, 0, sizeof *s);
    s->rules = g->n_rules;
    s->elems = g->n_elems;
    s->stacks = g->n_nodes;
    s->states = g->n_states;
    s->masks = g->n_masks;
    size_t b = (size_t)g->n_nodes * 8 + g->nodes_h.cap * sizeof(hslot) + g->states_h.cap * sizeof(hslot) + g->pool_cap * 4;
    for (int i = 0; i < g->n_states; i++) b += g->trans[i] ? 1024 : 0;
    b += (size_t)g->n_masks * (((size_t)g->n_vocab + 63) / 64) * 8;
    s->bytes = b;
}
