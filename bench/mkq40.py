#!/usr/bin/env python3
"""Write a Llama-3-8B-shaped GGUF whose matrices are Q4_0 blocks of random nibbles with sane
fp16 scales (output layer F16), with SmolLM2's tokenizer: the shape of gpu-peer's l8b-q40.gguf
without needing llama-quantize (seconds instead of a 6-minute llama.cpp build), for measuring
pcache's Q4_0 decode alone. usage: mkq40.py OUT.gguf TOK.gguf [--layers L]"""
import argparse, os
import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

ap = argparse.ArgumentParser()
ap.add_argument("out"); ap.add_argument("tok"); ap.add_argument("--layers", type=int, default=32)
a = ap.parse_args()
dim, ffn, heads, kvh, hd = 4096, 14336, 32, 8, 128
src = gguf.GGUFReader(a.tok)
w = gguf.GGUFWriter(a.out, "llama")
w.add_name("synthetic-q40"); w.add_block_count(a.layers); w.add_context_length(16384)
w.add_embedding_length(dim); w.add_feed_forward_length(ffn); w.add_head_count(heads); w.add_head_count_kv(kvh)
w.add_rope_freq_base(500000.0); w.add_layer_norm_rms_eps(1e-5); w.add_rope_dimension_count(hd); w.add_file_type(2)
for k, f in src.fields.items():
    if not k.startswith("tokenizer."):
        continue
    t = f.types[0]
    if t == gguf.GGUFValueType.ARRAY:
        w.add_array(k, f.contents())
    elif t == gguf.GGUFValueType.STRING:
        w.add_string(k, f.contents())
    else:
        w.add_key_value(k, f.contents(), t)
vocab = len(src.fields["tokenizer.ggml.tokens"].contents())
rng = np.random.default_rng(0)
pool = rng.integers(0, 256, 1 << 26, dtype=np.uint8)
scale = np.frombuffer(np.full(1, 0.003, np.float16).tobytes(), np.uint8)


def q40(rows, cols):
    nb = rows * cols // 32
    blk = np.resize(np.roll(pool, int(rng.integers(1 << 26))), (nb, 18))
    blk[:, 0:2] = scale
    return blk.reshape(rows, cols // 32 * 18)


f16 = (rng.standard_normal(1 << 22, dtype=np.float32) * 0.02).astype(np.float16)
w.add_tensor("token_embd.weight", q40(vocab, dim), raw_dtype=QT.Q4_0)
w.add_tensor("output_norm.weight", np.ones(dim, np.float32))
w.add_tensor("output.weight", np.resize(f16, (vocab, dim)))
for i in range(a.layers):
    p = f"blk.{i}."
    w.add_tensor(p + "attn_norm.weight", np.ones(dim, np.float32)); w.add_tensor(p + "ffn_norm.weight", np.ones(dim, np.float32))
    for name, r, c in (("attn_q", heads * hd, dim), ("attn_k", kvh * hd, dim), ("attn_v", kvh * hd, dim),
                       ("attn_output", dim, heads * hd), ("ffn_gate", ffn, dim), ("ffn_up", ffn, dim), ("ffn_down", dim, ffn)):
        w.add_tensor(p + name + ".weight", q40(r, c), raw_dtype=QT.Q4_0)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(progress=False); w.close()
print("wrote", a.out, os.path.getsize(a.out) >> 20, "MiB")
