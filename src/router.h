/* router: `pcache route`, the cache-aware front of several `pcache serve` replicas (see router.c). */
#ifndef PCACHE_ROUTER_H
#define PCACHE_ROUTER_H

/* Parses the route options (argv[0] is "route"), serves until SIGINT/SIGTERM. Returns the
 * process exit status. */
int router_main(int argc, char **argv);

#endif
