"""The cluster (issue 14) against a redis-server that wants a password (--requirepass), end to end.

Replica A gets the password in its URL (percent-escaped: it holds a space, '@', ':' and '/'),
replica B from REDIS_PASSWORD with a URL that has none: both connect, say hello, and A's blocks
reach Redis, from where B serves them. Replica C has a wrong password: it answers every
request from its own cache, says once in its log that AUTH failed (and never prints a password),
counts the failed connects in /metrics without retrying in a hot loop, and publishes nothing.
`pcache route --redis` authenticates too (in the URL or from REDIS_PASSWORD): it reads the
replicas' events and routes a prefix to the replica that holds it. A router without the password
(or with a wrong one) keeps routing, says so once, and backs off: it does not count a connect and a
loss per try (it did: NOAUTH came only at XREAD, 4 connects a second, two log lines each)."""
import json
import os
import sys
import time
import urllib.parse

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from server_fixture import KEYS, launch, stop  # noqa: E402
from redis_fixture import RedisError, RedisServer, Resp, stream_events  # noqa: E402
from test_cluster_redis import complete, health, metric, ns_of, chains, tokenize, wait_for, written  # noqa: E402
from router_fixture import launch_router, stop_router  # noqa: E402

requests = pytest.importorskip("requests")
if not __import__("shutil").which("redis-server"):
    pytest.skip("redis-server is not installed (scripts/install-deps.sh test)", allow_module_level=True)

PASSWORD = "s3cret p@ss:w/rd"
WRONG = "not-the-Passw0rd"
DOC = ("The cartographer drew the coastline twice, once from the ship and once from the cliffs, and the "
       "two maps never agreed about the shape of the bay. ") * 6
DOC2 = ("At the top of the bell tower the clockmaker kept a notebook of every repair, the date, the weather "
        "and the number of steps he had climbed that day. ") * 6
DOC3 = ("The ferry to the island ran twice a day in summer and once in winter, and the captain knew every "
        "passenger by name. ") * 6


def url(password=None, port=None):
    auth = f":{urllib.parse.quote(password, safe='')}@" if password is not None else ""
    return f"redis://{auth}127.0.0.1:{port}"


def blocks_of(rt, srv):
    return next(r["blocks"] for r in health(rt)["replicas"] if r["url"] == srv.base)


