/* libFuzzer harness for src/gguf.c: parse arbitrary bytes with gguf_open_mem, then touch
 * everything a successful parse hands out (every kv through every getter, every string of
 * every string array, every tensor's bytes) so ASan flags any pointer that escapes the
 * buffer. Build and run: scripts/fuzz-gguf.sh [seconds]. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"

static volatile uint64_t sink;

static void touch(const void *p, size_t n) {
    const uint8_t *b = p;
    uint64_t h = 0;
    /* First, last and a stride of bytes: enough for ASan to catch an out-of-range span. */
    if (!n) return;
    h += b[0] + b[n - 1];
    for (size_t i = 0; i < n; i += 4096) h += b[i];
    sink += h;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* An exactly-sized copy, so reads past the end hit ASan's redzone. */
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) return 0;
    if (size) memcpy(buf, data, size);
    char err[256];
    gguf_file *f = NULL;
    int rc = gguf_open_mem(&f, buf, size, err, sizeof err);
    if (rc != GGUF_OK) {
        if (f || strncmp(err, "gguf: ", 6) != 0) abort(); /* failure must be clean and explained */
        free(buf);
        return 0;
    }
    if (f->data_offset > f->size || f->alignment == 0 || (f->alignment & (f->alignment - 1))) abort();
    for (uint64_t i = 0; i < f->n_kv; i++) {
        const gguf_kv *kv = &f->kv[i];
        char key[128];
        size_t kl = kv->key.len < sizeof key - 1 ? (size_t)kv->key.len : sizeof key - 1;
        touch(kv->key.ptr, (size_t)kv->key.len);
        memcpy(key, kv->key.ptr, kl);
        key[kl] = 0;
        if (memchr(key, 0, kl) == NULL && kl == kv->key.len) {
            /* Lookup by name must find this very entry (keys are unique). */
            if (gguf_find_key(f, key) != (int)i) abort();
        }
        uint32_t u32; int64_t i64; float f32; bool b; gguf_str s;
        gguf_type at; uint64_t n; const void *d;
        int r1 = gguf_get_u32(f, key, &u32), r2 = gguf_get_i64(f, key, &i64);
        int r3 = gguf_get_f32(f, key, &f32), r4 = gguf_get_bool(f, key, &b);
        int r5 = gguf_get_str(f, key, &s), r6 = gguf_get_arr(f, key, &at, &n, &d);
        sink += (uint64_t)(r1 + r2 + r3 + r4 + r5 + r6);
        if (r5 == GGUF_OK) touch(s.ptr, (size_t)s.len);
        if (r6 == GGUF_OK && at == GGUF_TYPE_STRING) {
            const gguf_str *ss = d;
            for (uint64_t j = 0; j < n; j++) touch(ss[j].ptr, (size_t)ss[j].len);
        }
        sink += (uintptr_t)gguf_type_name(kv->type)[0];
    }
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        const gguf_tensor *t = &f->tensors[i];
        touch(t->name.ptr, (size_t)t->name.len);
        touch(t->data, t->nbytes);
        if ((const uint8_t *)t->data < f->base + f->data_offset ||
            t->nbytes > (size_t)(f->base + f->size - (const uint8_t *)t->data))
            abort();
        char name[128];
        if (t->name.len < sizeof name && !memchr(t->name.ptr, 0, (size_t)t->name.len)) {
            memcpy(name, t->name.ptr, (size_t)t->name.len);
            name[t->name.len] = 0;
            if (gguf_find_tensor(f, name) != t) abort();
        }
    }
    gguf_find_tensor(f, "token_embd.weight");
    gguf_get_u32(f, "llama.block_count", NULL);
    gguf_close(f);
    free(buf);
    return 0;
}
