"""Few-shot contexts and the requests of a task, string for string as lm-eval builds them.

- The few-shot pool is `fewshot_split`, else the training, validation or test split (the first
  the task names). One `random.Random(seed)` per task draws for each evaluated document in turn
  (`seed` is lm-eval's fewshot seed, 1234 by default), so the same seed gives the same examples.
- When the pool is the evaluated split itself (`fewshot_split == test_split`, as lm-eval compares
  them), n + 1 documents are drawn and the evaluated one dropped, then the first n kept.
- A context is `description`, then per example `question + target_delimiter + answer +
  fewshot_delimiter`, then the question; a multiple-choice request continues it with
  `target_delimiter + choice`; a rolling request scores the target alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.evaluate.taskfile import (
    Doc,
    TaskSpec,
    doc_to_choice,
    doc_to_target,
    doc_to_text,
    render,
    split_docs,
)

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


@dataclass
class DocRequests:
    """What the model is asked about one document."""

    doc_id: int
    doc: Doc
    context: str  # the prompt (description + few-shot examples + question)
    arguments: list[tuple[Any, ...]]  # (context, continuation) pairs, (text,) to roll, or (context, gen_kwargs)


def fewshot_pool(spec: TaskSpec, splits: dict[str, list[Doc]]) -> list[Doc]:
    """The documents few-shot examples are drawn from."""
    for key in ("fewshot_split", "training_split", "validation_split", "test_split"):
        if getattr(spec, key) is not None:
            return split_docs(spec, splits, key)
    return []


def eval_docs(spec: TaskSpec, splits: dict[str, list[Doc]]) -> list[Doc]:
    """The evaluated documents: the test split, else the validation split."""
    return split_docs(spec, splits, "test_split" if spec.test_split is not None else "validation_split")


def sample_fewshot(rng: random.Random, pool: list[Doc], n: int, exclude: Doc | None) -> list[Doc]:
    """n examples drawn as lm-eval's ContextSampler draws them (excluding `exclude` when given)."""
    if n == 0:
        return []
    if exclude is None:
        return rng.sample(pool, n)
    drawn = [d for d in rng.sample(pool, n + 1) if d != exclude][:n]
    if len(drawn) < n:  # the pool held copies of the evaluated document
        drawn = rng.sample([d for d in pool if d != exclude], n)
    return drawn


def answer_text(spec: TaskSpec, doc: Doc) -> str:
    """A few-shot example's answer as it appears in the context."""
    target = doc_to_target(spec, doc)
    if isinstance(target, int) and spec.doc_to_choice is not None:
        target = doc_to_choice(spec, doc)[target]
    elif isinstance(target, list):
        target = target[0]
    if not isinstance(target, str):
        raise LmforgeError(f"{spec.where('doc_to_target')}: gave {target!r}; a few-shot answer must be text (or a "
                           "choice index with doc_to_choice)")
    return target


def question(spec: TaskSpec, doc: Doc) -> str:
    text = doc_to_text(spec, doc)
    if not isinstance(text, str):
        raise LmforgeError(f"{spec.where('doc_to_text')}: gave {text!r}; multiple-input tasks (one context per "
                           "choice) are not supported, render the question as text")
    return text


def fewshot_context(spec: TaskSpec, doc: Doc, examples: list[Doc]) -> str:
    """description + examples + the question, joined with the task's delimiters."""
    description = spec.description or ""
    if description:
        description = doc[description] if description in doc else render(spec, "description", description, doc)
    parts = [description]
    for ex in examples:
        answer = answer_text(spec, ex)
        delimiter = spec.target_delimiter if answer != "" else ""
        parts.append(question(spec, ex) + delimiter + answer + (spec.fewshot_delimiter if answer != "" else ""))
    parts.append(question(spec, doc))
    return "".join(parts)


def arguments(spec: TaskSpec, doc: Doc, context: str) -> list[tuple[Any, ...]]:
    """The model requests for one document."""
    kind = spec.output_type
    if kind == "multiple_choice":
        return [(context, f"{spec.target_delimiter}{choice}") for choice in doc_to_choice(spec, doc)]
    if kind in ("loglikelihood", "loglikelihood_rolling"):
        target = doc_to_target(spec, doc)
        if not isinstance(target, str):
            raise LmforgeError(f"{spec.where('doc_to_target')}: {kind} scores text; got {target!r}")
        return [(context, target)] if kind == "loglikelihood" else [(target,)]
    return [(context, dict(spec.generation_kwargs or {}))]


def build_requests(spec: TaskSpec, splits: dict[str, list[Doc]], num_fewshot: int, seed: int = FEWSHOT_SEED,
                   limit: int | None = None) -> list[DocRequests]:
    """Every evaluated document (the first `limit`) with its context and requests."""
    docs = eval_docs(spec, splits)[:limit]
    pool = fewshot_pool(spec, splits)
    if num_fewshot > len(pool) - (spec.fewshot_split == spec.test_split):
        raise LmforgeError(f"{spec.where('num_fewshot')}: {num_fewshot} examples asked but the few-shot split has "
                           f"{len(pool)} documents; lower --num-fewshot or name a larger fewshot_split")
    rng = random.Random(seed)
    same_split = spec.fewshot_split == spec.test_split
    out = []
    for doc_id, doc in enumerate(docs):
        examples = sample_fewshot(rng, pool, num_fewshot, doc if same_split else None)
        context = fewshot_context(spec, doc, examples)
        out.append(DocRequests(doc_id, doc, context, arguments(spec, doc, context)))
    return out


__all__ = ["FEWSHOT_SEED", "DocRequests", "build_requests", "eval_docs", "fewshot_context", "fewshot_pool",
           "sample_fewshot"]
