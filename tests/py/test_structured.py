"""Structured outputs (response_format json_object / json_schema): every output parses and
validates, with `jsonschema` (PyPI) as the oracle.

- Hundreds of random schemas from the supported subset, random token walks through their
  grammars over SmolLM2's vocabulary (`pcache-tool grammar-sample --batch`: the exact masks the
  engine applies, without the model, so fast): every walk completes and validates.
- Soundness and completeness of the compiled grammars on texts: whatever a grammar accepts as
  complete validates; every valid instance written canonically (schema order, compact) is
  accepted; mutated instances that do not validate are never accepted.
- End to end through the server with the real model: random seeds and temperatures, streamed
  and not, json_object, refusals named.
"""
import json
import os
import random
import subprocess

import jsonschema
import pytest
import requests

from server_fixture import BUILD, MODEL, launch

TOOL = os.path.join(BUILD, "pcache-tool")
N_SCHEMAS = 240

NAMES = ["name", "age", "id", "ok", "tags", "é", "na\"me", "a b", "ключ", "x\\y", "nested", "v"]
STRINGS = ["", "a", "red", "green", "ja\"m", "é", "line\nbreak", "tab\t", "日本", "\\", "emoji 😀"]


def gen_scalar_value(rng):
    return rng.choice([rng.choice(STRINGS), rng.randint(-50, 50), round(rng.uniform(-5, 5), 3), True, False, None])


def gen_schema(rng, depth=0, defs=None):
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "const", "format", "typelist"]
    if depth < 3:
        kinds += ["object", "object", "array", "array", "anyOf"]
    k = rng.choice(kinds)
    if k == "string":
        lo = rng.randint(0, 3)
        return {"type": "string", "minLength": lo, "maxLength": lo + rng.randint(0, 8)}
    if k == "integer":
        s = {"type": "integer"}
        if rng.random() < 0.3:
            s["minimum"] = rng.choice([0, 1])
        return s
    if k == "number":
        s = {"type": "number", "description": "a number"}
        if rng.random() < 0.3:
            s["minimum"] = 0
        return s
    if k == "boolean":
        return {"type": "boolean"}
    if k == "null":
        return {"type": "null"}
    if k == "enum":
        vals = []
        for _ in range(rng.randint(1, 4)):
            v = gen_scalar_value(rng)
            if v not in vals:
                vals.append(v)
        return {"enum": vals}
    if k == "const":
        return {"const": rng.choice([gen_scalar_value(rng), {"k": [1, "x", None]}, [True, 2.5]])}
    if k == "format":
        return {"type": "string", "format": rng.choice(["date", "time", "date-time", "uuid"])}
    if k == "typelist":
        return {"type": ["string", "null"], "maxLength": rng.randint(0, 6)}
    if k == "object":
        names = rng.sample(NAMES, rng.randint(0, 4))
        props = {n: gen_schema(rng, depth + 1, defs) for n in names}
        s = {"type": "object", "properties": props,
             "required": [n for n in names if rng.random() < 0.6]}
        if rng.random() < 0.7:
            s["additionalProperties"] = False
        if defs is not None and rng.random() < 0.3:   # a reference to a shared definition
            dn = f"d{len(defs)}"
            defs[dn] = gen_schema(rng, 3, None)
            s["properties"]["ref"] = {"$ref": f"#/$defs/{dn}"}
        return s
    if k == "array":
        lo = rng.randint(0, 2)
        return {"type": "array", "items": gen_schema(rng, depth + 1, defs), "minItems": lo, "maxItems": lo + rng.randint(0, 2)}
    branches = [gen_schema(rng, depth + 1, defs) for _ in range(rng.randint(2, 3))]
    return {"anyOf": branches}


