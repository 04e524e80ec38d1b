/* reasoning: the <think> ... </think> splitter (see reasoning.h).
 *
 * A state machine over the text not yet decided (p->buf): each feed appends to it, then decides
 * as much of it as it can, front to back, and keeps the rest. What is kept is always short: a
 * partial tag plus whitespace, or whitespace at the start of the output.
 */
#include "reasoning.h"
#include <stdlib.h>
#include <string.h>

enum {
    RS_START,        /* at the start: an opening tag (after whitespace) begins the block */
    RS_START_INSIDE, /* at the start, the prompt having opened the block: a tag is skipped */
    RS_LEAD,         /* in the block, skipping its leading whitespace */
    RS_THINK,        /* in the block */
    RS_AFTER,        /* after the block, skipping whitespace */
    RS_CONTENT,      /* the rest is content */
};

static bool grow_add(char **p, size_t *n, size_t *cap, const char *s, size_t len, bool *oom) {
    if (*oom) return false;
    if (*n + len + 1 > *cap) {
        size_t c = *cap ? *cap : 64;
        while (c < *n + len + 1) c *= 2;
        char *q = realloc(*p, c);
        if (!q) { *oom = true; return false; }
        *p = q;
        *cap = c;
    }
    if (len) memcpy(*p + *n, s, len);
    *n += len;
    (*p)[*n] = 0;
    return true;
}

static void add_reasoning(reasoning_parser *p, const char *s, size_t n) {
    grow_add(&p->reasoning, &p->n_reasoning, &p->cap_reasoning, s, n, &p->oom);
}
static void add_content(reasoning_parser *p, const char *s, size_t n) {
    grow_add(&p->content, &p->n_content, &p->cap_content, s, n, &p->oom);
}

static bool is_ws(char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; }

/* The length of the longest proper prefix of tag that s[0..n) ends with. */
static size_t partial_tag(const char *s, size_t n, const char *tag) {
    const size_t tl = strlen(tag);
    for (size_t m = tl - 1 < n ? tl - 1 : n; m > 0; m--)
        if (!memcmp(s + n - m, tag, m)) return m;
    return 0;
}

void reasoning_init(reasoning_parser *p, bool started_inside) {
    memset(p, 0, sizeof *p);
    p->state = started_inside ? RS_START_INSIDE : RS_START;
}

void reasoning_free(reasoning_parser *p) {
    free(p->buf);
    free(p->reasoning);
    free(p->content);
    memset(p, 0, sizeof *p);
}

bool reasoning_feed(reasoning_parser *p, const char *text, size_t len, bool final) {
    if (p->oom) return false;
    if (len && !grow_add(&p->buf, &p->n_buf, &p->cap_buf, text, len, &p->oom)) return false;
    p->fed += len;
    const char *b = p->buf ? p->buf : "";
    const size_t n = p->n_buf, base = p->fed - n;   /* b[0] is byte `base` of the output */
    const size_t ol = strlen(REASONING_OPEN), cl = strlen(REASONING_CLOSE);
    size_t i = 0;   /* b[0..i) is decided */
    for (bool more = true; more && !p->oom;) {
        switch (p->state) {
        case RS_START:
        case RS_START_INSIDE: {
            size_t k = i;
            while (k < n && is_ws(b[k])) k++;
            const size_t rest = n - k;
            if (rest >= ol && !memcmp(b + k, REASONING_OPEN, ol)) {
                i = k + ol;
                p->state = RS_LEAD;
            } else if (rest < ol && !memcmp(b + k, REASONING_OPEN, rest) && !final) {
                more = false;   /* may still become the tag: undecided */
            } else {
                p->state = p->state == RS_START ? RS_CONTENT : RS_LEAD;
            }
            break;
        }
        case RS_LEAD:
            while (i < n && is_ws(b[i])) i++;
            if (i < n) p->state = RS_THINK;
            else more = false;
            break;
        case RS_THINK: {
            const char *c = n > i ? memmem(b + i, n - i, REASONING_CLOSE, cl) : NULL;
            size_t end, next;
            if (c) {
                end = (size_t)(c - b);
                next = end + cl;
                p->reasoning_end = base + next;
                p->state = RS_AFTER;
            } else if (final) {
                end = next = n;
            } else {   /* hold a partial tag and the whitespace before it */
                end = next = n - partial_tag(b + i, n - i, REASONING_CLOSE);
                more = false;
            }
            size_t t = end;
            while (t > i && is_ws(b[t - 1])) t--;
            add_reasoning(p, b + i, t - i);
            i = c || final ? next : t;
            if (!c && final) more = false;
            break;
        }
        case RS_AFTER:
            while (i < n && is_ws(b[i])) i++;
            if (i < n) p->state = RS_CONTENT;
            else more = false;
            break;
        default:   /* RS_CONTENT */
            add_content(p, b + i, n - i);
            i = n;
            more = false;
            break;
        }
    }
    if (p->state == RS_START_INSIDE || p->state == RS_LEAD || p->state == RS_THINK) p->reasoning_end = p->fed;
    if (p->oom) return false;
    if (i > 0) {
        memmove(p->buf, p->buf + i, n - i);
        p->n_buf = n - i;
    }
    return true;
}
