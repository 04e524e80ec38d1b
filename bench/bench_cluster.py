#!/usr/bin/env python3
"""Cluster benchmark (issue 14): `pcache route` over N `pcache serve` replicas and a redis-server.

For each routing policy (--policy of `pcache route`: cache, round-robin, least-loaded), a fresh
cluster (Redis, replicas with empty caches, a router) runs:

  (a) resend   N distinct new chat prompts, each sent twice, the second right after the first
               answer: the share of second sends served from cache (cached_tokens >= prompt - 1,
               all but the token whose logits are computed), and the share of their tokens
               served from any cache (a replica without the prompt may still fetch its full
               blocks from the shared tier). OpenAI's figure for the same experiment is about
               50%; Anthropic's, asked to cache, 100%.
  (b) sessions S multi-turn conversations of T turns (each its own system text; every turn
               appends the model's answer and a new question), C conversations at a time; then
      shared   Q distinct questions under one long shared system prompt, C at a time.
               For both: the prompt-cache hit rate (cached / prompt tokens over all requests)
               and TTFT p50 / p99 (streamed, to the first content token), and how many
               requests each replica served.

  (c) pull    (--parts c; no router) a replica that does not hold a long prefix pulling it from
               Redis's shared tier, against computing it: Redis and two replicas with --redis.
               Each round uses a fresh namespace (a new cache_salt), so neither replica holds
               the prefix: one computes the --pull-tokens prompt (TTFT of computing; it writes
               the blocks through to Redis), then the other, cold for that namespace, is sent
               the same prompt and loads the prefix from Redis (TTFT of pulling; its cached
               tokens and the bytes read are recorded). The replicas swap roles every round.
               Medians over --pull-rounds; TTFT is the client's, to the first streamed token.

--replica-redis off keeps the replicas out of Redis (no events, no shared KV tier) to measure
routing alone. Timings on this project's shared 2-core machine are noisy and every replica shares its two
cores: compare the policies with one another, not with a real deployment. Writes
bench/cluster_results.json (or --out; the parts not run keep their figures there) and prints a
markdown table.
"""
import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cache import english_text, free_port, questions, stop, wait_http  # noqa: E402
from sse import sse_chunks  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "py"))
import requests  # noqa: E402
from bench_cache import tokenize  # noqa: E402
from redis_fixture import RedisServer  # noqa: E402

POLICIES = ["cache", "round-robin", "least-loaded"]


