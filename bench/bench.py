#!/usr/bin/env python3
"""bench: pcache vs llama.cpp (llama-cpp-python), same GGUF, same machine, same thread count.

Measures prefill tokens/s on a 512-token prompt and decode tokens/s over 128 greedy tokens.
Runs are interleaved (pcache, llama.cpp, pcache, ...) so that load from other processes hits
both alike; each figure is the median of --runs runs.

pcache:    `pcache run -m MODEL --temp 0 --ignore-eos -n 128 -t T -f prompt.txt`, parsing its
           stderr line `timings: prefill_tokens=.. prefill_s=.. prefill_tps=.. decode_tokens=..
           decode_s=.. decode_tps=..` (decode_tps counts pure decode steps).
llama.cpp: Llama(n_threads=T, n_threads_batch=T, n_ctx=1024, n_batch=512); prefill = llm.eval of
           the 512 prompt ids after a warm-up eval and llm.reset(); decode = 128 steps of
           eval([tok]) with greedy argmax over the last logits.
The prompt is varied English text cut to exactly 512 token ids (pcache's tokenizer; checked
against llama.cpp's and against pcache's reported prefill_tokens).

Usage: python3 bench/bench.py --model M.gguf --pcache build/pcache [--runs 5] [--threads 2]
Writes bench/results.json and prints a markdown table.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

N_PROMPT = 512
N_DECODE = 128

PARAGRAPHS = [
    "The history of navigation is a story of people learning to read the sky, the sea and the "
    "land. Early sailors watched the stars and the flight of birds; later ones carried compasses, "
    "astrolabes and, eventually, chronometers accurate enough to fix longitude at sea.",
    "In the kitchen, patience matters more than any single ingredient. A stew left to simmer for "
    "three hours develops flavours that no amount of seasoning can imitate, and bread dough that "
    "rests overnight in a cool room rises slowly into something lighter and more complex.",
    "Modern cities depend on systems that most residents never see: water mains under the "
    "streets, electrical substations behind plain brick walls, and traffic signals coordinated "
    "by software that adjusts their timing to the flow of cars, buses and bicycles.",
    "Gardeners in temperate climates plan their year around the last spring frost. Tomatoes, "
    "beans and squash go in once the soil warms, while peas, lettuce and radishes prefer the "
    "cool weeks of early spring and often bolt when summer heat arrives.",
    "A good explanation starts from what the listener already knows. Teachers who introduce "
    "fractions with pizza slices or measuring cups are not simplifying the mathematics; they "
    "are building a bridge from familiar experience to an abstract idea.",
    "The orchestra tuned to a single oboe note before the concert began. Violins, violas and "
    "cellos adjusted their strings, the brass players warmed their instruments with quiet "
    "breaths, and the percussionist checked the tension of each timpani head.",
    "Mountain weather changes quickly. Hikers who set out under clear skies in the morning may "
    "meet fog, hail or strong wind by early afternoon, which is why experienced walkers carry "
    "extra layers, a map and enough food and water for an unexpected delay.",
    "Software projects rarely fail because of one dramatic mistake. More often, small "
    "misunderstandings about requirements accumulate, tests are postponed, and by the time the "
    "problems become visible, fixing them means revisiting decisions made months earlier.",
]


def pcache_tokenize(pcache, model, text):
    p = subprocess.run([pcache, "tokenize", "-m", model], input=text.encode(),
                       capture_output=True, check=True, timeout=120)
    return json.loads(p.stdout)


def build_prompt(pcache, model, llm):
    """Varied text cut to exactly N_PROMPT tokens; returns (text, ids)."""
    text = " ".join(PARAGRAPHS[i % len(PARAGRAPHS)] for i in range(3 * len(PARAGRAPHS)))
    ids = pcache_tokenize(pcache, model, text)
    assert len(ids) > N_PROMPT + 16, "prompt text too short"
    # Cut at a token boundary, then re-tokenize: the boundary token may merge differently, so
    # walk the cut point until re-tokenization gives exactly N_PROMPT ids.
    for cut in range(N_PROMPT, N_PROMPT - 16, -1):
        for extra in range(0, 16):
            t = llm.detokenize(ids[:cut + extra]).decode("utf-8", errors="strict")
            got = pcache_tokenize(pcache, model, t)
            if len(got) == N_PROMPT:
                return t, got
            if len(got) > N_PROMPT:
                break
    raise SystemExit("could not build an exactly-512-token prompt")


TIMINGS_RE = re.compile(r"timings:\s*(.*)")


def run_pcache(pcache, model, prompt_file, threads):
    args = [pcache, "run", "-m", model, "--temp", "0", "--ignore-eos", "-n", str(N_DECODE),
            "-t", str(threads), "-f", prompt_file]
    p = subprocess.run(args, capture_output=True, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"pcache run failed ({p.returncode}): {p.stderr.decode()[-2000:]}")
    m = None
    for line in p.stderr.decode(errors="replace").splitlines():
        m = TIMINGS_RE.search(line) or m
    if not m:
        raise SystemExit(f"no timings line on pcache's stderr: {p.stderr.decode()[-2000:]}")
    kv = dict(f.split("=", 1) for f in m.group(1).split())
    return {k: float(v) for k, v in kv.items()}


def last_argmax(llm):
    """Greedy pick from llama.cpp's logits of the last evaluated token (llama_get_logits_ith)."""
    import llama_cpp
    import numpy as np
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))))


