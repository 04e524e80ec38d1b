"""Helpers for the oracle tests: run the pcache binaries, write tiny synthetic GGUF models,
compare logits. (Kept out of conftest.py, which others own.)"""
from __future__ import annotations

import json
import os
import subprocess

import reference  # noqa: F401  (sets OPENBLAS_NUM_THREADS before numpy loads)
import numpy as np
import pytest

BUILD = os.environ.get("PCACHE_BUILD", "build")
MODEL = os.environ.get("PCACHE_MODEL", "models/SmolLM2-135M-Instruct.Q4_1.gguf")
TOOL = os.path.join(BUILD, "pcache-tool")
PCACHE = os.path.join(BUILD, "pcache")
TIMEOUT = 300


def need_binary(path: str) -> str:
    """Missing binaries are a failure, not a skip: these tests are the engine's oracle."""
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is not built (run `make BUILD={BUILD} all`)", pytrace=False)
    return path


# The llama.cpp the tests compare against: scripts/install-llama.sh builds it with pinned
# kernels (AVX2/FMA/F16C, no AVX-512/AVX-VNNI/AMX) so that what it computes is the same on
# every x86-64 host; a native build rounds differently on an AVX-512 CPU (issue 12). The
# Makefile puts it on PYTHONPATH and names it in PCACHE_ORACLE.
ORACLE_DIR = os.environ.get("PCACHE_ORACLE", "")
HOST_DEPENDENT = ("AVX512", "AVX_VNNI", "AMX")


def oracle_flags(system_info: str) -> dict:
    """'CPU : SSE3 = 1 | AVX2 = 1 | ...' -> {'SSE3': 1, 'AVX2': 1, ...}"""
    flags = {}
    for part in system_info.replace(":", "|").split("|"):
        k, eq, v = part.partition("=")
        if eq and v.strip().isdigit():
            flags[k.strip()] = int(v.strip())
    return flags


def llama_oracle():
    """llama_cpp, the pinned oracle build. Missing or built with host-dependent kernels is a
    failure, never a skip: the comparison would silently move with the CPU."""
    try:
        import llama_cpp
    except Exception as e:
        pytest.fail(f"llama_cpp not importable ({e}); `make test` builds the oracle into "
                    ".deps/llama-oracle (scripts/install-llama.sh oracle)", pytrace=False)
    where = os.path.dirname(os.path.abspath(llama_cpp.__file__))
    if ORACLE_DIR and not where.startswith(os.path.abspath(ORACLE_DIR)):
        pytest.fail(f"llama_cpp comes from {where}, not the pinned oracle in {ORACLE_DIR}",
                    pytrace=False)
    info = llama_cpp.llama_print_system_info().decode()
    flags = oracle_flags(info)
    if not flags.get("AVX2") or any(flags.get(k) for k in flags
                                    if k.startswith(HOST_DEPENDENT)):
        pytest.fail(f"llama_cpp at {where} is not the pinned AVX2 oracle: {info.strip()}",
                    pytrace=False)
    return llama_cpp


def need_model(path: str = MODEL) -> str:
    if not os.path.exists(path):
        pytest.fail(f"model {path} missing (run `make model`)", pytrace=False)
    return path


def _run(args, stdin: bytes) -> bytes:
    p = subprocess.run(args, input=stdin, capture_output=True, timeout=TIMEOUT)
    if p.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {p.returncode}: "
                    f"{p.stderr.decode(errors='replace')[-2000:]}", pytrace=False)
    return p.stdout


def tool_logits(model: str, ids, n_vocab: int, all_positions: bool = False) -> np.ndarray:
    """`pcache-tool logits MODEL [--all] < ids.json` -> (n_vocab,) or (n_tokens, n_vocab)."""
    args = [need_binary(TOOL), "logits", model] + (["--all"] if all_positions else [])
    out = _run(args, json.dumps([int(i) for i in ids]).encode())
    a = np.frombuffer(out, dtype="<f4")
    want = n_vocab * (len(ids) if all_positions else 1)
    assert a.size == want, f"pcache-tool logits wrote {a.size} floats, expected {want}"
    return a.reshape(len(ids), n_vocab) if all_positions else a


def tool_generate(model: str, ids, n: int) -> list:
    out = _run([need_binary(TOOL), "generate", model, str(n)],
               json.dumps([int(i) for i in ids]).encode())
    gen = json.loads(out)
    assert isinstance(gen, list) and all(isinstance(t, int) for t in gen), out[:200]
    return gen


def pcache_tokenize(text: str, model: str = MODEL) -> list:
    out = _run([need_binary(PCACHE), "tokenize", "-m", model], text.encode())
    return json.loads(out)


def logit_stats(ref: np.ndarray, got: np.ndarray) -> dict:
    """Max abs diff, the same relative to max|ref|, and KL(softmax(ref) || softmax(got))."""
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    d = np.abs(ref - got)
    lp = ref - ref.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = got - got.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return dict(max_abs=float(d.max()), rel=float(d.max() / np.abs(ref).max()),
                mean_abs=float(d.mean()), kl=float(np.max(kl)))


def top2_gap(logits: np.ndarray) -> float:
    s = np.sort(np.asarray(logits, np.float64))
    return float(s[-1] - s[-2])


