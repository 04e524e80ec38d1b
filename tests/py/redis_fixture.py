"""A real `redis-server` for the cluster tests and benchmarks (issue 14): a temporary directory, a
free loopback port, no persistence (--save "" --appendonly no); killed and restarted on the same
port at will. And a minimal RESP client, so that neither needs a Python Redis package."""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisError(Exception):
    pass


class Resp:
    """One connection; cmd() sends a command and returns its reply: bytes, int, list, None (nil);
    an error reply raises RedisError."""

    def __init__(self, port, host="127.0.0.1", timeout=10):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def _fill(self):
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        self.buf += chunk

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RedisError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill()
            data, self.buf = self.buf[:n], self.buf[n + 2:]
            return data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RedisError(f"bad reply {line!r}")

    def cmd(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(out))
        return self._reply()


def stream_events(client, stream="pcache:kv:events"):
    """Every entry of the KV event stream as a dict of str fields (with "id")."""
    out = []
    for eid, fields in client.cmd("XRANGE", stream, "-", "+") or []:
        d = {fields[i].decode(): fields[i + 1].decode() for i in range(0, len(fields), 2)}
        d["id"] = eid.decode()
        out.append(d)
    return out


class RedisServer:
    """password: started with --requirepass (self.url still has none; client() authenticates)."""

    def __init__(self, port=None, password=None):
        self.port = port or free_port()
        self.password = password
        self.dir = tempfile.mkdtemp(prefix="pcache-redis-")
        self.proc = None
        self.url = f"redis://127.0.0.1:{self.port}"

    def start(self, timeout=20):
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server is not installed (scripts/install-deps.sh test)")
        self.log = open(os.path.join(self.dir, "redis.log"), "a")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.dir]
                                     + (["--requirepass", self.password] if self.password else []),
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:
            try:
                with self.client(timeout=1) as c:
                    if c.cmd("PING") == b"PONG":
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("redis-server did not start: " + open(os.path.join(self.dir, "redis.log")).read()[-2000:])
            time.sleep(0.05)

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self):
        self.stop(signal.SIGKILL)

    def client(self, timeout=10):
        c = Resp(self.port, timeout=timeout)
        if self.password:
            try:
                c.cmd("AUTH", self.password)
            except BaseException:
                c.close()
                raise
        return c

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
