"""Alignment from preference pairs: reward models (`lmforge reward`) and DPO (`lmforge dpo`).

Each verb turns a recipe into the pieces of the one training loop: a model started from
`<verb>.base` (an lmforge run or a Hugging Face folder), optionally with LoRA, a `PairLoader`
over the preference pairs, held-out pairs for evaluation, an objective from `objectives.py`,
and the functions that write and read its checkpoints. GRPO (train/grpo.py) shares the
model, LoRA and checkpoint pieces.

Design choices:
- Recipe sections: `data` (AlignDataConfig, shared by the three verbs), `train` (TrainConfig),
  `lora` (LoraConfig; rank 0 = full fine-tuning) and one section named after the verb.
- The reward model is `RewardModel(backbone)`: a scalar read at the last non-pad token of a
  decoder (an encoder pools as its kind does), trained with the Bradley-Terry loss; the
  held-out pairwise accuracy is logged as `eval_accuracy`. With LoRA its `score` layer is trained
  in full beside the adapters. `score_texts` (and `LM.score`) reads it back as a reward.
- DPO's reference is never a second model when it can be avoided: with LoRA it is the policy
  itself with its adapters disabled (`lora_disabled`); with `dpo.precompute_ref` its log-probs
  are computed once, before training, by the initial model (so no copy either, and every step
  saves a forward pass); only full fine-tuning without precomputation keeps a frozen deep copy.
  Reference passes run in eval mode (no dropout). All three see the initial weights, also when
  resuming, since the loop loads a checkpoint only after these pieces are built.
- Checkpoints stay loadable by `lmforge.load` whatever the training: a LoRA run writes the model
  files with the adapters folded in (`merged_lora`, which swaps merged copies of the adapted
  layers in for the save only) and `adapter.safetensors` beside them; resuming reads the adapters
  back, the base weights coming from `base` again.
- Library functions report through `report(line)` (the CLI passes `print`), e.g. how many rows
  of a preference file were skipped and why; they never print.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.checkpoint import load_model
from lmforge.checkpoint.io import assign_state, read_tensors
from lmforge.data.preference import (
    EncodedPair,
    PairLoader,
    Prompt,
    encode_pairs,
    encode_reply,
    fit_lengths,
    hold_out,
    iter_pair_batches,
    pack_rows,
    read_preference_pairs,
)
from lmforge.errors import LmforgeError
from lmforge.models.cpu_ops import Linear
from lmforge.models.heads import HEAD_WEIGHTS, PooledHead, RewardModel
from lmforge.models.surgery import dense_weight, swap_module
from lmforge.recipes import build
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpointing import ModelIO, load_model_weights
from lmforge.train.distributed import init_distributed, unwrap_model
from lmforge.train.finetune import load_adapter_weights, pad_id_of, save_model_files
from lmforge.train.loop import Objective, TrainConfig, TrainResult, train
from lmforge.train.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    lora_disabled,
    save_adapter,
)
from lmforge.train.objectives import DPO_LOSSES, Reference, dpo, reward_model_loss, sequence_logps
from lmforge.train.report import Callback, ProgressBar

log = logging.getLogger(__name__)

Report = Callable[[str], None]

__all__ = [
    "AlignDataConfig",
    "DpoConfig",
    "RewardConfig",
    "checkpoint_io",
    "eval_mode",
    "load_base",
    "merged_lora",
    "pair_logps",
    "score_texts",
    "seeded",
    "train_dpo",
    "train_reward",
]


# ---------------------------------------------------------------- config


@dataclass
class AlignDataConfig:
    """Where alignment data comes from; every field is a YAML key and a `--data.key` flag."""

    train_file: str = ""  # JSONL: preference pairs (reward, dpo) or {"prompt": ...} rows (grpo)
    val_file: str = ""  # held-out rows for evaluation; empty = hold out val_fraction of train_file
    val_fraction: float = 0.05  # share of train_file held out when val_file is empty; 0 = no evaluation
    max_len: int = 0  # preference pairs: tokens of prompt + reply at most; 0 = the model's max_seq_len


@dataclass
class RewardConfig:
    """The reward model; every field is a YAML key and a `--reward.key` flag."""

    base: str = ""  # model folder to start from (an lmforge run or a Hugging Face folder)
    pooling: str = ""  # token read for the score: "" = the kind's default (last non-pad for decoders), last, mean or cls


@dataclass
class DpoConfig:
    """Direct preference optimisation; every field is a YAML key and a `--dpo.key` flag."""

    base: str = ""  # model folder to start from (usually an SFT run); also the reference model
    beta: float = 0.1  # strength of the KL regularisation towards the reference (DPO's beta)
    loss: str = "sigmoid"  # "sigmoid" (DPO) or "ipo"
    label_smoothing: float = 0.0  # assumed share of flipped labels (conservative DPO); 0 = plain DPO
    precompute_ref: bool = False  # compute the reference log-probs once before training (no reference model during it)

    def __post_init__(self) -> None:
        if self.loss not in DPO_LOSSES:
            raise LmforgeError(f"dpo.loss must be one of {', '.join(DPO_LOSSES)}; got {self.loss!r}")
        if self.beta <= 0:
            raise LmforgeError(f"dpo.beta must be > 0; got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise LmforgeError(f"dpo.label_smoothing must be in [0, 0.5); got {self.label_smoothing}")


REWARD_SECTIONS: dict[str, type] = {"reward": RewardConfig, "data": AlignDataConfig, "lora": LoraConfig, "train": TrainConfig}
DPO_SECTIONS: dict[str, type] = {"dpo": DpoConfig, "data": AlignDataConfig, "lora": LoraConfig, "train": TrainConfig}


# ---------------------------------------------------------------- models and checkpoints


def load_base(folder: str, section: str) -> tuple[nn.Module, Tokenizer]:
    """The model and tokenizer a run starts from."""
    if not folder:
        raise LmforgeError(f"{section}.base is not set; pass the model folder to start from (--{section}.base runs/sft)")
    model, _ = load_model(folder)
    if not (Path(folder) / "tokenizer.json").is_file():
        raise LmforgeError(f"{folder} has no tokenizer.json; alignment reads text, so the model folder needs its tokenizer")
    return model, Tokenizer.from_dir(folder)


def _merged_copy(layer: LoraLinear) -> nn.Linear:
    """A plain linear layer computing what `layer` computes, adapters folded in; `layer` is untouched."""
    base, weight = layer.base, dense_weight(layer.base).detach()
    plain = Linear(base.in_features, base.out_features, bias=base.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(weight + layer.delta().to(weight.dtype))
        if base.bias is not None:
            plain.bias.copy_(base.bias)
    return plain


@contextlib.contextmanager
def merged_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every LoraLinear of `model` is replaced by a merged plain copy (for saving).

    Unlike `merge_lora`, the adapters and base weights are left exactly as they were afterwards,
    so training continues (and resumes) bit for bit.
    """
    adapted = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]
    for name, layer in adapted:
        swap_module(model, name, _merged_copy(layer))
    try:
        yield model
    finally:
        for name, layer in adapted:
            swap_module(model, name, layer)


