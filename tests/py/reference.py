"""reference: a small NumPy forward pass for llama-family GGUF models (llama, qwen2, qwen3).

The oracle the C engine is checked against. It is written to be read, not to be fast: one
function per step, float32 throughout, weights taken from the GGUF with the PyPI `gguf`
package (GGUFReader for the bytes, gguf.quants.dequantize for the float path).

Two ways to do a matmul:
  act_quant=False  y = x @ dequantize(W).T in float32: the "mathematical" model.
  act_quant=True   (default) what ggml (and pcache) actually compute: before a matmul against a
                   quantized weight, each activation row is quantized to the weight's partner
                   format (Q4_0/Q8_0 -> Q8_0, Q4_1 -> Q8_1; blocks of 32, d = max|x|/127 stored
                   as fp16, q = round-to-nearest-even(x / d)), then per block
                       acc += (d_w * d_a) * sum(q_w * q_a)          (+ m_w * s_a for Q4_1,
                   where s_a = fp16(d_a * sum(q_a))), accumulated over blocks in order in float32.
                   Float weights (F32/F16/BF16) are a plain float32 dot.
The integer block sums are done as float32 matmuls of small integers, which are exact (|sum| <
2^24), so only the block accumulation order can differ from the engine (by float rounding).

Model details that must match llama.cpp: RMSNorm x * (1/sqrt(mean(x^2) + eps)) * w (mean in
float64 as ggml does); RoPE "normal" mode (adjacent pairs) for llama, whose Q/K rows the GGUF
converter permuted for that, NEOX mode (x[i], x[i + d/2]) for qwen2/qwen3, theta_i = pos *
base^(-2i/rope_dim) computed like ggml (theta *= base^(-2/rope_dim) in float32); GQA; causal
softmax attention with scale 1/sqrt(head_dim), with kv_f16=True (default) an fp16 KV cache as
llama.cpp's default and pcache's (q, K, V and the softmax probabilities rounded to fp16 where
they meet); SwiGLU FFN silu(gate) * up -> down; qwen2 adds
q/k/v biases; qwen3 RMSNorms each q and k head (attn_{q,k}_norm) before RoPE; output.weight
falls back to token_embd.weight (tied embeddings).

Usage:
    m = ReferenceModel("model.gguf")                 # act_quant=True
    logits = m.forward([1, 2, 3])                    # (n_vocab,) float32, last position
    all_logits = m.forward([1, 2, 3], all_logits=True)   # (n_tokens, n_vocab)
"""
from __future__ import annotations

import math
import os

# One BLAS thread: the reference does many small matmuls, and OpenBLAS worker threads spinning on
# a busy 2-core machine made a forward pass 60x slower. (Only effective before numpy loads.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

QK = 32  # elements per block of Q4_0 / Q4_1 / Q8_0 / Q8_1


