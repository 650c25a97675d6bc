"""What a model folder says about generation: stop ids and default sampling (generation_config.json).

Design choices
- Stop ids are every `eos_token_id` of generation_config.json, one id or a list (Llama 3 Instruct stops at
  `<|end_of_text|>`, `<|eom_id|>` and `<|eot_id|>`). A folder without the file falls back on config.json's
  `eos_token_id`, as transformers builds its generation config from the model config then.
- Sampling defaults are what the file states, under lmforge's names (which are HF's): `temperature`, `top_k`,
  `top_p`, `min_p`, `repetition_penalty`. `do_sample: false` means greedy: temperature 0, and the file's
  temperature and filters are ignored, as transformers ignores them; a repetition penalty still applies.
  A caller's explicit value always wins.
- Deliberate difference: transformers fills what the file leaves out with its own defaults (greedy when
  `do_sample` is absent, `top_k=50` when sampling); lmforge keeps its own (plain sampling, no top-k), as vLLM
  does, so a file that says nothing about sampling changes nothing.
- Values stay plain numbers: the tokenizer layer sits above generate/, whose `SamplingParams` takes them.
- `save` writes back only what was read, so a folder saved by lmforge tells transformers the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.tokenizer.core import read_json_object, write_atomic

GENERATION_CONFIG = "generation_config.json"
# The sampling settings lmforge takes from the file; each is also a `SamplingParams` field of the same name.
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
# What greedy decoding leaves out: temperature and the filters only reshape the distribution it never samples.
_SAMPLING_ONLY = frozenset({"temperature", "top_k", "top_p", "min_p"})


@dataclass(frozen=True)
class GenerationDefaults:
    """Stop ids and default sampling settings of one model folder; empty when it states none."""

    eos_ids: tuple[int, ...] = ()  # every id that ends generation, in the file's order
    do_sample: bool | None = None  # False: greedy; None: not stated
    temperature: float | None = None  # None: not stated (as for the fields below)
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> GenerationDefaults:
        """Read generation_config.json from a folder (else config.json's eos_token_id); empty if neither."""
        folder = Path(path)
        generation_file = folder / GENERATION_CONFIG
        if generation_file.is_file():
            values = read_json_object(generation_file)
            return cls(
                eos_ids=_ids(values.get("eos_token_id"), generation_file),
                do_sample=_setting(values, "do_sample", generation_file),
                **{name: _setting(values, name, generation_file) for name in SAMPLING_FIELDS},
            )
        config_file = folder / "config.json"
        if config_file.is_file():
            return cls(eos_ids=_ids(read_json_object(config_file).get("eos_token_id"), config_file))
        return cls()

    @property
    def sampling(self) -> dict[str, float | int]:
        """The stated sampling settings as `SamplingParams` keyword arguments (temperature 0 when greedy)."""
        stated = {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}
        if self.do_sample is False:
            return {**{k: v for k, v in stated.items() if k not in _SAMPLING_ONLY}, "temperature": 0.0}
        return stated

    def save(self, path: str | Path) -> None:
        """Write generation_config.json into a folder, or nothing when there is nothing to say."""
        values: dict[str, Any] = {
            field.name: getattr(self, field.name)
            for field in fields(self)
            if field.name != "eos_ids" and getattr(self, field.name) is not None
        }
        if self.eos_ids:
            values["eos_token_id"] = self.eos_ids[0] if len(self.eos_ids) == 1 else list(self.eos_ids)
        if values:
            write_atomic(Path(path) / GENERATION_CONFIG, json.dumps(values, indent=2) + "\n")


def _ids(value: Any, path: Path) -> tuple[int, ...]:
    """`eos_token_id`: null, one id or a list of ids."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise LmforgeError(
            f"eos_token_id in {path} should be a token id or a list of ids, not {value!r:.80}; fix the file"
        )
    return tuple(ids)


def _setting(values: dict[str, Any], name: str, path: Path) -> bool | int | float | None:
    """`do_sample` (a bool), `top_k` (an int) or another sampling setting (a float); None when absent."""
    value = values.get(name)
    if value is None:
        return None
    if name == "do_sample":
        valid, expected = isinstance(value, bool), "true or false"
    elif name == "top_k":
        valid, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    else:
        valid, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    if not valid:
        raise LmforgeError(f"{name} in {path} should be {expected}, not {value!r:.80}; fix the file")
    return value if name in ("do_sample", "top_k") else float(value)
