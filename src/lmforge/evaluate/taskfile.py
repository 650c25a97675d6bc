"""lm-evaluation-harness task files: YAML in, a checked `TaskSpec` with its documents out.

The YAML vocabulary is lm-eval's (`task`, `dataset_path`, `doc_to_text`, ...), read as lm-eval
0.4 reads it, so a task file users already have runs unchanged:
- `include: base.yaml` merges the base first, the file's own keys win; `group:` with a `task:`
  list names a group of tasks (names or inline task dicts).
- `dataset_path: json | csv | text` with `dataset_kwargs.data_files` (a file, a list, or a dict
  split -> files) is read with plain readers giving the documents, and their column types, in the
  order `datasets.load_dataset` gives them; relative files are looked up from the working
  directory (as lm-eval does) and then beside the YAML.
- `doc_to_text` / `doc_to_target` / `doc_to_choice` are a column name or a Jinja template (strict
  undefined, trailing newlines kept, a `regex_replace` filter), with lm-eval's conversions (a
  digit string is a choice index, `[...]` is a list of targets).
A key lmforge cannot honour (Python functions, prompt sources, repeats) is refused by name
instead of silently changing the numbers; every error names the task and the field.
"""

from __future__ import annotations

import ast
import csv
import functools
import gzip
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

Doc = dict[str, Any]
OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until", "diversity")
UNSUPPORTED = ("process_docs", "process_results", "use_prompt", "doc_to_image", "doc_to_audio", "custom_dataset",
               "fewshot_config", "gen_prefix")
IGNORED = ("tag", "task_alias", "group_alias", "metadata", "should_decontaminate", "doc_to_decontamination_query",
           "dataset_name", "unsafe_code", "aggregate_metric_list")
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


@dataclass
class TaskSpec:
    """One task of a task file, with lm-eval's defaults."""

    task: str
    output_type: str = "generate_until"
    dataset_path: str | None = None  # json, csv or text
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)  # data_files, delimiter, field
    training_split: str | None = None
    validation_split: str | None = None
    test_split: str | None = None
    fewshot_split: str | None = None
    doc_to_text: Any = None  # a column name, a Jinja template or an int
    doc_to_target: Any = None
    doc_to_choice: Any = None  # a column, a template rendering a Python list, a list or a dict
    description: str = ""  # put before the few-shot examples (a template too)
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int | None = None
    generation_kwargs: dict[str, Any] | None = None
    filter_list: list[dict[str, Any]] | None = None
    metric_list: list[dict[str, Any]] | None = None
    repeats: int = 1
    version: Any = None  # metadata.version, shown in the results table
    source: Path | None = None  # the YAML file

    def where(self, key: str) -> str:
        """'task X (file.yaml), field KEY' — the start of every error about this task."""
        return f"task {self.task} ({self.source.name if self.source else 'inline'}), {key}"


# ---------------------------------------------------------------- YAML


