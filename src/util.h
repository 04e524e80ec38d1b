/* util: small shared helpers for the command line and the server. */
#ifndef PCACHE_UTIL_H
#define PCACHE_UTIL_H
#include <stddef.h>
#include <stdbool.h>
#include <time.h>

/* "512M", "1G", "64k", "1048576" -> bytes. Returns 0 on success, -1 on a bad value. */
int parse_size(const char *s, size_t *out);
/* "5m", "1h", "30s", "300" (seconds), "1.5h" -> seconds. Returns 0 or -1. */
int parse_duration(const char *s, double *out);
/* Reads a whole stream / file into a malloc'ed NUL-terminated buffer (NULL on failure). */
char *read_stream(void *file, size_t *len);
char *read_file(const char *path, size_t *len);
/* Writes a printf-style message into err (when err and errlen are set) and returns -1: the
 * error convention of functions that take (char *err, size_t errlen). */
int errf(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* A request body arriving in pieces (a server's upload callback), bounded: the pieces are kept
 * (NUL-terminated) while the total stays within max; past it the body is dropped, too_large set
 * and further pieces only counted. */
typedef struct body_buf {
    char *body;
    size_t len, cap, discarded;
    bool too_large;
} body_buf;
/* Takes one piece. Returns false when the connection should be closed: out of memory, or more
 * than twice max discarded. */
bool body_append(body_buf *b, const char *piece, size_t n, size_t max);

/* The CLOCK_REALTIME instant `seconds` from now (negative: now): pthread_cond_timedwait's
 * deadline. */
struct timespec deadline_after(double seconds);

/* The default model path: $PCACHE_MODEL, else models/SmolLM2-135M-Instruct.Q4_1.gguf. */
const char *default_model_path(void);
#endif
