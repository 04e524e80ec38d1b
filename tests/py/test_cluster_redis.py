"""The replica's side of the cluster (issue 14) end to end: a real redis-server (temporary
directory, free port, no persistence) and two `pcache serve --redis` replicas on loopback.
/health names the instance, the model fingerprint and the queue; the KV event stream carries a
hello per replica and store events whose chains are the prompt's (computed independently by
`pcache-tool kv-chains` from the token ids sent); replica B serves a prefix replica A computed,
from Redis (cached tokens reported, text and log-probabilities identical to a server without
any cache); another API key gets none of it; a corrupted record is refused and counted; Redis
killed and restarted mid-run costs no request, is counted, and the replicas say hello again and
re-announce what they hold. The C tests (tests/c/test_redis.c) compare logits bit for bit."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from server_fixture import BUILD, KEYS, MODEL, launch, stop  # noqa: E402
from redis_fixture import RedisServer, stream_events  # noqa: E402

requests = pytest.importorskip("requests")
if not __import__("shutil").which("redis-server"):
    pytest.skip("redis-server is not installed (scripts/install-deps.sh test)", allow_module_level=True)

DOC = ("The lighthouse keeper kept a log of every ship that passed the northern cape: its name, its flag, "
       "the hour, the weather and the state of the sea. ") * 6
DOC2 = ("In the valley below the old mill, the river split in two around an island of willows where herons "
        "nested every spring. ") * 6
DOC3 = ("The orchestra tuned for an hour before the concert, the oboe giving the A and the strings answering "
        "it one desk at a time. ") * 6
DOC4 = ("The caravan crossed the salt flats at night, guided by a boy who read the stars and sang to the "
        "camels. ") * 6
MORE = [("Every morning the baker on Quay Street lit the ovens at four and sold the first loaves by six, "
         "always to the same fishermen. ") * 3 + f"Question {i}: what happened next?" for i in range(6)]


def tokenize(text):
    r = subprocess.run([os.path.join(BUILD, "pcache-tool"), "tokenize", MODEL], input=text.encode(),
                       capture_output=True, check=True)
    return json.loads(r.stdout)


def ns_of(key):
    """The server's namespace of an API key ("k" + FNV-1a-64 hex; server_key_namespace)."""
    h = 1469598103934665603
    for b in key.encode():
        h = ((h ^ b) * 1099511628211) & (2 ** 64 - 1)
    return "k%016x" % h


def chains(fp, layout, ids, ns=""):
    r = subprocess.run([os.path.join(BUILD, "pcache-tool"), "kv-chains", fp, layout, ns],
                       input=json.dumps(ids).encode(), capture_output=True, check=True)
    return json.loads(r.stdout)


