/* http: see http.h. */
#include "http.h"

#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void ob_printf(obuf *b, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        size_t room = b->cap - b->n;
        int k = vsnprintf(b->p ? b->p + b->n : NULL, b->p ? room : 0, fmt, ap);
        va_end(ap);
        if (k < 0) return;
        if (b->p && (size_t)k < room) { b->n += (size_t)k; return; }
        size_t c = b->cap ? b->cap * 2 : 4096;
        while (c < b->n + (size_t)k + 1) c *= 2;
        char *q = realloc(b->p, c);
        if (!q) return;
        b->p = q;
        b->cap = c;
    }
}

bool http_peer_gone(int fd) {
    if (fd < 0) return false;
    struct pollfd p = { .fd = fd, .events = POLLRDHUP };
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL));
}

enum MHD_Result http_queue(struct MHD_Connection *c, int status, struct MHD_Response *r, int retry_s) {
    if (status == 401) MHD_add_response_header(r, "WWW-Authenticate", "Bearer");
    if (retry_s > 0) {
        char ra[16];
        snprintf(ra, sizeof ra, "%d", retry_s);
        MHD_add_response_header(r, "Retry-After", ra);
    }
    enum MHD_Result ret = MHD_queue_response(c, (unsigned)status, r);
    MHD_destroy_response(r);
    return ret;
}

bool http_body_too_large(struct MHD_Connection *c, unsigned long long max) {
    const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
    if (!cl) return false;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(cl, &end, 10);
    return errno || end == cl || v > max;
}

void http_block_signals(sigset_t *sigs) {
    sigemptyset(sigs);
    sigaddset(sigs, SIGINT);
    sigaddset(sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
}

struct MHD_Daemon *http_start(const char *who, const char *host, long port, unsigned timeout_s, unsigned max_conns,
                              MHD_AccessHandlerCallback h, MHD_RequestCompletedCallback done, void *cls, unsigned *bound) {
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE }, *ai = NULL;
    char ports[16];
    snprintf(ports, sizeof ports, "%ld", port);
    int gai = getaddrinfo(host, ports, &hints, &ai);
    if (gai || !ai) {
        fprintf(stderr, "%s: cannot resolve --host %s: %s\n", who, host, gai_strerror(gai));
        if (ai) freeaddrinfo(ai);
        return NULL;
    }
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL;
    if (ai->ai_family == AF_INET6) flags |= MHD_USE_IPv6;
    struct MHD_Daemon *d = MHD_start_daemon(flags, (uint16_t)port, NULL, NULL, h, cls,
                                            MHD_OPTION_SOCK_ADDR, ai->ai_addr,
                                            MHD_OPTION_CONNECTION_TIMEOUT, timeout_s,
                                            MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(64 * 1024),
                                            MHD_OPTION_CONNECTION_LIMIT, max_conns,
                                            MHD_OPTION_LISTENING_ADDRESS_REUSE, 1u,
                                            MHD_OPTION_NOTIFY_COMPLETED, done, cls,
                                            MHD_OPTION_END);
    int e = errno;
    freeaddrinfo(ai);
    if (!d) {
        fprintf(stderr, "%s: cannot listen on %s:%ld: %s\n", who, host, port, strerror(e));
        return NULL;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    if (bound) *bound = di ? di->port : (unsigned)port;
    return d;
}
