"""`lmforge sft`, `lmforge classify` and `lmforge lora merge`: thin verbs over `lmforge.train.finetune`.

The training verbs take `--config FILE.yaml` plus `--section.key` overrides generated from the
recipe dataclasses (sections finetune, data, head, train, lora), like `pretrain`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.recipes import add_config_flags, load_recipe

SFT_HELP = """Supervised fine-tuning of a decoder on conversations. data.train is JSONL with one row per line:
{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]} or
{"instruction": ..., "input": ... (optional), "output": ...}. Rows are rendered with the model's chat
template and the loss covers the assistant tokens only. Add --lora.rank 8 to train LoRA adapters."""

CLASSIFY_HELP = """Train a sequence classifier (a head on a decoder or an encoder) on a CSV, TSV or JSONL file with
text and label columns, or with --predict MODEL label new texts. The evaluation split is scored
with accuracy, macro-F1 and a confusion matrix."""


def _done(result) -> str:
    final = result.train.final_eval or {}
    scores = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float))
    return f"done: {result.train.step} steps, model in {result.train.out_dir}" + (f" ({scores})" if scores else "")


def cmd_sft(args: argparse.Namespace) -> None:
    from lmforge.train.finetune import run_sft, sft_sections

    result = run_sft(load_recipe(args, sft_sections()), progress=True, report=print)
    print(_done(result))


def _texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.texts)
    if args.input:
        path = Path(args.input)
        if not path.is_file():
            raise LmforgeError(f"--input {path} does not exist; pass a text file with one text per line")
        texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return texts


def cmd_classify(args: argparse.Namespace) -> None:
    from lmforge.train import finetune

    if args.predict:
        texts = _texts(args)
        if not texts:
            raise LmforgeError("--predict MODEL needs texts: write them after the model or pass --input FILE")
        model, tokenizer = finetune.load_classifier(args.predict)
        for text, p in zip(texts, finetune.predict(model, tokenizer, texts)):
            print(f"{p.label}\t{p.probability:.3f}\t{text}")
        return
    if args.texts or args.input:
        raise LmforgeError("texts to label need --predict MODEL; to train, pass --config and --section.key flags only")
    result = finetune.run_classify(load_recipe(args, finetune.classify_sections()), progress=True, report=print)
    print(_done(result))
    if result.eval_report is not None:
        r = result.eval_report
        print(f"evaluation on {r.n} texts: accuracy {r.accuracy:.4f}, macro-F1 {r.macro_f1:.4f}\n{r.table()}")


def cmd_lora_merge(args: argparse.Namespace) -> None:
    from lmforge.train.finetune import merge_adapter

    merge_adapter(args.base, args.adapter, args.out, hf=args.hf)
    print(f"wrote the merged model to {args.out} ({'Hugging Face' if args.hf else 'lmforge'} format)")


def add_verbs(verbs: argparse._SubParsersAction) -> None:
    """Add `sft`, `classify` and `lora` to the `lmforge` parser."""
    from lmforge.train.finetune import classify_sections, sft_sections

    formatter = argparse.ArgumentDefaultsHelpFormatter
    p = verbs.add_parser("sft", help="supervised fine-tuning on conversations or instructions (assistant tokens only)",
                         description=SFT_HELP, formatter_class=formatter)
    add_config_flags(p, sft_sections())
    p.set_defaults(func=cmd_sft)

    p = verbs.add_parser("classify", help="train a sequence classifier, or label texts with --predict",
                         description=CLASSIFY_HELP, formatter_class=formatter)
    p.add_argument("--predict", metavar="MODEL", help="label texts with the classifier in MODEL instead of training")
    p.add_argument("texts", nargs="*", help="with --predict: the texts to label")
    p.add_argument("--input", metavar="FILE", help="with --predict: a file with one text per line")
    add_config_flags(p, classify_sections())
    p.set_defaults(func=cmd_classify)

    lora = verbs.add_parser("lora", help="LoRA adapter tools").add_subparsers(dest="lora_verb", required=True)
    p = lora.add_parser("merge", help="merge an adapter into its base model and write the result")
    p.add_argument("base", help="the base model folder the adapter was trained on")
    p.add_argument("adapter", help="folder with adapter.safetensors and adapter_config.json (a LoRA run folder)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--hf", action="store_true", help="write a Hugging Face folder (transformers loads it) instead of lmforge format")
    p.set_defaults(func=cmd_lora_merge)