# ---------------------------------------------------------------------------------------------
# Tiny synthetic models
# ---------------------------------------------------------------------------------------------
def _byte_unicode():
    """GPT-2's byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def synth_vocab(n_vocab: int):
    """Control tokens, the 256 byte tokens, then merged tokens (merges of two letters) up to
    n_vocab. Enough for a gpt2-style tokenizer to load; the tests feed token ids directly."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bu = _byte_unicode()
    toks = specials + [bu[b] for b in range(256)]
    types = [3] * len(specials) + [1] * 256
    letters = "etaoinshrdlucmfwypvbgk"
    merges = []
    for a in "Ġ" + letters:
        for b in letters:
            if len(toks) >= n_vocab:
                break
            toks.append(a + b)
            types.append(1)
            merges.append(f"{a} {b}")
    assert len(toks) == n_vocab, "n_vocab too large for the synthetic merges"
    return toks, types, merges


def write_synth_model(path: str, arch: str = "llama", *, wtype: str = "F32",
                      ffn_types=None, embd_type: str = "F32", tied: bool = True,
                      out_type: str = "F32", out_scale: float = 4.0, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                      n_head_kv: int = 2, head_dim: int | None = None, n_ff: int = 128,
                      n_vocab: int = 300, seed: int = 0, context_length: int = 256,
                      chat_template: str | None = None, added_tokens=(), unused_tokens=()) -> dict:
    """Writes a random llama/qwen2/qwen3 GGUF. wtype is the type of the attention matrices,
    ffn_types (gate, up, down) those of the FFN (default wtype for all); norms are F32 as the
    llama.cpp converter writes them; out_scale scales the untied output matrix (a small one
    makes the next-token distribution nearly uniform). chat_template: tokenizer.chat_template (none by default).
    added_tokens: more tokens at the end of the vocabulary (n_vocab includes them), user-defined
    as the converter writes Qwen3's <think> and </think> (matched whole in text, rendered in
    output). unused_tokens: ids typed unused (they render as nothing). Returns the
    hyper-parameters."""
    import gguf
    from gguf import GGMLQuantizationType as QT

    rng = np.random.default_rng(seed)
    head_dim = head_dim or n_embd // n_head
    ffn_types = ffn_types or (wtype, wtype, wtype)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"synthetic-{arch}")
    w.add_context_length(context_length)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.add_block_count(n_layer)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0 if arch == "llama" else 1000000.0)
    w.add_layer_norm_rms_eps(1e-6 if arch != "llama" else 1e-5)
    if head_dim != n_embd // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(n_vocab)
    toks, types, merges = synth_vocab(n_vocab - len(added_tokens))
    toks, types = toks + list(added_tokens), types + [4] * len(added_tokens)
    for i in unused_tokens:
        types[i] = 5
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "smollm")
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    def add(name, arr, typ="F32"):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        t = QT[typ]
        if t == QT.F32:
            w.add_tensor(name, arr)
        elif t == QT.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, t), raw_dtype=t)

    def mat(rows, cols):
        return rng.standard_normal((rows, cols)) / np.sqrt(cols)

    def norm(n):
        return 1.0 + 0.2 * rng.standard_normal(n)

    q_dim, kv_dim = n_head * head_dim, n_head_kv * head_dim
    add("token_embd.weight", rng.standard_normal((n_vocab, n_embd)), embd_type)
    add("output_norm.weight", norm(n_embd))
    if not tied:
        add("output.weight", mat(n_vocab, n_embd) * out_scale, out_type)
    for i in range(n_layer):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", norm(n_embd))
        add(p + "attn_q.weight", mat(q_dim, n_embd) * 2, wtype)
        add(p + "attn_k.weight", mat(kv_dim, n_embd) * 2, wtype)
        add(p + "attn_v.weight", mat(kv_dim, n_embd), wtype)
        add(p + "attn_output.weight", mat(n_embd, q_dim), wtype)
        if arch == "qwen2":
            add(p + "attn_q.bias", 0.5 * rng.standard_normal(q_dim))
            add(p + "attn_k.bias", 0.5 * rng.standard_normal(kv_dim))
            add(p + "attn_v.bias", 0.5 * rng.standard_normal(kv_dim))
        if arch == "qwen3":
            add(p + "attn_q_norm.weight", norm(head_dim))
            add(p + "attn_k_norm.weight", norm(head_dim))
        add(p + "ffn_norm.weight", norm(n_embd))
        add(p + "ffn_gate.weight", mat(n_ff, n_embd), ffn_types[0])
        add(p + "ffn_up.weight", mat(n_ff, n_embd), ffn_types[1])
        add(p + "ffn_down.weight", mat(n_embd, n_ff), ffn_types[2])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dict(arch=arch, n_vocab=n_vocab, n_layer=n_layer, head_dim=head_dim)


def write_truncated_model(src: str, dst: str, n_layer: int) -> None:
    """Copies a llama-family GGUF keeping only its first n_layer blocks (same metadata and raw
    tensor bytes otherwise): real weights, with less depth for rounding flips to compound in."""
    import gguf
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        val = f.contents()
        if key == f"{arch}.block_count":
            val = n_layer
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, val, vtype, sub_type=sub)
    for t in r.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= n_layer:
            continue
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
