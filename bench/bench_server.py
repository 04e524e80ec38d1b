#!/usr/bin/env python3
"""Server benchmark: concurrent streaming load with a shared-prefix workload.

Workload: every request is a chat completion with the same ~1000-token system prompt (varied
English text) and a distinct short user question; max_tokens 32, temperature 0, "stream": true.
Python threads (http.client, no extra dependencies) keep C requests in flight for each
concurrency level C in --levels (default 1, 4, 16), levels run one after another on the same
server process (so the first level pays the cold prefill of the system prompt, later levels find
it cached when the cache is on).

Per request: TTFT = time to the first SSE chunk with content (or the final chunk if the model
stops at once); completion tokens from the usage chunk (stream_options.include_usage) when the
server sends one, else the number of content chunks; decode rate = (tokens - 1) / (last chunk -
first chunk).

Servers: pcache serve (cache on), pcache serve --no-cache, and llama.cpp's Python server
(python3 -m llama_cpp.server --cache true; it runs one request at a time).
Reports per server and level: requests/s, generated tokens/s (all tokens / wall time), TTFT
p50/p90/p99, per-stream decode tokens/s (median) and aggregate decode tokens/s (all decode tokens /
the time during which at least one stream was decoding: the union of the per-request spans from
first to last content chunk).
Writes bench/server_results.json (or --out). Noisy on a shared machine: take final figures on a
quiet one.
"""
import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cache import fmt, free_port, sized_text, stop, wait_http  # noqa: E402
from sse import sse_chunks  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

_ASK = ["What is {t}?", "Explain {t} in one sentence.", "Give one fact about {t}.",
        "Why does {t} matter?", "Name a common use of {t}.", "Who might care about {t}?"]
_T = ["photosynthesis", "a lighthouse", "prime numbers", "the water cycle", "a violin", "volcanoes",
      "honey bees", "railway signals", "a comet", "tides", "bread yeast", "a chess opening",
      "glaciers", "copper", "migratory birds", "a suspension bridge", "libraries", "weather vanes",
      "apple grafting", "fog", "the harbour", "mining tunnels", "choirs", "maps", "clocks",
      "rainbows", "wind turbines", "recycling", "the moon", "earthquakes", "coral reefs", "bicycles"]


