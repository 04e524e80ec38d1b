"""The GPU suite (`make test-gpu`, on a machine with an NVIDIA GPU): the CUDA backend against the
CPU backend, which is its oracle.

- matmul: every GGUF weight type, odd sizes, 1 and 67 tokens, against a double-precision
  reference on the same fp16-rounded operands (the GPU's inputs), and batch invariance (a row
  computed among 67 equals the row computed alone, bit for bit);
- whole models (synthetic llama / qwen2 / qwen3, head dims 64 and 128, GQA ratios 1, 3, 4, 8,
  every weight type): all-position logits close to the CPU backend's, same greedy choices except
  at near-ties;
- the device's argmax (a greedy row's token, found where its logits are): sample_argmax's
  answer on random rows, ties, -inf and NaNs;
- the engine on the GPU: logits bit-identical with the cache on or off, across chunk sizes,
  batch compositions and copy-on-write blocks, and the same texts with greedy rows' argmax
  taken on the GPU or the host (tests/gpu/gpu_engine_check.c).

Tolerance. The CPU backend quantizes activations to 8 bits before quantized matmuls (as
llama.cpp's CPU backend does) and keeps float weights in f32; the GPU rounds activations and
weights to fp16 and multiplies on the tensor cores with fp32 sums. Against the double reference
on the GPU's own operands the matmul must be exact to fp32 summation (rel 1e-5). Between the
backends, logits differ by that rounding: measured rel |gpu - cpu| / |cpu| is printed per model;
the bound is 5e-2 (measured on the H100, 2026-11-25: 1.5e-3..5.8e-3 for float weights, 2.2e-2..2.8e-2
for quantized ones, where a rounding flip in an 8-bit activation moves a small random model's logits
by about that), and the argmax must agree wherever the CPU's top two are more than 2% of the
logit range apart.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "py"))
from oracle_util import write_synth_model  # noqa: E402

BUILD = os.environ.get("PCACHE_BUILD", "build")
TOOL = os.path.join(BUILD, "pcache-tool")
CHECK = os.path.join(BUILD, "tests", "gpu_engine_check")


def run(args, stdin=b"", env_extra=None):
    env = dict(os.environ)
    env.update(env_extra or {})
    p = subprocess.run(args, input=stdin, capture_output=True, timeout=600, env=env)
    assert p.returncode == 0, f"{' '.join(args)}: {p.stderr.decode(errors='replace')[-3000:]}"
    return p.stdout


def logits(model, ids, n_vocab, device):
    out = run([TOOL, "logits", model, "--all"], json.dumps([int(i) for i in ids]).encode(),
              {"PCACHE_DEVICE": device})
    return np.frombuffer(out, dtype="<f4").reshape(len(ids), n_vocab)


# ------------------------------------------------------------------------------ matmul
def raw_weights(qtype, rows, cols, rng):
    """Bytes of a rows x cols matrix of qtype: quantized by the gguf package where it can,
    random blocks with sane fp16 scales for the K-quants (which it cannot quantize)."""
    import gguf
    from gguf import GGMLQuantizationType as QT
    a = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
    t = QT[qtype]
    if t == QT.F32:
        return a.tobytes()
    if t == QT.F16:
        return a.astype(np.float16).tobytes()
    if t in (QT.Q4_K, QT.Q6_K):
        nb = rows * cols // 256
        if t == QT.Q4_K:   # d, dmin (fp16), scales[12], qs[128]
            blk = rng.integers(0, 256, (nb, 144), dtype=np.uint8)
            blk[:, 0:2] = np.frombuffer(np.full(nb, 0.01, np.float16).tobytes(), np.uint8).reshape(nb, 2)
            blk[:, 2:4] = np.frombuffer(np.full(nb, 0.005, np.float16).tobytes(), np.uint8).reshape(nb, 2)
        else:              # ql[128], qh[64], scales[16] (int8), d (fp16)
            blk = rng.integers(0, 256, (nb, 210), dtype=np.uint8)
            blk[:, 208:210] = np.frombuffer(np.full(nb, 0.002, np.float16).tobytes(), np.uint8).reshape(nb, 2)
        return blk.tobytes()
    return gguf.quants.quantize(a, t).tobytes()


MATMUL_CASES = [(t, rows, cols) for t in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
                for rows, cols in ((77, 96), (130, 576))] + \
               [(t, rows, cols) for t in ("Q4_K", "Q6_K") for rows, cols in ((77, 256), (130, 768))] + \
               [("F32", 33, 100), ("F16", 65, 13),   # k not a multiple of 16 or 32: zero-padded tails
                ("F32", 33, 1100), ("Q4_0", 40, 2080)]   # more than one chunk of k (1024), a short last one


@pytest.mark.parametrize("qtype,rows,cols", MATMUL_CASES)
@pytest.mark.parametrize("n", [1, 67, 300])
def test_matmul_every_type(tmp_path, qtype, rows, cols, n):
    rng = np.random.default_rng(rows * 1000 + cols)
    w = tmp_path / "w.bin"
    w.write_bytes(raw_weights(qtype, rows, cols, rng))
    r = json.loads(run([TOOL, "gpu-matmul", qtype, str(rows), str(cols), str(n), str(w)]))
    print(qtype, rows, cols, n, r)
    assert r["max_ref"] > 0
    assert r["rel_err"] < 1e-5 and r["acc_rel_err"] < 1e-5, r
    assert r["batch_invariant"], r


# wg*: Hopper's wgmma kernel; "shape:VAR=v": a tile variant that env variable picks (A/B runs)
SHAPES = ["large", "wide", "s8", "s32", "s32k", "s64", "any", "wg", "wg128", "s8:PCACHE_S8V=1", "s32k:PCACHE_S32V=1",
          "s32k:PCACHE_S32V=2"]
# Q4_0 blocks read as stored (decode); =1: the tiles before the all-compute ones
Q4_SHAPES = ["q8", "q32", "q64", "q8:PCACHE_Q8V=1", "q32:PCACHE_Q32V=1"]


@pytest.mark.parametrize("qtype,rows,cols,n", [("F16", 130, 576, 67), ("F16", 77, 96, 5), ("F16", 300, 1024, 40),
                                               ("F16", 64, 4104, 130), ("F16", 70, 2056, 7), ("Q4_0", 130, 576, 67),
                                               ("Q4_0", 77, 4096, 9), ("Q4_0", 33, 96, 3), ("Q4_0", 90, 3104, 40)])
def test_matmul_shapes_give_the_same_bits(tmp_path, qtype, rows, cols, n):
    """Every kernel and tile shape the backend may pick for a batch (and the fallback kernel),
    with the chunks of k run one after another or side by side (split), gives the same bits, plain
    and accumulating into y: batch invariance does not rest on one shape being used for every
    batch size, and Q4_0 weights read as stored give what their fp16 copy gives."""
    rng = np.random.default_rng(rows + cols + n)
    w = tmp_path / "w.bin"
    w.write_bytes(raw_weights(qtype, rows, cols, rng))
    bits = {}
    for shape in SHAPES + (Q4_SHAPES if qtype == "Q4_0" else []):
        mm, _, var = shape.partition(":")
        for split in ("0", "1"):
            env = {"PCACHE_MM": mm, "PCACHE_SPLIT": split, **dict([var.split("=")] if var else [])}
            r = json.loads(run([TOOL, "gpu-matmul", qtype, str(rows), str(cols), str(n), str(w)], env_extra=env))
            assert r["rel_err"] < 1e-5 and r["acc_rel_err"] < 1e-5 and r["batch_invariant"], (shape, split, r)
            bits[shape, split] = r["bits"]
    print(qtype, rows, cols, n, bits)
    assert len(set(bits.values())) == 1, bits


def test_chunk_length_changes_the_sums(tmp_path):
    """The chunk length is part of the arithmetic (so it is fixed per process): a different one
    gives other bits, which shows the shapes test above compares chunked sums, not one k order."""
    rng = np.random.default_rng(5)
    w = tmp_path / "w.bin"
    w.write_bytes(raw_weights("F16", 64, 4096, rng))
    bits = {kc: json.loads(run([TOOL, "gpu-matmul", "F16", "64", "4096", "9", str(w)],
                               env_extra={"PCACHE_KC": kc}))["bits"] for kc in ("256", "1024", "4096")}
    assert len(set(bits.values())) == 3, bits


# ------------------------------------------------------------------------------ whole models
MODELS = {
    # name: (arch, write_synth_model kwargs)
    "llama-f32-hd64-gqa2": ("llama", dict(n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512)),
    "llama-f16-hd128-gqa4": ("llama", dict(wtype="F16", embd_type="F16", n_embd=512, n_head=8, n_head_kv=2,
                                           head_dim=128, n_ff=1024)),
    "llama-quant-hd64-gqa8": ("llama", dict(wtype="Q8_0", ffn_types=("Q4_1", "Q4_1", "Q4_0"), embd_type="F16",
                                            n_embd=512, n_head=8, n_head_kv=1, head_dim=64, n_ff=1024)),
    "qwen2-q5-hd64-gqa3": ("qwen2", dict(wtype="Q5_0", ffn_types=("Q5_1", "Q5_0", "Q8_0"), embd_type="Q8_0",
                                         n_embd=384, n_head=6, n_head_kv=2, head_dim=64, n_ff=768)),
    "qwen3-bf16-hd128-mha": ("qwen3", dict(wtype="BF16", embd_type="F16", tied=False, out_type="Q4_0",
                                           n_embd=256, n_head=2, n_head_kv=2, head_dim=128, n_ff=512)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_close_to_cpu(tmp_path, name):
    arch, kw = MODELS[name]
    path = str(tmp_path / f"{name}.gguf")
    hp = write_synth_model(path, arch, seed=5, n_layer=3, n_vocab=400, **kw)
    ids = list(np.random.default_rng(2).integers(0, hp["n_vocab"], 150))
    cpu = logits(path, ids, hp["n_vocab"], "cpu")
    gpu = logits(path, ids, hp["n_vocab"], "cuda")
    assert np.isfinite(gpu).all()
    rel = float(np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu))
    span = float(cpu.max() - cpu.min())
    flips = []
    for i in range(len(ids)):
        top2 = np.sort(cpu[i])[-2:]
        if top2[1] - top2[0] > 0.02 * span and np.argmax(cpu[i]) != np.argmax(gpu[i]):
            flips.append(i)
    print(f"{name}: rel {rel:.2e}, max abs {np.abs(gpu - cpu).max():.3g} (logit span {span:.3g})")
    assert rel < 5e-2, rel
    assert not flips, f"argmax differs at positions {flips} with a clear top-2 gap"


@pytest.mark.parametrize("name,wtype", [("llama-f16-hd128-gqa4", None), ("llama-q40-ffn", "Q4_0")])
def test_fused_swiglu_gives_the_same_bits(tmp_path, name, wtype):
    """gate|up's epilogue computes the SwiGLU itself (its rows interleaved in groups of 8 at
    upload): the logits are bit-identical to the path that writes gate|up's sums and runs
    k_swiglu (PCACHE_SWIGLU_FUSE=0), on the wgmma prefill kernel, the mma.sync tiles and the
    Q4_0 decode kernel; and where k is cut into several chunks (PCACHE_KC=256), which the fused
    epilogue leaves to k_swiglu on the interleaved rows, the logits stay close to the CPU's."""
    arch, kw = MODELS["llama-f16-hd128-gqa4"]
    kw = dict(kw, **({"wtype": wtype, "ffn_types": (wtype, wtype, wtype)} if wtype else {}))
    path = str(tmp_path / f"{name}.gguf")
    hp = write_synth_model(path, arch, seed=7, n_layer=2, n_vocab=400, **kw)
    ids = [int(i) for i in np.random.default_rng(4).integers(0, hp["n_vocab"], 150)]
    shapes = [None, "s8", "s32", "large"] + (["q8", "q32"] if wtype == "Q4_0" else [])
    for shape in shapes:
        env = {"PCACHE_DEVICE": "cuda", **({"PCACHE_MM": shape} if shape else {})}
        a = run([TOOL, "logits", path, "--all"], json.dumps(ids).encode(), env)
        b = run([TOOL, "logits", path, "--all"], json.dumps(ids).encode(), dict(env, PCACHE_SWIGLU_FUSE="0"))
        assert np.isfinite(np.frombuffer(a, dtype="<f4")).all(), shape
        assert a == b, f"fused and unfused SwiGLU differ with PCACHE_MM={shape}"
    cpu = logits(path, ids, hp["n_vocab"], "cpu")
    out = run([TOOL, "logits", path, "--all"], json.dumps(ids).encode(), {"PCACHE_DEVICE": "cuda", "PCACHE_KC": "256"})
    gpu = np.frombuffer(out, dtype="<f4").reshape(len(ids), hp["n_vocab"])
    rel = float(np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu))
    print(f"{name}: PCACHE_KC=256 rel {rel:.2e}")
    assert rel < 5e-2, rel


