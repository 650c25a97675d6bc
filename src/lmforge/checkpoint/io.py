"""Reading and writing tensors and small files safely.

Every write goes to a temporary name in the destination folder and is renamed into place,
so a reader never sees a half-written file. Every read turns the low-level failure of a
missing, truncated or mis-shaped file into one line naming the file and the fix.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lmforge.errors import LmforgeError


def atomic_write(path: str | Path, write: Any) -> None:
    """Call `write(tmp_path)` then rename the temporary file to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path} does not exist; is this a model folder?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path} is not valid JSON ({e}); restore or re-create it") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path} must hold a JSON object")
    return data


def write_tensors(path: str | Path, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save `tensors` as safetensors, atomically; views that share storage are copied apart."""
    storages = Counter(t.untyped_storage().data_ptr() for t in tensors.values())
    plain = {
        k: (t.detach().clone() if storages[t.untyped_storage().data_ptr()] > 1 else t.detach()).contiguous()
        for k, t in tensors.items()
    }
    atomic_write(path, lambda tmp: save_file(plain, tmp, metadata=metadata))


@contextmanager
def _opened(path: str | Path) -> Iterator[Any]:
    """A safetensors file open for reading; a damaged file becomes one line naming it and the fix."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise LmforgeError(
            f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}); "
            "it may be truncated: copy or save it again"
        ) from None


def read_tensors(path: str | Path, keys: list[str] | None = None) -> dict[str, Tensor]:
    """Load tensors from a safetensors file (all of them, or `keys`), with a clear error if it is damaged."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path} does not exist")
    with _opened(path) as f:
        return {k: f.get_tensor(k) for k in (keys if keys is not None else f.keys())}


def tensor_names(path: str | Path) -> list[str]:
    with _opened(path) as f:
        return list(f.keys())


# safetensors' codes of floating-point dtypes
_FLOAT_CODES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def first_float_dtype(path: str | Path) -> torch.dtype | None:
    """The dtype of the first floating-point tensor of a safetensors file (read from its header), or None."""
    with _opened(path) as f:
        names = f.keys()
        codes = (f.get_slice(k).get_dtype() for k in names)
        return next((_FLOAT_CODES[c] for c in codes if c in _FLOAT_CODES), None)


def unique_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict without the second name of tied parameters."""
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t.detach()
    return out


def mismatch(source: str | Path, missing: Iterable[str], unexpected: Iterable[str], misshaped: Iterable[str],
             hint: str, problem: str = "does not fit this model") -> LmforgeError | None:
    """The one error for tensors that do not fit a model, naming the first few of each kind; None when all fit."""
    problems = [f"{what} {_names(sorted(set(names)))}" for what, names in
                (("missing", list(missing)), ("unexpected", list(unexpected)), ("wrong shape", list(misshaped))) if names]
    return LmforgeError(f"{source} {problem}: {'; '.join(problems)}; {hint}") if problems else None


def load_checked(params: Mapping[str, Tensor], tensors: Mapping[str, Tensor], source: str | Path, *,
                 hint: str = "check that config.json belongs to these weights",
                 optional: Iterable[str] = (), problem: str = "does not fit this model") -> None:
    """Copy `tensors` into the model tensors `params` (name -> tensor), after checking every name and shape.

    Every checked load of weights goes through here (model files, heads, adapters, resumed
    checkpoints): a missing, unexpected or mis-shaped tensor is named in one line, and nothing is
    copied unless everything fits. Names in `optional` may be absent (e.g. a frozen base that the
    caller rebuilt).
    """
    skip = set(optional)
    error = mismatch(
        source,
        missing=[k for k in params if k not in tensors and k not in skip],
        unexpected=[k for k in tensors if k not in params],
        misshaped=[f"{k} {tuple(tensors[k].shape)} (model: {tuple(v.shape)})"
                   for k, v in params.items() if k in tensors and tensors[k].shape != v.shape],
        hint=hint,
        problem=problem,
    )
    if error is not None:
        raise error
    with torch.no_grad():
        for k, v in params.items():
            if k in tensors:
                v.copy_(tensors[k])


def _names(items: list[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def weight_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards a model.safetensors.index.json lists."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing or not shards:
            raise LmforgeError(f"{index} lists shards that are not in {folder}: {missing or 'none listed'}")
        return [folder / s for s in shards]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise LmforgeError(
            f"{folder} has only pickle weights (*.bin / *.pt), which lmforge never loads; convert them to safetensors"
        )
    raise LmforgeError(f"{folder} has no model.safetensors or model.safetensors.index.json; is the download complete?")
