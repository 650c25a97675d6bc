"""The one setup every training verb shares: recipe, base model, LoRA, seeding, checkpoints, the loop.

Each verb (`run_pretrain`, `run_sft`, `run_classify`, `run_reward`, `run_dpo`, `run_grpo`) is
`(recipe, *, progress, report, callbacks) -> RunResult` and differs only in its data, its
objective and its model wrapper; everything else is here, written once.

Design choices:
- **One recipe vocabulary.** A recipe is a mapping of sections (`finetune`, `data`, `head`,
  `train`, `lora`, the verb's own) plus `out_dir`; each section becomes its dataclass through
  `config.build`, so an unknown key fails the same way in every verb. The fine-tuning verbs
  share `finetune.base` / `finetune.merge`, `data.train` / `data.eval` / `data.eval_fraction` /
  `data.seq_len` and `head.pooling`. Keys of earlier releases (`data.train_file`, `dpo.base`,
  ...; `RENAMED_KEYS`) still work for one release, with a one-line warning naming the new key.
- **One LoRA on-disk policy.** A checkpoint of a LoRA run holds the adapter
  (`adapter.safetensors`, `adapter_config.json` naming the base; `head.json` for a head model)
  and the tokenizer, never a copy of the base. Resuming rebuilds the base from
  `finetune.base`, applies LoRA and loads the adapter; the loop restores the optimizer, data
  position and RNG states, so the run continues bit for bit. At the end, `finetune.merge` (on by
  default) writes the merged model beside the adapter, so `lmforge.load(out_dir)` needs no base;
  an adapter-only folder opens too (`merged_model` loads its recorded base).
- **Work after training sees the whole model.** The merged export and a verb's final scores run
  on the main rank on `Run.trained_model`: under `train.parallel fsdp` the model is sharded, so
  every rank takes part in gathering it (`sharded.full_model_on_main`) and rank 0 alone uses it.
- **One seeding rule.** Parts the setup creates (a head's `score` layer, LoRA's A matrices, a
  pretrained model's initial weights) are drawn inside `seeded(train.seed)`, from a generator
  forked off the global one: the same in every run and on every rank, so a resumed run rebuilds
  the same model before loading its checkpoint. The loop seeds its own randomness.
- Library code never prints: `report(line)` receives what became of the data (the CLI passes
  `print`); `RunResult.summary()` is the one line every verb ends with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.checkpoint import load_model, save_hf, save_native
from lmforge.checkpoint.heads import (
    load_head_weights,
    read_head_record,
    save_head_model,
    write_head_record,
)
from lmforge.checkpoint.io import load_checked, read_tensors
from lmforge.config import ModelConfig, build
from lmforge.data.rows import Collate, RowLoader, iter_row_batches
from lmforge.errors import LmforgeError
from lmforge.evaluate.classification import ClassificationReport
from lmforge.models import build_model
from lmforge.models.heads import PooledHead, build_head
from lmforge.quantize import dequantize_model, quantize_model, quantized_layers
from lmforge.quantize.linear import check_settings
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpointing import load_model_weights
from lmforge.train.distributed import DistInfo, gather_json, meta_copy, shards_on_start
from lmforge.train.loop import Loader, Objective, TrainConfig, TrainResult, train
from lmforge.train.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraConfig,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    read_adapter_config,
    save_adapter,
)
from lmforge.train.report import Callback, ProgressBar
from lmforge.train.sharded import full_model_on_main

log = logging.getLogger(__name__)

Report = Callable[[str], None]
RENAMED_KEYS: dict[tuple[str, str], tuple[str, str]] = {  # (section, key) of earlier releases -> today's
    ("data", "train_file"): ("data", "train"),
    ("data", "val_file"): ("data", "eval"),
    ("data", "val_fraction"): ("data", "eval_fraction"),
    ("data", "max_len"): ("data", "seq_len"),
    ("reward", "base"): ("finetune", "base"),
    ("reward", "pooling"): ("head", "pooling"),
    ("dpo", "base"): ("finetune", "base"),
    ("grpo", "base"): ("finetune", "base"),
}


# ---------------------------------------------------------------- recipe sections


@dataclass
class FinetuneConfig:
    """The model a run starts from; the `finetune:` section of every fine-tuning recipe."""

    base: str = ""  # model to start from: an lmforge run folder or a Hugging Face folder, with its tokenizer.json
    merge: bool = True  # with LoRA: also write the merged model into out_dir at the end (the adapter is always saved)
    bits: int = 0  # QLoRA: quantize the frozen base to 8 or 4 bits and train LoRA adapters on it (needs lora.rank); 0 = float base
    group_size: int = 64  # with bits 4: input weights per quantization group (32, 64 or 128; must divide every layer's width)


@dataclass
class HeadConfig:
    """The task head; the `head:` section of classify and reward recipes."""

    pooling: str = ""  # "last" (last non-pad token), "cls" ([CLS], through BERT's pooler when present) or "mean"; "" = last for decoders, cls or mean for encoders


def renamed(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe with keys of earlier releases moved to today's names, each with a one-line warning."""
    out = {name: dict(value) if isinstance(value, Mapping) else value for name, value in recipe.items()}
    for (old_section, old_key), (section, key) in RENAMED_KEYS.items():
        values = out.get(old_section)
        if not isinstance(values, dict) or old_key not in values:
            continue
        log.warning("recipe key %s.%s is deprecated; use %s.%s", old_section, old_key, section, key)
        value = values.pop(old_key)
        if not values and old_section != section:
            del out[old_section]
        if out.get(section) is None:  # absent, or an empty YAML section
            out[section] = {}
        out[section].setdefault(key, value)  # the new name wins when both are given
    return out


