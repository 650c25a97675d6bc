"""Shared tokenizers for the tokenizer tests, built from small corpora written here (no network).

Each HF-style folder holds tokenizer.json + tokenizer_config.json in the form a model repository
has them: GPT-2 and Llama 3.1 (byte-level BPE, dict-form special tokens, add_bos_token), Qwen 2.5 (ChatML,
a list of named templates), BERT (WordPiece, uncased and cased), Llama 2 / Mistral (sentencepiece BPE,
byte fallback), T5 (Unigram, extra ids) and a sentence-embedding BERT whose tokenizer.json pads to 128.
Each tokenizer.json holds what transformers 5's class for it rebuilds from code (normalizer,
pre-tokenizer, decoder), as a real checkpoint's does, so that both libraries read the same tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.tokenizer import Tokenizer, train_tokenizer

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs.",
    "def encode(text: str) -> list[int]:\n    return [ord(c) for c in text]\n",
    "Grüße aus München! Ça va très bien, merci. ¿Qué tal?",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Emoji: 😀 👍🏽 👨‍👩‍👧 🇫🇷 — and math: ∑ x² ≤ ∞.",
    "Combining marks: e\u0301 a\u0308 n\u0303; Zalgo: Z\u0351\u0352o\u0353",
    "tabs\tand\r\nwindows line ends\r\nand   runs   of   spaces",
]

# meta-llama/Llama-3.1-8B-Instruct's chat template.
LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Qwen/Qwen2.5-Instruct's chat template (ChatML with a default system prompt and tool calls).
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

QWEN2_SPLIT_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
]


def _added(content: str) -> dict:
    """A special token in the AddedToken dict form that tokenizer_config.json files use."""
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True}  # fmt: skip


def write_corpus(folder: Path) -> Path:
    """A small corpus folder: plain text, markdown, code, JSON lines and a nested folder."""
    (folder / "nested").mkdir(parents=True)
    (folder / "a.txt").write_text("\n".join(SAMPLE_TEXTS * 20), encoding="utf-8")
    (folder / "b.md").write_text("# Title\n\nSome *markdown* text about tokenizers.\n" * 30, encoding="utf-8")
    (folder / "nested" / "c.py").write_text("for i in range(10):\n    print(i)\n" * 30, encoding="utf-8")
    records = [{"text": text, "id": n} for n, text in enumerate(SAMPLE_TEXTS * 5)]
    (folder / "nested" / "d.jsonl").write_text(
        "\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8"
    )
    return folder


def byte_level_bpe(special_tokens: list[str], *, qwen: bool = False) -> tokenizers.Tokenizer:
    """A GPT-2 / Llama-3 style byte-level BPE trained on SAMPLE_TEXTS, specials appended.

    `qwen` uses Qwen 2's NFC normalizer and split regex, which transformers 5's Qwen2Tokenizer
    rebuilds from code (it keeps only the vocabulary, merges and post-processor of tokenizer.json).
    """
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if qwen:
        backend.normalizer = normalizers.NFC()
        split = pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(SAMPLE_TEXTS * 10, trainer)
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in special_tokens]
    )
    return backend


def byte_fallback_bpe() -> tokenizers.Tokenizer:
    """A Llama-2 / Mistral style sentencepiece BPE: `▁` for spaces and `<0xNN>` byte-fallback tokens."""
    base = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    # transformers 5's LlamaTokenizer rebuilds exactly this pre-tokenizer and decoder.
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=40, show_progress=False
    )
    base.train_from_iterator(SAMPLE_TEXTS[:3] * 10, trainer)
    state = json.loads(base.to_str())
    vocab = state["model"]["vocab"]
    pieces = sorted((t for t in vocab if vocab[t] >= 3), key=vocab.__getitem__)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    state["model"]["vocab"] = {token: i for i, token in enumerate(tokens)}
    state["model"]["byte_fallback"] = True
    backend = tokenizers.Tokenizer.from_str(json.dumps(state))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return backend


def wordpiece(*, lowercase: bool = True) -> tokenizers.Tokenizer:
    """A BERT-style WordPiece with [CLS] ... [SEP] added by the post-processor."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(SAMPLE_TEXTS * 10, trainer)
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return backend


