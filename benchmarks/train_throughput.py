"""Training tokens/s: lmforge against `transformers` on the same GPT-2-small-shaped model.

Same weights (the HF model is converted with lmforge's own converter), same batch and
sequence length, fp32 on CPU. Each side takes its own training step as its users get it:
lmforge's `causal_lm` objective and `build_optimizer` (fused AdamW); for `transformers`,
`model(input_ids, labels=...)` and the fused AdamW its `Trainer` uses by default. Both clip
the gradient norm at 1. Also model FLOPs utilisation: 6 x params x tokens/s (plus attention)
against a matmul peak measured in this run (`matmul_peak`: the model's own
shapes, this process's threads, best of several runs).

With `--device cuda` both sides train under bf16 autocast (lmforge's `train.precision: bfloat16`)
on the GPU, every timing ends with `torch.cuda.synchronize()`, and the peak is the best bf16
matmul of the same shapes on that GPU (`--peak-tflops` uses a datasheet figure instead).

    python benchmarks/train_throughput.py   # last line: ratio=R lmforge_tok_s=A hf_tok_s=B mfu=M
    python benchmarks/train_throughput.py --device cuda --batch 16 --seq-len 1024   # GPT-2 124M on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

import torch
import transformers

from lmforge.checkpoint import load_model
from lmforge.data import IGNORE_INDEX
from lmforge.train.loop import TrainConfig, autocast_for, build_optimizer
from lmforge.train.objectives import causal_lm


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queue, so that a timing covers the work it launched (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CPU = torch.device("cpu")


def matmul_peak(shapes: list[tuple[int, int, int]], runs: int = 5, device: torch.device = CPU,
                dtype: torch.dtype = torch.float32) -> tuple[float, tuple[int, int, int]]:
    """The best FLOP/s of `(M, K, N)` matmuls of `dtype` on `device`, with this process's thread count
    (best of `runs` after a warm-up, per shape), and the shape that reached it. Given the model's own
    shapes, and one larger, the peak is not below what the model's own matmuls reach (a probe of one small
    matrix on one cold thread was, and MFU came out above 1)."""
    best = (0.0, shapes[0])
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        a @ b  # warm-up: page faults, oneDNN/MKL/cuBLAS kernel selection
        synchronize(device)
        seconds = float("inf")
        for _ in range(runs):
            t = time.perf_counter()
            a @ b
            synchronize(device)
            seconds = min(seconds, time.perf_counter() - t)
        best = max(best, (2 * m * k * n / seconds, (m, k, n)))
    return best


def model_shapes(tokens: int, dim: int, vocab: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of a GPT-2 block's projections and the output layer for `tokens` rows, plus a
    square 2048 one."""
    return [(tokens, dim, 3 * dim), (tokens, dim, 4 * dim), (tokens, 4 * dim, dim), (tokens, dim, vocab),
            (2048, 2048, 2048)]


def training_step(model, loss_of, opt, autocast=contextlib.nullcontext):
    def step():
        with autocast():
            loss = loss_of(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def interleaved_seconds(steps: dict, rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds per step of each named step function, run in alternation so that both
    sides see the same machine (speed drifts by tens of percent on a shared host)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    synchronize(device)
    for _ in range(rounds):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            synchronize(device)
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
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: bf16 autocast on the GPU")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="MFU against this peak instead of the probe")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    precision = "bfloat16" if device.type == "cuda" else "float32"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = transformers.GPT2Config(n_layer=args.layers, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    shapes = model_shapes(args.batch * args.seq_len, cfg.n_embd, cfg.vocab_size)
    peak, peak_shape = matmul_peak(shapes, device=device, dtype=dtype)
    hf = transformers.GPT2LMHeadModel(cfg).train()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours, _ = load_model(tmp)
    hf, ours = hf.to(device), ours.to(device).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=device)
    tokens = args.batch * args.seq_len
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)  # transformers' Trainer default (torch >= 2.8)
    seconds = interleaved_seconds({
        "hf": training_step(hf, lambda m: m(input_ids=ids, labels=ids).loss, hf_opt,
                            lambda: autocast_for(precision, device)),
        "lmforge": training_step(ours, lmforge_loss(ids), build_optimizer(ours, TrainConfig(lr=1e-4)),
                                 lambda: autocast_for(precision, device)),
    }, args.steps, device)
    peak, peak_shape = max((peak, peak_shape), matmul_peak(shapes, device=device, dtype=dtype))  # probed before and after: the busier one loses
    hf_tok_s, ours_tok_s = tokens / seconds["hf"], tokens / seconds["lmforge"]
    n_params = sum(p.numel() for p in ours.parameters())
    flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * args.seq_len
    probe = (f"best of 2 x 5 {dtype} runs (before and after) over the model's projection shapes and 2048^3 on "
             + (torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads")
             + f", reached by (M, K, N) = {peak_shape}")
    if args.peak_tflops:
        peak, probe = args.peak_tflops * 1e12, "given by --peak-tflops"
    mfu = ours_tok_s * flops_per_token / peak
    print(f"matmul peak {peak / 1e9:.0f} GFLOP/s: {probe}")
    print(f"GPT-2 shape, {args.layers} layers, batch {args.batch} x {args.seq_len}")
    print(f"lmforge {ours_tok_s:.0f} tok/s, transformers {hf_tok_s:.0f} tok/s, MFU {mfu:.1%}")
    print(f"ratio={ours_tok_s / hf_tok_s:.2f} lmforge_tok_s={ours_tok_s:.0f} hf_tok_s={hf_tok_s:.0f} mfu={mfu:.3f}")


if __name__ == "__main__":
    main()
