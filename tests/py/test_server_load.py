"""`pcache serve` under load (issue 8): requests queue for KV blocks instead of failing, running
sequences are preempted and resumed with the same output, what can never fit is refused at once,
a full queue answers 429/529, tenants are isolated by their credential (and cache_salt), and
SIGTERM drains. Each test starts its own server with the limits it needs."""
import concurrent.futures as cf
import json
import os
import re
import signal
import socket
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from server_fixture import launch, stop  # noqa: E402

requests = pytest.importorskip("requests")

BLOCK_BYTES = 30 * 2 * 16 * 192 * 2   # SmolLM2: layers * (K,V) * 16 tokens * kv_dim * fp16
T0 = {"temperature": 0}


def kv_mem(blocks):
    return str(blocks * BLOCK_BYTES)


def post(srv, path, body, key=None, **kw):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    headers.update(kw.pop("headers", {}))
    return requests.post(srv.base + path, data=json.dumps(body), headers=headers, timeout=300, **kw)


def metric(srv, name):
    text = requests.get(srv.base + "/metrics", timeout=10).text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def doc(i, tokens):
    """A distinct prompt of about `tokens` tokens (a sentence is about 11.5)."""
    return f"Document {i}. " + " ".join(f"item{(i * 7919 + k) % 997} is filed under shelf {k % 13}."
                                         for k in range(int(tokens / 11.5)))


def completion(srv, prompt, max_tokens, key=None, **extra):
    body = {"model": "default", "prompt": prompt, "max_tokens": max_tokens, **T0, **extra}
    return post(srv, "/v1/completions", body, key=key)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    return tmp_path_factory.mktemp("load")


# ------------------------------------------------------------------------------ queueing
def test_requests_wait_for_memory_instead_of_failing(logdir):
    """Six concurrent ~200-token prompts, a pool that holds one of them at a time (plus change):
    six 200s, each output what the request gives alone."""
    srv = launch(logdir, ["--kv-mem", kv_mem(20)], keys=[])
    try:
        prompts = [doc(i, 200) for i in range(6)]
        with cf.ThreadPoolExecutor(6) as ex:
            rs = list(ex.map(lambda p: completion(srv, p, 16), prompts))
        assert [r.status_code for r in rs] == [200] * 6, [r.text[:300] for r in rs]
        for r in rs:
            # 145..304 prompt tokens + 16 new need 11..20 blocks of 16: two never fit in 20
            assert 144 < r.json()["usage"]["prompt_tokens"] <= 304
        for p, r in zip(prompts, rs):
            alone = completion(srv, p, 16)
            assert alone.status_code == 200
            assert alone.json()["choices"][0]["text"] == r.json()["choices"][0]["text"]
        assert metric(srv, "pcache_queue_depth") == 0
    finally:
        stop(srv)


def test_preempted_requests_resume_with_the_same_output(logdir):
    """Short prompts, long generations, a 12-block pool: running sequences outgrow it and are
    preempted; every text equals the uninterrupted one (greedy, and seeded sampling)."""
    srv = launch(logdir, ["--kv-mem", kv_mem(12)], keys=[])
    try:
        prompts = ["The history of the printing press begins",
                   "def quicksort(xs):\n    ",
                   "A list of the planets, with one fact each:\n1.",
                   "Dear diary, today I finally"]
        extras = [T0, T0, {"temperature": 0.9, "seed": 42}, T0]

        def run(i):
            body = {"model": "default", "prompt": prompts[i], "max_tokens": 100, **extras[i]}
            return post(srv, "/v1/completions", body)

        with cf.ThreadPoolExecutor(4) as ex:
            together = list(ex.map(run, range(4)))
        assert [r.status_code for r in together] == [200] * 4, [r.text[:300] for r in together]
        preempted = metric(srv, "pcache_preemptions_total")
        alone = [run(i) for i in range(4)]
        for t, a in zip(together, alone):
            assert a.status_code == 200
            assert t.json()["choices"][0]["text"] == a.json()["choices"][0]["text"]
            assert t.json()["usage"]["completion_tokens"] == a.json()["usage"]["completion_tokens"]
        # the overlap must have forced preemptions, or this test showed nothing
        assert preempted > 0, "no preemption happened; the pool is too large for this test"
        assert metric(srv, "pcache_queued_sequences") == 0
    finally:
        stop(srv)


