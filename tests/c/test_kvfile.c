/* kvfile tests: a KV block record round-trips; every truncation, every flipped bit, trailing
 * bytes, another format version and inconsistent fields are refused with a reason; the chain
 * hash separates models, layouts, namespaces and token sequences, and is pinned (it names
 * records on disk, so changing it needs a new format version). */
#include <check.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include "kvfile.h"
#include "prefix.h"

#define NL 2
/* kvfile_chain_root(0x1122334455667788, 2, 4, "ns") and its chain over tokens {1, 2, 3}, as
 * format version 1 computes them */
#define PINNED_ROOT 0x35cbde555a339979ull
#define PINNED_CHAIN 0xc66aca860aaa2139ull
#define KD 4

static void make(kvfile_meta *m, uint8_t *kv, const char *ns, int n) {
    memset(m, 0, sizeof *m);
    m->model_fp = 0x1122334455667788ull;
    m->n_layer = NL;
    m->kv_dim = KD;
    m->n_tokens = n;
    m->kind = PREFIX_EXPLICIT;
    snprintf(m->ns, sizeof m->ns, "%s", ns);
    m->parent = kvfile_chain_root(m->model_fp, NL, KD, ns);
    for (int i = 0; i < n; i++) m->tokens[i] = 1000 + 7 * i;
    m->chain = kvfile_chain(m->parent, m->tokens, n);
    m->expiry = 1795000000.5;
    m->ttl = 3600;
    for (size_t i = 0; i < kv_block_bytes(NL, KD); i++) kv[i] = (uint8_t)(i * 31 + 7);
}

static size_t encode(const kvfile_meta *m, const uint8_t *kv, uint8_t *buf, size_t cap) {
    char err[200];
    size_t n = kvfile_encode(m, kv, buf, cap, err, sizeof err);
    ck_assert_msg(n > 0, "%s", err);
    return n;
}

START_TEST(round_trip) {
    kvfile_meta m, d;
    uint8_t kv[kv_block_bytes(NL, KD)], buf[2048];
    const char *nss[] = { "", "tenant-a", "a namespace of thirty-one bytes" };
    for (int t = 0; t < 3; t++)
        for (int n = 1; n <= KV_BLOCK; n += 5) {
            make(&m, kv, nss[t], n);
            size_t len = encode(&m, kv, buf, sizeof buf);
            ck_assert_uint_eq(len, kvfile_size(NL, KD, strlen(nss[t])));
            ck_assert_uint_eq(len % 4, 0);
            const uint8_t *p = NULL;
            char err[200] = "";
            ck_assert_msg(kvfile_decode(buf, len, &d, &p, err, sizeof err) == 0, "%s", err);
            ck_assert(p == buf + len - 4 - sizeof kv);
            ck_assert_mem_eq(p, kv, sizeof kv);
            ck_assert(d.model_fp == m.model_fp && d.parent == m.parent && d.chain == m.chain);
            ck_assert_uint_eq(d.n_layer, NL);
            ck_assert_uint_eq(d.kv_dim, KD);
            ck_assert_int_eq(d.n_tokens, n);
            ck_assert_int_eq(d.kind, PREFIX_EXPLICIT);
            ck_assert_str_eq(d.ns, nss[t]);
            ck_assert(d.expiry == m.expiry && d.ttl == m.ttl);
            ck_assert_mem_eq(d.tokens, m.tokens, sizeof m.tokens);
        }
}
END_TEST

START_TEST(every_truncation_and_bit_flip_refused) {
    kvfile_meta m, d;
    uint8_t kv[kv_block_bytes(NL, KD)], buf[2048], bad[2048];
    make(&m, kv, "ns", 9);
    const size_t len = encode(&m, kv, buf, sizeof buf);
    const uint8_t *p;
    char err[200];
    for (size_t l = 0; l < len; l++)
        ck_assert_msg(kvfile_decode(buf, l, &d, &p, err, sizeof err) == -1, "truncated to %zu accepted", l);
    memcpy(bad, buf, len);
    bad[len] = 0;
    ck_assert_int_eq(kvfile_decode(bad, len + 1, &d, &p, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "truncated or trailing"));
    for (size_t i = 0; i < len; i++)
        for (int bit = 0; bit < 8; bit++) {
            memcpy(bad, buf, len);
            bad[i] ^= (uint8_t)(1u << bit);
            ck_assert_msg(kvfile_decode(bad, len, &d, &p, err, sizeof err) == -1, "flip of byte %zu bit %d accepted", i, bit);
        }
}
END_TEST

/* Fields that pass the CRC (rewritten after the change) are still checked. */
static int decode_recrc(uint8_t *buf, size_t len, char *err) {
    uint32_t c = (uint32_t)crc32(0, buf, (uInt)(len - 4));
    for (int i = 0; i < 4; i++) buf[len - 4 + i] = (uint8_t)(c >> (8 * i));
    kvfile_meta d;
    const uint8_t *p;
    return kvfile_decode(buf, len, &d, &p, err, 200);
}