def user_questions(n):
    qs = [_ASK[(i // len(_T) + i) % len(_ASK)].format(t=_T[i % len(_T)]) for i in range(n)]
    if len(set(qs)) != n:
        raise ValueError(f"only {len(set(qs))} distinct questions for {n} requests")
    return qs


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def one_request(port, system, question, max_tokens, include_usage, timeout, model="default"):
    body = {"model": model, "messages": [{"role": "system", "content": system},
                                           {"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    rec = {"ok": False, "ttft_ms": None, "tokens": 0, "cached_tokens": None, "chunks": 0}
    t0 = time.perf_counter()
    first = last = None
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("POST", "/v1/chat/completions", body=json.dumps(body),
                  headers={"Content-Type": "application/json"})
        resp = c.getresponse()
        if resp.status != 200:
            rec["error"] = f"HTTP {resp.status}: {resp.read()[:300]!r}"
            return rec
        usage = None
        for ch in sse_chunks(resp):
            if ch.get("usage"):
                usage = ch["usage"]
            choices = ch.get("choices") or []
            content = "".join((x.get("delta") or {}).get("content") or "" for x in choices)
            now = time.perf_counter()
            if content:
                rec["chunks"] += 1
                last = now
            if first is None and (content or any(x.get("finish_reason") for x in choices)):
                first = now
        c.close()
        rec["tokens"] = usage["completion_tokens"] if usage and "completion_tokens" in usage else rec["chunks"]
        if usage:
            rec["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            rec["prompt_tokens"] = usage.get("prompt_tokens")
        rec["ok"] = first is not None
    except Exception as e:  # a failed request is counted, not fatal
        rec["error"] = repr(e)
    end = time.perf_counter()
    rec["latency_ms"] = (end - t0) * 1000.0
    if first is not None:
        rec["ttft_ms"] = (first - t0) * 1000.0
        if last is not None and last > first and rec["tokens"] > 1:
            rec["decode_tps"] = (rec["tokens"] - 1) / (last - first)
            rec["decode_span"] = [first, last]
    return rec


def model_id(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/v1/models")
    data = json.loads(c.getresponse().read())
    c.close()
    return data["data"][0]["id"]


def run_level(port, system, questions, concurrency, max_tokens, include_usage, timeout, model):
    """Sends len(questions) requests with `concurrency` in flight; returns (records, wall s)."""
    lock = threading.Lock()
    todo = list(enumerate(questions))
    out = [None] * len(questions)

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i, q = todo.pop(0)
            out[i] = one_request(port, system, q, max_tokens, include_usage, timeout, model)

    t0 = time.perf_counter()
    ths = [threading.Thread(target=worker) for _ in range(min(concurrency, len(questions)))]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    return out, time.perf_counter() - t0


def summarize(recs, wall, concurrency):
    ok = [r for r in recs if r["ok"]]
    ttft = [r["ttft_ms"] for r in ok]
    tok = sum(r["tokens"] for r in ok)
    dec = [r for r in ok if r.get("decode_tps")]
    dec_tok = sum(r["tokens"] - 1 for r in dec)
    dec_s, end = 0.0, None                       # length of the union of the decode spans
    for a, b in sorted(r["decode_span"] for r in dec):
        if end is None or a > end:
            dec_s += b - a
            end = b
        elif b > end:
            dec_s += b - end
            end = b
    cached = [r["cached_tokens"] for r in ok if r.get("cached_tokens") is not None]
    return {
        "concurrency": concurrency, "requests": len(recs), "ok": len(ok), "wall_s": wall,
        "errors": sorted({r.get("error", "no first chunk") for r in recs if not r["ok"]})[:3],
        "req_per_s": len(ok) / wall if wall else None,
        "gen_tok_per_s": tok / wall if wall else None,
        "completion_tokens": tok,
        "ttft_p50_ms": pct(ttft, 50), "ttft_p90_ms": pct(ttft, 90), "ttft_p99_ms": pct(ttft, 99),
        "decode_tps_per_stream_median": statistics.median([r["decode_tps"] for r in dec]) if dec else None,
        # decode tokens / time during which at least one stream was decoding
        "decode_tps_aggregate": dec_tok / dec_s if dec_s else None,
        "cached_tokens_median": statistics.median(cached) if cached else None,
        "latency_p50_ms": pct([r["latency_ms"] for r in ok], 50),
    }


def start_pcache(args, no_cache):
    port = free_port()
    cmd = [args.pcache, "serve", "-m", args.model, "--host", "127.0.0.1", "--port", str(port),
           "-t", str(args.threads), "--kv-mem", args.kv_mem, "--parallel", str(args.parallel)]
    if no_cache:
        cmd.append("--no-cache")
    return cmd, port, f"http://127.0.0.1:{port}/health"


def start_llama(args):
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", args.model, "--n_threads", str(args.threads),
           "--n_threads_batch", str(args.threads), "--n_ctx", str(args.n_ctx), "--port", str(port),
           "--host", "127.0.0.1", "--cache", "true", "--verbose", "false",
           "--interrupt_requests", "false"]     # default true: a new request cancels the running one
    return cmd, port, f"http://127.0.0.1:{port}/v1/models"


def bench_server(name, spec, args, system, include_usage):
    cmd, port, health = spec
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    res = {"name": name, "cmd": cmd, "levels": []}
    try:
        try:
            wait_http(health, proc)
        except RuntimeError as e:
            log.seek(0)
            res["error"] = f"{e}: {log.read()[-1500:].decode('utf-8', 'replace')}"
            return res
        model = res["model"] = model_id(port)
        warm = one_request(port, "You are terse.", "Say hello.", 4, include_usage, args.timeout, model)
        if not warm["ok"]:
            res["error"] = f"warm-up request failed: {warm.get('error')}"
            return res
        qi = 0
        for c in args.levels:
            n = max(args.min_requests, args.requests_per_stream * c)
            qs = user_questions(qi + n)[qi:]
            qi += n
            print(f"  {name}: {n} requests at concurrency {c} ...", file=sys.stderr, flush=True)
            recs, wall = run_level(port, system, qs, c, args.max_tokens, include_usage, args.timeout, model)
            s = summarize(recs, wall, c)
            s["records"] = recs
            res["levels"].append(s)
            if proc.poll() is not None:
                res["error"] = f"server exited with code {proc.returncode} during level {c}"
                break
    finally:
        stop(proc)
        log.seek(0)
        res["log_tail"] = log.read()[-1500:].decode("utf-8", "replace")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pcache", default="build/pcache")
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16],
                    help="comma-separated concurrency levels")
    ap.add_argument("--requests-per-stream", type=int, default=2,
                    help="requests per level = max(min-requests, this x concurrency)")
    ap.add_argument("--min-requests", type=int, default=6)
    ap.add_argument("--kv-mem", default="512M")
    ap.add_argument("--parallel", type=int, default=64)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--servers", default="pcache,pcache-nocache,llama",
                    help="comma-separated subset of pcache,pcache-nocache,llama")
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    ap.add_argument("--out", default=os.path.join(HERE, "server_results.json"))
    args = ap.parse_args()
    if args.quick:
        args.system_tokens, args.max_tokens, args.levels = 300, 8, [1, 4]
        args.requests_per_stream, args.min_requests = 1, 3

    t_start = time.time()
    system, n_sys = sized_text(args.pcache, args.model, args.system_tokens, seed=7)
    load = os.getloadavg()
    print(f"workload: system prompt {n_sys} tokens, max_tokens {args.max_tokens}, levels {args.levels}, "
          f"{args.threads} threads; load average {load[0]:.2f}", file=sys.stderr)
    results = {"config": {k: v for k, v in vars(args).items() if k != "out"},
               "workload": {"system_tokens": n_sys}, "loadavg_start": load, "servers": []}
    servers = args.servers.split(",")
    for key in servers:
        if key == "pcache":
            r = bench_server("pcache (cache on)", start_pcache(args, False), args, system, True)
        elif key == "pcache-nocache":
            r = bench_server("pcache --no-cache", start_pcache(args, True), args, system, True)
        elif key == "llama":
            r = bench_server("llama.cpp server --cache true", start_llama(args), args, system, False)
        else:
            sys.exit(f"unknown server {key}")
        results["servers"].append(r)
    results["loadavg_end"] = os.getloadavg()
    results["wall_s"] = time.time() - t_start
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)

    print(f"\n### Server: {n_sys}-token shared system prompt, distinct questions, max_tokens "
          f"{args.max_tokens}, greedy, streaming ({args.threads} threads, load avg {load[0]:.1f})\n")
    print("| server | streams | requests | req/s | gen tok/s | TTFT p50 ms | p90 | p99 | decode tok/s/stream | aggregate decode tok/s | cached tokens (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["servers"]:
        if r.get("error") and not r["levels"]:
            print(f"| {r['name']} | error: {r['error'][:100]} | | | | | | | | | |")
            continue
        for s in r["levels"]:
            n = f"{s['ok']}/{s['requests']}" if s["ok"] != s["requests"] else str(s["requests"])
            ct = s["cached_tokens_median"]
            print(f"| {r['name']} | {s['concurrency']} | {n} | {fmt(s['req_per_s'], 2)} | {fmt(s['gen_tok_per_s'])} | "
                  f"{fmt(s['ttft_p50_ms'], 0)} | {fmt(s['ttft_p90_ms'], 0)} | {fmt(s['ttft_p99_ms'], 0)} | "
                  f"{fmt(s['decode_tps_per_stream_median'])} | {fmt(s['decode_tps_aggregate'])} | "
                  f"{'-' if ct is None else int(ct)} |")
        if r.get("error"):
            print(f"| {r['name']} | error: {r['error'][:100]} | | | | | | | | | |")
    for r in results["servers"]:
        for s in r["levels"]:
            if s["errors"]:
                print(f"\n{r['name']} at {s['concurrency']} streams: failed requests: {s['errors']}")
    print(f"\nwrote {args.out} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
