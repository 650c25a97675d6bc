"""Training recipes: YAML files and `--section.key value` flags generated from the config dataclasses.

A recipe has sections that map 1:1 onto dataclasses: `model` (ModelConfig, plus an optional
`preset` to start from), `data` (DataConfig) and `train` (TrainConfig), and a top-level
`out_dir`. The same field names are YAML keys and command-line flags, so `--help` documents
every key and there is no hand-written list of options to drift out of date.

The verbs here (`tokenizer train`, `prepare`, `pretrain`, `quickstart`) are thin: they parse,
call the library, and report.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmforge.config import PRESETS, ModelConfig
from lmforge.errors import LmforgeError


@dataclass
class DataConfig:
    """Where the training tokens come from; every field is a YAML key and a `--data.key` flag."""

    shards: str = ""  # folder written by `lmforge prepare` (train_*.bin, val_*.bin, meta.json)
    tokenizer: str = ""  # tokenizer folder (tokenizer.json); default: the shards folder's tokenizer/
    seq_len: int = 0  # tokens per training sequence; 0 = the model's max_seq_len


def _sections() -> dict[str, type]:
    from lmforge.train.loop import TrainConfig

    return {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


# ---------------------------------------------------------------- flags from dataclasses


@functools.cache
def _field_comments(cls: type) -> dict[str, str]:
    """The `# comment` after each field in the class source: the fields' documentation (read once per class)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments = {}
    for line in source.splitlines():
        name, sep, rest = line.strip().partition(":")
        if sep and name.isidentifier() and "#" in rest:
            comments.setdefault(name, rest.split("#", 1)[1].strip())
    return comments


