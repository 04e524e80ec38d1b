"""Oracle tests: the NumPy reference (reference.py) against llama.cpp, and pcache against the
reference.

A note on sensitivity (measured, and it sets every tolerance below). With quantized weights,
each matmul input is itself quantized to 8 bits (ggml's Q8_0/Q8_1 activation formats), and
rounding to the nearest integer is discontinuous: a 1-ulp difference in one activation, from a
different float summation order anywhere upstream, can flip one q by +-1, and 30 layers amplify
that. On SmolLM2-135M Q4_1, changing only how the reference computes 1/d in the activation
quantizer (1/(amax/127) vs 127/amax, differing in the last bit now and then) moves the logits
by up to 0.5-1.1 (2-4% of max|logit|) from the 6th position on, while positions with no flip
agree exactly. So two correct implementations of the quantized model agree tightly only where
their float operations match bit for bit; elsewhere they agree to the "activation-quantization
noise" level, which is also the size of the gap between act_quant=True and float activations.
Hence:
  - the structure of the model (RoPE modes, GQA, biases, q/k norms, head_dim != n_embd/n_head,
    tied output) is checked with float weights, where agreement is ~1e-6 relative (synthetic
    models, against llama.cpp and against pcache);
  - quantized models are checked per position: either tight agreement or, where flips
    happened, a bound at the noise level plus a KL bound and argmax equality (up to near-ties).
"""
import numpy as np
import pytest

from oracle_util import (llama_oracle, logit_stats, need_model, pcache_tokenize, tool_logits,
                         top2_gap, write_synth_model, write_truncated_model)
from reference import ReferenceModel, gguf_tokenizer

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea, there lived",
    "1, 2, 3, 5, 8, 13, 21,",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM.<|im_end|>\n"
    "<|im_start|>user\nList three colours.<|im_end|>\n<|im_start|>assistant\n",
    "Ünïcödé and emoji 🙂 mixed with numbers 12345 and punctuation!?",
]

# Near-ties: when the reference's logits of two candidates are closer than this, the argmax of
# two correct implementations may legitimately differ. Float weights: rounding only (1e-2 is
# generous). Real quantized model: the noise floor of the module note (pcache picked a token
# 0.44 below the reference's top at one intermediate position of these prompts).
NEAR_TIE = 1e-2
NEAR_TIE_QUANT = 1.0
# Float weights with an fp16 KV cache: fp16 rounding of q/K/V/probabilities flips now and then
# (measured rel <= 1.3e-4, pcache and llama.cpp alike, against the kv_f16 reference).
F16_KV_TOL = 5e-4


@pytest.fixture(scope="module")
def ref():
    return ReferenceModel(need_model())


@pytest.fixture(scope="module")
def tok():
    return gguf_tokenizer(need_model())


def assert_same_argmax(ref_logits, got, what, tie=NEAR_TIE):
    a, b = int(np.argmax(ref_logits)), int(np.argmax(got))
    if a != b:
        gap = float(ref_logits[a] - ref_logits[b])
        assert gap < tie, f"{what}: argmax {b} != reference {a} (reference gap {gap:.4f})"


# ---------------------------------------------------------------------------------------------
# (a) the reference itself, against llama.cpp
# ---------------------------------------------------------------------------------------------
def test_reference_block_parser_matches_gguf_dequantize(ref):
    """The act-quant path parses the raw blocks itself; it must agree with gguf's dequantize."""
    L = ref.layers[0]
    for m in (L["wq"], L["w_down"], ref.tok_embd):
        np.testing.assert_array_equal(m.dequant_from_blocks(), m.float())


def test_act_quant_off_is_float_matmul(ref):
    """act_quant=False is the plain float model; act_quant=True differs from it, by noise."""
    x = np.random.default_rng(0).standard_normal((3, ref.n_embd)).astype(np.float32)
    w = ref.layers[0]["wq"]
    np.testing.assert_allclose(w.matmul(x, False), x @ w.float().T, rtol=1e-5, atol=1e-5)
    yq = w.matmul(x, True)
    err = np.abs(yq - x @ w.float().T).max() / np.abs(x @ w.float().T).max()
    assert 0 < err < 0.02, err


@pytest.mark.parametrize("arch,head_dim", [("llama", None), ("qwen2", None), ("qwen3", None),
                                           ("qwen3", 32)])
