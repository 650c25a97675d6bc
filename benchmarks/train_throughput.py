"""Training tokens/s: lmforge against `transformers` on the same GPT-2-small-shaped model.

Same weights (the HF model is converted with lmforge's own converter), same batch and
sequence length, fp32 on CPU. Each side takes its own training step as its users get it:
lmforge's `causal_lm` objective and `build_optimizer` (fused AdamW); for `transformers`,
`model(input_ids, labels=...)` and the fused AdamW its `Trainer` uses by default. Both clip
the gradient norm at 1. Also model FLOPs utilisation: 6 x params x tokens/s (plus attention)
against a matmul peak measured in this run.

    python benchmarks/train_throughput.py   # last line: ratio=R lmforge_tok_s=A hf_tok_s=B mfu=M
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers

from lmforge.checkpoint import load_model
from lmforge.data import IGNORE_INDEX
from lmforge.train.loop import TrainConfig, build_optimizer
from lmforge.train.objectives import causal_lm


def matmul_peak() -> float:
    """FLOP/s of a large fp32 matmul on this machine (best of 5)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best


def training_step(model, loss_of, opt):
    def step():
        loss_of(model).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def interleaved_seconds(steps: dict, rounds: int) -> dict[str, float]:
    """Median seconds per step of each named step function, run in alternation so that both
    sides see the same machine (speed drifts by tens of percent on a shared host)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(rounds):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def lmforge_loss(ids: torch.Tensor):
    labels = torch.cat((ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)), dim=1)  # next token; none after the last
    batch = {"input_ids": ids, "labels": labels}

    def loss_of(model):
        out = causal_lm(model, batch)
        return out.loss_sum / out.n_targets

    return loss_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (median reported)")
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 small has 12")
    args = parser.parse_args()
    torch.manual_seed(0)
    peak = matmul_peak()
    cfg = transformers.GPT2Config(n_layer=args.layers, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(cfg).train()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours, _ = load_model(tmp)
    ours.train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len))
    tokens = args.batch * args.seq_len
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)  # transformers' Trainer default (torch >= 2.8)
    seconds = interleaved_seconds({
        "hf": training_step(hf, lambda m: m(input_ids=ids, labels=ids).loss, hf_opt),
        "lmforge": training_step(ours, lmforge_loss(ids), build_optimizer(ours, TrainConfig(lr=1e-4))),
    }, args.steps)
    hf_tok_s, ours_tok_s = tokens / seconds["hf"], tokens / seconds["lmforge"]
    n_params = sum(p.numel() for p in ours.parameters())
    flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * args.seq_len
    mfu = ours_tok_s * flops_per_token / peak
    print(f"matmul peak {peak / 1e9:.0f} GFLOP/s; GPT-2 shape, {args.layers} layers, batch {args.batch} x {args.seq_len}")
    print(f"lmforge {ours_tok_s:.0f} tok/s, transformers {hf_tok_s:.0f} tok/s, MFU {mfu:.1%}")
    print(f"ratio={ours_tok_s / hf_tok_s:.2f} lmforge_tok_s={ours_tok_s:.0f} hf_tok_s={hf_tok_s:.0f} mfu={mfu:.3f}")


if __name__ == "__main__":
    main()
