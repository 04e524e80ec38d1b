"""`pcache route` for the tests: started on a free port in front of the given replicas, ready
once its /health counts them all healthy; stopped as server_fixture.stop stops a server. Shared by
test_router.py and test_cluster_redis_auth.py."""
import json
import os
import subprocess
import time
import urllib.request

import pytest

from server_fixture import BUILD, MODEL, free_port, stop


class Router:
    def __init__(self, port, proc, log_path):
        self.port, self.proc, self.log_path = port, proc, log_path
        self.base = f"http://127.0.0.1:{port}"

    def log(self):
        """Everything the router has written so far (stdout and stderr)."""
        with open(self.log_path, errors="replace") as f:
            return f.read()


def health(x):
    with urllib.request.urlopen(x.base + "/health", timeout=5) as r:
        return json.loads(r.read())


def launch_router(d, replicas, extra=(), env_extra=None):
    """The router's log goes to d. REDIS_PASSWORD is not inherited (a test that wants it passes it
    in env_extra)."""
    port = free_port()
    log_path = os.path.join(str(d), f"route-{port}.log")
    args = [os.path.join(BUILD, "pcache"), "route", "-m", MODEL, "--port", str(port), "--health-interval", "0.2"]
    for r in replicas:
        args += ["--replica", r.base]
    args += list(extra)
    env = {k: v for k, v in os.environ.items() if k != "REDIS_PASSWORD"}
    env.setdefault("ASAN_OPTIONS", "detect_leaks=0")
    env.update(env_extra or {})
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    rt = Router(port, proc, log_path)
    deadline = time.time() + 60
    while True:
        if proc.poll() is not None:
            pytest.fail(f"router exited with {proc.returncode}:\n{rt.log()[-4000:]}")
        try:
            if health(rt).get("healthy") == len(replicas):
                return rt
        except (OSError, ValueError):   # not listening yet / 503 while replicas come up
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail("router did not see its replicas healthy:\n" + rt.log()[-4000:])
        time.sleep(0.1)


def stop_router(rt):
    stop(rt, timeout=30, what="router")
