"""A live `pcache serve` for the server tests (kept out of conftest.py, which others own)."""
import os
import socket
import subprocess
import time
import urllib.request

import pytest

BUILD = os.environ.get("PCACHE_BUILD", "build")
MODEL = os.environ.get("PCACHE_MODEL", "models/SmolLM2-135M-Instruct.Q4_1.gguf")
KEYS = ["sk-test-alpha", "sk-test-beta"]
IDLE_TIMEOUT = 3  # seconds a client may stall while sending a request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, port, proc, log_path):
        self.port, self.proc, self.log_path = port, proc, log_path
        self.base = f"http://127.0.0.1:{port}"

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""


def launch(log_dir, extra_args=(), keys=KEYS, env_extra=None):
    """Starts `pcache serve` on a free loopback port and waits for /health. Returns a Server."""
    exe = os.path.join(BUILD, "pcache")
    if not os.path.exists(exe):
        pytest.fail(f"{exe} not built", pytrace=False)
    if not os.path.exists(MODEL):
        pytest.fail(f"{MODEL} missing (run `make model`)", pytrace=False)
    port = free_port()
    log_path = os.path.join(str(log_dir), f"serve-{port}.log")
    args = [exe, "serve", "-m", MODEL, "--port", str(port), "--timeout", str(IDLE_TIMEOUT)]
    args += list(extra_args)
    args += os.environ.get("PCACHE_SERVE_ARGS", "").split()   # e.g. "--device cuda" (make test-gpu-server)
    for k in keys:
        args += ["--api-key", k]
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=0")
    env.update(env_extra or {})
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    srv = Server(port, proc, log_path)
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{srv.log()}")
        try:
            with urllib.request.urlopen(srv.base + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail("server did not become healthy:\n" + srv.log())
        time.sleep(0.2)
    return srv


def stop(srv, timeout=60, what="server"):
    """SIGTERM, wait; the server (or router: anything with .proc and .log()) must exit 0
    (sanitizer reports end in a non-zero exit)."""
    if srv.proc.poll() is None:
        srv.proc.terminate()
    try:
        srv.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        srv.proc.wait()
    assert srv.proc.returncode == 0, f"{what} exit status {srv.proc.returncode}:\n{srv.log()[-4000:]}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = launch(tmp_path_factory.mktemp("server"), ["--kv-mem", "256M"])
    yield srv
    stop(srv)