# ---------------------------------------------------------------- cluster
class Cluster:
    """redis-server + N replicas + a router with one policy; fresh caches."""

    def __init__(self, args, policy, tmp):
        self.args, self.procs, self.tmp = args, [], tmp
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}"
        self.procs.append(subprocess.Popen([args.redis, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                                            "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL))
        serve_help = subprocess.run([args.pcache, "serve", "--help"], capture_output=True, text=True).stdout
        # replicas in Redis (the replica side of issue 14, when built in): KV events and the
        # shared KV tier; without, the router routes by its own predictions and affinity
        self.replica_events = "--redis" in serve_help and args.replica_redis == "on"
        self.replicas = []
        for i in range(args.replicas):
            port = free_port()
            cmd = [args.pcache, "serve", "-m", args.model, "--port", str(port), "-t", str(args.threads), "--kv-mem", args.kv_mem]
            if self.replica_events:
                cmd += ["--redis", self.redis_url]
            log = open(os.path.join(tmp, f"replica{i}.log"), "w")
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
            self.replicas.append(f"http://127.0.0.1:{port}")
        for i, url in enumerate(self.replicas):
            wait_http(url + "/health", self.procs[1 + i])
        self.port = free_port()
        cmd = [args.pcache, "route", "-m", args.model, "--port", str(self.port), "--policy", policy, "--redis", self.redis_url]
        for url in self.replicas:
            cmd += ["--replica", url]
        log = open(os.path.join(tmp, f"router-{policy}.log"), "w")
        self.router = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(self.router)
        wait_http(f"http://127.0.0.1:{self.port}/health", self.router)

    def metrics(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def per_replica(self, name):
        pat = re.compile(name + r'\{replica="([^"]+)"\}')
        return {pat.match(k).group(1): int(v) for k, v in self.metrics().items() if pat.match(k)}

    def close(self):
        for p in reversed(self.procs):
            stop(p)


def chat_stream(port, messages, max_tokens):
    """One streamed chat completion through the router: (ttft ms, text, prompt_tokens, cached)."""
    body = {"model": "x", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = c.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    ttft, text, usage = None, [], None
    for ch in sse_chunks(resp):
        for x in ch.get("choices") or []:
            piece = (x.get("delta") or {}).get("content") or ""
            if ttft is None and (piece or x.get("finish_reason")):
                ttft = (time.perf_counter() - t0) * 1000.0
            text.append(piece)
        if ch.get("usage"):
            usage = ch["usage"]
    c.close()
    return ttft, "".join(text), usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None


def summarize(rows):
    prompt = sum(r["prompt"] for r in rows)
    cached = sum(r["cached"] for r in rows)
    ttft = [r["ttft"] for r in rows]
    return {"requests": len(rows), "prompt_tokens": prompt, "cached_tokens": cached,
            "hit_rate": cached / prompt if prompt else 0.0, "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99)}


def run_parallel(jobs, concurrency):
    """Runs callables, `concurrency` at a time; returns the first exception, if any, raised."""
    errors, lock, it = [], threading.Lock(), iter(jobs)

    def worker():
        while True:
            with lock:
                job = next(it, None)
            if job is None:
                return
            try:
                job()
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    ts = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


# ---------------------------------------------------------------- workloads
def part_a(cl, args):
    """Each new prompt sent twice in a row; the second is a hit if all but its last token came
    from the cache."""
    full, rows = 0, []
    for i in range(args.resend):
        msgs = [{"role": "user", "content": f"Request {i}. " + english_text(5, seed=500 + i) + " Summarize this."}]
        chat_stream(cl.port, msgs, args.max_tokens)
        ttft, _, p, c = chat_stream(cl.port, msgs, args.max_tokens)
        full += c >= p - 1
        rows.append({"ttft": ttft, "prompt": p, "cached": c})
    return {"prompts": args.resend, "second_send_full_hits": full, "resend_hit_rate": full / args.resend,
            "second_send": summarize(rows)}   # second_send.hit_rate: their tokens from any cache


def part_b_sessions(cl, args):
    rows, lock = [], threading.Lock()
    qs = questions(args.turns * 3)

    def session(s):
        msgs = [{"role": "system", "content": f"You are assistant number {s}. " + english_text(4, seed=1000 + s)}]
        for t in range(args.turns):
            msgs.append({"role": "user", "content": qs[(s + t) % len(qs)] + f" (turn {t + 1})"})
            ttft, text, p, c = chat_stream(cl.port, msgs, args.max_tokens)
            msgs.append({"role": "assistant", "content": text})
            with lock:
                rows.append({"ttft": ttft, "prompt": p, "cached": c, "turn": t})

    before = cl.per_replica("pcache_router_replica_requests_total")
    t0 = time.time()
    run_parallel([lambda s=s: session(s) for s in range(args.sessions)], args.concurrency)
    wall = time.time() - t0
    after = cl.per_replica("pcache_router_replica_requests_total")
    res = summarize(rows)
    res["after_first_turn"] = summarize([r for r in rows if r["turn"] > 0])
    res["wall_s"] = wall
    res["per_replica"] = sorted(after[u] - before.get(u, 0) for u in after)
    return res


def part_b_shared(cl, args):
    rows, lock = [], threading.Lock()
    system = "You answer questions about the following chronicle.\n\n" + english_text(args.shared_sentences, seed=77)
    qs = questions(args.shared_questions)

    def ask(i):
        ttft, _, p, c = chat_stream(cl.port, [{"role": "system", "content": system}, {"role": "user", "content": qs[i]}],
                                    args.max_tokens)
        with lock:
            rows.append({"ttft": ttft, "prompt": p, "cached": c})

    before = cl.per_replica("pcache_router_replica_requests_total")
    t0 = time.time()
    run_parallel([lambda i=i: ask(i) for i in range(args.shared_questions)], args.concurrency)
    wall = time.time() - t0
    after = cl.per_replica("pcache_router_replica_requests_total")
    res = summarize(rows)
    res["wall_s"] = wall
    res["per_replica"] = sorted(after[u] - before.get(u, 0) for u in after)
    return res


# ---------------------------------------------------------------- main
# ---------------------------------------------------------------- (c) pull
class Replica:
    def __init__(self, args, redis_url, log_dir, name):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(log_dir, f"{name}.log"), "w")
        cmd = [args.pcache, "serve", "-m", args.model, "--port", str(self.port), "-t", str(args.pull_threads),
               "--kv-mem", args.kv_mem, "--redis", redis_url]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(self.base + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                sys.exit(f"replica {name} did not start: {open(self.log.name).read()[-2000:]}")
            time.sleep(0.2)

    def metrics(self):
        out = {}
        for line in requests.get(self.base + "/metrics", timeout=10).text.splitlines():
            m = re.match(r"^(pcache_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def ttft(self, ids, salt):
        """Streams a 1-token completion; returns (seconds to the first token, cached tokens)."""
        t0 = time.perf_counter()
        first = None
        cached = None
        with requests.post(self.base + "/v1/completions", stream=True, timeout=600,
                           json={"prompt": ids, "max_tokens": 2, "temperature": 0, "stream": True,
                                 "stream_options": {"include_usage": True}, "cache_salt": salt}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                if first is None:
                    first = time.perf_counter() - t0
                j = json.loads(line[6:])
                if j.get("usage"):
                    cached = (j["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return first, cached

    def wait_written(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = self.metrics()
            if m.get("pcache_redis_write_queue", 1) == 0:
                return
            time.sleep(0.05)
        sys.exit("the write-through did not finish")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def part_c(args):
    ids = tokenize(args.pcache, args.model, english_text(400, seed=21))
    assert len(ids) > args.pull_tokens, "text too short"
    ids = ids[:args.pull_tokens + 1]   # the prefix, plus the last token that is always computed
    red = RedisServer().start()
    tmp = tempfile.mkdtemp(prefix="pcache-bench-cluster-")
    reps = [Replica(args, red.url, tmp, "a"), Replica(args, red.url, tmp, "b")]
    try:
        # warm-up (code paths, the prefill and Redis estimates), not timed
        for i, r in enumerate(reps):
            r.ttft(ids, f"warmup-{i}")
            r.wait_written()
        compute, pull, cached = [], [], []
        bytes_read = []
        for rnd in range(args.pull_rounds):
            salt = f"round-{rnd}-{time.time()}"
            comp, puller = (reps[0], reps[1]) if rnd % 2 == 0 else (reps[1], reps[0])
            t, c = comp.ttft(ids, salt)
            assert c == 0, f"the computing replica had {c} cached tokens"
            compute.append(t)
            comp.wait_written()
            before = puller.metrics()
            t, c = puller.ttft(ids, salt)
            after = puller.metrics()
            pull.append(t)
            cached.append(c)
            bytes_read.append(after["pcache_redis_bytes_read_total"] - before["pcache_redis_bytes_read_total"])
            print(f"round {rnd}: compute {compute[-1] * 1e3:.0f} ms, pull {pull[-1] * 1e3:.0f} ms "
                  f"({c} cached tokens, {bytes_read[-1] / 1e6:.1f} MB)", file=sys.stderr)
        m = reps[0].metrics()
        res = {
            "prompt_tokens": len(ids),
            "rounds": args.pull_rounds,
            "compute_ttft_ms_median": 1e3 * statistics.median(compute),
            "pull_ttft_ms_median": 1e3 * statistics.median(pull),
            "compute_ttft_ms": [round(1e3 * x, 1) for x in compute],
            "pull_ttft_ms": [round(1e3 * x, 1) for x in pull],
            "pulled_cached_tokens_median": statistics.median(cached),
            "pulled_mb_median": statistics.median(bytes_read) / 1e6,
            "redis_block_s_estimate": m.get("pcache_redis_block_seconds"),
            "redis_rtt_s_estimate": m.get("pcache_redis_rtt_seconds"),
            "prefill_s_per_token_estimate": m.get("pcache_prefill_seconds_per_token"),
            "threads": args.pull_threads,
            "loadavg_1m": os.getloadavg()[0],
        }
        res["speedup"] = res["compute_ttft_ms_median"] / res["pull_ttft_ms_median"]
        res["pull_gb_per_s"] = res["pulled_mb_median"] / 1e3 / (res["pull_ttft_ms_median"] / 1e3)
        return res
    finally:
        for r in reps:
            r.stop()
        red.close()


def table_c(r):
    return "\n".join([
        f"| {r['prompt_tokens']}-token prompt, median of {r['rounds']} | TTFT |",
        "| --- | --- |",
        f"| computed (no replica holds it) | {r['compute_ttft_ms_median']:.0f} ms |",
        f"| pulled from Redis ({r['pulled_cached_tokens_median']:.0f} tokens, {r['pulled_mb_median']:.1f} MB) | "
        f"{r['pull_ttft_ms_median']:.0f} ms ({r['speedup']:.1f}x faster) |",
    ])


def fmt(x, nd=0):
    return "-" if x is None else f"{x:.{nd}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pcache", default="build/pcache")
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--redis", default=shutil.which("redis-server") or "redis-server")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="compute threads per replica")
    ap.add_argument("--kv-mem", default="256M", help="KV pool per replica")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--replica-redis", choices=["on", "off"], default="on",
                    help="replicas join Redis (events and the shared KV tier) when they support it")
    ap.add_argument("--parts", default="a,b", help="a: resends; b: sessions and shared system prompt; c: pull a prefix from Redis")
    ap.add_argument("--resend", type=int, default=24, help="(a) distinct prompts, each sent twice")
    ap.add_argument("--sessions", type=int, default=32)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--shared-questions", type=int, default=48)
    ap.add_argument("--shared-sentences", type=int, default=24, help="length of the shared system prompt")
    ap.add_argument("--concurrency", type=int, default=8, help="conversations / requests in flight at once")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    ap.add_argument("--pull-tokens", type=int, default=2000, help="(c) the prefix's length")
    ap.add_argument("--pull-rounds", type=int, default=5)
    ap.add_argument("--pull-threads", type=int, default=2, help="(c) compute threads per replica")
    ap.add_argument("--out", default="bench/cluster_results.json")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    try:
        with open(args.out) as f:
            saved = json.load(f)   # the figures of the parts not run now stay
    except (OSError, ValueError):
        saved = {}
    if "c" in parts:
        saved["pull"] = part_c(args)
        print(table_c(saved["pull"]))
        with open(args.out, "w") as f:
            json.dump(saved, f, indent=2)
            f.write("\n")
    if not parts & {"a", "b"}:
        return
    results = {"config": {k: v for k, v in vars(args).items() if k not in ("out",)}, "policies": {}}
    if "pull" in saved:
        results["pull"] = saved["pull"]
    for policy in args.policies.split(","):
        tmp = tempfile.mkdtemp(prefix=f"bench-cluster-{policy}-")
        cl = Cluster(args, policy, tmp)
        results["config"]["replica_events"] = cl.replica_events
        try:
            r = {}
            if "a" in parts:
                r["resend"] = part_a(cl, args)
                print(f"{policy}: resend hit rate {r['resend']['resend_hit_rate']:.0%} "
                      f"(tokens {r['resend']['second_send']['hit_rate']:.0%})", flush=True)
            if "b" in parts:
                r["sessions"] = part_b_sessions(cl, args)
                print(f"{policy}: sessions {json.dumps(r['sessions'])}", flush=True)
                r["shared"] = part_b_shared(cl, args)
                print(f"{policy}: shared {json.dumps(r['shared'])}", flush=True)
            m = cl.metrics()
            r["router"] = {k: v for k, v in m.items() if k.startswith(("pcache_router_decisions_total", "pcache_router_retries"))}
            results["policies"][policy] = r
        finally:
            cl.close()
            shutil.rmtree(tmp, ignore_errors=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print()
    print("| policy | (a) resend hit rate | sessions: hit rate | TTFT p50 / p99 ms | per replica | shared prompt: hit rate | TTFT p50 / p99 ms | per replica |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for policy, r in results["policies"].items():
        a = f"{r['resend']['resend_hit_rate']:.0%} ({r['resend']['second_send']['hit_rate']:.0%} of tokens)" if "resend" in r else "-"
        s, sh = r.get("sessions"), r.get("shared")
        cols = [a]
        for x in (s, sh):
            cols += [f"{x['hit_rate']:.1%}", f"{fmt(x['ttft_p50_ms'])} / {fmt(x['ttft_p99_ms'])}", "/".join(map(str, x["per_replica"]))]\
                if x else ["-", "-", "-"]
        print(f"| {policy} | " + " | ".join(cols) + " |")


if __name__ == "__main__":
    main()
