"""`pcache route` in front of three `pcache serve` replicas and a real redis-server, on loopback.

Which replica served a request is read from the router's /metrics
(pcache_router_replica_requests_total before and after). The index the router builds from KV
events is fed here by XADDs of the test's own (kvevent.h's format, chain hashes from
`pcache-tool request-chains`, the router's own computation) to the instance ids the replicas' /health
report: so the tests of routing by events hold whether or not the replicas publish events
themselves (the replica side of issue 14); they are skipped where /health has no instance id.
"""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from server_fixture import BUILD, MODEL, free_port, launch, stop
from router_fixture import health, launch_router, stop_router

REDIS = shutil.which("redis-server")
STREAM = "pcache:kv:events"
pytestmark = pytest.mark.skipif(not REDIS, reason="redis-server not installed (scripts/install-deps.sh test)")


# ------------------------------------------------------------------------------ redis
class Redis:
    """A redis-server in a temp dir on a random port, and a minimal RESP client."""

    def __init__(self, d, port=None):
        self.dir, self.port = str(d), port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.start()

    def start(self):
        self.proc = subprocess.Popen([REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                      "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while True:
            try:
                if self.cmd("PING") == "PONG":
                    return
            except OSError:
                pass
            assert time.time() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cmd(self, *args):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            out = b"*%d\r\n" % len(args)
            for a in args:
                a = a if isinstance(a, bytes) else str(a).encode()
                out += b"$%d\r\n%s\r\n" % (len(a), a)
            s.sendall(out)
            f = s.makefile("rb")
            return self._read(f)

    def _read(self, f):
        line = f.readline().rstrip(b"\r\n")
        t, rest = line[:1], line[1:]
        if t == b"+":
            return rest.decode()
        if t == b"-":
            raise RuntimeError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = f.read(n + 2)[:-2]
            return data.decode()
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self._read(f) for _ in range(n)]
        raise RuntimeError(f"bad reply {line!r}")


# ------------------------------------------------------------------------------ cluster
def serve_supports_redis():
    out = subprocess.run([os.path.join(BUILD, "pcache"), "serve", "--help"], capture_output=True, text=True).stdout
    return "--redis" in out


def get(base, path, headers=None):
    req = urllib.request.Request(base + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def post(base, path, body, headers=None, timeout=120):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    data = data.encode() if isinstance(data, str) else data
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    req = urllib.request.Request(base + path, data=data, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode()


def metrics(rt):
    out = {}
    for line in get(rt.base, "/metrics")[1].splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def per_replica(m, name):
    pat = re.compile(name + r'\{replica="([^"]+)"\}')
    return {pat.match(k).group(1): v for k, v in m.items() if pat.match(k)}


def served_by(rt, fn):
    """Runs fn(); returns (its result, the replica URLs the router sent it to, in order of count)."""
    before = per_replica(metrics(rt), "pcache_router_replica_requests_total")
    res = fn()
    after = per_replica(metrics(rt), "pcache_router_replica_requests_total")
    return res, [u for u in after if after[u] > before.get(u, 0)]


def decision(m, reason):
    return m.get(f'pcache_router_decisions_total{{reason="{reason}"}}', 0)


def chains(body, kind="chat", key=None):
    args = [os.path.join(BUILD, "pcache-tool"), "request-chains", MODEL, kind] + (["--key", key] if key else [])
    return json.loads(subprocess.run(args, input=json.dumps(body), capture_output=True, text=True, check=True).stdout)


def chat(text, max_tokens=4, **kw):
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0, **kw}


DOC = ("The lighthouse keeper kept a log of every ship that passed the rocks, the weather, the state of the lamp "
       "and the tides, and in the evenings he read it back to himself to find patterns in the storms. ")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster")
    redis = Redis(d)
    extra = ["--kv-mem", "64M", "-t", "1"]
    if serve_supports_redis():
        extra += ["--redis", redis.url]
    reps = [launch(d, extra, keys=()) for _ in range(3)]
    rt = launch_router(d, reps, ["--redis", redis.url])
    c = type("Cluster", (), {})()
    c.dir, c.redis, c.reps, c.router = d, redis, reps, rt
    c.inst = {r.base: health(r).get("instance") for r in reps}
    yield c
    stop_router(rt)
    for r in reps:
        stop(r)
    redis.stop()


def need_instances(c):
    if not all(c.inst.values()):
        pytest.skip("the replicas' /health has no instance id yet (the replica side of issue 14)")


def publish(c, base, op, chain_list=(), fp=None, layout=None, v="1"):
    """XADDs a KV event as replica `base` would."""
    info = chains({"messages": [{"role": "user", "content": "x"}]})
    fields = ["v", v, "inst", c.inst[base], "fp", fp or info["fp"], "layout", layout or info["layout"], "op", op]
    if op in ("store", "evict"):
        fields += ["chains", " ".join(chain_list)]
    c.redis.cmd("XADD", STREAM, "*", *fields)


def wait_blocks(c, base, at_least):
    """Until the router's index says replica `base` holds at_least blocks (from events)."""
    deadline = time.time() + 10
    while True:
        for r in health(c.router)["replicas"]:
            if r["url"] == base and r["blocks"] >= at_least:
                return
        assert time.time() < deadline, f"router did not index the events: {health(c.router)}"
        time.sleep(0.05)


# ------------------------------------------------------------------------------ tests
def test_forwards_the_api(cluster):
    rt = cluster.router
    st, r = post(rt.base, "/v1/chat/completions", chat("Say hi"))
    assert st == 200 and r["object"] == "chat.completion" and r["usage"]["prompt_tokens"] > 0
    st, r = post(rt.base, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 3})
    assert st == 200 and r["object"] == "text_completion"
    st, r = post(rt.base, "/v1/messages", {"model": "x", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]},
                 {"anthropic-version": "2023-06-01"})
    assert st == 200 and r["type"] == "message"
    st, r = post(rt.base, "/v1/messages/count_tokens", {"model": "x", "messages": [{"role": "user", "content": "Hi"}]})
    assert st == 200 and r["input_tokens"] > 0
    st, body = get(rt.base, "/v1/models")
    assert st == 200 and json.loads(body)["data"]
    st, body = get(rt.base, "/models")
    assert st == 200
    # the router's own endpoints
    h = health(rt)
    assert h["status"] == "ok" and h["healthy"] == 3 and h["redis"] == "connected"
    m = metrics(rt)
    assert m["pcache_router_redis_connected"] == 1
    assert sum(per_replica(m, "pcache_router_replica_healthy").values()) == 3


