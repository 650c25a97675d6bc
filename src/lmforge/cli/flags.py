"""Command-line flags generated from the config dataclasses, and recipes read from YAML plus those flags.

A training verb's recipe has sections that map 1:1 onto dataclasses (`finetune`, `data`, `train`,
`lora`, ...). Every field is both a YAML key and a `--section.key` flag, documented by the `#`
comment after the field in its class, so `--help` lists every key and there is no hand-written
list of options to drift out of date. Keys of earlier releases are accepted as hidden flags; the
library renames them with a one-line warning (`train/setup.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lmforge.config import PRESETS, ModelConfig
from lmforge.errors import LmforgeError


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """The `# comment` after each field in the class source (and its bases'): the fields' documentation."""
    comments: dict[str, str] = {}
    for klass in cls.__mro__:
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            name, sep, rest = line.strip().partition(":")
            if sep and name.isidentifier() and "#" in rest:
                comments.setdefault(name, rest.split("#", 1)[1].strip())
    return comments


def parse_value(text: str, annotation: Any, flag: str) -> Any:
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


def add_config_flags(parser: argparse.ArgumentParser, sections: Mapping[str, type],
                     renamed: Mapping[tuple[str, str], tuple[str, str]] | None = None) -> None:
    """`--config`, `--out-dir` and one `--section.key` flag per field; `renamed` adds hidden flags for old keys."""
    parser.add_argument("--config", help="YAML recipe (see configs/); flags below override its keys")
    parser.add_argument("--out-dir", help="run folder (overrides out_dir in the recipe)")
    for section, cls in sections.items():
        group = parser.add_argument_group(f"{section} (YAML section '{section}:')")
        if cls is ModelConfig:
            group.add_argument("--model.preset", dest="model.preset", help=f"start from a preset: {', '.join(PRESETS)}")
        for f in dataclasses.fields(cls):
            group.add_argument(f"--{section}.{f.name}", dest=f"{section}.{f.name}", metavar="V",
                               help=f"{field_comments(cls).get(f.name, '')} ({f.type}, default {_default(f)!r})")
    for (old_section, old_key), (section, _) in (renamed or {}).items():
        if section in sections:
            parser.add_argument(f"--{old_section}.{old_key}", dest=f"{old_section}.{old_key}", help=argparse.SUPPRESS)


def _default(f: dataclasses.Field) -> Any:
    """A field's default as the user would write it (the `%` of argparse help escaped)."""
    value = f.default_factory() if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING else f.default
    return str(value).replace("%", "%%") if isinstance(value, str) else value


def _field_type(sections: Mapping[str, type], renamed: Mapping[tuple[str, str], tuple[str, str]],
                section: str, name: str) -> Any:
    section, name = renamed.get((section, name), (section, name))
    return typing.get_type_hints(sections[section])[name]


def read_yaml(path: Path) -> dict[str, Any]:
    """A recipe file as a mapping; a missing file or bad YAML is one line."""
    if not path.is_file():
        raise LmforgeError(f"recipe {path} does not exist; see configs/ for examples")
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise LmforgeError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise LmforgeError(f"{path} must be a mapping of sections (finetune:, data:, train:, ...)")
    return recipe


def load_recipe(args: argparse.Namespace, sections: Mapping[str, type],
                renamed: Mapping[tuple[str, str], tuple[str, str]] | None = None) -> dict[str, Any]:
    """The YAML file merged with command-line overrides, as plain mappings per section."""
    recipe = read_yaml(Path(args.config)) if args.config else {}
    for key, value in vars(args).items():
        if value is None or "." not in key:
            continue
        section, name = key.split(".", 1)
        if name != "preset":
            value = parse_value(value, _field_type(sections, renamed or {}, section, name), f"--{key}")
        recipe.setdefault(section, {})
        if not isinstance(recipe[section], dict):
            raise LmforgeError(f"section '{section}' of {args.config} must be a mapping of keys")
        recipe[section][name] = value
    if args.out_dir:
        recipe["out_dir"] = args.out_dir
    return recipe
