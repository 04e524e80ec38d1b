/* server: `pcache serve`, an OpenAI- and Anthropic-compatible HTTP server (see server.c). */
#ifndef PCACHE_SERVER_H
#define PCACHE_SERVER_H

/* Parses the serve options (argv[0] is "serve"), loads the model, serves until SIGINT/SIGTERM.
 * Returns the process exit status. */
int server_main(int argc, char **argv);

/* The cache namespace of an API key: "k" + 16 hex digits of its 64-bit FNV-1a hash ("" for
 * no key). out needs 18 bytes. */
void server_key_namespace(const char *key, char out[18]);
#endif
