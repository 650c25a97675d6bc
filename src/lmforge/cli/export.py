"""`lmforge export`: write a model for another runtime (today: one GGUF file for llama.cpp and Ollama).

A verb of its own rather than a `convert --to gguf`: `convert` turns a folder into another folder
that lmforge and transformers both read back, while `export` writes a single file for a different
runtime, with a quantization choice (`--dtype`) that only that runtime's format has. The library
function is `LM.save_gguf`; the library is imported inside the command so `lmforge --help` stays light.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

Setup = Callable[[argparse.ArgumentParser], None]
GGUF_DTYPES = ("f32", "f16", "q8_0", "q4_0")  # checkpoint/gguf.py's DTYPES, kept here so --help needs no torch


def cmd_export(args: argparse.Namespace) -> None:
    import lmforge

    lm = lmforge.load(args.model)
    out = Path(args.out)
    lm.save_gguf(out, dtype=args.dtype)
    print(f"wrote {out} ({args.dtype}, {out.stat().st_size / 2**20:.1f} MiB); run it with: llama-cli -m {out}")


def setup_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run folder, a Hugging Face folder or a GGUF file")
    p.add_argument("--format", choices=("gguf",), default="gguf", help="the file format (llama.cpp / Ollama: gguf)")
    p.add_argument("--out", required=True, help="the file to write, e.g. model.gguf")
    p.add_argument("--dtype", choices=GGUF_DTYPES, default="f16",
                   help="weight matrices as float32, float16, 8-bit (q8_0) or 4-bit (q4_0) blocks; vectors stay float32")
    p.set_defaults(func=cmd_export)


VERBS: dict[str, tuple[str, Setup]] = {  # verb -> (one-line help, adds its arguments)
    "export": ("write a GGUF file that llama.cpp and Ollama run (tokenizer and chat template inside)", setup_export),
}
