"""Decode speed: lmforge's engine against `transformers` generate on the same random weights.

GPT-2-small and SmolLM-135M shapes, batch 1 and batch 8, 128 new tokens, fp32, greedy.
Also the fraction of the memory-bandwidth bound: each decode step must read every weight
once, so tokens/s can be at most bandwidth / weight bytes (x batch). Bandwidth is measured
in this run with a streaming matrix-vector product over a ~1 GB matrix, timed in alternation
with the generators (median), since it drifts on a shared host.

Then speculative decoding against plain greedy decoding on the same GPT-2-shaped target, batch 1.
Random weights give no trained small model to draft with, so the draft is the target's own first
`--draft-layers` blocks with its embeddings, final norm and head (the "early exit" draft of
self-speculative decoding: nothing extra to store). Such a draft agrees with the target only as
often as the first blocks already decide the next token; with random weights both mostly echo
a token, so the acceptance rate is whatever this pair gives, printed beside the speed. The
figures measure the machinery (k draft steps plus one target pass over k + 1 tokens, against
one target step per token) at that acceptance rate; a trained pair's acceptance depends on
the models and the text. The output is checked to be the plain greedy output, token for token.

    python benchmarks/decode.py            # last line: ratio=R lmforge_tok_s=A hf_tok_s=B lmforge_of_bound=F
                                           # hf_of_bound=G (GPT-2, batch 1), then ratio_gpt2_b8=...
                                           # ratio_smollm_b1=... ratio_smollm_b8=... (lmforge / transformers),
                                           # spec_speedup=S spec_acceptance=P spec_tok_s=C greedy_tok_s=G
    LMFORGE_NATIVE=0 python benchmarks/decode.py   # the same without the native decode kernels (oneDNN, PyTorch attention)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from functools import partial

import torch
import transformers
from torch import nn

from lmforge.checkpoint import load_model
from lmforge.generate.engine import Engine, Request, SpeculationStats, speculative_stream
from lmforge.models import build_model, kernels


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


def early_exit_draft(target: nn.Module, n_layers: int) -> nn.Module:
    """The target's first `n_layers` blocks with its embeddings, final norm and head."""
    draft = build_model(replace(target.config, n_layers=n_layers)).eval()
    draft.load_state_dict(target.state_dict(), strict=False)  # the later blocks' tensors are left out
    return draft


def speculative_figures(target: nn.Module, args: argparse.Namespace) -> dict[str, str]:
    """Plain greedy decoding against speculative greedy decoding, batch 1, timed in alternation."""
    draft = early_exit_draft(target, args.draft_layers)
    prompt = torch.randint(0, 1000, (args.prompt_len,)).tolist()
    engine = Engine(target, n_slots=1, max_len=args.prompt_len + args.new_tokens + 1)
    stats = SpeculationStats()

    def plain() -> list[int]:
        return engine.generate([Request(prompt, max_new_tokens=args.new_tokens)])[0].tokens

    def speculative() -> list[int]:
        request = Request(prompt, max_new_tokens=args.new_tokens)
        return [t.token for t in speculative_stream(target, draft, request, k=args.k, stats=stats)]

    if speculative() != plain():
        raise SystemExit("speculative greedy output differs from plain greedy output: a bug")
    t_plain, t_spec = interleaved_seconds([plain, speculative], args.repeats)
    greedy_tok_s, spec_tok_s = args.new_tokens / t_plain, args.new_tokens / t_spec
    speedup, acceptance = spec_tok_s / greedy_tok_s, stats.acceptance_rate
    draft_of = f"first {args.draft_layers} of {target.config.n_layers} blocks + head"
    print(f"speculative  batch 1 (draft: {draft_of}, k={args.k}): greedy {greedy_tok_s:7.1f} tok/s  "
          f"speculative {spec_tok_s:7.1f} tok/s  speed-up {speedup:.2f}  acceptance {acceptance:.2f}")
    return dict(spec_speedup=f"{speedup:.2f}", spec_acceptance=f"{acceptance:.2f}",
                spec_tok_s=f"{spec_tok_s:.1f}", greedy_tok_s=f"{greedy_tok_s:.1f}")


def interleaved_seconds(fns: list, repeats: int) -> list[float]:
    """Median seconds of each function, run in alternation so that both sides see the same
    machine (memory bandwidth on a shared host drifts)."""
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
    parser.add_argument("--draft-layers", type=int, default=1, help="blocks of the target the draft keeps")
    parser.add_argument("--k", type=int, default=4, help="tokens the draft proposes per target pass")
    args = parser.parse_args()
    torch.manual_seed(0)
    print("decode kernels:", "native" if kernels.native() else "oneDNN and PyTorch attention (no native kernels)")
    big = torch.randn(16384, 16384)
    figures: dict[str, str] = {}  # the last line: GPT-2 batch 1 in full, then the ratio of every other case
    spec: dict[str, str] = {}
    for shape in ("gpt2", "smollm-135m"):
        hf = hf_model(shape)
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            ours, _ = load_model(tmp)
        ours.eval()
        weight_bytes = sum(p.numel() for p in ours.parameters()) * 4
        if shape == "gpt2":
            spec = speculative_figures(ours, args)
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
    print(" ".join(f"{key}={value}" for key, value in {**figures, **spec}.items()))


if __name__ == "__main__":
    main()
