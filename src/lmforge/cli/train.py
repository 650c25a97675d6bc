"""Training verbs: quickstart, tokenizer train, prepare, pretrain, sft, classify, reward, dpo, grpo, lora merge.

Each verb parses, calls one library function, and prints. The recipe verbs take
`--config FILE.yaml` plus `--section.key value` flags generated from the recipe's dataclasses
(`cli/flags.py`), run `run_<verb>(recipe, progress=..., report=...)` and print the
result's one-line summary. Under `torchrun` only the process of rank 0 prints and draws the progress bar, so a
run's reports appear once, not once per rank. Library modules are imported inside the functions that need them,
so `lmforge --help` starts without loading torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.cli import data_tools
from lmforge.cli.flags import add_config_flags, load_recipe
from lmforge.errors import LmforgeError

Setup = Callable[[argparse.ArgumentParser], None]

SFT_HELP = """Supervised fine-tuning of a decoder on conversations. data.train is JSONL with one row per line:
{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]} or
{"instruction": ..., "input": ... (optional), "output": ...}. Rows are rendered with the model's chat
template and the loss covers the assistant tokens only. Add --lora.rank 8 to train LoRA adapters."""

CLASSIFY_HELP = """Train a sequence classifier (a head on a decoder or an encoder) on a CSV, TSV or JSONL file with
text and label columns, or with --predict MODEL label new texts. The evaluation split is scored
with accuracy, macro-F1 and a confusion matrix."""


# ---------------------------------------------------------------- recipe verbs


def _recipe_verb(name: str) -> tuple[dict[str, type], Callable[..., Any]]:
    """The recipe sections and the run function of a training verb (imported on demand)."""
    if name == "pretrain":
        from lmforge.train.pretrain import PRETRAIN_SECTIONS, run_pretrain

        return PRETRAIN_SECTIONS, run_pretrain
    if name in ("sft", "classify"):
        from lmforge.train import finetune

        return (finetune.SFT_SECTIONS, finetune.run_sft) if name == "sft" else (finetune.CLASSIFY_SECTIONS, finetune.run_classify)
    if name in ("reward", "dpo"):
        from lmforge.train import align

        return (align.REWARD_SECTIONS, align.run_reward) if name == "reward" else (align.DPO_SECTIONS, align.run_dpo)
    from lmforge.train.grpo import GRPO_SECTIONS, run_grpo

    return GRPO_SECTIONS, run_grpo


def _recipe_setup(name: str, description: str | None = None) -> Setup:
    def setup(p: argparse.ArgumentParser) -> None:
        from lmforge.train.setup import RENAMED_KEYS

        sections, run = _recipe_verb(name)
        p.description = description or p.description
        add_config_flags(p, sections, RENAMED_KEYS)
        p.set_defaults(func=lambda args: _run_recipe(args, sections, run))

    return setup


def prints() -> bool:
    """True in the process that reports: the only one, or rank 0 of a `torchrun` launch (which sets RANK)."""
    return os.environ.get("RANK", "0") == "0"


def _quiet(*_: Any, **__: Any) -> None:
    """The report function of the ranks that do not print."""


def _run_recipe(args: argparse.Namespace, sections: dict[str, type], run: Callable[..., Any]) -> Any:
    from lmforge.train.setup import RENAMED_KEYS

    recipe = load_recipe(args, sections, RENAMED_KEYS)
    data_tools.refuse_if_too_big(recipe)
    result = run(recipe, progress=prints(), report=print if prints() else _quiet)
    if prints():
        print(result.summary())
    return result


# ---------------------------------------------------------------- classify (train or predict)


def _texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.texts)
    if args.input:
        path = Path(args.input)
        if not path.is_file():
            raise LmforgeError(f"--input {path} does not exist; pass a text file with one text per line")
        texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return texts


def cmd_classify(args: argparse.Namespace, sections: dict[str, type], run: Callable[..., Any]) -> None:
    if args.predict:
        import lmforge
        from lmforge.evaluate.classification import predict
        from lmforge.models.heads import SequenceClassifier

        texts = _texts(args)
        if not texts:
            raise LmforgeError("--predict MODEL needs texts: write them after the model or pass --input FILE")
        lm = lmforge.load(args.predict)
        if not isinstance(lm.model, SequenceClassifier):
            raise LmforgeError(f"{args.predict} holds no task head of the classifier kind; pass a folder written by `lmforge classify`")
        if lm.tokenizer is None:
            raise LmforgeError(f"{args.predict} has no tokenizer.json; predictions need the tokenizer it was trained with")
        for text, p in zip(texts, predict(lm.model, lm.tokenizer, texts)):
            print(f"{p.label}\t{p.probability:.3f}\t{text}")
        return
    if args.texts or args.input:
        raise LmforgeError("texts to label need --predict MODEL; to train, pass --config and --section.key flags only")
    result = _run_recipe(args, sections, run)
    if result.eval_report is not None and prints():
        r = result.eval_report
        print(f"evaluation on {r.n} texts: accuracy {r.accuracy:.4f}, macro-F1 {r.macro_f1:.4f}\n{r.table()}")


def setup_classify(p: argparse.ArgumentParser) -> None:
    _recipe_setup("classify", CLASSIFY_HELP)(p)
    sections, run = _recipe_verb("classify")
    p.add_argument("--predict", metavar="MODEL", help="label texts with the classifier in MODEL instead of training")
    p.add_argument("texts", nargs="*", help="with --predict: the texts to label")
    p.add_argument("--input", metavar="FILE", help="with --predict: a file with one text per line")
    p.set_defaults(func=lambda args: cmd_classify(args, sections, run))


# ---------------------------------------------------------------- data and quickstart


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer(args.inputs, args.vocab_size, show_progress=sys.stderr.isatty())
    tok.save(args.out)
    print(f"wrote a {tok.vocab_size}-token byte-level BPE tokenizer to {args.out}")


def setup_tokenizer(p: argparse.ArgumentParser) -> None:
    verbs = p.add_subparsers(dest="tokenizer_verb", required=True)
    t = verbs.add_parser("train", help="train a byte-level BPE tokenizer")
    t.add_argument("inputs", nargs="+", help="text files or folders")
    t.add_argument("--vocab-size", type=int, required=True, help="256 = pure byte tokenizer")
    t.add_argument("--out", required=True, help="output folder (tokenizer.json, tokenizer_config.json)")
    t.set_defaults(func=cmd_tokenizer_train)
    data_tools.add_tokenizer_stats(verbs)


def cmd_prepare(args: argparse.Namespace) -> None:
    from lmforge.quickstart import prepare_with_bar
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(args.tokenizer)
    stats = prepare_with_bar(args.inputs, tok, args.out, text_field=args.text_field, val_fraction=args.eval_fraction,
                             workers=args.workers)
    tok.save(Path(args.out) / "tokenizer")
    print(f"wrote {stats.train.tokens:,} train and {stats.val.tokens:,} validation tokens to {args.out}")


def setup_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help=".txt / .jsonl files or folders")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--eval-fraction", "--val-fraction", dest="eval_fraction", type=float, default=0.01,
                   help="share of the text held out for evaluation (--val-fraction is the old name)")
    p.add_argument("--workers", type=int, default=1,
                   help="encoding processes: 1 (default) encodes here, on every core through the tokenizer's "
                        "batch encoding; N > 1 uses N processes of one core each (same output)")
    p.set_defaults(func=cmd_prepare)


def cmd_quickstart(args: argparse.Namespace) -> None:
    from lmforge.quickstart import quickstart

    quickstart(data=args.data, out_dir=args.out_dir, steps=args.steps, report=print)


def setup_quickstart(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="text file or folder to train on (default: Python's standard library source)")
    p.add_argument("--out-dir", default="runs/quickstart", help="run folder")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default sized for ~3 minutes on 2 cores)")
    p.set_defaults(func=cmd_quickstart)


def cmd_lora_merge(args: argparse.Namespace) -> None:
    from lmforge.train.lora import read_adapter_config
    from lmforge.train.setup import merge_adapter

    quantization = read_adapter_config(args.adapter)[1].get("quantization")
    merge_adapter(args.base, args.adapter, args.out, hf=args.hf)
    into = (f"the dequantized int{quantization['bits']} weights of {args.base} (the adapter was trained on that "
            f"quantized base), written in float32" if quantization else args.base)
    print(f"wrote the merged model to {args.out} ({'Hugging Face' if args.hf else 'lmforge'} format): adapter merged into {into}")


def setup_lora(p: argparse.ArgumentParser) -> None:
    verbs = p.add_subparsers(dest="lora_verb", required=True)
    m = verbs.add_parser("merge", help="merge an adapter into its base model and write the result")
    m.add_argument("base", help="the base model folder the adapter was trained on")
    m.add_argument("adapter", help="folder with adapter.safetensors and adapter_config.json (a LoRA run folder)")
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--hf", action="store_true", help="write a Hugging Face folder (transformers loads it) instead of lmforge format")
    m.set_defaults(func=cmd_lora_merge)


VERBS: dict[str, tuple[str, Setup]] = {  # verb -> (one-line help, adds its arguments)
    "quickstart": ("the main job: tokenizer + small model on stdlib source, then samples", setup_quickstart),
    "tokenizer": ("tokenizer tools (train, stats)", setup_tokenizer),
    "prepare": ("tokenize text into shards with an evaluation split", setup_prepare),
    "pretrain": ("self-supervised pretraining (next-token, or masked-token for encoders)", _recipe_setup("pretrain")),
    "sft": ("supervised fine-tuning on conversations or instructions (assistant tokens only)",
            _recipe_setup("sft", SFT_HELP)),
    "classify": ("train a sequence classifier, or label texts with --predict", setup_classify),
    "reward": ("train a reward model on preference pairs (Bradley-Terry)", _recipe_setup("reward")),
    "dpo": ("direct preference optimisation on preference pairs (DPO / IPO)", _recipe_setup("dpo")),
    "grpo": ("reinforcement learning with verifiable rewards (GRPO)", _recipe_setup("grpo")),
    "lora": ("LoRA adapter tools (merge)", setup_lora),
}