def _parse_value(text: str, annotation: Any, flag: str) -> Any:
    """Convert a command-line string to the field's type (int, float, bool, str, JSON list/dict, or None)."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    if text.lower() in ("none", "null") and optional:
        return None
    base = next(a for a in args if a is not type(None)) if optional else annotation
    base = typing.get_origin(base) or base
    try:
        if base is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if base in (dict, list):
            value = json.loads(text)
            if not isinstance(value, base):
                raise ValueError(text)
            return value
        return base(text)
    except (ValueError, json.JSONDecodeError):
        raise LmforgeError(f"{flag} expects a {getattr(base, '__name__', base)}; got {text!r}") from None


def add_config_flags(parser: argparse.ArgumentParser, sections: dict[str, type]) -> None:
    parser.add_argument("--config", help="YAML recipe (sections model, data, train; see configs/)")
    parser.add_argument("--out-dir", help="run folder (overrides out_dir in the recipe)")
    for section, cls in sections.items():
        group = parser.add_argument_group(f"{section} (YAML section '{section}:')")
        if section == "model":
            group.add_argument("--model.preset", dest="model.preset", help=f"start from a preset: {', '.join(PRESETS)}")
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            group.add_argument(f"--{section}.{f.name}", dest=f"{section}.{f.name}", metavar="V",
                               help=f"{_field_comments(cls).get(f.name, '')} (type {f.type})")


def load_recipe(args: argparse.Namespace, sections: dict[str, type]) -> dict[str, Any]:
    """YAML file merged with command-line overrides, as plain dicts per section."""
    recipe: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise LmforgeError(f"recipe {path} does not exist; see configs/ for examples")
        try:
            recipe = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise LmforgeError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(recipe, dict):
            raise LmforgeError(f"{path} must be a mapping with sections {', '.join(sections)}")
        unknown = set(recipe) - set(sections) - {"out_dir"}
        if unknown:
            raise LmforgeError(f"{path} has unknown sections {sorted(unknown)}; expected {', '.join(sections)}, out_dir")
    for key, value in vars(args).items():
        if value is None or "." not in key:
            continue
        section, name = key.split(".", 1)
        cls = sections[section]
        parsed = value if name == "preset" else _parse_value(value, typing.get_type_hints(cls)[name], f"--{key}")
        recipe.setdefault(section, {})[name] = parsed
    if args.out_dir:
        recipe["out_dir"] = args.out_dir
    return recipe


def build(cls: type, values: dict[str, Any] | None, section: str) -> Any:
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise LmforgeError(f"unknown keys in section '{section}': {unknown}; valid: {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as e:
        raise LmforgeError(f"section '{section}': {e}") from None


def model_config(values: dict[str, Any] | None, **defaults: Any) -> ModelConfig:
    values = dict(values or {})
    name = values.pop("preset", None)
    base = dict(PRESETS[name]) if name in PRESETS else {}
    if name is not None and name not in PRESETS:
        raise LmforgeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return build(ModelConfig, {**base, **defaults, **values}, "model")


# ---------------------------------------------------------------- verbs


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer(args.inputs, args.vocab_size, show_progress=sys.stderr.isatty())
    tok.save(args.out)
    print(f"wrote a {tok.vocab_size}-token byte-level BPE tokenizer to {args.out}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(args.tokenizer)
    stats = prepare_with_bar(args.inputs, tok, args.out, text_field=args.text_field, val_fraction=args.val_fraction)
    tok.save(Path(args.out) / "tokenizer")
    print(f"wrote {stats.train.tokens:,} train and {stats.val.tokens:,} validation tokens to {args.out}")


def prepare_with_bar(inputs: list[str], tokenizer: Any, out: str | Path, **kwargs: Any) -> Any:
    """`data.prepare` with a progress bar over the input bytes."""
    from tqdm import tqdm

    from lmforge.data import list_input_files, prepare

    total = sum(p.stat().st_size for p in list_input_files(inputs))
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr,
              disable=not sys.stderr.isatty()) as bar:
        return prepare(inputs, tokenizer, out, progress=bar.update, **kwargs)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from lmforge.train.pretrain import pretrain

    recipe = load_recipe(args, _sections())
    result = pretrain(recipe, progress=True)
    final = result.final_eval or {}
    summary = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float))
    print(f"done: {result.step} steps, checkpoint in {result.out_dir} ({summary})")


def cmd_quickstart(args: argparse.Namespace) -> None:
    from lmforge.quickstart import quickstart

    quickstart(data=args.data, out_dir=args.out_dir, steps=args.steps, report=print)


def add_verbs(verbs: argparse._SubParsersAction) -> None:
    """Add the training verbs to the `lmforge` parser."""
    p = verbs.add_parser("quickstart", help="the main job: tokenizer + small model on stdlib source, then samples")
    p.add_argument("--data", default=None, help="text file or folder to train on (default: Python's standard library source)")
    p.add_argument("--out-dir", default="runs/quickstart", help="run folder")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default sized for ~3 minutes on 2 cores)")
    p.set_defaults(func=cmd_quickstart)

    tok = verbs.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_verb", required=True)
    p = tok.add_parser("train", help="train a byte-level BPE tokenizer")
    p.add_argument("inputs", nargs="+", help="text files or folders")
    p.add_argument("--vocab-size", type=int, required=True, help="256 = pure byte tokenizer")
    p.add_argument("--out", required=True, help="output folder (tokenizer.json, tokenizer_config.json)")
    p.set_defaults(func=cmd_tokenizer_train)

    p = verbs.add_parser("prepare", help="tokenize text into shards with a validation split")
    p.add_argument("inputs", nargs="+", help=".txt / .jsonl files or folders")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of the text held out for validation")
    p.set_defaults(func=cmd_prepare)

    p = verbs.add_parser("pretrain", help="self-supervised pretraining (next-token, or masked-token for encoders)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(p, _sections())
    p.set_defaults(func=cmd_pretrain)

    from lmforge import cli_align, cli_finetune

    cli_finetune.add_verbs(verbs)
    cli_align.add_verbs(verbs)
