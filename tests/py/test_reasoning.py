"""Reasoning blocks of thinking models (issue 13): <think>...</think> returned as OpenAI
reasoning_content, Anthropic thinking blocks and a Responses reasoning item, streamed and not,
through the official SDKs, on synthetic qwen3 GGUFs with Qwen3's templates.

The synthetic models have <think>, </think>, <tool_call> and </tool_call> in their vocabulary (as
Qwen3 has) and an output matrix so small that the next token is close to uniform over the
vocabulary; `logit_bias` (an ordinary API parameter) then makes the tags as frequent as a test
needs. The byte 0 token renders as nothing (typed unused): a NUL in generated text would cut
JSON strings short (cJSON's strings are C strings), which is not what these tests are about. Their text is noise, so the checks are properties that hold for any output: the split
equals a reference split (llama.cpp's rules, in Python) of the same generation with
reasoning_format "none" (the raw text, same seed), streamed pieces concatenate to the
non-streamed answer, each API carries the same split, and the seeds used do cover the
interesting cases (reasoning and content, reasoning cut off, no block)."""
import json
import re
import subprocess

import anthropic
import jinja2
import jinja2.sandbox
import openai
import pytest
import requests

import oracle_util
import server_fixture
from server_fixture import launch, stop
from test_tools import QWEN3

WS = " \n\r\t"
ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>"]
N_VOCAB = 304
THINK, END_THINK, TOOL_CALL = 300, 301, 302
# Qwen3-Thinking-2507's generation prompt: the reply starts inside the block
THINKING = QWEN3.replace("""    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}""", """    {{- '<|im_start|>assistant\\n<think>\\n' }}""")
assert THINKING != QWEN3
MSGS = [{"role": "user", "content": "Why is the sky blue?"}]
SEEDS = range(12)


def ref_split(raw, inside):
    """(reasoning, content) of raw output as llama.cpp splits it; reasoning None: no block."""
    t = raw.lstrip(WS)
    if t.startswith("<think>"):
        t = t[len("<think>"):]
    elif not inside:
        return None, raw
    r, sep, c = t.partition("</think>")
    return r.strip(WS), c.lstrip(WS) if sep else ""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("think-models")
    paths = {}
    for name, tmpl in (("thinking", THINKING), ("hybrid", QWEN3)):
        paths[name] = str(d / f"{name}.gguf")
        oracle_util.write_synth_model(paths[name], "qwen3", context_length=4096, chat_template=tmpl, seed=11,
                                      n_vocab=N_VOCAB, added_tokens=ADDED, unused_tokens=[3], tied=False,
                                      out_scale=0.05)
    return paths


def serve(path, log_dir):
    old = server_fixture.MODEL
    server_fixture.MODEL = path
    try:
        return launch(log_dir, keys=[])
    finally:
        server_fixture.MODEL = old


@pytest.fixture(scope="module")
def thinking(models, tmp_path_factory):
    s = serve(models["thinking"], tmp_path_factory.mktemp("thinking"))
    yield s
    stop(s)


@pytest.fixture(scope="module")
def hybrid(models, tmp_path_factory):
    s = serve(models["hybrid"], tmp_path_factory.mktemp("hybrid"))
    yield s
    stop(s)


def oa(s):
    return openai.OpenAI(base_url=s.base + "/v1", api_key="x", max_retries=0, timeout=120)


def an(s):
    return anthropic.Anthropic(base_url=s.base, api_key="x", max_retries=0, timeout=120)


def chat(s, seed, bias=None, **kw):
    body = dict(model="m", messages=MSGS, max_tokens=48, seed=seed, temperature=1)
    if bias:
        body["logit_bias"] = bias
    body.update(kw)
    return oa(s).chat.completions.create(**body)


def raw_text(s, seed, bias=None, **kw):
    r = chat(s, seed, bias, extra_body={"reasoning_format": "none"}, **kw)
    m = r.choices[0].message
    assert getattr(m, "reasoning_content", None) is None
    return m.content, r.usage


# ---------------------------------------------------------------- OpenAI chat completions
@pytest.mark.parametrize("bias", [None, {str(END_THINK): 1.5}])
def test_openai_split_matches_the_raw_output(thinking, bias):
    cases = set()
    for seed in SEEDS:
        raw, raw_usage = raw_text(thinking, seed, bias)
        r = chat(thinking, seed, bias)
        m = r.choices[0].message
        want_r, want_c = ref_split(raw, inside=True)
        assert (m.reasoning_content or "", m.content) == (want_r, want_c), (seed, raw)
        # usage unchanged; the block's tokens are reasoning tokens (all of them when unclosed)
        assert r.usage.completion_tokens == raw_usage.completion_tokens
        rt = r.usage.completion_tokens_details.reasoning_tokens
        if "</think>" in raw:
            assert 1 <= rt <= r.usage.completion_tokens
        else:
            assert rt == r.usage.completion_tokens
        cases.add(("R" if want_r else "") + ("C" if want_c else ""))
    assert ("RC" in cases) if bias else ("R" in cases), cases