def random_schemas(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        defs = {}
        s = gen_schema(rng, 0, defs)
        if defs:
            s["$defs"] = defs
        out.append(s)
    return out


def validator(schema):
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def run_tool(args, stdin):
    r = subprocess.run([TOOL] + args, input=stdin.encode(), capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    return r.stdout.decode()


def test_random_walks_through_hundreds_of_schemas_validate():
    schemas = random_schemas(N_SCHEMAS, 1)
    out = run_tool(["grammar-sample", MODEL, "--batch", "7", "3"], "\n".join(json.dumps(s) for s in schemas) + "\n")
    lines = [json.loads(l) for l in out.splitlines()]
    errors = [l for l in lines if "error" in l]
    assert not errors, errors[:3]
    assert len(lines) == 3 * N_SCHEMAS
    kinds = set()
    for l in lines:
        s = schemas[l["i"]]
        assert l["complete"], (s, l)
        inst = json.loads(l["text"])
        validator(s).validate(inst)
        kinds.add(type(inst).__name__)
    assert kinds >= {"dict", "list", "str", "int"}, kinds   # the generator covered the types


def canonical_instance(rng, s, defs):
    """A valid instance of s (the supported subset), as the grammar writes keys: schema order."""
    if "$ref" in s:
        return canonical_instance(rng, defs[s["$ref"].split("/")[-1]], defs)
    if "const" in s:
        return s["const"]
    if "enum" in s:
        return rng.choice(s["enum"])
    if "anyOf" in s:
        return canonical_instance(rng, rng.choice(s["anyOf"]), defs)
    t = s.get("type")
    if isinstance(t, list):
        t = rng.choice(t)
    if t == "string":
        f = s.get("format")
        if f == "date":
            return "2024-02-%02d" % rng.randint(1, 28)
        if f == "time":
            return "%02d:%02d:%02dZ" % (rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59))
        if f == "date-time":
            return "1999-12-%02dT23:59:%02dZ" % (rng.randint(1, 28), rng.randint(0, 59))   # days 01-28 (jsonschema.h)
        if f == "uuid":
            return "123e4567-e89b-12d3-a456-426614174000"
        n = rng.randint(s.get("minLength", 0), s.get("maxLength", s.get("minLength", 0) + 5))
        return "".join(rng.choice("ab\"\\é😀\n z") for _ in range(n))
    if t == "integer":
        return rng.randint(s.get("minimum", -1000), 1000)
    if t == "number":
        return rng.choice([rng.randint(s.get("minimum", -9), 9), round(rng.uniform(s.get("minimum", -9), 9), 4)])
    if t == "boolean":
        return rng.random() < 0.5
    if t == "null":
        return None
    if t == "object":
        out = {}
        for k, v in s.get("properties", {}).items():
            if k in s.get("required", []) or rng.random() < 0.5:
                out[k] = canonical_instance(rng, v, defs)
        return out
    if t == "array":
        n = rng.randint(s.get("minItems", 0), s.get("maxItems", s.get("minItems", 0) + 2))
        return [canonical_instance(rng, s["items"], defs) for _ in range(n)]
    raise AssertionError(s)


def mutate(rng, inst):
    """Some change that usually breaks validity."""
    r = rng.random()
    if isinstance(inst, dict) and inst and r < 0.3:
        inst = dict(inst)
        del inst[rng.choice(list(inst))]
        return inst
    if isinstance(inst, dict) and r < 0.5:
        return {**inst, "zz_extra": 1}
    if isinstance(inst, list) and r < 0.5:
        return inst + inst + [None]
    return rng.choice(["x" * 30, 3.5, -7, None, True, [], {}, "2024-13-45"])


def test_grammars_accept_exactly_valid_json():
    """Soundness: 'complete' implies valid; completeness: every canonical valid instance is
    accepted. Checked on valid instances, mutated (mostly invalid) ones and re-spaced ones."""
    rng = random.Random(2)
    schemas = random_schemas(N_SCHEMAS, 3)
    cases = []
    for s in schemas:
        defs = s.get("$defs", {})
        for _ in range(3):
            v = canonical_instance(rng, s, defs)
            validator(s).validate(v)
            cases.append((s, json.dumps(v, ensure_ascii=False, separators=(",", ":")), True))
            cases.append((s, json.dumps(v, ensure_ascii=False, indent=2), None))   # may be accepted or not
            m = mutate(rng, v)
            cases.append((s, json.dumps(m, ensure_ascii=False), None))
    lines = "\n".join(json.dumps({"schema": s, "text": t}) for s, t, _ in cases) + "\n"
    verdicts = run_tool(["grammar-check", "--batch"], lines).splitlines()
    assert len(verdicts) == len(cases)
    accepted_invalid = rejected_valid = refused_mutants = 0
    for (s, t, must), v in zip(cases, verdicts):
        assert not v.startswith("error"), (s, v)
        valid = validator(s).is_valid(json.loads(t))
        if v == "complete" and not valid:
            accepted_invalid += 1
            print("accepted an invalid instance:", s, t)
        if must and v != "complete":
            rejected_valid += 1
            print("rejected a canonical valid instance:", s, t, v)
        refused_mutants += not valid and v != "complete"
    assert accepted_invalid == 0 and rejected_valid == 0
    assert refused_mutants > N_SCHEMAS // 2   # the mutations did produce invalid texts, and they were refused


# ------------------------------------------------------------------------------ through the server
@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = launch(tmp_path_factory.mktemp("structured"), keys=[])
    yield s
    s.proc.terminate()
    s.proc.wait(timeout=30)


def chat(srv, fmt, seed=0, temperature=0.0, stream=False, max_tokens=200, content="Describe a person as JSON."):
    body = {"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": temperature, "seed": seed, "response_format": fmt, "stream": stream}
    return requests.post(srv.base + "/v1/chat/completions", json=body, timeout=300, stream=stream)


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0},
    "role": {"enum": ["admin", "user", "guest"]},
    "email": {"type": ["string", "null"], "maxLength": 24},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                 "zip": {"type": "string", "format": "date"}},
                "required": ["city"], "additionalProperties": False}},
    "required": ["name", "age", "role", "tags"], "additionalProperties": False}


