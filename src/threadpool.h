/* threadpool: a fixed set of worker threads for the forward pass.
 *
 * A forward step issues hundreds of short parallel jobs (one per matmul, attention, ...), each
 * taking tens of microseconds, so handing work over must cost far less than a condition
 * variable's wake-up: workers spin on a generation counter while jobs keep coming and only
 * fall back to sleeping on a condition variable after a stretch of idleness (a server waiting
 * for requests must not burn its cores). The calling thread is worker 0 and does its share.
 */
#ifndef PCACHE_THREADPOOL_H
#define PCACHE_THREADPOOL_H

typedef void (*tp_fn)(void *ctx, int ith, int nth);
typedef struct threadpool threadpool;

threadpool *tp_create(int n_threads);   /* n_threads >= 1 including the caller; NULL on failure */
void tp_free(threadpool *tp);
int tp_size(const threadpool *tp);
/* Runs fn(ctx, i, n) for i in [0, n) on the pool's threads and returns when all are done. */
void tp_run(threadpool *tp, tp_fn fn, void *ctx);
#endif
