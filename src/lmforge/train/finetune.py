"""Supervised fine-tuning: chat / instruction SFT and sequence classification, each with optional LoRA.

`run_sft(recipe)` and `run_classify(recipe)` turn a recipe into the pieces of the one training
loop: the base model and its tokenizer (`setup.load_base`), resumable row loaders over the
encoded data, the objective (`objectives.sft`, `objectives.classification`) and the run's
checkpoint functions (`setup.RunIO`). Recipe sections: `finetune`, `data` (SftDataConfig or
ClassifyDataConfig), `head` (classify only), `train`, `lora`, and `out_dir`.

Design choices:
- Classification wraps the backbone in a `SequenceClassifier` whose `score` layer is always
  trained in full (LoRA or not). The loop's evaluations report loss and accuracy; at the end the
  whole evaluation split is scored once more for accuracy, macro-F1 and the confusion matrix
  (`evaluate.classification`, saved as out_dir/eval_report.json).
- Dropped and truncated rows are reported through `report` and logged as warnings.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

from lmforge.checkpoint.io import write_json
from lmforge.data.classification import ClassifyDataConfig, collate_classification, load_classification_data
from lmforge.data.rows import context_length, iter_row_batches
from lmforge.data.sft import SftDataConfig, collate_sft, load_sft_data, sequences
from lmforge.errors import LmforgeError
from lmforge.evaluate.classification import evaluate_classifier
from lmforge.models.heads import SequenceClassifier
from lmforge.train import objectives, setup
from lmforge.train.distributed import init_distributed
from lmforge.train.loop import TrainConfig
from lmforge.train.lora import LoraConfig
from lmforge.train.report import Callback

log = logging.getLogger(__name__)

EVAL_REPORT = "eval_report.json"
SFT_SECTIONS: dict[str, type] = {"finetune": setup.FinetuneConfig, "data": SftDataConfig, "train": TrainConfig,
                                 "lora": LoraConfig}
CLASSIFY_SECTIONS: dict[str, type] = {"finetune": setup.FinetuneConfig, "data": ClassifyDataConfig,
                                      "head": setup.HeadConfig, "train": TrainConfig, "lora": LoraConfig}


def run_sft(recipe: dict[str, Any], *, progress: bool = False, report: setup.Report | None = None,
            callbacks: Sequence[Callback] = ()) -> setup.RunResult:
    """Run (or resume) the supervised fine-tuning a recipe describes."""
    ft, data_cfg, cfg, lora = setup.read_recipe(recipe, SFT_SECTIONS)
    model, tokenizer = setup.load_base(ft, init_distributed(), cfg.parallel)
    if model.config.kind != "decoder":
        raise LmforgeError(f"sft trains a decoder; {ft.base} is an encoder (fine-tune it with `lmforge classify`)")
    seq_len = context_length(data_cfg.seq_len, model.config.max_seq_len)
    data = load_sft_data(data_cfg, tokenizer, seq_len, cfg.seed)
    say = report or log.info
    for split, stats in data.stats.items():
        say(f"{split} data: {stats.summary(seq_len)}")
    say(f"{len(data.train)} train and {len(data.eval)} eval examples" + (", packed" if data_cfg.pack else ""))
    run = setup.Run(setup.out_dir_of(recipe, "sft"), cfg, init_distributed(), progress, callbacks, ft.merge)
    io = setup.RunIO(tokenizer, setup.apply_adapters(model, lora, cfg.seed), ft.base)
    collate = partial(collate_sft, pad_id=tokenizer.padding_id, packed=data_cfg.pack)
    rows = sequences(data.train, seq_len, data_cfg.pack, cfg.seed)
    eval_rows = sequences(data.eval, seq_len, data_cfg.pack, cfg.seed)
    return setup.RunResult(run.fit_rows(model, objectives.sft, io, rows, eval_rows, collate))


def run_classify(recipe: dict[str, Any], *, progress: bool = False, report: setup.Report | None = None,
                 callbacks: Sequence[Callback] = ()) -> setup.RunResult:
    """Run (or resume) the classifier training a recipe describes; score the evaluation split at the end."""
    ft, data_cfg, head, cfg, lora = setup.read_recipe(recipe, CLASSIFY_SECTIONS)
    backbone, tokenizer = setup.load_base(ft, init_distributed(), cfg.parallel)
    seq_len = context_length(data_cfg.seq_len, backbone.config.max_seq_len)
    data = load_classification_data(data_cfg, tokenizer, seq_len, cfg.seed)
    cut = f"; {data.truncated} texts cut to {seq_len} tokens" if data.truncated else ""
    (report or log.info)(f"{len(data.train)} train and {len(data.eval)} eval texts, labels {data.labels}{cut}")
    run = setup.Run(setup.out_dir_of(recipe, "classify"), cfg, init_distributed(), progress, callbacks, ft.merge)
    with setup.seeded(cfg.seed):
        model = SequenceClassifier(backbone, len(data.labels), head.pooling or None, data.labels)
    io = setup.RunIO(tokenizer, setup.apply_adapters(model, lora, cfg.seed, ["score"]), ft.base)
    collate = partial(collate_classification, pad_id=tokenizer.padding_id)
    result = run.fit_rows(model, objectives.classification, io, data.train, data.eval, collate)
    scores = None
    trained = run.trained_model(model) if data.eval else None  # every rank: gathered when sharded
    if trained is not None:
        scores = evaluate_classifier(trained, iter_row_batches(data.eval, collate, cfg.batch_size), data.labels)
        write_json(result.out_dir / EVAL_REPORT, dataclasses.asdict(scores))
    return setup.RunResult(result, scores)


__all__ = ["CLASSIFY_SECTIONS", "EVAL_REPORT", "SFT_SECTIONS", "run_classify", "run_sft"]
