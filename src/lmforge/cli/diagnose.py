"""Diagnosis verbs: doctor (a run's health, a model's tokenizer and template, the installation) and attention.

Each parses, calls `lmforge.diagnose`, and prints. Library modules are imported inside the command
functions, so `lmforge --help` starts without loading torch.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

Setup = Callable[[argparse.ArgumentParser], None]


# ---------------------------------------------------------------- doctor


def environment_lines() -> list[str]:
    """Versions, devices and whether the native decode kernels are built."""
    import platform

    import torch

    import lmforge
    from lmforge.models import kernels

    lines = [f"lmforge {lmforge.__version__} · python {platform.python_version()} · torch {torch.__version__}",
             f"threads {torch.get_num_threads()} · cuda {torch.cuda.is_available()}"
             + (f" ({torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()})" if torch.cuda.is_available() else ""),
             "native decode kernels: " + (f"yes (built in {kernels.cache_dir()})" if kernels.native()
                                          else "no, decode uses oneDNN and PyTorch attention"
                                          + (", the portable int8 / int4 matmuls" if kernels.portable() else "")
                                          + " (run `lmforge -v doctor` for why)")]
    for name in ("tokenizers", "safetensors", "transformers", "fastapi", "uvicorn"):
        try:
            mod = __import__(name)
            lines.append(f"{name} {getattr(mod, '__version__', '?')}")
        except ImportError:
            lines.append(f"{name} not installed")
    return lines


def doctor_model(args: argparse.Namespace) -> int:
    """`doctor MODEL`: the installation, the model summary, tokenizer and chat-template checks."""
    import lmforge
    from lmforge.diagnose.model_check import check_lines, tokenizer_checks

    lm = lmforge.load(args.path)
    checks = tokenizer_checks(lm.tokenizer, lm.config.vocab_size) if lm.tokenizer else []
    if args.json:
        print(json.dumps([asdict(c) for c in checks], ensure_ascii=False, indent=1))
    else:
        n = sum(p.numel() for p in lm.model.parameters())
        print("\n".join(environment_lines()))
        print(f"{args.path}: {lm.config.kind}, {n / 1e6:.2f}M parameters, context {lm.config.max_seq_len}, "
              f"tokenizer {'yes' if lm.tokenizer else 'no'}")
        print("\n".join(check_lines(checks)))
    return 0 if all(c.ok for c in checks) else 1


def _sample_finding(run: Path, reference: str, n_samples: int):
    """low_diversity from samples of the run's final model, or None."""
    import lmforge
    from lmforge.diagnose.doctor import check_samples

    lm = lmforge.load(run)
    return check_samples(lambda prompt: lm.generate(prompt, max_new_tokens=48, temperature=0.8, top_p=0.95, seed=0),
                         reference, n_samples)


def doctor_run(args: argparse.Namespace) -> int:
    """`doctor RUN_DIR`: findings from metrics.jsonl (and samples, with --reference), and doctor.png."""
    from lmforge.diagnose.doctor import diagnose
    from lmforge.diagnose.plots import plot_doctor
    from lmforge.diagnose.run import read_run
    from lmforge.errors import LmforgeError

    run = read_run(args.path)
    findings = diagnose(run)
    if args.reference:
        try:
            reference = Path(args.reference).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LmforgeError(f"cannot read --reference {args.reference}: {e}") from None
        sampled = _sample_finding(run.folder, reference, args.samples)
        findings += [sampled] if sampled else []
    out = Path(args.out) if args.out else run.folder / "doctor.png"
    plot_doctor(run, out)
    if args.json:
        print(json.dumps([f.as_dict() for f in findings], ensure_ascii=False, indent=1))
        return 0
    steps = run.train[-1]["step"]
    print(f"{run.folder}: {steps} steps, {len(run.evals)} evaluations; "
          + (f"{len(findings)} finding{'s' * (len(findings) != 1)}" if findings else "no problems found"))
    for f in findings:
        print(f"\n[{f.severity}] {f.code}: {f.evidence}\n  -> {f.advice}")
    if not args.reference:
        print("\nsample diversity not checked: pass --reference TRAIN_TEXT to compare samples with the training text")
    print(f"\nwrote {out}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from lmforge.diagnose.run import is_run_folder
    from lmforge.errors import LmforgeError

    if args.path is None:
        print("\n".join(environment_lines()))
        return 0
    path = Path(args.path)
    if not path.exists():
        raise LmforgeError(f"{path} does not exist; pass a run folder (with metrics.jsonl) or a model folder")
    return doctor_run(args) if is_run_folder(path) else doctor_model(args)


def setup_doctor(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", metavar="RUN_DIR|MODEL",
                   help="a training run folder (diagnose its health) or a model folder (check its tokenizer and "
                        "chat template); nothing: versions and devices")
    p.add_argument("--json", action="store_true",
                   help='print the findings as JSON: [{"code", "severity", "evidence", "advice"}] (a model: its checks)')
    p.add_argument("--reference", metavar="TEXT_FILE",
                   help="the training text: sample from the run's model and compare their diversity with it")
    p.add_argument("--samples", type=int, default=8, help="samples drawn for the diversity check")
    p.add_argument("--out", help="where to write the picture (default RUN_DIR/doctor.png)")
    p.set_defaults(func=cmd_doctor)


# ---------------------------------------------------------------- attention


def cmd_attention(args: argparse.Namespace) -> None:
    import lmforge
    from lmforge.diagnose.attention import check_choice, plot_attention

    maps = lmforge.load(args.model).attention(args.text)
    check_choice(maps, args.layer, args.head)
    plot_attention(maps, Path(args.out), layer=args.layer, head=args.head)
    n_layers, n_heads = maps.probs.shape[:2]
    print(f"wrote {args.out}: {len(maps.tokens)} tokens, {n_layers} layers x {n_heads} heads"
          + (f", layer {args.layer}" if args.layer is not None else "") + (f", head {args.head}" if args.head is not None else ""))


def setup_attention(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="run folder or Hugging Face folder")
    p.add_argument("--text", required=True, help="the text whose attention to show")
    p.add_argument("--layer", type=int, default=None, help="only this layer (0-based; default: all)")
    p.add_argument("--head", type=int, default=None, help="only this head (0-based; default: all)")
    p.add_argument("--out", default="attn.png", help="the PNG to write")
    p.set_defaults(func=cmd_attention)


VERBS: dict[str, tuple[str, Setup]] = {  # verb -> (one-line help, adds its arguments)
    "doctor": ("diagnose a training run (findings + doctor.png), check a model folder, or report versions", setup_doctor),
    "attention": ("draw a model's attention maps for a text, with the tokens as labels", setup_attention),
}
