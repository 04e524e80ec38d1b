#!/usr/bin/env bash
# A/B of the CUDA backend on the GPU machine: the working tree's sources against another
# revision's, both built in one run (the machine's checkout has no .git, so the base's sources
# travel in the ignored folder .ab/, named in `run`'s carry with .gpu).
#   bash bench/gpu_ab.sh prepare [REV]   here: .ab/base.tar (Makefile, src, tests, bench, scripts) from REV (default HEAD)
#   bash bench/gpu_ab.sh build           there: build/ (this tree) and /tmp/base/build (the base),
#                                        after `source scripts/gpu-machine.sh setup`
# then run the same command with build/pcache-tool and /tmp/base/build/pcache-tool, alternating.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd); cd "$here"
case ${1:-} in
prepare)
  mkdir -p .ab .git/info
  grep -qx '/.ab/' .git/info/exclude 2>/dev/null || echo '/.ab/' >> .git/info/exclude
  rm -f .ab/gpu_base.cu
  git archive -o .ab/base.tar "${2:-HEAD}" Makefile src tests bench scripts && echo "base: $(git rev-parse --short "${2:-HEAD}")" ;;
build)
  [ -f .ab/base.tar ] || { echo "no .ab/base.tar: run 'bash bench/gpu_ab.sh prepare' here and carry .ab" >&2; exit 2; }
  rm -rf /tmp/base && mkdir -p /tmp/base && tar -xf .ab/base.tar -C /tmp/base
  make -j16 CUDA=1 ${GPU_MAKE_ARGS:-} all build/tests/gpu_engine_check build/gpu_gemm > /tmp/ab-build.log 2>&1 || { tail -20 /tmp/ab-build.log; exit 1; }
  make -C /tmp/base -j16 CUDA=1 ${GPU_MAKE_ARGS:-} build/pcache-tool build/gpu_gemm > /tmp/ab-base.log 2>&1 || { tail -20 /tmp/ab-base.log; exit 1; }
  echo "built: build/ (this tree), /tmp/base/build (base)" ;;
*) echo "usage: bash bench/gpu_ab.sh prepare [REV] | build" >&2; exit 2 ;;
esac
