#!/usr/bin/env bash
# Builds fuzz/fuzz_jsonschema.c with libFuzzer + ASan + UBSan and runs it for DURATION seconds
# (default 60) from a few schemas and texts (schema NUL text).
# usage: scripts/fuzz-jsonschema.sh [DURATION] [extra libFuzzer args...]
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-60}"; shift || true
OUT=build/fuzz
CORPUS=$OUT/corpus-jsonschema
mkdir -p "$OUT" "$CORPUS"
clang -g -O1 -std=c11 -D_GNU_SOURCE -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -Isrc $(pkg-config --cflags libcjson 2>/dev/null) fuzz/fuzz_jsonschema.c src/jsonschema.c src/grammar.c src/util.c \
    $(pkg-config --libs libcjson 2>/dev/null || echo -lcjson) -lpthread -lm -o "$OUT/fuzz_jsonschema"
seed() { printf '%s\0%s' "$1" "$2" > "$CORPUS/seed-$3"; }
seed '{"type":"object","properties":{"a":{"type":"string","maxLength":4},"b":{"type":"array","items":{"type":"integer"}}},"required":["a"]}' '{"a":"xy","b":[1,-2]}' 1
seed '{"anyOf":[{"enum":["x",1,null]},{"type":"number","minimum":0}]}' '1.5e3' 2
seed '{"$defs":{"n":{"type":"object","properties":{"k":{"anyOf":[{"$ref":"#/$defs/n"},{"type":"null"}]}}}},"$ref":"#/$defs/n"}' '{"k":{"k":null}}' 3
seed '' '{"q": [true, {"r": "\u00e9"}]}' 4
seed '{"type":"string","format":"date-time"}' '"2024-01-02T03:04:05Z"' 5
exec "$OUT/fuzz_jsonschema" "$CORPUS" -max_total_time="$DURATION" -max_len=2048 -timeout=10 "$@"
