/* fuzz_kvfile: libFuzzer harness for the KV block record reader (src/kvfile.c). Any input is
 * decoded as it is and again with its last four bytes replaced by the right CRC (so mutations
 * reach the field checks behind the checksum); an accepted record must re-encode to the same
 * bytes (the reader accepts exactly what the writer writes). Run: scripts/fuzz-kvfile.sh SECONDS. */
#include "kvfile.h"
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

static void one(const uint8_t *data, size_t size) {
    kvfile_meta m;
    const uint8_t *kv;
    char err[256];
    if (kvfile_decode(data, size, &m, &kv, err, sizeof err)) return;
    uint8_t *out = malloc(size);
    if (!out) return;
    size_t n = kvfile_encode(&m, kv, out, size, err, sizeof err);
    if (n != size || memcmp(out, data, size)) abort();
    free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    one(data, size);
    if (size < 4 || size > 1 << 20) return 0;
    uint8_t *fixed = malloc(size);
    if (!fixed) return 0;
    memcpy(fixed, data, size);
    const uint32_t c = (uint32_t)crc32(0, fixed, (uInt)(size - 4));
    for (int i = 0; i < 4; i++) fixed[size - 4 + i] = (uint8_t)(c >> (8 * i));
    one(fixed, size);
    free(fixed);
    return 0;
}
