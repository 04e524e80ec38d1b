"""End-to-end tests of the cache tiers below the KV pool (issue 11) through `pcache serve`:
a restart with the same --cache-dir serves earlier prefixes (cached_tokens, the same greedy
text and first-token log-probabilities as a cold server), corrupt and foreign block files are
refused and counted, servers killed with SIGKILL while writing never lead to a wrong answer,
the --cache-disk bound, namespaces (API keys) after a restart, /metrics, bad directories, and
`pcache cache stats|clear`. The C tests (tests/c/test_tiers.c) compare logits bit for bit."""
import glob
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from server_fixture import BUILD, KEYS, MODEL, launch, stop  # noqa: E402

requests = pytest.importorskip("requests")

DOC = ("The lighthouse keeper kept a log of every ship that passed the northern cape: its name, its flag, "
       "the hour, the weather and the state of the sea. ") * 8
QUESTIONS = ["Summarize the log in one sentence.", "What did the keeper record?", "Name one thing in the log."]


def complete(srv, prompt, key=KEYS[0], max_tokens=8):
    h = {"Authorization": f"Bearer {key}"}
    model = requests.get(srv.base + "/v1/models", headers=h, timeout=30).json()["data"][0]["id"]
    r = requests.post(srv.base + "/v1/completions", headers=h, timeout=300,
                      json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 5})
    assert r.status_code == 200, r.text
    j = r.json()
    lp = j["choices"][0].get("logprobs") or {}
    return (j["choices"][0]["text"], (lp.get("top_logprobs") or [None])[0],
            j["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0), j["usage"]["prompt_tokens"])


def metric(srv, name, tier=None):
    text = requests.get(srv.base + "/metrics", timeout=10).text
    lab = rf'\{{tier="{tier}"\}}' if tier else ""
    m = re.search(rf"^{name}{lab} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else None


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """Answers of a server without any cache: the reference."""
    srv = launch(tmp_path_factory.mktemp("cold"), ["--kv-mem", "64M", "--no-cache"])
    try:
        yield {q: complete(srv, DOC + q)[:2] for q in QUESTIONS}
    finally:
        stop(srv)


def test_restart_serves_earlier_prefixes(tmp_path, cold):
    cache = str(tmp_path / "cache")
    srv = launch(tmp_path, ["--kv-mem", "64M", "--cache-dir", cache])
    text, top, cached, n = complete(srv, DOC + QUESTIONS[0])
    assert cached == 0 and (text, top) == cold[QUESTIONS[0]]
    assert metric(srv, "pcache_cache_tier_blocks", "disk") is not None
    stop(srv)   # a clean stop finishes the queued writes
    srv = launch(tmp_path, ["--kv-mem", "64M", "--cache-dir", cache])
    try:
        for q in QUESTIONS:
            text, top, cached, n = complete(srv, DOC + q)
            assert (text, top) == cold[q]
            assert cached >= len(DOC) // 8 // 16 * 16 // 2 and cached > 0   # the shared document, from disk
        assert metric(srv, "pcache_cache_tier_promotions_total", "disk") > 0
        assert metric(srv, "pcache_cache_tier_tokens_served_total", "disk") > 0
        assert metric(srv, "pcache_cache_tier_hits_total", "disk") >= 1
    finally:
        stop(srv)


def test_host_tier_brings_back_evicted_prefixes(tmp_path, cold):
    """A prefix pushed out of a small KV pool by other documents is brought back from the host-RAM
    tier (--cache-host-mem, no disk): counted as cached tokens and as host promotions, with the
    cold server's answer. On the CUDA backend (PCACHE_SERVE_ARGS="--device cuda") the blocks go
    through pinned memory and the copy stream."""
    srv = launch(tmp_path, ["--kv-mem", "16M", "--cache-host-mem", "256M"])
    try:
        text, top, cached, n = complete(srv, DOC + QUESTIONS[0])
        assert cached == 0 and (text, top) == cold[QUESTIONS[0]]
        for i in range(8):   # other documents, 4.5x the pool in all (the host tier holds them all)
            complete(srv, f"Report {i}. " + " ".join(f"item{i}-{j} weighs {j * 7 % 13} kilograms," for j in range(40)))
        before = metric(srv, "pcache_cache_tier_promotions_total", "host") or 0
        text, top, cached, n = complete(srv, DOC + QUESTIONS[1])
        assert (text, top) == cold[QUESTIONS[1]]
        assert cached >= len(DOC) // 8 // 16 * 16 // 2, cached
        assert metric(srv, "pcache_cache_tier_promotions_total", "host") > before
        assert metric(srv, "pcache_cache_tier_tokens_served_total", "host") > 0
    finally:
        stop(srv)


def test_corrupt_and_foreign_files_are_refused(tmp_path, cold):
    cache = str(tmp_path / "cache")
    srv = launch(tmp_path, ["--kv-mem", "64M", "--cache-dir", cache])
    complete(srv, DOC + QUESTIONS[1])
    stop(srv)
    files = sorted(glob.glob(os.path.join(cache, "*", "*.kvb")))
    assert len(files) > 6
    random.Random(3).shuffle(files)
    with open(files[0], "r+b") as f:   # flipped byte
        f.seek(os.path.getsize(files[0]) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x20]))
    with open(files[1], "r+b") as f:   # truncated
        f.truncate(os.path.getsize(files[1]) // 3)
    with open(files[2], "rb") as f:    # foreign: a record under another chain's name
        data = f.read()
    with open(os.path.join(os.path.dirname(files[2]), "00000000deadbeef.kvb"), "wb") as f:
        f.write(data)
    srv = launch(tmp_path, ["--kv-mem", "64M", "--cache-dir", cache])
    try:
        assert metric(srv, "pcache_cache_tier_checksum_failures_total", "disk") == 3
        for q in QUESTIONS[:2]:
            text, top, cached, n = complete(srv, DOC + q)
            assert (text, top) == cold[q]
    finally:
        stop(srv)


def test_sigkill_while_writing_never_gives_wrong_answers(tmp_path, cold):
    cache = str(tmp_path / "cache")
    rng = random.Random(7)
    for _ in range(4):
        srv = launch(tmp_path, ["--kv-mem", "64M", "--cache-dir", cache])
        import threading

        def traffic():
            try:
                for i in range(6):
                    complete(srv, DOC[: 200 + 97 * i] + QUESTIONS[i % 3], max_tokens=4)
            except Exception:
                pass
        t = threading.Thread(target=traffic, daemon=True)
        t.start()
        time.sleep(rng.uniform(0.3, 2.5))
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait()
        t.join(timeout=60)
    srv = launch(tmp_path, ["--kv-mem", "64M", "--cache-dir", cache])
    try:
        for q in QUESTIONS:
            text, top, cached, n = complete(srv, DOC + q)
            assert (text, top) == cold[q]
    finally:
        stop(srv)


def test_disk_bound_and_namespaces_after_restart(tmp_path):
    cache = str(tmp_path / "cache")
    srv = launch(tmp_path, ["--kv-mem", "64M", "--cache-dir", cache, "--cache-disk", "16M"])
    for i in range(4):
        complete(srv, f"Document {i}. " + DOC, key=KEYS[0], max_tokens=2)
    assert metric(srv, "pcache_cache_tier_bytes", "disk") <= 16 << 20
    stop(srv)
    total = sum(os.path.getsize(f) for f in glob.glob(os.path.join(cache, "*", "*.kvb")))
    assert 0 < total <= 16 << 20
    srv = launch(tmp_path, ["--kv-mem", "64M", "--cache-dir", cache, "--cache-disk", "16M"])
    try:
        _, _, cached_b, _ = complete(srv, "Document 3. " + DOC, key=KEYS[1], max_tokens=2)
        assert cached_b == 0                    # another tenant (API key) never finds a's blocks
        _, _, cached_a, _ = complete(srv, "Document 3. " + DOC, key=KEYS[0], max_tokens=2)
        assert cached_a > 0
    finally:
        stop(srv)


def run_pcache(*args):
    return subprocess.run([os.path.join(BUILD, "pcache"), *args], capture_output=True, text=True, timeout=300)


def test_cache_tool_and_bad_dirs(tmp_path):
    cache = str(tmp_path / "cache")
    r = run_pcache("run", "-m", MODEL, "-t", "2", "-n", "2", "--temp", "0", "--cache-dir", cache, DOC)
    assert r.returncode == 0, r.stderr
    r = run_pcache("cache", "stats", "--cache-dir", cache, "-m", MODEL)
    assert r.returncode == 0, r.stderr
    m = re.search(r"blocks=(\d+) bytes=(\d+) bad_files=0", r.stdout)
    assert m and int(m.group(1)) > 0, r.stdout
    r = run_pcache("cache", "clear", "--cache-dir", cache)
    assert r.returncode == 0 and "cleared" in r.stdout, r.stdout + r.stderr
    r = run_pcache("cache", "stats", "--cache-dir", cache)
    assert "model_fp=" not in r.stdout and "stores=0" in r.stdout
    f = tmp_path / "file"
    f.write_text("x")
    for args in (["run", "-m", MODEL, "-n", "1", "--cache-dir", str(f), "hi"],
                 ["serve", "-m", MODEL, "--port", "0", "--cache-dir", str(f)],
                 ["cache", "stats", "--cache-dir", str(tmp_path / "missing")]):
        r = run_pcache(*args)
        assert r.returncode == 1 and ("not a directory" in r.stderr or "No such file" in r.stderr), r.stderr
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        r = run_pcache("run", "-m", MODEL, "-n", "1", "--cache-dir", str(ro), "hi")
        assert r.returncode == 1 and "not writable" in r.stderr


def tree(d):
    return sorted((os.path.relpath(os.path.join(r, f), d), os.path.getsize(os.path.join(r, f)))
                  for r, _, fs in os.walk(d) for f in fs)


def test_cache_stats_is_read_only(tmp_path):
    """`pcache cache stats` counts bad records and temporaries (a running server's writes in
    progress) but deletes nothing; `clear` deletes."""
    cache = str(tmp_path / "cache")
    r = run_pcache("run", "-m", MODEL, "-t", "2", "-n", "2", "--temp", "0", "--cache-dir", cache, DOC)
    assert r.returncode == 0, r.stderr
    store = glob.glob(os.path.join(cache, "*-v1"))[0]
    with open(os.path.join(store, "00000000deadbeef.kvb"), "wb") as f:   # a bad record
        f.write(b"not a record")
    with open(os.path.join(store, ".00000000000000aa.4242.tmp"), "wb") as f:   # a write in progress
        f.write(b"half a record")
    before = tree(cache)
    for args in (["--cache-dir", cache], ["--cache-dir", cache, "-m", MODEL]):
        r = run_pcache("cache", "stats", *args)
        assert r.returncode == 0, r.stderr
        m = re.search(r"blocks=(\d+) bytes=\d+ bad_files=1 expired=0 temporaries=1", r.stdout)
        assert m and int(m.group(1)) > 0, r.stdout
        assert tree(cache) == before
    r = run_pcache("cache", "clear", "--cache-dir", cache)
    assert r.returncode == 0 and "bad_files=1" in r.stdout and "temporaries=1" in r.stdout, r.stdout
    assert not glob.glob(os.path.join(cache, "*-v1", "*"))
