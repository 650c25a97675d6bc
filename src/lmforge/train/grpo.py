"""GRPO: group relative policy optimisation with verifiable rewards (Shao et al., 2024), on the one loop.

For each prompt the current policy samples G completions; each completion's reward is the sum
of user reward functions (and optionally a reward model's score); its advantage is its reward
normalised within the group of its prompt; the policy maximises PPO's clipped surrogate with a
k3 KL penalty towards a reference policy (`objectives.grpo`).

Design choices:
- GRPO is a loader plus an objective, so the one training loop runs it: optimiser, schedule,
  accumulation, checkpoints, resume, metrics and progress bar are the loop's. `RolloutLoader`
  hands out micro-batches of a buffer of rollouts; once the buffer has been passed over
  `grpo.iterations` times, it samples the next one from the current policy with the generation
  engine (P prompts x G completions, P = grpo.prompts_per_rollout per process).
- An optimizer step never spans two buffers: the P*G sequences split into micro-batches of
  train.batch_size, and train.grad_accum must divide their number. With grad_accum equal to it,
  each step is one pass over the rollouts (`iterations` steps per buffer); with grad_accum 1,
  each micro-batch is a step (PPO-style mini-batches). Micro-batches keep their order.
- The old log-probs are those of a full forward pass of the policy right after sampling (not
  the engine's decoding log-probs), with the same micro-batches as training, so the first pass
  over a buffer has ratio 1 exactly.
- A completion is the sampled tokens plus the stop token when the model chose to stop (so it
  learns to stop); reward functions see the decoded text without it.
- Reward functions are named `module:function` (imported with the working folder on the path)
  or `path/to/file.py:function` and called `f(prompt, completion, **fields)`, where `prompt` is
  the row's prompt (text or messages) and `fields` are the row's other keys that the function
  names as parameters (all of them with **kwargs): a reference answer, for example. A function
  that raises, or returns something that is not a finite number, either stops the run with a
  one-line error naming the prompt (`on_reward_error: stop`) or is logged and that prompt's
  group is left out of the step (`skip`).
- The loss is summed over completion tokens and the loop divides by their count: a token-level
  mean, as in DAPO and TRL's default (the paper averages per sequence first).
- Exact resume: the loader's state holds the buffer itself (token ids, old and reference
  log-probs, advantages, statistics) and the position in it, as JSON, so a checkpoint taken in
  the middle of a buffer resumes with the rollouts the restored weights could not regenerate.
  Prompts and sampling seeds derive from (train.seed, rollout index, rank).
- The reference (needed when kl_beta > 0) is, under LoRA, the policy with adapters disabled, and
  otherwise a frozen copy of the initial model.
- Not under `train.parallel fsdp` on several processes: the engine decodes each rank's own prompts
  for as many steps as they take, calling the model's layers directly, which FSDP2 shards would
  turn into mismatched collectives; one clear error says to use ddp (`Run.require_unsharded`).
- Evaluation (train.eval_every): greedy completions of the held-out prompts, scored; their
  statistics reach metrics.jsonl as `eval_reward_mean` etc. through the objective's metrics.
  `reward.png` (mean reward per step, and the held-out greedy reward) is redrawn from
  metrics.jsonl at every checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import inspect
import json
import logging
import math
import numbers
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.checkpoint.heads import load_head_model
from lmforge.data.masking import IGNORE_INDEX
from lmforge.data.preference import (
    PreferenceDataConfig,
    PromptRow,
    encode_prompt,
    pack_rows,
    read_prompt_rows,
    stop_token,
)
from lmforge.data.rows import ShuffledOrder, holdout
from lmforge.errors import LmforgeError
from lmforge.evaluate.logprobs import eval_mode, token_logps
from lmforge.evaluate.scoring import score_texts
from lmforge.generate.engine import Engine, Request
from lmforge.generate.sampling import SamplingParams
from lmforge.tokenizer import Tokenizer
from lmforge.train import setup
from lmforge.train.distributed import init_distributed
from lmforge.train.loop import TrainConfig, autocast_for
from lmforge.train.lora import LoraConfig, lora_disabled
from lmforge.train.objectives import group_advantages, grpo
from lmforge.train.report import Callback, plot_curves, read_metrics

log = logging.getLogger(__name__)

ON_REWARD_ERROR = ("stop", "skip")


@dataclass
class GrpoConfig:
    """GRPO; every field is a YAML key and a `--grpo.key` flag."""

    reward_functions: list[str] = field(default_factory=list)  # "module:function" or "file.py:function"; f(prompt, completion, **row fields it names) -> float
    reward_model: str = ""  # folder written by `lmforge reward`; its score is added to the functions' rewards
    group_size: int = 8  # completions sampled per prompt (G)
    prompts_per_rollout: int = 4  # prompts per batch of rollouts and process (P); P*G sequences
    iterations: int = 1  # passes over each batch of rollouts (several optimisation steps per batch)
    max_new_tokens: int = 64  # tokens per completion at most
    temperature: float = 1.0  # sampling temperature of the rollouts
    top_p: float = 1.0  # nucleus sampling mass of the rollouts (1 = off)
    clip_eps: float = 0.2  # the policy ratio is clipped to [1 - clip_eps, 1 + clip_eps]
    kl_beta: float = 0.04  # weight of the k3 KL penalty towards the reference; 0 = no reference
    on_reward_error: str = "stop"  # a reward function raised or returned a non-number: "stop", or "skip" that prompt's group
    gen_slots: int = 64  # sequences the engine decodes together

    def __post_init__(self) -> None:
        if isinstance(self.reward_functions, str):  # from the command line: a JSON list, or names separated by commas
            text = self.reward_functions.strip()
            try:
                self.reward_functions = json.loads(text) if text.startswith("[") else [s.strip() for s in text.split(",") if s.strip()]
            except json.JSONDecodeError as error:
                raise LmforgeError(f"grpo.reward_functions is not a JSON list ({error.msg}); got {text!r}") from None
        if not isinstance(self.reward_functions, list) or not all(isinstance(s, str) for s in self.reward_functions):
            raise LmforgeError(f"grpo.reward_functions must be a list of 'module:function' names; got {self.reward_functions!r}")
        at_least = {"group_size": 2, "prompts_per_rollout": 1, "iterations": 1, "max_new_tokens": 1, "gen_slots": 1}
        for name, low in at_least.items():
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise LmforgeError(f"grpo.{name} must be an integer >= {low}; got {getattr(self, name)!r}")
        checks = [
            ("temperature", self.temperature > 0, "> 0 (rollouts are sampled)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("clip_eps", 0 < self.clip_eps < 1, "in (0, 1)"),
            ("kl_beta", self.kl_beta >= 0, ">= 0"),
            ("on_reward_error", self.on_reward_error in ON_REWARD_ERROR, f"one of {', '.join(ON_REWARD_ERROR)}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise LmforgeError(f"grpo.{name} must be {expected}; got {getattr(self, name)!r}")


# ---------------------------------------------------------------- reward functions


@contextlib.contextmanager
def _working_folder_importable() -> Iterator[None]:
    """Modules in the working folder import during the block, as `python -m` would allow."""
    folder = os.getcwd()
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)


def _import(module: str, spec: str) -> ModuleType:
    """The module named `module` (a dotted name or a .py file); any failure is one LmforgeError line."""
    try:
        if module.endswith(".py"):
            path = Path(module)
            if not path.is_file():
                raise LmforgeError(f"reward function {spec!r}: {path} does not exist")
            loader_spec = importlib.util.spec_from_file_location(f"lmforge_reward_{path.stem}", path)
            loaded = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(loaded)
            return loaded
        with _working_folder_importable():
            return importlib.import_module(module)
    except LmforgeError:
        raise
    except Exception as error:  # ImportError, SyntaxError, or anything the module's body raises
        first = str(error).splitlines()[0] if str(error) else ""
        raise LmforgeError(f"reward function {spec!r}: cannot import {module} ({type(error).__name__}: {first})") from None


@dataclass(frozen=True)
class RewardFunction:
    """A user reward function and the row fields it takes as keyword arguments."""

    name: str  # as given: "module:function"
    fn: Callable[..., Any]
    fields: frozenset[str] | None  # keyword parameters it names; None = it takes **kwargs (every field)

    @classmethod
    def load(cls, spec: str) -> RewardFunction:
        module, sep, attr = spec.rpartition(":")
        if not sep or not module or not attr:
            raise LmforgeError(f"reward function {spec!r} is not 'module:function' or 'path/to/file.py:function'")
        fn = getattr(_import(module, spec), attr, None)
        if not callable(fn):
            raise LmforgeError(f"reward function {spec!r}: {module} has no function {attr!r}")
        params = list(inspect.signature(fn).parameters.values())
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return cls(spec, fn, None)
        return cls(spec, fn, frozenset(p.name for p in params[2:]))

    def __call__(self, row: PromptRow, completion: str) -> float | str:
        """The reward, or why there is none (a one-line description of the failure)."""
        kwargs = {k: v for k, v in row.fields.items() if self.fields is None or k in self.fields}
        try:
            value = self.fn(row.prompt, completion, **kwargs)
        except Exception as error:
            first = str(error).splitlines()[0] if str(error) else ""
            return f"raised {type(error).__name__}: {first}"
        if not isinstance(value, numbers.Real):
            return f"returned {value!r:.40} ({type(value).__name__}), not a number"
        if not math.isfinite(value):
            return f"returned {value}"
        return float(value)


class Rewards:
    """Every reward source of a run: user functions and an optional reward model, summed."""

    def __init__(self, functions: Sequence[RewardFunction], reward_model: tuple[nn.Module, Tokenizer] | None,
                 on_error: str) -> None:
        if not functions and reward_model is None:
            raise LmforgeError("GRPO needs a reward: set grpo.reward_functions (e.g. ['rewards:exact_match']) or grpo.reward_model")
        self.functions, self.reward_model, self.on_error = list(functions), reward_model, on_error

    @classmethod
    def from_config(cls, cfg: GrpoConfig, device: torch.device) -> Rewards:
        functions = [RewardFunction.load(spec) for spec in cfg.reward_functions]
        reward_model = None
        if cfg.reward_model:
            reward_model = (load_head_model(cfg.reward_model).to(device).eval(), Tokenizer.from_dir(cfg.reward_model))
        return cls(functions, reward_model, cfg.on_reward_error)

    def score(self, rows: Sequence[PromptRow], completions: Sequence[str]) -> tuple[Tensor, dict[str, float]]:
        """Rewards (N,) of each row's completion (NaN where a function failed and errors are skipped),
        and statistics: the mean of each source when there are several, and the count of failures."""
        columns: dict[str, list[float]] = {}
        errors = 0
        for function in self.functions:
            values = []
            for row, completion in zip(rows, completions):
                value = function(row, completion)
                if isinstance(value, str):
                    errors += 1
                    value = self._failed(function.name, value, row)
                values.append(value)
            columns[function.name] = values
        if self.reward_model is not None:
            model, tokenizer = self.reward_model
            columns["reward_model"] = score_texts(model, tokenizer, [r.prompt for r in rows], completions)
        total = torch.tensor(list(columns.values()), dtype=torch.float64).sum(0)  # (N,)
        stats = {"reward_errors": float(errors)}
        if len(columns) > 1:
            stats.update({f"reward_{name.rpartition(':')[2]}": float(np.nanmean(v)) for name, v in columns.items()})
        return total, stats

    def _failed(self, name: str, problem: str, row: PromptRow) -> float:
        prompt = row.prompt if isinstance(row.prompt, str) else row.prompt[-1]["content"]
        message = f"reward function {name} {problem} on the prompt at {row.where} ({prompt!r:.50})"
        if self.on_error == "stop":
            raise LmforgeError(f"{message}; fix the function, or set grpo.on_reward_error skip to leave such prompts out")
        log.warning("%s; leaving this prompt's group out of the step", message)
        return math.nan


# ---------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """A batch of sampled sequences with what training needs from the moment they were sampled."""

    prompts: list[list[int]]  # per sequence: prompt ids (as the engine fit them into the context)
    completions: list[list[int]]  # per sequence: sampled ids, the stop token included when chosen
    advantages: list[float]  # per sequence; NaN for a group left out (a reward function failed)
    stats: dict[str, float]  # reward_mean, reward_std, completion_len, ... (logged with every micro-batch)
    old_logps: list[list[float]] | None = None  # per completion token, under the sampling policy
    ref_logps: list[list[float]] | None = None  # per completion token, under the reference

    def batch(self, rows: slice, pad_id: int) -> dict[str, Tensor]:
        """Micro-batch of sequences `rows`: `pack_rows` plus advantages, per-token log-probs and stats."""
        batch = pack_rows(self.prompts[rows], self.completions[rows], pad_id)
        advantages = torch.tensor(self.advantages[rows], dtype=torch.float32)  # (B,)
        left_out = advantages.isnan()
        batch["labels"][left_out] = IGNORE_INDEX
        batch["advantages"] = advantages.nan_to_num(0.0)
        for key in ("old_logps", "ref_logps"):
            values = getattr(self, key)
            if values is not None:
                batch[key] = per_token(values[rows], batch["labels"], left_out)
        batch.update({f"stat_{k}": torch.tensor(v, dtype=torch.float64) for k, v in self.stats.items()})
        return batch

    def to_state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Rollout:
        """Inverse of `to_state` after a JSON round trip (which wrote NaN as null)."""
        nan = float("nan")
        state = {**state, "advantages": [nan if a is None else a for a in state["advantages"]],
                 "stats": {k: nan if v is None else v for k, v in state["stats"].items()}}
        return cls(**state)


def per_token(values: Sequence[list[float]], labels: Tensor, left_out: Tensor) -> Tensor:
    """Per-completion-token values placed on their label positions (B, T); 0 elsewhere."""
    out = torch.zeros(labels.shape, dtype=torch.float32)  # (B, T)
    for i, row in enumerate(values):
        if not left_out[i]:
            out[i, (labels[i] != IGNORE_INDEX).nonzero()[:, 0]] = torch.tensor(row, dtype=torch.float32)
    return out


def rollout_stats(rewards: Tensor, group_size: int, completions: Sequence[list[int]]) -> dict[str, float]:
    """Mean reward, the mean standard deviation within groups, and the mean completion length."""
    groups = rewards.view(-1, group_size)  # (P, G)
    kept = groups[~groups.isnan().any(-1)]
    return {"reward_mean": float(kept.mean()) if len(kept) else math.nan,
            "reward_std": float(kept.std(-1, correction=0).mean()) if len(kept) else math.nan,
            "completion_len": float(np.mean([len(c) for c in completions]))}


class RolloutLoader:
    """Micro-batches of on-policy rollouts; samples a new batch of them when the last is used up."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, rows: Sequence[PromptRow], rewards: Rewards,
                 cfg: GrpoConfig, train_cfg: TrainConfig, *, reference: nn.Module | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        n_seqs = cfg.prompts_per_rollout * cfg.group_size
        if n_seqs % train_cfg.batch_size:
            raise LmforgeError(f"grpo.prompts_per_rollout x grpo.group_size = {n_seqs} sequences do not split into "
                               f"micro-batches of train.batch_size {train_cfg.batch_size}; make it a divisor")
        self.n_micro = n_seqs // train_cfg.batch_size
        if self.n_micro % train_cfg.grad_accum:
            raise LmforgeError(f"train.grad_accum {train_cfg.grad_accum} does not divide the {self.n_micro} micro-batches "
                               "of a batch of rollouts; an optimizer step would span two of them")
        self.model, self.tokenizer, self.rows, self.rewards = model, tokenizer, list(rows), rewards
        self.cfg, self.batch_size, self.precision, self.seed = cfg, train_cfg.batch_size, train_cfg.precision, train_cfg.seed
        self.reference, self.rank, self.world_size = reference, rank, world_size
        self.pad_id = tokenizer.padding_id
        self.order = ShuffledOrder(len(self.rows), train_cfg.seed)
        self.rollouts_done = 0  # batches of rollouts sampled so far
        self.position = 0  # micro-batches handed out from the current buffer
        self.buffer: Rollout | None = None

    # ------------------------------------------------------------ the loader protocol

    def next_batch(self) -> dict[str, Tensor]:
        if self.buffer is None or self.position == self.n_micro * self.cfg.iterations:
            self.buffer = self._sample(self.rollouts_done)
            self.rollouts_done += 1
            self.position = 0
        first = (self.position % self.n_micro) * self.batch_size
        self.position += 1
        return self.buffer.batch(slice(first, first + self.batch_size), self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"rollouts_done": self.rollouts_done, "position": self.position, "n_prompts": len(self.rows),
                "shape": [self.cfg.prompts_per_rollout, self.cfg.group_size, self.batch_size, self.world_size],
                "buffer": None if self.buffer is None else self.buffer.to_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = (state.get("n_prompts"), state.get("shape"))
        current = (len(self.rows), [self.cfg.prompts_per_rollout, self.cfg.group_size, self.batch_size, self.world_size])
        if saved != current:
            raise LmforgeError(f"rollout state was saved with (prompts, [P, G, batch_size, processes]) = {saved} but this run "
                               f"has {current}; resume with the same data, grpo and batch settings")
        self.rollouts_done, self.position = int(state["rollouts_done"]), int(state["position"])
        self.buffer = None if state["buffer"] is None else Rollout.from_state(state["buffer"])

    # ------------------------------------------------------------ sampling

    def _sample(self, index: int) -> Rollout:
        """The `index`-th batch of rollouts: P prompts x G completions from the current policy, scored."""
        P, G = self.cfg.prompts_per_rollout, self.cfg.group_size
        picked = self.order.span(index * P * self.world_size, P * self.world_size)
        rows = [self.rows[i] for i in picked[self.rank * P : (self.rank + 1) * P] for _ in range(G)]
        seeds = np.random.SeedSequence([self.seed, index, self.rank]).generate_state(len(rows)).tolist()
        sampling = [SamplingParams(temperature=self.cfg.temperature, top_p=self.cfg.top_p, seed=s) for s in seeds]
        rollout = self._rollout(rows, sampling, G)
        rollout.old_logps = self._completion_logps(self.model, rollout)
        if self.cfg.kl_beta:
            if self.reference is not None:
                rollout.ref_logps = self._completion_logps(self.reference, rollout)
            else:
                with lora_disabled(self.model):
                    rollout.ref_logps = self._completion_logps(self.model, rollout)
        return rollout

    def _rollout(self, rows: Sequence[PromptRow], sampling: Sequence[SamplingParams], group_size: int) -> Rollout:
        """Generate one completion per row (groups of `group_size` consecutive rows), score and normalise."""
        tok, requests, stops = self.tokenizer, [], []
        for row, params in zip(rows, sampling):
            stop = stop_token(tok, row.prompt)
            stops.append(stop)
            requests.append(Request(encode_prompt(tok, row.prompt), self.cfg.max_new_tokens, params,
                                    frozenset() if stop is None else frozenset({stop}), truncate_left=True))
        with eval_mode(self.model):
            results = Engine(self.model, n_slots=min(len(requests), self.cfg.gen_slots)).generate(requests)
        completions = [r.tokens + ([s] if r.finish_reason == "stop" else []) for r, s in zip(results, stops)]
        texts = [tok.decode(r.tokens, skip_special_tokens=True) for r in results]
        rewards, stats = self.rewards.score(rows, texts)
        # a group of one has nothing to be compared with: advantage 0 (greedy evaluation)
        advantages = group_advantages(rewards, group_size) if group_size > 1 else torch.zeros_like(rewards)
        return Rollout(prompts=[r.prompt for r in requests], completions=completions, advantages=advantages.tolist(),
                       stats={**rollout_stats(rewards, group_size, completions), **stats})

    def _completion_logps(self, model: nn.Module, rollout: Rollout) -> list[list[float]]:
        """log p of every completion token under `model`, in the micro-batches training will use."""
        device = next(model.parameters()).device
        out: list[list[float]] = []
        with eval_mode(model), autocast_for(self.precision, device):
            for first in range(0, len(rollout.prompts), self.batch_size):
                rows = slice(first, first + self.batch_size)
                batch = pack_rows(rollout.prompts[rows], rollout.completions[rows], self.pad_id)
                labels = batch["labels"].to(device)
                logits = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
                logps = token_logps(logits, labels).float().cpu()  # (B, T)
                out += [lp[lab != IGNORE_INDEX].tolist() for lp, lab in zip(logps, labels.cpu())]
        return out

    def eval_batches(self, rows: Sequence[PromptRow]) -> Iterator[dict[str, Tensor]]:
        """Greedy completions of `rows`, scored, as micro-batches whose stats the objective logs."""
        greedy = [SamplingParams(temperature=0.0)] * len(rows)
        rollout = self._rollout(rows, greedy, 1)
        for first in range(0, len(rows), self.batch_size):
            yield rollout.batch(slice(first, first + self.batch_size), self.pad_id)


# ---------------------------------------------------------------- reward curve


def plot_rewards(path: Path, train: Sequence[Sequence[float]], evals: Sequence[Sequence[float]]) -> None:
    """Mean reward of the rollouts and of greedy held-out completions against step, into the PNG `path`."""
    plot_curves(path, [(train, "-", "rollouts (sampled)"), (evals, "o-", "held-out prompts (greedy)")],
                ylabel="mean reward", title="GRPO reward")


class RewardPlot(Callback):
    """Redraws `reward.png` from the run's metrics.jsonl at every checkpoint."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def on_save(self, step: int, path: Path) -> None:
        metrics = self.out_dir / "metrics.jsonl"
        records = read_metrics(metrics) if metrics.is_file() else []

        def curve(kind: str, key: str) -> list[list[float]]:
            return [[r["step"], r[key]] for r in records if r["kind"] == kind and r.get(key) is not None]

        plot_rewards(self.out_dir / "reward.png", curve("train", "reward_mean"), curve("eval", "eval_reward_mean"))


# ---------------------------------------------------------------- the run


GRPO_SECTIONS: dict[str, type] = {"finetune": setup.FinetuneConfig, "data": PreferenceDataConfig, "grpo": GrpoConfig,
                                  "train": TrainConfig, "lora": LoraConfig}


def run_grpo(recipe: dict[str, Any], *, progress: bool = False, report: setup.Report | None = None,
             callbacks: Sequence[Callback] = ()) -> setup.RunResult:
    """Train (or resume) the GRPO run a recipe describes."""
    ft, data, cfg, train_cfg, lora = setup.read_recipe(recipe, GRPO_SECTIONS)
    out_dir = setup.out_dir_of(recipe, "grpo")
    run = setup.Run(out_dir, train_cfg, init_distributed(), progress, [*callbacks, RewardPlot(out_dir)], ft.merge)
    run.require_unsharded("grpo samples its rollouts with the generation engine")
    rewards = Rewards.from_config(cfg, run.info.device)  # a bad function path fails before the model loads
    model, tokenizer = setup.load_base(ft)
    data.require_train('a JSONL file of {"prompt": ...} rows')
    data.validate()
    rows = read_prompt_rows(data.train)
    rows, eval_rows = (rows, read_prompt_rows(data.eval)) if data.eval else holdout(rows, data.eval_fraction, train_cfg.seed)
    if report:
        report(f"{data.train}: {len(rows)} training prompts, {len(eval_rows)} held out")
    model.to(run.info.device)
    io = setup.RunIO(tokenizer, setup.apply_adapters(model, lora, train_cfg.seed), ft.base)
    reference = None
    if cfg.kl_beta and io.lora is None:
        reference = copy.deepcopy(model).requires_grad_(False)
    loader = RolloutLoader(model, tokenizer, rows, rewards, cfg, train_cfg, reference=reference,
                           rank=run.info.rank, world_size=run.info.world_size)
    evals = (lambda: loader.eval_batches(eval_rows)) if eval_rows else None
    return setup.RunResult(run.fit(model, grpo(clip_eps=cfg.clip_eps, kl_beta=cfg.kl_beta), io, loader, evals))
