#!/usr/bin/env bash
# Builds fuzz/fuzz_cluster.c with libFuzzer + ASan + UBSan and runs it for DURATION seconds
# (default 60) over a seed corpus of --redis URLs, --replica URLs and KV event stream entries.
# usage: scripts/fuzz-cluster.sh [DURATION] [extra libFuzzer args...]
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-60}"; shift || true
OUT=build/fuzz
CORPUS=fuzz/corpus-cluster
mkdir -p "$OUT" "$CORPUS"
clang -g -O1 -std=c11 -D_GNU_SOURCE -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -Isrc $(pkg-config --cflags hiredis 2>/dev/null) fuzz/fuzz_cluster.c src/redis.c src/routing.c src/kvevent.c \
    src/kvindex.c src/kvfile.c src/util.c $(pkg-config --libs hiredis 2>/dev/null || echo -lhiredis) -lz -lm \
    -o "$OUT/fuzz_cluster"
seed() { printf '%b' "$2" > "$CORPUS/seed-$1"; }
# --redis URLs (then a NUL and REDIS_PASSWORD)
seed redis-plain '\x00redis://localhost'
seed redis-full '\x00redis://alice:pw%40x%3Ay@cache.local:6380/3'
seed redis-pass '\x00redis://:s3cret@10.0.0.5:7000/'
seed redis-v6 '\x00redis://[::1]:6390/2'
seed redis-env '\x00redis://bob:@h:1\x00envpw'
# --replica URLs
seed rep-plain '\x01http://127.0.0.1:8080'
seed rep-path '\x01http://replica-1.svc_local:8080/pcache//'
seed rep-v6 '\x01http://[fe80::1]:80/'
# KV event entries (kvevent.h), one a line
seed ev-hello '\x02v\t1\tinst\t00000000000a11ce\tfp\t1234567890abcdef\tlayout\t30x192\top\thello'
seed ev-store '\x02v\t1\tinst\t00000000000a11ce\tfp\t1234567890abcdef\tlayout\t30x192\top\tstore\tchains\t0123456789abcdef fedcba9876543210 0000000000000000\nv\t1\tinst\t00000000000a11ce\tfp\t1234567890abcdef\tlayout\t30x192\top\tevict\tchains\tfedcba9876543210'
seed ev-other '\x02v\t2\tinst\t0000000000000b0b\nv\t1\tinst\t0000000000000b0b\tfp\tffffffffffffffff\tlayout\t28x1024\top\tstore\tchains\tAAAAAAAAAAAAAAAA\nv\t1\tinst\t0000000000000b0b\tfp\t1234567890abcdef\tlayout\t30x192\top\tclear\nv\t1\tinst\t0000000000000b0b\tfp\t1234567890abcdef\tlayout\t30x192\top\tbye'
exec "$OUT/fuzz_cluster" "$CORPUS" -max_total_time="$DURATION" -max_len=4096 -timeout=10 -artifact_prefix="$OUT/" "$@"