def test_reference_vs_llama_cpp_synthetic_f32(tmp_path, arch, head_dim):
    """Float weights: no activation quantization, so llama.cpp and the reference must agree to
    float rounding (both with an fp16 KV cache, and both with an f32 one). Checks RoPE mode per arch, biases, q/k norm, GQA,
    head_dim != n_embd/n_head, tied output. Measured: f32 KV: rel <= 8e-7; fp16 KV: rel
    <= 1.2e-4 (rounding to fp16 flips a last fp16 bit here and there, like the 8-bit flips of the
    module note, but 8 bits finer)."""
    llama_cpp = llama_oracle()
    path = str(tmp_path / f"{arch}.gguf")
    hp = write_synth_model(path, arch, head_dim=head_dim, seed=3)
    ids = list(np.random.default_rng(1).integers(0, hp["n_vocab"], 20))
    for kv_f16 in (True, False):
        r = ReferenceModel(path, kv_f16=kv_f16).forward(ids, all_logits=True)
        kv = {} if kv_f16 else dict(type_k=0, type_v=0)
        llm = llama_cpp.Llama(path, n_threads=2, n_ctx=64, logits_all=True, verbose=False,
                              flash_attn=False, **kv)
        llm.eval(ids)
        got = np.array(llm.scores[:len(ids)])
        st = logit_stats(r, got)
        print(arch, head_dim, "kv_f16", kv_f16, st)
        assert st["rel"] < (F16_KV_TOL if kv_f16 else 1e-5), st


def test_reference_vs_llama_cpp_real_model(ref, tok):
    """SmolLM2 Q4_1: llama.cpp differs from the reference by activation-quantization noise
    (its vectorised silu/exp and summation orders are not ours; see the module note).
    Measured over these prompts: max abs diff 0.5-0.73 (rel 1.7-3.3%), KL <= 0.015; argmax
    equal. For scale, act_quant on vs off in the reference itself differs by ~0.6."""
    llama_cpp = llama_oracle()
    llm = llama_cpp.Llama(need_model(), n_threads=2, n_ctx=512, logits_all=True, verbose=False)
    for text in PROMPTS[:5]:
        ids = tok.encode(text).ids
        assert ids == llm.tokenize(text.encode(), add_bos=False, special=True), text
        r = ref.forward(ids)
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[len(ids) - 1])
        st = logit_stats(r, got)
        print(repr(text[:30]), len(ids), st)
        assert st["rel"] < 0.06, st
        assert st["kl"] < 3e-2, st
        assert_same_argmax(r, got, repr(text), NEAR_TIE_QUANT)


# ---------------------------------------------------------------------------------------------
# (b) pcache against the reference, real model
# ---------------------------------------------------------------------------------------------
# pcache implements the same activation quantization as the reference (nearest-even, 1/d) but
# sums in SIMD lane order, so flips happen (see the module note). Measured on PROMPTS, every
# position (129): rel max 0.070 (median 0.027), KL max 0.045 (p95 0.012); last positions only:
# rel <= 0.052, KL <= 0.017. llama.cpp vs pcache is at the same level (rel 1e-2..7e-2).
PCACHE_REL_TOL = 0.08      # per position max|diff| / max|logit|
PCACHE_KL_TOL = 0.06


def test_pcache_tokenize_matches_reference_tokenizer(tok):
    for text in PROMPTS:
        assert pcache_tokenize(text) == tok.encode(text).ids, text


def test_pcache_logits_vs_reference(ref, tok):
    worst = []
    for text in PROMPTS:
        ids = tok.encode(text).ids
        r = ref.forward(ids)
        got = tool_logits(need_model(), ids, ref.n_vocab)
        assert np.all(np.isfinite(got))
        st = logit_stats(r, got)
        print(repr(text[:30]), len(ids), st, "top2 gap", round(top2_gap(r), 4))
        worst.append(st["rel"])
        assert st["rel"] < PCACHE_REL_TOL, (text, st)
        assert st["kl"] < PCACHE_KL_TOL, (text, st)
        assert_same_argmax(r, got, repr(text), NEAR_TIE_QUANT)


