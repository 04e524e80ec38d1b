/* fingerprint: a 64-bit hash of a whole file's content, the model identity of the cache tiers
 * below the KV pool (issue 11). Every KV block on disk (or in any shared store) carries the
 * fingerprint of the GGUF file it was computed with, and the store's directory is named by it,
 * so another model file, a file with other weights (one flipped byte is enough) or another KV
 * layout never reuses a block.
 *
 * The hash reads the mmapped file in 32-byte stripes over four independent multiply-rotate
 * lanes (the XXH64 round), so it runs at memory speed: a 15 GB model in a few seconds. It is
 * not cryptographic: it guards against mistakes, not against an attacker who can write the
 * cache directory (who could then write any record anyway).
 *
 * Restarts need not re-read the file: fingerprint_file can keep the result in a small sidecar
 * file ("fingerprints" in the cache directory), keyed by the file's device, inode, size,
 * mtime and ctime (nanoseconds); any change of the file changes one of them, and the file is
 * hashed again. */
#ifndef PCACHE_FINGERPRINT_H
#define PCACHE_FINGERPRINT_H
#include <stddef.h>
#include <stdint.h>

/* The hash of len bytes (the same function fingerprint_file applies to a file's content). */
uint64_t fingerprint_bytes(const void *p, size_t len);

/* The fingerprint of the file at path. With sidecar_dir (may be NULL), first looks the file up
 * in sidecar_dir/fingerprints and stores the result there after hashing (failures to read or
 * write the sidecar only cost a re-hash). *hashed (may be NULL) tells whether the file was
 * read. Returns 0, or -1 with err when the file cannot be read. */
int fingerprint_file(const char *path, const char *sidecar_dir, uint64_t *fp, int *hashed, char *err, size_t errlen);
#endif
