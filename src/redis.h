/* redis: what any pcache process needs to talk to the cluster's Redis (issue 14): the --redis URL,
 * a connection with timeouts and authentication, and the reconnect backoff. hiredis (0.14 and
 * later) does the protocol; a caller owns its redisContext and uses it from one thread.
 *
 * URL: redis://[[user][:password]@]host[:port][/db]
 *   host   a name, an IPv4 address or a bracketed IPv6 address ([::1]); port 6379 by default
 *   user   Redis 6 ACL user (AUTH user password); without it AUTH password (requirepass)
 *   db     SELECT db (0 by default)
 *   user and password may hold %XX escapes (a password with '@' or ':' in it).
 * The password may also come from the environment (REDIS_PASSWORD) so that it stays out of
 * argv (ps, /proc/pid/cmdline): redis_url_parse fills it in when the URL has none. rediss://
 * (TLS) and unix sockets are refused: hiredis 0.14, Debian 12's, has neither. */
#ifndef PCACHE_REDIS_H
#define PCACHE_REDIS_H
#include <stddef.h>

typedef struct redis_url {
    char host[256];
    int port;
    char user[128];        /* "" = none */
    char password[256];    /* "" = none */
    int db;
} redis_url;

/* Parses s into *u; env_password (may be NULL; the caller passes getenv("REDIS_PASSWORD")) is
 * used when the URL has no password. Returns 0, or -1 with the reason in err (which never
 * repeats the password). */
int redis_url_parse(const char *s, const char *env_password, redis_url *u, char *err, size_t errlen);

/* The URL without its password, for logs ("redis://user:***@host:port/db"). */
void redis_url_print(const redis_url *u, char *out, size_t cap);

/* Seconds to wait before reconnect attempt `attempt` (0 = the first after a failure):
 * 0.1 s doubling up to max_s, with +-25% jitter from `rnd` (any 32-bit value; the caller's
 * random number), so that replicas that lost Redis together do not retry in step. */
double redis_backoff_s(int attempt, double max_s, unsigned rnd);

struct redisContext;
/* Connects with connect and command timeouts of timeout_s, authenticates, selects the db and
 * checks the server answers (PING). Returns the context, or NULL with err. */
struct redisContext *redis_connect(const redis_url *u, double timeout_s, char *err, size_t errlen);
#endif