def unigram(extra_ids: list[str]) -> tokenizers.Tokenizer:
    """A T5-style Unigram: <pad> </s> <unk>, the pieces, then the extra ids; `$A </s>` when asked."""
    base = tokenizers.Tokenizer(models.Unigram())
    trainer = trainers.UnigramTrainer(
        vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    base.train_from_iterator(SAMPLE_TEXTS * 10, trainer)
    pieces = [tuple(piece) for piece in json.loads(base.to_str())["model"]["vocab"]]
    vocab = [*pieces, *((token, 0.0) for token in extra_ids)]
    backend = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    # transformers 5's T5Tokenizer rebuilds exactly these (no normalizer without a sentencepiece charsmap).
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in ["<pad>", "</s>", "<unk>", *extra_ids]]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return backend


def write_hf_folder(folder: Path, backend: tokenizers.Tokenizer, config: dict) -> Path:
    """Write tokenizer.json and tokenizer_config.json the way a model repository holds them."""
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def trained(corpus_dir: Path) -> Tokenizer:
    """An lmforge byte-level BPE with 400 byte + merge tokens."""
    return train_tokenizer([corpus_dir], 400, min_frequency=2)


@pytest.fixture(scope="session")
def trained_dir(trained: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("trained")
    trained.save(folder)
    return folder


@pytest.fixture(scope="session")
def byte_tokenizer(corpus_dir: Path) -> Tokenizer:
    """A pure byte tokenizer: vocab_size 256, no merges."""
    return train_tokenizer([corpus_dir], 256)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    backend = byte_level_bpe(["<|endoftext|>"])
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_prefix_space": False,
        "model_max_length": 1024,
    }
    return write_hf_folder(tmp_path_factory.mktemp("gpt2"), backend, config)


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    backend = byte_level_bpe(LLAMA3_SPECIALS)
    bos_id = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
        special_tokens=[("<|begin_of_text|>", bos_id)],
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _added("<|begin_of_text|>"),
        "eos_token": _added("<|eot_id|>"),
        "add_bos_token": True,
        "clean_up_tokenization_spaces": True,
        "model_max_length": 131072,
        "chat_template": LLAMA31_TEMPLATE,
    }
    return write_hf_folder(tmp_path_factory.mktemp("llama3"), backend, config)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    backend = byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], qwen=True)
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 131072,
        "chat_template": [
            {"name": "default", "template": QWEN25_TEMPLATE},
            {"name": "other", "template": "{{ 'not this one' }}"},
        ],
    }
    return write_hf_folder(tmp_path_factory.mktemp("qwen"), backend, config)


def bert_config(**overrides) -> dict:
    """tokenizer_config.json of a BERT checkpoint (bert-base-uncased's, with `overrides`)."""
    return {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "model_max_length": 512,
        **overrides,
    }


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_folder(tmp_path_factory.mktemp("bert"), wordpiece(), bert_config())


@pytest.fixture(scope="session")
def bert_cased_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = bert_config(do_lower_case=False, clean_up_tokenization_spaces=True)
    return write_hf_folder(tmp_path_factory.mktemp("bert_cased"), wordpiece(lowercase=False), config)


@pytest.fixture(scope="session")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    extra_ids = [f"<extra_id_{i}>" for i in reversed(range(3))]
    config = {
        "tokenizer_class": "T5Tokenizer",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "extra_ids": 3,
        "additional_special_tokens": sorted(extra_ids),
        "model_max_length": 512,
    }
    return write_hf_folder(tmp_path_factory.mktemp("t5"), unigram(extra_ids), config)


@pytest.fixture(scope="session")
def padded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sentence-embedding checkpoint's tokenizer: tokenizer.json pads every text to 128 ids and cuts at 128."""
    backend = wordpiece()
    backend.enable_padding(length=128, pad_id=backend.token_to_id("[PAD]"), pad_token="[PAD]")
    backend.enable_truncation(max_length=128)
    return write_hf_folder(tmp_path_factory.mktemp("padded"), backend, bert_config(model_max_length=128))


@pytest.fixture(scope="session")
def sentencepiece_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": _added("<s>"),
        "eos_token": _added("</s>"),
        "unk_token": _added("<unk>"),
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "model_max_length": 4096,
    }
    return write_hf_folder(tmp_path_factory.mktemp("sentencepiece"), byte_fallback_bpe(), config)
