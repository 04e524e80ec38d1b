#!/usr/bin/env bash
# Installs what pcache needs to build, test and benchmark on a fresh Debian machine.
set -euo pipefail
APT_PKGS="build-essential pkg-config clang libclang-rt-14-dev libcjson-dev libmicrohttpd-dev libpcre2-dev check python3-pip"
missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
fi
here=$(cd "$(dirname "$0")/.." && pwd)
python3 -m pip install -q -r "$here/requirements-dev.txt" 2>&1 | grep -v "Running pip as the 'root'" || true
python3 -c "import numpy, gguf, pytest, tokenizers, transformers, llama_cpp" 
