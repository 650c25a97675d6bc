"""Byte-level char model on tinyshakespeare with nanoGPT's CPU-example shape, against a plain loop.

4 layers, 4 heads, 128 wide, context 64, batch 12, 2000 steps (as nanoGPT's
`train_shakespeare_char.py` CPU run), validation on the last 10% of the file. nanoGPT
reports validation loss 1.88 nats/char there, i.e. 2.71 bits per byte.

The peer is `plain_training` below: the same shape, data, schedule and AdamW settings as a
~60-line nanoGPT-style PyTorch model and loop (fused AdamW, as lmforge uses), in the same
process. The two are interleaved: every `--switch-every` lmforge steps, the plain loop takes as
many, so both see the same machine (a shared host drifts by tens of percent within a run). Each
side's time holds its own training steps and its own evaluations (the same number of batches at
the same steps); lmforge's also holds what the plain loop does not do: its checkpoints (periodic and
final), metrics.jsonl with the health record of every logging step, loss.png (redrawn every 30 s
and at the end) and the progress bar.

    python benchmarks/shakespeare.py --data ../shared/data/tinyshakespeare/input.txt
    # last line: val_bpb=X wall_s=T ratio_vs_plain=R   (R = lmforge tokens/s / plain loop tokens/s)
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from lmforge.data import prepare
from lmforge.data.shards import TokenShards
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.loop import TrainConfig, TrainResult, lr_at
from lmforge.train.pretrain import run_pretrain
from lmforge.train.report import Callback

# ---------------------------------------------------------------- the plain loop (the peer)


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, C // self.n_heads)  # (B, T, 3, H, D)
        q, k, v = qkv.transpose(1, 3).unbind(2)  # (B, H, T, D) each
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    def __init__(self, vocab: int, context: int, dim: int, n_layers: int, n_heads: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads) for _ in range(n_layers))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as GPT-2
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(self.ln(x)).flatten(0, 1), targets.flatten())  # mean over B*T


def plain_eval(model: nn.Module, val: np.ndarray, batch: int, context: int, batches: int) -> float:
    """Mean loss over consecutive windows from the start of `val` (as lmforge evaluates)."""
    n = min((len(val) - 1) // context, batches * batch)
    w = torch.from_numpy(val[: n * context + 1].astype(np.int64))
    x, y = w[:-1].view(n, context), w[1:].view(n, context)  # (n, T) each
    with torch.no_grad():
        losses = [model(x[i : i + batch], y[i : i + batch]).item() * len(x[i : i + batch]) for i in range(0, n, batch)]
    return sum(losses) / n


def plain_training(train: np.ndarray, val: np.ndarray, vocab: int, model_cfg: dict, cfg: TrainConfig,
                   context: int) -> Iterator[float]:
    """Yields after every step (the eval loss after the last one); evaluates as lmforge does."""
    torch.manual_seed(cfg.seed)
    model = PlainGPT(vocab, context, model_cfg["dim"], model_cfg["n_layers"], model_cfg["n_heads"])
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    for step in range(cfg.steps):
        ix = torch.randint(len(train) - context, (cfg.batch_size,)).tolist()
        xy = torch.from_numpy(np.stack([train[i : i + context + 1] for i in ix]).astype(np.int64))  # (B, T+1)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        model(xy[:, :-1], xy[:, 1:]).backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            plain_eval(model, val, cfg.batch_size, context, cfg.eval_batches)
        yield math.nan
    yield plain_eval(model, val, cfg.batch_size, context, cfg.eval_batches)


# ---------------------------------------------------------------- interleaving


class Interleaved(Callback):
    """Every `every` lmforge steps, runs as many plain steps; times each side's share of the run."""

    def __init__(self, plain: Iterator[float], every: int) -> None:
        self.plain, self.every = plain, every
        self.lmforge_s = self.plain_s = 0.0
        self.mark = time.perf_counter()
        self.plain_loss = math.nan

    def on_train_start(self, start_step: int, cfg: TrainConfig) -> None:
        self.mark = time.perf_counter()

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.every == 0:
            self._run_plain(self.every)

    def on_train_end(self, result: object) -> None:
        self._run_plain(None)  # the rest, with the final evaluation

    def _run_plain(self, steps: int | None) -> None:
        now = time.perf_counter()
        self.lmforge_s += now - self.mark
        for i, loss in enumerate(self.plain):
            self.plain_loss = loss
            if steps is not None and i + 1 == steps:
                break
        self.mark = time.perf_counter()
        self.plain_s += self.mark - now


def char_recipe(data: str, steps: int, work: Path) -> tuple[dict, Tokenizer]:
    """The recipe of configs/shakespeare-char.yaml's byte-level char model on `data` for `steps` steps
    in `work` (tokenizer in work/tok, shards in work/data, the run in work/run), and its tokenizer."""
    tok = train_tokenizer([data], 256)  # pure bytes: char-level for ASCII
    tok.save(work / "tok")
    prepare([data], tok, work / "data", val_fraction=0.1)  # the last 10% of the file
    recipe = yaml.safe_load((Path(__file__).parents[1] / "configs" / "shakespeare-char.yaml").read_text())
    recipe["out_dir"] = str(work / "run")
    recipe["data"].update(shards=str(work / "data"), tokenizer=str(work / "tok"))
    recipe["train"].update(steps=steps, eval_batches=200, resume="never")
    return recipe, tok


def train_char_model(data: str, steps: int, work: Path) -> TrainResult:
    """Train the char model of `char_recipe` (quant_quality.py's model)."""
    return run_pretrain(char_recipe(data, steps, work)[0], progress=True).train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="tinyshakespeare input.txt")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--switch-every", type=int, default=10, help="steps each side runs before the other")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    start = time.monotonic()
    work = Path(args.out_dir or tempfile.mkdtemp(prefix="shakespeare-"))
    recipe, tok = char_recipe(args.data, args.steps, work)
    cfg, context = TrainConfig(**recipe["train"]), recipe["data"]["seq_len"]
    train, val = (TokenShards.open(work / "data", split) for split in ("train", "val"))
    plain_run = plain_training(train.arrays[0], val.arrays[0], tok.vocab_size, recipe["model"], cfg, context)
    side = Interleaved(plain_run, args.switch_every)
    result = run_pretrain(recipe, progress=True, callbacks=[side]).train
    bpb, tokens = result.final_eval["eval_bpb"], cfg.steps * cfg.batch_size * context
    plain_bpb = side.plain_loss / math.log(2) / (val.n_bytes / val.n_tokens)
    ours, plain = tokens / side.lmforge_s, tokens / side.plain_s
    print(f"validation: {result.final_eval['eval_loss']:.3f} nats/token, {bpb:.3f} bits/byte (nanoGPT: 2.71; "
          f"plain loop: {plain_bpb:.3f})")
    print(f"lmforge {ours:.0f} tok/s ({side.lmforge_s:.0f} s), plain loop {plain:.0f} tok/s ({side.plain_s:.0f} s), "
          f"interleaved every {args.switch_every} steps; {torch.get_num_threads()} threads")
    print(f"val_bpb={bpb:.3f} wall_s={time.monotonic() - start:.0f} ratio_vs_plain={ours / plain:.2f}")


if __name__ == "__main__":
    main()
