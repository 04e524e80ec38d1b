#!/usr/bin/env bash
# make bench-gpu, on the GPU machine: pcache's CUDA backend and llama.cpp's CUDA build side by
# side on the same synthetic GGUFs (../shared/gpu-peer: SmolLM2-135M shape Q4_1, Llama-3-8B shape
# F16 and Q4_0, random weights, SmolLM2's tokenizer). A lease's command lasts 10 minutes at most,
# so it runs in two stages on one warm machine (/tmp/peer survives between them):
#   bash bench/bench_gpu.sh 1   builds pcache, starts llama.cpp's build (background), writes the
#                               F16 models, measures pcache on them
#   bash bench/bench_gpu.sh 2   waits for llama.cpp, quantizes the Q4 models, measures pcache on
#                               them
#   bash bench/bench_gpu.sh 3   llama.cpp on all three (llama-bench, batched-bench, server)
# Expects the gpu-peer folder copied to .peer/ (README: GPU) and scripts/gpu-machine.sh's files.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd); cd "$here"
OUT=${OUT:-/tmp/peer/out}; mkdir -p "$OUT" /tmp/peer
source scripts/gpu-machine.sh setup
W=/tmp/peer; B=$W/llama.cpp/b/bin
bench() {   # MODEL: one JSON line into $OUT/pcache.jsonl
  timeout 400 build/pcache-tool bench-engine "$1" cuda 2>>"$OUT/pcache.err" | tee -a "$OUT/pcache.jsonl"
}
case ${1:-1} in
1)
  [ -f $B/llama-bench ] || (setsid bash .peer/build.sh >/dev/null 2>&1 < /dev/null &)
  make -j16 CUDA=1 $GPU_MAKE_ARGS all > "$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
  cd $W
  [ -f s135-f16.gguf ] || python3 "$here/.peer/mkgguf.py" s135-f16.gguf --layers 30 --dim 576 --ffn 1536 --heads 9 --kv-heads 3
  [ -f l8b-f16.gguf ] || python3 "$here/.peer/mkgguf.py" l8b-f16.gguf
  cd "$here"
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  bench $W/s135-f16.gguf
  bench $W/l8b-f16.gguf ;;
2)
  for i in $(seq 1 60); do grep -q "build rc=" $W/build.log 2>/dev/null && break; sleep 5; done
  tail -1 $W/build.log
  cd $W
  [ -f s135-q41.gguf ] || $B/llama-quantize s135-f16.gguf s135-q41.gguf Q4_1 16 >/dev/null 2>&1
  [ -f l8b-q40.gguf ] || $B/llama-quantize l8b-f16.gguf l8b-q40.gguf Q4_0 16 >/dev/null 2>&1
  cd "$here"
  bench $W/s135-q41.gguf
  bench $W/l8b-q40.gguf ;;
3)
  (cd $W && timeout 500 bash "$here/.peer/bench.sh") 2>&1 | tee "$OUT/llamacpp.txt" ;;
esac
