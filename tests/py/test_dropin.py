"""`pcache serve` as a drop-in for the clients people already use (issue 13): any model name (or
none) is served by the one model, --strict-model and --alias; the API with and without /v1;
CORS (preflights, allowed and disallowed origins, --cors-origins); completions prompts as token
ids; context overflow worded as each API words it. Generations are short (max_tokens <= 8)."""
import json
import os
import subprocess
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from server_fixture import BUILD, KEYS, MODEL, launch, server, stop  # noqa: E402,F401

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
requests = pytest.importorskip("requests")

KEY = KEYS[0]
AUTH = {"Authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "hi"}]
CONFIGURED = "https://app.example.com"


def oa(srv, v1=True):
    return openai.OpenAI(base_url=srv.base + ("/v1" if v1 else ""), api_key=KEY, max_retries=0, timeout=120)


def an(srv):
    return anthropic.Anthropic(base_url=srv.base, api_key=KEY, max_retries=0, timeout=120)


def post(srv, path, body, headers=None, **kw):
    h = dict(AUTH, **{"Content-Type": "application/json"})
    h.update(headers or {})
    return requests.post(srv.base + path, data=json.dumps(body), headers=h, timeout=120, **kw)


def preflight(srv, path, origin, req_headers=None):
    h = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    if req_headers is not None:
        h["Access-Control-Request-Headers"] = req_headers
    return requests.options(srv.base + path, headers=h, timeout=30)   # no key: browsers send none


def salt():
    return uuid.uuid4().hex


@pytest.fixture(scope="module")
def model(server):
    r = requests.get(server.base + "/v1/models", headers=AUTH, timeout=10)
    return r.json()["data"][0]["id"]


@pytest.fixture(scope="module")
def n_ctx(server):
    return requests.get(server.base + "/v1/models", headers=AUTH, timeout=10).json()["data"][0]["context_length"]


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    srv = launch(tmp_path_factory.mktemp("strict"), ["--kv-mem", "64M", "--strict-model", "--alias", "gpt-4o-mini",
                                                     "--alias", "team-model",
                                                     "--cors-origins", f"{CONFIGURED}, http://localhost:5173"])
    yield srv
    stop(srv)


# ------------------------------------------------------------------------------ model names
@pytest.mark.parametrize("name", ["gpt-4o-mini", "claude-haiku-4-5", "test", "davinci-002"])
def test_any_model_name_is_served_and_named(server, model, name):
    r = oa(server).chat.completions.create(model=name, messages=HI, max_tokens=2, temperature=0)
    assert r.model == model and r.choices[0].message.content is not None
    r = oa(server).completions.create(model=name, prompt="Once upon a time", max_tokens=2, temperature=0)
    assert r.model == model and r.choices[0].text is not None
    m = an(server).messages.create(model=name, max_tokens=2, messages=HI)
    assert m.model == model and m.content[0].text is not None


def test_stream_chunks_name_the_served_model(server, model):
    chunks = list(oa(server).chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=4, temperature=0,
                                                      stream=True, stream_options={"include_usage": True}))
    assert chunks and {ch.model for ch in chunks} == {model}
    chunks = list(oa(server).completions.create(model="davinci-002", prompt="Once upon", max_tokens=4, stream=True))
    assert chunks and {ch.model for ch in chunks} == {model}
    with an(server).messages.stream(model="claude-haiku-4-5", max_tokens=4, messages=HI) as s:
        "".join(s.text_stream)
        assert s.get_final_message().model == model


def test_model_may_be_omitted(server, model):
    for path, body in [("/v1/chat/completions", {"messages": HI, "max_tokens": 2}),
                       ("/v1/completions", {"prompt": "Once upon", "max_tokens": 2}),
                       ("/v1/messages", {"messages": HI, "max_tokens": 2})]:
        r = post(server, path, body)
        assert r.status_code == 200, (path, r.text)
        assert r.json()["model"] == model
    r = post(server, "/v1/messages/count_tokens", {"messages": HI})
    assert r.status_code == 200 and r.json()["input_tokens"] > 0


def test_models_retrieve_any_name(server, model):
    for name in ("gpt-4o-mini", "default", model):
        r = requests.get(f"{server.base}/v1/models/{name}", headers=AUTH, timeout=10)
        assert r.status_code == 200 and r.json()["id"] == model
    assert oa(server).models.retrieve("claude-haiku-4-5").id == model


