#!/usr/bin/env bash
# Builds llama-cpp-python (llama.cpp) into its own folder, in one of two flavours:
#   oracle  the copy the tests compare against. Its kernels are pinned (AVX2+FMA+F16C, no
#           AVX-512, no AVX-VNNI, no AMX), so that its greedy outputs and logits are the same on
#           every x86-64 host the suite runs on: a native build takes other kernels, with other
#           rounding, on an AVX-512 CPU (issue 12).
#   peer    the copy the benchmarks measure: a native build (-march=native), llama.cpp at its best
#           on this host.
# usage: install-llama.sh oracle|peer DIR
# The version is pinned (README: the llama.cpp everything was measured with). pip's wheel cache
# is bypassed: it is keyed by the source archive, not by CMAKE_ARGS, so it would hand one
# flavour's wheel to the other.
set -euo pipefail
flavour=$1 dir=$2
version=0.3.36
case $flavour in
  oracle) args="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_BACKEND_DL=OFF -DGGML_CPU_ALL_VARIANTS=OFF" ;;
  peer)   args="-DGGML_NATIVE=ON" ;;
  *) echo "usage: $0 oracle|peer DIR" >&2; exit 2 ;;
esac
stamp="$dir/.pcache-stamp"
want="llama-cpp-python==$version $args"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "building llama-cpp-python $version ($flavour build) into $dir: a few minutes on 2 cores" >&2
rm -rf "$dir"
mkdir -p "$dir"
CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  python3 -m pip install -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
  --target "$dir" "llama-cpp-python==$version" 2>&1 | grep -v "Running pip as the 'root'" || true
PYTHONPATH="$dir" python3 -c "import llama_cpp" || { echo "llama-cpp-python ($flavour) did not install" >&2; exit 1; }
echo "$want" > "$stamp"
