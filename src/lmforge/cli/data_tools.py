"""Diagnosis verbs for data, tokenizers and memory: drift, tokenizer stats, plan.

Each parses, calls one library function of `lmforge.diagnose`, prints the plain-text report and
writes its picture. Library modules are imported inside the command functions, so
`lmforge --help` starts without loading torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from lmforge.errors import LmforgeError

Setup = Callable[[argparse.ArgumentParser], None]

DRIFT_HELP = """Compare a new corpus against a reference one: token-frequency Jensen-Shannon divergence
(against the reference's own half-to-half noise floor), new-token and fallback rates, document
lengths, the tokens whose share moved most and, with --model, each corpus's perplexity. Inputs are
text files (one document per line), JSONL files (one per row) or folders of them, or
`lmforge prepare` folders. Without --tokenizer or --model the units are words."""


def _add_corpus_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--max-mb", type=float, default=8.0, help="read at most this many megabytes of text per corpus")


def _max_bytes(args: argparse.Namespace) -> int:
    if args.max_mb <= 0:
        raise LmforgeError(f"--max-mb must be > 0; got {args.max_mb}")
    return int(args.max_mb * 1e6)


# ---------------------------------------------------------------- drift


def cmd_drift(args: argparse.Namespace) -> None:
    from lmforge.diagnose.corpus import load_tokenizer, read_corpus
    from lmforge.diagnose.drift import compare_corpora, perplexity, plot_drift

    ref, new = (read_corpus(p, text_field=args.text_field, max_bytes=_max_bytes(args)) for p in (args.reference, args.new))
    lm = _decoder(args.model) if args.model else None
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else (lm.tokenizer if lm else None)
    report = compare_corpora(ref, new, tokenizer)
    if lm is not None:
        report.reference.perplexity = perplexity(lm.model, lm.tokenizer, ref)
        report.new.perplexity = perplexity(lm.model, lm.tokenizer, new)
    plot_drift(report, args.plot)
    print("\n".join(report.lines()))
    print(f"wrote {args.plot}")


def _decoder(path: str):  # -> lmforge.api.LM
    import lmforge

    lm = lmforge.load(path)
    if getattr(lm.model, "config", None) is None or lm.model.config.kind != "decoder" or lm.tokenizer is None:
        raise LmforgeError(f"--model {path} must be a causal language model with its tokenizer (perplexity needs next-token predictions)")
    return lm


def setup_drift(p: argparse.ArgumentParser) -> None:
    p.description = DRIFT_HELP
    p.add_argument("reference", help="the corpus the model was trained on (file, folder or prepare output)")
    p.add_argument("new", help="the corpus to compare (file, folder or prepare output)")
    p.add_argument("--tokenizer", help="count tokens of this tokenizer folder (default: the model's, else words)")
    p.add_argument("--model", help="also report each corpus's perplexity under this causal LM")
    p.add_argument("--plot", default="drift.png", help="where to write the picture")
    _add_corpus_flags(p)
    p.set_defaults(func=cmd_drift)


# ---------------------------------------------------------------- tokenizer stats


def cmd_tokenizer_stats(args: argparse.Namespace) -> None:
    from lmforge.diagnose.corpus import load_tokenizer, read_corpus
    from lmforge.diagnose.tokenizer_stats import plot_stats, stats_table, tokenizer_stats

    corpora = [read_corpus(p, text_field=args.text_field, max_bytes=_max_bytes(args)) for p in args.files]
    names = [args.tokenizer] + ([args.compare] if args.compare else [])
    stats = [tokenizer_stats(load_tokenizer(name), corpora, name) for name in names]
    plot_stats(stats, args.plot)
    print("\n".join(stats_table(stats)))
    print(f"wrote {args.plot}")


def add_tokenizer_stats(verbs: argparse._SubParsersAction) -> None:
    """The `tokenizer stats` sub-verb (the `tokenizer` verb lives in cli/train.py)."""
    s = verbs.add_parser("stats", help="fertility, fallbacks, vocabulary usage and longest tokens on some text",
                         description="Tokens per word and per byte for each file and each writing system, the share "
                                     "of byte-fallback and unknown tokens, the vocabulary never used and the longest "
                                     "tokens; with --compare, two tokenizers side by side.")
    s.add_argument("tokenizer", help="tokenizer folder (or a model folder with its tokenizer)")
    s.add_argument("files", nargs="+", help="text / JSONL files or folders; each is reported on its own")
    s.add_argument("--compare", metavar="OTHER", help="a second tokenizer to show side by side")
    s.add_argument("--plot", default="tokenizer_stats.png", help="where to write the picture")
    _add_corpus_flags(s)
    s.set_defaults(func=cmd_tokenizer_stats)


# ---------------------------------------------------------------- plan

PLAN_HELP = """Plan the memory of training before anything is allocated: parameters, gradients, AdamW state,
activations with and without activation checkpointing, the loss buffers and the KV cache per token,
against this machine's free memory (CPU RAM, or the GPU), with suggestions when it does not fit.
Give a training recipe (--config) or a model folder with the batch shape. Training verbs run the
same plan before they start and refuse a run that will not fit (train.check_memory: false skips it)."""


def cmd_plan(args: argparse.Namespace) -> None:
    from lmforge.diagnose.plan import PlanRequest, plan_memory, plot_plan, request_from_recipe

    if args.config:
        if args.model:
            raise LmforgeError("give either --config RECIPE or a MODEL folder, not both")
        from lmforge.cli.flags import read_yaml

        request = request_from_recipe(read_yaml(Path(args.config)))
    elif args.model:
        from lmforge.checkpoint import load_model_config

        config = load_model_config(args.model)
        request = PlanRequest(config, args.batch_size, args.seq_len or config.max_seq_len, args.precision,
                              args.lora, bits=args.bits, activation_checkpointing=args.activation_checkpointing)
    else:
        raise LmforgeError("nothing to plan: pass a MODEL folder (with --batch-size and --seq-len) or --config RECIPE")
    plan = plan_memory(request)
    plot_plan(plan, args.plot)
    print("\n".join(plan.lines()))
    print(f"wrote {args.plot}")


def setup_plan(p: argparse.ArgumentParser) -> None:
    p.description = PLAN_HELP
    p.add_argument("model", nargs="?", help="a model folder (lmforge or Hugging Face); only config.json is read")
    p.add_argument("--config", help="a training recipe (YAML) to plan instead")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default: the model's max_seq_len)")
    p.add_argument("--precision", default="float32", choices=("float32", "bfloat16"), help="training precision (autocast)")
    p.add_argument("--lora", type=int, default=0, metavar="R", help="train LoRA adapters of rank R instead of every weight")
    p.add_argument("--bits", type=int, choices=(4, 8), help="a quantized frozen base (with --lora: QLoRA)")
    p.add_argument("--activation-checkpointing", action="store_true", help="plan with activation checkpointing")
    p.add_argument("--plot", default="plan.png", help="where to write the picture")
    p.set_defaults(func=cmd_plan)


def refuse_if_too_big(recipe: dict) -> None:
    """Stop a training verb before it allocates anything when its plan will not fit (see `lmforge plan`)."""
    from lmforge.diagnose.plan import refuse_if_too_big as check

    check(recipe)


VERBS: dict[str, tuple[str, Setup]] = {  # verb -> (one-line help, adds its arguments)
    "drift": ("compare two corpora: token divergence, new tokens, lengths, perplexity; drift.png", setup_drift),
    "plan": ("plan the memory of a training run (weights, optimizer, activations) against free memory", setup_plan),
}