def test_server_outputs_validate_across_seeds(srv):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    texts = set()
    for seed in range(8):
        r = chat(srv, fmt, seed=seed, temperature=1.0)
        assert r.status_code == 200, r.text
        ch = r.json()["choices"][0]
        assert ch["finish_reason"] == "stop", ch
        inst = json.loads(ch["message"]["content"])
        validator(PERSON).validate(inst)
        texts.add(ch["message"]["content"])
    assert len(texts) > 4   # sampling really varied


def test_server_streamed_output_validates_and_equals_unstreamed(srv):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    plain = chat(srv, fmt, seed=3, temperature=0.7).json()["choices"][0]["message"]["content"]
    r = chat(srv, fmt, seed=3, temperature=0.7, stream=True)
    assert r.status_code == 200
    text = ""
    for line in r.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            d = json.loads(line[6:])
            if d["choices"] and d["choices"][0]["delta"].get("content"):
                text += d["choices"][0]["delta"]["content"]
    assert text == plain
    validator(PERSON).validate(json.loads(text))


def test_server_json_object_and_greedy_is_deterministic(srv):
    a = chat(srv, {"type": "json_object"}, max_tokens=400).json()["choices"][0]
    b = chat(srv, {"type": "json_object"}, max_tokens=400).json()["choices"][0]
    assert a["message"]["content"] == b["message"]["content"]
    if a["finish_reason"] == "stop":   # the object ended within max_tokens: a whole object
        assert isinstance(json.loads(a["message"]["content"]), dict)
    else:                             # cut by max_tokens: what came is an object's beginning
        assert a["message"]["content"].lstrip().startswith("{")


def test_server_refuses_unsupported_schemas_by_name(srv):
    for schema, word in [({"type": "string", "pattern": "^a+$"}, "pattern"),
                         ({"type": "object", "properties": {"n": {"type": "integer", "maximum": 5}}}, "maximum"),
                         ({"oneOf": [{"type": "string"}]}, "oneOf"),
                         ({"type": "object", "required": ["q"]}, "q")]:
        r = chat(srv, {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
        assert r.status_code == 400, r.text
        e = r.json()["error"]
        assert e["param"] == "response_format" and word in e["message"], e
    r = chat(srv, {"type": "yaml"})
    assert r.status_code == 400 and "response_format" in r.json()["error"]["param"]
    assert requests.get(srv.base + "/health", timeout=10).status_code == 200


def test_server_schema_output_is_the_same_with_the_cache_on(srv):
    """The grammar does not interfere with prompt caching: a resend hits the cache and gives
    the same greedy output."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    a = chat(srv, fmt, content="Another person, as JSON, please.").json()
    b = chat(srv, fmt, content="Another person, as JSON, please.").json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