def test_bad_input_gets_the_replicas_errors(cluster):
    """Malformed requests are answered by the router in the replica's words (api.c's parser)."""
    rt, rep = cluster.router, cluster.reps[0]
    cases = [("/v1/chat/completions", '{"messages": 3}'), ("/v1/chat/completions", "{not json"),
             ("/v1/messages", '{"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}'),
             ("/v1/completions", '{"prompt": [1, 2, 99999999]}'), ("/v1/chat/completions", '{"messages": [], "n": 2}')]
    before = metrics(rt)
    for path, body in cases:
        assert post(rt.base, path, body) == post(rep.base, path, body), (path, body)
    after = metrics(rt)
    assert after["pcache_router_bad_requests_total"] - before["pcache_router_bad_requests_total"] == len(cases)
    # paths a replica does not serve: its own 404, forwarded
    assert get(rt.base, "/v1/nothing")[0] == 404


def test_routes_to_the_longest_prefix_holder(cluster):
    """Replica B holds 3 blocks of the prompt, C one: B gets it (events published by the test)."""
    need_instances(cluster)
    body = chat(DOC + "What did the keeper read in the evenings? (longest-prefix test)")
    ch = chains(body)["chains"]
    assert len(ch) >= 4
    _, b, c = (r.base for r in cluster.reps)
    publish(cluster, c, "store", ch[:1])
    publish(cluster, b, "store", ch[:3])
    wait_blocks(cluster, b, 3)
    before = metrics(cluster.router)
    (st, r), to = served_by(cluster.router, lambda: post(cluster.router.base, "/v1/chat/completions", body))
    assert st == 200 and to == [b]
    assert decision(metrics(cluster.router), "prefix") == decision(before, "prefix") + 1
    # an evict cuts B's run to one block: now B and C tie, and the less loaded (or affinity) wins;
    # then C holds 4 (all): C gets it
    publish(cluster, c, "store", ch[:4])
    publish(cluster, b, "evict", ch[1:2])
    wait_blocks(cluster, c, 4)
    (st, _), to = served_by(cluster.router, lambda: post(cluster.router.base, "/v1/chat/completions",
                                                         {**body, "max_tokens": 3}))
    assert st == 200 and to in ([b], [c])
    # (B served it before and the router predicted it holds the prompt: the replica's own
    # events, or the router's prediction, make B as good as C; either is right)


