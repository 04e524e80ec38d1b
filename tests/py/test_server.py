"""End-to-end tests of `pcache serve` with the official openai and anthropic SDKs, raw HTTP for
malformed input, and concurrency. Generations are short (max_tokens 8-16) to stay fast under
ASan on two cores."""
import concurrent.futures as cf
import json
import os
import re
import socket
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from server_fixture import IDLE_TIMEOUT, KEYS, server  # noqa: E402,F401

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
requests = pytest.importorskip("requests")

KEY = KEYS[0]
# this anthropic SDK has no temperature argument: pass it as an extra field
T0 = {"temperature": 0}
LONG_SYSTEM = ("You are a meticulous assistant for a library that catalogues old maps. " * 12).strip()


def oa(srv, key=KEY):
    return openai.OpenAI(base_url=srv.base + "/v1", api_key=key, max_retries=0, timeout=120)


def an(srv, key=KEY):
    return anthropic.Anthropic(base_url=srv.base, api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(server):
    models = oa(server).models.list()
    ids = [m.id for m in models.data]
    assert len(ids) == 1 and ids[0]
    return ids[0]


def post(srv, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    headers.update(kw.pop("headers", {}))
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(srv.base + path, data=data, headers=headers, timeout=120, **kw)


def chat(srv, model, text, system=None, max_tokens=8, key=KEY):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return oa(srv, key).chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens, temperature=0)


# ------------------------------------------------------------------------------ OpenAI
def test_health_and_models(server, model):
    r = requests.get(server.base + "/health", timeout=10)
    h = r.json()   # kvevent.h: the instance id and queue a router reads; no fingerprint without tiers or Redis
    assert r.status_code == 200 and set(h) == {"status", "instance", "queue"}, h
    assert h["status"] == "ok" and re.fullmatch(r"[0-9a-f]{16}", h["instance"]) and h["queue"] == 0, h
    r = requests.get(server.base + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and body["data"][0]["id"] == model and body["data"][0]["object"] == "model"


def test_chat_plain(server, model):
    r = chat(server, model, "Name a colour.")
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == model and abs(r.created - time.time()) < 600
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str) and c.message.content
    assert c.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 5 and 0 < u.completion_tokens <= 8
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0


def test_chat_stream_equals_plain(server, model):
    msgs = [{"role": "user", "content": "Count from one to ten."}]
    plain = oa(server).chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0)
    stream = oa(server).chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
    text, finish, usage, ids = "", None, None, set()
    for ch in stream:
        ids.add(ch.id)
        assert ch.object == "chat.completion.chunk"
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
        if ch.usage:
            usage = ch.usage
    assert len(ids) == 1
    assert text == plain.choices[0].message.content
    assert finish == plain.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens
    assert usage.prompt_tokens == plain.usage.prompt_tokens


def test_completions_plain_and_stream(server, model):
    c = oa(server)
    r = c.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    assert r.usage.completion_tokens <= 8
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if ch.choices)
    assert text == r.choices[0].text


