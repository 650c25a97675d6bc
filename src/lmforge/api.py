"""The public Python API: `lmforge.load(path)` returns an `LM` that generates, chats, embeds and saves.

Text lives here (and in serve/ and the CLI); the engine below knows token ids only.
`TextStream` turns generated ids into text pieces: UTF-8-safe (the incremental detokenizer)
and aware of stop strings, holding back just enough text to never show the start of a stop
string that then completes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lmforge.checkpoint import float_dtype, load_model, save_hf, save_native, stored_dtype
from lmforge.checkpoint.heads import HEAD_CONFIG, load_head_model
from lmforge.checkpoint.sentence import SentenceConfig, read_sentence_config
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.generate.engine import Engine, Request, Token, beam_search, speculative_stream
from lmforge.generate.sampling import SamplingParams
from lmforge.models.heads import sentence_embeddings
from lmforge.quantize import quantization_name
from lmforge.tokenizer import GenerationDefaults, IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from lmforge.diagnose.attention import AttentionMaps

Message = dict[str, Any]


class TextStream:
    """Token ids in, text pieces out; stops at the first stop string (which is not emitted)."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.pending = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Text that is now certain, or "" (mid-character or possibly a stop string's start)."""
        return self._release(self.detok.push(token_id), final=False)

    def flush(self) -> str:
        return self._release(self.detok.flush(), final=True)

    def _release(self, text: str, *, final: bool) -> str:
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        cut = len(self.pending) if final else max(len(self.pending) - self.hold, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out


@dataclass
class LM:
    """A model with its tokenizer."""

    model: nn.Module
    tokenizer: Tokenizer | None
    path: Path | None = None
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)  # eos ids, sampling defaults
    sentence: SentenceConfig = field(default_factory=SentenceConfig)  # how `embed` pools, normalises, cuts
    quantization: str | None = None  # how the weights are stored when not as floats: "int8" / "int4"
    #                                   (lmforge-quantized layers; found from the model when not given), a GGUF type ("q8_0")

    def __post_init__(self) -> None:
        if self.quantization is None:
            self.quantization = quantization_name(self.model)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    # ------------------------------------------------------------ text in, text out

    def sampling(
        self,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: int | None = None,
        *,
        num_beams: int = 1,
    ) -> SamplingParams:
        """A setting left None takes the folder's generation_config.json default, else SamplingParams'.

        For beam search (`num_beams` other than 1) the folder's defaults, which are for sampling,
        do not apply and temperature defaults to 0; a setting given that the search cannot honour
        is then refused by it, not silently dropped.
        """
        given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                     repetition_penalty=repetition_penalty)
        defaults = self.generation.sampling if num_beams == 1 else {"temperature": 0.0}
        chosen = {**defaults, **{name: v for name, v in given.items() if v is not None}}
        return SamplingParams(**chosen, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                              seed=seed)

    def stream(self, prompt: str | list[int], *, max_new_tokens: int = 64, stop: Sequence[str] = (),
               truncate_left: bool = False, draft: LM | None = None, num_beams: int = 1,
               **sampling: Any) -> Iterator[str]:
        """Yield the continuation of `prompt` as text pieces while it is generated.

        `draft`: a smaller model sharing this one's vocabulary, for speculative decoding: the
        same output distribution (greedy: the same text) from fewer passes of this model.
        `num_beams` is refused: beam search knows its best beam only at the end (see `generate`).
        """
        if num_beams > 1:
            raise LmforgeError(f"lm.stream cannot stream beam search (num_beams={num_beams}): the best "
                               f"beam is known only at the end; call lm.generate(..., num_beams={num_beams})")
        return self._stream_ids(self._ids(prompt), max_new_tokens, stop, truncate_left,
                                self.sampling(**sampling), draft=draft, num_beams=num_beams)

    def generate(self, prompt: str | list[int], *, max_new_tokens: int = 64, stop: Sequence[str] = (),
                 truncate_left: bool = False, draft: LM | None = None, num_beams: int = 1,
                 length_penalty: float = 1.0, **sampling: Any) -> str:
        """The continuation of `prompt` (see `stream` for the arguments).

        `num_beams` > 1 searches for the most likely continuation instead of sampling one (beam
        search, deterministic; finished beams are ranked by sum(log p) / length ** length_penalty).
        It refuses sampling settings it cannot honour (see `sampling`).
        """
        return "".join(self._stream_ids(self._ids(prompt), max_new_tokens, stop, truncate_left,
                                        self.sampling(**sampling, num_beams=num_beams), draft=draft,
                                        num_beams=num_beams, length_penalty=length_penalty))

    def chat(self, messages: list[Message], **kwargs: Any) -> str:
        """The assistant's reply to a conversation, rendered through the tokenizer's chat template."""
        return "".join(self.stream_chat(messages, **kwargs))

    def stream_chat(self, messages: list[Message], *, max_new_tokens: int = 256, stop: Sequence[str] = (),
                    truncate_left: bool = False, draft: LM | None = None, **sampling: Any) -> Iterator[str]:
        ids = self._tok().apply_chat_template(messages, add_generation_prompt=True)
        return self._stream_ids(ids, max_new_tokens, stop, truncate_left, self.sampling(**sampling),
                                draft=draft)

    def request(self, ids: list[int], max_new_tokens: int, sampling: SamplingParams, *,
                truncate_left: bool = False, logprobs: int | None = None) -> Request:
        """An engine request that stops at the end-of-turn and every end-of-sequence token."""
        tok = self.tokenizer
        stop_ids = {i for i in (tok.eot_id, tok.eos_id) if i is not None} if tok else set()
        stop_ids.update(self.generation.eos_ids)
        if self.config.eos_id is not None:
            stop_ids.add(self.config.eos_id)
        return Request(ids, max_new_tokens, sampling, frozenset(stop_ids), logprobs, truncate_left)

    def tokens(self, request: Request, engine: Engine | None = None, *, draft: LM | None = None,
               num_beams: int = 1, length_penalty: float = 1.0) -> Iterator[Token]:
        """Run one request and yield its tokens: on `engine` (or a fresh one); with `draft`, by
        speculative decoding; with `num_beams` other than 1, by beam search (all at the end)."""
        if num_beams != 1:
            if draft is not None:
                raise LmforgeError("num_beams and draft cannot be combined (a draft speeds up sampling or "
                                   "greedy decoding, not beam search); pass one of them")
            return iter(beam_search(self.model, request, width=num_beams, length_penalty=length_penalty))
        if draft is not None:
            self._check_same_vocabulary(draft)
            return speculative_stream(self.model, draft.model, request)
        return (engine or Engine(self.model, n_slots=1)).stream(request)

    def _check_same_vocabulary(self, draft: LM) -> None:
        """Token ids mean the same text in both models, or the draft's proposals are noise
        (the engine checks the vocabulary sizes; only here are the tokenizers known)."""
        mine, theirs = self.tokenizer, draft.tokenizer
        if mine is not None and theirs is not None and mine.backend.get_vocab() != theirs.backend.get_vocab():
            where = draft.path or "the draft model"
            raise LmforgeError(f"{where} has a different tokenizer from {self.path or 'the target model'}; "
                               "speculative decoding needs a draft that shares the target's tokenizer")

    def _ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self._tok().encode(prompt, add_special_tokens=True)
        return list(prompt)

    def _stream_ids(self, ids: list[int], max_new_tokens: int, stop: Sequence[str], truncate_left: bool,
                    sampling: SamplingParams, *, draft: LM | None = None, num_beams: int = 1,
                    length_penalty: float = 1.0) -> Iterator[str]:
        """Text pieces of one request; the decoder is chosen and checked now, not at the first piece."""
        request = self.request(ids, max_new_tokens, sampling, truncate_left=truncate_left)
        tokens = self.tokens(request, draft=draft, num_beams=num_beams, length_penalty=length_penalty)
        return self._text(tokens, stop)

    def _text(self, tokens: Iterator[Token], stop: Sequence[str]) -> Iterator[str]:
        text = TextStream(self._tok(), stop)
        for t in tokens:
            piece = text.push(t.token)
            if piece:
                yield piece
            if text.stopped:
                return
        tail = text.flush()
        if tail:
            yield tail

    # ------------------------------------------------------------ embeddings and scores

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> Tensor:
        """Sentence embeddings (N, dim), computed as `SentenceTransformer(folder).encode(texts)` does when
        the folder holds sentence-transformers files (pooling, Normalize, max_seq_length, lowercasing,
        default prompt: see `checkpoint/sentence.py`), else mean-pooled and L2-normalised. A text is cut,
        keeping its special tokens, to max_seq_length, else the tokenizer's model_max_length, and never
        past the model's max_seq_len."""
        tok, how = self._tok(), self.sentence
        limit = min(how.max_length or tok.model_max_length or self.config.max_seq_len, self.config.max_seq_len)
        texts = [how.prompt + t for t in texts]
        encoded = tok.encode_batch([t.lower() for t in texts] if how.lowercase else texts, add_special_tokens=True,
                                   max_length=limit)
        ids, mask = pad_batch([row or [tok.padding_id] for row in encoded], tok.padding_id)
        return sentence_embeddings(self.model.eval(), ids, mask, how.pooling, how.normalize)

    @torch.inference_mode()
    def token_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[t] | ids[:t]) for t >= 1 under the model (the scoring behind `echo` + `logprobs`)."""
        x = torch.tensor([ids])
        lp = self.model.eval()(x).float().log_softmax(-1)[0, :-1]  # (T - 1, V)
        return lp.gather(-1, x[0, 1:, None])[:, 0].tolist()

    def attention(self, text: str) -> AttentionMaps:
        """The attention probabilities of every layer and head on `text`, with its tokens:
        `.tokens` (T strings) and `.probs` (n_layers, n_heads, T, T), row t summing to one."""
        from lmforge.diagnose.attention import attention_of

        return attention_of(self.model, self._tok(), text)

    def score(self, prompt: str | list[Message], response: str) -> float:
        """A reward model's score of `response` to `prompt` (a folder written by `lmforge reward`)."""
        from lmforge.evaluate.scoring import score_texts

        return score_texts(self.model, self._tok(), [prompt], [response])[0]

    # ------------------------------------------------------------ saving

    def save(self, folder: str | Path) -> None:
        """lmforge format: config.json + model.safetensors + tokenizer files (quantized models keep their format)."""
        from lmforge.quantize import quantized_layers, save_quantized

        (save_quantized if quantized_layers(self.model) else save_native)(self.model, folder)
        self.generation.save(folder)
        if self.tokenizer is not None:
            self.tokenizer.save(folder)

    def save_gguf(self, path: str | Path, dtype: str = "f32") -> None:
        """One GGUF file that llama.cpp and Ollama run, tokenizer and chat template embedded;
        `dtype`: "f32", "f16", "q8_0" or "q4_0" (see `checkpoint/gguf.py`)."""
        from lmforge.checkpoint.gguf import save_gguf
        from lmforge.quantize import quantized_layers

        if quantized_layers(self.model):
            raise LmforgeError(f"{self.path or 'this model'} holds lmforge int8/int4 layers, which GGUF does not store; "
                               "export the float model it was quantized from, with --dtype q8_0 or q4_0")
        save_gguf(self.model, self.tokenizer, path, dtype)

    def save_hf(self, folder: str | Path) -> None:
        """Hugging Face format, loadable by `transformers.AutoModel*.from_pretrained`."""
        save_hf(self.model, folder)
        self.generation.save(folder)
        if self.tokenizer is not None:
            self.tokenizer.save(folder)

    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:
            where = self.path or "the model folder"
            raise LmforgeError(f"{where} has no tokenizer.json; text in and out needs one (token ids work without)")
        return self.tokenizer


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """Pad id lists to one (B, T) tensor; returns (ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(list(r), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def load(path: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu") -> LM:
    """Open an lmforge run folder or a Hugging Face folder (config.json + safetensors + tokenizer.json).

    Also a GGUF file (llama.cpp's format: f32, f16, q8_0 or q4_0 tensors, dequantized to float32), a classifier or reward model, a quantized folder, and a LoRA run folder that holds only
    its adapter (the base recorded in adapter_config.json is loaded and the adapter merged).

    `dtype` sets the dtype of the weights:
    - None (the default): float32, whatever the folder stores (bfloat16 and float16 checkpoints are
      widened exactly), the dtype CPUs compute fastest and the one the parity tests check;
    - "auto": the dtype the folder was saved in, read as transformers' `dtype="auto"` reads it
      (config.json's `dtype`, else the stored tensors'), so a bfloat16 checkpoint keeps half the memory;
    - a torch dtype (`torch.bfloat16`) or its name ("bfloat16", "float16", "float32").
    Parameters and stored buffers take the dtype; buffers computed when the model is built (rotary
    frequencies, sinusoid tables) stay float32, as in transformers, so positions keep their precision.
    """
    from lmforge.checkpoint.gguf import is_gguf_file, load_gguf
    from lmforge.quantize import is_quantized_folder, load_quantized
    from lmforge.train.setup import adapter_base, is_adapter_only, merged_model

    folder = Path(path)
    if is_gguf_file(folder):
        model, tokenizer, quantization = load_gguf(folder)
        return _finish(LM(model, tokenizer, folder, quantization=quantization), dtype, device)
    if folder.is_dir() and is_adapter_only(folder):
        model = merged_model(adapter_base(folder), folder)  # a LoRA run saved without merged weights
    elif (folder / HEAD_CONFIG).is_file():
        model = load_head_model(folder)  # a classifier or reward model
    elif folder.is_dir() and is_quantized_folder(folder):
        model = load_quantized(folder)
    else:
        model = load_model(folder)[0]
    if dtype == "auto":
        dtype = stored_dtype(folder)
    tokenizer = Tokenizer.from_dir(folder) if (folder / "tokenizer.json").is_file() else None
    return _finish(LM(model, tokenizer, folder, GenerationDefaults.from_dir(folder), read_sentence_config(folder)),
                   dtype, device)


def _finish(lm: LM, dtype: torch.dtype | str | None, device: str | torch.device) -> LM:
    """`lm` with its weights cast to `dtype` (None: as loaded; "auto": float32 here) on `device`, in eval mode."""
    if dtype is not None and dtype != "auto":
        cast_weights(lm.model, float_dtype(dtype) if isinstance(dtype, str) else dtype)
    lm.model = lm.model.to(device).eval()
    return lm


def cast_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters and state-dict buffers of `model` to `dtype`, in place;
    buffers outside the state dict (computed at build time, e.g. rotary frequencies) keep theirs."""
    saved = {id(t) for t in model.state_dict(keep_vars=True).values()}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)  # .data keeps tied parameters one object
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and id(buffer) in saved:
                setattr(module, name, buffer.to(dtype))
