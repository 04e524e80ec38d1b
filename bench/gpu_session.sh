#!/usr/bin/env bash
# One GPU-machine session's checks and measurements in few calls (device time is scarce: about
# 30 minutes a session, 10 a command). Run from the checkout with `run` carrying .gpu (and .peer
# for the llama.cpp stages); logs go to $OUT.
#   bash bench/gpu_session.sh build     build everything (CUDA) and the GPU test tools
#   bash bench/gpu_session.sh kernels   the kernel tests (every shape, wgmma included), gpu_gemm
#                                       with the wgmma prefill kernel off and on
#   bash bench/gpu_session.sh engine    synthetic 8B F16 model: bench-engine with wgmma off and on
#   bash bench/gpu_session.sh tests     make test-gpu (kernels + engine) and the server suite on cuda
#   bash bench/gpu_session.sh fa        prefill attention on wgmma (PCACHE_FA_WG): bench/fa_wgmma_probe,
#                                       its bits test, then cold and cached prefill with it off and on
#                                       (SmolLM2 shape and 8B F16; needs .peer)
# Steps of one stage belong together; stages may be combined: bash bench/gpu_session.sh build kernels
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd); cd "$here"
OUT=${OUT:-/tmp/peer/out}; mkdir -p "$OUT" /tmp/peer
source scripts/gpu-machine.sh setup
for stage in "$@"; do
  echo "== $stage $(date +%T)"
  case $stage in
  build)
    make -j16 CUDA=1 $GPU_MAKE_ARGS all build/tests/gpu_engine_check build/gpu_gemm > "$OUT/build.log" 2>&1 \
      || { tail -30 "$OUT/build.log"; exit 1; } ;;
  kernels)
    PCACHE_BUILD=build timeout 300 python3 -m pytest -q -x tests/gpu/test_gpu.py -k "matmul or chunk" 2>&1 | tail -5
    for wg in 0 1; do echo "-- PCACHE_WGMMA=$wg"; PCACHE_WGMMA=$wg timeout 120 build/gpu_gemm 2>&1 | tail -12; done ;;
  engine)
    [ -f /tmp/peer/l8b-f16.gguf ] || (cd /tmp/peer && python3 "$here/.peer/mkgguf.py" l8b-f16.gguf > /dev/null)
    for wg in 0 1; do echo "-- PCACHE_WGMMA=$wg"; PCACHE_WGMMA=$wg timeout 200 build/pcache-tool bench-engine /tmp/peer/l8b-f16.gguf cuda; done ;;
  tests)
    PCACHE_BUILD=build timeout 400 python3 -m pytest -q tests/gpu 2>&1 | tail -5
    PCACHE_BUILD=build PCACHE_SERVE_ARGS="--device cuda" timeout 300 python3 -m pytest -q tests/py/test_server.py \
      tests/py/test_cache_tiers.py tests/py/test_structured.py -k "not random_walks and not accept_exactly" 2>&1 | tail -5 ;;
  fa)
    ${NVCC:-nvcc} -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a bench/fa_wgmma_probe.cu -o build/fa_wgmma_probe 2>&1 | grep -v C751
    build/fa_wgmma_probe | tail -10
    PCACHE_BUILD=build timeout 300 python3 -m pytest -q -x tests/gpu/test_gpu.py -k wgmma_attention 2>&1 | tail -5
    [ -f /tmp/peer/s135.gguf ] || (cd /tmp/peer && python3 "$here/.peer/mkgguf.py" s135.gguf --layers 30 --dim 576 --ffn 1536 --heads 9 --kv-heads 3 > /dev/null)
    [ -f /tmp/peer/l8b-f16.gguf ] || (cd /tmp/peer && python3 "$here/.peer/mkgguf.py" l8b-f16.gguf > /dev/null)
    for m in s135 l8b-f16; do
      for wg in 0 1 0 1; do echo "-- $m PCACHE_FA_WG=$wg"; PCACHE_FA_WG=$wg timeout 200 build/pcache-tool bench-engine /tmp/peer/$m.gguf cuda prefill; done
    done ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