def fp16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> fp16 -> float32 (round to nearest even, as GGML_FP32_TO_FP16)."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------
class Matrix:
    """A (rows, cols) weight: y = W x. Keeps the float version and, for block-quantized types,
    the integer quants and scales needed to emulate ggml's quantized dot products."""

    q8_inv = "amax"    # see quantize_q8; ReferenceModel(q8_inv=...) sets it for its matrices

    def __init__(self, tensor: gguf.ReaderTensor, act_quant: bool):
        self.type = QT(tensor.tensor_type)
        self.cols = int(tensor.shape[0])            # GGUF shape is (ne0=cols, ne1=rows)
        self.rows = int(tensor.n_elements // self.cols)
        raw = np.asarray(tensor.data)
        self._raw = raw
        self._float = None
        self.quantized = self.type in (QT.Q4_0, QT.Q4_1, QT.Q8_0)
        if self.type not in (QT.F32, QT.F16, QT.BF16) and not self.quantized:
            raise NotImplementedError(f"{tensor.name}: weight type {self.type.name}")
        if act_quant and self.quantized:
            self._parse_blocks(raw.reshape(self.rows, -1))

    def float(self) -> np.ndarray:
        """Dequantized (rows, cols) float32, via gguf.quants.dequantize."""
        if self._float is None:
            if self.type == QT.F32:
                f = self._raw.astype(np.float32)
            elif self.type == QT.F16:
                f = self._raw.view(np.float16).astype(np.float32)
            else:
                f = gguf.quants.dequantize(self._raw, self.type).astype(np.float32)
            self._float = np.ascontiguousarray(f.reshape(self.rows, self.cols))
        return self._float

    def _parse_blocks(self, raw: np.ndarray) -> None:
        """Split the raw blocks into qw (nb, 32, rows) small integers held as float32, the
        block scale dw (nb, rows) and, for Q4_1, the block minimum mw (nb, rows)."""
        nb = self.cols // QK
        if self.type == QT.Q8_0:        # fp16 d, 32 x int8
            blk = raw.reshape(self.rows, nb, 34)
            d = blk[:, :, 0:2].copy().view(np.float16)[..., 0]
            q = blk[:, :, 2:].view(np.int8).astype(np.float32)
            m = None
        elif self.type == QT.Q4_0:      # fp16 d, 16 bytes: low nibbles = x[0:16], high = x[16:32]
            blk = raw.reshape(self.rows, nb, 18)
            d = blk[:, :, 0:2].copy().view(np.float16)[..., 0]
            qs = blk[:, :, 2:]
            q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32) - 8.0
            m = None
        else:                           # Q4_1: fp16 d, fp16 m, 16 bytes of nibbles
            blk = raw.reshape(self.rows, nb, 20)
            d = blk[:, :, 0:2].copy().view(np.float16)[..., 0]
            m = blk[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32).T.copy()
            qs = blk[:, :, 4:]
            q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)
        self.qw = np.ascontiguousarray(q.transpose(1, 2, 0))         # (nb, 32, rows)
        self.dw = np.ascontiguousarray(d.astype(np.float32).T)       # (nb, rows)
        self.mw = m

    def dequant_from_blocks(self) -> np.ndarray:
        """Float weights rebuilt from the parsed blocks (self-check against gguf's dequantize)."""
        w = self.qw * self.dw[:, None, :]
        if self.mw is not None:
            w = w + self.mw[:, None, :]
        return w.transpose(2, 0, 1).reshape(self.rows, self.cols)

    def matmul(self, x: np.ndarray, act_quant: bool) -> np.ndarray:
        """x (n, cols) float32 -> (n, rows) float32."""
        x = np.asarray(x, dtype=np.float32)
        if not (act_quant and self.quantized):
            return (x @ self.float().T).astype(np.float32)
        n = x.shape[0]
        nb = self.cols // QK
        qa, da, sa = quantize_q8(x.reshape(n, nb, QK), self.q8_inv)
        acc = np.zeros((n, self.rows), dtype=np.float32)
        for b in range(nb):                      # blocks in order, as ggml's scalar vec_dot
            isum = qa[:, b, :] @ self.qw[b]      # exact: small integers in float32
            if self.mw is None:                  # sumf += (d_w*d_a)*sumi
                acc += (da[:, b, None] * self.dw[None, b, :]) * isum
            else:                                # Q4_1 x Q8_1: sumf += (d_w*d_a)*sumi + m_w*s_a
                acc += (da[:, b, None] * self.dw[None, b, :]) * isum \
                    + self.mw[None, b, :] * sa[:, b, None]
        return acc


