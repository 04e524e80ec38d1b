#!/usr/bin/env python3
"""Soak test for `pcache serve`: many concurrent clients, a KV pool smaller than the working set.

Starts `pcache serve` itself on 127.0.0.1 (a free port), with --kv-mem about a quarter of the
workload's KV working set (see below), -t THREADS and --max-queue N (dropped if this build of the
server does not know the flag), then runs --clients threads (default 64) for --duration seconds
(default 600). Each client loops over requests:
  - prompt 50-3000 tokens: --shared-frac of them (default 0.7) are one of --docs long shared
    documents (sized 25%..93% of --max-prompt-tokens with `pcache tokenize`) followed by a distinct
    question; the others are distinct texts (log-uniform length, a unique nonce first);
  - endpoint: OpenAI chat, OpenAI completions, Anthropic messages (a third each; half of the
    Anthropic shared-document requests mark the document with cache_control);
  - streamed or not (about half), max_tokens 8-32, temperature 0 or 0.8;
  - --disconnect-frac of all requests (default 0.1) are streamed and close the socket right
    after the first content chunk.
Requests use raw http.client (a fresh connection each), so disconnects and truncation are seen
as they are. Per request: status, outcome, TTFT (streams: first content chunk; non-streamed:
the whole response, the client cannot see earlier), prompt / cached / completion tokens.

Outcomes: ok (complete answer: non-streamed = valid JSON with choices or content and usage;
streamed = ended with [DONE] (OpenAI) or message_stop (Anthropic)); http_error (a status other
than 200, with its body); stream_error (an error event inside a 200 stream: the server's 500 sent
after the headers); disconnected (ours, on purpose); lost (no status, connection error, timeout,
truncated or invalid body, a stream without its terminator).

Every --sample-interval seconds (default 10): the server's VmRSS and /metrics (all plain gauges
and counters; pcache_kv_blocks_used, pcache_queue_depth and pcache_preemptions_total when
present). Clients stop starting requests at --duration; requests in flight then have
--drain-timeout seconds (default 120) to finish; those still running are closed and counted as
"cut" (not lost: we closed them; but any cut request fails the run, see the checks). A request that takes longer than --request-timeout (300 s) before
that is lost. Then it waits for the server to be idle (no active requests or sequences, an empty
queue), samples again, stops the server and checks:
  - no 5xx statuses and no in-stream error events;
  - no lost requests;
  - no request cut: every request finished (or failed) within --drain-timeout after the end;
  - every non-200 status is 429 (queue full);
  - RSS flat after warm-up (the first third of the run, or longer: up to the first sample at
    which the KV pool was >= 95% used once, since the pool's pages become resident only when
    first used): the last sample under load and the idle sample are at most --rss-tolerance (5%)
    above the sample at the end of warm-up (a drop is not a failure);
  - the server became idle within --idle-timeout, and did not exit before we stopped it
    (and exited 0 on SIGTERM);
  - KV blocks in use when idle == blocks held by the prefix cache, when /metrics exposes the
    cache's block count (a metric named like *cache*block*); otherwise reported, not checked.
Prints a report, writes a JSON summary (--out, default bench/soak_results.json), exits 0 on
PASS and 1 on FAIL (also when interrupted).

KV working set (the default --kv-mem): KV bytes per token from the GGUF (n_layer * 2 *
n_kv_heads * head_dim * 2 bytes, fp16; SmolLM2-135M: 30*2*3*64*2 = 23040) times the tokens that
would be resident if every client's request were in the pool at once: the shared documents once,
plus per client the expected tokens of its own (the question for a shared-document request, the
whole prompt for a distinct one, plus max_tokens). --kv-fraction (0.25) of that, in MiB.
"""
import argparse
import http.client
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_cache import english_text, free_port, sized_text, tokenize  # noqa: E402
from bench_server import pct  # noqa: E402

ENDPOINTS = ("chat", "completions", "messages")
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "messages": "/v1/messages"}

_FORMS = ["According to the document, what did {t} do, and why might it have mattered to the town?",
          "Summarize in one short sentence everything the document says about {t}.",
          "Which season is mentioned together with {t}, and what happened then?",
          "Write a short headline about {t}, based on the document.",
          "List two facts about {t} that the document gives.",
          "Is {t} mentioned before or after the festival in the document?"]
_TOPICS = ["the lighthouse keeper", "the botanist", "the city council", "the river guide", "the curator",
           "the sea captain", "the baker", "the astronomer", "the chess club", "the violinist",
           "the night nurse", "the orchard owner", "the geologists", "the bridge engineer",
           "the librarian", "the beekeeper", "the signalman", "the rescue crew", "the goat",
           "the weather station", "the comet", "the flooded meadow", "the mining tunnel", "the harbour"]


def fmt(x, nd=0):
    return "-" if x is None else f"{x:.{nd}f}"


