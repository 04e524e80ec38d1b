#!/usr/bin/env python3
"""Prompt-caching benchmark: one long shared prefix, many short distinct suffixes.

Workload: a ~2000-token prefix of varied English text (sized with `pcache tokenize`, so the
token count is the model's own) followed by 20 distinct ~30-token questions. Every request is a
raw completion prompt (no chat template), greedy, a few generated tokens.

Measured:
  pcache      `pcache run --prompts` in one process (the prompt cache shared across lines):
              cold TTFT (first request, nothing cached), warm TTFT (median of the later
              requests, which hit the prefix), cached_tokens per request; and the same prompts
              with --no-cache (median TTFT, every request a full prefill).
  llama.cpp   (a) llama_cpp.Llama in-process: it keeps the KV of its previous prompt and reuses
              the longest common prefix; TTFT = create_completion(max_tokens=1). Its no-cache
              baseline calls reset() before every prompt.
              (b) llama_cpp.server --cache true, streaming /v1/completions; TTFT = time to the
              first chunk with text.
  overhead    cost of the cache lookup + bookkeeping relative to one decode step: the prefix
              micro-benchmark printed by tests/c/test_prefix (if built), and decode tokens/s of
              `pcache run` with the cache on vs --no-cache.

Timings on a shared 2-core machine are noisy: take final figures on a quiet machine.
Writes bench/cache_results.json (or --out) and prints a markdown table.
"""
import argparse
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile

from sse import sse_chunks
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------- workload text

_SUBJECTS = ["The old lighthouse keeper", "A young botanist", "The city council", "Our river guide",
             "The museum curator", "A retired sea captain", "The village baker", "An amateur astronomer",
             "The chess club", "A travelling violinist", "The night nurse", "The orchard owner",
             "A team of geologists", "The bridge engineer", "The school librarian", "A quiet beekeeper",
             "The railway signalman", "The mountain rescue crew", "A stubborn goat", "The weather station"]
_VERBS = ["carefully recorded", "argued about", "quietly repaired", "photographed", "measured",
          "wrote a long letter about", "forgot to mention", "slowly restored", "sketched", "counted",
          "tested", "catalogued", "celebrated", "worried about", "rebuilt", "studied"]
_OBJECTS = ["the copper weather vane", "a map of the northern valleys", "the broken clock tower",
            "seventeen jars of honey", "the tides along the eastern shore", "a crate of winter apples",
            "the first frost of the year", "an unusual migratory bird", "the faded murals in the hall",
            "the price of lamp oil", "a forgotten mining tunnel", "the choir's autumn programme",
            "the wooden footbridge", "a comet visible before dawn", "the flooded meadow",
            "the orchard's grafted pear trees", "a box of letters from 1911", "the harbour's fishing fleet"]
_TAILS = ["before the storm arrived", "while the market was closing", "during the long dry summer",
          "because nobody else had the patience", "although the records were incomplete",
          "after the festival ended", "as the snow began to melt", "for the regional newspaper",
          "on a cold Tuesday morning", "with help from two neighbours", "despite the fog",
          "in the spring of that year", "to settle an old dispute", "using only a pencil and a ruler"]
_LINKS = ["Later, ", "Meanwhile, ", "Some weeks afterwards, ", "By contrast, ", "In the same season, ",
          "Not far away, ", "Nobody was surprised when ", "It is said that ", "According to the archive, "]


def english_text(n_sentences, seed=1):
    """Deterministic varied English prose: n_sentences sentences in paragraphs of ~6."""
    rng = random.Random(seed)
    out, para = [], []
    for i in range(n_sentences):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
        if i % 3 == 1:
            s = rng.choice(_LINKS) + s[0].lower() + s[1:]
        para.append(s)
        if len(para) == 6:
            out.append(" ".join(para))
            para = []
    if para:
        out.append(" ".join(para))
    return "\n\n".join(out)


