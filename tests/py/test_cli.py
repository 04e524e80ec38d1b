"""End-to-end tests of the `pcache` command line: run, --prompts, tokenize, bad input."""
import json
import os
import re
import subprocess

import pytest

from oracle_util import MODEL, PCACHE, need_binary, need_model

TIMINGS = re.compile(r"timings: prompt_tokens=(\d+) cached_tokens=(\d+) prefill_tokens=(\d+) .*"
                     r"decode_tokens=(\d+) decode_s=[0-9.]+ decode_tps=[0-9.]+")


def pcache(*args, stdin=None, timeout=600):
    need_binary(PCACHE)
    return subprocess.run([PCACHE, *args], input=stdin, capture_output=True, timeout=timeout)


def run_text(*args):
    r = pcache("run", "-m", need_model(), "-t", "2", *args)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode(), r.stderr.decode()


def test_greedy_is_deterministic_and_reports_timings():
    a, err = run_text("--temp", "0", "-n", "12", "The capital of France is")
    b, _ = run_text("--temp", "0", "-n", "12", "The capital of France is")
    assert a == b and a.strip()
    m = TIMINGS.search(err)
    assert m, err
    prompt, cached, prefill, decode = map(int, m.groups())
    assert prompt == prefill and cached == 0
    assert 0 < decode <= 11


def test_seed_controls_sampling():
    args = ["--temp", "1.2", "--top-k", "0", "--top-p", "1", "--min-p", "0", "-n", "16", "Once upon a time"]
    a, _ = run_text("--seed", "7", *args)
    b, _ = run_text("--seed", "7", *args)
    c, _ = run_text("--seed", "8", *args)
    assert a == b
    assert a != c


def test_prompts_file_reuses_cache_and_changes_nothing(tmp_path):
    prefix = "You are a careful assistant. Answer in one short sentence. " * 4
    qs = ["What is the sun?", "What is the moon?", "What is the sun?"]
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": prefix + q}) + "\n" for q in qs))
    out, err = run_text("--temp", "0", "-n", "8", "--prompts", str(f))
    rows = [json.loads(l) for l in out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert rows[0]["cached_tokens"] == 0
    assert rows[1]["cached_tokens"] >= 40            # the shared prefix
    assert rows[2]["cached_tokens"] == rows[2]["prompt_tokens"] - 1   # the same prompt again
    assert "hit_rate=" in err
    cold, _ = run_text("--temp", "0", "-n", "8", "--no-cache", "--prompts", str(f))
    cold_rows = [json.loads(l) for l in cold.splitlines()]
    assert all(r["cached_tokens"] == 0 for r in cold_rows)
    assert [r["text"] for r in rows] == [r["text"] for r in cold_rows]


def test_tokenize():
    r = pcache("tokenize", "-m", need_model(), stdin=b"Hello world")
    assert r.returncode == 0
    assert json.loads(r.stdout) == [19556, 905]


@pytest.mark.parametrize("cut", [0, 3, 100, 5000, 2_000_000])
def test_truncated_model_is_a_clear_error(tmp_path, cut):
    src = need_model()
    bad = tmp_path / "bad.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(cut))
    r = pcache("run", "-m", str(bad), "-n", "1", "hi")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "gguf" in err and "Sanitizer" not in err and "runtime error" not in err, err


def test_garbage_model_and_missing_file(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    r = pcache("run", "-m", str(bad), "-n", "1", "hi")
    assert r.returncode == 1 and b"gguf" in r.stderr and b"Sanitizer" not in r.stderr
    r = pcache("run", "-m", str(tmp_path / "nope.gguf"), "-n", "1", "hi")
    assert r.returncode == 1 and b"nope.gguf" in r.stderr


def test_bad_options():
    r = pcache("run", "--temp", "abc", "hi")
    assert r.returncode == 2 and b"--temp" in r.stderr
    r = pcache("run", "--kv-mem", "12Q", "hi")
    assert r.returncode == 2 and b"--kv-mem" in r.stderr
    r = pcache("frobnicate")
    assert r.returncode == 2


def test_stop_string_ends_generation():
    full, _ = run_text("--temp", "0", "-n", "30", "1, 2, 3, 4, 5,")
    assert " 9" in full
    cut, err = run_text("--temp", "0", "-n", "30", "--stop", " 9", "1, 2, 3, 4, 5,")
    assert cut.rstrip("\n") == full[:full.index(" 9")]
    assert int(TIMINGS.search(err).group(4)) < int(TIMINGS.search(run_text("--temp", "0", "-n", "30", "1, 2, 3, 4, 5,")[1]).group(4))
