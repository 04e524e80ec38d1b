/* fingerprint: see fingerprint.h. */
#include "fingerprint.h"
#include "util.h"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static const uint64_t P1 = 0x9E3779B185EBCA87ull, P2 = 0xC2B2AE3D27D4EB4Full, P3 = 0x165667B19E3779F9ull;

static inline uint64_t rotl(uint64_t x, int r) { return x << r | x >> (64 - r); }
static inline uint64_t round64(uint64_t acc, uint64_t v) { return rotl(acc + v * P2, 31) * P1; }
static inline uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;   /* little-endian hosts only, as the GGUF reader */
}

uint64_t fingerprint_bytes(const void *data, size_t len) {
    const uint8_t *p = data;
    uint64_t l0 = P1 + P2, l1 = P2, l2 = 0, l3 = 0 - P1;
    size_t i = 0;
    for (; i + 32 <= len; i += 32) {
        l0 = round64(l0, load64(p + i));
        l1 = round64(l1, load64(p + i + 8));
        l2 = round64(l2, load64(p + i + 16));
        l3 = round64(l3, load64(p + i + 24));
    }
    uint64_t h = rotl(l0, 1) + rotl(l1, 7) + rotl(l2, 12) + rotl(l3, 18);
    h = (h ^ round64(0, l0)) * P1 + P3;
    h = (h ^ round64(0, l1)) * P1 + P3;
    h = (h ^ round64(0, l2)) * P1 + P3;
    h = (h ^ round64(0, l3)) * P1 + P3;
    h += (uint64_t)len;
    for (; i < len; i++) h = rotl(h ^ p[i] * P3, 11) * P1;
    h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32;
    return h;
}

typedef struct { unsigned long long dev, ino, size, mtime, ctime; } file_key;

static file_key key_of(const struct stat *sb) {
    return (file_key){ (unsigned long long)sb->st_dev, (unsigned long long)sb->st_ino, (unsigned long long)sb->st_size,
                       (unsigned long long)sb->st_mtim.tv_sec * 1000000000ull + (unsigned long long)sb->st_mtim.tv_nsec,
                       (unsigned long long)sb->st_ctim.tv_sec * 1000000000ull + (unsigned long long)sb->st_ctim.tv_nsec };
}

/* Sidecar lines: "dev ino size mtime_ns ctime_ns fp_hex". Returns 1 and *fp when k is there. */
static int sidecar_find(const char *side, file_key k, uint64_t *fp) {
    FILE *f = fopen(side, "r");
    if (!f) return 0;
    file_key r;
    unsigned long long v;
    int found = 0;
    while (!found && fscanf(f, "%llu %llu %llu %llu %llu %llx", &r.dev, &r.ino, &r.size, &r.mtime, &r.ctime, &v) == 6)
        if (!memcmp(&r, &k, sizeof k)) { *fp = v; found = 1; }
    fclose(f);
    return found;
}

/* Rewrites the sidecar with k -> fp and up to 63 other lines (temporary file and rename). */
static void sidecar_store(const char *side, file_key k, uint64_t fp) {
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.%ld.tmp", side, (long)getpid());
    FILE *out = fopen(tmp, "w");
    if (!out) return;
    fprintf(out, "%llu %llu %llu %llu %llu %016llx\n", k.dev, k.ino, k.size, k.mtime, k.ctime, (unsigned long long)fp);
    FILE *in = fopen(side, "r");
    file_key r;
    unsigned long long v;
    for (int n = 0; in && n < 63 && fscanf(in, "%llu %llu %llu %llu %llu %llx", &r.dev, &r.ino, &r.size, &r.mtime, &r.ctime, &v) == 6;)
        if (r.dev != k.dev || r.ino != k.ino) {
            fprintf(out, "%llu %llu %llu %llu %llu %016llx\n", r.dev, r.ino, r.size, r.mtime, r.ctime, v);
            n++;
        }
    if (in) fclose(in);
    if (fclose(out) || rename(tmp, side)) unlink(tmp);
}

int fingerprint_file(const char *path, const char *sidecar_dir, uint64_t *fp, int *hashed, char *err, size_t errlen) {
    if (hashed) *hashed = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { int e = errno; return errf(err, errlen, "fingerprint: cannot open %s: %s", path, strerror(e)); }
    struct stat sb;
    if (fstat(fd, &sb)) { int e = errno; close(fd); return errf(err, errlen, "fingerprint: cannot stat %s: %s", path, strerror(e)); }
    file_key k = key_of(&sb);
    char side[4096] = "";
    if (sidecar_dir) {
        snprintf(side, sizeof side, "%s/fingerprints", sidecar_dir);
        if (sidecar_find(side, k, fp)) { close(fd); return 0; }
    }
    size_t len = (size_t)sb.st_size;
    uint64_t h;
    if (len == 0) h = fingerprint_bytes("", 0);
    else {
        void *p = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) { int e = errno; close(fd); return errf(err, errlen, "fingerprint: cannot map %s: %s", path, strerror(e)); }
        madvise(p, len, MADV_SEQUENTIAL);
        h = fingerprint_bytes(p, len);
        munmap(p, len);
    }
    close(fd);
    *fp = h;
    if (hashed) *hashed = 1;
    if (side[0]) sidecar_store(side, k, h);
    return 0;
}
