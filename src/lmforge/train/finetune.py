"""Fine-tuning: chat / instruction SFT and sequence classification, each with optional LoRA.

`run_sft(recipe)` and `run_classify(recipe)` turn a recipe into the pieces of the one training
loop, as `pretrain` does: the base model and its tokenizer, resumable row loaders, the objective
(`objectives.sft`, `objectives.classification`) and the functions that write and read the model
part of each checkpoint. Recipe sections: `finetune` (FinetuneConfig), `data` (SftDataConfig or
ClassifyDataConfig), `head` (HeadConfig, classify only), `train` (TrainConfig), `lora`
(LoraConfig) and `out_dir`.

Design choices:
- LoRA is one recipe section for every objective (`--lora.rank 8`): `adapt` applies it to the
  built model and `RunIO` is the save / load pair the loop calls. With LoRA a checkpoint holds
  the adapter only (adapter.safetensors and adapter_config.json, plus head.json for a
  classifier), so checkpoints stay small; resuming rebuilds the base from `finetune.base`,
  applies LoRA and loads the adapter, and the loop restores the optimizer, data position and
  RNG states, so the run continues bit for bit. Without LoRA a checkpoint holds the whole model.
- At the end of a LoRA run, `finetune.merge` (on by default) also writes the merged model into
  the run folder, so `lmforge.load(out_dir)` and `classify --predict out_dir` need no base; the
  adapter stays beside it. `merge_adapter` merges a saved adapter into its base later, as an
  lmforge or a Hugging Face folder (`lmforge lora merge`).
- Parts created here (the classification head, LoRA's A matrices) are initialised after
  `torch.manual_seed(train.seed)`, so a run is reproducible and a resumed run rebuilds the same
  model before loading its checkpoint.
- Classification wraps the backbone in a `SequenceClassifier` whose `score` layer is always
  trained in full (LoRA or not: it is added to lora.train_modules). The loop's evaluations report
  loss and accuracy; at the end the whole evaluation split is scored once more for accuracy,
  macro-F1 and the confusion matrix (`ClassificationReport`, saved as out_dir/eval_report.json).
- Nothing here prints: `report` receives one-line messages (what became of the data) and the
  CLI prints them; dropped and truncated rows are logged as warnings as well.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.checkpoint import load_model, save_hf, save_native
from lmforge.checkpoint.io import read_json, read_tensors, write_json
from lmforge.config import ModelConfig
from lmforge.data.classification import (
    ClassifyDataConfig,
    collate_classification,
    encode_texts,
    load_classification_data,
)
from lmforge.data.sft import (
    RowLoader,
    SftDataConfig,
    collate_sft,
    iter_row_batches,
    load_sft_data,
    sequences,
)
from lmforge.errors import LmforgeError
from lmforge.models.heads import (
    HEAD_CONFIG,
    HEAD_FORMAT,
    PooledHead,
    SequenceClassifier,
    build_head,
    load_head_model,
    save_head_model,
)
from lmforge.models.surgery import matches
from lmforge.recipes import build
from lmforge.tokenizer import Tokenizer
from lmforge.train import checkpointing as ckpt
from lmforge.train import objectives
from lmforge.train.distributed import DistInfo, init_distributed
from lmforge.train.loop import Objective, TrainConfig, TrainResult, train
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

log = logging.getLogger(__name__)

EVAL_REPORT = "eval_report.json"
Report = Callable[[str], None]


# ---------------------------------------------------------------- recipe sections


@dataclass
class FinetuneConfig:
    """The model a fine-tuning run starts from; the `finetune:` section of sft and classify recipes."""

    base: str = ""  # model to fine-tune: an lmforge run folder or a Hugging Face folder, with its tokenizer.json
    merge: bool = True  # with LoRA: also write the merged model into out_dir at the end (the adapter is always saved)


@dataclass
class HeadConfig:
    """The classification head; the `head:` section of classify recipes."""

    pooling: str = ""  # "last" (last non-pad token), "cls" ([CLS], through BERT's pooler when present) or "mean"; "" = last for decoders, cls or mean for encoders


def sft_sections() -> dict[str, type]:
    """Recipe sections of `lmforge sft`, in the order `run_sft` reads them."""
    return {"finetune": FinetuneConfig, "data": SftDataConfig, "train": TrainConfig, "lora": LoraConfig}


def classify_sections() -> dict[str, type]:
    """Recipe sections of `lmforge classify`, in the order `run_classify` reads them."""
    return {"finetune": FinetuneConfig, "data": ClassifyDataConfig, "head": HeadConfig, "train": TrainConfig,
            "lora": LoraConfig}


def _sections(recipe: dict[str, Any], sections: dict[str, type]) -> list[Any]:
    return [build(cls, recipe.get(name), name) for name, cls in sections.items()]


# ---------------------------------------------------------------- base model, LoRA, checkpoints


def load_base(path: str | Path) -> tuple[nn.Module, Tokenizer]:
    """The model and tokenizer of an lmforge run folder or a Hugging Face folder."""
    if not str(path):
        raise LmforgeError("finetune.base is not set; pass --finetune.base MODEL_FOLDER (an lmforge run or a Hugging Face folder)")
    model, _ = load_model(path)
    if not (Path(path) / "tokenizer.json").is_file():
        raise LmforgeError(f"{path} has no tokenizer.json; fine-tuning needs the model's own tokenizer beside its weights")
    return model, Tokenizer.from_dir(path)


def context_length(seq_len: int, config: ModelConfig) -> int:
    """`data.seq_len`, or the model's context when it is 0."""
    if seq_len > config.max_seq_len:
        raise LmforgeError(f"data.seq_len {seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    return seq_len or config.max_seq_len


def pad_id_of(tokenizer: Tokenizer) -> int:
    """The id padding uses: the pad token, else EOS, else 0 (pads are masked out either way)."""
    return next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None), 0)


