"""The Responses API (POST /v1/responses) through the official `openai` SDK: plain and streamed
responses, the event sequence, structured outputs and function tools, previous_response_id
continuing a conversation from the cache (a follow-up pays only its new tokens), retrieval and
deletion, tenants, and named refusals."""
import json

import jsonschema
import openai
import pytest
import requests
from openai import OpenAI

from server_fixture import launch

KEY_A, KEY_B = "sk-resp-a", "sk-resp-b"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = launch(tmp_path_factory.mktemp("responses"), keys=[KEY_A, KEY_B])
    yield s
    s.proc.terminate()
    assert s.proc.wait(timeout=60) == 0, s.log()


def client(srv, key=KEY_A):
    return OpenAI(base_url=srv.base + "/v1", api_key=key, max_retries=0)


def test_plain_and_the_same_as_chat(srv):
    c = client(srv)
    r = c.responses.create(model="gpt-4.1-mini", instructions="Answer in one sentence.",
                           input="What is the capital of France?", max_output_tokens=24, temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.status in ("completed", "incomplete")
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.output_text and r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    # the same conversation through chat completions gives the same greedy text
    ch = c.chat.completions.create(model="x", messages=[{"role": "system", "content": "Answer in one sentence."},
                                                        {"role": "user", "content": "What is the capital of France?"}],
                                   max_tokens=24, temperature=0)
    assert ch.choices[0].message.content == r.output_text


def test_previous_response_id_pays_only_the_new_tokens(srv):
    c = client(srv)
    r1 = c.responses.create(model="m", input="Name a fruit that is red.", max_output_tokens=20, temperature=0)
    r2 = c.responses.create(model="m", input="And one that is yellow?", previous_response_id=r1.id,
                            max_output_tokens=20, temperature=0)
    assert r2.previous_response_id == r1.id
    # the follow-up's prompt starts with exactly r1's prompt and output tokens, all cached
    assert r2.usage.input_tokens_details.cached_tokens >= r1.usage.input_tokens + r1.usage.output_tokens - 1
    assert r2.usage.input_tokens - r2.usage.input_tokens_details.cached_tokens < 20   # only the new turn
    # and the answer equals a cold request carrying the whole conversation as items
    r3 = c.responses.create(model="m", input=[
        {"role": "user", "content": "Name a fruit that is red."},
        {"role": "assistant", "content": [{"type": "output_text", "text": r1.output_text}]},
        {"role": "user", "content": "And one that is yellow?"}], max_output_tokens=20, temperature=0)
    assert r3.output_text == r2.output_text
    # a third turn chains on
    r4 = c.responses.create(model="m", input="And green?", previous_response_id=r2.id, max_output_tokens=12, temperature=0)
    assert r4.usage.input_tokens_details.cached_tokens >= r2.usage.input_tokens + r2.usage.output_tokens - 1


def test_streaming_events(srv):
    c = client(srv)
    events = list(c.responses.create(model="m", input="Count from one to five.", max_output_tokens=16, stream=True,
                                     temperature=0))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == final.output_text == [e for e in events if e.type == "response.output_text.done"][0].text
    plain = c.responses.create(model="m", input="Count from one to five.", max_output_tokens=16, temperature=0)
    assert plain.output_text == deltas
    assert final.usage.output_tokens == plain.usage.output_tokens


def test_structured_output(srv):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer", "minimum": 0}},
              "required": ["city", "population"], "additionalProperties": False}
    c = client(srv)
    for seed in range(3):
        r = c.responses.create(model="m", input="A city and its population, as JSON.", max_output_tokens=80,
                               temperature=1.0, extra_body={"seed": seed},
                               text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}})
        assert r.status == "completed"
        jsonschema.validate(json.loads(r.output_text), schema)


TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                         "required": ["city"], "additionalProperties": False}, "strict": True}]


def test_function_calls_and_results(srv):
    c = client(srv)
    r = c.responses.create(model="m", input="What is the weather in Paris?", tools=TOOLS, tool_choice="required",
                           max_output_tokens=60, temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and all(o.name == "get_weather" and o.call_id.startswith("call_") for o in calls)
    for o in calls:
        jsonschema.validate(json.loads(o.arguments), TOOLS[0]["parameters"])
    # the result goes back as an item; the follow-up continues from the cache
    r2 = c.responses.create(model="m", previous_response_id=r.id, tools=TOOLS, max_output_tokens=24, temperature=0,
                            input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21 C"}])
    assert r2.output_text
    assert r2.usage.input_tokens_details.cached_tokens >= r.usage.input_tokens - 1
    # streamed: the call arrives as output_item.added / arguments / output_item.done
    ev = list(c.responses.create(model="m", input="What is the weather in Paris?", tools=TOOLS, tool_choice="required",
                                 max_output_tokens=60, temperature=0, stream=True))
    done = [e.item for e in ev if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert [(d.name, d.arguments) for d in done] == [(o.name, o.arguments) for o in calls]


def test_retrieve_delete_and_tenants(srv):
    a, b = client(srv, KEY_A), client(srv, KEY_B)
    r = a.responses.create(model="m", input="Say hello.", max_output_tokens=8, temperature=0)
    got = a.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text
    with pytest.raises(openai.NotFoundError):          # another tenant sees nothing
        b.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as ei:
        b.responses.create(model="m", input="Go on.", previous_response_id=r.id, max_output_tokens=4)
    assert ei.value.body["code"] == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        a.responses.create(model="m", input="Go on.", previous_response_id="resp_unknown", max_output_tokens=4)
    nostore = a.responses.create(model="m", input="Say hi.", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(nostore.id)
    a.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(r.id)


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"background": True}, "background"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0]"),
    ({"text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "string", "pattern": "a"}}}}, "response_format"),
    ({"input": 5}, "input"),
])
def test_refusals_are_named(srv, extra, param):
    body = {"model": "m", "input": "hi", "max_output_tokens": 4, **extra}
    r = requests.post(srv.base + "/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60)
    assert r.status_code == 400, r.text
    e = r.json()["error"]
    assert e["param"] == param or param in e["message"], e


def test_paths_and_methods(srv):
    h = {"Authorization": f"Bearer {KEY_A}"}
    r = requests.post(srv.base + "/responses", json={"input": "hi", "max_output_tokens": 2}, headers=h, timeout=60)
    assert r.status_code == 200 and r.json()["object"] == "response"   # without /v1, and without model
    assert requests.get(srv.base + "/v1/responses", headers=h, timeout=10).status_code == 405
    assert requests.post(srv.base + "/v1/responses/" + r.json()["id"], headers=h, timeout=10).status_code == 405
    assert requests.post(srv.base + "/v1/responses", json={"input": "hi"}, timeout=10).status_code == 401