def read_recipe(recipe: Mapping[str, Any], sections: Mapping[str, type]) -> list[Any]:
    """Each section of the recipe as its dataclass, in the order of `sections`; unknown sections fail in one line.

    A `model` section (ModelConfig) comes back as its mapping: pretraining completes it with the
    tokenizer's sizes and an optional preset (`config.model_config`).
    """
    recipe = renamed(recipe)
    unknown = sorted(set(recipe) - set(sections) - {"out_dir"})
    if unknown:
        raise LmforgeError(f"the recipe has unknown sections {unknown}; this verb reads {', '.join(sections)} and out_dir")
    return [dict(recipe.get(name) or {}) if cls is ModelConfig else build(cls, recipe.get(name), name)
            for name, cls in sections.items()]


def out_dir_of(recipe: Mapping[str, Any], verb: str) -> Path:
    """The run folder: the recipe's `out_dir`, else runs/<verb>."""
    return Path(recipe.get("out_dir") or f"runs/{verb}")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Within the block torch draws from a generator seeded with `seed`; the global state is restored after."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------- base model and LoRA


def load_base(cfg: FinetuneConfig, info: DistInfo | None = None, parallel: str = "ddp") -> tuple[nn.Module, Tokenizer]:
    """The model and tokenizer of `finetune.base`: an lmforge run folder or a Hugging Face folder.

    Given the run's `info` and `train.parallel`, a sharded run (fsdp, several processes) reads the
    weights on the main rank only (`base_on_main`); a quantized base (`finetune.bits`) is read by every rank.
    """
    if not cfg.base:
        raise LmforgeError("finetune.base is not set; pass --finetune.base MODEL_FOLDER (an lmforge run or a Hugging Face folder)")
    if cfg.bits:
        check_settings(cfg.bits, cfg.group_size)
    on_main = info is not None and shards_on_start(info, parallel) and not cfg.bits
    model = base_on_main(cfg.base, info) if on_main else load_model(cfg.base)[0]
    if not (Path(cfg.base) / "tokenizer.json").is_file():
        raise LmforgeError(f"{cfg.base} has no tokenizer.json; fine-tuning reads text, so the model folder needs its tokenizer")
    if cfg.bits:
        quantize_model(model, cfg.bits, cfg.group_size)
    return model, Tokenizer.from_dir(cfg.base)


def base_on_main(base: str | Path, info: DistInfo) -> nn.Module:
    """The model in `base`, read from disk by the main rank only: the others build the architecture the
    main rank read (its config, sent to them) on the meta device, for `shard_model` to fill their shards."""
    model = load_model(base)[0] if info.is_main else None
    config = gather_json(model.config.to_dict() if model is not None else None, info)[0]
    if model is None:
        with torch.device("meta"):
            model = build_model(ModelConfig.from_dict(config))
    return model