def adapt(model: nn.Module, cfg: LoraConfig) -> LoraConfig | None:
    """Apply LoRA as `cfg` says; returns the config to save with the adapter, or None when LoRA is off."""
    wrapped = apply_lora(model, cfg)
    if not wrapped:
        return None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA rank %d on %d layers: %d trainable parameters", cfg.rank, len(wrapped), trainable)
    return cfg


def save_model_files(model: nn.Module, folder: Path) -> None:
    """A head model as backbone + head files, any other model as an lmforge checkpoint."""
    if isinstance(model, PooledHead):
        save_head_model(model, folder)
    else:
        save_native(model, folder)


def load_adapter_weights(model: nn.Module, cfg: LoraConfig, folder: Path) -> None:
    """Copy a checkpoint's adapter tensors into a model that already has the same adapters."""
    own = lora_state_dict(model, cfg.train_modules)
    saved = read_tensors(folder / ADAPTER_WEIGHTS)
    if {k: tuple(v.shape) for k, v in own.items()} != {k: tuple(v.shape) for k, v in saved.items()}:
        raise LmforgeError(f"checkpoint {folder} holds an adapter for other layers or ranks than this run's lora "
                           "section; resume with the lora settings it was trained with")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(saved[name])


@dataclass
class RunIO:
    """The model part of a fine-tuning checkpoint: the loop's `save_model` / `load_model`, and the final export."""

    tokenizer: Tokenizer
    lora: LoraConfig | None = None  # with LoRA, checkpoints hold only the adapter (and the head record)
    base: str = ""  # the base model folder, recorded in adapter_config.json

    def save(self, model: nn.Module, folder: Path) -> None:
        if self.lora is None:
            save_model_files(model, folder)
        else:
            save_adapter(model, self.lora, folder, base_model=self.base)
            if isinstance(model, PooledHead):
                write_json(folder / HEAD_CONFIG, {"format": HEAD_FORMAT, **model.head_config()})
        self.tokenizer.save(folder)

    def load(self, model: nn.Module, folder: Path) -> None:
        if self.lora is not None:
            load_adapter_weights(model, self.lora, folder)
        elif isinstance(model, PooledHead):
            model.load_state_dict(load_head_model(folder).state_dict())
        else:
            ckpt.load_model_weights(model, folder)

    def export_merged(self, model: nn.Module, folder: Path) -> None:
        """Fold the adapters into the weights (in place) and write the merged model into `folder`."""
        save_model_files(merge_lora(model), folder)
        self.tokenizer.save(folder)