def host_argmax(row):
    """sample_argmax's rule: the first position of the largest logit, NaNs never chosen, 0 for a
    row of NaNs."""
    ok = ~np.isnan(row)
    if not ok.any():
        return 0
    return int(np.flatnonzero(ok & (row == row[ok].max()))[0])


@pytest.mark.parametrize("cols", [400, 401, 49152, 128256])
def test_argmax_on_the_device(cols):
    """k_argmax, which finds a greedy row's next token where its logits are: sample_argmax's
    answer on random rows and on ties, -inf, NaNs and constant rows, for vocabularies read four
    floats at a time (400, SmolLM2's 49152, Llama-3's 128256) and one at a time (401)."""
    rng = np.random.default_rng(cols)
    x = rng.standard_normal((12, cols)).astype(np.float32)
    x[1, [cols - 3, 7, cols // 2]] = 50.0          # a three-way tie: the first wins
    x[2, :] = -np.inf                               # all -inf: the first
    x[3, :] = np.nan                                # all NaN: 0
    x[4, ::2] = np.nan                              # NaNs beside a maximum
    x[4, cols - 2] = 99.0
    x[5, :] = np.nan                                # one -inf among NaNs
    x[5, cols - 1] = -np.inf
    x[6, 0] = 1e30                                  # the first position
    x[7, :] = 7.0                                   # constant
    x[8, cols - 1] = 1e30                           # the last position
    x[9, 1:] = np.inf                               # +inf ties
    x[10, :] = -1e-30                               # equal tiny values, then one -0 / +0 pair
    x[10, [cols // 3, cols // 3 + 1]] = [-0.0, 0.0]
    want = [host_argmax(r) for r in x]
    assert want[:10] == [want[0], 7, 0, 0, cols - 2, cols - 1, 0, 0, cols - 1, 1]
    assert want[10] == cols // 3                    # -0 == +0: the first of the two
    got = json.loads(run([TOOL, "gpu-argmax", str(len(x)), str(cols)], x.tobytes()))
    assert got == want


def test_engine_cache_transparency_on_gpu(tmp_path):
    for name in ("llama-quant-hd64-gqa8", "llama-f16-hd128-gqa4"):
        arch, kw = MODELS[name]
        path = str(tmp_path / f"{name}.gguf")
        write_synth_model(path, arch, seed=5, n_layer=3, n_vocab=400, **kw)
        out = run([CHECK, path]).decode()
        print(name, out)
        assert "0 failed" in out


@pytest.mark.parametrize("name", ["llama-f16-hd128-gqa4", "llama-quant-hd64-gqa8"])
def test_long_context_segments(tmp_path, name):
    """Past 1024 positions the attention's keys go in segments (k_flash, k_flash_merge): close to
    the CPU at every position of a 2600-token prompt, and the engine's transparency checks with
    prefixes ending on and next to the segment edges (1024, 2048) stay bit-identical."""
    arch, kw = MODELS[name]
    path = str(tmp_path / f"{name}.gguf")
    hp = write_synth_model(path, arch, seed=5, n_layer=2, n_vocab=400, context_length=4096, **kw)
    ids = list(np.random.default_rng(3).integers(0, hp["n_vocab"], 2600))
    cpu = logits(path, ids, hp["n_vocab"], "cpu")
    gpu = logits(path, ids, hp["n_vocab"], "cuda")
    assert np.isfinite(gpu).all()
    for lo, hi in ((0, 1024), (1024, 2048), (2048, 2600)):
        rel = float(np.linalg.norm(gpu[lo:hi] - cpu[lo:hi]) / np.linalg.norm(cpu[lo:hi]))
        print(f"{name} positions {lo}..{hi}: rel {rel:.2e}")
        assert rel < 5e-2, (lo, hi, rel)
    out = run([CHECK, path, "2600"]).decode()
    print(out)
    assert "0 failed" in out and "prefix of 1025" in out and "prefix of 2049" in out


@pytest.mark.parametrize("name", ["llama-f16-hd128-gqa4", "llama-quant-hd64-gqa8", "qwen2-q5-hd64-gqa3"])
def test_wgmma_attention_gives_the_same_bits(tmp_path, name):
    """Prefill attention with its two products on the warpgroup MMAs (PCACHE_FA_WG=1, Hopper):
    all-position logits of a 2600-token prompt (three segments, causal masks, padding rows,
    GQA 3, 4 and 8, head dims 64 and 128) bit-identical to mma.sync's, and the engine's
    transparency checks (cache on/off, chunk sizes, batch compositions, prefixes at the segment
    edges) pass with it."""
    arch, kw = MODELS[name]
    path = str(tmp_path / f"{name}.gguf")
    hp = write_synth_model(path, arch, seed=6, n_layer=2, n_vocab=400, context_length=4096, **kw)
    ids = json.dumps([int(i) for i in np.random.default_rng(8).integers(0, hp["n_vocab"], 2600)]).encode()
    a = run([TOOL, "logits", path, "--all"], ids, {"PCACHE_DEVICE": "cuda"})
    b = run([TOOL, "logits", path, "--all"], ids, {"PCACHE_DEVICE": "cuda", "PCACHE_FA_WG": "1"})
    assert np.isfinite(np.frombuffer(b, dtype="<f4")).all()
    assert a == b, "wgmma and mma.sync attention differ"
    out = run([CHECK, path, "2600"], env_extra={"PCACHE_FA_WG": "1"}).decode()
    print(out)
    assert "0 failed" in out
