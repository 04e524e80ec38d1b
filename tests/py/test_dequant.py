"""Our scalar dequantize_row (through `pcache-tool dequant TYPE N`) against the PyPI gguf
package's reference numpy dequantizers, for every weight type we support: random blocks with
sane fp16 scales, every fp16/bf16 bit pattern, and rows of the real model when it is present.
Both sides evaluate the same float32 expressions, so we require bit-identical results."""
import os
import subprocess
import zlib

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

BUILD = os.environ.get("PCACHE_BUILD", "build")
MODEL = os.environ.get("PCACHE_MODEL", "models/SmolLM2-135M-Instruct.Q4_1.gguf")
TOOL = os.path.join(BUILD, "pcache-tool")

# type name -> (block elements, block bytes, offsets of fp16 scale fields within a block)
TYPES = {
    "Q4_0": (32, 18, [0]),
    "Q4_1": (32, 20, [0, 2]),
    "Q5_0": (32, 22, [0]),
    "Q5_1": (32, 24, [0, 2]),
    "Q8_0": (32, 34, [0]),
    "Q4_K": (256, 144, [0, 2]),
    "Q6_K": (256, 210, [208]),
}


@pytest.fixture(scope="module")
def tool():
    if not os.path.exists(TOOL):
        pytest.skip(f"{TOOL} not built (make BUILD={BUILD} {TOOL})")
    return TOOL


def run_dequant(tool, name, n, raw):
    p = subprocess.run([tool, "dequant", name, str(n)], input=bytes(raw), capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr.decode()
    out = np.frombuffer(p.stdout, dtype="<f4")
    assert out.size == n
    return out


def reference(name, raw, n):
    data = np.frombuffer(bytes(raw), dtype=np.uint8)
    return np.asarray(gguf.quants.dequantize(data, QT[name]), dtype=np.float32).reshape(-1)[:n]


def assert_same_bits(ours, ref, what):
    assert ours.shape == ref.shape, what
    nan_o, nan_r = np.isnan(ours), np.isnan(ref)
    assert np.array_equal(nan_o, nan_r), f"{what}: NaN positions differ"
    a, b = ours[~nan_o].view(np.uint32), ref[~nan_r].view(np.uint32)
    bad = np.nonzero(a != b)[0]
    assert bad.size == 0, (f"{what}: {bad.size} of {a.size} differ, first at {bad[0]}: "
                           f"{ours[~nan_o][bad[0]]!r} vs {ref[~nan_r][bad[0]]!r}")


def random_blocks(rng, name, nblocks):
    bs, ts, scale_offsets = TYPES[name]
    raw = rng.integers(0, 256, size=(nblocks, ts), dtype=np.uint8)
    for off in scale_offsets:
        mag = np.exp2(rng.uniform(-16, 2, size=nblocks)).astype(np.float32)
        sign = np.where(rng.random(nblocks) < 0.5, -1.0, 1.0).astype(np.float32)
        h = (mag * sign).astype(np.float16)
        if nblocks > 2:
            h[0] = 0.0  # a zero scale
            h[1] = np.float16(6e-8)  # an fp16 subnormal scale
        raw[:, off:off + 2] = h.view(np.uint8).reshape(nblocks, 2)
    return raw, nblocks * bs


@pytest.mark.parametrize("name", sorted(TYPES))
def test_random_blocks_match_gguf(tool, name):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    for nblocks in (1, 3, 40):
        raw, n = random_blocks(rng, name, nblocks)
        ours = run_dequant(tool, name, n, raw.tobytes())
        ref = reference(name, raw.tobytes(), n)
        assert np.isfinite(ref).all()
        assert_same_bits(ours, ref, f"{name} x{nblocks}")
        assert np.abs(ref).max() > 0  # the test data is not degenerate


def test_f16_every_pattern(tool):
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ours = run_dequant(tool, "F16", halves.size, halves.tobytes())
    assert_same_bits(ours, halves.view(np.float16).astype(np.float32), "F16")


def test_bf16_every_pattern(tool):
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ours = run_dequant(tool, "BF16", halves.size, halves.tobytes())
    ref = reference("BF16", halves.tobytes(), halves.size)
    assert_same_bits(ours, ref, "BF16")
    # and the definition: bf16 is the top half of an fp32
    assert np.array_equal(ours.view(np.uint32), halves.astype(np.uint32) << 16)


def test_f32_copy(tool):
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    assert_same_bits(run_dequant(tool, "F32", x.size, x.tobytes()), x, "F32")


def test_bad_input_is_an_error(tool):
    # too few bytes, N not a multiple of the block size, unknown or unsupported type
    for args, data in ((["Q4_0", "64"], b"\0" * 20), (["Q4_0", "33"], b"\0" * 40),
                       (["Q9_9", "32"], b"\0" * 40), (["Q2_K", "256"], b"\0" * 84)):
        p = subprocess.run([tool, "dequant", *args], input=data, capture_output=True, timeout=30)
        assert p.returncode != 0, args
        assert p.stderr, args


def test_model_rows_match_gguf(tool):
    if not os.path.exists(MODEL):
        pytest.skip(f"{MODEL} not present")
    reader = gguf.GGUFReader(MODEL)
    seen = set()
    for t in reader.tensors:
        tname = QT(t.tensor_type).name
        if tname in seen or (tname not in TYPES and tname not in ("F32", "F16", "BF16")):
            continue
        seen.add(tname)
        data = np.ascontiguousarray(t.data)
        raw = data.view(np.uint8).reshape(-1)
        n_elems = int(np.prod(t.shape))
        bs, ts = gguf.GGML_QUANT_SIZES[QT(t.tensor_type)]
        n = min(n_elems, 4 * 4096 // bs * bs)  # a few rows' worth
        nbytes = n // bs * ts
        ours = run_dequant(tool, tname, n, raw[:nbytes].tobytes())
        ref = reference(tname, raw[:nbytes].tobytes(), n)
        assert_same_bits(ours, ref, f"{t.name} ({tname})")
    assert "Q4_1" in seen or "Q8_0" in seen, f"model has none of our quantized types: {seen}"