def test_router_names_blocks_as_the_replicas_do(cluster):
    """A router without predictions (--predict-ttl 0) routes a resend by prefix only from the
    replica's own KV events: the chain hashes it computes for each API's request are the ones the
    replica published for it (same tokenization, template, namespace)."""
    need_instances(cluster)
    if not serve_supports_redis():
        pytest.skip("the replicas publish no KV events yet (the replica side of issue 14)")
    rt = launch_router(cluster.dir, cluster.reps, ["--redis", cluster.redis.url, "--predict-ttl", "0"])
    try:
        text = "(naming test) What did the keeper log? " + DOC   # no block shared with the other tests' past the preamble
        cases = [("/v1/chat/completions", chat(text), {}),
                 ("/v1/completions", {"prompt": text, "max_tokens": 3}, {}),
                 ("/v1/messages", {"model": "x", "max_tokens": 3, "system": "Be brief.",
                                   "messages": [{"role": "user", "content": text}]}, {"x-api-key": "sk-naming"}),
                 ("/v1/responses", {"model": "x", "input": text, "max_output_tokens": 3, "store": False}, {}),
                 ("/v1/chat/completions", chat(text, cache_salt="salty"), {"Authorization": "Bearer sk-naming"})]
        for path, body, hdrs in cases:
            (st, _), to = served_by(rt, lambda: post(rt.base, path, body, hdrs))
            assert st == 200
            deadline = time.time() + 10
            m0 = metrics(rt)
            while True:   # until its events are in the router's index
                (st, _), to2 = served_by(rt, lambda: post(rt.base, path, body, hdrs))
                m1 = metrics(rt)
                if decision(m1, "prefix") > decision(m0, "prefix"):
                    break
                assert time.time() < deadline, (path, "a resend was never routed by the replica's events")
                m0 = m1
                time.sleep(0.2)
            assert st == 200 and to2 == to, (path, to, to2)
    finally:
        stop_router(rt)


def test_load_spreads_when_prefixes_are_equal(cluster):
    """All three hold the prefix the requests share: concurrent requests go to the least loaded."""
    need_instances(cluster)
    system = DOC * 2 + "(spreading test)"
    bodies = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}?"}],
               "max_tokens": 64, "ignore_eos": True, "temperature": 0} for i in range(6)]
    all_chains = [chains(b)["chains"] for b in bodies]
    shared = []   # the leading blocks all six have in common
    for blocks in zip(*all_chains):
        if len(set(blocks)) > 1:
            break
        shared.append(blocks[0])
    assert len(shared) >= 5
    for r in cluster.reps:
        publish(cluster, r.base, "store", shared)
    for r in cluster.reps:
        wait_blocks(cluster, r.base, len(shared))
    before = per_replica(metrics(cluster.router), "pcache_router_replica_requests_total")
    results = []
    threads = []
    for b in bodies:
        t = threading.Thread(target=lambda b=b: results.append(post(cluster.router.base, "/v1/chat/completions", b)))
        t.start()
        threads.append(t)
        time.sleep(0.1)   # each sees the ones before it in flight
    for t in threads:
        t.join()
    assert all(st == 200 for st, _ in results), results
    after = per_replica(metrics(cluster.router), "pcache_router_replica_requests_total")
    counts = sorted(after[u] - before.get(u, 0) for u in after)
    assert counts == [2, 2, 2], counts


def test_resend_goes_to_the_same_replica(cluster):
    """Every resend of a new prompt is a cache hit: the same replica, its prompt cached."""
    rt = cluster.router
    targets = set()
    for i in range(6):
        body = chat(f"Resend test {i}: what is {i} + {i}? {DOC}")   # new prompts: no shared prefix past the preamble
        (st1, r1), to1 = served_by(rt, lambda: post(rt.base, "/v1/chat/completions", body))
        (st2, r2), to2 = served_by(rt, lambda: post(rt.base, "/v1/chat/completions", body))
        assert st1 == st2 == 200 and to1 == to2, (to1, to2)
        assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] >= r2["usage"]["prompt_tokens"] - 1, r2["usage"]
        targets.add(to1[0])
    assert len(targets) >= 2, "six new prompts all went to one replica"


def test_prompt_cache_key_is_an_affinity(cluster):
    rt = cluster.router
    seen = set()
    for i in range(4):
        body = chat(f"Unrelated question number {i * 7919}", prompt_cache_key="user-4711")
        (st, _), to = served_by(rt, lambda: post(rt.base, "/v1/chat/completions", body))
        assert st == 200
        seen.update(to)
    assert len(seen) == 1, seen