def complete(srv, ids, key=KEYS[0], max_tokens=8):
    r = requests.post(srv.base + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=300,
                      json={"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "logprobs": 5})
    assert r.status_code == 200, r.text
    j = r.json()
    lp = j["choices"][0].get("logprobs") or {}
    return (j["choices"][0]["text"], (lp.get("top_logprobs") or [None])[0],
            j["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0))


def metric(srv, name, labels=""):
    text = requests.get(srv.base + "/metrics", timeout=10).text
    m = re.search(rf"^{name}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def wait_for(cond, timeout=15, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def written(srv, n):
    """Waits until srv wrote at least n blocks to Redis and has none queued."""
    wait_for(lambda: (metric(srv, "pcache_redis_blocks_written_total") or 0) >= n
             and metric(srv, "pcache_redis_write_queue") == 0, what=f"{n} blocks written")


def health(srv):
    r = requests.get(srv.base + "/health", timeout=10)
    assert r.status_code == 200
    return r.json()


@pytest.fixture(scope="module")
def prompts():
    return {name: tokenize(text) for name, text in
            [("shared", DOC + "On the last page of the log, the keeper wrote that"),
             ("ns", DOC2 + "One spring the herons did not come back, because"),
             ("bad", DOC3 + "Who gave the A?"), ("stall", DOC4 + "When the sun rose, the boy")] + [(f"more{i}", t) for i, t in enumerate(MORE)]}


@pytest.fixture(scope="module")
def cold(tmp_path_factory, prompts):
    """Answers of a server without any cache: the reference."""
    srv = launch(tmp_path_factory.mktemp("cold"), ["--kv-mem", "64M", "--no-cache"])
    try:
        ans = {k: complete(srv, ids)[:2] for k, ids in prompts.items()}
        assert all(text and top for text, top in ans.values()), ans   # texts to compare, not an end at once
        yield ans
    finally:
        stop(srv)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    red = RedisServer().start()
    d = tmp_path_factory.mktemp("cluster")
    a = b = None
    try:
        a = launch(d, ["--kv-mem", "64M", "--redis", red.url])
        b = launch(d, ["--kv-mem", "64M", "--redis", red.url])
        yield red, a, b
    finally:
        for s in (a, b):
            if s:
                stop(s)
        red.close()


def test_health_and_hello(cluster):
    red, a, b = cluster
    ha, hb = health(a), health(b)
    for h in (ha, hb):
        assert h["status"] == "ok" and re.fullmatch("[0-9a-f]{16}", h["instance"])
        assert re.fullmatch("[0-9a-f]{16}", h["fingerprint"]) and h["queue"] == 0
    assert ha["instance"] != hb["instance"] and ha["fingerprint"] == hb["fingerprint"]
    wait_for(lambda: metric(a, "pcache_redis_connected") == 1 and metric(b, "pcache_redis_connected") == 1,
             what="both connected")
    with red.client() as c:
        ev = stream_events(c)
    hellos = {e["inst"] for e in ev if e["op"] == "hello"}
    assert {ha["instance"], hb["instance"]} <= hellos
    for e in ev:
        assert e["v"] == "1" and e["fp"] == ha["fingerprint"] and e["layout"] == "30x192"


def test_store_events_and_records(cluster, prompts, cold):
    red, a, b = cluster
    ids = prompts["shared"]
    h = health(a)
    text, top, cached = complete(a, ids)
    assert cached == 0 and (text, top) == cold["shared"]
    want = chains(h["fingerprint"], "30x192", ids, ns_of(KEYS[0]))
    assert len(want) == len(ids) // 16
    written(a, len(want))
    with red.client() as c:
        announced = set()
        for e in stream_events(c):
            if e["inst"] == h["instance"] and e["op"] == "store":
                assert re.fullmatch("[0-9a-f]{16}( [0-9a-f]{16})*", e["chains"])
                announced |= set(e["chains"].split())
        assert set(want) <= announced
        for ch in want:
            key = f"pcache:kv:blk:{h['fingerprint']}:{ch}"
            pttl = c.cmd("PTTL", key)
            assert 250_000 < pttl <= 300_000, (key, pttl)   # --cache-ttl's 5 minutes
            rec = c.cmd("GET", key)
            assert rec[:8] == b"PCKVBLK1"
    assert metric(a, "pcache_redis_announced_blocks") >= len(want)


def test_replica_pulls_prefix(cluster, prompts, cold):
    red, a, b = cluster
    ids = prompts["shared"]   # computed by A in the test above
    tokens0 = metric(b, "pcache_redis_tokens_served_total")
    text, top, cached = complete(b, ids)
    assert cached == (len(ids) - 1) // 16 * 16
    assert (text, top) == cold["shared"]
    assert metric(b, "pcache_redis_tokens_served_total") - tokens0 == cached
    assert metric(b, "pcache_redis_decisions_total", '{decision="fetch"}') >= 1
    assert metric(b, "pcache_redis_bad_records_total") == 0
    # B now holds it itself (and said so)
    hb = health(b)
    want = chains(hb["fingerprint"], "30x192", ids, ns_of(KEYS[0]))
    with red.client() as c:
        wait_for(lambda: set(want[:cached // 16]) <= {ch for e in stream_events(c)
                                                      if e["inst"] == hb["instance"] and e["op"] == "store"
                                                      for ch in e["chains"].split()}, what="B's store event")
    assert complete(b, ids)[2] == len(ids) - 1


def test_namespaces_across_replicas(cluster, prompts, cold):
    red, a, b = cluster
    ids = prompts["ns"]
    assert complete(a, ids, key=KEYS[0])[2] < 16
    written(a, len(ids) // 16)
    hits0 = metric(b, "pcache_redis_read_hits_total")
    text, top, cached = complete(b, ids, key=KEYS[1])   # another key: another namespace
    assert cached == 0 and (text, top) == cold["ns"]
    assert metric(b, "pcache_redis_read_hits_total") == hits0
    # the same key on B does get A's blocks
    assert complete(b, ids, key=KEYS[0])[2] == (len(ids) - 1) // 16 * 16


def test_corrupt_record_refused(cluster, prompts, cold):
    red, a, b = cluster
    ids = prompts["bad"]
    assert complete(a, ids)[2] < 16   # (at most a first token shared with earlier prompts)
    written(a, len(ids) // 16)
    fp = health(a)["fingerprint"]
    want = chains(fp, "30x192", ids, ns_of(KEYS[0]))
    with red.client() as c:
        key = f"pcache:kv:blk:{fp}:{want[3]}"
        byte = c.cmd("GETRANGE", key, 1000, 1000)
        c.cmd("SETRANGE", key, 1000, bytes([byte[0] ^ 0x40]))
    bad0 = metric(b, "pcache_redis_bad_records_total")
    text, top, cached = complete(b, ids)
    assert cached == 3 * 16   # the blocks before the bad one
    assert (text, top) == cold["bad"]
    assert metric(b, "pcache_redis_bad_records_total") == bad0 + 1


def test_redis_stalled(cluster, prompts, cold):
    """Redis stopped (SIGSTOP: connections accepted, never answered) while B would fetch a
    prefix: B's read times out (--redis-timeout, 1 s), it computes instead, and answers."""
    red, a, b = cluster
    ids = prompts["stall"]
    assert complete(a, ids)[2] < 16   # (at most a first token shared with earlier prompts)
    written(a, len(ids) // 16)
    t0 = time.time()
    assert complete(b, ids, key=KEYS[1])[2] == 0   # what computing it costs (another namespace)
    compute_s = time.time() - t0
    err0 = metric(b, "pcache_redis_errors_total")
    red.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.time()
        text, top, cached = complete(b, ids)
        took = time.time() - t0
    finally:
        red.proc.send_signal(signal.SIGCONT)
    assert (text, top) == cold["stall"]
    assert took < 1.5 * compute_s + 3, (took, compute_s)   # one timeout (1 s), then computed
    assert metric(b, "pcache_redis_errors_total") > err0
    wait_for(lambda: metric(a, "pcache_redis_connected") == 1 and metric(b, "pcache_redis_connected") == 1,
             timeout=30, what="both replicas to reconnect")


def test_redis_killed_and_restarted(cluster, prompts, cold):
    red, a, b = cluster
    insts = {health(a)["instance"], health(b)["instance"]}
    errors, answers = [], []
    stop_flag = threading.Event()

    def client(srv, names):
        i = 0
        while not stop_flag.is_set():
            name = names[i % len(names)]
            i += 1
            try:
                answers.append((name, complete(srv, prompts[name])[:2]))
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
    threads = [threading.Thread(target=client, args=(a, ["more0", "more1", "more2"])),
               threading.Thread(target=client, args=(b, ["more3", "more4", "more5"]))]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(answers) >= 2, timeout=300, what="answers before the kill")
        red.kill()
        wait_for(lambda: metric(a, "pcache_redis_connected") == 0 and metric(b, "pcache_redis_connected") == 0,
                 what="both replicas to notice")
        n_down = len(answers)
        wait_for(lambda: len(answers) >= n_down + 2, timeout=300, what="answers while Redis is down")
        red.start()
        wait_for(lambda: metric(a, "pcache_redis_connected") == 1 and metric(b, "pcache_redis_connected") == 1,
                 timeout=30, what="both replicas to reconnect")
        n_up = len(answers)
        wait_for(lambda: len(answers) >= n_up + 2, timeout=300, what="answers after the reconnect")
    finally:
        stop_flag.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert answers and all(ans == cold[name] for name, ans in answers)
    for s in (a, b):
        assert metric(s, "pcache_redis_reconnects_total") >= 1
        assert metric(s, "pcache_redis_errors_total") >= 1
    # the new Redis (empty: no persistence) heard hello from both, then what each holds
    fp = health(a)["fingerprint"]
    want = set(chains(fp, "30x192", prompts["more0"], ns_of(KEYS[0])))
    with red.client() as c:
        def resynced():
            ev = stream_events(c)
            stores = {ch for e in ev if e["op"] == "store" and e["inst"] == health(a)["instance"] for ch in e["chains"].split()}
            return insts <= {e["inst"] for e in ev if e["op"] == "hello"} and want <= stores
        wait_for(resynced, what="hello and the re-announced blocks")