def test_impossible_requests_get_400_at_once(logdir):
    srv = launch(logdir, ["--kv-mem", kv_mem(12)], keys=[])   # 192 tokens
    try:
        r = completion(srv, "Hello there", 500)                # 3 + 500 tokens > pool
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "--kv-mem" in err["message"] and err["type"] == "invalid_request_error"
        body = {"model": "default", "max_tokens": 500, "messages": [{"role": "user", "content": "Hi"}]}
        r = post(srv, "/v1/messages", body)
        assert r.status_code == 400 and r.json()["type"] == "error", r.text
        assert "--kv-mem" in r.json()["error"]["message"]
        r = completion(srv, doc(1, 260), 4)                    # the prompt alone is too long
        assert r.status_code == 400 and "--kv-mem" in r.json()["error"]["message"], r.text
        r = completion(srv, "Hello there", 9000)               # beyond the context
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        # without max_tokens a generation that outgrows the pool ends with "length"
        r = post(srv, "/v1/completions", {"model": "default", "prompt": "1, 2, 3, 4, 5,",
                                          "ignore_eos": True, **T0})
        assert r.status_code == 200, r.text
        j = r.json()
        assert j["choices"][0]["finish_reason"] == "length", j
        total = j["usage"]["prompt_tokens"] + j["usage"]["completion_tokens"]
        assert 12 * 16 - 16 <= total <= 12 * 16 + 1, j["usage"]
        # and the server is fine afterwards
        assert completion(srv, "Hello there", 4).status_code == 200
    finally:
        stop(srv)


def test_full_queue_gets_429_and_529(logdir):
    srv = launch(logdir, ["--kv-mem", kv_mem(40), "--parallel", "1", "--max-queue", "1"], keys=[])
    try:
        prompts = [doc(i, 200) for i in range(6)]
        with cf.ThreadPoolExecutor(6) as ex:
            rs = list(ex.map(lambda p: completion(srv, p, 8), prompts))
        codes = sorted(r.status_code for r in rs)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
        for r in rs:
            if r.status_code == 429:
                assert r.headers.get("Retry-After", "").isdigit()
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
        body = lambda p: {"model": "default", "max_tokens": 8, "messages": [{"role": "user", "content": p}]}
        with cf.ThreadPoolExecutor(6) as ex:
            rs = list(ex.map(lambda p: post(srv, "/v1/messages", body(p)), prompts))
        codes = sorted(r.status_code for r in rs)
        assert 200 in codes and 529 in codes and set(codes) <= {200, 529}, codes
        r = next(r for r in rs if r.status_code == 529)
        assert r.json()["error"]["type"] == "overloaded_error" and r.headers.get("Retry-After")
        assert metric(srv, "pcache_queue_rejections_total") >= 2
    finally:
        stop(srv)


# ------------------------------------------------------------------------------ tenants
def test_tenants_are_isolated_without_configured_keys(logdir):
    srv = launch(logdir, ["--kv-mem", "64M"], keys=[])
    try:
        p = doc(3, 150)

        def cached(key=None, **extra):
            r = completion(srv, p, 1, key=key, **extra)
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

        assert cached("alice") == 0
        assert cached("alice") > 120                      # the same credential hits
        assert cached("mallory") == 0                     # another one does not
        assert cached() == 0                              # nor no credential at all
        assert cached("alice", cache_salt="s1") == 0      # a salt splits a tenant
        assert cached("alice", cache_salt="s1") > 120
        assert cached("alice", cache_salt="s2") == 0
        r = post(srv, "/v1/messages", {"model": "default", "max_tokens": 1,
                                       "messages": [{"role": "user", "content": p}]},
                 headers={"x-api-key": "bob"})
        assert r.status_code == 200 and r.json()["usage"]["cache_read_input_tokens"] == 0
    finally:
        stop(srv)