def read_yaml(path: Path, seen: frozenset[Path] = frozenset()) -> dict[str, Any]:
    """A task file with its `include`s merged (the including file's keys win)."""
    import yaml

    path = path.expanduser().resolve()
    if path in seen:
        raise LmforgeError(f"{path}: include cycle; a task file cannot include itself")
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_loader())
    except yaml.YAMLError as e:
        raise LmforgeError(f"{path} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    except OSError as e:
        raise LmforgeError(f"cannot read task file {path} ({e.strerror})") from None
    if not isinstance(cfg, dict):
        raise LmforgeError(f"{path} must hold a YAML mapping (task: ..., dataset_path: ...)")
    includes = cfg.pop("include", None)
    if includes is None:
        return cfg
    merged: dict[str, Any] = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        base = read_yaml(path.parent / inc, seen | {path})
        base.pop("task_list", None)
        merged.update(base)
    return {**merged, **cfg}


def _loader() -> type:
    """yaml's safe loader that reads lm-eval's `!function` tag as a marker (refused when used)."""
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Loader(base):  # type: ignore[misc, valid-type]
        pass

    Loader.add_constructor("!function", lambda loader, node: PythonFunction(loader.construct_scalar(node)))
    return Loader


@dataclass(frozen=True)
class PythonFunction:
    """A `!function module.name` value: Python code, which lmforge does not run."""

    name: str


def task_spec(cfg: dict[str, Any], source: Path | None) -> TaskSpec:
    """A checked TaskSpec from a task's merged YAML mapping."""
    name = str(cfg.get("task"))
    spec = TaskSpec(task=name, source=source)
    known = {f.name for f in fields(TaskSpec)} - {"version", "source"}
    for key, value in cfg.items():
        if key in UNSUPPORTED or isinstance(value, PythonFunction):
            raise LmforgeError(f"{spec.where(key)}: lmforge eval does not run {key} "
                               f"{'(Python code)' if isinstance(value, PythonFunction) else ''}; "
                               "express it with templates and columns, or drop it")
        if key in known:
            setattr(spec, key, value)
        elif key not in IGNORED:
            raise LmforgeError(f"{spec.where(key)}: unknown key; lm-eval task keys are "
                               f"{', '.join(sorted(known | set(IGNORED)))}")
    metadata = cfg.get("metadata")
    spec.version = metadata.get("version") if isinstance(metadata, dict) else None
    spec.dataset_kwargs = dict(spec.dataset_kwargs or {})
    _check(spec)
    return spec


def _check(spec: TaskSpec) -> None:
    if spec.output_type not in OUTPUT_TYPES:
        raise LmforgeError(f"{spec.where('output_type')}: {spec.output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
    if spec.dataset_path not in ("json", "csv", "text"):
        raise LmforgeError(f"{spec.where('dataset_path')}: {spec.dataset_path!r} is not supported; use json, csv or "
                           "text with dataset_kwargs.data_files")
    if spec.test_split is None and spec.validation_split is None:
        raise LmforgeError(f"{spec.where('test_split')}: a task needs test_split or validation_split to evaluate on")
    if spec.repeats != 1:
        raise LmforgeError(f"{spec.where('repeats')}: only 1 is supported (greedy answers repeat themselves)")
    if spec.output_type == "multiple_choice" and spec.doc_to_choice is None:
        raise LmforgeError(f"{spec.where('doc_to_choice')}: multiple_choice needs the list of choices")
    if spec.output_type in ("generate_until", "diversity"):
        spec.generation_kwargs = _generation_kwargs(spec)


def _generation_kwargs(spec: TaskSpec) -> dict[str, Any]:
    """lm-eval's defaults: `until` the few-shot delimiter when missing, 256 new tokens; refused:
    sampling (the harness is greedy), and no stop at all with no token limit."""
    given = spec.generation_kwargs
    if given is None:
        return {"until": [spec.fewshot_delimiter], "do_sample": False, "temperature": 0.0, "max_gen_toks": 256}
    if not isinstance(given, dict):
        raise LmforgeError(f"{spec.where('generation_kwargs')}: must be a mapping (until: [...], max_gen_toks: N)")
    kwargs = dict(given)
    until = kwargs.get("until", [spec.fewshot_delimiter])
    until = [until] if isinstance(until, str) else list(until or [])
    limits = [kwargs[k] for k in MAX_TOKEN_KEYS if kwargs.get(k) is not None]
    if not [u for u in until if u] and not limits:
        raise LmforgeError(f"{spec.where('generation_kwargs')}: generate_until has no `until` stop string and no "
                           "`max_gen_toks`; give at least one so generation ends")
    if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0)) > 0:
        raise LmforgeError(f"{spec.where('generation_kwargs')}: sampling (do_sample / temperature) is not supported; "
                           "lmforge eval decodes greedily")
    return {"until": until, "do_sample": False, "temperature": 0.0, "max_gen_toks": int(limits[0] if limits else 256)}


# ---------------------------------------------------------------- documents


def load_splits(spec: TaskSpec) -> dict[str, list[Doc]]:
    """Every split named by `data_files`, each a list of documents with one set of columns."""
    files = spec.dataset_kwargs.get("data_files")
    if files is None:
        raise LmforgeError(f"{spec.where('dataset_kwargs.data_files')}: name the local file(s) of the data")
    by_split = files if isinstance(files, dict) else {"train": files}
    return {split: _unify([doc for f in ([paths] if isinstance(paths, str) else paths)
                           for doc in _read(spec, _resolve(spec, f))])
            for split, paths in by_split.items()}


def split_docs(spec: TaskSpec, splits: dict[str, list[Doc]], key: str) -> list[Doc]:
    """The documents of the split named by the field `key` (test_split, fewshot_split, ...)."""
    name = getattr(spec, key)
    if name not in splits:
        raise LmforgeError(f"{spec.where(key)}: split {name!r} is not in the data (splits: {', '.join(splits)}); "
                           "set it to one of them or add it to dataset_kwargs.data_files")
    return splits[name]


def _resolve(spec: TaskSpec, name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_file() or path.is_absolute() or spec.source is None:
        found = path
    else:
        found = spec.source.parent / path
    if not found.is_file():
        raise LmforgeError(f"{spec.where('dataset_kwargs.data_files')}: {name} does not exist (looked in the "
                           "working directory and beside the task file)")
    return found


def _read(spec: TaskSpec, path: Path) -> list[Doc]:
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    if spec.dataset_path == "text":
        return [{"text": line} for line in text.splitlines()]
    if spec.dataset_path == "csv":
        return _read_csv(spec, text)
    return _read_json(spec, path, text)


def _read_json(spec: TaskSpec, path: Path, text: str) -> list[Doc]:
    try:
        stripped = text.lstrip()
        if stripped.startswith("["):
            return json.loads(text)
        if stripped.startswith("{") and "field" in spec.dataset_kwargs:
            return json.loads(text)[spec.dataset_kwargs["field"]]
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, KeyError) as e:
        raise LmforgeError(f"{spec.where('dataset_kwargs.data_files')}: {path} is not JSON lines or a JSON list "
                           f"({e})") from None