def checkpoint_io(tokenizer: Tokenizer, lora: LoraConfig, base: str) -> tuple[ModelIO, ModelIO]:
    """(save_model, load_model) for the loop: plain or head model files (+ adapters under LoRA)."""

    def save(model: nn.Module, folder: Path) -> None:
        with merged_lora(model):
            save_model_files(model, folder)
        tokenizer.save(folder)
        if lora.rank:
            save_adapter(model, lora, folder, base_model=base)

    def load(model: nn.Module, folder: Path) -> None:
        if lora.rank:
            load_adapter_weights(model, lora, folder)
        elif isinstance(model, PooledHead):
            load_model_weights(model.backbone, folder)
            head = read_tensors(folder / HEAD_WEIGHTS)
            assign_state(model.score, {k.removeprefix("score."): v for k, v in head.items()}, folder / HEAD_WEIGHTS)
        else:
            load_model_weights(model, folder)

    return save, load


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model is in eval mode (no dropout) and builds no graph."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- data


def _read_pairs(path: str, tokenizer: Tokenizer, max_len: int, report: Report) -> list[EncodedPair]:
    pairs, stats = read_preference_pairs(path)
    encoded = encode_pairs(tokenizer, pairs, max_len, stats)
    log.info("%s", stats.summary())
    report(stats.summary())
    return encoded