def test_namespaces_do_not_attract(cluster):
    """Blocks of key A's prompt make A's request go there, not key B's request for the same text."""
    need_instances(cluster)
    rt = cluster.router
    body = chat(DOC + "(namespace test) Who kept the log?")
    ch_a = chains(body, key="sk-alpha")["chains"]
    ch_b = chains(body, key="sk-beta")["chains"]
    assert not set(ch_a) & set(ch_b)
    c = cluster.reps[2].base
    publish(cluster, c, "store", ch_a)
    wait_blocks(cluster, c, len(ch_a))
    m0 = metrics(rt)
    (st, _), to = served_by(rt, lambda: post(rt.base, "/v1/chat/completions", body, {"Authorization": "Bearer sk-beta"}))
    assert st == 200
    m1 = metrics(rt)
    assert decision(m1, "prefix") == decision(m0, "prefix")        # nothing of B's was anywhere
    (st, _), to = served_by(rt, lambda: post(rt.base, "/v1/chat/completions", body, {"x-api-key": "sk-alpha"}))
    assert st == 200 and to == [c]
    assert decision(metrics(rt), "prefix") == decision(m1, "prefix") + 1
    # cache_salt splits a namespace the same way
    assert chains({**body, "cache_salt": "s1"}, key="sk-alpha")["chains"][0] not in ch_a


def test_hello_resets_a_replica(cluster):
    # last of the tests that use the events: the router forgets what replica C really holds too,
    # and C will not announce those blocks again (it did not restart)
    need_instances(cluster)
    body = chat(DOC + "Which patterns did he find? (hello test)")
    ch = chains(body)["chains"]
    _, b, c = (r.base for r in cluster.reps)
    publish(cluster, c, "store", ch)
    wait_blocks(cluster, c, len(ch))
    before = health(cluster.router)["replicas"]
    publish(cluster, c, "hello")
    deadline = time.time() + 10
    while next(r for r in health(cluster.router)["replicas"] if r["url"] == c)["blocks"] >= len(ch):
        assert time.time() < deadline, (before, health(cluster.router))
        time.sleep(0.05)


def test_streaming_through_the_sdks(cluster):
    openai = pytest.importorskip("openai")
    anthropic = pytest.importorskip("anthropic")
    rt = cluster.router
    oc = openai.OpenAI(base_url=rt.base + "/v1", api_key="sk-sdk")
    msgs = [{"role": "user", "content": DOC + "Summarize the keeper's habits. (sdk test)"}]
    for attempt in range(2):
        parts, usage = [], None
        stream = oc.chat.completions.create(model="x", messages=msgs, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage:
                usage = chunk.usage
        assert parts and usage.completion_tokens > 0
        if attempt:   # the resend went to the replica that has it
            assert usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens - 1
    direct = oc.chat.completions.create(model="x", messages=msgs, max_tokens=12, temperature=0)
    assert direct.choices[0].message.content == "".join(parts)

    ac = anthropic.Anthropic(base_url=rt.base, api_key="sk-sdk")
    for attempt in range(2):
        with ac.messages.stream(model="x", max_tokens=12, messages=msgs) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
        assert text and final.usage.output_tokens > 0
        if attempt:
            assert final.usage.cache_read_input_tokens > 0


def test_responses_continue_on_their_replica(cluster):
    openai = pytest.importorskip("openai")
    rt = cluster.router
    oc = openai.OpenAI(base_url=rt.base + "/v1", api_key="sk-resp")
    r1 = oc.responses.create(model="x", input=DOC + "Name one thing the keeper logged.", max_output_tokens=8)
    # the next turns land where r1 is stored, whatever the affinity says
    for _ in range(3):
        r2 = oc.responses.create(model="x", previous_response_id=r1.id, input="And another?", max_output_tokens=8)
        assert r2.usage.input_tokens_details.cached_tokens > 0
    assert oc.responses.retrieve(r1.id).id == r1.id
    m = metrics(rt)
    assert decision(m, "response") >= 4


def test_redis_down_and_back(cluster):
    """Routing goes on without Redis (no errors), and the router reconnects when it is back."""
    rt, redis = cluster.router, cluster.redis
    redis.stop()
    deadline = time.time() + 10
    while health(rt)["redis"] != "disconnected":
        assert time.time() < deadline
        time.sleep(0.1)
    assert health(rt)["redis_error"], health(rt)   # why: the connection lost or refused
    for i in range(3):
        body = chat(f"Redis is down, question {i}")
        st1, _ = post(rt.base, "/v1/chat/completions", body)
        st2, r2 = post(rt.base, "/v1/chat/completions", body)
        assert st1 == st2 == 200
        assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] > 0   # the prediction still routes resends
    assert metrics(rt)["pcache_router_redis_connected"] == 0
    redis.start()
    deadline = time.time() + 15
    while health(rt)["redis"] != "connected":
        assert time.time() < deadline, health(rt)
        time.sleep(0.1)
    assert "redis_error" not in health(rt)
    assert metrics(rt)["pcache_router_redis_connects_total"] >= 2