def run_llama(llm, ids):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t0
    tok = last_argmax(llm)
    t0 = time.perf_counter()
    for _ in range(N_DECODE):
        llm.eval([tok])
        tok = last_argmax(llm)
    decode_s = time.perf_counter() - t0
    return dict(prefill_tokens=len(ids), prefill_s=prefill_s, prefill_tps=len(ids) / prefill_s,
                decode_tokens=N_DECODE, decode_s=decode_s, decode_tps=N_DECODE / decode_s)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--pcache", default="build/pcache")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results.json"))
    a = ap.parse_args()
    try:
        import llama_cpp
    except Exception as e:
        raise SystemExit(f"llama_cpp is needed: `make bench` builds the peer into .deps/llama-peer "
                         f"(scripts/install-llama.sh peer): {e}")
    # The peer is llama.cpp at its best on this host (a native build), not the tests' oracle,
    # whose kernels are pinned to AVX2 so that test outcomes do not move with the CPU.
    peer_build = llama_cpp.llama_print_system_info().decode().strip()
    print(f"llama.cpp peer: {os.path.dirname(llama_cpp.__file__)}: {peer_build}", file=sys.stderr)

    llm = llama_cpp.Llama(a.model, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=1024,
                          n_batch=512, verbose=False)
    text, ids = build_prompt(a.pcache, a.model, llm)
    if ids != llm.tokenize(text.encode(), add_bos=False, special=True):
        print("note: pcache and llama.cpp tokenize the prompt differently; llama.cpp is fed "
              "pcache's ids", file=sys.stderr)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
        prompt_file = f.name

    llm.eval(ids[:64])          # warm-up (page in weights, allocate buffers)
    llm.reset()
    results = {"pcache": [], "llama.cpp": []}
    try:
        for i in range(a.runs):
            pc = run_pcache(a.pcache, a.model, prompt_file, a.threads)
            if int(pc.get("prefill_tokens", -1)) != N_PROMPT:
                raise SystemExit(f"pcache prefilled {pc.get('prefill_tokens')} tokens, "
                                 f"expected {N_PROMPT}")
            results["pcache"].append(pc)
            results["llama.cpp"].append(run_llama(llm, ids))
            print(f"run {i + 1}/{a.runs}: pcache prefill {pc['prefill_tps']:.1f} decode "
                  f"{pc['decode_tps']:.1f} | llama.cpp prefill "
                  f"{results['llama.cpp'][-1]['prefill_tps']:.1f} decode "
                  f"{results['llama.cpp'][-1]['decode_tps']:.1f} tok/s", file=sys.stderr)
    finally:
        os.unlink(prompt_file)

    med = {name: {k: statistics.median(r[k] for r in runs) for k in ("prefill_tps", "decode_tps")}
           for name, runs in results.items()}
    ratio = {k: med["pcache"][k] / med["llama.cpp"][k] for k in ("prefill_tps", "decode_tps")}
    summary = dict(model=a.model, threads=a.threads, runs=a.runs, prompt_tokens=N_PROMPT,
                   decode_tokens=N_DECODE, median=med, ratio_pcache_over_llamacpp=ratio,
                   llama_cpp_version=getattr(llama_cpp, "__version__", "?"),
                   llama_cpp_build=peer_build, raw=results)
    with open(a.out, "w") as f:
        json.dump(summary, f, indent=2)

    print(f"\nModel {os.path.basename(a.model)}, {a.threads} threads, median of {a.runs} runs "
          f"(interleaved)\n")
    print("| metric | pcache | llama.cpp | pcache / llama.cpp |")
    print("|---|---:|---:|---:|")
    print(f"| prefill tok/s ({N_PROMPT}-token prompt) | {med['pcache']['prefill_tps']:.1f} | "
          f"{med['llama.cpp']['prefill_tps']:.1f} | {ratio['prefill_tps']:.2f} |")
    print(f"| decode tok/s ({N_DECODE} tokens) | {med['pcache']['decode_tps']:.1f} | "
          f"{med['llama.cpp']['decode_tps']:.1f} | {ratio['decode_tps']:.2f} |")
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