def apply_adapters(model: nn.Module, lora: LoraConfig, seed: int, train_modules: Sequence[str] = ()) -> LoraConfig | None:
    """Apply LoRA when lora.rank > 0, training `train_modules` in full too; the config saved with the adapter, or None."""
    if not lora.rank:
        lora.validate()
        if quantized_layers(model):
            raise LmforgeError("finetune.bits quantizes the base, which then stays frozen; train adapters on it "
                               "with --lora.rank 16 (QLoRA), or drop finetune.bits to train the whole model")
        return None
    lora = dataclasses.replace(lora, train_modules=[*lora.train_modules, *(m for m in train_modules if m not in lora.train_modules)])
    with seeded(seed):
        wrapped = apply_lora(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA rank %d on %d layers: %d trainable parameters", lora.rank, len(wrapped), trainable)
    return lora


# ---------------------------------------------------------------- checkpoints


def save_model_files(model: nn.Module, folder: Path) -> None:
    """A head model as backbone + head files, any other model as an lmforge checkpoint."""
    if isinstance(model, PooledHead):
        save_head_model(model, folder)
    else:
        save_native(model, folder)


def load_model_files(model: nn.Module, folder: Path) -> None:
    """The inverse of `save_model_files`, into a model of the same shape (checked tensor by tensor)."""
    if isinstance(model, PooledHead):
        load_model_weights(model.backbone, folder)
        load_head_weights(model, folder)
    else:
        load_model_weights(model, folder)


@dataclass
class RunIO:
    """The model part of a checkpoint (the loop's `save_model` / `load_model`) and the final merge."""

    tokenizer: Tokenizer
    lora: LoraConfig | None = None  # with LoRA, checkpoints hold the adapter (and the head record), never the base
    base: str = ""  # the base model folder, recorded in adapter_config.json

    def save(self, model: nn.Module, folder: Path) -> None:
        if self.lora is None:
            save_model_files(model, folder)
        else:
            save_adapter(model, self.lora, folder, base_model=str(Path(self.base).resolve()) if self.base else None)
            if isinstance(model, PooledHead):
                write_head_record(model, folder)
        self.tokenizer.save(folder)

    def load(self, model: nn.Module, folder: Path) -> None:
        if self.lora is None:
            load_model_files(model, folder)
            return
        path = folder / ADAPTER_WEIGHTS
        load_checked(lora_state_dict(model, self.lora.train_modules), read_tensors(path), path,
                     hint="resume with the lora settings it was trained with")

    def export_merged(self, model: nn.Module, folder: Path) -> None:
        """Fold the adapters into the weights (in place) and write the merged model into `folder`: in
        float32, a quantized base dequantized (the weights the adapters were trained against)."""
        save_model_files(dequantize_model(merge_lora(model)), folder)
        self.tokenizer.save(folder)


# ---------------------------------------------------------------- the run


@dataclass
class RunResult:
    """How a training verb ended: the loop's result and, for classifiers, the final scores."""

    train: TrainResult
    eval_report: ClassificationReport | None = None  # classify: the final scores on the evaluation split

    def summary(self) -> str:
        """`done: N steps, checkpoint in DIR (eval_loss 1.2345, ...)`: the line every verb ends with."""
        final = self.train.final_eval or {}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float))
        return f"done: {self.train.step} steps, checkpoint in {self.train.out_dir}" + (f" ({shown})" if shown else "")


