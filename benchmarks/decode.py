"""Decode speed: lmforge's engine against `transformers` generate on the same random weights.

GPT-2-small and SmolLM-135M shapes, batch 1 and batch 8, 128 new tokens, fp32, greedy.
Also the fraction of the memory-bandwidth bound: each decode step must read every weight
once, so tokens/s can be at most bandwidth / weight bytes (x batch). Bandwidth is measured
in this run with a streaming matrix-vector product over a ~1 GB matrix, timed in alternation
with the generators (median), since it drifts by tens of percent on a shared host.

    python benchmarks/decode.py            # last line: ratio=R lmforge_tok_s=A hf_tok_s=B lmforge_of_bound=F
                                           # hf_of_bound=G (GPT-2, batch 1), then ratio_gpt2_b8=...
                                           # ratio_smollm_b1=... ratio_smollm_b8=... (lmforge / transformers)
    LMFORGE_NATIVE=0 python benchmarks/decode.py   # the same without the native decode kernels (oneDNN, PyTorch attention)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial

import torch
import transformers

from lmforge.checkpoint import load_model
from lmforge.generate.engine import Engine, Request
from lmforge.models import kernels


def bandwidth_probe(m: torch.Tensor):
    """One streaming torch.mv over `m` (~1 GB, float32): timed in alternation with the two
    generators, so that its median reads the memory bandwidth they saw (it drifts on a shared host)."""
    v = torch.randn(m.shape[1])
    return partial(torch.mv, m, v)


def hf_model(shape: str):
    if shape == "gpt2":
        cfg = transformers.GPT2Config(n_positions=1024)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def hf_generate(hf, prompts: torch.Tensor, n: int) -> None:
    with torch.inference_mode():
        hf.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


def lmforge_generate(engine: Engine, prompts: torch.Tensor, n: int) -> None:
    engine.generate([Request(p.tolist(), max_new_tokens=n) for p in prompts])


def interleaved_seconds(fns: list, repeats: int) -> list[float]:
    """Median seconds of each function, run in alternation so that both sides see the same
    machine (memory bandwidth on a shared host drifts by tens of percent)."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()  # warm-up
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (median reported)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print("decode kernels:", "native" if kernels.native() else "oneDNN and PyTorch attention (no native kernels)")
    big = torch.randn(16384, 16384)
    figures: dict[str, str] = {}  # the last line: GPT-2 batch 1 in full, then the ratio of every other case
    for shape in ("gpt2", "smollm-135m"):
        hf = hf_model(shape)
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            ours, _ = load_model(tmp)
        ours.eval()
        weight_bytes = sum(p.numel() for p in ours.parameters()) * 4
        for batch in (1, 8):
            prompts = torch.randint(0, 1000, (batch, args.prompt_len))
            n = args.new_tokens

            run_hf = partial(hf_generate, hf, prompts, n)
            run_ours = partial(lmforge_generate, Engine(ours, n_slots=batch, max_len=args.prompt_len + n + 1), prompts, n)
            t_hf, t_ours, t_read = interleaved_seconds([run_hf, run_ours, bandwidth_probe(big)], args.repeats)
            bandwidth = big.numel() * 4 / t_read
            hf_tok_s, ours_tok_s = batch * n / t_hf, batch * n / t_ours
            bound = bandwidth / weight_bytes * batch  # tokens/s if each step only read the weights once
            print(f"{shape:12s} batch {batch} ({bandwidth / 1e9:.1f} GB/s): lmforge {ours_tok_s:7.1f} tok/s ({ours_tok_s / bound:4.0%} of bound)  "
                  f"transformers {hf_tok_s:7.1f} tok/s ({hf_tok_s / bound:4.0%})  ratio {ours_tok_s / hf_tok_s:.2f}")
            if not figures:
                figures.update(ratio=f"{ours_tok_s / hf_tok_s:.2f}", lmforge_tok_s=f"{ours_tok_s:.1f}",
                               hf_tok_s=f"{hf_tok_s:.1f}", lmforge_of_bound=f"{ours_tok_s / bound:.2f}",
                               hf_of_bound=f"{hf_tok_s / bound:.2f}")
            else:
                figures[f"ratio_{shape.split('-')[0]}_b{batch}"] = f"{ours_tok_s / hf_tok_s:.2f}"
    print(" ".join(f"{key}={value}" for key, value in figures.items()))


if __name__ == "__main__":
    main()