def test_max_tokens_and_stop(server, model):
    r = oa(server).chat.completions.create(model=model, messages=[{"role": "user", "content": "Write a long story."}],
                                           max_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3
    full = oa(server).chat.completions.create(model=model, messages=[{"role": "user", "content": "Write a long story."}],
                                              max_tokens=16, temperature=0).choices[0].message.content
    words = full.split()
    if len(words) >= 3:
        stop = words[2]
        r = oa(server).chat.completions.create(model=model, messages=[{"role": "user", "content": "Write a long story."}],
                                               max_tokens=16, temperature=0, stop=[stop, "zzzz-unused"])
        out = r.choices[0].message.content
        assert stop not in out and full.startswith(out)
        assert r.choices[0].finish_reason == "stop"


def test_prompt_cache_reuse(server, model):
    q = "In one word, what do you catalogue?"
    first = chat(server, model, q, system=LONG_SYSTEM + " (run A)")
    second = chat(server, model, q, system=LONG_SYSTEM + " (run A)")
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens // 2
    assert second.choices[0].message.content == first.choices[0].message.content
    # another API key is another cache namespace: nothing is shared
    other = chat(server, model, q, system=LONG_SYSTEM + " (run A)", key=KEYS[1])
    assert other.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens // 2
    assert other.choices[0].message.content == first.choices[0].message.content


def test_model_aliases(server, model):
    for name in ("default", os.path.basename(os.environ.get("PCACHE_MODEL", "models/SmolLM2-135M-Instruct.Q4_1.gguf"))):
        r = post(server, "/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------ Anthropic
def test_anthropic_plain(server, model):
    m = an(server).messages.create(model=model, max_tokens=8, extra_body=T0,
                                   system="Be brief.", messages=[{"role": "user", "content": "Say hello."}])
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.output_tokens <= 8 and m.usage.input_tokens > 0


def test_anthropic_stream_sdk_and_event_order(server, model):
    kw = dict(model=model, max_tokens=10, extra_body=T0, messages=[{"role": "user", "content": "List three fruits."}])
    plain = an(server).messages.create(**kw)
    with an(server).messages.stream(**kw) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == plain.content[0].text == final.content[0].text
    assert final.stop_reason == plain.stop_reason and final.usage.output_tokens == plain.usage.output_tokens
    body = dict(kw, stream=True, temperature=0)
    del body["extra_body"]
    r = post(server, "/v1/messages", body, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[7:] for line in r.iter_lines(decode_unicode=True) if line.startswith("event: ")]
    assert events[:3] == ["message_start", "content_block_start", "ping"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(events[3:-3]) <= {"content_block_delta"}


def test_anthropic_cache_control_accounting(server, model):
    system = [{"type": "text", "text": LONG_SYSTEM + " (anthropic run)", "cache_control": {"type": "ephemeral"}}]
    msgs = [{"role": "user", "content": "What do you catalogue?"}]
    first = an(server).messages.create(model=model, max_tokens=8, extra_body=T0, system=system, messages=msgs)
    assert first.usage.cache_creation_input_tokens > 0
    assert first.usage.cache_creation.ephemeral_5m_input_tokens == first.usage.cache_creation_input_tokens
    second = an(server).messages.create(model=model, max_tokens=8, extra_body=T0, system=system, messages=msgs)
    assert second.usage.cache_read_input_tokens > 0
    assert second.usage.cache_read_input_tokens >= first.usage.cache_creation_input_tokens
    assert second.content[0].text == first.content[0].text
    total1 = first.usage.input_tokens + first.usage.cache_creation_input_tokens + first.usage.cache_read_input_tokens
    total2 = second.usage.input_tokens + second.usage.cache_creation_input_tokens + second.usage.cache_read_input_tokens
    assert total1 == total2
    # 1h breakpoints are reported in their own class
    sys1h = [{"type": "text", "text": LONG_SYSTEM + " (1h run)", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    m = an(server).messages.create(model=model, max_tokens=4, system=sys1h, messages=msgs)
    assert m.usage.cache_creation.ephemeral_1h_input_tokens > 0


def test_anthropic_stream_message_start_has_cache_split(server, model):
    """message_start reports the prompt's real cache split, as Anthropic's does."""
    import json as _json
    body = {"model": model, "max_tokens": 4, "temperature": 0, "stream": True,
            "system": [{"type": "text", "text": "(stream run) " + LONG_SYSTEM, "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "What do you catalogue?"}]}

    def start_usage():
        r = post(server, "/v1/messages", body, headers={"x-api-key": KEY}, stream=True)
        assert r.status_code == 200
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                ev = _json.loads(line[6:])
                if ev["type"] == "message_start":
                    r.close()
                    return ev["message"]["usage"]
        raise AssertionError("no message_start")

    first = start_usage()
    assert first["cache_creation_input_tokens"] > 0
    assert first["cache_read_input_tokens"] < 10          # at most the chat template's opening
    second = start_usage()
    assert second["cache_read_input_tokens"] >= first["cache_creation_input_tokens"]
    assert second["cache_creation_input_tokens"] == 0
    assert second["input_tokens"] < first["input_tokens"] + first["cache_creation_input_tokens"]


def test_anthropic_too_many_breakpoints(server, model):
    cc = {"type": "ephemeral"}
    body = {"model": model, "max_tokens": 4, "system": [{"type": "text", "text": f"s{i}", "cache_control": cc} for i in range(5)],
            "messages": [{"role": "user", "content": "hi"}]}
    r = post(server, "/v1/messages", body, headers={"x-api-key": KEY})
    assert r.status_code == 400
    j = r.json()
    assert j["type"] == "error" and j["error"]["type"] == "invalid_request_error" and "4" in j["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        an(server).messages.create(model=model, max_tokens=4, system=body["system"], messages=body["messages"])


def test_anthropic_errors(server, model):
    with pytest.raises(anthropic.AuthenticationError):
        an(server, key="sk-wrong").messages.create(model=model, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    # any model name is served by the one model (the 404 is --strict-model's: test_dropin.py)
    m = an(server).messages.create(model="claude-nope", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert m.model == model
    r = post(server, "/v1/messages/count_tokens", {"model": model, "messages": [{"role": "user", "content": "hi there"}]})
    assert r.status_code == 200 and r.json()["input_tokens"] > 0


# ------------------------------------------------------------------------------ concurrency
def test_concurrent_streams_match_sequential(server, model):
    prompts = [f"Give me a short fact about the number {i}." for i in range(8)]

    def run(p, stream):
        c = oa(server)
        kw = dict(model=model, messages=[{"role": "user", "content": p}], max_tokens=8, temperature=0)
        if not stream:
            return c.chat.completions.create(**kw).choices[0].message.content
        return "".join((ch.choices[0].delta.content or "") for ch in c.chat.completions.create(stream=True, **kw) if ch.choices)

    expected = {p: run(p, False) for p in prompts}
    jobs = [prompts[i % len(prompts)] for i in range(32)]
    with cf.ThreadPoolExecutor(32) as ex:
        outs = list(ex.map(lambda p: (p, run(p, True)), jobs))
    for p, out in outs:
        assert out == expected[p], (p, out, expected[p])


def test_client_disconnect_cancels(server, model):
    s = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Tell me a very long story."}],
                       "max_tokens": 400, "stream": True}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
              b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while b"data:" not in got:
        chunk = s.recv(4096)
        assert chunk
        got += chunk
    s.close()
    deadline = time.time() + 60
    while time.time() < deadline:
        m = requests.get(server.base + "/metrics", timeout=10).text
        if re.search(r"^pcache_active_requests 0$", m, re.M):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the abandoned request was not cancelled")
    assert chat(server, model, "hi", max_tokens=2).choices[0].message.content is not None


# ------------------------------------------------------------------------------ bad input
def raw(server, data, read_timeout=10):
    s = socket.create_connection(("127.0.0.1", server.port))
    s.settimeout(read_timeout)
    try:
        s.sendall(data)
        out = b""
        while True:
            try:
                b = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not b:
                break
            out += b
            if b"\r\n\r\n" in out:
                head, _, rest = out.partition(b"\r\n\r\n")
                m = re.search(rb"content-length:\s*(\d+)", head, re.I)
                if m and len(rest) >= int(m.group(1)):
                    break
        return out
    finally:
        s.close()


def status_of(resp):
    m = re.match(rb"HTTP/1\.[01] (\d{3})", resp)
    return int(m.group(1)) if m else None


def test_bad_requests_battery(server, model):
    chat_ok = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        ("malformed json", "/v1/chat/completions", b'{"model": "x", "messages": [', 400, "invalid_request_error"),
        ("wrong type", "/v1/chat/completions", dict(chat_ok, max_tokens="ten"), 400, "invalid_request_error"),
        ("wrong type msgs", "/v1/chat/completions", dict(chat_ok, messages="hi"), 400, "invalid_request_error"),
        ("bad temperature", "/v1/chat/completions", dict(chat_ok, temperature=-1), 400, "invalid_request_error"),
        ("garbage bytes", "/v1/completions", bytes(range(256)) * 4, 400, "invalid_request_error"),
        ("not an object", "/v1/completions", b"[1,2,3]", 400, "invalid_request_error"),
        ("anthropic malformed", "/v1/messages", b"{{{", 400, "invalid_request_error"),
        ("anthropic types", "/v1/messages", {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": 5}]}, 400, "invalid_request_error"),
    ]
    for name, path, body, status, etype in cases:
        r = post(server, path, body)
        assert r.status_code == status, (name, r.status_code, r.text)
        j = r.json()
        if path.startswith("/v1/messages"):
            assert j["type"] == "error" and j["error"]["type"] == etype, name
        else:
            assert set(j["error"]) >= {"message", "type", "param", "code"} and j["error"]["type"] == etype, name
    # any model name is served by the one model (the 404 is --strict-model's: test_dropin.py)
    r = post(server, "/v1/chat/completions", dict(chat_ok, model="gpt-17"))
    assert r.status_code == 200 and r.json()["model"] == model
    # auth
    assert post(server, "/v1/chat/completions", chat_ok, key="nope").status_code == 401
    r = requests.post(server.base + "/v1/chat/completions", json=chat_ok, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        oa(server, key="nope").chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    # routes and methods
    r = requests.get(server.base + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    r = requests.get(server.base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 405 and "POST" in r.headers.get("Allow", "")
    r = requests.post(server.base + "/health", timeout=10)
    assert r.status_code == 405
    # over-long prompt
    n_ctx = requests.get(server.base + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()["data"][0]["context_length"]
    r = post(server, "/v1/completions", {"model": model, "prompt": "hello " * (n_ctx + 50), "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(server, "/v1/messages", {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hello " * (n_ctx + 50)}]})
    assert r.status_code == 400 and "too long" in r.json()["error"]["message"]   # more in test_dropin.py
    # body too large: announced by Content-Length (no body sent), then actually sent
    resp = raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
               b"\r\nContent-Type: application/json\r\nContent-Length: 9000000\r\n\r\n")
    assert status_of(resp) == 413, resp[:200]
    try:
        r = post(server, "/v1/chat/completions", b"{" + b" " * (9 << 20) + b"}")
        assert r.status_code == 413
    except requests.ConnectionError:
        pass  # the server may close before the client finishes sending: also a refusal
    # headers too large
    resp = raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200000 + b"\r\n\r\n")
    assert status_of(resp) in (431, 413, None), resp[:200]
    if resp:
        assert status_of(resp) == 431
    # garbage that is not HTTP at all
    raw(server, os.urandom(3000) + b"\r\n\r\n", read_timeout=5)
    # the server is still fine
    assert requests.get(server.base + "/health", timeout=10).status_code == 200
    r = post(server, "/v1/chat/completions", chat_ok)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_slowloris(server, model):
    socks = []
    for _ in range(8):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        socks.append(s)
    # stalled clients do not block others
    t0 = time.time()
    assert requests.get(server.base + "/health", timeout=10).status_code == 200
    assert chat(server, model, "hi", max_tokens=2).choices[0].message.content is not None
    assert time.time() - t0 < 60
    # and they are dropped after the idle timeout: the server closes them (EOF or reset)
    time.sleep(IDLE_TIMEOUT + 2)
    for s in socks:
        s.settimeout(5)
        try:
            closed = s.recv(100) == b""
        except socket.timeout:
            closed = False
        except OSError:
            closed = True
        assert closed
        s.close()


def test_metrics(server, model):
    chat(server, model, "hi", max_tokens=2)
    text = requests.get(server.base + "/metrics", timeout=10).text
    for fam in ("pcache_requests_total", "pcache_ttft_seconds_bucket", "pcache_decode_tokens_per_second_bucket",
                "pcache_prompt_tokens_total", "pcache_cache_hit_tokens_total", "pcache_cache_miss_tokens_total",
                "pcache_cache_evictions_total", "pcache_kv_blocks_used", "pcache_kv_blocks_free", "pcache_active_requests"):
        assert re.search(rf"^{fam}", text, re.M), fam
    m = re.search(r'^pcache_requests_total\{endpoint="chat_completions",status="200"\} (\d+)$', text, re.M)
    assert m and int(m.group(1)) >= 1
    m = re.search(r"^pcache_prompt_tokens_total (\d+)$", text, re.M)
    assert m and int(m.group(1)) > 0
