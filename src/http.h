/* http: the HTTP plumbing `pcache serve` (server.c) and `pcache route` (router.c) share, on
 * libmicrohttpd: a growing text buffer for /metrics-style bodies, the peer-hung-up check,
 * queuing a response with its status's headers, the Content-Length precheck, the signal set-up
 * and starting the daemon on --host/--port. */
#ifndef PCACHE_HTTP_H
#define PCACHE_HTTP_H
#include <microhttpd.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>

/* A growing NUL-terminated text (p NULL until the first write; the caller frees p). Out of
 * memory: the text stops growing (it stays valid). */
typedef struct { char *p; size_t n, cap; } obuf;
void ob_printf(obuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* True when the peer of socket fd has hung up (poll, no wait; false for fd < 0). */
bool http_peer_gone(int fd);

/* Queues r with status, adding WWW-Authenticate to a 401 and Retry-After when retry_s > 0, and
 * releases r. */
enum MHD_Result http_queue(struct MHD_Connection *c, int status, struct MHD_Response *r, int retry_s);

/* The request announces a body larger than max (or a Content-Length that is not a number). */
bool http_body_too_large(struct MHD_Connection *c, unsigned long long max);

/* Blocks SIGINT and SIGTERM in the calling thread and the threads it starts after (the caller
 * sigwaits on *sigs), and ignores SIGPIPE (a client gone mid-write). */
void http_block_signals(sigset_t *sigs);

/* Resolves host and starts a thread-per-connection daemon on host:port (0: a free port) with
 * handler h and completion callback done (both given cls). NULL after printing why to stderr,
 * after `who` ("pcache serve"). *bound gets the port it listens on. */
struct MHD_Daemon *http_start(const char *who, const char *host, long port, unsigned timeout_s, unsigned max_conns,
                              MHD_AccessHandlerCallback h, MHD_RequestCompletedCallback done, void *cls, unsigned *bound);
#endif
