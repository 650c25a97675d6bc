"""Inference verbs: generate, chat, serve, convert, quantize.

Each parses, calls the library (`lmforge.load` and the `LM` it returns, the server, the
quantizer), and prints. Library modules are imported inside the command functions, so
`lmforge --help` starts without loading torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

Setup = Callable[[argparse.ArgumentParser], None]


def _add_sampling(p: argparse.ArgumentParser, temperature: float = 0.8) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


# ---------------------------------------------------------------- generate / chat / serve


def cmd_generate(args: argparse.Namespace) -> None:
    import lmforge
    from lmforge.api import TextStream

    lm = lmforge.load(args.model)
    draft = lmforge.load(args.draft) if args.draft else None
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed)
    if args.num_beams != 1:  # the defaults are for sampling; a flag the user changed goes on, to be refused
        sampling = {name: v for name, v in sampling.items() if v != args.sampling_defaults[name]}
    if args.json:
        ids = lm.tokenizer.encode(args.prompt, add_special_tokens=True)
        req = lm.request(ids, args.max_new_tokens, lm.sampling(**sampling, num_beams=args.num_beams))
        stream, tokens, finish, text = TextStream(lm.tokenizer, args.stop), [], "length", []
        for t in lm.tokens(req, draft=draft, num_beams=args.num_beams):
            tokens.append(t.token)
            text.append(stream.push(t.token))
            finish = t.finish_reason or finish
            if stream.stopped:
                finish = "stop"
                break
        text.append(stream.flush())
        print(json.dumps({"text": "".join(text), "tokens": tokens, "finish_reason": finish}, ensure_ascii=False))
        return
    options = dict(max_new_tokens=args.max_new_tokens, stop=args.stop, draft=draft, **sampling)
    if args.num_beams == 1:
        pieces = lm.stream(args.prompt, **options)
    else:  # beam search knows its text only at the end
        pieces = [lm.generate(args.prompt, num_beams=args.num_beams, **options)]
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def setup_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="run folder or Hugging Face folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print text, tokens and finish reason as JSON")
    _add_sampling(p)
    p.add_argument("--num-beams", type=int, default=1, metavar="N",
                   help="beam search over N beams: the most likely text instead of a sampled one "
                        "(sampling flags are then refused)")
    p.add_argument("--draft", default=None, metavar="MODEL",
                   help="a smaller model folder with the same tokenizer, for speculative decoding: "
                        "the same output distribution from fewer passes of the big model")
    defaults = {name: p.get_default(name) for name in ("temperature", "top_k", "top_p", "min_p", "seed")}
    p.set_defaults(func=cmd_generate, sampling_defaults=defaults)


def cmd_chat(args: argparse.Namespace) -> None:
    from lmforge.cli.chat import run_chat

    run_chat(args.model, system=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_p=args.top_p, seed=args.seed)


def setup_chat(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--system", default=None, help="system prompt")
    _add_sampling(p, temperature=0.7)
    p.set_defaults(func=cmd_chat)


def cmd_serve(args: argparse.Namespace) -> None:
    from lmforge.serve.app import run_server

    run_server(
        args.model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("LMFORGE_API_KEY"),
        n_slots=args.slots, max_queue=args.max_queue, max_tokens=args.max_tokens, max_n=args.max_n,
        max_body_bytes=args.max_body_bytes, model_name=args.model_name, support=args.support,
    )


def setup_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless told otherwise)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set LMFORGE_API_KEY)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the folder name)")
    p.add_argument("--slots", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    p.add_argument("--max-tokens", type=int, default=2048, help="cap on max_tokens per request")
    p.add_argument("--max-n", type=int, default=8, help="cap on n per request")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="cap on the request body size")
    p.add_argument("--support", default=None, metavar="YAML",
                   help="answer chats as the support assistant this support.yaml describes (sources, handovers)")
    p.set_defaults(func=cmd_serve)


# ---------------------------------------------------------------- conversion and checks


def cmd_convert(args: argparse.Namespace) -> None:
    import lmforge

    lm = lmforge.load(args.model)
    out = Path(args.out)
    if args.to == "hf":
        lm.save_hf(out)
    else:
        lm.save(out)
    print(f"wrote {args.to} checkpoint to {out}")


def setup_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--to", choices=("hf", "lmforge"), default="hf")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_convert)


def cmd_quantize(args: argparse.Namespace) -> None:
    import lmforge
    from lmforge.quantize import model_bytes, quantize_model

    lm = lmforge.load(args.model)
    before = model_bytes(lm.model)
    quantize_model(lm.model, bits=args.bits, group_size=args.group_size, skip=args.skip)
    lm.save(args.out)
    print(f"wrote int{args.bits} weights to {args.out}: {before / 2**20:.1f} MiB -> {model_bytes(lm.model) / 2**20:.1f} MiB")


def setup_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--bits", type=int, choices=(8, 4), default=8)
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64, help="int4 group size")
    p.add_argument("--skip", nargs="*", default=["lm_head"], help="layer-name patterns left in float")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_quantize)


VERBS: dict[str, tuple[str, Setup]] = {  # verb -> (one-line help, adds its arguments)
    "generate": ("continue a prompt (streams to the terminal)", setup_generate),
    "chat": ("interactive chat (/reset, /system TEXT, /quit; Ctrl-C stops a reply)", setup_chat),
    "serve": ("OpenAI-compatible HTTP server with a web chat page", setup_serve),
    "convert": ("convert between lmforge and Hugging Face folders", setup_convert),
    "quantize": ("weight-only int8 / int4 quantization (generate, chat and serve load it)", setup_quantize),
}
