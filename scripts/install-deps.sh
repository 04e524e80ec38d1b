#!/usr/bin/env bash
# Installs what pcache needs on a fresh Debian machine, for one of three jobs:
#   serve  build packages only (C compiler, libcjson, libmicrohttpd, PCRE2, zlib, hiredis, libcurl)
#          and pip for the model fetch: `make serve` / `make run`
#   test   + Check, clang's fuzzer runtime, redis-server, the Python test packages and the llama.cpp oracle
#          (pinned kernels, .deps/llama-oracle): `make test`
#   bench  + the llama.cpp peer (native build, .deps/llama-peer) and its server: `make bench`
set -euo pipefail
job=${1:-serve}
here=$(cd "$(dirname "$0")/.." && pwd)
# Debian's own python3 refuses pip installs into it (PEP 668); these are the project's tools.
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1

APT_PKGS="build-essential pkg-config libcjson-dev libmicrohttpd-dev libpcre2-dev zlib1g-dev libhiredis-dev libcurl4-openssl-dev"
command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1 || APT_PKGS="$APT_PKGS python3-pip"
case $job in
  serve) ;;
  test|bench) APT_PKGS="$APT_PKGS clang libclang-rt-14-dev check cmake redis-server" ;;
  *) echo "usage: $0 serve|test|bench" >&2; exit 2 ;;
esac
missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
fi
[ "$job" = serve ] && exit 0

pipi() { python3 -m pip install -q "$@" 2>&1 | grep -v "Running pip as the 'root'" || true; }
pipi -r "$here/requirements-test.txt"
python3 -c "import numpy, gguf, pytest, tokenizers, transformers, openai, anthropic"
bash "$here/scripts/install-llama.sh" oracle "$here/.deps/llama-oracle"
[ "$job" = test ] && exit 0

pipi -r "$here/requirements-bench.txt"
bash "$here/scripts/install-llama.sh" peer "$here/.deps/llama-peer"
PYTHONPATH="$here/.deps/llama-peer" python3 -c "import llama_cpp.server"
