#!/usr/bin/env bash
# A/B of the CUDA backend on the GPU machine: the working tree's src/cuda/gpu.cu against another
# revision's, both built in one run (the machine's checkout has no .git, so the base file travels
# in the ignored folder .ab/, named in `run`'s carry with .gpu).
#   bash bench/gpu_ab.sh prepare [REV]   here: .ab/gpu_base.cu from REV (default HEAD)
#   bash bench/gpu_ab.sh build           there: build/ (this tree) and /tmp/base/build (the base),
#                                        after `source scripts/gpu-machine.sh setup`
# then run the same command with build/pcache-tool and /tmp/base/build/pcache-tool, alternating.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd); cd "$here"
case ${1:-} in
prepare)
  mkdir -p .ab .git/info
  grep -qx '/.ab/' .git/info/exclude 2>/dev/null || echo '/.ab/' >> .git/info/exclude
  git show "${2:-HEAD}:src/cuda/gpu.cu" > .ab/gpu_base.cu && echo "base: $(git rev-parse --short "${2:-HEAD}")" ;;
build)
  [ -f .ab/gpu_base.cu ] || { echo "no .ab/gpu_base.cu: run 'bash bench/gpu_ab.sh prepare' here and carry .ab" >&2; exit 2; }
  rm -rf /tmp/base && mkdir -p /tmp/base && cp -r Makefile src bench tests scripts /tmp/base/ && cp .ab/gpu_base.cu /tmp/base/src/cuda/gpu.cu
  make -j16 CUDA=1 ${GPU_MAKE_ARGS:-} all build/tests/gpu_engine_check build/gpu_gemm > /tmp/ab-build.log 2>&1 || { tail -20 /tmp/ab-build.log; exit 1; }
  make -C /tmp/base -j16 CUDA=1 ${GPU_MAKE_ARGS:-} build/pcache-tool build/gpu_gemm > /tmp/ab-base.log 2>&1 || { tail -20 /tmp/ab-base.log; exit 1; }
  echo "built: build/ (this tree), /tmp/base/build (base)" ;;
*) echo "usage: bash bench/gpu_ab.sh prepare [REV] | build" >&2; exit 2 ;;
esac
