"""Sentence-transformers folders: how `lm.embed` turns texts into vectors as `SentenceTransformer(folder).encode` does.

A sentence-transformers folder is a Hugging Face model folder plus `modules.json`, the pipeline run
after the model: a `Transformer` (the model in the folder itself), a `Pooling` module (its
`config.json`, usually `1_Pooling/config.json`) and, when listed, `Normalize`. `read_sentence_config`
reads them into a `SentenceConfig`; a folder without `modules.json` gets lmforge's own embedding
(mean-pooled, L2-normalised).

Design choices:
- Modules are told apart by the last part of their `type` (`Transformer`, `Pooling`, `Normalize`),
  so both the sentence-transformers 2-5 names (`sentence_transformers.models.Pooling`) and the 6.x
  ones (`sentence_transformers.sentence_transformer.modules.pooling.Pooling`) are read.
- The pooling config is read in both forms: 6.x's `pooling_mode` and the older booleans
  (`pooling_mode_cls_token`, `pooling_mode_mean_tokens`, `pooling_mode_lasttoken`, ...; none set
  means mean, as sentence-transformers reads them). lmforge pools with `models/heads.py`'s
  `pool_hidden`, so it runs cls, mean and last-token pooling; another mode, several concatenated
  modes, or another module (Dense, LayerNorm, ...) is refused when the folder is opened rather
  than giving vectors that differ.
- `sentence_bert_config.json`'s `max_seq_length` and `do_lower_case` and the default prompt of
  `config_sentence_transformers.json` are honoured, as `encode` applies them without being asked.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.checkpoint.io import read_json
from lmforge.errors import LmforgeError

MODULES_FILE = "modules.json"
SETTINGS_FILES = ("sentence_bert_config.json", "config_sentence_transformers.json")  # read beside modules.json
# sentence-transformers' pooling modes -> `pool_hidden`'s names
POOLINGS = {"cls": "cls", "mean": "mean", "lasttoken": "last"}
# the legacy pooling booleans, in the order sentence-transformers concatenates the modes they select
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class SentenceConfig:
    """How texts become sentence embeddings; the defaults are lmforge's own embedding."""

    pooling: str = "mean"  # `pool_hidden`'s mode: "mean", "cls" or "last"
    normalize: bool = True  # L2-normalise each vector (a listed Normalize module)
    max_length: int | None = None  # ids per text, special tokens included; None = the tokenizer's / model's limit
    lowercase: bool = False  # lowercase texts before tokenizing (`do_lower_case`)
    prompt: str = ""  # put before every text (the default prompt)


def read_sentence_config(folder: str | Path) -> SentenceConfig:
    """The embedding a folder's sentence-transformers files describe; the default without `modules.json`."""
    folder = Path(folder)
    modules_file = folder / MODULES_FILE
    if not modules_file.is_file():
        return SentenceConfig()
    modules = _modules(modules_file)
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unknown = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
    if unknown or "Pooling" not in kinds:
        what = f"a {unknown[0]} module" if unknown else "no Pooling module"
        raise LmforgeError(
            f"{modules_file} lists {what}; lmforge embeds with Transformer -> Pooling (-> Normalize) only, "
            "so its vectors would differ from sentence-transformers'"
        )
    pooling_dir = folder / str(modules[kinds.index("Pooling")].get("path", ""))
    pooling, include_prompt = _pooling(pooling_dir / "config.json")
    st_config = folder / "sentence_bert_config.json"
    settings = read_json(st_config) if st_config.is_file() else {}
    prompt = _default_prompt(folder)
    if prompt and not include_prompt:
        raise LmforgeError(
            f"{pooling_dir / 'config.json'} leaves the default prompt {prompt!r} out of the pooling "
            "(include_prompt false), which lmforge does not do"
        )
    return SentenceConfig(pooling, "Normalize" in kinds, settings.get("max_seq_length"),
                          bool(settings.get("do_lower_case", False)), prompt)


def copy_sentence_files(source: str | Path, target: str | Path) -> None:
    """Copy a folder's sentence-transformers files (modules.json, its module folders, the settings files) into
    `target`, so a model trained from `source` embeds as it did; nothing when `source` has no modules.json."""
    source, target = Path(source), Path(target)
    if not (source / MODULES_FILE).is_file():
        return
    for module in _modules(source / MODULES_FILE):
        path = str(module.get("path", ""))
        if path and (source / path).is_dir():
            shutil.copytree(source / path, target / path, dirs_exist_ok=True)
    for name in (MODULES_FILE, *SETTINGS_FILES):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def _modules(path: Path) -> list[dict[str, Any]]:
    try:
        modules = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LmforgeError(f"{path} is not valid JSON ({e}); restore or re-create it") from None
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise LmforgeError(f"{path} must hold a list of modules ({{'idx', 'path', 'type'}} objects)")
    return sorted(modules, key=lambda m: m.get("idx", 0))


def _pooling(path: Path) -> tuple[str, bool]:
    """(`pool_hidden`'s mode, include_prompt) from a Pooling module's config.json, in either form."""
    config = read_json(path)
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in LEGACY_POOLING_KEYS.items() if config.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise LmforgeError(
            f"{path} pools with {' + '.join(map(str, modes))}; lmforge pools with one of {', '.join(POOLINGS)}"
        )
    return POOLINGS[modes[0]], bool(config.get("include_prompt", True))


def _default_prompt(folder: Path) -> str:
    path = folder / "config_sentence_transformers.json"
    config = read_json(path) if path.is_file() else {}
    name = config.get("default_prompt_name")
    return (config.get("prompts") or {}).get(name, "") if name else ""


__all__ = ["SentenceConfig", "copy_sentence_files", "read_sentence_config"]