@dataclass
class Run:
    """What a verb's run holds once its recipe is read: where it goes, how it trains, on which process."""

    out_dir: Path
    train: TrainConfig
    info: DistInfo
    progress: bool = False  # show a progress bar
    callbacks: Sequence[Callback] = ()
    merge: bool = False  # with LoRA: write the merged model at the end (`finetune.merge`)
    _skeleton: nn.Module | None = dataclasses.field(default=None, init=False, repr=False)  # fsdp: the model before sharding, on meta
    _whole: nn.Module | None = dataclasses.field(default=None, init=False, repr=False)  # trained_model's answer
    _gathered: bool = dataclasses.field(default=False, init=False, repr=False)  # trained_model has run

    def fit(self, model: nn.Module, objective: Objective, io: RunIO, loader: Loader,
            make_eval_batches: Callable[[], Iterable[dict[str, Tensor]]] | None = None) -> TrainResult:
        """The one loop with this run's checkpoint functions and progress bar; LoRA merged at the end
        (a collective under fsdp: call it on every rank)."""
        cbs = [*self.callbacks, *([ProgressBar(self.train.steps)] if self.progress else [])]
        if shards_on_start(self.info, self.train.parallel) and self.info.is_main:
            self._skeleton = meta_copy(model)  # no memory: what `trained_model` fills with the gathered weights
        result = train(model, objective, loader, self.train, self.out_dir, make_eval_batches=make_eval_batches,
                       save_model=io.save, load_model=io.load, callbacks=cbs, dist_info=self.info)
        if io.lora is not None and self.merge:
            whole = self.trained_model(model)
            if whole is not None:
                io.export_merged(whole, self.out_dir)
        return result

    def require_unsharded(self, what: str) -> None:
        """Fail in one line when this run would shard its model (fsdp on several processes) for a verb that
        cannot train sharded: `what` says which of its work needs the whole model on every rank."""
        if shards_on_start(self.info, self.train.parallel):
            raise LmforgeError(f"{what}, which needs the whole model on every rank; train.parallel fsdp shards it: "
                               "use --train.parallel ddp")

    def trained_model(self, model: nn.Module) -> nn.Module | None:
        """After `fit(model, ...)`: the whole trained model on the main rank, on this rank's device
        (with LoRA and `finetune.merge`, already merged); None on the other ranks. Sharded (fsdp), it is
        gathered from every rank the first time, so every rank must call this; unsharded it is `model`."""
        if not self._gathered:
            whole = full_model_on_main(model, self._skeleton, self.info)
            self._whole, self._gathered = (whole.to(self.info.device) if whole is not None else None), True
        return self._whole

    def fit_rows(self, model: nn.Module, objective: Objective, io: RunIO, rows: Sequence[Any],
                 eval_rows: Sequence[Any], collate: Collate) -> TrainResult:
        """`fit` over rows: this rank's shuffled resumable batches of `rows`, evaluation on all of `eval_rows`."""
        cfg, info = self.train, self.info
        loader = RowLoader(rows, collate, cfg.batch_size, seed=cfg.seed, rank=info.rank, world_size=info.world_size)
        evals = (lambda: iter_row_batches(eval_rows, collate, cfg.batch_size)) if eval_rows else None
        return self.fit(model, objective, io, loader, evals)


# ---------------------------------------------------------------- adapters after training


def merged_model(base: str | Path, adapter: str | Path) -> nn.Module:
    """The base model (with the adapter's head, if it has one) with the adapter loaded and merged, in float32.

    An adapter trained on a quantized base (QLoRA; its config records `quantization`) is merged
    into the dequantized weights of the base quantized the same way, the weights it was trained
    against, not into the float weights (which would shift every layer by the rounding error).
    """
    quantization = read_adapter_config(adapter)[1].get("quantization")  # a clear error before the base is loaded
    model, _ = load_model(base)
    if quantization:
        quantize_model(model, quantization["bits"], quantization["group_size"])
    spec = read_head_record(adapter)
    if spec is not None:
        model = build_head(model, spec)
    load_adapter(model, adapter)
    return dequantize_model(merge_lora(model))


def adapter_base(folder: Path) -> str:
    """The base recorded in an adapter folder's adapter_config.json."""
    base = read_adapter_config(folder)[1].get("base_model")
    if not base:
        raise LmforgeError(f"{folder} holds an adapter without a recorded base; merge it with `lmforge lora merge BASE {folder}`")
    return base


def is_adapter_only(folder: Path) -> bool:
    """True for a LoRA run folder without merged weights (`finetune.merge: false`, or a mid-run checkpoint)."""
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "model.safetensors").is_file()


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path, *, hf: bool = False) -> nn.Module:
    """Merge a saved adapter into its base and write the result (lmforge format, or HF with `hf`) to `out`."""
    model = merged_model(base, adapter)
    out = Path(out)
    if hf and isinstance(model, PooledHead):
        raise LmforgeError(f"{adapter} adapts a classification head, which exports in lmforge format only; drop --hf")
    if hf:
        save_hf(model, out)
    else:
        save_model_files(model, out)
    tokenizer_dir = next((d for d in (Path(adapter), Path(base)) if (d / "tokenizer.json").is_file()), None)
    if tokenizer_dir is not None:
        Tokenizer.from_dir(tokenizer_dir).save(out)
    return model


__all__ = [
    "RENAMED_KEYS",
    "FinetuneConfig",
    "HeadConfig",
    "Run",
    "RunIO",
    "RunResult",
    "adapter_base",
    "apply_adapters",
    "base_on_main",
    "is_adapter_only",
    "load_base",
    "merge_adapter",
    "merged_model",
    "out_dir_of",
    "read_recipe",
    "renamed",
    "seeded",
]