# ------------------------------------------------------------------------------ shutdown
def sse_events(resp):
    for line in resp.iter_lines():
        if line.startswith(b"data: "):
            yield line[6:].decode()


def test_sigterm_drains_in_flight_requests(logdir):
    srv = launch(logdir, ["--kv-mem", "64M", "--drain-timeout", "60"], keys=[])
    # still generating when SIGTERM lands and /health is asked: 200 tokens take seconds on the
    # CPU (optimized or sanitized, well inside the drain timeout), 2000 as long on a GPU
    n = 2000 if "cuda" in os.environ.get("PCACHE_SERVE_ARGS", "") else 200
    body = {"model": "default", "prompt": "1, 2, 3, 4, 5,", "max_tokens": n, "stream": True, "ignore_eos": True, **T0}
    r = post(srv, "/v1/completions", body, stream=True)
    assert r.status_code == 200
    events = sse_events(r)
    first = json.loads(next(events))
    assert first["choices"][0]["text"] is not None
    srv.proc.send_signal(signal.SIGTERM)
    for _ in range(50):   # the signal is handled asynchronously: wait for it to take effect
        h = requests.get(srv.base + "/health", timeout=10)
        if h.status_code != 200:
            break
        time.sleep(0.05)
    assert h.status_code == 503 and h.json()["status"] == "draining"
    n = completion(srv, "Hello", 4)
    assert n.status_code == 503 and n.headers.get("Retry-After")
    rest = list(events)
    assert rest[-1] == "[DONE]"
    finals = [json.loads(e) for e in rest[:-1]]
    assert any(f["choices"][0].get("finish_reason") == "length" for f in finals), rest[-3:]
    stop(srv)


def test_drain_timeout_ends_streams_with_an_error_event(logdir):
    srv = launch(logdir, ["--kv-mem", "256M", "--drain-timeout", "1"], keys=[])
    body = {"model": "default", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 4000, "stream": True,
            "ignore_eos": True, **T0}
    r = post(srv, "/v1/completions", body, stream=True)
    assert r.status_code == 200
    events = sse_events(r)
    next(events)
    t0 = time.time()
    srv.proc.send_signal(signal.SIGTERM)
    rest = list(events)
    assert time.time() - t0 < 30
    assert rest[-1] == "[DONE]"
    err = json.loads(rest[-2])
    assert "error" in err and "shutting down" in err["error"]["message"], rest[-3:]
    stop(srv)


# ------------------------------------------------------------------------------ parameters
@pytest.fixture(scope="module")
def plain(logdir):
    srv = launch(logdir, ["--kv-mem", "64M"], keys=[])
    yield srv
    stop(srv)


