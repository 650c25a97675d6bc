"""The one training loop every training type shares.

A training type is an *objective*: `(model, batch) -> ObjectiveOutput(loss_sum, n_targets,
metrics)`. The loop owns everything else: gradient accumulation, clipping, the learning-rate
schedule, AdamW, bf16 autocast, torch.compile, DDP, evaluation, atomic checkpoints, exact
resume, the non-finite guard, metrics.jsonl (with the health record of `health.py`: per-layer
gradient norms and update ratios, expert load, attention entropy), loss.png and callbacks.

Design choices:
- Objectives return the loss *summed* over target tokens plus the token count. The loop
  back-propagates each micro-batch's sum, adds the counts over all micro-batches (and all
  ranks), and divides the gradients by that total once. A step with accumulation k is then
  exactly one big batch, whatever the padding or loss mask of each micro-batch.
- The learning rate is the pure function `lr_at(step, cfg)`, written into the optimizer
  before every step, so the scheduler has no state to save.
- Only parameters with `requires_grad` reach the optimizer (LoRA freezes the base).
  By default ≥2-D tensors get weight decay and 1-D ones (biases, norms) do not, as in nanoGPT.
- A step whose loss or gradient norm is not finite is skipped (gradients dropped, counted);
  `max_bad_steps` of them in a row stop the run with a LmforgeError. The step counter still
  advances, since the step's data was consumed.
- Exact resume: the checkpoint holds weights, optimizer state, loader positions and RNG
  states of every rank, the monitors and the plot history; a resumed run reproduces the
  uninterrupted one bit for bit on CPU. DDP resumes on as many processes; `parallel fsdp` writes
  sharded DCP checkpoints (`sharded.py`) that resume on any number.
- Under DDP every rank runs this same function on its share of the data; only rank 0 writes
  files and calls callbacks. The objective receives the model as trained (DDP- and/or
  compile-wrapped) for training and the plain module for evaluation; use
  `distributed.unwrap_model` to reach attributes.
- One host read per step: the loss, the token count, the gradient norm and the objective's
  metrics (0-d tensors, kept on the device) come back in one transfer, however many micro-batches
  the step has; a small model's step is otherwise dominated by the waits and Python around its
  matmuls (`benchmarks/shakespeare.py` measures the loop against a plain PyTorch one).
- Order within a step: train, report, evaluate (every eval_every), save (every save_every).
  The last step is evaluated and saved into `out_dir` itself instead.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.evaluate.perplexity import bits_per_byte, perplexity
from lmforge.models.layers import set_activation_checkpointing
from lmforge.train import checkpointing as ckpt
from lmforge.train import sharded
from lmforge.train.distributed import (
    PARALLELS,
    DistInfo,
    all_reduce_sum,
    any_rank,
    barrier,
    cleanup,
    gather_json,
    init_distributed,
    maybe_no_sync,
    meta_copy,
    scale_and_clip_,
    shard_model,
    wrap_model,
)
from lmforge.train.health import HealthRecorder
from lmforge.train.monitor import LossSpikeDetector, NonFiniteGuard
from lmforge.train.report import (
    Callback,
    LossPlot,
    MetricsWriter,
    StopTraining,
    TensorBoardCallback,
    json_safe,
)

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "constant", "linear")
PRECISIONS = ("float32", "bfloat16")

__all__ = [
    "Callback", "Loader", "Objective", "ObjectiveOutput", "StopTraining", "TrainConfig", "TrainResult",
    "build_optimizer", "decay_param_groups", "evaluate_objective", "lr_at", "train",
]


# ---------------------------------------------------------------------------- config and contracts


@dataclass
class TrainConfig:
    """How to train; every field is a YAML key and a `--train.key` flag."""

    steps: int = 1000  # optimizer steps in the whole run
    batch_size: int = 8  # sequences per micro-batch (read by the loader, not the loop)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    min_lr: float = 1e-4  # learning rate at the last step (cosine and linear schedules)
    warmup_steps: int = 100  # steps of linear warm-up from lr/warmup_steps to lr
    schedule: str = "cosine"  # after warm-up: "cosine" or "linear" decay to min_lr, or "constant"
    weight_decay: float = 0.1  # AdamW decoupled weight decay on >=2-D parameters
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    grad_clip: float = 1.0  # clip the total gradient norm to this value; 0 = no clipping
    eval_every: int = 200  # evaluate every this many steps (and at the end); 0 = only at the end
    eval_batches: int = 20  # batches per evaluation; 0 = everything make_eval_batches yields
    save_every: int = 500  # periodic checkpoint every this many steps; 0 = only the final one
    keep_last: int = 2  # periodic checkpoints to keep; 0 = keep all
    log_every: int = 10  # write a metrics.jsonl line every this many steps
    precision: str = "float32"  # "float32", or "bfloat16" autocast (CPU and GPUs that support it)
    compile: bool = False  # torch.compile the model for training
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass: far less memory, ~1/3 more compute (`lmforge plan`)
    check_memory: bool = True  # refuse to start a run that `lmforge plan` estimates will not fit in free memory
    seed: int = 1337  # seed for python, numpy and torch (plus the rank under DDP)
    resume: str = "auto"  # "auto": newest checkpoint in the run folder if any; "never"; or a checkpoint folder
    max_bad_steps: int = 10  # consecutive steps with a non-finite loss or gradient before stopping
    tensorboard: bool = False  # also write TensorBoard logs to out_dir/tensorboard (needs tensorboard)
    bytes_per_token: float | None = None  # average UTF-8 bytes per token of the eval text, for bits per byte
    parallel: str = "ddp"  # under torchrun: "ddp" (every rank holds the whole model) or "fsdp" (FSDP2: weights, gradients and optimizer state sharded over ranks)
    fsdp_cpu_offload: bool = False  # with parallel fsdp on GPUs: keep the sharded parameters, gradients and optimizer state in CPU memory
    watch_attention: bool = False  # record attention entropy per layer and head at each evaluation (for `lmforge doctor`)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise LmforgeError (one line) for the first value out of range."""
        at_least = {"steps": 1, "batch_size": 1, "grad_accum": 1, "warmup_steps": 0, "eval_every": 0,
                    "eval_batches": 0, "save_every": 0, "keep_last": 0, "log_every": 1, "max_bad_steps": 1}
        for name, low in at_least.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise LmforgeError(f"train.{name} must be an integer >= {low}; got {value!r}")
        checks = [
            ("lr", self.lr > 0, "a number > 0"),
            ("min_lr", 0 <= self.min_lr <= self.lr, f"between 0 and train.lr ({self.lr})"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
            ("eps", self.eps > 0, "a number > 0"),
            ("grad_clip", self.grad_clip >= 0, "a number >= 0 (0 turns clipping off)"),
            ("schedule", self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
            ("precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            ("parallel", self.parallel in PARALLELS, f"one of {', '.join(PARALLELS)}"),
            ("resume", isinstance(self.resume, str) and self.resume != "", "auto, never, or a checkpoint folder"),
            ("bytes_per_token", self.bytes_per_token is None or self.bytes_per_token > 0, "a number > 0 or null"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise LmforgeError(f"train.{name} must be {expected}; got {getattr(self, name)!r}")


@dataclass
class ObjectiveOutput:
    """What an objective returns for one micro-batch."""

    loss_sum: Tensor  # scalar, summed over targets
    n_targets: Tensor | int  # number of targets in this micro-batch
    metrics: dict[str, Tensor | float] = field(default_factory=dict)  # already-averaged extras for logging;
    #                                      0-d tensors are read with the step's loss, in one transfer


Objective = Callable[[nn.Module, dict[str, Tensor]], ObjectiveOutput]


class Loader(Protocol):
    """A resumable source of training micro-batches (one per rank under DDP)."""

    def next_batch(self) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, d: dict) -> None: ...


@dataclass
class TrainResult:
    """How a run ended."""

    step: int  # optimizer steps done
    final_train_loss: float  # loss of the last applied step (nan if none)
    final_eval: dict[str, float] | None  # the final evaluation's metrics, None without eval batches
    out_dir: Path  # the run folder, which holds the final checkpoint
    stopped_early: bool  # a callback raised StopTraining


# ---------------------------------------------------------------------------- schedule and optimizer


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the optimizer step with 0-based index `step`.

    Linear warm-up reaches cfg.lr at step warmup_steps-1; cosine or linear decay then reaches
    cfg.min_lr exactly at the last step (steps-1); "constant" stays at cfg.lr.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min((step - cfg.warmup_steps) / max(cfg.steps - 1 - cfg.warmup_steps, 1), 1.0)
    if cfg.schedule == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        coeff = 1.0 - progress
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split nanoGPT-style: decay for ≥2-D tensors, none for biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


ParamGroups = Callable[[nn.Module], list[dict[str, Any]]]


def build_optimizer(model: nn.Module, cfg: TrainConfig, param_groups: ParamGroups | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters.

    `param_groups(model)` may return torch-style groups; a group's "lr" is its peak rate and
    scales with the schedule (kept as "lr_scale"). Frozen parameters and empty groups are
    dropped. The fused kernel is used on CPU and CUDA (on our 2-core CPU its step takes about a
    fifth of the time of the multi-tensor one for GPT-2 small).
    """
    groups = param_groups(model) if param_groups else decay_param_groups(model, cfg.weight_decay)
    cleaned = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            cleaned.append({**group, "params": params, "lr_scale": group.get("lr", cfg.lr) / cfg.lr})
    if not cleaned:
        raise LmforgeError("the model has no trainable parameters; unfreeze some or apply LoRA before training")
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in cleaned for p in g["params"])
    return torch.optim.AdamW(cleaned, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for `precision` on `device` (a no-op for float32)."""
    if precision == "float32":
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LmforgeError("train.precision bfloat16 is not supported on this GPU; use float32")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device`; to a GPU through pinned memory, so the copy runs
    asynchronously and the host goes on queueing the step's kernels."""
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin and v.device.type == "cpu" else v).to(device, non_blocking=True)
            if isinstance(v, Tensor) else v for k, v in batch.items()}


def _detached(value: Tensor | float) -> Tensor | float:
    return value.detach().double() if isinstance(value, Tensor) else value


def _read_together(values: dict[str, Tensor | float]) -> dict[str, float]:
    """`values` as floats, the tensors among them copied to the host in one transfer (one wait)."""
    tensors = {k: v for k, v in values.items() if isinstance(v, Tensor)}
    if tensors:
        device = next(iter(tensors.values())).device
        stacked = torch.stack([v.to(device, torch.float64).reshape(()) for v in tensors.values()])
        values = {**values, **dict(zip(tensors, stacked.tolist(), strict=True))}
    return {k: float(v) for k, v in values.items()}


# ---------------------------------------------------------------------------- evaluation


def evaluate_objective(
    model: nn.Module,
    objective: Objective,
    batches: Iterable[dict[str, Tensor]],
    *,
    max_batches: int = 0,
    precision: str = "float32",
    bytes_per_token: float | None = None,
    dist_info: DistInfo | None = None,
) -> dict[str, float]:
    """Token-weighted mean loss over `batches` (at most `max_batches`; 0 = all), with perplexity.

    Returns eval_loss (nats per target token), eval_ppl = exp(eval_loss), eval_tokens, the
    objective's metrics weighted by tokens as eval_<name>, and with `bytes_per_token`
    eval_bpb = eval_loss / ln(2) / bytes_per_token (bits per UTF-8 byte). Under DDP the sums
    are added over ranks.
    """
    device = next(model.parameters()).device
    info = dist_info or DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_targets = torch.zeros((), dtype=torch.float64, device=device)
    extras: dict[str, float] = {}
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if max_batches and i >= max_batches:
                    break
                with autocast_for(precision, device):
                    out = objective(model, _to_device(batch, device))
                n = torch.as_tensor(out.n_targets, dtype=torch.float64, device=device)
                loss_sum += out.loss_sum.detach().double()
                n_targets += n
                for key, value in out.metrics.items():
                    extras[key] = extras.get(key, 0.0) + float(value) * float(n)
    finally:
        model.train(was_training)
    total_loss, total_n = all_reduce_sum(torch.stack([loss_sum, n_targets]), info).tolist()
    if total_n <= 0:
        raise LmforgeError("the evaluation batches hold no target tokens; check the validation data")
    loss = total_loss / total_n
    metrics = {"eval_loss": loss, "eval_ppl": perplexity(loss), "eval_tokens": total_n}
    if bytes_per_token:
        metrics["eval_bpb"] = bits_per_byte(loss, bytes_per_token)
    local_n = float(n_targets)
    metrics.update({f"eval_{k}": v / local_n for k, v in extras.items() if local_n > 0})
    return metrics


# ---------------------------------------------------------------------------- the loop


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Run:
    """The state of one training run; `train` builds it and calls `run`."""

    def __init__(
        self, model: nn.Module, objective: Objective, loader: Loader, cfg: TrainConfig, out_dir: Path,
        info: DistInfo, make_eval_batches: Callable[[], Iterable[dict[str, Tensor]]] | None,
        save_model: ckpt.ModelIO, load_model: ckpt.ModelIO, callbacks: Sequence[Callback],
        param_groups: ParamGroups | None,
    ) -> None:
        self.cfg, self.out_dir, self.info = cfg, out_dir, info
        self.objective, self.loader = objective, loader
        self.make_eval_batches, self.save_model, self.load_model = make_eval_batches, save_model, load_model
        self.callbacks = list(callbacks) if info.is_main else []
        if info.is_main and cfg.tensorboard:
            self.callbacks.append(TensorBoardCallback(out_dir / "tensorboard"))
        if cfg.activation_checkpointing:
            set_activation_checkpointing(model)
        self.skeleton = meta_copy(model) if cfg.parallel == "fsdp" and info.is_main else None
        # the plain module (saved, loaded, evaluated) on the device: sharded first under fsdp
        self.raw = shard_model(model, info, cfg.parallel, cfg.precision, cfg.fsdp_cpu_offload)
        self.optimizer = build_optimizer(self.raw, cfg, param_groups)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.writer, self.plot = MetricsWriter(out_dir / "metrics.jsonl"), LossPlot(out_dir / "loss.png")
        self.guard = NonFiniteGuard(cfg.max_bad_steps)
        self.spikes = LossSpikeDetector()
        self.health = HealthRecorder(self.raw, self.params)
        self.step = 0
        self.history: dict[str, list[list[float]]] = {"train": [], "eval": []}
        self.last_train_loss = math.nan
        self.last_eval: dict[str, float] | None = None
        self.last_checkpoint: Path | None = None
        resumed_from, rng = self._start()
        self.already_done = resumed_from == out_dir and self.step >= cfg.steps
        compiled = torch.compile(self.raw) if cfg.compile else self.raw
        self.ddp = wrap_model(compiled, info)  # the module trained: DDP around (compiled) raw
        # RNG last, so that nothing above can consume random numbers after it is set.
        if rng is None:
            _seed_everything(cfg.seed + info.rank)
        else:
            ckpt.set_rng_state(rng)

    # ------------------------------------------------------------------ start / resume

    def _start(self) -> tuple[Path | None, dict[str, Any] | None]:
        """Resume from a checkpoint if configured; return the folder and this rank's RNG state."""
        cfg, out_dir = self.cfg, self.out_dir
        if self.info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            if cfg.resume == "never":
                self._forget_earlier_run()
        barrier(self.info)
        source = None
        if cfg.resume == "auto":
            source = ckpt.find_resume_checkpoint(out_dir)
        elif cfg.resume != "never":
            source = Path(cfg.resume)
        barrier(self.info)  # every rank has looked before rank 0 deletes half-written folders
        if self.info.is_main:
            ckpt.remove_stale_tmp(out_dir)
            if source is None:
                self.writer.truncate_after(0)
        return source, (None if source is None else self._resume(source))

    def _forget_earlier_run(self) -> None:
        if (self.out_dir / ckpt.CHECKPOINTS_DIR).is_dir() or ckpt.is_complete(self.out_dir):
            log.warning("resume=never: deleting the checkpoints of the earlier run in %s", self.out_dir)
        shutil.rmtree(self.out_dir / ckpt.CHECKPOINTS_DIR, ignore_errors=True)
        for name in (ckpt.TRAIN_STATE_JSON, ckpt.TRAIN_STATE_TENSORS):
            (self.out_dir / name).unlink(missing_ok=True)

    def _resume(self, source: Path) -> dict[str, Any]:
        """Load the checkpoint in `source`; return this rank's RNG state, to be set last."""
        state, tensors = ckpt.read_train_state(source)
        rank = sharded.resume_rank(source, state, self.raw, self.info)
        if sharded.is_sharded_checkpoint(state):
            sharded.load_sharded_checkpoint(self.raw, self.optimizer, source)
        else:
            ckpt.load_optimizer_state(self.optimizer, self.raw, source, tensors, state["optimizer"])
            self.load_model(self.raw, source)
        self.loader.load_state_dict(state["loader"][rank])
        self.step = int(state["step"])
        self.history = state["history"]
        self.last_train_loss = math.nan if state["last_train_loss"] is None else state["last_train_loss"]
        self.last_eval = state["last_eval"]
        self.guard.load_state_dict(state["monitor"]["non_finite"])
        self.spikes.load_state_dict(state["monitor"]["loss_spike"])
        self.last_checkpoint = source
        if self.info.is_main:
            self.writer.truncate_after(self.step)
        log.info("resumed from %s at step %d", source, self.step)
        return state["rng"][rank]

    # ------------------------------------------------------------------ one step

    def _train_step(self) -> dict[str, Any]:
        """One optimizer step. The host waits for the device once, to read the loss, the token count,
        the gradient norm and the objective's metrics together (the non-finite guard needs the first
        three before the update)."""
        cfg, device = self.cfg, self.info.device
        start = time.perf_counter()
        if not (self.ddp.training and self.raw.training):  # set back after evaluation or generation
            self.ddp.train()  # (a walk over every module: not on every step of a small model)
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss summed over targets, targets
        extras: dict[str, Tensor | float] = {}
        for micro in range(cfg.grad_accum):
            batch = _to_device(self.loader.next_batch(), device)
            with maybe_no_sync(self.ddp, sync=micro == cfg.grad_accum - 1):
                with autocast_for(cfg.precision, device):
                    out = self.objective(self.ddp, batch)
                out.loss_sum.backward()
            n = torch.as_tensor(out.n_targets, dtype=torch.float64, device=device)
            sums += torch.stack((out.loss_sum.detach().double(), n))
            for key, value in out.metrics.items():
                extras[key] = extras.get(key, 0.0) + _detached(value) * n
        local_n = sums[1].clone()
        all_reduce_sum(sums, self.info)
        # DDP averaged the gradients over ranks; undo that and divide by the global target count instead.
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = scale_and_clip_(self.params, self.info.world_size / sums[1], max_norm)
        loss, total_n, grad_norm, metrics = self._read_step(sums, local_n, grad_norm, extras)
        lr = lr_at(self.step, cfg)
        kept = str(self.last_checkpoint) if self.last_checkpoint else None
        applied = self.guard.check(loss, grad_norm, self.step + 1, kept)
        health: dict[str, Any] = {}
        if applied:
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            measured = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.steps
            before = self.health.snapshot() if measured else None
            self.optimizer.step()
            if before is not None:
                health = self.health.measure(before, grad_norm, cfg.grad_clip)
            self.last_train_loss = loss
        else:
            log.warning("step %d: loss %s or gradient norm %s is not finite; skipped the update (%d in a row)",
                        self.step + 1, loss, grad_norm, self.guard.consecutive)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed = time.perf_counter() - start
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": total_n / elapsed,
                "step_time_s": elapsed, "n_targets": total_n, "skipped": not applied, **health, **metrics}

    def _read_step(self, sums: Tensor, local_n: Tensor, grad_norm: Tensor,
                   extras: dict[str, Tensor | float]) -> tuple[float, float, float, dict[str, float]]:
        """(mean loss, global targets, grad norm, this rank's per-target metrics), read in one transfer."""
        read = _read_together({"loss_sum": sums[0], "n": sums[1], "grad_norm": grad_norm, "local_n": local_n, **extras})
        loss_sum, total_n, norm, local = (read.pop(k) for k in ("loss_sum", "n", "grad_norm", "local_n"))
        metrics = {k: v / local for k, v in read.items()} if local > 0 else {}
        if total_n <= 0:
            log.warning("step %d has no target tokens (is every label masked?)", self.step + 1)
            return math.nan, total_n, math.nan, metrics
        return loss_sum / total_n, total_n, norm, metrics

    # ------------------------------------------------------------------ reporting, eval, save

    def _notify(self, hook: str, *args: Any) -> bool:
        """Call `hook` on every callback; True when one asked to stop."""
        stop = False
        for callback in self.callbacks:
            try:
                getattr(callback, hook)(*args)
            except StopTraining:
                stop = True
        return stop

    def _report_step(self, metrics: dict[str, Any]) -> bool:
        if self.spikes.update(metrics["loss"]):
            metrics["loss_spike"] = True
            log.warning("step %d: loss spike (%.4f)", self.step, metrics["loss"])
        logged = (self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps or metrics["skipped"]
                  or "loss_spike" in metrics)
        if logged and math.isfinite(metrics["loss"]):
            self.history["train"].append([self.step, metrics["loss"]])
        if self.info.is_main and logged:
            self.writer.write("train", self.step, metrics)
        return any_rank(self._notify("on_step", self.step, metrics), self.info)

    def _evaluate(self, final: bool = False) -> None:
        assert self.make_eval_batches is not None
        metrics = evaluate_objective(self.raw, self.objective, self.make_eval_batches(),
                                     max_batches=self.cfg.eval_batches, precision=self.cfg.precision,
                                     bytes_per_token=self.cfg.bytes_per_token, dist_info=self.info)
        if self.cfg.watch_attention:
            metrics["attn_entropy"] = self.health.attention_entropy(self.raw, self.make_eval_batches)
        self.last_eval = metrics
        self.history["eval"].append([self.step, metrics["eval_loss"]])
        if self.info.is_main:
            self.writer.write("eval", self.step, metrics)
            self.plot.update(self.history["train"], self.history["eval"], final)
        self._notify("on_eval", self.step, metrics)

    def _state(self) -> dict[str, Any]:
        """The JSON train state (without the optimizer), gathered from every rank."""
        return json_safe({
            "step": self.step,
            "config": asdict(self.cfg),
            "scheduler": {"schedule": self.cfg.schedule, "lr": lr_at(max(self.step - 1, 0), self.cfg)},
            "loader": gather_json(self.loader.state_dict(), self.info),
            "rng": gather_json(ckpt.rng_state(), self.info),
            "history": self.history,
            "last_train_loss": self.last_train_loss,
            "last_eval": self.last_eval,
            "monitor": {"non_finite": self.guard.state_dict(), "loss_spike": self.spikes.state_dict()},
            "world_size": self.info.world_size,
        })

    def _save(self, final: bool) -> None:
        state = self._state()  # every rank takes part in the gathers
        dest = self.out_dir if final else ckpt.periodic_checkpoint_dir(self.out_dir, self.step)
        if self.cfg.parallel == "fsdp":
            sharded.save_sharded_checkpoint(dest, model=self.raw, skeleton=self.skeleton, save_model=self.save_model,
                                            optimizer=self.optimizer, state=state, info=self.info, in_place=final)
        elif self.info.is_main:
            ckpt.save_checkpoint(dest, model=self.raw, save_model=self.save_model, optimizer=self.optimizer,
                                 state=state, in_place=final)
        if self.info.is_main and not final:
            ckpt.prune_checkpoints(self.out_dir, self.cfg.keep_last)
        barrier(self.info)
        self.last_checkpoint = dest
        self._notify("on_save", self.step, dest)

    # ------------------------------------------------------------------ the run

    def run(self) -> TrainResult:
        """Train to cfg.steps (or until a callback stops it), evaluate, save the final checkpoint."""
        cfg = self.cfg
        n_params = sum(p.numel() for p in self.params)
        log.info("training %d parameters for %d steps (from step %d) into %s", n_params, cfg.steps,
                 self.step, self.out_dir)
        self._notify("on_train_start", self.step, cfg)
        stopped = False
        while self.step < cfg.steps and not self.already_done:
            stopped = self._report_step(self._train_step())
            if stopped or self.step == cfg.steps:
                break  # the final evaluation and checkpoint follow
            if self.make_eval_batches is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                self._evaluate()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.guard.consecutive == 0:
                self._save(final=False)  # never during a run of non-finite steps: keep the last good one
        if not self.already_done:
            if self.make_eval_batches is not None:
                self._evaluate(final=True)
            elif self.info.is_main:
                self.plot.update(self.history["train"], self.history["eval"], final=True)
            self._save(final=True)
        result = TrainResult(step=self.step, final_train_loss=self.last_train_loss, final_eval=self.last_eval,
                             out_dir=self.out_dir, stopped_early=stopped)
        self._notify("on_train_end", result)
        return result


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Keeps the garbage collector off the objects alive when training starts (modules, libraries,
    data) until it ends: each full collection walks them all otherwise, a pause a small model's
    run feels (`benchmarks/shakespeare.py`)."""
    gc.collect()  # today's garbage is freed now, not kept through the run
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def train(
    model: nn.Module,
    objective: Objective,
    loader: Loader,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    make_eval_batches: Callable[[], Iterable[dict[str, Tensor]]] | None = None,
    save_model: ckpt.ModelIO,
    callbacks: Sequence[Callback] = (),
    param_groups: ParamGroups | None = None,
    load_model: ckpt.ModelIO | None = None,
    dist_info: DistInfo | None = None,
) -> TrainResult:
    """Train `model` on `objective` over `loader`'s batches; checkpoints and metrics go to `out_dir`.

    `save_model(model, folder)` writes the model files of a checkpoint (config.json,
    model.safetensors, tokenizer); the loop adds the train state next to them.
    `load_model(model, folder)` reads them back when resuming (default: checked load of
    folder/model.safetensors). `param_groups(model)` overrides the optimizer groups.
    Under torchrun the process group is set up here unless `dist_info` is given, and torn
    down at the end if it was set up here.
    """
    cfg.validate()
    owns_group = dist_info is None and not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info = dist_info or init_distributed()
    run = None
    try:
        run = _Run(model, objective, loader, cfg, Path(out_dir), info, make_eval_batches, save_model,
                   load_model or ckpt.load_model_weights, callbacks, param_groups)
        with _frozen_heap():
            return run.run()
    finally:
        for callback in {*callbacks, *(run.callbacks if run else ())}:
            callback.close()
        if owns_group and info.is_distributed:
            cleanup()

