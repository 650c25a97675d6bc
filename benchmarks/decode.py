"""Decode speed: lmforge's engine against `transformers` generate on the same random weights.

GPT-2-small and SmolLM-135M shapes, batch 1 and batch 8, 128 new tokens, fp32, greedy.
Also the fraction of the memory-bandwidth bound: each decode step must read every weight
once, so tokens/s can be at most bandwidth / weight bytes (x batch). Bandwidth is measured
in this run with a streaming matrix-vector product over a ~1 GB matrix, timed in alternation
with the generators (median), since it drifts on a shared host.

The same lmforge model quantized to int8 (per-channel) and int4 (groups of 64), every linear
layer including the output projection (`quantize_model(..., skip=())`: with a float head, its
vocabulary-sized matrix would be most of what a step reads), decoded by the native int8 / int4
kernels, in the same alternation. Their bound counts the bytes a step reads: the packed weights
with their scales and zero points, and the float tensors but the token embedding (one row read).

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
                                           # int8_ratio=R8 int4_ratio=R4 (GPT-2, batch 1: int8 / int4 tok/s over
                                           # lmforge float32 tok/s), int8_ratio_smollm=... int4_ratio_smollm=...,
                                           # int8_of_bound=... int4_of_bound=... (GPT-2, batch 1),
                                           # spec_speedup=S spec_acceptance=P spec_tok_s=C greedy_tok_s=G
    LMFORGE_NATIVE=0 python benchmarks/decode.py   # the same without the native decode kernels (oneDNN, PyTorch attention)
"""

from __future__ import annotations

import argparse
import copy
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
from lmforge.quantize import model_bytes, quantize_model


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


def quantized_variants(model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """float32, int8 and int4 (groups of 64) copies of `model`, each with the bytes a decode step reads."""
    variants = {"float32": (model, sum(p.numel() for p in model.parameters()) * 4)}
    for name, bits in (("int8", 8), ("int4", 4)):
        q = quantize_model(copy.deepcopy(model), bits, 64, skip=()).eval()
        variants[name] = (q, model_bytes(q) - model.embed.weight.numel() * 4)  # the head no longer reads the table
    return variants


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
    quant: dict[str, str] = {}  # int8 / int4 against lmforge float32
    for shape in ("gpt2", "smollm-135m"):
        hf = hf_model(shape)
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            ours, _ = load_model(tmp)
        ours.eval()
        variants = quantized_variants(ours)
        if shape == "gpt2":
            spec = speculative_figures(ours, args)
        for batch in (1, 8):
            prompts = torch.randint(0, 1000, (batch, args.prompt_len))
            n = args.new_tokens
            runs = [partial(hf_generate, hf, prompts, n)]
            runs += [partial(lmforge_generate, Engine(m, n_slots=batch, max_len=args.prompt_len + n + 1), prompts, n)
                     for m, _ in variants.values()]
            t_hf, *t_ours, t_read = interleaved_seconds([*runs, bandwidth_probe(big)], args.repeats)
            bandwidth = big.numel() * 4 / t_read
            hf_tok_s = batch * n / t_hf
            tok_s = {name: batch * n / t for name, t in zip(variants, t_ours)}
            # tokens/s if each step only read its weights once
            bound = {name: bandwidth / weight_bytes * batch for name, (_, weight_bytes) in variants.items()}
            ours_tok_s, float_bound = tok_s["float32"], bound["float32"]
            print(f"{shape:12s} batch {batch} ({bandwidth / 1e9:.1f} GB/s): lmforge {ours_tok_s:7.1f} tok/s ({ours_tok_s / float_bound:4.0%} of bound)  "
                  f"transformers {hf_tok_s:7.1f} tok/s ({hf_tok_s / float_bound:4.0%})  ratio {ours_tok_s / hf_tok_s:.2f}")
            for name in ("int8", "int4"):
                print(f"{shape:12s} batch {batch}   lmforge {name} {tok_s[name]:7.1f} tok/s ({tok_s[name] / bound[name]:4.0%} of its bound "
                      f"{bound[name]:7.1f})  x{tok_s[name] / ours_tok_s:.2f} lmforge float32  x{tok_s[name] / hf_tok_s:.2f} transformers")
            short = shape.split("-")[0]
            if not figures:
                figures.update(ratio=f"{ours_tok_s / hf_tok_s:.2f}", lmforge_tok_s=f"{ours_tok_s:.1f}",
                               hf_tok_s=f"{hf_tok_s:.1f}", lmforge_of_bound=f"{ours_tok_s / float_bound:.2f}",
                               hf_of_bound=f"{hf_tok_s / float_bound:.2f}")
                quant.update({f"{name}_ratio": f"{tok_s[name] / ours_tok_s:.2f}" for name in ("int8", "int4")})
                quant.update({f"{name}_of_bound": f"{tok_s[name] / bound[name]:.2f}" for name in ("int8", "int4")})
            else:
                figures[f"ratio_{short}_b{batch}"] = f"{ours_tok_s / hf_tok_s:.2f}"
                if batch == 1:
                    quant.update({f"{name}_ratio_{short}": f"{tok_s[name] / ours_tok_s:.2f}" for name in ("int8", "int4")})
    print(" ".join(f"{key}={value}" for key, value in {**figures, **quant, **spec}.items()))


if __name__ == "__main__":
    main()
