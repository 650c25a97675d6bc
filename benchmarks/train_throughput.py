"""Training tokens/s: lmforge against `transformers` on the same GPT-2-small-shaped model.

Same weights (the HF model is converted with lmforge's own converter), same batch and
sequence length, same AdamW settings, fp32 on CPU. Also model FLOPs utilisation: 6 x params
x tokens/s (plus attention) against a matmul peak measured in this run.

    python benchmarks/train_throughput.py   # last line: ratio=R lmforge_tok_s=A hf_tok_s=B mfu=M
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F
import transformers

from lmforge.checkpoint import load_model


def matmul_peak() -> float:
    """FLOP/s of a large fp32 matmul on this machine (best of 3)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best


def steps_per_s(model, logits_of, ids, labels, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step():
        loss = F.cross_entropy(logits_of(model, ids).flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
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
    labels = torch.roll(ids, -1, dims=1)
    tokens = args.batch * args.seq_len
    hf_tok_s = steps_per_s(hf, lambda m, x: m(input_ids=x).logits, ids, labels, args.steps) * tokens
    ours_tok_s = steps_per_s(ours, lambda m, x: m(x), ids, labels, args.steps) * tokens
    n_params = sum(p.numel() for p in ours.parameters())
    flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * args.seq_len
    mfu = ours_tok_s * flops_per_token / peak
    print(f"matmul peak {peak / 1e9:.0f} GFLOP/s; GPT-2 shape, {args.layers} layers, batch {args.batch} x {args.seq_len}")
    print(f"lmforge {ours_tok_s:.0f} tok/s, transformers {hf_tok_s:.0f} tok/s, MFU {mfu:.1%}")
    print(f"ratio={ours_tok_s / hf_tok_s:.2f} lmforge_tok_s={ours_tok_s:.0f} hf_tok_s={hf_tok_s:.0f} mfu={mfu:.3f}")


if __name__ == "__main__":
    main()
