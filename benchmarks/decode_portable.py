"""Decode speed of the portable int8 / int4 matmuls (`kernels_portable.c`): the path of a CPU
without AVX2, or not x86-64, against what such a CPU would run otherwise.

GPT-2-small shape (random weights), batch 1, greedy, float32; tokens/s of a whole generate call
(a 16-token prefill, then `--new-tokens` steps), as in `decode.py`. The int8 / int4 models quantize
every linear layer, the output projection included, as `decode.py` does. Every run below has the
AVX2 kernels off, as `native()` is None on such a CPU (oneDNN matmuls, PyTorch's attention and
GELU for the float parts), and they differ only in the quantized matmuls:
  lmforge float32           no quantization: the peer of the ratios
  int8 / int4 portable      `kernels_portable.c`, reading the packed weights
  int8 / int4 dequantize    no native code at all: each weight dequantized on every step, then a matmul
Timed in alternation (median), beside the same int8 / int4 models with every AVX2 kernel on
(this host's default), for reference. The portable library is compiled for baseline x86-64
(SSE2); PyTorch's own kernels, which the float32 peer and the dequantizing path use, still use
this host's AVX2 / AVX-512, which a CPU without AVX2 lacks.

    python benchmarks/decode_portable.py   # last line: int8_portable_ratio=R8 int4_portable_ratio=R4 (portable
                                           # tok/s over lmforge float32, AVX2 kernels off), int8_portable_vs_dequantize=
                                           # int4_portable_vs_dequantize= (over the dequantizing fallback),
                                           # int8_portable_tok_s= int4_portable_tok_s= float32_tok_s=,
                                           # int8_avx2_tok_s= int4_avx2_tok_s= (every AVX2 kernel on)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from unittest import mock

import torch
from decode import interleaved_seconds, lmforge_generate, quantized_variants

from lmforge.config import preset
from lmforge.generate.engine import Engine
from lmforge.models import build_model, kernels


def on_path(run: Callable[[], None], quant: kernels.QuantKernels | None) -> Callable[[], None]:
    """`run` with the AVX2 kernels off and `quant` (or the dequantizing fallback, None) for the quantized matmuls."""
    def wrapped() -> None:
        with mock.patch.object(kernels, "native", lambda: None), mock.patch.object(kernels, "quantized", lambda: quant):
            run()
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per run (the dequantizing path is slow)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (median reported)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for PyTorch and the kernels (0: PyTorch's default); on a host shared with "
                             "other jobs, 1 keeps OpenMP barriers from waiting on descheduled threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    portable = kernels.portable()
    if portable is None:
        raise SystemExit("the portable kernels cannot be built here (no C compiler, or LMFORGE_NATIVE=0)")
    torch.manual_seed(0)
    variants = {name: model for name, (model, _) in quantized_variants(build_model(preset("gpt2")).eval()).items()}
    prompts = torch.randint(0, 1000, (1, args.prompt_len))

    def generate(model: torch.nn.Module) -> Callable[[], None]:
        engine = Engine(model, n_slots=1, max_len=args.prompt_len + args.new_tokens + 1)
        return partial(lmforge_generate, engine, prompts, args.new_tokens)

    runs = {"float32": on_path(generate(variants["float32"]), None)}
    for name in ("int8", "int4"):
        runs[f"{name}_portable"] = on_path(generate(variants[name]), portable)
        runs[f"{name}_dequantize"] = on_path(generate(variants[name]), None)
        if kernels.native() is not None:
            runs[f"{name}_avx2"] = generate(variants[name])
    tok_s = {name: args.new_tokens / t for name, t in zip(runs, interleaved_seconds(list(runs.values()), args.repeats))}
    print(f"gpt2 batch 1, AVX2 kernels off: lmforge float32 {tok_s['float32']:7.1f} tok/s")
    figures = {}
    for name in ("int8", "int4"):
        fast, slow = tok_s[f"{name}_portable"], tok_s[f"{name}_dequantize"]
        avx2 = f"  (AVX2 kernels on: {tok_s[f'{name}_avx2']:7.1f} tok/s)" if f"{name}_avx2" in tok_s else ""
        print(f"gpt2 batch 1, AVX2 kernels off: {name} portable {fast:7.1f} tok/s  x{fast / tok_s['float32']:.2f} "
              f"lmforge float32  x{fast / slow:.1f} dequantize-per-step ({slow:.2f} tok/s){avx2}")
        figures[f"{name}_portable_ratio"] = f"{fast / tok_s['float32']:.2f}"
        figures[f"{name}_portable_vs_dequantize"] = f"{fast / slow:.1f}"
    figures.update({f"{name}_portable_tok_s": f"{tok_s[f'{name}_portable']:.1f}" for name in ("int8", "int4")})
    figures["float32_tok_s"] = f"{tok_s['float32']:.1f}"
    figures.update({f"{name}_tok_s": f"{tok_s[name]:.1f}" for name in ("int8_avx2", "int4_avx2") if name in tok_s})
    print(" ".join(f"{key}={value}" for key, value in figures.items()))


if __name__ == "__main__":
    main()