def _fit(
    model: nn.Module, objective: Objective, io: RunIO, items: tuple[Sequence[Any], Sequence[Any]],
    collate: Callable[[list[Any]], dict[str, Tensor]], recipe: dict[str, Any], cfg: TrainConfig, merge: bool,
    info: DistInfo, progress: bool, callbacks: Sequence[Callback],
) -> TrainResult:
    """Train `model` on the train items with the one loop; evaluate on the eval items; export the merge."""
    train_items, eval_items = items
    out_dir = Path(recipe.get("out_dir") or "runs/finetune")
    loader = RowLoader(train_items, collate, cfg.batch_size, seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    make_eval = (lambda: iter_row_batches(eval_items, collate, cfg.batch_size)) if eval_items else None
    cbs = [*callbacks, *([ProgressBar(cfg.steps)] if progress else [])]
    result = train(model, objective, loader, cfg, out_dir, make_eval_batches=make_eval, save_model=io.save,
                   load_model=io.load, callbacks=cbs, dist_info=info)
    if io.lora is not None and merge and info.is_main:
        io.export_merged(model, out_dir)
    return result


@dataclass
class FinetuneResult:
    """How a fine-tuning run ended."""

    train: TrainResult
    eval_report: ClassificationReport | None = None  # classify: the final scores on the evaluation split


# ---------------------------------------------------------------- SFT


def run_sft(
    recipe: dict[str, Any], *, progress: bool = False, callbacks: Sequence[Callback] = (), report: Report | None = None
) -> FinetuneResult:
    """Run (or resume) the supervised fine-tuning a recipe describes."""
    ft, data_cfg, cfg, lora = _sections(recipe, sft_sections())
    model, tokenizer = load_base(ft.base)
    if model.config.kind != "decoder":
        raise LmforgeError(f"sft trains a decoder; {ft.base} is an encoder (fine-tune it with `lmforge classify`)")
    seq_len = context_length(data_cfg.seq_len, model.config)
    data = load_sft_data(data_cfg, tokenizer, seq_len, cfg.seed)
    say = report or log.info
    for split, stats in data.stats.items():
        say(f"{split} data: {stats.summary(seq_len)}")
    say(f"{len(data.train)} train and {len(data.eval)} eval examples" + (", packed" if data_cfg.pack else ""))
    info = init_distributed()
    torch.manual_seed(cfg.seed)
    io = RunIO(tokenizer, adapt(model, lora), str(Path(ft.base).resolve()))
    collate = partial(collate_sft, pad_id=pad_id_of(tokenizer), packed=data_cfg.pack)
    items = (sequences(data.train, seq_len, data_cfg.pack, cfg.seed), sequences(data.eval, seq_len, data_cfg.pack, cfg.seed))
    result = _fit(model, objectives.sft, io, items, collate, recipe, cfg, ft.merge, info, progress, callbacks)
    return FinetuneResult(result)


# ---------------------------------------------------------------- classification


@dataclass
class ClassificationReport:
    """Scores of a classifier on labelled examples."""

    labels: list[str]  # label names in index order
    accuracy: float
    macro_f1: float  # mean F1 over the labels that occur among the true or predicted labels
    confusion: list[list[int]]  # confusion[true][predicted] counts
    n: int  # examples scored

    def table(self) -> str:
        """The confusion matrix as aligned text: one row per true label, one column per predicted label."""
        width = max(len(x) for x in [*self.labels, *(str(c) for row in self.confusion for c in row), "true\\pred"])
        lines = ["  ".join(x.rjust(width) for x in ["true\\pred", *self.labels])]
        lines += ["  ".join(x.rjust(width) for x in [name, *map(str, row)]) for name, row in zip(self.labels, self.confusion)]
        return "\n".join(lines)


def classification_report(predicted: Sequence[int], actual: Sequence[int], labels: Sequence[str]) -> ClassificationReport:
    """Accuracy, macro-F1 and the confusion matrix of predicted against actual label indices."""
    k = len(labels)
    confusion = [[0] * k for _ in range(k)]
    for p, a in zip(predicted, actual):
        confusion[a][p] += 1
    f1s = []
    for i in range(k):
        tp, row, col = confusion[i][i], sum(confusion[i]), sum(confusion[j][i] for j in range(k))
        if row or col:
            f1s.append(2 * tp / (row + col))
    n = len(actual)
    correct = sum(confusion[i][i] for i in range(k))
    return ClassificationReport(list(labels), correct / max(n, 1), sum(f1s) / max(len(f1s), 1), confusion, n)


@torch.no_grad()
def classifier_logits(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
    """Logits (N, n_labels) and labels (N,) of every batch, in order."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in batches:
        logits.append(model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).float().cpu())
        labels.append(batch["labels"])
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def evaluate_classifier(model: nn.Module, batches: Iterable[dict[str, Tensor]], labels: Sequence[str]) -> ClassificationReport:
    """Score a classifier on labelled batches (input_ids, attention_mask, labels)."""
    logits, actual = classifier_logits(model, batches)
    return classification_report(logits.argmax(-1).tolist(), actual.tolist(), labels)


def run_classify(
    recipe: dict[str, Any], *, progress: bool = False, callbacks: Sequence[Callback] = (), report: Report | None = None
) -> FinetuneResult:
    """Run (or resume) the classifier training a recipe describes; score the evaluation split at the end."""
    ft, data_cfg, head, cfg, lora = _sections(recipe, classify_sections())
    backbone, tokenizer = load_base(ft.base)
    seq_len = context_length(data_cfg.seq_len, backbone.config)
    data = load_classification_data(data_cfg, tokenizer, seq_len, cfg.seed)
    cut = f"; {data.truncated} texts cut to {seq_len} tokens" if data.truncated else ""
    (report or log.info)(f"{len(data.train)} train and {len(data.eval)} eval texts, labels {data.labels}{cut}")
    info = init_distributed()
    torch.manual_seed(cfg.seed)
    model = SequenceClassifier(backbone, len(data.labels), head.pooling or None, data.labels)
    if lora.rank and not any(matches("score", [p]) for p in lora.train_modules):
        lora = dataclasses.replace(lora, train_modules=[*lora.train_modules, "score"])
    io = RunIO(tokenizer, adapt(model, lora), str(Path(ft.base).resolve()))
    collate = partial(collate_classification, pad_id=pad_id_of(tokenizer))
    result = _fit(model, objectives.classification, io, (data.train, data.eval), collate, recipe, cfg, ft.merge,
                  info, progress, callbacks)
    scores = None
    if data.eval and info.is_main:
        scores = evaluate_classifier(model, iter_row_batches(data.eval, collate, cfg.batch_size), data.labels)
        write_json(result.out_dir / EVAL_REPORT, dataclasses.asdict(scores))
    return FinetuneResult(result, scores)


# ---------------------------------------------------------------- adapters after training, prediction


def _head_record(folder: Path) -> dict[str, Any] | None:
    path = folder / HEAD_CONFIG
    if not path.is_file():
        return None
    spec = read_json(path)
    if spec.get("format") != HEAD_FORMAT:
        raise LmforgeError(f"{path} is not an lmforge head record (format {spec.get('format')!r})")
    return spec


def merged_model(base: str | Path, adapter: str | Path) -> nn.Module:
    """The base model (with the adapter's head, if it has one) with the adapter loaded and merged."""
    adapter = Path(adapter)
    read_adapter_config(adapter)  # a clear error before the base is loaded
    model, _ = load_model(base)
    spec = _head_record(adapter)
    if spec is not None:
        model = build_head(model, spec)
    load_adapter(model, adapter)
    return merge_lora(model)


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


def load_classifier(path: str | Path) -> tuple[PooledHead, Tokenizer]:
    """A classifier saved by `lmforge classify`: merged in the folder, or an adapter merged onto its recorded base."""
    folder = Path(path)
    if (folder / ADAPTER_CONFIG).is_file() and not (folder / "model.safetensors").is_file():
        base = read_adapter_config(folder)[1].get("base_model")
        if not base:
            raise LmforgeError(f"{folder} holds an adapter without a recorded base; merge it with `lmforge lora merge BASE {folder}`")
        model = merged_model(base, folder)
    else:
        model = load_head_model(folder)
    if not isinstance(model, SequenceClassifier):
        raise LmforgeError(f"{folder} holds a {model.kind} head, not a classifier")
    if not (folder / "tokenizer.json").is_file():
        raise LmforgeError(f"{folder} has no tokenizer.json; predictions need the tokenizer the classifier was trained with")
    return model.eval(), Tokenizer.from_dir(folder)


@dataclass
class Prediction:
    """A classifier's answer for one text."""

    label: str  # the most probable label's name
    probability: float  # its probability
    probabilities: dict[str, float]  # every label's probability


def predict(model: SequenceClassifier, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 32) -> list[Prediction]:
    """Label each text (cut to the model's context) with the classifier."""
    ids, _ = encode_texts(tokenizer, texts, model.config.max_seq_len)
    collate = partial(collate_classification, pad_id=pad_id_of(tokenizer))
    logits, _ = classifier_logits(model, iter_row_batches([(i, 0) for i in ids], collate, batch_size))
    names = model.labels or [str(i) for i in range(logits.shape[-1])]
    out = []
    for probs in logits.softmax(-1).tolist():
        best = max(range(len(probs)), key=probs.__getitem__)
        out.append(Prediction(names[best], probs[best], dict(zip(names, probs))))
    return out


__all__ = [
    "ClassificationReport",
    "FinetuneConfig",
    "FinetuneResult",
    "HeadConfig",
    "Prediction",
    "RunIO",
    "adapt",
    "classification_report",
    "classify_sections",
    "evaluate_classifier",
    "load_base",
    "load_classifier",
    "merge_adapter",
    "merged_model",
    "predict",
    "run_classify",
    "run_sft",
    "sft_sections",
]