# ------------------------------------------------------------------------------ model / sizing

def kv_bytes_per_token(model):
    """n_layer * 2 (K and V) * n_kv_heads * head_dim * 2 bytes (fp16 KV), from the GGUF."""
    import gguf
    r = gguf.GGUFReader(model)

    def get(key):
        f = r.fields.get(key)
        if f is None:
            return None
        v = f.parts[f.data[0]]
        if f.types and f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(v).decode()
        return v.tolist()[0]

    arch = get("general.architecture")
    n_layer = get(f"{arch}.block_count")
    n_head = get(f"{arch}.attention.head_count")
    n_kv = get(f"{arch}.attention.head_count_kv") or n_head
    head_dim = get(f"{arch}.attention.key_length") or get(f"{arch}.embedding_length") // n_head
    return {"arch": arch, "n_layer": n_layer, "n_kv_heads": n_kv, "head_dim": head_dim,
            "bytes_per_token": n_layer * 2 * n_kv * head_dim * 2,
            "context_length": get(f"{arch}.context_length")}


class Workload:
    """Shared documents, a corpus for distinct prompts, and the request generator."""

    def __init__(self, args):
        self.args = args
        lo, hi = 0.25 * args.max_prompt_tokens, 0.93 * args.max_prompt_tokens
        self.docs, self.doc_tokens = [], []
        for d in range(args.docs):
            target = int(lo + (hi - lo) * d / max(1, args.docs - 1))
            text, n = sized_text(args.pcache, args.model, target, seed=101 + d)
            self.docs.append(text)
            self.doc_tokens.append(n)
        self.corpus = english_text(600, seed=977)
        n = len(tokenize(args.pcache, args.model, self.corpus))
        self.chars_per_token = len(self.corpus) / n
        self.counter = 0
        self.lock = threading.Lock()

    def nonce(self, rng):
        with self.lock:
            self.counter += 1
            c = self.counter
        return f"{c}-{rng.getrandbits(32):08x}"

    def spec(self, rng):
        """One request's shape (no text yet): cheap, also used to size the working set."""
        a = self.args
        s = {"endpoint": rng.choice(ENDPOINTS), "max_tokens": rng.randint(a.min_gen, a.max_gen),
             "temperature": rng.choice([0.0, 0.8])}
        s["disconnect"] = rng.random() < a.disconnect_frac
        p_stream = (a.stream_frac - a.disconnect_frac) / (1 - a.disconnect_frac) if a.disconnect_frac < 1 else 1
        s["stream"] = s["disconnect"] or rng.random() < max(0.0, p_stream)
        if rng.random() < a.shared_frac:
            s["doc"] = rng.randrange(len(self.docs))
            s["est_tokens"] = self.doc_tokens[s["doc"]] + 40
            s["own_tokens"] = 40
        else:
            s["doc"] = None
            lo, hi = math.log(a.min_prompt_tokens), math.log(a.max_prompt_tokens)
            s["est_tokens"] = int(math.exp(rng.uniform(lo, hi)))
            s["own_tokens"] = s["est_tokens"]
        s["anthropic_cache_control"] = s["endpoint"] == "messages" and s["doc"] is not None and rng.random() < 0.5
        return s

    def working_set_tokens(self):
        rng = random.Random(12345)
        specs = [self.spec(rng) for _ in range(20000)]
        own = sum(s["own_tokens"] + s["max_tokens"] for s in specs) / len(specs)
        return sum(self.doc_tokens) + self.args.clients * own, own

    def body(self, s, rng):
        """The request body for spec s (with its own distinct text)."""
        tag = self.nonce(rng)
        if s["doc"] is not None:
            doc = self.docs[s["doc"]]
            q = rng.choice(_FORMS).format(t=rng.choice(_TOPICS)) + f" (ticket {tag})"
        else:
            n_chars = int(max(1, s["est_tokens"] - 12) * self.chars_per_token)
            start = rng.randrange(0, max(1, len(self.corpus) - n_chars))
            text = self.corpus[start:start + n_chars]
            while len(text) < n_chars:                       # longer than the corpus: wrap
                text += " " + self.corpus[:n_chars - len(text)]
            doc = None
            q = f"Note {tag}: {text}\n\nSummarize the note in one sentence."
        ep = s["endpoint"]
        b = {"model": "default", "max_tokens": s["max_tokens"], "temperature": s["temperature"],
             "stream": s["stream"]}
        if ep == "chat":
            b["messages"] = ([{"role": "system", "content": doc}] if doc else []) + [{"role": "user", "content": q}]
        elif ep == "completions":
            b["prompt"] = (doc + "\n\nQuestion: " + q + "\nAnswer:") if doc else q + "\nSummary:"
        else:
            if doc:
                blk = {"type": "text", "text": doc}
                if s["anthropic_cache_control"]:
                    blk["cache_control"] = {"type": "ephemeral"}
                b["system"] = [blk]
            b["messages"] = [{"role": "user", "content": q}]
        if s["stream"] and ep != "messages":
            b["stream_options"] = {"include_usage": True}
        return b


