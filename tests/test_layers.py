"""Layers only look down: every lmforge import, also those inside functions, points to the same or a lower layer.

The order is DESIGN.md's (ARCHITECTURE.md explains it): a module may import its own layer and the
layers listed before it, never one after it. The test parses the source, so a lazy import inside
a function counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmforge"
LAYERS = [  # lowest first; a name is a top-level module or package of lmforge
    "errors", "config", "figures", "tokenizer", "models", "checkpoint", "quantize", "data", "generate", "evaluate", "train",
    "diagnose", "rag", "api", "support", "quickstart", "serve", "cli",
]
FORBIDDEN = {  # edges the layer order allows but the design does not: (importer prefix, imported prefix) -> why
    ("api", "train.align"): "scoring lives in evaluate/, not in a training verb",
    ("api", "train.grpo"): "the API loads and runs models; it never starts a training verb",
    ("api", "train.finetune"): "the API loads and runs models; it never starts a training verb",
    ("serve", "train"): "the server runs models; loading is the API's job",
}


def layer_of(module: str) -> str:
    """`lmforge.train.setup` -> `train`; the package's own `__init__` counts as the top."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "cli"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def lmforge_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of lmforge in the file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("lmforge.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lmforge":  # from lmforge import api, cli ...
                found += [(node.lineno, f"lmforge.{a.name}") for a in node.names]
            elif node.module.startswith("lmforge."):
                found.append((node.lineno, node.module))
    return found


def violations(files: list[Path]) -> list[str]:
    out = []
    for path in files:
        here = module_name(path)
        if path.name == "__init__.py" and here == "lmforge":
            continue  # the package front door re-exports the public API
        mine = layer_of(here)
        for line, target in lmforge_imports(path):
            theirs = layer_of(target)
            where = f"{path.relative_to(SRC.parent)}:{line} imports {target}"
            if mine not in LAYERS or theirs not in LAYERS:
                out.append(f"{where}: {mine if mine not in LAYERS else theirs} is in no layer; add it to DESIGN.md's order")
            elif LAYERS.index(theirs) > LAYERS.index(mine):
                out.append(f"{where}: {mine} may not import the higher layer {theirs}")
            for (importer, imported), why in FORBIDDEN.items():
                if here.removeprefix("lmforge.").startswith(importer) and target.removeprefix("lmforge.").startswith(imported):
                    out.append(f"{where}: {why}")
    return out


def test_every_import_points_down():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 40
    assert violations(files) == []


@pytest.mark.parametrize(("source", "module", "needle"), [
    ("config.py", "from lmforge.models import build_model", "config may not import the higher layer models"),
    ("models/heads.py", "from lmforge.checkpoint.io import read_json", "models may not import the higher layer checkpoint"),
    ("quantize/x.py", "from lmforge.train.lora import matches", "quantize may not import the higher layer train"),
    ("train/x.py", "from lmforge import recipes", "recipes is in no layer"),
    ("api.py", "from lmforge.train.align import score_texts", "scoring lives in evaluate/"),
])
def test_the_rules_fail_when_broken(tmp_path, monkeypatch, source, module, needle):
    fake = tmp_path / "lmforge" / source
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_text(f"def f():\n    {module}\n")  # a lazy import inside a function counts too
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path / "lmforge")
    assert any(needle in v for v in violations([fake])), violations([fake])
