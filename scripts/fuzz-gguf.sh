#!/usr/bin/env bash
# Fuzzes the GGUF reader with libFuzzer + ASan + UBSan for $1 seconds (default 30).
#   bash scripts/fuzz-gguf.sh [seconds]
# Builds build/fuzz/fuzz_gguf, seeds fuzz/corpus-gguf (gitignored) with small valid GGUFs
# written by the PyPI gguf package's GGUFWriter, and runs. Crashing inputs land in
# build/fuzz/artifacts-gguf/ and the script exits non-zero. Makefile-independent.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
secs=${1:-30}
out=${FUZZ_BUILD:-build/fuzz}
corpus=fuzz/corpus-gguf
mkdir -p "$out" "$out/artifacts-gguf" "$corpus"

# quant.c provides the ggml type table gguf.c checks tensor types against.
CC=${CC_FUZZ:-clang}
$CC -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined ${ARCHFLAGS:--march=native} \
    -std=c11 -D_GNU_SOURCE -Isrc fuzz/fuzz_gguf.c src/gguf.c src/quant.c -lm -o "$out/fuzz_gguf"

# Seeds are written when missing (seed-meta.gguf is written last); what the fuzzer adds is kept.
if [ ! -f "$corpus/seed-meta.gguf" ]; then
  python3 - "$corpus" <<'PY'
import sys, os, numpy as np
from gguf import GGUFWriter, GGMLQuantizationType as Q
d = sys.argv[1]
def write(name, fill, arch="llama"):
    p = os.path.join(d, name)
    w = GGUFWriter(p, arch)
    fill(w)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
def small(w):
    w.add_uint32("llama.block_count", 2); w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("b", True); w.add_string("general.name", "tiny")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b", "ab"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0, -3.0])
    w.add_int64("i64", -5); w.add_uint8("u8", 7); w.add_float64("f64", 2.5)
    w.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float16))
def quant(w):
    w.add_custom_alignment(64)
    # uint8 data with a raw_dtype: the array's shape is the byte shape (2 rows of one block).
    w.add_tensor("q8", np.arange(68, dtype=np.uint8).reshape(2, 34), raw_dtype=Q.Q8_0)
    w.add_tensor("q41", np.arange(20, dtype=np.uint8).reshape(1, 20), raw_dtype=Q.Q4_1)
    w.add_tensor("f32", np.zeros((3, 5), dtype=np.float32))
def meta_only(w):
    w.add_array("ints", [1, 2, 3]); w.add_array("strs", ["x", "", "yz"]); w.add_string("e", "")
def nested(w):
    w.add_array("nested", [[1, 2], ["a", "bc"]]); w.add_uint32("after", 1)
write("seed-small.gguf", small); write("seed-quant.gguf", quant); write("seed-nested.gguf", nested)
b = bytearray(open(os.path.join(d, "seed-small.gguf"), "rb").read())
b[4:8] = (2).to_bytes(4, "little")  # v2 has the same layout as v3
open(os.path.join(d, "seed-small-v2.gguf"), "wb").write(bytes(b))
write("seed-meta.gguf", meta_only)  # last: its presence means the seeds are complete
PY
fi

log="$out/fuzz-gguf.log"
set +e
"$out/fuzz_gguf" -max_len=65536 -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$out/artifacts-gguf/" "$corpus" >"$log" 2>&1
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
  grep -v '# Uses:' "$log" | tail -n 80 >&2
  echo "fuzz-gguf: FAILED (rc $rc); crashing input in $out/artifacts-gguf/, full log $log" >&2
  exit "$rc"
fi
grep -E '^(Done|stat::(number_of_executed_units|new_units_added|peak_rss_mb))' "$log"
echo "fuzz-gguf: OK ($secs s, corpus $(ls "$corpus" | wc -l) inputs)"