def quantize_q8(xb: np.ndarray, inv_mode: str = "recip"):
    """Activation blocks xb (..., 32) -> (q as float32 ints, d (fp16-rounded), s = fp16(d*sum q)).
    Q8_0 and Q8_1 share the quants and d; Q8_1 also carries s. d = max|x|/127 in float32, stored
    as fp16; q = rint(x * id). inv_mode "recip": id = 1/d with the unrounded d (ggml's scalar
    quantize_row_q8_{0,1}_ref); "amax": id = 127/max|x| (ggml's AVX2 quantize_row_q8_{0,1}).
    The two differ in the last bit of id now and then, which flips a rounding: see the note on
    sensitivity in test_reference.py."""
    amax = np.max(np.abs(xb), axis=-1).astype(np.float32)
    d = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        if inv_mode == "recip":
            inv = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
        else:
            inv = np.where(amax != 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.rint(xb * inv[..., None]).astype(np.float32)
    s = fp16_round(d * q.sum(axis=-1))
    return q, fp16_round(d), s


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class ReferenceModel:
    def __init__(self, path: str, act_quant: bool = True, q8_inv: str = "amax",
                 kv_f16: bool = True):
        self.path = path
        self.act_quant = act_quant
        self.kv_f16 = kv_f16
        r = gguf.GGUFReader(path)
        self.arch = self._field(r, "general.architecture")
        if self.arch not in ("llama", "qwen2", "qwen3"):
            raise NotImplementedError(f"architecture {self.arch}")
        a = self.arch
        self.n_layer = int(self._field(r, f"{a}.block_count"))
        self.n_embd = int(self._field(r, f"{a}.embedding_length"))
        self.n_ff = int(self._field(r, f"{a}.feed_forward_length"))
        self.n_head = int(self._field(r, f"{a}.attention.head_count"))
        self.n_head_kv = int(self._field(r, f"{a}.attention.head_count_kv", self.n_head))
        self.head_dim = int(self._field(r, f"{a}.attention.key_length", self.n_embd // self.n_head))
        self.rope_dim = int(self._field(r, f"{a}.rope.dimension_count", self.head_dim))
        self.rope_base = float(self._field(r, f"{a}.rope.freq_base", 10000.0))
        self.eps = float(self._field(r, f"{a}.attention.layer_norm_rms_epsilon", 1e-5))
        self.rope_neox = a in ("qwen2", "qwen3")

        tensors = {t.name: t for t in r.tensors}
        self._tensors = tensors

        def mat(name):
            mx = Matrix(tensors[name], act_quant)
            mx.q8_inv = q8_inv
            return mx

        def vec(name):
            if name not in tensors:
                return None
            t = tensors[name]
            return Matrix(t, False).float().reshape(-1) if t.tensor_type != QT.F32 \
                else np.asarray(t.data, dtype=np.float32).reshape(-1)

        self.tok_embd = mat("token_embd.weight")
        self.n_vocab = self.tok_embd.rows
        self.output = mat("output.weight") if "output.weight" in tensors else self.tok_embd
        self.output_norm = vec("output_norm.weight")
        self.layers = []
        for i in range(self.n_layer):
            p = f"blk.{i}."
            self.layers.append(dict(
                attn_norm=vec(p + "attn_norm.weight"), ffn_norm=vec(p + "ffn_norm.weight"),
                wq=mat(p + "attn_q.weight"), wk=mat(p + "attn_k.weight"),
                wv=mat(p + "attn_v.weight"), wo=mat(p + "attn_output.weight"),
                w_gate=mat(p + "ffn_gate.weight"), w_up=mat(p + "ffn_up.weight"),
                w_down=mat(p + "ffn_down.weight"),
                bq=vec(p + "attn_q.bias"), bk=vec(p + "attn_k.bias"), bv=vec(p + "attn_v.bias"),
                q_norm=vec(p + "attn_q_norm.weight"), k_norm=vec(p + "attn_k_norm.weight"),
            ))

    @staticmethod
    def _field(r, key, default=None):
        f = r.fields.get(key)
        if f is None:
            if default is None:
                raise KeyError(key)
            return default
        return f.contents()

    # --- steps ---------------------------------------------------------------------------------
    def rmsnorm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Over the last axis: x * 1/sqrt(mean(x^2) + eps) * w (sum of squares in float64)."""
        ms = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True).astype(np.float32)
        scale = (np.float32(1.0) / np.sqrt(ms + np.float32(self.eps))).astype(np.float32)
        return (x * scale) * w

    def rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """x (n, heads, head_dim); rotates the first rope_dim dims of every head."""
        n_dims = self.rope_dim
        half = n_dims // 2
        # ggml: theta_scale = base^(-2/n_dims); theta_0 = pos; theta_{i+1} = theta_i * theta_scale
        theta_scale = np.float32(math.pow(self.rope_base, -2.0 / n_dims))
        theta = np.empty((len(pos), half), dtype=np.float32)
        theta[:, 0] = pos.astype(np.float32)
        for i in range(1, half):
            theta[:, i] = theta[:, i - 1] * theta_scale
        cos = np.cos(theta)[:, None, :]
        sin = np.sin(theta)[:, None, :]
        out = x.copy()
        if self.rope_neox:
            x0, x1 = x[..., :half], x[..., half:n_dims]
            out[..., :half] = x0 * cos - x1 * sin
            out[..., half:n_dims] = x0 * sin + x1 * cos
        else:
            x0, x1 = x[..., 0:n_dims:2], x[..., 1:n_dims:2]
            out[..., 0:n_dims:2] = x0 * cos - x1 * sin
            out[..., 1:n_dims:2] = x0 * sin + x1 * cos
        return out

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Causal GQA. q (n, H, hd), k/v (n, Hkv, hd) -> (n, H*hd)."""
        n = q.shape[0]
        group = self.n_head // self.n_head_kv
        kk = np.repeat(k, group, axis=1)                    # (n, H, hd): head h uses kv h//group
        vv = np.repeat(v, group, axis=1)
        scale = np.float32(1.0 / math.sqrt(self.head_dim))
        if self.kv_f16:   # fp16 KV cache; q meets K as fp16 (llama.cpp's default and pcache's)
            q, kk, vv = fp16_round(q), fp16_round(kk), fp16_round(vv)
        scores = np.einsum("ihd,jhd->hij", q, kk).astype(np.float32) * scale
        scores[:, np.triu(np.ones((n, n), dtype=bool), k=1)] = -np.inf
        scores = scores - scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p = (p / p.sum(axis=-1, dtype=np.float64, keepdims=True)).astype(np.float32)
        if self.kv_f16:   # probabilities meet the fp16 V cache as fp16
            p = fp16_round(p)
        out = np.einsum("hij,jhd->ihd", p, vv).astype(np.float32)
        return out.reshape(n, -1)

    @staticmethod
    def silu(x: np.ndarray) -> np.ndarray:
        return x / (np.float32(1.0) + np.exp(-x))

    # --- forward -------------------------------------------------------------------------------
    def embed(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            raise ValueError("token id out of range")
        t = self.tok_embd
        if t.type == QT.F32:
            return np.asarray(t._raw, dtype=np.float32).reshape(t.rows, t.cols)[ids].copy()
        rows = np.asarray(t._raw).reshape(t.rows, -1)[ids]
        if t.type == QT.F16:
            return rows.view(np.float16).astype(np.float32).reshape(len(ids), t.cols)
        return gguf.quants.dequantize(rows, t.type).astype(np.float32).reshape(len(ids), t.cols)

    def forward(self, ids, all_logits: bool = False) -> np.ndarray:
        """Logits of the last position (n_vocab,), or of every position (n, n_vocab)."""
        aq = self.act_quant
        n = len(ids)
        pos = np.arange(n)
        hd = self.head_dim
        x = self.embed(ids)
        for L in self.layers:
            h = self.rmsnorm(x, L["attn_norm"])
            q = L["wq"].matmul(h, aq)
            k = L["wk"].matmul(h, aq)
            v = L["wv"].matmul(h, aq)
            if L["bq"] is not None:
                q, k, v = q + L["bq"], k + L["bk"], v + L["bv"]
            q = q.reshape(n, self.n_head, hd)
            k = k.reshape(n, self.n_head_kv, hd)
            v = v.reshape(n, self.n_head_kv, hd)
            if L["q_norm"] is not None:
                q = self.rmsnorm(q, L["q_norm"])
                k = self.rmsnorm(k, L["k_norm"])
            q = self.rope(q, pos)
            k = self.rope(k, pos)
            att = self.attention(q, k, v)
            x = x + L["wo"].matmul(att, aq)
            h = self.rmsnorm(x, L["ffn_norm"])
            g = L["w_gate"].matmul(h, aq)
            u = L["w_up"].matmul(h, aq)
            x = x + L["w_down"].matmul(self.silu(g) * u, aq)
        if not all_logits:
            x = x[-1:]
        x = self.rmsnorm(x, self.output_norm)
        logits = self.output.matmul(x, aq)
        return logits if all_logits else logits[0]

    def generate_greedy(self, ids, n: int, stop_ids=()) -> list:
        """Greedy continuation by full recomputation (slow; for short checks)."""
        ids = list(ids)
        out = []
        for _ in range(n):
            t = int(np.argmax(self.forward(ids)))
            out.append(t)
            ids.append(t)
            if t in stop_ids:
                break
        return out


def gguf_tokenizer(path: str):
    """A HF `tokenizers` byte-level BPE built from a gpt2-style GGUF vocab (tokens + merges),
    with the control tokens as special tokens. Close to, not necessarily identical with, the
    model's real pre-tokenizer; good enough to produce realistic ids for logits checks."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, AddedToken
    r = gguf.GGUFReader(path)
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    merges = r.fields["tokenizer.ggml.merges"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    vocab = {t: i for i, t in enumerate(toks)}
    tk = Tokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(toks, types) if ty == 3])
    return tk