def _read_csv(spec: TaskSpec, text: str) -> list[Doc]:
    """CSV as `datasets` reads it through pandas: `delimiter`/`sep`, `column_names` (then no header row is
    taken from the file), `skiprows`, `quoting`, `keep_default_na`; cells typed per column."""
    kw = spec.dataset_kwargs
    known = {"data_files", "delimiter", "sep", "column_names", "skiprows", "quoting", "keep_default_na"}
    if unknown := sorted(set(kw) - known):
        raise LmforgeError(f"{spec.where('dataset_kwargs')}: {', '.join(unknown)} not supported for csv "
                           f"(supported: {', '.join(sorted(known))})")
    lines = text.splitlines()[int(kw.get("skiprows", 0)):]
    rows = list(csv.reader(lines, delimiter=kw.get("delimiter", kw.get("sep", ",")), quoting=int(kw.get("quoting", 0))))
    names = kw.get("column_names") or (rows.pop(0) if rows else [])
    missing = set() if kw.get("keep_default_na", True) is False else PANDAS_NA
    return _typed_columns([dict(zip(names, row)) for row in rows if row], missing)


PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})  # pandas' default NA strings


def _typed_columns(rows: list[dict[str, str]], missing: frozenset[str] | set[str]) -> list[Doc]:
    """CSV cells typed per column as pandas (and so `datasets`) types them: int, float, bool or str;
    the `missing` strings become None."""
    if not rows:
        return rows
    for col in rows[0]:
        values = [r[col] for r in rows]
        for parse in (int, float, _boolean, str):
            try:
                parsed = [None if v in missing else parse(v) for v in values]
            except ValueError:
                continue
            for r, v in zip(rows, parsed):
                r[col] = v
            break
    return rows


def _boolean(value: str) -> bool:
    if value not in ("True", "False"):
        raise ValueError(value)
    return value == "True"


def _unify(docs: list[Doc]) -> list[Doc]:
    """One set of columns in first-seen order; a document without a column holds None there."""
    columns = list(dict.fromkeys(k for d in docs for k in d))
    return [{c: d.get(c) for c in columns} for d in docs]


# ---------------------------------------------------------------- templates


def render(spec: TaskSpec, key: str, template: str, doc: Doc) -> str:
    """`template` rendered with the document's fields; errors name the task, the field and the cause."""
    import jinja2

    try:
        return _environment().from_string(template).render(**doc)
    except jinja2.TemplateSyntaxError as e:
        raise LmforgeError(f"{spec.where(key)}: template error ({e.message}, line {e.lineno}) in {template!r}") from None
    except jinja2.UndefinedError as e:
        raise LmforgeError(f"{spec.where(key)}: {e.message} in {template!r}; the documents have "
                           f"{', '.join(doc)}") from None


@functools.cache
def _environment() -> Any:
    """lm-eval's Jinja environment: strict undefined, trailing newline kept, `regex_replace`."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    return env


def doc_to_text(spec: TaskSpec, doc: Doc) -> str | int:
    """The question part of a document (an int: the index of a choice, for multiple inputs)."""
    how = spec.doc_to_text
    if isinstance(how, int) or (isinstance(how, str) and how in doc):
        return how if isinstance(how, int) else doc[how]
    if not isinstance(how, str):
        raise LmforgeError(f"{spec.where('doc_to_text')}: must be a column name or a template; got {how!r}")
    text = render(spec, "doc_to_text", how, doc)
    return ast.literal_eval(text) if text.isdigit() and spec.doc_to_choice is not None else text


def doc_to_target(spec: TaskSpec, doc: Doc) -> Any:
    """The answer: a string, a choice index, or a list of acceptable answers."""
    how = spec.doc_to_target
    if isinstance(how, (int, list)) or (isinstance(how, str) and how in doc):
        return doc[how] if isinstance(how, str) else how
    if not isinstance(how, str):
        raise LmforgeError(f"{spec.where('doc_to_target')}: must be a column name or a template; got {how!r}")
    text = render(spec, "doc_to_target", how, doc)
    if text.isdigit() and spec.doc_to_choice is not None:
        return ast.literal_eval(text)
    if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
        try:
            return ast.literal_eval(text)
        except (SyntaxError, ValueError):
            return text
    return text


def doc_to_choice(spec: TaskSpec, doc: Doc) -> list[str]:
    """The choices of a document, checked to be a list of strings."""
    how = spec.doc_to_choice
    if isinstance(how, str) and how in doc:
        choices = doc[how]
    elif isinstance(how, str):
        text = render(spec, "doc_to_choice", how, doc)
        try:
            choices = ast.literal_eval(text)
        except (SyntaxError, ValueError):
            choices = text
    else:
        choices = list(how.values()) if isinstance(how, dict) else how
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise LmforgeError(f"{spec.where('doc_to_choice')}: gave {choices!r}, not a list of strings; write a YAML "
                           "list, a list column, or a template rendering one like \"{{['no', 'yes']}}\"")
    return choices


__all__ = [
    "OUTPUT_TYPES",
    "Doc",
    "TaskSpec",
    "doc_to_choice",
    "doc_to_target",
    "doc_to_text",
    "load_splits",
    "read_yaml",
    "render",
    "split_docs",
    "task_spec",
]