def test_pcache_logits_vs_reference_all_positions(ref, tok):
    """--all gives every position; its last row is the plain last-position output, and each
    row is checked against the reference."""
    ids = tok.encode(PROMPTS[3]).ids
    r = ref.forward(ids, all_logits=True)
    got = tool_logits(need_model(), ids, ref.n_vocab, all_positions=True)
    last = tool_logits(need_model(), ids, ref.n_vocab)
    np.testing.assert_array_equal(got[-1], last)
    for i in range(len(ids)):
        st = logit_stats(r[i], got[i])
        assert st["rel"] < PCACHE_REL_TOL and st["kl"] < PCACHE_KL_TOL, (i, st)
        assert_same_argmax(r[i], got[i], f"position {i}", NEAR_TIE_QUANT)


@pytest.mark.parametrize("n_layer", [1, 2])
def test_pcache_vs_reference_truncated_real_weights(tmp_path, tok, n_layer):
    """The real weights with only the first n_layer blocks: shallow enough that most positions
    see no rounding flip, and those must agree to float rounding. A systematic error (RoPE
    theta, scales, a wrong block layout) would hit every position. Measured on this prompt (fp16
    KV): 2 layers: positions 0-2 at rel ~2e-7, the rest 1.9e-3..6.4e-3; 1 layer: more exact
    positions (llama.cpp shows the same pattern, often at the same positions)."""
    path = str(tmp_path / f"trunc{n_layer}.gguf")
    write_truncated_model(need_model(), path, n_layer)
    ids = tok.encode(PROMPTS[3]).ids
    ref_t = ReferenceModel(path)
    r = ref_t.forward(ids, all_logits=True)
    got = tool_logits(path, ids, ref_t.n_vocab, all_positions=True)
    rel = np.array([logit_stats(r[i], got[i])["rel"] for i in range(len(ids))])
    print(n_layer, np.array2string(rel, precision=1))
    assert np.all(rel < 2e-2), rel
    assert rel[0] < 1e-5 and np.sum(rel < 1e-5) >= 3, rel


# ---------------------------------------------------------------------------------------------
# (c) pcache against the reference, synthetic tiny models (every position)
# ---------------------------------------------------------------------------------------------
SYNTH = {
    # name: (arch, kwargs for write_synth_model, rel tolerance)
    # Float weights: the fp16 KV cache's rounding flips dominate, F16_KV_TOL (measured rel
    # 3.9e-6..1.3e-4). Quantized: measured rel 1.2e-7..1.5e-7 (no activation or fp16 rounding
    # flipped on these inputs), tolerance 1e-5. A flip, e.g. after the engine changes a summation
    # order, would show as ~1e-3 there; look at which position moved before relaxing anything.
    "llama-f32": ("llama", dict(), F16_KV_TOL),
    "qwen2-f32": ("qwen2", dict(), F16_KV_TOL),
    "qwen3-f32": ("qwen3", dict(), F16_KV_TOL),
    "qwen3-hd32-f32": ("qwen3", dict(head_dim=32), F16_KV_TOL),
    "llama-untied-f32": ("llama", dict(tied=False), F16_KV_TOL),
    # Quantized weights: Q8_0 attention, Q4_1 gate/up, Q4_0 down, F16 embeddings (tied output
    # is then F16 x F32 activations). Two layers, so a rare flip moves logits a little.
    "llama-quant": ("llama", dict(wtype="Q8_0", ffn_types=("Q4_1", "Q4_1", "Q4_0"),
                                  embd_type="F16"), 1e-5),
    "qwen2-quant": ("qwen2", dict(wtype="Q8_0", ffn_types=("Q4_1", "Q4_1", "Q4_0"),
                                  embd_type="F16"), 1e-5),
    "qwen3-quant": ("qwen3", dict(wtype="Q4_1", ffn_types=("Q8_0", "Q4_0", "Q4_1"),
                                  embd_type="Q8_0", tied=False, out_type="Q4_0"), 1e-5),
}


@pytest.mark.parametrize("name", list(SYNTH))
def test_pcache_vs_reference_synthetic(tmp_path, name):
    arch, kw, tol = SYNTH[name]
    path = str(tmp_path / f"{name}.gguf")
    hp = write_synth_model(path, arch, seed=7, **kw)
    ids = list(np.random.default_rng(11).integers(0, hp["n_vocab"], 24))
    r = ReferenceModel(path).forward(ids, all_logits=True)
    got = tool_logits(path, ids, hp["n_vocab"], all_positions=True)
    st = logit_stats(r, got)
    print(name, st)
    assert st["rel"] < tol, st
    for i in range(len(ids)):
        assert_same_argmax(r[i], got[i], f"{name} position {i}")
