#!/usr/bin/env bash
# Builds fuzz/fuzz_kvfile.c with libFuzzer + ASan + UBSan and runs it for DURATION seconds
# (default 60) from valid KV block records (written by fuzz/kvfile_seed.c).
# usage: scripts/fuzz-kvfile.sh [DURATION] [extra libFuzzer args...]
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-60}"; shift || true
OUT=build/fuzz
CORPUS=$OUT/corpus-kvfile
mkdir -p "$OUT" "$CORPUS"
clang -g -O1 -std=c11 -D_GNU_SOURCE -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -Isrc fuzz/fuzz_kvfile.c src/kvfile.c src/util.c -lz -lm -o "$OUT/fuzz_kvfile"
clang -g -O1 -std=c11 -D_GNU_SOURCE -Isrc fuzz/kvfile_seed.c src/kvfile.c src/util.c -lz -lm -o "$OUT/kvfile_seed"
"$OUT/kvfile_seed" "$CORPUS"
exec "$OUT/fuzz_kvfile" "$CORPUS" -max_total_time="$DURATION" -max_len=4096 -timeout=10 "$@"
