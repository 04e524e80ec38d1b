#!/usr/bin/env bash
# Builds fuzz/fuzz_api.c with libFuzzer + ASan + UBSan and runs it for DURATION seconds
# (default 60) over a seed corpus of valid and near-valid requests of both APIs.
# usage: scripts/fuzz-api.sh [DURATION] [extra libFuzzer args...]
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-60}"; shift || true
OUT=build/fuzz
CORPUS=fuzz/corpus-api
mkdir -p "$OUT" "$CORPUS"
clang -g -O1 -std=c11 -D_GNU_SOURCE -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -Isrc $(pkg-config --cflags libcjson) fuzz/fuzz_api.c src/api.c src/sample.c \
    $(pkg-config --libs libcjson) -lm -o "$OUT/fuzz_api"
seed() { printf '%b' "$2" > "$CORPUS/seed-$1"; }
seed chat '\x00{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"hi"}]}],"stop":["a","b"],"max_tokens":4,"temperature":0.5,"stream":true,"stream_options":{"include_usage":true}}'
seed comp '\x01{"model":"m","prompt":"Once upon","max_tokens":3,"stop":"x","seed":7}'
seed msgs '\x03{"model":"m","max_tokens":8,"tools":[{"name":"t","input_schema":{"type":"object"},"cache_control":{"type":"ephemeral","ttl":"1h"}}],"system":[{"type":"text","text":"S","cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":[{"type":"text","text":"doc","cache_control":{"type":"ephemeral"}},{"type":"tool_result","tool_use_id":"x","content":"r"}]},{"role":"assistant","content":[{"type":"tool_use","id":"x","name":"t","input":{}}]}],"stop_sequences":["END"]}'
seed resp '\x02{"model":"m","instructions":"be brief","input":[{"role":"user","content":[{"type":"input_text","text":"hi"}]},{"type":"function_call","call_id":"c1","name":"f","arguments":"{}"},{"type":"function_call_output","call_id":"c1","output":"ok"}],"tools":[{"type":"function","name":"f","parameters":{"type":"object"},"strict":true}],"max_output_tokens":5,"stream":true,"previous_response_id":"resp_1"}'
seed think '\x00{"messages":[{"role":"user","content":"q"}],"reasoning_format":"auto","chat_template_kwargs":{"enable_thinking":false},"stream":true}'
seed thinka '\x03{"model":"m","max_tokens":8,"thinking":{"type":"enabled","budget_tokens":1024},"messages":[{"role":"user","content":"q"},{"role":"assistant","content":[{"type":"thinking","thinking":"t","signature":""},{"type":"text","text":"a"}]},{"role":"user","content":"n"}]}'
seed thinkr '\x02{"input":[{"role":"user","content":"q"},{"type":"reasoning","id":"rs_1","summary":[],"content":[{"type":"reasoning_text","text":"t"}]}],"reasoning":{"effort":"low"}}'
seed count '\x04{"model":"m","cache_control":{"type":"ephemeral"},"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"ok"}]}'
exec "$OUT/fuzz_api" "$CORPUS" -max_total_time="$DURATION" -max_len=8192 -timeout=10 "$@"
