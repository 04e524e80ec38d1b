#!/usr/bin/env bash
# For a GPU machine that reaches no package registry (this project's lent H100): carries the
# build libraries (Debian's libcjson, libmicrohttpd, PCRE2, zlib, hiredis, libcurl) and the GPU suite's Python packages
# (gguf, pytest) there as files, in the ignored folder .gpu/.
#   bash scripts/gpu-machine.sh prepare      here: download them into .gpu/
#   source scripts/gpu-machine.sh setup      there: unpack into .gpu/root and /tmp/site, export
#                                            what `make CUDA=1` and the tests need
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
case ${1:-} in
prepare)
  rm -rf "$here/.gpu/debs" "$here/.gpu/whl"   # a re-run must not leave two versions of a wheel
  mkdir -p "$here/.gpu/debs" "$here/.gpu/whl"
  mkdir -p "$here/.git/info"
  grep -qx '/.gpu/' "$here/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >> "$here/.git/info/exclude"
  (cd "$here/.gpu/debs" && apt-get download libcjson-dev libcjson1 libmicrohttpd-dev libmicrohttpd12 \
     libpcre2-dev libpcre2-8-0 zlib1g-dev zlib1g libhiredis-dev libhiredis0.14 libgnutls30 libnettle8 libhogweed6 libp11-kit0 libtasn1-6 libidn2-0 \
     libunistring2 libgmp10 libffi8 \
     libcurl4-openssl-dev libcurl4 libbrotli1 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 \
     libkeyutils1 libldap-2.5-0 libsasl2-2 libsasl2-modules-db libdb5.3 libnghttp2-14 libpsl5 librtmp1 libssh2-1 \
     libssl3 libzstd1 >/dev/null)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$here/.gpu/whl" \
    gguf==0.17.1 pytest iniconfig pluggy packaging pyyaml tqdm
  # the server suite's clients (make test-gpu-server), with their dependencies
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$here/.gpu/whl" \
    requests openai anthropic
  du -sh "$here/.gpu" ;;
setup)
  root="$here/.gpu/root"
  mkdir -p "$root"
  have=$(ldconfig -p)
  for f in "$here"/.gpu/debs/*.deb; do
    # headers always; a runtime library only where the system lacks its soname (the system's own
    # copy of libssl or libcurl stays the one every other library there was built against)
    case $(basename "$f") in
      *-dev_*) ;;
      *) missing=0
         for so in $(dpkg -c "$f" | grep -o '[^/ ]*\.so\.[0-9]*' | sort -u); do
           grep -qF "	$so (" <<<"$have" || missing=1
         done
         [ $missing = 1 ] || continue ;;
    esac
    dpkg -x "$f" "$root"
  done
  # a -dev package's lib*.so link whose runtime library was left to the system: point it there
  for l in "$root"/usr/lib/x86_64-linux-gnu/lib*.so; do
    [ -L "$l" ] && [ ! -e "$l" ] || continue
    so=$(basename "$(readlink "$l")" | sed -n 's/^\(.*\.so\.[0-9]*\).*/\1/p')
    sys=$(grep -F "	$so (" <<<"$have" | grep -m1 -o '=> .*' | cut -c4- || true)
    if [ -n "$sys" ]; then ln -sf "$sys" "$l"; else rm -f "$l"; fi   # (a library the build never links)
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$here"/.gpu/whl/*.whl 2>&1 | grep -v WARNING || true
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export CPATH="$root/usr/include/hiredis${CPATH:+:$CPATH}"   # (pkg-config finds it elsewhere)
  export GPU_MAKE_ARGS="EXTRA_CFLAGS=-I$root/usr/include EXTRA_LDFLAGS=-L$root/usr/lib/x86_64-linux-gnu"
  set +euo pipefail ;;
*) echo "usage: $0 prepare | source $0 setup" >&2; exit 2 ;;
esac
