"""Alignment from preference pairs: reward models (`lmforge reward`) and DPO (`lmforge dpo`).

Each verb turns a recipe into the pieces of the one training loop through `train/setup.py`:
the base from `finetune.base` (optionally with LoRA), a `RowLoader` over the encoded preference
pairs (`pair_batch` stacks the chosen rows above the rejected ones), held-out pairs for
evaluation, and an objective from `objectives.py`. GRPO (train/grpo.py) shares the setup too.

Design choices:
- Recipe sections: `finetune`, `data` (PreferenceDataConfig), `head` (reward only), `dpo` (DPO
  only), `train`, `lora`, and `out_dir`.
- The reward model is `RewardModel(backbone)`: a scalar read at the last non-pad token of a
  decoder (an encoder pools as its kind does), trained with the Bradley-Terry loss; the
  held-out pairwise accuracy is logged as `eval_accuracy`. With LoRA its `score` layer is trained
  in full beside the adapters. `evaluate.scoring.score_texts` (and `LM.score`) reads it back.
- DPO's reference is never a second model when it can be avoided: with LoRA it is the policy
  itself with its adapters disabled (`lora_disabled`); with `dpo.precompute_ref` its log-probs
  are computed once, before training, by the initial model and carried by the pairs (so no copy
  either, and every step saves a forward pass); only full fine-tuning without precomputation
  keeps a frozen deep copy. Reference passes run in eval mode (no dropout). All three see the
  initial weights, also when resuming, since the loop loads a checkpoint only after these
  pieces are built.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import Tensor, nn

from lmforge.data.preference import (
    EncodedPair,
    PreferenceDataConfig,
    encode_pairs,
    pair_batch,
    read_preference_pairs,
)
from lmforge.data.rows import context_length, holdout
from lmforge.errors import LmforgeError
from lmforge.evaluate.logprobs import eval_mode, pair_logps, sequence_logps
from lmforge.models.heads import RewardModel
from lmforge.tokenizer import Tokenizer
from lmforge.train import setup
from lmforge.train.distributed import init_distributed, unwrap_model
from lmforge.train.loop import TrainConfig
from lmforge.train.lora import LoraConfig, lora_disabled
from lmforge.train.objectives import DPO_LOSSES, Reference, dpo, reward_model_loss
from lmforge.train.report import Callback

log = logging.getLogger(__name__)


@dataclass
class DpoConfig:
    """Direct preference optimisation; every field is a YAML key and a `--dpo.key` flag."""

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


REWARD_SECTIONS: dict[str, type] = {"finetune": setup.FinetuneConfig, "data": PreferenceDataConfig,
                                    "head": setup.HeadConfig, "train": TrainConfig, "lora": LoraConfig}
DPO_SECTIONS: dict[str, type] = {"finetune": setup.FinetuneConfig, "data": PreferenceDataConfig, "dpo": DpoConfig,
                                 "train": TrainConfig, "lora": LoraConfig}


# ---------------------------------------------------------------- data


def _read_pairs(path: str, tokenizer: Tokenizer, seq_len: int, report: setup.Report) -> list[EncodedPair]:
    pairs, stats = read_preference_pairs(path)
    encoded = encode_pairs(tokenizer, pairs, seq_len, stats)
    log.info("%s", stats.summary())
    report(stats.summary())
    return encoded


def preference_data(data: PreferenceDataConfig, tokenizer: Tokenizer, max_seq_len: int, seed: int,
                    report: setup.Report) -> tuple[list[EncodedPair], list[EncodedPair]]:
    """(train, held-out) encoded pairs: the eval file's, or a seeded eval_fraction of the train file."""
    data.validate()
    seq_len = context_length(data.seq_len, max_seq_len)
    pairs = _read_pairs(data.train, tokenizer, seq_len, report)
    if data.eval:
        return pairs, _read_pairs(data.eval, tokenizer, seq_len, report)
    return holdout(pairs, data.eval_fraction, seed)


def with_reference(pairs: Sequence[EncodedPair], logps: Tensor) -> list[EncodedPair]:
    """The pairs carrying their reference log-probs (N, 2), for `dpo.precompute_ref`."""
    return [dataclasses.replace(p, ref_logps=(float(c), float(r))) for p, (c, r) in zip(pairs, logps.tolist())]


# ---------------------------------------------------------------- DPO references


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
    """Reference log-probs carried by the batch (`dpo.precompute_ref`)."""
    return batch["ref_logps"]


# ---------------------------------------------------------------- the runs


def _quiet(line: str) -> None:
    """The default report: nothing (library code never prints)."""


def run_reward(recipe: dict[str, Any], *, progress: bool = False, report: setup.Report | None = None,
               callbacks: Sequence[Callback] = ()) -> setup.RunResult:
    """Train (or resume) the reward model a recipe describes: Bradley-Terry on preference pairs."""
    ft, data, head, cfg, lora = setup.read_recipe(recipe, REWARD_SECTIONS)
    backbone, tokenizer = setup.load_base(ft, init_distributed(), cfg.parallel)
    pairs, eval_pairs = preference_data(data, tokenizer, backbone.config.max_seq_len, cfg.seed, report or _quiet)
    with setup.seeded(cfg.seed):
        model = RewardModel(backbone, head.pooling or None)
    io = setup.RunIO(tokenizer, setup.apply_adapters(model, lora, cfg.seed, ["score"]), ft.base)
    run = setup.Run(setup.out_dir_of(recipe, "reward"), cfg, init_distributed(), progress, callbacks, ft.merge)
    collate = partial(pair_batch, pad_id=tokenizer.padding_id)
    return setup.RunResult(run.fit_rows(model, reward_model_loss, io, pairs, eval_pairs, collate))


def run_dpo(recipe: dict[str, Any], *, progress: bool = False, report: setup.Report | None = None,
            callbacks: Sequence[Callback] = ()) -> setup.RunResult:
    """Train (or resume) the DPO run a recipe describes."""
    ft, data, dpo_cfg, cfg, lora = setup.read_recipe(recipe, DPO_SECTIONS)
    model, tokenizer = setup.load_base(ft)
    pairs, eval_pairs = preference_data(data, tokenizer, model.config.max_seq_len, cfg.seed, report or _quiet)
    run = setup.Run(setup.out_dir_of(recipe, "dpo"), cfg, init_distributed(), progress, callbacks, ft.merge)
    model.to(run.info.device)
    io = setup.RunIO(tokenizer, setup.apply_adapters(model, lora, cfg.seed), ft.base)
    pad = tokenizer.padding_id
    if dpo_cfg.precompute_ref:
        with lora_disabled(model):  # the initial model: the same weights with or without (zero) adapters
            pairs = with_reference(pairs, pair_logps(model, pairs, cfg.batch_size, pad))
            if eval_pairs:
                eval_pairs = with_reference(eval_pairs, pair_logps(model, eval_pairs, cfg.batch_size, pad))
        reference: Reference = precomputed_reference
    elif io.lora is not None:
        reference = adapter_reference
    else:
        reference = frozen_reference(copy.deepcopy(model))
    objective = dpo(reference, beta=dpo_cfg.beta, loss=dpo_cfg.loss, label_smoothing=dpo_cfg.label_smoothing)
    return setup.RunResult(run.fit_rows(model, objective, io, pairs, eval_pairs, partial(pair_batch, pad_id=pad)))


__all__ = ["DPO_SECTIONS", "REWARD_SECTIONS", "DpoConfig", "preference_data", "run_dpo", "run_reward"]