def preference_data(data: AlignDataConfig, tokenizer: Tokenizer, max_len: int, seed: int,
                    report: Report) -> tuple[list[EncodedPair], list[EncodedPair]]:
    """(train, held-out) encoded pairs: the val file's, or a seeded val_fraction of the train file."""
    if not data.train_file:
        raise LmforgeError("data.train_file is not set; pass a JSONL file of preference pairs (--data.train_file FILE)")
    pairs = _read_pairs(data.train_file, tokenizer, max_len, report)
    if data.val_file:
        return pairs, _read_pairs(data.val_file, tokenizer, max_len, report)
    return hold_out(pairs, data.val_fraction, seed)


def pair_logps(model: nn.Module, pairs: Sequence[EncodedPair], batch_size: int, pad_id: int) -> Tensor:
    """log p(reply | prompt) of every pair's chosen and rejected reply (N, 2), in eval mode."""
    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for batch in iter_pair_batches(pairs, batch_size, pad_id):
            logps = sequence_logps(model, {k: v.to(device) for k, v in batch.items()}).float().cpu()  # (2b,)
            out.append(torch.stack(logps.chunk(2), dim=1))  # (b, 2)
    return torch.cat(out)


# ---------------------------------------------------------------- scoring


def score_texts(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[Prompt], responses: Sequence[str],
                batch_size: int = 16) -> list[float]:
    """A reward model's score for each (prompt, response), encoded as the reward model was trained."""
    if not isinstance(model, RewardModel):
        raise LmforgeError("this model has no reward head; scoring needs a folder written by `lmforge reward`")
    device, max_len = next(model.parameters()).device, model.config.max_seq_len
    encoded = [encode_reply(tokenizer, p, r) for p, r in zip(prompts, responses)]
    rows = [fit_lengths(prompt, [reply], max_len) for prompt, reply in encoded]  # (prompt, [reply], cut)
    scores: list[float] = []
    with eval_mode(model):
        for first in range(0, len(rows), batch_size):
            chunk = rows[first : first + batch_size]
            batch = pack_rows([p for p, _, _ in chunk], [r[0] for _, r, _ in chunk], pad_id_of(tokenizer))
            scores += model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).float().tolist()
    return scores