START_TEST(consistent_fields_required) {
    kvfile_meta m;
    uint8_t kv[kv_block_bytes(NL, KD)], buf[2048], bad[2048];
    make(&m, kv, "ns", 3);
    const size_t len = encode(&m, kv, buf, sizeof buf);
    char err[200];
    struct { size_t off; uint8_t val; const char *why; } cases[] = {
        { 8, 2, "version" },                  /* a later format */
        { 40, 32, "tokens, element type" },   /* blocks of 32 tokens */
        { 44, 0, "tokens in a block" },       /* zero valid tokens */
        { 46, 7, "entry kind" },
        { 80 + 4 * 5, 1, "unused token slot" },
        { 80, 0x55, "chain hash" },           /* a token changed: the chain no longer matches */
        { 144 + 3, 'x', "padding" },
        { 145, 0, "NUL byte" },
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        memcpy(bad, buf, len);
        bad[cases[c].off] = cases[c].val;
        ck_assert_int_eq(decode_recrc(bad, len, err), -1);
        ck_assert_msg(strstr(err, cases[c].why), "case %zu: %s", c, err);
    }
    memcpy(bad, buf, len);
    memcpy(bad, "PCKVBLK2", 8);
    ck_assert_int_eq(decode_recrc(bad, len, err), -1);
    ck_assert_ptr_nonnull(strstr(err, "magic"));
}
END_TEST

START_TEST(encode_refuses_bad_metadata) {
    kvfile_meta m;
    uint8_t kv[kv_block_bytes(NL, KD)], buf[2048];
    char err[200];
    make(&m, kv, "ns", 4);
    m.tokens[0]++;
    ck_assert_uint_eq(kvfile_encode(&m, kv, buf, sizeof buf, err, sizeof err), 0);
    make(&m, kv, "ns", 4);
    m.n_tokens = KV_BLOCK + 1;
    ck_assert_uint_eq(kvfile_encode(&m, kv, buf, sizeof buf, err, sizeof err), 0);
    make(&m, kv, "ns", 4);
    m.kv_dim = 0;
    ck_assert_uint_eq(kvfile_encode(&m, kv, buf, sizeof buf, err, sizeof err), 0);
    make(&m, kv, "ns", 4);
    ck_assert_uint_eq(kvfile_encode(&m, kv, buf, kvfile_size(NL, KD, 2) - 1, err, sizeof err), 0);
    ck_assert_ptr_nonnull(strstr(err, "buffer"));
    ck_assert_uint_eq(kvfile_encode(&m, kv, buf, kvfile_size(NL, KD, 2), err, sizeof err), kvfile_size(NL, KD, 2));
}
END_TEST

START_TEST(chain_separates_and_is_pinned) {
    const uint64_t fp = 0x1122334455667788ull;
    const uint64_t r = kvfile_chain_root(fp, NL, KD, "ns");
    ck_assert(r != kvfile_chain_root(fp + 1, NL, KD, "ns"));
    ck_assert(r != kvfile_chain_root(fp, NL + 1, KD, "ns"));
    ck_assert(r != kvfile_chain_root(fp, NL, KD + 1, "ns"));
    ck_assert(r != kvfile_chain_root(fp, NL, KD, "nt"));
    ck_assert(kvfile_chain_root(fp, NL, KD, "") == kvfile_chain_root(fp, NL, KD, NULL));
    const int32_t a[3] = { 1, 2, 3 }, b[3] = { 2, 1, 3 };
    const uint64_t ca = kvfile_chain(r, a, 3);
    ck_assert(ca != kvfile_chain(r, b, 3));
    ck_assert(ca != kvfile_chain(r, a, 2));
    ck_assert(ca != kvfile_chain(kvfile_chain_root(fp, NL, KD, "other"), a, 3));
    /* the next block's hash depends on every earlier token through its parent */
    ck_assert(kvfile_chain(ca, a, 3) != kvfile_chain(kvfile_chain(r, b, 3), a, 3));
    /* pinned: these values name records on disk (a change needs KVFILE_VERSION + 1) */
    ck_assert_msg(r == PINNED_ROOT, "root %016llx", (unsigned long long)r);
    ck_assert_msg(ca == PINNED_CHAIN, "chain %016llx", (unsigned long long)ca);
}
END_TEST

int main(void) {
    Suite *s = suite_create("kvfile");
    TCase *tc = tcase_create("record");
    tcase_add_test(tc, round_trip);
    tcase_add_test(tc, every_truncation_and_bit_flip_refused);
    tcase_add_test(tc, consistent_fields_required);
    tcase_add_test(tc, encode_refuses_bad_metadata);
    tcase_add_test(tc, chain_separates_and_is_pinned);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