# ------------------------------------------------------------------------------ one request

class Deadline(Exception):
    pass


def _readline(resp, sock, deadline):
    left = deadline - time.monotonic()
    if left <= 0:
        raise Deadline()
    if sock is not None:
        sock.settimeout(left)
    return resp.readline()


def _usage_fields(ep, usage, rec):
    if not isinstance(usage, dict):
        return
    if ep == "messages":
        if "input_tokens" in usage:
            rec["prompt_tokens"] = (usage.get("input_tokens") or 0) + (usage.get("cache_read_input_tokens") or 0) + \
                (usage.get("cache_creation_input_tokens") or 0)
        if usage.get("cache_read_input_tokens") is not None:
            rec["cached_tokens"] = usage["cache_read_input_tokens"]
        if usage.get("output_tokens") is not None:
            rec["completion_tokens"] = usage["output_tokens"]
    else:
        if usage.get("prompt_tokens") is not None:
            rec["prompt_tokens"] = usage["prompt_tokens"]
        ct = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if ct is not None:
            rec["cached_tokens"] = ct
        if usage.get("completion_tokens") is not None:
            rec["completion_tokens"] = usage["completion_tokens"]


def _valid_response(ep, d):
    if not isinstance(d, dict) or not isinstance(d.get("usage"), dict):
        return False
    if ep == "messages":
        return d.get("type") == "message" and isinstance(d.get("content"), list) and \
            isinstance(d["usage"].get("input_tokens"), int) and isinstance(d["usage"].get("output_tokens"), int)
    ch = d.get("choices")
    if not isinstance(ch, list) or not ch:
        return False
    if ep == "chat" and not isinstance(ch[0].get("message"), dict):
        return False
    if ep == "completions" and not isinstance(ch[0].get("text"), str):
        return False
    return isinstance(d["usage"].get("prompt_tokens"), int)


def _content_of(ep, d):
    if ep == "messages":
        if d.get("type") == "content_block_delta":
            return (d.get("delta") or {}).get("text") or ""
        return ""
    out = ""
    for c in d.get("choices") or []:
        out += ((c.get("delta") or {}).get("content") or "") if ep == "chat" else (c.get("text") or "")
    return out


def do_request(port, spec, body, timeout, cut_at=None):
    """Sends one request; returns its record. Never raises. cut_at (time.monotonic()): the end of
    the run's drain; a request still running then is closed and recorded as "cut", not lost."""
    ep = spec["endpoint"]
    rec = {"endpoint": ep, "stream": spec["stream"], "planned_disconnect": spec["disconnect"],
           "shared_doc": spec["doc"], "est_prompt_tokens": spec["est_tokens"], "max_tokens": spec["max_tokens"],
           "status": None, "outcome": None, "ttft_ms": None, "latency_ms": None, "prompt_tokens": None,
           "cached_tokens": None, "completion_tokens": None}
    t0 = time.monotonic()
    deadline = t0 + timeout
    cut = cut_at is not None and cut_at < deadline
    if cut:
        deadline = cut_at
    rec["t_start"] = time.time()
    conn = None
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=max(0.1, deadline - t0))
        hdrs = {"Content-Type": "application/json"}
        if ep == "messages":
            hdrs["anthropic-version"] = "2023-06-01"
        conn.request("POST", PATHS[ep], body=json.dumps(body), headers=hdrs)
        resp = conn.getresponse()
        rec["status"] = resp.status
        if resp.status != 200:
            raw = resp.read()
            rec["outcome"] = "http_error"
            rec["error"] = raw[:300].decode("utf-8", "replace")
            if resp.status == 429:
                rec["retry_after"] = resp.getheader("Retry-After")
            return rec
        if not spec["stream"]:
            raw = resp.read()
            rec["ttft_ms"] = (time.monotonic() - t0) * 1000.0   # not observable earlier without streaming
            try:
                d = json.loads(raw)
            except ValueError:
                rec["outcome"], rec["error"] = "lost", f"invalid JSON body ({len(raw)} bytes): {raw[:200]!r}"
                return rec
            if not _valid_response(ep, d):
                rec["outcome"], rec["error"] = "lost", f"incomplete response: {raw[:300]!r}"
                return rec
            _usage_fields(ep, d.get("usage"), rec)
            rec["outcome"] = "ok"
            return rec
        # streamed
        sock = conn.sock
        terminated = False
        while True:
            raw = _readline(resp, sock, deadline)
            if not raw:
                break
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                terminated = True
                break
            try:
                d = json.loads(data)
            except ValueError:
                rec["outcome"], rec["error"] = "lost", f"invalid SSE data: {data[:200]!r}"
                return rec
            if not isinstance(d, dict):
                continue
            if "error" in d or d.get("type") == "error":
                rec["stream_error"] = json.dumps(d.get("error"))[:300]
                if ep == "messages":
                    terminated = True
                    break
                continue                                  # OpenAI: [DONE] follows
            if ep == "messages":
                if d.get("type") == "message_start":
                    _usage_fields(ep, (d.get("message") or {}).get("usage"), rec)
                elif d.get("type") == "message_delta":
                    u = d.get("usage") or {}
                    if u.get("output_tokens") is not None:
                        rec["completion_tokens"] = u["output_tokens"]
                elif d.get("type") == "message_stop":
                    terminated = True
                    break
            elif d.get("usage"):
                _usage_fields(ep, d["usage"], rec)
            content = _content_of(ep, d)
            finished = ep != "messages" and any(c.get("finish_reason") for c in d.get("choices") or [])
            if rec["ttft_ms"] is None and (content or finished):
                rec["ttft_ms"] = (time.monotonic() - t0) * 1000.0
            if content and spec["disconnect"]:
                rec["outcome"] = "disconnected"
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return rec
        if rec.get("stream_error"):
            rec["outcome"] = "stream_error" if terminated else "lost"
            if not terminated:
                rec["error"] = "error event, then the stream ended without its terminator"
        elif terminated:
            rec["outcome"] = "ok"
        else:
            rec["outcome"], rec["error"] = "lost", "stream ended without [DONE]/message_stop"
        return rec
    except (Deadline, socket.timeout, TimeoutError):
        if cut and time.monotonic() >= deadline - 0.5:
            rec["outcome"], rec["error"] = "cut", "still running at the end of the drain; closed by the client"
        else:
            rec["outcome"], rec["error"] = "lost", f"timeout after {timeout:.0f} s"
        return rec
    except Exception as e:  # connection refused/reset, IncompleteRead, bad status line ...
        rec["outcome"], rec["error"] = "lost", f"{type(e).__name__}: {e}"[:300]
        return rec
    finally:
        rec["latency_ms"] = (time.monotonic() - t0) * 1000.0
        if conn is not None:
            conn.close()