def log_softmax(x):
    import numpy as np
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def test_logprobs_are_the_log_softmax_of_the_logits(plain):
    import numpy as np
    from oracle_util import MODEL, pcache_tokenize, tool_logits
    prompt = "The capital of France is"
    ids = pcache_tokenize(prompt)
    ref = log_softmax(tool_logits(MODEL, ids, 49152))
    r = completion(plain, prompt, 3, logprobs=5)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    best = int(np.argmax(ref))
    assert abs(lp["token_logprobs"][0] - ref[best]) < 1e-4        # greedy: the best token
    top = sorted(lp["top_logprobs"][0].values(), reverse=True)
    assert np.allclose(top, np.sort(ref)[::-1][:len(top)], atol=1e-4) and len(top) >= 4
    assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0].encode())
    assert "".join(lp["tokens"]) == r.json()["choices"][0]["text"]
    # chat, streamed and not: the same values, one entry per generated token
    body = {"model": "default", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6,
            "logprobs": True, "top_logprobs": 3, **T0}
    full = post(plain, "/v1/chat/completions", body).json()
    content = full["choices"][0]["logprobs"]["content"]
    assert len(content) == full["usage"]["completion_tokens"]
    for e in content:
        assert len(e["top_logprobs"]) == 3 and e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][2]["logprob"]
        assert abs(e["logprob"] - e["top_logprobs"][0]["logprob"]) < 1e-6     # greedy
        assert bytes(e["bytes"]).decode(errors="replace") == e["token"]
    r = post(plain, "/v1/chat/completions", {**body, "stream": True}, stream=True)
    streamed = []
    for ev in sse_events(r):
        if ev == "[DONE]":
            break
        ch = json.loads(ev)["choices"][0]
        if ch.get("logprobs"):
            streamed += ch["logprobs"]["content"]
    assert [(e["token"], round(e["logprob"], 5)) for e in streamed] == \
        [(e["token"], round(e["logprob"], 5)) for e in content]
    # off unless asked
    assert post(plain, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None}) \
        .json()["choices"][0]["logprobs"] is None


def test_logit_bias_changes_the_choice(plain):
    from oracle_util import pcache_tokenize
    r = completion(plain, "The capital of France is", 1, logprobs=2)
    lp = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    second = sorted(lp.items(), key=lambda kv: -kv[1])[1][0]
    sid = pcache_tokenize(second)
    assert len(sid) == 1
    r = completion(plain, "The capital of France is", 1, logit_bias={str(sid[0]): 100})
    assert r.json()["choices"][0]["text"] == second
    r = completion(plain, "The capital of France is", 1, logit_bias={"99999999": 5})
    assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"]
    r = completion(plain, "The capital of France is", 1, logit_bias={"12": 500})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/chat/completions", {"n": 2}, "n"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                              "schema": {"type": "string", "pattern": "a+"}}}}, "response_format"),
    # tool calls are supported (tests/py/test_tools.py); tools of other kinds are not
    ("/v1/chat/completions", {"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools[0]"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/messages", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tool"),
    ("/v1/messages", {"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
])
def test_unsupported_parameters_get_400(plain, path, extra, param):
    if path == "/v1/completions":
        body = {"model": "default", "prompt": "Hi", "max_tokens": 2}
    else:
        body = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    r = post(plain, path, {**body, **extra})
    assert r.status_code == 400, r.text
    j = r.json()
    if path == "/v1/messages":
        assert j["type"] == "error" and j["error"]["type"] == "invalid_request_error"
        assert param in j["error"]["message"]
    else:
        assert j["error"]["param"] == param, j
    # accepted as harmless: tools the model may ignore (tool_choice auto), a text response_format
    ok = post(plain, path, {**body, "response_format": {"type": "text"}} if path != "/v1/messages" else body)
    assert ok.status_code == 200, ok.text


def test_invalid_utf8_gets_400(plain):
    for raw in (b'{"model":"default","prompt":"caf\xe9","max_tokens":1}',          # latin-1
                b'{"model":"default","prompt":"\xed\xa0\x80","max_tokens":1}',      # a surrogate
                b'{"model":"default","prompt":"\xc0\xaf","max_tokens":1}',          # overlong
                b'{"model":"default","prompt":"\xf4\x90\x80\x80","max_tokens":1}',  # > U+10FFFF
                b'{"model":"default","prompt":"\xe2\x82","max_tokens":1}',          # truncated
                b'{"model":"default","prompt":"\\ud800","max_tokens":1}'):          # lone \u escape
        r = requests.post(plain.base + "/v1/completions", data=raw,
                          headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 400, (raw, r.text)
    r = requests.post(plain.base + "/v1/completions", timeout=60,
                      data='{"model":"default","prompt":"caf\u00e9 \u2603 \U0001F600","max_tokens":1}'.encode(),
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