# ------------------------------------------------------------------------------ failover
def sse_events(resp):
    """Yields the data lines of an SSE http.client response, as they come."""
    buf = b""
    while True:
        chunk = resp.read1(4096) if hasattr(resp, "read1") else resp.read(1)
        if not chunk:
            if buf.strip():
                yield buf.decode()
            return
        buf += chunk
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            yield ev.decode()


def open_stream(rt, path, body, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=120)
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    conn.request("POST", path, json.dumps(body), h)
    resp = conn.getresponse()
    return conn, resp


@pytest.mark.parametrize("anthropic_api", [False, True])
def test_failover(tmp_path, anthropic_api):
    """A replica killed mid-run: requests not yet streaming are retried elsewhere (all succeed);
    a stream it was sending ends with the API's error event; the dead replica gets nothing more."""
    reps = [launch(tmp_path, ["--kv-mem", "64M", "-t", "1"], keys=()) for _ in range(2)]
    rt = launch_router(tmp_path, reps)
    try:
        path = "/v1/messages" if anthropic_api else "/v1/chat/completions"
        hdrs = {"anthropic-version": "2023-06-01"} if anthropic_api else {}

        def body(text, n, stream=False):
            b = {"model": "x", "messages": [{"role": "user", "content": text}], "max_tokens": n, "stream": stream}
            if not anthropic_api:
                b["ignore_eos"] = True
            return b

        # a long stream; once it is flowing, its replica is the loaded one
        conn, resp = open_stream(rt, path, body("Tell me a very long story about the sea.", 400, True), hdrs)
        assert resp.status == 200
        events = sse_events(resp)
        first = next(events)
        assert "data:" in first
        loads = {r["url"]: r["load"] for r in health(rt)["replicas"]}
        victim = max(loads, key=loads.get)
        assert loads[victim] >= 1, loads
        victim_rep = next(r for r in reps if r.base == victim)
        # non-streamed requests in flight, some of them on the victim
        results = []

        def one(i):
            results.append(post(rt.base, path, body(f"Failover question {i}: count to twenty.", 40), hdrs))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        victim_rep.proc.send_signal(signal.SIGKILL)
        victim_rep.proc.wait()
        rest = list(events)
        conn.close()
        for t in threads:
            t.join()
        assert [st for st, _ in results] == [200] * 6, results
        tail = "\n".join(rest[-2:])
        if anthropic_api:
            assert "event: error" in tail and '"type":"error"' in tail, rest[-3:]
        else:
            assert '"error"' in tail and rest[-1].strip() == "data: [DONE]", rest[-3:]
        m = metrics(rt)
        assert m["pcache_router_streams_broken_total"] == 1
        assert per_replica(m, "pcache_router_replica_healthy")[victim] == 0
        # nothing more goes to the dead one
        before = per_replica(m, "pcache_router_replica_requests_total")
        for i in range(4):
            assert post(rt.base, path, body(f"After the failover {i}", 3), hdrs)[0] == 200
        after = per_replica(metrics(rt), "pcache_router_replica_requests_total")
        assert after[victim] == before[victim]
    finally:
        stop_router(rt)
        for r in reps:
            if r.proc.poll() is None:
                stop(r)


def test_no_healthy_replica(tmp_path):
    rep = launch(tmp_path, ["--kv-mem", "32M", "-t", "1"], keys=())
    rt = launch_router(tmp_path, [rep], ["--api-key", "sk-only"])
    try:
        # keys are checked at the router, as a replica would
        st, r = post(rt.base, "/v1/chat/completions", chat("hi"))
        assert st == 401 and r["error"]["code"] == "invalid_api_key"
        st, r = post(rt.base, "/v1/messages", {"max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
        assert st == 401 and r["error"]["type"] == "authentication_error"
        assert post(rt.base, "/v1/chat/completions", chat("hi"), {"Authorization": "Bearer sk-only"})[0] == 200
        stop(rep)
        st, r = post(rt.base, "/v1/chat/completions", chat("hi"), {"Authorization": "Bearer sk-only"})
        assert st in (502, 503) and r["error"]["type"] == "server_error"
        st, r = post(rt.base, "/v1/messages", {"max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]},
                     {"x-api-key": "sk-only"})
        assert st in (502, 503) and r["type"] == "error"
        deadline = time.time() + 10
        while True:
            try:
                health(rt)
            except urllib.error.HTTPError as e:
                assert e.code == 503
                break
            assert time.time() < deadline
            time.sleep(0.1)
    finally:
        stop_router(rt)
