#!/usr/bin/env bash
# On the GPU machine: a per-kernel time table of pcache's forward pass (issue 10), from Nsight
# Compute (the lent machines have ncu but no nsys; ncu must leave the clocks alone:
# --clock-control none). Writes $OUT/prof-<model>.csv (raw) and .txt (per kernel: share of the
# time, total, calls, average, achieved DRAM bandwidth).
#   bash bench/gpu_profile.sh MODEL.gguf [SKIP [COUNT [MODE]]]
# profiles COUNT kernels (default 700) after the first SKIP (default 300) of
# `pcache-tool bench-engine MODEL cuda MODE` (decode: decode at batch 1, then 32 streams; prefill:
# a cold 8192-token prompt in 2048-token chunks, then 192 new tokens after 8000 cached). The .txt
# has the table over all profiled kernels, then one line per forward pass (k_embed starts one).
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd); cd "$here"
OUT=${OUT:-/tmp/peer/out}; mkdir -p "$OUT"
m=$1; skip=${2:-300}; count=${3:-700}; mode=${4:-decode}; tag=$(basename "$m" .gguf)-$mode
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
"$NCU" --clock-control none --csv --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
  -s "$skip" -c "$count" build/pcache-tool bench-engine "$m" cuda "$mode" > "$OUT/prof-$tag.csv" 2> "$OUT/prof-$tag.err"
python3 - "$OUT/prof-$tag.csv" > "$OUT/prof-$tag.txt" <<'PY'
import csv, sys, collections
rows = list(csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"')))
agg = collections.defaultdict(lambda: [0.0, 0, 0.0])   # kernel -> [ns, calls, bytes]
seen = {}
for r in rows:
    k = (r['ID'], r['Kernel Name'])
    v = float(r['Metric Value'].replace(',', ''))
    unit = r['Metric Unit']
    scale = {'nsecond': 1, 'usecond': 1e3, 'msecond': 1e6, 'byte': 1, 'Kbyte': 1e3, 'Mbyte': 1e6, 'Gbyte': 1e9}.get(unit, 1)
    a = agg[r['Kernel Name'][:120]]
    if r['Metric Name'] == 'gpu__time_duration.sum': a[0] += v * scale; a[1] += 1
    else: a[2] += v * scale
tot = sum(a[0] for a in agg.values()) or 1
print(f"{'share':>6} {'total ms':>9} {'calls':>6} {'avg us':>8} {'GB/s':>7}  kernel")
for name, (ns, n, b) in sorted(agg.items(), key=lambda kv: -kv[1][0]):
    print(f"{100*ns/tot:6.1f} {ns/1e6:9.3f} {n:6d} {ns/max(n,1)/1e3:8.2f} {b/max(ns,1):7.0f}  {name}")
# per forward pass: its kernels' time and its three costliest kernels
ids = {}
for r in rows:
    if r['Metric Name'] == 'gpu__time_duration.sum':
        v = float(r['Metric Value'].replace(',', '')) * {'nsecond': 1, 'usecond': 1e3, 'msecond': 1e6}.get(r['Metric Unit'], 1)
        ids[int(r['ID'])] = (r['Kernel Name'].split('(')[0].split('<')[0][:40], v)
fwd = []
for i in sorted(ids):
    if ids[i][0].startswith('k_embed') or not fwd: fwd.append(collections.Counter())
    fwd[-1][ids[i][0]] += ids[i][1]
print("\nforward passes: ms, kernels' top 3")
for f in fwd:
    t = sum(f.values())
    if t > 2e5: print(f"{t/1e6:8.3f}  " + ", ".join(f"{k} {v/1e6:.3f}" for k, v in f.most_common(3)))
PY
head -25 "$OUT/prof-$tag.txt"; sed -n '/forward passes/,$p' "$OUT/prof-$tag.txt" | head -30; tail -3 "$OUT/prof-$tag.err"