def served_by(rt, fn):
    """fn()'s result and the replicas (URLs) the router sent requests to meanwhile."""
    def per_replica():
        text = requests.get(rt.base + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line.startswith('pcache_router_replica_requests_total{replica="'):
                k, v = line.rsplit(" ", 1)
                out[k.split('"')[1]] = float(v)
        return out
    before = per_replica()
    res = fn()
    after = per_replica()
    return res, [u for u in after if after[u] > before.get(u, 0)]


@pytest.fixture(scope="module")
def prompts():
    return {"a": tokenize(DOC + "Which of the two maps was right?"),
            "c": tokenize(DOC2 + "How many steps were there?")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    red = RedisServer(password=PASSWORD).start()
    d = tmp_path_factory.mktemp("auth")
    reps = []
    try:
        reps.append(launch(d, ["--kv-mem", "64M", "--redis", url(PASSWORD, red.port)]))
        reps.append(launch(d, ["--kv-mem", "64M", "--redis", red.url], env_extra={"REDIS_PASSWORD": PASSWORD}))
        t0 = time.time()
        reps.append(launch(d, ["--kv-mem", "64M", "--redis", url(WRONG, red.port)]))
        reps[-1].started = t0
        yield (red, *reps)
    finally:
        for s in reps:
            stop(s)
        red.close()


def test_redis_wants_the_password(cluster):
    red = cluster[0]
    with Resp(red.port) as c, pytest.raises(RedisError, match="NOAUTH"):
        c.cmd("XLEN", "pcache:kv:events")


def test_password_in_the_url(cluster, prompts):
    red, a, b, c = cluster
    wait_for(lambda: metric(a, "pcache_redis_connected") == 1, what="A connected")
    h = health(a)
    ids = prompts["a"]
    assert complete(a, ids)[2] < 16
    want = chains(h["fingerprint"], "30x192", ids, ns_of(KEYS[0]))
    written(a, len(want))
    with red.client() as r:
        ev = [e for e in stream_events(r) if e["inst"] == h["instance"]]
        assert ev and ev[0]["op"] == "hello"
        assert set(want) <= {ch for e in ev if e["op"] == "store" for ch in e["chains"].split()}
        for ch in want:
            assert r.cmd("GET", f"pcache:kv:blk:{h['fingerprint']}:{ch}")[:8] == b"PCKVBLK1"
    assert metric(a, "pcache_redis_errors_total") == 0 and metric(a, "pcache_redis_reconnects_total") == 0


def test_password_from_the_environment(cluster, prompts):
    """B's URL has no password: REDIS_PASSWORD's. It reads A's blocks from Redis."""
    red, a, b, c = cluster
    wait_for(lambda: metric(b, "pcache_redis_connected") == 1, what="B connected")
    with red.client() as r:
        assert health(b)["instance"] in {e["inst"] for e in stream_events(r) if e["op"] == "hello"}
    ids = prompts["a"]   # computed by A above
    want_a = complete(a, ids)[:2]
    tokens0 = metric(b, "pcache_redis_tokens_served_total")
    text, top, cached = complete(b, ids)
    assert cached == (len(ids) - 1) // 16 * 16
    assert (text, top) == want_a
    assert metric(b, "pcache_redis_tokens_served_total") - tokens0 == cached
    assert metric(b, "pcache_redis_errors_total") == 0


def test_wrong_password_serves_locally(cluster, prompts):
    red, a, b, c = cluster
    ids = prompts["c"]
    reference = complete(a, ids)[:2]
    for i in range(3):
        text, top, cached = complete(c, ids)
        assert (text, top) == reference
        assert cached == (0 if i == 0 else len(ids) - 1)   # its own cache
    assert metric(c, "pcache_redis_connected") == 0 and metric(c, "pcache_redis_reconnects_total") == 0
    assert metric(c, "pcache_redis_blocks_written_total") == 0
    assert metric(c, "pcache_redis_events_published_total") == 0
    time.sleep(2)
    # every failed connect counted; the retries back off (0.1 s doubling, up to 5 s, +-25%):
    # 6 in the first 6.3 s, then one every 3.75 s at most; not a hot loop
    errors, up_s = metric(c, "pcache_redis_errors_total"), time.time() - c.started
    assert 2 <= errors <= 8 + up_s / 3.75, (errors, up_s)
    log = open(c.log_path, errors="replace").read()
    auth_lines = [ln for ln in log.splitlines() if "redis" in ln and "WRONGPASS" in ln]
    assert len(auth_lines) == 1, log[-3000:]
    assert "AUTH" in auth_lines[0]
    assert WRONG not in log and urllib.parse.quote(WRONG) not in log
    with red.client() as r:
        insts = {e["inst"] for e in stream_events(r)}
    assert health(c)["instance"] not in insts
    for s in (a, b):
        assert PASSWORD not in open(s.log_path, errors="replace").read()


@pytest.mark.parametrize("how", ["url", "env"])
def test_router_authenticates(cluster, prompts, tmp_path, how):
    """The router reads the replicas' events from the protected Redis and routes a prefix that
    A alone computed to A (no predictions: --predict-ttl 0, so only A's events can say so)."""
    red, a, b, c = cluster
    if how == "url":
        rt = launch_router(tmp_path, [a, b], ["--redis", url(PASSWORD, red.port), "--predict-ttl", "0"])
    else:
        rt = launch_router(tmp_path, [a, b], ["--redis", red.url, "--predict-ttl", "0"],
                           env_extra={"REDIS_PASSWORD": PASSWORD})
    try:
        wait_for(lambda: health(rt)["redis"] == "connected", what="the router connected")
        # the events so far (hellos, A's and B's stores) are read from the start
        wait_for(lambda: blocks_of(rt, a) > 0 and blocks_of(rt, b) > 0, what="the router's index")
        text = requests.get(rt.base + "/metrics", timeout=10).text
        assert 'pcache_router_kv_events_total{outcome="applied"} 0\n' not in text
        assert "pcache_router_redis_connected 1\n" in text and "pcache_router_redis_errors_total 0\n" in text
        ids = tokenize(f"({how}) " + DOC3 + "What was the captain's name?")
        n0 = blocks_of(rt, a)
        assert complete(a, ids)[2] < 16   # A computes it (not through the router)
        wait_for(lambda: blocks_of(rt, a) >= n0 + len(ids) // 16, what="A's store event at the router")
        r0 = requests.get(rt.base + "/metrics", timeout=10).text
        (_, _, cached), to = served_by(rt, lambda: complete(rt, ids))
        assert to == [a.base] and cached == len(ids) - 1
        r1 = requests.get(rt.base + "/metrics", timeout=10).text
        pre = 'pcache_router_decisions_total{reason="prefix"} '
        count = lambda t: float(next(ln for ln in t.splitlines() if ln.startswith(pre)).split()[-1])  # noqa: E731
        assert count(r1) == count(r0) + 1
        assert PASSWORD not in rt.log()
    finally:
        stop_router(rt)


@pytest.mark.parametrize("password", [None, WRONG])
def test_router_without_the_password(cluster, prompts, tmp_path, password):
    """Routing goes on without events; the refusal is one log line and a counter, and the router
    backs off rather than connecting and losing the stream several times a second."""
    red, a, b, c = cluster
    t0 = time.time()
    rt = launch_router(tmp_path, [a, b], ["--redis", url(password, red.port)])
    try:
        complete(rt, prompts["a"], max_tokens=2)
        wait_for(lambda: metric(rt, "pcache_router_redis_errors_total") >= 1, what="the refusal counted")
        time.sleep(3)
        h = health(rt)
        assert h["redis"] == "disconnected"
        assert ("NOAUTH" if password is None else "WRONGPASS") in h["redis_error"], h   # /health says why
        assert WRONG not in json.dumps(h)
        assert metric(rt, "pcache_router_redis_connected") == 0
        assert metric(rt, "pcache_router_redis_connects_total") == 0
        errors, up_s = metric(rt, "pcache_router_redis_errors_total"), time.time() - t0
        assert errors <= 5 + up_s / 3.75, (errors, up_s)   # 0.25 s doubling, up to 5 s
        log = rt.log()
        lines = [ln for ln in log.splitlines() if "redis 127.0.0.1:" in ln]
        assert len(lines) == 1 and ("NOAUTH" if password is None else "WRONGPASS") in lines[0], log
        assert WRONG not in log
    finally:
        stop_router(rt)
