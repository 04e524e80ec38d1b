"""Tokenizer vs Hugging Face: our ids (through `pcache-tool tokenize`) must equal the ids of the
Hugging Face `tokenizers` tokenizer that transformers' own GGUF converter builds from the same
GGUF metadata. transformers' GGUF loader needs torch (absent here), so we read the tokenizer
fields with the `gguf` package and call `convert_gguf_tokenizer` directly.

Covered: the real SmolLM2 vocab ("smollm" pre-tokenizer), the same vocab re-labelled with the
"qwen2", "llama3" and "gpt2" pre-tokenizers, and a synthetic SentencePiece ("llama") vocab with
byte fallback. Also: detokenization round trips and SmolLM2's chat template vs jinja2.
"""
import functools
import json
import os
import random
import subprocess

import numpy as np
import pytest

BUILD = os.environ.get("PCACHE_BUILD", "build")
MODEL = os.environ.get("PCACHE_MODEL", "models/SmolLM2-135M-Instruct.Q4_1.gguf")
TOOL = os.path.join(BUILD, "pcache-tool")

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

pytestmark = pytest.mark.skipif(not os.path.exists(TOOL), reason="pcache-tool not built")


# ---------------------------------------------------------------- helpers

def tool(args, data: bytes) -> bytes:
    r = subprocess.run([TOOL, *args], input=data, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r.stdout


def our_ids(model, text, special=True, bos=False):
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    args = ["tokenize", model] + ([] if special else ["--no-special"]) + (["--bos"] if bos else [])
    return json.loads(tool(args, data))


def our_ids_batch(model, texts, special=True):
    """Many strings in one tool run (strings without NUL; invalid UTF-8 goes through our_ids)."""
    texts = list(texts)
    args = ["tokenize", model, "--batch"] + ([] if special else ["--no-special"])
    out = tool(args, json.dumps(texts, ensure_ascii=False).encode("utf-8")).decode().splitlines()
    assert len(out) == len(texts)
    return [json.loads(line) for line in out]


def compare(model, hf, texts, special=True):
    """(text, ours, ref) for every text where our ids differ from HF's."""
    texts = list(texts)
    ours = our_ids_batch(model, texts, special)
    refs = [hf_ids(hf, s, special) for s in texts]
    return [(s, o, r) for s, o, r in zip(texts, ours, refs) if o != r]


@functools.lru_cache(maxsize=8)
def read_tokenizer_dict(path):
    """The tokenizer fields of a GGUF under transformers' names (GGUF_TOKENIZER_MAPPING)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    r = gguf.GGUFReader(path)
    d = {}
    for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items():
        f = r.fields.get("tokenizer." + key)
        if f is not None:
            d[name] = f.contents()
    return d


@functools.lru_cache(maxsize=2)
def chat_template_source(path):
    return gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()


def hf_tokenizer(path):
    """transformers' GGUF converter applied to the file's metadata."""
    from transformers.integrations.gguf import convert_gguf_tokenizer

    d = read_tokenizer_dict(path)
    tok, _ = convert_gguf_tokenizer("llama", dict(d))
    if d.get("pre_tokenizer_type") == "smollm":
        # The converter has no entry for "smollm"; SmolLM2's own tokenizer.json pre-tokenizer is
        # Digits(individual_digits) followed by the GPT-2 ByteLevel regex. Use exactly that.
        from tokenizers import pre_tokenizers

        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    return tok


def hf_ids(tok, text, special=True):
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    tok.encode_special_tokens = not special
    try:
        return tok.encode(text, add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = False


def random_unicode(rng, n):
    """Random strings over assigned, stable code points (no surrogates, no unassigned planes)."""
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x5FF), (0x600, 0x6FF),
              (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F300, 0x1F64F),
              (0x2000, 0x206F), (0x0300, 0x036F), (0xFF01, 0xFF5E)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
        if rng.random() < 0.15:
            out.append(rng.choice([" ", "  ", "\n", "\t", "'s", "1", "99"]))
    return "".join(out)


CORPUS = [
    "", " ", "a", "Hello world", "Hello, world!", " Hello", "  Hello", "Hello ", "Hello   ",
    "hello\nworld", "hello\n\nworld", "line1\r\nline2", "\n\n\n", "\t\tindented", "a\tb\tc",
    "ten spaces:          end", "trailing spaces   ", "   leading spaces", " \n \n ",
    "1234567", "3.14159", "2024-01-15", "12:30:45", "1,000,000", "-42", "0x1F", "1e-10", "v1.2.3",
    "I'm", "DON'T", "you're", "we'VE", "they'll", "she'd", "it's", "'s'", "''", "O'Reilly's",
    "def foo(x):\n    return x * 2\n", "for i in range(10):\n\tprint(i)\n",
    "int main(void) {\n    printf(\"%d\\n\", 42);\n    return 0;\n}\n",
    '{"key": "value", "n": [1, 2, 3], "nested": {"a": null}}',
    "<html><body class=\"x\">Hi &amp; bye</body></html>", "SELECT * FROM t WHERE id = 7;",
    "x += 1; y -= 2; z **= 3", "a->b && c || !d", "#include <stdio.h>", "$PATH:/usr/bin",
    "你好，世界！", "日本語のテキストです。", "한국어 문장입니다.", "中文123数字",
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "I ❤️ NY", "emoji😀in😀text",
    "café", "cafe\u0301", "naïve résumé", "Ångström", "e\u0301\u0302\u0303",
    "Привет, мир!", "مرحبا بالعالم", "नमस्ते दुनिया", "שלום עולם", "Γειά σου Κόσμε", "สวัสดีชาวโลก",
    "<|im_start|>user\nHi<|im_end|>\n", "<|endoftext|>", "a<|im_end|>b", "<|im_start|><|im_start|>",
    "<|im_start", "text <repo_name> more", "ﬁ ligature", "ＦＵＬＬ width", "\u00a0nbsp\u00a0",
    "\u200bzero\u200bwidth", "tab\there", "CamelCaseIdentifier", "snake_case_identifier", "UPPER",
    "$100.50 & 20% off!!!", "...", "---", "?!?!", "a.b.c", "https://example.com/path?q=1&r=2",
    "The quick brown fox jumps over the lazy dog.", "ſ long s 's 'ſ", "İstanbul", "K Kelvin",
    "x" * 300, "ab" * 200, " " * 50 + "x", "\n" * 20, "١٢٣ ٤٥٦ Arabic digits", "²³ ½ Ⅻ",
]

BAD_UTF8 = [b"\xff", b"abc\xffdef", b"\xc3", b"\xe4\xbd", b"\xed\xa0\x80", b"\xf0\x9f\x98", b"\x80\x80x",
            b"ok\xf4\x90\x80\x80", b"\xc0\xaf", b"mixed \xe4\xbd\xa0 \xe4\xbd"]


def corpus_with_random(seed=1234, n=40):
    rng = random.Random(seed)
    return CORPUS + [random_unicode(rng, rng.randint(1, 60)) for _ in range(n)]


# ---------------------------------------------------------------- SmolLM2 (real vocab)

needs_model = pytest.mark.skipif(not os.path.exists(MODEL), reason="model file absent")


@pytest.fixture(scope="module")
def smollm_hf():
    return hf_tokenizer(MODEL)


@needs_model
def test_corpus_size():
    assert len(corpus_with_random()) >= 60


@needs_model
def test_smollm_matches_hf(smollm_hf):
    bad = compare(MODEL, smollm_hf, corpus_with_random(n=200))
    assert not bad, f"{len(bad)} mismatches, first: {bad[:3]}"


@needs_model
def test_smollm_long_texts_match_hf(smollm_hf):
    """Texts of many pieces: past its first 64 pieces an encode call remembers each short
    piece's ids (a direct-mapped table, so pieces also evict each other), which must give what
    merging it again gives."""
    rng = random.Random(77)
    pool = corpus_with_random(seed=5, n=100)
    texts = [" ".join(rng.choice(pool) for _ in range(rng.randint(60, 400))) for _ in range(6)]
    words = ["cache", " cache", "Cache", "caché", " prompt", "的", " 1234", "\n\n", "  ", "ab" * 11, "ab" * 12]
    texts.append("".join(rng.choice(words) for _ in range(3000)))
    bad = compare(MODEL, smollm_hf, texts)
    assert not bad, f"{len(bad)} mismatches, first: {[b[:1] for b in bad[:1]]}"


@needs_model
def test_smollm_no_special_matches_hf(smollm_hf):
    for s in ["<|im_start|>user\nHi<|im_end|>", "a<|endoftext|>b"]:
        ours = our_ids(MODEL, s, special=False)
        assert ours == hf_ids(smollm_hf, s, special=False)
        assert 1 not in ours and 0 not in ours  # no control ids when not parsing specials


@needs_model
def test_smollm_invalid_utf8_as_replacement(smollm_hf):
    rng = random.Random(4321)
    rand = [bytes(rng.randrange(256) for _ in range(rng.randint(1, 40))) for _ in range(15)]
    for b in BAD_UTF8 + [b"a\x00b", b"\x13\x04 ctrl \xc0\xff"] + rand:
        assert our_ids(MODEL, b) == hf_ids(smollm_hf, b), b


@needs_model
def test_smollm_bos_flag():
    # add_bos_token is false in the file, but --bos asks for it explicitly: id 1 first.
    assert our_ids(MODEL, "hi", bos=True)[0] == 1
    assert our_ids(MODEL, "hi", bos=True)[1:] == our_ids(MODEL, "hi")


@needs_model
def test_smollm_detokenize_roundtrip(smollm_hf):
    texts = corpus_with_random(seed=99, n=20)[::4]
    for s, ids in zip(texts, our_ids_batch(MODEL, texts, special=False)):
        out = tool(["detokenize", MODEL], json.dumps(ids).encode()).decode("utf-8")
        assert out == s
        assert out == smollm_hf.decode(ids, skip_special_tokens=False)


@needs_model
def test_smollm_detokenize_specials_hidden_unless_asked():
    ids = our_ids(MODEL, "<|im_start|>user\nhi<|im_end|>")
    assert tool(["detokenize", MODEL], json.dumps(ids).encode()).decode() == "user\nhi"
    assert tool(["detokenize", MODEL, "--special"], json.dumps(ids).encode()).decode() == \
        "<|im_start|>user\nhi<|im_end|>"


# ---------------------------------------------------------------- chat template vs jinja2

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Tell me a joke.\nA short one."}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  spaces  "}],
    [{"role": "user", "content": "unicode: 你好 😀"}],
]


@needs_model
@pytest.mark.parametrize("gen", [True, False])
def test_smollm_chat_template_matches_jinja(gen):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    src = chat_template_source(MODEL)
    # transformers renders chat templates with these environment settings.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    tmpl = env.from_string(src)
    for msgs in CONVERSATIONS:
        ref = tmpl.render(messages=msgs, add_generation_prompt=gen, bos_token="<|im_start|>",
                          eos_token="<|im_end|>")
        args = ["chat", MODEL] + ([] if gen else ["--no-gen"])
        assert tool(args, json.dumps(msgs).encode()).decode() == ref


# ---------------------------------------------------------------- other pre-tokenizers on the real vocab

def write_bpe_gguf(path, pre, d):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    # SmolLM2's vocab has no multi-digit tokens (its digits are always split); add a few so that
    # the pre-tokenizers' digit rules (\p{N} vs \p{N}{1,3}) change the ids.
    extra = ["12", "123", "45", "456", "Ġ1", "Ġ12"]
    w.add_token_list(list(d["tokens"]) + extra)
    w.add_token_types(list(d["token_type"]) + [1] * len(extra))
    w.add_token_merges(list(d["merges"]) + ["1 2", "12 3", "4 5", "45 6", "Ġ 1", "Ġ1 2"])
    w.add_bos_token_id(int(d["bos_token_id"]))
    w.add_eos_token_id(int(d["eos_token_id"]))
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def smollm_dict():
    return read_tokenizer_dict(MODEL)


@needs_model
@pytest.mark.parametrize("pre", ["qwen2", "llama3", "llama-bpe", "gpt2", "smollm"])
def test_bpe_pretokenizers_match_hf(pre, smollm_dict, tmp_path):
    path = tmp_path / f"vocab-{pre}.gguf"
    write_bpe_gguf(path, pre, smollm_dict)
    hf = hf_tokenizer(str(path))
    extra = ["123456789", "a1b22c333d4444", "  \n\n  x", "x \r\n y", "HELLO'S WORLD'LL", "!!!\n\n\nfoo",
             "'S 'T 'Re 'VE 'M 'LL 'D", " ?!x", "\u00a0\u00a0x"]
    bad = compare(str(path), hf, corpus_with_random(seed=7, n=100) + extra)
    assert not bad, f"{pre}: {len(bad)} mismatches, first: {bad[:3]}"


# ---------------------------------------------------------------- synthetic SentencePiece vocab

SPM_TEXT = ("the quick brown fox jumps over the lazy dog and then the other fox sat on the mat "
            "in the hat with a cat that ate the rat tokenization is fun isn't it there their them "
            "hello world wonderful work working worker")


def spm_vocab():
    """Pieces = frequent character n-grams of SPM_TEXT (spaces as U+2581), unique scores."""
    text = "\u2581" + SPM_TEXT.replace(" ", "\u2581")
    counts = {}
    for n in range(2, 7):
        for i in range(len(text) - n + 1):
            g = text[i:i + n]
            if "\u2581" in g[1:]:
                continue
            counts[g] = counts.get(g, 0) + 1
    chars = sorted(set(text) | set("abcdefghijklmnopqrstuvwxyz.,!?'-0123456789"))
    grams = sorted((g for g in counts if counts[g] >= 2), key=lambda g: (-counts[g] * len(g), g))[:250]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    for c in chars:
        tokens.append(c); types.append(1); scores.append(-1000.0 - len(tokens))
    for k, g in enumerate(grams):
        tokens.append(g); types.append(1); scores.append(-float(k) - 0.5)
    tokens.append("<tool>"); types.append(4); scores.append(0.0)  # user-defined, matched whole
    return tokens, types, scores


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    tokens, types, scores = spm_vocab()
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_spm_matches_hf(spm_gguf):
    hf = hf_tokenizer(spm_gguf)
    samples = ["the quick brown fox", "Hello world", " leading space", "two  spaces", "trailing ",
               "worker working wonderful", "isn't it?", "über naïve 你好 😀", "x", "",
               "<s>the cat</s>", "the<s>cat", "call <tool> now", "the fox\nthe dog\n",
               "THE QUICK", "0123 456", "\u2581already"] + corpus_with_random(seed=5, n=100)
    bad = compare(spm_gguf, hf, samples)
    assert not bad, f"{len(bad)} mismatches, first: {bad[:3]}"


def test_spm_bos_default_and_byte_fallback(spm_gguf):
    ids = our_ids(spm_gguf, "你", bos=True)
    assert ids[0] == 1
    # "你" is not in the vocab: byte fallback, one <0xXX> token (id 3 + byte) per UTF-8 byte
    assert ids[-3:] == [3 + b for b in "你".encode()]
    out = tool(["detokenize", spm_gguf], json.dumps(ids).encode()).decode()
    assert out.strip() == "你"