def test_strict_model(strict):
    c = oa(strict)
    ids = [m.id for m in c.models.list().data]
    model = ids[0]
    assert ids == [model, "gpt-4o-mini", "team-model"]
    assert c.models.retrieve("team-model").id == "team-model"
    for name in ("gpt-4o-mini", "team-model", "default", os.path.basename(MODEL), model):
        r = c.chat.completions.create(model=name, messages=HI, max_tokens=2, temperature=0)
        assert r.model == model, name
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-17", messages=HI, max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="davinci-002", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-17")
    with pytest.raises(anthropic.NotFoundError):
        an(strict).messages.create(model="claude-nope", max_tokens=2, messages=HI)
    # without --strict-model, `model` is optional; with it, required
    r = post(strict, "/v1/chat/completions", {"messages": HI, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = post(strict, "/v1/messages", {"messages": HI, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["type"] == "error" and "model" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------ paths
@pytest.mark.parametrize("prefix", ["", "/v1"])
def test_every_endpoint_with_and_without_v1(server, model, prefix):
    r = requests.get(server.base + prefix + "/models", headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == model
    r = requests.get(server.base + prefix + "/models/" + model, headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["id"] == model
    r = post(server, prefix + "/chat/completions", {"model": model, "messages": HI, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    r = post(server, prefix + "/completions", {"model": model, "prompt": "Once upon", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["object"] == "text_completion"
    r = post(server, prefix + "/messages", {"model": model, "messages": HI, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["type"] == "message"
    r = post(server, prefix + "/messages/count_tokens", {"model": model, "messages": HI})
    assert r.status_code == 200 and r.json()["input_tokens"] > 0
    # keys still apply on both forms
    r = requests.post(server.base + prefix + "/chat/completions", json={"messages": HI, "max_tokens": 2}, timeout=10)
    assert r.status_code == 401
    r = requests.get(server.base + prefix + "/nothing", headers=AUTH, timeout=10)
    assert r.status_code == 404


def test_openai_sdk_base_url_without_v1(server, model):
    c, c1 = oa(server, v1=False), oa(server)
    assert [m.id for m in c.models.list().data] == [m.id for m in c1.models.list().data]
    msgs = [{"role": "user", "content": "Name a colour."}]
    a = c.chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=6, temperature=0)
    b = c1.chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=6, temperature=0)
    assert a.model == model and a.choices[0].message.content == b.choices[0].message.content
    text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="gpt-4o-mini", messages=msgs, max_tokens=6, temperature=0, stream=True) if ch.choices)
    assert text == a.choices[0].message.content
    r = c.completions.create(model="davinci-002", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.choices[0].text == c1.completions.create(model="x", prompt="The capital of France is", max_tokens=4,
                                                      temperature=0).choices[0].text


# ------------------------------------------------------------------------------ CORS
LOCAL_ORIGINS = ["http://localhost:5173", "http://localhost", "https://localhost:8443", "http://127.0.0.1:3000",
                 "http://[::1]:8080"]
FOREIGN_ORIGINS = ["https://evil.example.com", "http://localhost.evil.example.com", "http://localhost:80x",
                   "http://127.0.0.1.example.com", "null", "file://"]


def assert_preflight_ok(r, origin):
    assert r.status_code == 204, r.text
    assert r.headers.get("Access-Control-Allow-Origin") == origin
    assert "origin" in r.headers.get("Vary", "").lower()
    assert "POST" in r.headers.get("Access-Control-Allow-Methods", "")
    assert int(r.headers.get("Access-Control-Max-Age", "0")) > 0


@pytest.mark.parametrize("origin", LOCAL_ORIGINS)
def test_cors_preflight_default_allows_localhost(server, origin):
    for path in ("/v1/chat/completions", "/chat/completions", "/v1/completions", "/v1/messages", "/messages/count_tokens"):
        r = preflight(server, path, origin, "authorization, content-type, x-stainless-os")
        assert_preflight_ok(r, origin)
        allowed = r.headers["Access-Control-Allow-Headers"].lower()
        assert all(h in allowed for h in ("authorization", "content-type", "x-stainless-os"))
    # without Access-Control-Request-Headers: a list that covers both SDKs' headers
    r = preflight(server, "/v1/messages", origin)
    assert_preflight_ok(r, origin)
    allowed = r.headers["Access-Control-Allow-Headers"].lower()
    for h in ("authorization", "content-type", "x-api-key", "anthropic-version", "anthropic-beta", "openai-organization"):
        assert h in allowed, h
    # GET endpoints
    r = requests.options(server.base + "/v1/models", headers={"Origin": origin, "Access-Control-Request-Method": "GET"}, timeout=10)
    assert r.status_code == 204 and r.headers.get("Access-Control-Allow-Origin") == origin
    assert "GET" in r.headers.get("Access-Control-Allow-Methods", "")


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
def test_cors_disallowed_origin_gets_no_cors_headers(server, model, origin):
    r = preflight(server, "/v1/chat/completions", origin, "authorization, content-type")
    assert r.status_code == 204
    assert not any(k.lower().startswith("access-control-") for k in r.headers)
    # the request itself is answered as for any client (the browser is what withholds it)
    r = post(server, "/v1/chat/completions", {"model": model, "messages": HI, "max_tokens": 2}, headers={"Origin": origin})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    assert "Access-Control-Allow-Origin" not in r.headers


def test_cors_headers_on_answers_errors_and_streams(server, model):
    origin = "http://localhost:5173"
    h = {"Origin": origin}
    r = post(server, "/v1/chat/completions", {"model": model, "messages": HI, "max_tokens": 2}, headers=h)
    assert r.status_code == 200 and r.headers.get("Access-Control-Allow-Origin") == origin
    assert "origin" in r.headers.get("Vary", "").lower()
    r = post(server, "/v1/chat/completions", {"model": model, "messages": HI, "max_tokens": 4, "stream": True},
             headers=h, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers.get("Access-Control-Allow-Origin") == origin
    assert any(line == "data: [DONE]" for line in r.iter_lines(decode_unicode=True))
    r = post(server, "/messages", {"model": model, "messages": HI, "max_tokens": 4, "stream": True},
             headers=dict(h, **{"x-api-key": KEY}), stream=True)
    assert r.status_code == 200 and r.headers.get("Access-Control-Allow-Origin") == origin
    assert any(line == "event: message_stop" for line in r.iter_lines(decode_unicode=True))
    # errors too, or the page could not read them
    r = post(server, "/v1/chat/completions", {"model": model, "messages": HI}, headers=dict(h, Authorization="Bearer nope"))
    assert r.status_code == 401 and r.headers.get("Access-Control-Allow-Origin") == origin
    r = post(server, "/v1/chat/completions", {"model": model, "messages": "hi"}, headers=h)
    assert r.status_code == 400 and r.headers.get("Access-Control-Allow-Origin") == origin
    r = requests.get(server.base + "/v1/models", headers=dict(AUTH, **h), timeout=10)
    assert r.status_code == 200 and r.headers.get("Access-Control-Allow-Origin") == origin


def test_cors_configured_origins(strict):
    for origin in (CONFIGURED, "http://localhost:5173"):
        assert_preflight_ok(preflight(strict, "/v1/chat/completions", origin, "authorization, content-type"), origin)
        r = requests.get(strict.base + "/models", headers=dict(AUTH, Origin=origin), timeout=10)
        assert r.status_code == 200 and r.headers.get("Access-Control-Allow-Origin") == origin
    # the list replaces the default: other local origins are not allowed
    for origin in ("http://localhost:3000", "http://127.0.0.1:5173", "https://app.example.com.evil.net", "http://app.example.com"):
        r = preflight(strict, "/v1/chat/completions", origin, "authorization")
        assert r.status_code == 204 and "Access-Control-Allow-Origin" not in r.headers, origin


def test_cors_any_origin(tmp_path_factory):
    srv = launch(tmp_path_factory.mktemp("cors_any"), ["--kv-mem", "32M", "--cors-origins", "*"], keys=())
    try:
        for origin in ("https://anything.example.org", "http://localhost:1234"):
            assert_preflight_ok(preflight(srv, "/chat/completions", origin, "content-type"), origin)
            r = requests.get(srv.base + "/models", headers={"Origin": origin}, timeout=10)
            assert r.headers.get("Access-Control-Allow-Origin") == origin
    finally:
        stop(srv)


# ------------------------------------------------------------------------------ token-id prompts
def tokenize(text):
    r = subprocess.run([os.path.join(BUILD, "pcache"), "tokenize", "-m", MODEL], input=text.encode(),
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_token_id_prompt_equals_text_prompt(server, model):
    text = "The history of maps begins with the earliest known drawings of the land, and"
    ids = tokenize(text)
    assert len(ids) > 8 and all(isinstance(i, int) for i in ids)
    c = oa(server)
    by_text = c.completions.create(model=model, prompt=text, max_tokens=8, temperature=0, extra_body={"cache_salt": salt()})
    s = salt()
    by_ids = c.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0, extra_body={"cache_salt": s})
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)
    assert by_ids.usage.prompt_tokens_details.cached_tokens == 0
    again = c.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0, extra_body={"cache_salt": s})
    assert again.choices[0].text == by_ids.choices[0].text
    assert again.usage.prompt_tokens_details.cached_tokens >= len(ids) // 2
    # an array holding one array of ids is the same prompt; streamed, the same text
    r = post(server, "/v1/completions", {"model": model, "prompt": [ids], "max_tokens": 8, "temperature": 0, "cache_salt": s})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == by_ids.choices[0].text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=model, prompt=ids, max_tokens=8, temperature=0, stream=True) if ch.choices)
    assert streamed == by_ids.choices[0].text


@pytest.mark.parametrize("prompt,param,words", [
    ([1, 2, 10_000_000], "prompt[2]", "out of range"),
    ([1, -1], "prompt[1]", "out of range"),
    ([1, 2.5], "prompt[1]", "not an integer"),
    ([1, [2, 3]], "prompt[1]", "nested"),
    ([1, "a"], "prompt[1]", "token id"),
    ([], "prompt", "empty"),
    ([[]], "prompt", "empty"),
    ([[1, 2], [3, 4]], "prompt", "batch"),
    (["one", "two"], "prompt", "batch"),
])
def test_bad_token_id_prompts(server, model, prompt, param, words):
    r = post(server, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and words in err["message"], err


def test_vocabulary_bound(server, model):
    """The last id of the vocabulary is accepted, the next is not (the 400 says the size)."""
    r = post(server, "/v1/completions", {"model": model, "prompt": [10_000_000], "max_tokens": 1})
    assert r.status_code == 400
    nv = int(r.json()["error"]["message"].split("the vocabulary has ")[1].split()[0])
    assert nv > 1000
    r = post(server, "/v1/completions", {"model": model, "prompt": [nv - 1], "max_tokens": 1})
    assert r.status_code == 200, r.text
    r = post(server, "/v1/completions", {"model": model, "prompt": [nv], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[0]"


# ------------------------------------------------------------------------------ context overflow
def openai_overflow(r, param, words):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "context_length_exceeded", err
    assert err["param"] == param and "maximum context length is" in err["message"] and words in err["message"], err


def test_context_overflow_openai(server, model, n_ctx):
    long = "hello " * (n_ctx + 50)
    openai_overflow(post(server, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": long}]}),
                    "messages", "your messages resulted in")
    openai_overflow(post(server, "/v1/chat/completions", {"model": model, "messages": HI, "max_tokens": n_ctx}),
                    "messages", "you requested")
    openai_overflow(post(server, "/v1/completions", {"model": model, "prompt": long, "max_tokens": 2}), "prompt", "in your prompt")
    openai_overflow(post(server, "/v1/completions", {"model": model, "prompt": "hello", "max_tokens": n_ctx}),
                    "prompt", f"{n_ctx} for the completion")
    openai_overflow(post(server, "/v1/completions", {"model": model, "prompt": [1] * n_ctx}), "prompt", f"{n_ctx} in your prompt")
    with pytest.raises(openai.BadRequestError) as e:
        oa(server).chat.completions.create(model=model, messages=HI, max_tokens=n_ctx)
    assert e.value.code == "context_length_exceeded"


def test_context_overflow_anthropic(server, model, n_ctx):
    long = "hello " * (n_ctx + 50)
    r = post(server, "/v1/messages", {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400 and r.json()["type"] == "error"
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"].startswith("prompt is too long: ")
    assert err["message"].endswith(f" tokens > {n_ctx - 1} maximum")
    r = post(server, "/v1/messages", {"model": model, "max_tokens": n_ctx, "messages": HI})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "exceed context limit" in err["message"] and f"> {n_ctx}" in err["message"]
    with pytest.raises(anthropic.BadRequestError):
        an(server).messages.create(model=model, max_tokens=n_ctx, messages=HI)


def test_generated_nul_bytes_are_replaced_alike_whole_and_streamed(server):
    """A byte-fallback token for byte 0 (SmolLM2's id 190, "Ā") forced by logit_bias: the reply's
    text carries U+FFFD for each, whole and streamed alike (a NUL would end the JSON library's
    string and cut the whole reply short)."""
    body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "logit_bias": {"190": 100}}
    whole = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    streamed = "".join(c.choices[0].text for c in oa(server).completions.create(model="x", stream=True, **body))
    assert whole == "\ufffd" * 3 and streamed == whole, (whole, streamed)