# ---------------------------------------------------------------- the runs


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Within the block torch draws from a generator seeded with `seed`; the global state is restored after.

    New layers (LoRA's A, a reward head) are then initialised the same way in every run.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def adapted_model(model: nn.Module, lora: LoraConfig, train_modules: Sequence[str] = ()) -> LoraConfig:
    """Apply LoRA when lora.rank > 0, training `train_modules` in full too; returns the config used."""
    extra = [m for m in train_modules if m not in lora.train_modules]
    lora = dataclasses.replace(lora, train_modules=[*lora.train_modules, *extra])
    apply_lora(model, lora)
    return lora


@dataclass
class Setup:
    """The sections of an alignment recipe: the verb's own (`method`) and the shared ones."""

    method: Any  # RewardConfig, DpoConfig or GrpoConfig
    train: TrainConfig
    data: AlignDataConfig
    lora: LoraConfig
    out_dir: Path


def read_setup(recipe: dict[str, Any], section: str, cls: type) -> Setup:
    """Every section of an alignment recipe, checked; out_dir defaults to runs/<section>."""
    return Setup(build(cls, recipe.get(section), section), build(TrainConfig, recipe.get("train"), "train"),
                 build(AlignDataConfig, recipe.get("data"), "data"), build(LoraConfig, recipe.get("lora"), "lora"),
                 Path(recipe.get("out_dir") or f"runs/{section}"))


def run_loop(model: nn.Module, objective: Objective, loader: Any, setup: Setup, *, tokenizer: Tokenizer,
             make_eval_batches: Callable[[], Any] | None, progress: bool, callbacks: Sequence[Callback] = (),
             dist_info: Any = None) -> TrainResult:
    """The one loop with this verb's checkpoint functions and, if asked, a progress bar."""
    save_model, load_model_fn = checkpoint_io(tokenizer, setup.lora, setup.method.base)
    cbs = [*callbacks, *([ProgressBar(setup.train.steps)] if progress else [])]
    return train(model, objective, loader, setup.train, setup.out_dir, make_eval_batches=make_eval_batches,
                 save_model=save_model, load_model=load_model_fn, callbacks=cbs, dist_info=dist_info)


def _pair_run(recipe: dict[str, Any], section: str, cls: type, report: Report | None
              ) -> tuple[Setup, nn.Module, Tokenizer, list[EncodedPair], list[EncodedPair]]:
    """Recipe, base model, tokenizer, and train / held-out pairs of a preference verb."""
    setup = read_setup(recipe, section, cls)
    model, tokenizer = load_base(setup.method.base, section)
    max_len = setup.data.max_len or model.config.max_seq_len
    train_pairs, val_pairs = preference_data(setup.data, tokenizer, max_len, setup.train.seed, report or _quiet)
    return setup, model, tokenizer, train_pairs, val_pairs


def _quiet(line: str) -> None:
    """The default report: nothing (library code never prints)."""


def train_reward(recipe: dict[str, Any], *, progress: bool = False, report: Report | None = None,
                 callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train (or resume) the reward model a recipe describes: Bradley-Terry on preference pairs."""
    setup, backbone, tokenizer, train_pairs, val_pairs = _pair_run(recipe, "reward", RewardConfig, report)
    with seeded(setup.train.seed):
        model = RewardModel(backbone, setup.method.pooling or None)
        setup.lora = adapted_model(model, setup.lora, ["score"] if setup.lora.rank else [])
    info = init_distributed()
    pad = pad_id_of(tokenizer)
    loader = PairLoader(train_pairs, setup.train.batch_size, pad, seed=setup.train.seed, rank=info.rank,
                        world_size=info.world_size)
    evals = (lambda: iter_pair_batches(val_pairs, setup.train.batch_size, pad)) if val_pairs else None
    return run_loop(model, reward_model_loss, loader, setup, tokenizer=tokenizer, make_eval_batches=evals,
                    progress=progress, callbacks=callbacks, dist_info=info)


def adapter_reference(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Reference log-probs from the policy itself with its LoRA adapters turned off (no second copy)."""
    base = unwrap_model(model)
    with eval_mode(base), lora_disabled(base):
        return sequence_logps(base, batch)


def frozen_reference(reference: nn.Module) -> Reference:
    """Reference log-probs from a separate frozen model."""
    reference.requires_grad_(False)

    def ref(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        with eval_mode(reference):
            return sequence_logps(reference, batch)

    return ref


def precomputed_reference(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Reference log-probs stored in the batch by the loader (`dpo.precompute_ref`)."""
    return batch["ref_logps"]


def train_dpo(recipe: dict[str, Any], *, progress: bool = False, report: Report | None = None,
              callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train (or resume) the DPO run a recipe describes."""
    setup, model, tokenizer, train_pairs, val_pairs = _pair_run(recipe, "dpo", DpoConfig, report)
    cfg = setup.method
    info = init_distributed()
    model.to(info.device)
    with seeded(setup.train.seed):
        setup.lora = adapted_model(model, setup.lora)
    pad, batch_size = pad_id_of(tokenizer), setup.train.batch_size
    train_ref = val_ref = None
    if cfg.precompute_ref:
        with lora_disabled(model):  # the initial model: the same weights with or without (zero) adapters
            train_ref = pair_logps(model, train_pairs, batch_size, pad)
            val_ref = pair_logps(model, val_pairs, batch_size, pad) if val_pairs else None
        reference: Reference = precomputed_reference
    elif setup.lora.rank:
        reference = adapter_reference
    else:
        reference = frozen_reference(copy.deepcopy(model))
    objective = dpo(reference, beta=cfg.beta, loss=cfg.loss, label_smoothing=cfg.label_smoothing)
    loader = PairLoader(train_pairs, batch_size, pad, seed=setup.train.seed, rank=info.rank,
                        world_size=info.world_size, ref_logps=train_ref)
    evals = (lambda: iter_pair_batches(val_pairs, batch_size, pad, val_ref)) if val_pairs else None
    return run_loop(model, objective, loader, setup, tokenizer=tokenizer, make_eval_batches=evals,
                    progress=progress, callbacks=callbacks, dist_info=info)