# ------------------------------------------------------------------------------ server

def read_rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_METRIC = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')


def get_metrics(port, timeout=10):
    """All samples of /metrics except histogram buckets, as {name or name{labels}: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        text = r.read().decode("utf-8", "replace")
    out = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m or m.group(1).endswith("_bucket"):
            continue
        try:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        except ValueError:
            pass
    return out


def cache_block_metric(metrics):
    """Name of a metric counting KV blocks held by the prefix cache, if the server has one."""
    for name in metrics:
        base = name[len("pcache_"):] if name.startswith("pcache_") else name   # "pcache" itself says cache
        if "{" not in name and re.search(r"cache.*block|block.*cache", base) and "evict" not in base:
            return name
    return None


class Server:
    def __init__(self, args):
        self.args = args
        if args.server_log:
            self.log_path = args.server_log
        else:
            with tempfile.NamedTemporaryFile(prefix="pcache-soak-", suffix=".log", delete=False) as f:
                self.log_path = f.name
        self.proc = None
        self.port = None
        self.max_queue_passed = False
        self.cmd = None
        self.stopped_by_us = False

    def log_tail(self, n=3000):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def _launch(self, with_max_queue):
        self.port = free_port()
        cmd = [self.args.pcache, "serve", "-m", self.args.model, "--host", "127.0.0.1", "--port", str(self.port),
               "-t", str(self.args.threads), "--kv-mem", self.args.kv_mem]
        if with_max_queue:
            cmd += ["--max-queue", str(self.args.max_queue)]
        cmd += self.args.server_arg
        self.cmd = cmd
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        t0 = time.time()
        while time.time() - t0 < 120:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return True
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"server not healthy after 120 s: {self.log_tail()}")

    def start(self):
        want_mq = self.args.max_queue > 0
        for attempt in range(3):                     # the free port may be taken in between: retry
            if self._launch(want_mq):
                self.max_queue_passed = want_mq
                return
            tail = self.log_tail()
            if want_mq and "--max-queue" in tail and "unknown option" in tail:
                print("soak: this pcache serve does not know --max-queue; running without it", file=sys.stderr)
                want_mq = False
                continue
            if "bind" not in tail.lower() and "address" not in tail.lower():
                break
        raise RuntimeError(f"server exited with code {self.proc.returncode}: {' '.join(self.cmd)}\n{self.log_tail()}")

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.stopped_by_us = True
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return "killed (no exit 15 s after SIGTERM)"
        return self.proc.returncode


# ------------------------------------------------------------------------------ the run

def sample(server, t0, phase):
    s = {"t": round(time.time() - t0, 1), "phase": phase, "rss_kb": read_rss_kb(server.proc.pid)}
    try:
        s["metrics"] = get_metrics(server.port)
    except Exception as e:
        s["metrics_error"] = f"{type(e).__name__}: {e}"[:200]
    return s


def m_get(smp, name):
    return (smp.get("metrics") or {}).get(name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--pcache", default="build/pcache")
    ap.add_argument("--model", default=os.environ.get("PCACHE_MODEL", "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--duration", type=float, default=600, help="seconds of load (default 600; CI: 60)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="server -t")
    ap.add_argument("--kv-mem", default=None, help="server --kv-mem (default: --kv-fraction of the working set)")
    ap.add_argument("--kv-fraction", type=float, default=0.25)
    ap.add_argument("--max-queue", type=int, default=256, help="server --max-queue (0: not passed)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra argument for pcache serve (repeatable)")
    ap.add_argument("--docs", type=int, default=4, help="shared documents")
    ap.add_argument("--shared-frac", type=float, default=0.7)
    ap.add_argument("--stream-frac", type=float, default=0.5)
    ap.add_argument("--disconnect-frac", type=float, default=0.1)
    ap.add_argument("--min-prompt-tokens", type=int, default=50)
    ap.add_argument("--max-prompt-tokens", type=int, default=3000)
    ap.add_argument("--min-gen", type=int, default=8)
    ap.add_argument("--max-gen", type=int, default=32)
    ap.add_argument("--request-timeout", type=float, default=300, help="per request, seconds")
    ap.add_argument("--drain-timeout", type=float, default=120,
                    help="after --duration, seconds requests in flight may take before they are cut")
    ap.add_argument("--sample-interval", type=float, default=10)
    ap.add_argument("--idle-timeout", type=float, default=120, help="seconds to wait for the server to go idle")
    ap.add_argument("--rss-tolerance", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--server-log", default=None, help="keep the server's output here (default: a temp file)")
    ap.add_argument("--out", default=os.path.join(HERE, "soak_results.json"))
    args = ap.parse_args()
    if not (0 <= args.disconnect_frac <= args.stream_frac <= 1):
        ap.error("need 0 <= --disconnect-frac <= --stream-frac <= 1")
    for p, what in ((args.pcache, "--pcache"), (args.model, "--model")):
        if not os.path.exists(p):
            ap.error(f"{what} {p}: not found")

    def on_term(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, on_term)

    t_wall = time.time()
    kv = kv_bytes_per_token(args.model)
    wl = Workload(args)
    ws_tokens, own = wl.working_set_tokens()
    ws_bytes = ws_tokens * kv["bytes_per_token"]
    if args.kv_mem is None:
        args.kv_mem = f"{max(16, int(round(ws_bytes * args.kv_fraction / 2**20)))}M"
    print(f"soak: KV {kv['bytes_per_token']} B/token ({kv['n_layer']} layers x 2 x {kv['n_kv_heads']} kv heads x "
          f"{kv['head_dim']} x 2 B); docs {wl.doc_tokens} tokens; {own:.0f} own tokens/request expected; "
          f"working set {ws_tokens:.0f} tokens = {ws_bytes / 2**20:.0f} MiB; --kv-mem {args.kv_mem}", file=sys.stderr)

    summary = {"config": {k: v for k, v in vars(args).items()}, "kv": kv,
               "workload": {"doc_tokens": wl.doc_tokens, "own_tokens_per_request": own,
                            "working_set_tokens": ws_tokens, "working_set_mib": ws_bytes / 2**20},
               "loadavg_start": os.getloadavg()}
    server = Server(args)
    records, samples = [], []
    rec_lock = threading.Lock()
    stop_ev = threading.Event()
    interrupted = False
    server_died = None
    idle = None
    final = None
    exit_code = None
    try:
        server.start()
        summary["server_cmd"] = server.cmd
        summary["max_queue_passed"] = server.max_queue_passed
        print(f"soak: server pid {server.proc.pid} on 127.0.0.1:{server.port}: {' '.join(server.cmd)}", file=sys.stderr)
        t0 = time.time()
        end_at = time.monotonic() + args.duration
        cut_at = end_at + args.drain_timeout

        def client(ci):
            rng = random.Random(args.seed * 1000003 + ci)
            while not stop_ev.is_set() and time.monotonic() < end_at:
                s = wl.spec(rng)
                r = do_request(server.port, s, wl.body(s, rng), args.request_timeout, cut_at)
                r["client"] = ci
                r["t_start"] = round(r["t_start"] - t0, 3)
                with rec_lock:
                    records.append(r)
                if r["status"] == 429:                  # queue full: back off as a client should
                    try:
                        ra = float(r.get("retry_after") or 0)
                    except ValueError:
                        ra = 0
                    stop_ev.wait(min(5.0, max(ra, rng.uniform(0.5, 2.0))))
                elif r["outcome"] == "lost":
                    stop_ev.wait(rng.uniform(0.5, 1.5))

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        samples.append(sample(server, t0, "start"))
        for t in threads:
            t.start()
        next_sample = time.monotonic() + args.sample_interval
        last_print = 0
        while any(t.is_alive() for t in threads):
            if server.proc.poll() is not None:
                server_died = server.proc.returncode
                print(f"soak: server exited with code {server_died} during the run", file=sys.stderr)
                stop_ev.set()
                break
            now = time.monotonic()
            if now >= next_sample:
                phase = "load" if now < end_at else "drain"
                smp = sample(server, t0, phase)
                samples.append(smp)
                next_sample += args.sample_interval
                with rec_lock:
                    n = len(records)
                    bad = sum(1 for r in records if r["outcome"] in ("lost", "stream_error") or (r["status"] or 0) >= 500)
                    n429 = sum(1 for r in records if r["status"] == 429)
                print(f"soak: t={smp['t']:.0f}s {phase}: {n} requests done ({bad} bad, {n429} 429), rss {smp['rss_kb']} kB, "
                      f"queue {fmt(m_get(smp, 'pcache_queue_depth'))}, "
                      f"kv used {fmt(m_get(smp, 'pcache_kv_blocks_used'))}/{fmt(m_get(smp, 'pcache_kv_blocks_total'))}, "
                      f"active {fmt(m_get(smp, 'pcache_active_requests'))}", file=sys.stderr)
            if now > cut_at + 30:
                print("soak: clients still running past duration + request timeout; giving up on them", file=sys.stderr)
                stop_ev.set()
                break
            time.sleep(0.2)
        stop_ev.set()
        for t in threads:
            t.join(timeout=5)
        summary["clients_still_running"] = sum(t.is_alive() for t in threads)

        # Idle: nothing active, nothing queued, twice in a row.
        if server_died is None:
            t_idle = time.monotonic()
            streak = 0
            while time.monotonic() - t_idle < args.idle_timeout:
                if server.proc.poll() is not None:
                    server_died = server.proc.returncode
                    break
                try:
                    m = get_metrics(server.port)
                    busy = (m.get("pcache_active_requests") or 0) + (m.get("pcache_active_sequences") or 0) + \
                        (m.get("pcache_queue_depth") or 0)
                    streak = streak + 1 if busy == 0 else 0
                except Exception:
                    streak = 0
                if streak >= 2:
                    idle = round(time.monotonic() - t_idle, 1)
                    break
                time.sleep(1)
            if server_died is None:
                final = sample(server, t0, "idle" if idle is not None else "not-idle")
                samples.append(final)
    except KeyboardInterrupt:
        interrupted = True
        print("soak: interrupted", file=sys.stderr)
    except Exception as e:
        summary["exception"] = f"{type(e).__name__}: {e}"
        print(f"soak: {summary['exception']}", file=sys.stderr)
    finally:
        stop_ev.set()
        exit_code = server.stop()
        summary["server_log_tail"] = server.log_tail()
        summary["server_log"] = server.log_path

    # ------------------------------------------------------------------ evaluation
    with rec_lock:
        recs = list(records)
    by_status, by_outcome = {}, {}
    for r in recs:
        k = str(r["status"]) if r["status"] is not None else "none"
        by_status[k] = by_status.get(k, 0) + 1
        by_outcome[r["outcome"]] = by_outcome.get(r["outcome"], 0) + 1
    five = [r for r in recs if (r["status"] or 0) >= 500]
    serr = [r for r in recs if r["outcome"] == "stream_error"]
    lost = [r for r in recs if r["outcome"] == "lost"]
    non200 = [r for r in recs if r["status"] is not None and r["status"] != 200]
    not429 = [r for r in non200 if r["status"] != 429]
    disc = [r for r in recs if r["outcome"] == "disconnected"]
    cutr = [r for r in recs if r["outcome"] == "cut"]

    def errsamples(rs, n=5):
        seen = {}
        for r in rs:
            key = f"{r['status']} {r['endpoint']}{' stream' if r['stream'] else ''}: " + \
                  (r.get("error") or r.get("stream_error") or "")[:160]
            seen[key] = seen.get(key, 0) + 1
        return sorted(seen.items(), key=lambda kv: -kv[1])[:n]

    ttft = {}
    for label, pred in (("stream", lambda r: r["stream"]), ("non-stream", lambda r: not r["stream"])):
        xs = [r["ttft_ms"] for r in recs if pred(r) and r["outcome"] in ("ok", "disconnected") and r["ttft_ms"] is not None]
        ttft[label] = {"n": len(xs), "p50_ms": pct(xs, 50), "p99_ms": pct(xs, 99)}
    ok = [r for r in recs if r["outcome"] == "ok"]
    prompt_tok = sum(r["prompt_tokens"] or 0 for r in ok)
    cached_tok = sum(r["cached_tokens"] or 0 for r in ok if r["prompt_tokens"])

    rss = [(s["t"], s["phase"], s["rss_kb"]) for s in samples]
    checks = []

    def check(name, passed, detail):
        checks.append({"check": name, "result": passed, "detail": detail})

    check("no 5xx", not five, f"{len(five)} responses with status >= 500")
    check("no in-stream error events", not serr, f"{len(serr)} streams ended with an error event")
    check("no lost requests", not lost, f"{len(lost)} lost")
    check("no request cut at the end", not cutr,
          f"{len(cutr)} requests still unanswered {args.drain_timeout:.0f} s after the end of the load "
          f"({sum(1 for r in cutr if r['status'] is None)} of them without a status yet)")
    check("every non-200 is 429", not not429, f"{len(non200)} non-200, {len(not429)} of them not 429")
    check("server ran to the end", server_died is None and not interrupted,
          "interrupted" if interrupted else (f"server exited with code {server_died}" if server_died is not None else "yes"))
    check("server exit 0 on SIGTERM", exit_code == 0 or server_died is not None,
          f"exit status {exit_code}")
    if interrupted or server_died is not None or summary.get("exception"):
        check("idle after the run", False, "not measured (the run did not finish)")
    else:
        check("idle after the run", idle is not None,
              f"idle after {idle} s" if idle is not None else f"not idle within {args.idle_timeout} s")
    # RSS: the sample at the end of warm-up (first third) vs the last sample under load and the idle one
    # Warm-up: the first third of the run, extended to the first sample at which the KV pool has
    # been (nearly) full once. The server touches its pool's pages at start (kv.c), so the pool is
    # resident from the first sample; the extension remains for what a loaded machine ramps up
    # slowly (connection threads and their malloc arenas as the clients arrive).
    warm_t = args.duration / 3.0
    pool_warm_t = next((s["t"] for s in samples if m_get(s, "pcache_kv_blocks_used") is not None and
                        m_get(s, "pcache_kv_blocks_total") and
                        m_get(s, "pcache_kv_blocks_used") >= 0.95 * m_get(s, "pcache_kv_blocks_total")), None)
    if pool_warm_t is not None and pool_warm_t > warm_t:
        warm_t = pool_warm_t
    summary["warmup_end_s"] = warm_t
    summary["kv_pool_first_full_s"] = pool_warm_t
    load_samples = [s for s in samples if s["phase"] in ("load", "drain") and s["rss_kb"]]
    warm = next((s for s in load_samples if s["t"] >= warm_t), None)
    later = [s for s in load_samples if warm is not None and s["t"] > warm["t"]]
    if warm is None or not later:
        check("RSS flat after warm-up", None, "too few samples under load (run longer or sample more often)")
    else:
        cands = [later[-1]] + ([final] if final and final.get("rss_kb") else [])
        worst = max(s["rss_kb"] for s in cands)
        growth = worst / warm["rss_kb"] - 1
        check("RSS flat after warm-up", growth <= args.rss_tolerance,
              f"warm-up sample {warm['rss_kb']} kB at {warm['t']} s; last under load {later[-1]['rss_kb']} kB at "
              f"{later[-1]['t']} s" + (f"; idle {final['rss_kb']} kB" if final and final.get("rss_kb") else "") +
              f"; growth {growth * 100:+.1f}% (tolerance {args.rss_tolerance * 100:.0f}%; warm-up ended at {warm_t:.0f} s: "
              f"a third of the run{'' if pool_warm_t is None or pool_warm_t <= args.duration / 3 else ', extended to the KV pool first full'})")
    kv_idle = {}
    if final and final.get("metrics"):
        fm = final["metrics"]
        kv_idle = {"used": fm.get("pcache_kv_blocks_used"), "free": fm.get("pcache_kv_blocks_free"),
                   "total": fm.get("pcache_kv_blocks_total")}
        cm = cache_block_metric(fm)
        kv_idle["cache_metric"] = cm
        kv_idle["cache_blocks"] = fm.get(cm) if cm else None
        kv_idle["cache_metrics"] = {k: v for k, v in fm.items()
                                    if "cache" in k.replace("pcache_", "", 1) and "{" not in k}
        if cm is None:
            check("KV blocks used when idle == cache's blocks", None,
                  f"used {fmt(kv_idle['used'])} of {fmt(kv_idle['total'])} blocks when idle; /metrics has no "
                  "cache block count to compare with (not checked)")
        else:
            check("KV blocks used when idle == cache's blocks", kv_idle["used"] == kv_idle["cache_blocks"],
                  f"pcache_kv_blocks_used {fmt(kv_idle['used'])} vs {cm} {fmt(kv_idle['cache_blocks'])}")
    else:
        check("KV blocks used when idle == cache's blocks", None if server_died is None and not interrupted else False,
              "no idle sample")
    last_m = next((s["metrics"] for s in reversed(samples) if s.get("metrics")), {})
    server_status = {k: v for k, v in last_m.items() if k.startswith("pcache_requests_total")}
    verdict = all(c["result"] is not False for c in checks) and bool(recs)
    if not recs:
        check("some requests ran", False, "no requests completed")

    summary.update({
        "verdict": "PASS" if verdict else "FAIL", "interrupted": interrupted, "server_died": server_died,
        "server_exit": exit_code, "idle_after_s": idle, "wall_s": time.time() - t_wall,
        "loadavg_end": os.getloadavg(),
        "requests": len(recs), "by_status": by_status, "by_outcome": by_outcome,
        "lost": len(lost), "disconnects": len(disc), "cut_at_end": len(cutr), "five_xx": len(five), "stream_errors": len(serr),
        "error_samples": errsamples([r for r in recs if r["outcome"] in ("lost", "stream_error") or
                                     (r["status"] is not None and r["status"] != 200)], 10),
        "preemptions_total": last_m.get("pcache_preemptions_total"),
        "queue_depth_max": max((m_get(s, "pcache_queue_depth") or 0 for s in samples), default=None)
        if any(m_get(s, "pcache_queue_depth") is not None for s in samples) else None,
        "ttft": ttft, "prompt_tokens_ok": prompt_tok, "cached_tokens_ok": cached_tok,
        "server_requests_by_status": server_status, "kv_idle": kv_idle, "checks": checks,
        "rss_series": rss,
        "samples": [{k: v for k, v in s.items() if k != "metrics"} |
                    {"metrics": {k: v for k, v in (s.get("metrics") or {}).items()
                                 if not k.startswith(("pcache_ttft", "pcache_decode_tokens"))}} for s in samples],
        "records": recs,
    })
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)

    # ------------------------------------------------------------------ report
    P = print
    P(f"\n=== pcache soak: {args.clients} clients, {args.duration:.0f} s, --kv-mem {args.kv_mem} "
      f"(working set {ws_bytes / 2**20:.0f} MiB), -t {args.threads}, "
      f"--max-queue {args.max_queue if server.max_queue_passed else 'not supported by this server'} ===")
    P(f"requests: {len(recs)}   by status: {json.dumps(by_status, sort_keys=True)}   by outcome: "
      f"{json.dumps(by_outcome, sort_keys=True)}")
    P(f"5xx: {len(five)}   in-stream errors: {len(serr)}   lost: {len(lost)}   non-200 other than 429: {len(not429)}   "
      f"disconnects (ours): {len(disc)}   cut at the end of the drain: {len(cutr)}")
    P(f"preemptions: {fmt(summary['preemptions_total'])}   queue depth max: {fmt(summary['queue_depth_max'])}   "
      f"evictions: {fmt(last_m.get('pcache_cache_evictions_total'))}")
    P(f"server's own count: {json.dumps(server_status)}")
    for label in ("stream", "non-stream"):
        t = ttft[label]
        what = "TTFT" if label == "stream" else "latency (= TTFT seen by a non-streaming client)"
        P(f"{label:>10} {what}: n={t['n']} p50 {fmt(t['p50_ms'])} ms  p99 {fmt(t['p99_ms'])} ms")
    P(f"prompt tokens (complete requests): {prompt_tok}, cached {cached_tok}"
      f" ({100.0 * cached_tok / prompt_tok:.0f}%)" if prompt_tok else "prompt tokens: -")
    P("RSS (t s, phase, kB): " + ", ".join(f"{t}:{ph[0]}:{r}" for t, ph, r in rss))
    if kv_idle:
        P("cache metrics at the end: " + ", ".join(f"{k} {v:g}" for k, v in sorted(kv_idle["cache_metrics"].items())))
        P(f"KV blocks when idle: used {fmt(kv_idle.get('used'))} free {fmt(kv_idle.get('free'))} "
          f"total {fmt(kv_idle.get('total'))}; cache blocks: "
          f"{fmt(kv_idle.get('cache_blocks')) if kv_idle.get('cache_metric') else 'not exposed'}")
    if summary["error_samples"]:
        P("errors (count: status endpoint: message):")
        for k, n in summary["error_samples"]:
            P(f"  {n:5d}  {k}")
    P("checks:")
    for c in checks:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[c["result"]]
        P(f"  [{mark}] {c['check']}: {c['detail']}")
    if server_died is not None or summary.get("exception"):
        P("server log tail:\n" + summary["server_log_tail"][-1500:])
    P(f"\n{summary['verdict']}   (wrote {args.out}, {summary['wall_s']:.0f} s)")
    sys.exit(0 if verdict else 1)


if __name__ == "__main__":
    main()
