"""The real consumer: files `lm.save_gguf` writes, run in llama.cpp through llama-cpp-python.

Skipped, with the reason, only where llama_cpp cannot be imported (`pip install -e ".[llama]"`
builds it from source). The models are tiny but trained for a few dozen steps on the test
corpus, so greedy choices have clear margins: a random model's near-ties would let float16
rounding flip a token and test nothing about the export. Tokens are fed to both sides as ids,
so the greedy test checks the weights; the tokenizer and the chat template are checked apart.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.api import LM, load
from lmforge.config import preset
from lmforge.models import build_model

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed; pip install -e '.[llama]' builds it")

CORPUS = (  # what the session's tiny tokenizer was trained on (tests/conftest.py), so its merges apply
    "The quick brown fox jumps over the lazy dog. Héllo wörld, naïve café! 你好，世界。 "
    "def add(a, b):\n    return a + b\n"
) * 40
PROMPTS = ["The quick brown", "def add(a, b):\n", "Héllo wörld, na", " 你好"]
STEPS = 32
F32_LOGIT_BOUND = {  # largest |logit difference| on f32 exports (logits reach ~10): the same arithmetic up to
    "llama": 1e-4, "mixtral": 1e-4,  # summation order (measured ~2e-6);
    "gpt2": 3e-3,  # ggml's GELU reads a float16 table (measured ~7e-4)
}
Q8_BOUND = 0.01  # q8_0 logits in llama.cpp against lmforge float32, RMS error / RMS: measured 0.34-0.41%


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny models run fastest on one thread, and far faster when other processes share the cores."""


def trained_lm(tokenizer, preset_name: str, steps: int = 60, **overrides) -> LM:
    """A tiny model fitted to the test corpus: confident next-token choices with clear margins."""
    torch.manual_seed(0)
    config = preset(preset_name, vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                    **overrides)
    model = build_model(config)
    ids = torch.tensor(tokenizer.encode(CORPUS))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,)).tolist()
        batch = torch.stack([ids[s: s + 65] for s in starts])  # (8, 65)
        loss = model(batch[:, :-1], labels=batch[:, 1:]) / batch[:, 1:].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return LM(model.eval(), tokenizer)


@pytest.fixture(scope="module")
def models(tiny_tokenizer) -> dict[str, LM]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # built before the per-test one_thread fixture applies
    try:
        return {"llama": trained_lm(tiny_tokenizer, "tiny-llama", hidden_dim=192),
                "gpt2": trained_lm(tiny_tokenizer, "tiny-gpt2"),
                "mixtral": trained_lm(tiny_tokenizer, "tiny-mixtral")}
    finally:
        torch.set_num_threads(before)


def run_llama_cpp(path) -> llama_cpp.Llama:
    """llama.cpp on one thread, keeping every position's logits (`scores`), with a float32 KV cache (its
    default, float16, rounds keys and values). Weights stay in plain CPU buffers: ggml's repacked (AMX)
    weight buffers crashed on the AMX host these tests were written on, and they compute the same."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def plain_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = plain_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, n_threads=1, logits_all=True,
                               type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


def greedy_lmforge(lm: LM, ids: list[int]) -> tuple[list[int], list[torch.Tensor], float]:
    """Greedy tokens, the logits each was chosen from, and the smallest top-1 / top-2 margin on the way."""
    ids, chosen, rows, margin = list(ids), [], [], float("inf")
    with torch.no_grad():
        for _ in range(STEPS):
            row = lm.model(torch.tensor([ids]))[0, -1]  # (vocab,)
            top = row.topk(2).values
            margin = min(margin, (top[0] - top[1]).item())
            chosen.append(int(row.argmax()))
            rows.append(row)
            ids.append(chosen[-1])
    return chosen, rows, margin


def greedy_llama_cpp(llm: llama_cpp.Llama, ids: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    llm.reset()
    llm.eval(ids)
    chosen, rows = [], []
    for _ in range(STEPS):
        row = torch.from_numpy(llm.scores[llm.n_tokens - 1].copy())  # (vocab,) logits of the last position
        chosen.append(int(row.argmax()))
        rows.append(row)
        llm.eval([chosen[-1]])
    return chosen, rows


@pytest.mark.parametrize("name, dtype", [("llama", "f32"), ("llama", "f16"), ("gpt2", "f32"), ("gpt2", "f16"),
                                         ("mixtral", "f32")])
def test_llama_cpp_greedy_equals_lmforge_for_32_steps(tmp_path, models, name, dtype):
    lm = models[name]
    path = tmp_path / f"{name}-{dtype}.gguf"
    lm.save_gguf(path, dtype=dtype)
    reference = load(path)  # for f16, the weights llama.cpp holds, widened to float32
    llm = run_llama_cpp(path)
    for prompt in PROMPTS:
        ids = lm.tokenizer.encode(prompt, add_special_tokens=True)
        ours, our_rows, margin = greedy_lmforge(reference, ids)
        theirs, their_rows = greedy_llama_cpp(llm, ids)
        assert theirs == ours, f"{prompt!r}: smallest lmforge margin {margin:.4f}"
        if dtype == "f32":
            assert max((a - b).abs().max().item() for a, b in zip(our_rows, their_rows)) < F32_LOGIT_BOUND[name]


def test_q8_0_logits_stay_close_to_float32(tmp_path, models):
    lm = models["llama"]
    lm.save_gguf(tmp_path / "q8.gguf", dtype="q8_0")
    llm = run_llama_cpp(tmp_path / "q8.gguf")
    errors = []
    for prompt in PROMPTS:
        ids = lm.tokenizer.encode(prompt, add_special_tokens=True)
        ours, our_rows, _ = greedy_lmforge(lm, ids)
        llm.reset()
        llm.eval(ids + ours[:-1])  # teacher-forced along lmforge's float32 path
        theirs = torch.from_numpy(llm.scores[len(ids) - 1: len(ids) - 1 + STEPS].copy())  # (STEPS, vocab)
        reference = torch.stack(our_rows)
        errors.append(((theirs - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item())
    assert 0 < max(errors) < Q8_BOUND, errors


def test_tokenizer_and_chat_template_travel_in_the_file(tmp_path, models):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    lm = models["llama"]
    lm.save_gguf(tmp_path / "m.gguf", dtype="f16")
    llm = run_llama_cpp(tmp_path / "m.gguf")
    for text in [*PROMPTS, CORPUS[:300], "<|im_start|>user\nhi<|im_end|>"]:
        ids = lm.tokenizer.encode(text, add_special_tokens=True)
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, text
        assert llm.detokenize(ids[1:], special=True).decode() == lm.tokenizer.decode(ids[1:]), text
    tok = lm.tokenizer
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo?"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "def add(a, b):"}]
    formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], bos_token=tok.bos_token,
                                    eos_token=tok.eos_token)
    assert formatter(messages=messages).prompt == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
