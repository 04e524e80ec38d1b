#!/usr/bin/env python3
"""Cache tier benchmark (issue 11): the disk tier across a restart, and capacity beyond the KV pool.

Both use `pcache run --prompts FILE` (one process, greedy, a few generated tokens; TTFT and
cached_tokens per request as pcache reports them), raw completion prompts, the documents sized
with `pcache tokenize` (bench_cache.py's text generator).

  restart   one ~P-token document and distinct short questions. Run 1 (--cache-dir D): the
            first request is cold, the later ones are warm from the in-memory pool. Run 2, a
            new process on the same D: its first request is served from the disk tier (warm
            after a restart), its later ones from the pool again.
  capacity  N distinct ~P-token documents, each asked about R times in random order, with a KV
            pool (--kv-mem) holding about K of them: the hit rate (prompt tokens served from any
            cache) of the requests after each document's first, and TTFT p50/p99 of those, with
            and without --cache-dir.
  host      (--host, the GPU benchmark) D distinct ~P-token documents asked about twice, in the
            same order, with a GPU KV pool holding half of them (the working set is twice the
            pool): on the second pass every document was pushed out of the pool. TTFT of the
            second pass recomputing the prefixes vs bringing them back from the host-RAM tier
            (--cache-host-mem). E.g. on the GPU machine with the synthetic 8B F16 model:
            bench_tiers.py --host --model l8b-f16.gguf --device cuda --kv-token-bytes 131072
            --prefix-tokens 8000

Timings on a shared 2-core machine are noisy. Writes bench/tiers_results.json (or --out) and
prints a markdown table.
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cache import questions, sized_text  # noqa: E402

KV_TOKEN_BYTES = 30 * 2 * 192 * 2   # SmolLM2-135M: layers * K,V * kv_dim * fp16


def run_prompts(args, prompts, extra):
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for p in prompts:
            f.write(json.dumps(p) + "\n")
        path = f.name
    try:
        cmd = [args.pcache, "run", "-m", args.model, "-t", str(args.threads), "--temp", "0", "-n", str(args.n_gen),
               "--prompts", path, *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
        if r.returncode != 0:
            sys.exit(f"pcache failed: {r.stderr[-2000:]}")
        return [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    finally:
        os.unlink(path)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def bench_restart(args, tmp):
    doc = sized_text(args.pcache, args.model, args.prefix_tokens, seed=11)[0]
    qs = questions(6)
    d = os.path.join(tmp, "restart")
    run1 = run_prompts(args, [doc + q for q in qs[:3]], ["--cache-dir", d])
    run2 = run_prompts(args, [doc + q for q in qs[3:6]], ["--cache-dir", d])
    res = {
        "prompt_tokens": run1[0]["prompt_tokens"],
        "cold_ttft_ms": run1[0]["ttft_ms"],
        "warm_pool_ttft_ms": statistics.median([r["ttft_ms"] for r in run1[1:]] + [r["ttft_ms"] for r in run2[1:]]),
        "warm_disk_ttft_ms": run2[0]["ttft_ms"],
        "disk_cached_tokens": run2[0]["cached_tokens"],
        "pool_cached_tokens": run1[1]["cached_tokens"],
    }
    res["disk_vs_pool"] = res["warm_disk_ttft_ms"] / res["warm_pool_ttft_ms"]
    res["cold_vs_disk"] = res["cold_ttft_ms"] / res["warm_disk_ttft_ms"]
    return res


def bench_capacity(args, tmp):
    docs = [sized_text(args.pcache, args.model, args.prefix_tokens, seed=100 + i)[0] for i in range(args.docs)]
    rng = random.Random(5)
    order = [i for i in range(args.docs) for _ in range(args.rounds)]
    rng.shuffle(order)
    qs = questions(len(order))
    prompts = [docs[i] + qs[k] for k, i in enumerate(order)]
    kv_mem = int(args.pool_docs * (args.prefix_tokens + 64) * KV_TOKEN_BYTES)
    out = {"docs": args.docs, "rounds": args.rounds, "pool_docs": args.pool_docs, "kv_mem_bytes": kv_mem}
    for name, extra in (("pool_only", []), ("with_disk", ["--cache-dir", os.path.join(tmp, "cap")])):
        ttl = ["--cache-ttl", args.cache_ttl] if args.cache_ttl else []
        res = run_prompts(args, prompts, ["--kv-mem", str(kv_mem), *ttl, *extra])
        seen, later = set(), []
        for i, r in zip(order, res):
            if i in seen:
                later.append(r)
            seen.add(i)
        hits = sum(r["cached_tokens"] for r in later) / max(1, sum(r["prompt_tokens"] for r in later))
        ttft = [r["ttft_ms"] for r in later]
        out[name] = {"hit_rate_tokens": hits, "requests_hit": sum(r["cached_tokens"] > 0 for r in later) / max(1, len(later)),
                     "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99), "n": len(later)}
    out["p50_speedup"] = out["pool_only"]["ttft_p50_ms"] / out["with_disk"]["ttft_p50_ms"]
    return out


def bench_host(args, tmp):
    docs = [sized_text(args.pcache, args.model, args.prefix_tokens, seed=300 + i)[0] for i in range(args.host_docs)]
    qs = questions(2 * len(docs))
    prompts = [d + qs[k] for k, d in enumerate(docs)] + [d + qs[len(docs) + k] for k, d in enumerate(docs)]
    per_doc = (args.prefix_tokens + 64) * args.kv_token_bytes
    kv_mem = int(len(docs) / 2 * per_doc)
    host = int(len(docs) * per_doc * 1.5)
    out = {"docs": len(docs), "kv_mem_bytes": kv_mem, "host_bytes": host, "device": args.device}
    for name, extra in (("recompute", []), ("host_ram", ["--cache-host-mem", str(host)])):
        res = run_prompts(args, prompts, ["--device", args.device, "--kv-mem", str(kv_mem), *extra])
        first, second = res[:len(docs)], res[len(docs):]
        out[name] = {"ttft_ms": [r["ttft_ms"] for r in second], "cached_tokens": [r["cached_tokens"] for r in second],
                     "prompt_tokens": [r["prompt_tokens"] for r in second],
                     "ttft_p50_ms": statistics.median(r["ttft_ms"] for r in second),
                     "first_pass_p50_ms": statistics.median(r["ttft_ms"] for r in first)}
    out["speedup"] = out["recompute"]["ttft_p50_ms"] / out["host_ram"]["ttft_p50_ms"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pcache", default="build/pcache")
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefix-tokens", type=int, default=2000)
    ap.add_argument("--n-gen", type=int, default=2)
    ap.add_argument("--docs", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3, help="times each document is asked about")
    ap.add_argument("--pool-docs", type=float, default=10, help="documents the KV pool holds")
    ap.add_argument("--skip-capacity", action="store_true")
    ap.add_argument("--skip-restart", action="store_true")
    ap.add_argument("--cache-ttl", default="", help="capacity: the entries' TTL (pcache run --cache-ttl), e.g. 1h: "
                    "a slow CPU's cold prefills make the run outlast the 5-minute default")
    ap.add_argument("--host", action="store_true", help="only the host-RAM tier benchmark (GPU)")
    ap.add_argument("--host-docs", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kv-token-bytes", type=int, default=KV_TOKEN_BYTES, help="KV bytes a token (8B: 131072)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiers_results.json"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="pcache-bench-tiers-")
    try:
        res = {"date": time.strftime("%Y-%m-%d"), "machine": os.uname().nodename + f", {os.cpu_count()} cores",
               "args": vars(args)}
        if args.host:
            res["host"] = h = bench_host(args, tmp)
            for k in ("recompute", "host_ram"):
                v = h[k]
                print(f"| host {k} | second pass TTFT p50 {v['ttft_p50_ms']:.1f} ms | cached {v['cached_tokens']} of {v['prompt_tokens']} "
                      f"| first pass p50 {v['first_pass_p50_ms']:.1f} ms |")
            print(f"| host-RAM tier vs recomputing | {h['speedup']:.1f}x |")
        if not args.host and not args.skip_restart:
            res["restart"] = bench_restart(args, tmp)
            r = res["restart"]
            print(f"| restart ({r['prompt_tokens']} tokens) | cold {r['cold_ttft_ms']:.0f} ms | warm pool {r['warm_pool_ttft_ms']:.0f} ms "
                  f"| warm disk after restart {r['warm_disk_ttft_ms']:.0f} ms ({r['disk_cached_tokens']} cached) "
                  f"| disk/pool {r['disk_vs_pool']:.2f}x | cold/disk {r['cold_vs_disk']:.1f}x |")
        if not args.host and not args.skip_capacity:
            res["capacity"] = c = bench_capacity(args, tmp)
            for k in ("pool_only", "with_disk"):
                v = c[k]
                print(f"| capacity {k} | hit rate {100 * v['hit_rate_tokens']:.1f}% of tokens, {100 * v['requests_hit']:.0f}% of requests "
                      f"| TTFT p50 {v['ttft_p50_ms']:.0f} ms | p99 {v['ttft_p99_ms']:.0f} ms | n={v['n']} |")
            print(f"| capacity p50 speedup with disk | {c['p50_speedup']:.1f}x |")
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