_TOPICS = ["the lighthouse keeper", "the botanist", "the city council", "the river guide", "the curator",
           "the sea captain", "the baker", "the astronomer", "the chess club", "the violinist",
           "the night nurse", "the orchard owner", "the geologists", "the bridge engineer",
           "the librarian", "the beekeeper", "the signalman", "the rescue crew", "the goat",
           "the weather station", "the comet", "the flooded meadow", "the mining tunnel", "the harbour"]
_FORMS = ["According to the text above, what did {t} do, and why might it have mattered to the town?",
          "Summarize in one short sentence everything the passage says about {t} and its neighbours.",
          "Which season is mentioned most often together with {t}, and what happened during it?",
          "Write a short headline for a local newspaper story about {t}, based on the passage."]


def questions(n):
    """n distinct short questions (~25-35 tokens each)."""
    qs = []
    for i in range(n):
        t = _TOPICS[i % len(_TOPICS)]
        f = _FORMS[(i // len(_TOPICS) + i) % len(_FORMS)]
        q = f.format(t=t)
        if i >= len(_TOPICS) * len(_FORMS):   # past the 96 combinations: numbered variants
            q += f" Answer as note {i // (len(_TOPICS) * len(_FORMS)) + 1}."
        qs.append(q)
    assert len(set(qs)) == n, "question list too short for n"
    return qs


def tokenize(pcache, model, text):
    r = subprocess.run([pcache, "tokenize", "-m", model], input=text.encode(), capture_output=True,
                       check=True)
    return json.loads(r.stdout)


def sized_text(pcache, model, target_tokens, seed=1):
    """English text whose token count (as pcache tokenizes it) is as close to target as sentences
    and then words allow; returns (text, n_tokens)."""
    lo, hi = 1, 8
    while len(tokenize(pcache, model, english_text(hi, seed))) < target_tokens:
        lo, hi = hi, hi * 2
    while hi - lo > 1:                                   # largest sentence count not above target
        mid = (lo + hi) // 2
        if len(tokenize(pcache, model, english_text(mid, seed))) <= target_tokens:
            lo = mid
        else:
            hi = mid
    base = english_text(lo, seed)
    extra = english_text(lo + 1, seed)[len(base):].split(" ")
    best, best_n = base, len(tokenize(pcache, model, base))
    lo_w, hi_w = 0, len(extra)                           # then whole words of the next sentence
    while lo_w < hi_w:
        mid = (lo_w + hi_w + 1) // 2
        cand = base + " ".join(extra[:mid])
        n = len(tokenize(pcache, model, cand))
        if n <= target_tokens:
            lo_w, best, best_n = mid, cand, n
        else:
            hi_w = mid - 1
    return best, best_n


# ---------------------------------------------------------------- helpers

def median(xs):
    return statistics.median(xs) if xs else None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.3)
    raise RuntimeError(f"server at {url} not up after {timeout}s")


def stop(proc):
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


# ---------------------------------------------------------------- pcache

WARMUP = "Hello there. This short line only warms the process up."


def pcache_run(args, prompts, no_cache):
    """Runs prompts (preceded by a warm-up line, dropped) through `pcache run --prompts`."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for p in [WARMUP] + prompts:
            f.write(json.dumps(p) + "\n")
        path = f.name
    cmd = [args.pcache, "run", "-m", args.model, "--prompts", path, "--temp", "0", "-n", str(args.n_gen),
           "-t", str(args.threads)]
    if no_cache:
        cmd.append("--no-cache")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        os.unlink(path)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
    rows = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    if len(rows) != len(prompts) + 1:
        raise RuntimeError(f"expected {len(prompts) + 1} result lines, got {len(rows)}")
    rows.sort(key=lambda x: x["index"])
    return rows[1:], r.stderr.strip().splitlines()[-1:] if r.stderr.strip() else []


def bench_pcache(args, prompts):
    on, on_stats = pcache_run(args, prompts, no_cache=False)
    off, _ = pcache_run(args, prompts[:args.baseline_requests], no_cache=True)
    cold = on[0]["ttft_ms"]
    warm = [r["ttft_ms"] for r in on[1:]]
    res = {
        "prompt_tokens": [r["prompt_tokens"] for r in on],
        "cached_tokens": [r["cached_tokens"] for r in on],
        "ttft_ms_cache": [r["ttft_ms"] for r in on],
        "ttft_ms_no_cache": [r["ttft_ms"] for r in off],
        "cold_ttft_ms": cold,
        "no_cache_median_ttft_ms": median([r["ttft_ms"] for r in off]),
        "warm_median_ttft_ms": median(warm),
        "warm_over_cold": median(warm) / cold if warm else None,
        "warm_over_no_cache_median": median(warm) / median([r["ttft_ms"] for r in off]) if warm else None,
        "outputs_identical_cache_vs_no_cache": [a["text"] for a in on[:len(off)]] == [b["text"] for b in off],
        "texts": [r["text"] for r in on],
        "cache_stats": on_stats,
    }
    return res


def decode_tps(args, no_cache, prompt, n):
    cmd = [args.pcache, "run", "-m", args.model, "--temp", "0", "-n", str(n), "--ignore-eos",
           "-t", str(args.threads)] + (["--no-cache"] if no_cache else []) + [prompt]
    r = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"decode_tps=([0-9.]+)", r.stderr)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"{' '.join(cmd[:-1])} failed ({r.returncode}): {r.stderr[-1000:]}")
    return float(m.group(1))


def bench_overhead(args):
    """Cache lookup + bookkeeping vs one decode step."""
    res = {}
    tp = args.prefix_test or os.path.join(os.path.dirname(os.path.abspath(args.pcache)), "tests", "test_prefix")
    if os.path.exists(tp):
        r = subprocess.run([tp], capture_output=True, text=True, env=dict(os.environ, CK_FORK="no"))
        m = re.search(r"prefix_match of a (\d+)-token cached prompt \(\+ release\): ([0-9.]+) us; re-insert: ([0-9.]+) us",
                      r.stdout + r.stderr)
        if m:
            res["microbench"] = {"tokens": int(m.group(1)), "match_release_us": float(m.group(2)),
                                 "reinsert_us": float(m.group(3)), "source": tp}
    else:
        res["microbench"] = None
        res["microbench_note"] = f"{tp} not built (make BUILD=... BUILD/tests/test_prefix)"
    prompt = "Write a long story about a lighthouse keeper who counts the ships that pass."
    on, off = [], []
    for _ in range(args.decode_reps):                  # alternate to spread load changes evenly
        off.append(decode_tps(args, True, prompt, args.decode_tokens))
        on.append(decode_tps(args, False, prompt, args.decode_tokens))
    res["decode_tps_cache_on"] = on
    res["decode_tps_no_cache"] = off
    on_m, off_m = median(on), median(off)
    res["decode_step_ms_cache_on"] = 1000.0 / on_m
    res["decode_step_ms_no_cache"] = 1000.0 / off_m
    res["decode_tps_diff_pct"] = (off_m - on_m) / off_m * 100.0
    if res.get("microbench"):
        us = res["microbench"]["match_release_us"] + res["microbench"]["reinsert_us"]
        res["lookup_plus_insert_pct_of_decode_step"] = us / (1000.0 * res["decode_step_ms_no_cache"]) * 100.0
    return res


# ---------------------------------------------------------------- llama.cpp

def bench_llama_inprocess(args, prompts):
    import llama_cpp
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=args.n_ctx, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)

    def ttft(text):
        t0 = time.perf_counter()
        llm.create_completion(text, max_tokens=1, temperature=0.0)
        return (time.perf_counter() - t0) * 1000.0

    ttft(WARMUP)
    with_reuse = []
    llm.reset()
    for p in prompts:
        with_reuse.append(ttft(p))                     # keeps the previous prompt's KV
    fresh = []
    for p in prompts[:args.baseline_requests]:
        llm.reset()                                    # forget it: full prefill
        fresh.append(ttft(p))
    n_tok = [len(llm.tokenize(p.encode())) for p in prompts]
    del llm
    warm = with_reuse[1:]
    return {"prompt_tokens": n_tok, "ttft_ms_reuse": with_reuse, "ttft_ms_reset": fresh,
            "cold_ttft_ms": with_reuse[0], "no_cache_median_ttft_ms": median(fresh),
            "warm_median_ttft_ms": median(warm),
            "warm_over_cold": median(warm) / with_reuse[0] if warm else None,
            "llama_cpp_python": llama_cpp.__version__}


def stream_ttft(port, body, timeout=600):
    """POSTs a streaming request; returns (ms to first chunk with text, full text)."""
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = c.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    first, text = None, []
    for ch in sse_chunks(resp):
        choices = ch.get("choices") or []
        piece = "".join(x.get("text") or "" for x in choices)
        # the first chunk with text; or, if the model stops at once (EOS), the final chunk
        if first is None and (piece or any(x.get("finish_reason") for x in choices)):
            first = (time.perf_counter() - t0) * 1000.0
        text.append(piece)
    c.close()
    return first, "".join(text)


def bench_llama_server(args, prompts):
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", args.model, "--n_threads", str(args.threads),
           "--n_threads_batch", str(args.threads), "--n_ctx", str(args.n_ctx), "--port", str(port),
           "--host", "127.0.0.1", "--cache", "true", "--verbose", "false"]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/v1/models", proc)
        except RuntimeError as e:
            log.seek(0)
            raise RuntimeError(f"{e}: {log.read()[-1500:].decode('utf-8', 'replace')}")
        body = lambda p: {"prompt": p, "max_tokens": args.n_gen, "temperature": 0, "stream": True}
        stream_ttft(port, body(WARMUP))
        ttfts = [stream_ttft(port, body(p))[0] for p in prompts]
    finally:
        stop(proc)
    warm = [t for t in ttfts[1:] if t is not None]
    return {"ttft_ms": ttfts, "cold_ttft_ms": ttfts[0], "warm_median_ttft_ms": median(warm),
            "warm_over_cold": median(warm) / ttfts[0] if warm and ttfts[0] else None}


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pcache", default="build/pcache")
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefix-tokens", type=int, default=2000)
    ap.add_argument("--requests", type=int, default=20, help="distinct suffixes (requests)")
    ap.add_argument("--baseline-requests", type=int, default=None,
                    help="how many of the prompts to run without cache (default: all)")
    ap.add_argument("--n-gen", type=int, default=4, help="tokens generated per request")
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-reps", type=int, default=3)
    ap.add_argument("--prefix-test", default=None, help="test_prefix binary (default BUILD/tests/test_prefix)")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--skip-llama-server", action="store_true")
    ap.add_argument("--quick", action="store_true", help="short smoke run (small prefix, 5 requests)")
    ap.add_argument("--out", default=os.path.join(HERE, "cache_results.json"))
    args = ap.parse_args()
    if args.quick:
        args.prefix_tokens, args.requests, args.decode_tokens, args.decode_reps = 300, 5, 16, 1

    if args.baseline_requests is None or args.baseline_requests > args.requests:
        args.baseline_requests = args.requests
    t_start = time.time()
    prefix, n_prefix = sized_text(args.pcache, args.model, args.prefix_tokens)
    prefix += "\n\nQuestion:"
    suffixes = [" " + q + "\nAnswer: The" for q in questions(args.requests)]
    prompts = [prefix + s for s in suffixes]
    suffix_tokens = [len(tokenize(args.pcache, args.model, s)) for s in suffixes]
    load = os.getloadavg()
    print(f"workload: prefix {n_prefix} tokens (+ 'Question:'), {args.requests} suffixes of "
          f"{min(suffix_tokens)}-{max(suffix_tokens)} tokens, {args.n_gen} generated, {args.threads} threads; "
          f"load average {load[0]:.2f}", file=sys.stderr)

    results = {"config": {k: v for k, v in vars(args).items() if k != "out"},
               "workload": {"prefix_tokens": n_prefix, "suffix_tokens": suffix_tokens},
               "loadavg_start": load}
    print("pcache (cache on / --no-cache) ...", file=sys.stderr)
    results["pcache"] = bench_pcache(args, prompts)
    print("pcache decode overhead ...", file=sys.stderr)
    results["overhead"] = bench_overhead(args)
    if not args.skip_llama:
        print("llama.cpp in-process ...", file=sys.stderr)
        try:
            results["llama_inprocess"] = bench_llama_inprocess(args, prompts)
        except Exception as e:  # report, keep the rest
            results["llama_inprocess"] = {"error": repr(e)}
        if not args.skip_llama_server:
            print("llama.cpp server --cache true ...", file=sys.stderr)
            try:
                results["llama_server"] = bench_llama_server(args, prompts)
            except Exception as e:
                results["llama_server"] = {"error": repr(e)}
    results["loadavg_end"] = os.getloadavg()
    results["wall_s"] = time.time() - t_start
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)

    p = results["pcache"]
    print(f"\n### Prompt caching: {n_prefix}-token shared prefix, {args.requests} distinct suffixes "
          f"(prompt {min(p['prompt_tokens'])}-{max(p['prompt_tokens'])} tokens, {args.threads} threads, "
          f"load avg {load[0]:.1f})\n")
    print(f"| engine | cold TTFT ms (1st req) | no-cache median TTFT ms (n={args.baseline_requests}) | warm median TTFT ms | warm/cold | cached tokens (warm reqs) |")
    print("|---|---:|---:|---:|---:|---|")
    ct = p["cached_tokens"]
    print(f"| pcache | {fmt(p['cold_ttft_ms'])} | {fmt(p['no_cache_median_ttft_ms'])} | {fmt(p['warm_median_ttft_ms'])} | "
          f"{fmt(p['warm_over_cold'], 4)} (1/{fmt(1 / p['warm_over_cold'], 0) if p['warm_over_cold'] else '-'}) | "
          f"first {ct[0]}, then {min(ct[1:]) if len(ct) > 1 else '-'}-{max(ct[1:]) if len(ct) > 1 else '-'} |")
    for key, name in (("llama_inprocess", "llama.cpp Llama (in-process prefix reuse)"),
                      ("llama_server", "llama.cpp server --cache true (stream)")):
        r = results.get(key)
        if not r:
            continue
        if "error" in r:
            print(f"| {name} | error: {r['error'][:80]} | | | | |")
            continue
        w = r.get("warm_over_cold")
        print(f"| {name} | {fmt(r['cold_ttft_ms'])} | {fmt(r.get('no_cache_median_ttft_ms'))} | "
              f"{fmt(r['warm_median_ttft_ms'])} | {fmt(w, 4)} (1/{fmt(1 / w, 0) if w else '-'}) | n/a |")
    print(f"\npcache target warm/cold <= 1/20: {'MET' if p['warm_over_cold'] and p['warm_over_cold'] <= 0.05 else 'NOT met'}; "
          f"outputs identical with cache on/off: {p['outputs_identical_cache_vs_no_cache']}; cache stats: {' '.join(p['cache_stats'])}")
    o = results["overhead"]
    print("\n### Cache bookkeeping vs a decode step\n")
    print("| measure | value |")
    print("|---|---:|")
    if o.get("microbench"):
        mb = o["microbench"]
        print(f"| prefix_match + release, {mb['tokens']}-token cached prompt (test_prefix) | {mb['match_release_us']:.2f} us |")
        print(f"| prefix re-insert (refresh) | {mb['reinsert_us']:.2f} us |")
        print(f"| lookup + insert as % of one decode step | {o['lookup_plus_insert_pct_of_decode_step']:.4f} % |")
    else:
        print(f"| micro-benchmark | {o.get('microbench_note', 'not found in test output')} |")
    print(f"| decode step, --no-cache (median of {len(o['decode_tps_no_cache'])}) | {o['decode_step_ms_no_cache']:.2f} ms ({median(o['decode_tps_no_cache']):.1f} tok/s) |")
    print(f"| decode step, cache on | {o['decode_step_ms_cache_on']:.2f} ms ({median(o['decode_tps_cache_on']):.1f} tok/s) |")
    print(f"| decode tok/s lost with cache on (noise-dominated) | {o['decode_tps_diff_pct']:+.1f} % |")
    print(f"\nwrote {args.out} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