def stream_chat(s, seed, bias=None, **kw):
    reasoning, content, order, finish, usage = "", "", [], None, None
    for ch in chat(s, seed, bias, stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage:
            usage = ch.usage
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        rc = getattr(d, "reasoning_content", None)
        if rc:
            reasoning += rc
            order.append("r")
        if d.content:
            content += d.content
            order.append("c")
        finish = ch.choices[0].finish_reason or finish
    return reasoning, content, "".join(order), finish, usage


def test_openai_stream_reassembles(thinking):
    bias = {str(END_THINK): 1.5}
    for seed in SEEDS:
        whole = chat(thinking, seed, bias)
        reasoning, content, order, finish, usage = stream_chat(thinking, seed, bias)
        m = whole.choices[0].message
        assert (reasoning, content) == (m.reasoning_content or "", m.content), seed
        assert re.fullmatch("r*c*", order), order   # all reasoning chunks before the content
        assert finish == whole.choices[0].finish_reason
        assert usage.completion_tokens_details.reasoning_tokens == whole.usage.completion_tokens_details.reasoning_tokens


def test_hybrid_template_block_opened_by_the_model(hybrid):
    """Qwen3's hybrid template: the model opens the block itself (or writes no block)."""
    bias = {str(THINK): 2.5, str(END_THINK): 1.5}
    cases = set()
    for seed in SEEDS:
        raw, _ = raw_text(hybrid, seed, bias)
        m = chat(hybrid, seed, bias).choices[0].message
        want_r, want_c = ref_split(raw, inside=False)
        assert (m.reasoning_content, m.content) == (want_r or None, want_c), (seed, raw)
        if want_r is None:
            cases.add("no block")
        elif want_c:
            cases.add("block and content")
    assert cases == {"no block", "block and content"}, cases


def test_enable_thinking_false_renders_an_empty_block(hybrid, models, tmp_path):
    """chat_template_kwargs.enable_thinking false: the prompt ends with Qwen3's empty block
    (as the Jinja template renders it), so the reply is content."""
    kw = {"chat_template_kwargs": {"enable_thinking": False}}
    body = json.dumps({"messages": MSGS, **kw})
    tool = server_fixture.BUILD + "/pcache-tool"
    got = subprocess.run([tool, "render", models["hybrid"]], input=body.encode(), capture_output=True, timeout=60)
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    want = env.from_string(QWEN3).render(messages=MSGS, add_generation_prompt=True, enable_thinking=False)
    assert got.returncode == 0 and got.stdout.decode() == want
    assert want.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    on = chat(hybrid, 0, None)
    off = chat(hybrid, 0, None, extra_body=kw)
    assert off.usage.prompt_tokens > on.usage.prompt_tokens   # the empty block's tokens
    assert off.choices[0].message.reasoning_content is None
    # the thinking-only template does not take the argument: nothing changes (as with Jinja)
    got = subprocess.run([tool, "render", models["thinking"]], input=body.encode(), capture_output=True, timeout=60)
    assert got.stdout.decode().endswith("<|im_start|>assistant\n<think>\n")


def test_reasoning_format_none_and_bad_values(thinking):
    raw, _ = raw_text(thinking, 3)
    assert not raw.startswith("<think>")   # the prompt opened the block: only "</think>" may appear
    r = requests.post(thinking.base + "/v1/chat/completions", timeout=60,
                      json={"messages": MSGS, "max_tokens": 2, "reasoning_format": "deepseek-legacy"})
    assert r.status_code == 400 and "deepseek-legacy" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "reasoning_format"
    r = requests.post(thinking.base + "/v1/chat/completions", timeout=60,
                      json={"messages": MSGS, "max_tokens": 2, "chat_template_kwargs": {"add_vision_id": True}})
    assert r.status_code == 400 and "add_vision_id" in r.json()["error"]["message"], r.text


def test_grammar_from_the_first_token_is_not_split(thinking):
    """response_format and forced tool calls constrain the whole reply: no reasoning block."""
    r = chat(thinking, 1, None, response_format={"type": "json_object"})
    m = r.choices[0].message
    assert getattr(m, "reasoning_content", None) is None
    json.loads(m.content)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"], "additionalProperties": False}}}]
    r = chat(thinking, 1, None, tools=tools, tool_choice="required", max_tokens=100)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and getattr(c.message, "reasoning_content", None) is None
    assert json.loads(c.message.tool_calls[0].function.arguments)["x"] is not None


def test_tool_calls_are_parsed_from_the_content_only(thinking):
    """A call written inside the reasoning is reasoning text; calls come from the content (a
    strict tool: once the model writes <tool_call>, the grammar makes it a well-formed call)."""
    tools = [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"], "additionalProperties": False}}}]
    bias = {str(END_THINK): 1.0, str(TOOL_CALL): 1.5}
    seen = set()
    for seed in SEEDS:
        kw = dict(tools=tools, max_tokens=80)
        m = chat(thinking, seed, bias, **kw).choices[0].message
        raw_m = chat(thinking, seed, bias, extra_body={"reasoning_format": "none"}, **kw).choices[0].message
        in_reasoning = (m.reasoning_content or "").count("<tool_call>\n{")
        calls, raw_calls = m.tool_calls or [], raw_m.tool_calls or []
        # the same generation: parsed whole, the calls inside the reasoning count too
        assert len(raw_calls) >= len(calls)
        assert [c.function.arguments for c in calls] == [c.function.arguments for c in raw_calls][len(raw_calls) - len(calls):]
        if in_reasoning and len(raw_calls) > len(calls):
            seen.add("call in reasoning ignored")
        if calls:
            seen.add("call in content")
            for c in calls:
                assert c.function.name == "f" and isinstance(json.loads(c.function.arguments)["x"], int)
        # streamed: the same split and calls
        rs, cs, calls_s = "", "", {}
        for ch in chat(thinking, seed, bias, stream=True, **kw):
            if not ch.choices:
                continue
            d = ch.choices[0].delta
            rs += getattr(d, "reasoning_content", None) or ""
            cs += d.content or ""
            for tc in d.tool_calls or []:
                e = calls_s.setdefault(tc.index, "")
                calls_s[tc.index] = e + (tc.function.arguments or "")
        assert (rs, cs) == (m.reasoning_content or "", m.content or ""), seed
        assert [calls_s[i] for i in sorted(calls_s)] == [c.function.arguments for c in calls]
    assert seen == {"call in reasoning ignored", "call in content"}, seen


# ---------------------------------------------------------------- Anthropic messages
def blocks(msg):
    return [(b.type, getattr(b, "thinking", None) if b.type == "thinking" else getattr(b, "text", None)) for b in msg.content]


def test_anthropic_thinking_blocks(thinking):
    """The same generation as chat completions (same prompt, sampler and seed; no logit_bias in
    Anthropic's API), its reasoning as a thinking block before the text block."""
    cases = set()
    for seed in SEEDS:
        ref = chat(thinking, seed, None, max_tokens=64).choices[0].message
        kw = dict(model="m", max_tokens=64, messages=MSGS, thinking={"type": "enabled", "budget_tokens": 1024},
                  extra_body={"seed": seed, "temperature": 1})
        m = an(thinking).messages.create(**kw)
        want = ([("thinking", ref.reasoning_content)] if ref.reasoning_content else []) + \
               ([("text", ref.content)] if ref.content or not ref.reasoning_content else [])
        assert blocks(m) == want, seed
        if m.content[0].type == "thinking":
            assert m.content[0].signature == ""
        with an(thinking).messages.stream(**kw) as st:
            final = st.get_final_message()
        assert blocks(final) == want and final.stop_reason == m.stop_reason
        assert final.usage.output_tokens == m.usage.output_tokens
        cases.add("+".join(t for t, _ in want))
    assert "thinking+text" in cases and "thinking" in cases, cases


def test_anthropic_stream_events(thinking):
    """The raw event sequence: thinking block (thinking_delta) at index 0, then the text block."""
    for seed in SEEDS:
        ref = chat(thinking, seed, None, max_tokens=64).choices[0].message
        if not (ref.reasoning_content and ref.content):
            continue
        body = {"model": "m", "max_tokens": 64, "messages": MSGS, "stream": True, "seed": seed, "temperature": 1,
                "thinking": {"type": "enabled", "budget_tokens": 1024}}
        with requests.post(thinking.base + "/v1/messages", json=body, stream=True, timeout=120) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
        kinds = [(e["type"], e.get("index"), (e.get("content_block") or e.get("delta") or {}).get("type")) for e in events]
        starts = [k for k in kinds if k[0] == "content_block_start"]
        assert starts == [("content_block_start", 0, "thinking"), ("content_block_start", 1, "text")], kinds
        assert {k for k in kinds if k[0] == "content_block_delta"} == {("content_block_delta", 0, "thinking_delta"),
                                                                       ("content_block_delta", 1, "text_delta")}
        assert kinds.index(("content_block_stop", 0, None)) < kinds.index(("content_block_start", 1, "text"))
        assert kinds[-2][0] == "message_delta" and kinds[-1][0] == "message_stop"
        assert "".join(e["delta"]["thinking"] for e in events if e["type"] == "content_block_delta" and e["index"] == 0) \
            == ref.reasoning_content
        return
    pytest.fail("no seed gave reasoning and content")


def test_anthropic_thinking_disabled_and_prefill(hybrid, thinking):
    # disabled: Qwen3's enable_thinking false (the same prompt as chat_template_kwargs)
    m = an(hybrid).messages.create(model="m", max_tokens=8, messages=MSGS, thinking={"type": "disabled"},
                                   extra_body={"seed": 0, "temperature": 1})
    off = chat(hybrid, 0, None, max_tokens=8, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    u = m.usage
    assert u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens == off.usage.prompt_tokens
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == off.choices[0].message.content
    # a prefill that opens a block: the reply continues inside it
    m = an(hybrid).messages.create(model="m", max_tokens=16, extra_body={"seed": 0},
                                   messages=MSGS + [{"role": "assistant", "content": "<think>\nFirst,"}])
    assert m.content[0].type == "thinking"


# ---------------------------------------------------------------- Responses API
def test_responses_reasoning_item(thinking):
    c = oa(thinking)
    bias = {str(END_THINK): 1.5}
    checked = 0
    for seed in SEEDS:
        ref = chat(thinking, seed, bias, max_tokens=48).choices[0].message
        kw = dict(model="m", input=MSGS[0]["content"], max_output_tokens=48, temperature=1,
                  reasoning={"effort": "medium"}, extra_body={"seed": seed, "logit_bias": bias})
        r = c.responses.create(**kw)
        types = [o.type for o in r.output]
        if ref.reasoning_content:
            assert types == ["reasoning", "message"], types
            it = r.output[0]
            assert it.id.startswith("rs_") and it.summary == []
            assert [(p.type, p.text) for p in it.content] == [("reasoning_text", ref.reasoning_content)]
        else:
            assert types == ["message"]
        assert r.output_text == ref.content
        assert r.usage.output_tokens_details.reasoning_tokens > 0
        # streamed: reasoning_text deltas, then the message; the final response the same
        deltas, done, final = "", None, None
        for ev in c.responses.create(stream=True, **kw):
            if ev.type == "response.reasoning_text.delta":
                deltas += ev.delta
                assert ev.output_index == 0 and ev.content_index == 0
            elif ev.type == "response.reasoning_text.done":
                done = ev.text
            elif ev.type == "response.output_text.delta":
                assert done is not None or not ref.reasoning_content   # the reasoning item closed first
            elif ev.type in ("response.completed", "response.incomplete"):
                final = ev.response
        assert deltas == (ref.reasoning_content or "") and done == ref.reasoning_content
        assert [o.type for o in final.output] == types and final.output_text == r.output_text
        # a follow-up on it (its reasoning item in the stored conversation) is served
        r2 = c.responses.create(model="m", input="And then?", previous_response_id=r.id, max_output_tokens=4)
        assert r2.status in ("completed", "incomplete")
        # as is a conversation sent back with the reasoning item in it
        r3 = c.responses.create(model="m", max_output_tokens=4,
                                input=[{"role": "user", "content": "q"}] + [o.model_dump() for o in r.output] +
                                      [{"role": "user", "content": "next"}])
        assert r3.status in ("completed", "incomplete")
        checked += bool(ref.reasoning_content and ref.content)
        if checked >= 2:
            return
    pytest.fail("fewer than 2 seeds gave reasoning and content")


# ---------------------------------------------------------------- models that do not reason
def test_not_a_thinking_model(tmp_path_factory):
    """SmolLM2: nothing is split, asking for reasoning is a 400 naming the parameter."""
    s = launch(tmp_path_factory.mktemp("plain"), keys=[])
    try:
        r = oa(s).chat.completions.create(model="m", messages=MSGS, max_tokens=4, temperature=0)
        assert getattr(r.choices[0].message, "reasoning_content", None) is None
        assert r.usage.completion_tokens_details.reasoning_tokens == 0
        for path, body, param in [
                ("/v1/messages", {"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 4, "messages": MSGS}, "thinking"),
                ("/v1/responses", {"reasoning": {"effort": "low"}, "input": "hi"}, "reasoning")]:
            r = requests.post(s.base + path, json=body, timeout=60)
            assert r.status_code == 400, r.text
            assert param in json.dumps(r.json()["error"]), r.text
        # disabling thinking is harmless
        m = an(s).messages.create(model="m", max_tokens=4, messages=MSGS, thinking={"type": "disabled"})
        assert m.content[0].type == "text"
    finally:
        stop(s)
