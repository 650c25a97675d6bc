"""Log-likelihood requests per second: `lmforge eval`'s scorer against lm-eval's `hf` backend.

The same random Hugging Face LLaMA folder (fp32, CPU; a BPE with a released model's vocabulary size,
trained here on Python's standard library) and the same requests, built by lm-eval itself from local
task files: few-shot multiple choice over synthetic reviews, in the two shapes such tasks take:
- `endings`: four multi-word choices (hellaswag, arc, piqa style), the headline `ratio`: lm-eval
  runs the context once per choice, lmforge once per question (a KV cache holds it for the choices);
- `labels`: two one-token labels (sst2, mmlu style), `ratio_one_token`: here lm-eval's own logits
  cache already runs one row per question, so what remains is computing logits only where scored.
Each side scores all requests, tokenization included (`HFLM.loglikelihood`, `Scorer.loglikelihood`),
after a warm-up, alternating, best of `--rounds`; the log-likelihoods are checked to agree.

    python benchmarks/eval_speed.py   # last line: ratio=R lmforge_req_s=A lm_eval_req_s=B requests=N
                                      # ratio_one_token=R1 lmforge_one_token_req_s=.. lm_eval_one_token_req_s=..
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

WORDS = ["good", "bad", "great", "terrible", "movie", "film", "plot", "actor", "scene", "boring", "fun", "slow",
         "moving", "story", "dull", "brilliant", "awful", "charming", "witty", "long", "short", "music", "score",
         "script", "ending", "the", "a", "and", "but", "very", "quite", "not"]

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
fewshot_split: test
doc_to_text: "Review: {{{{sentence}}}}\\nVerdict:"
doc_to_target: label
doc_to_choice: {choices}
"""
KINDS = {  # task -> its choices: four multi-word endings (hellaswag-like), or two one-token labels (sst2-like)
    "endings": "endings",
    "labels": '["negative", "positive"]',
}


def phrase(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_tasks(folder: Path, n_docs: int) -> Path:
    """Both tasks over the same synthetic reviews, in folder/tasks."""
    rng = random.Random(0)
    rows = [{"sentence": phrase(rng, 8, 30), "endings": [phrase(rng, 3, 8) for _ in range(4)], "label": rng.randint(0, 1)}
            for _ in range(n_docs)]
    data = folder / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tasks").mkdir()
    for name, choices in KINDS.items():
        (folder / "tasks" / f"{name}.yaml").write_text(TASK.format(name=name, data=data, choices=choices))
    return folder / "tasks"


def write_model(folder: Path, dim: int, layers: int, vocab: int) -> Path:
    """A random LLaMA with a byte-level BPE of `vocab` tokens trained on Python's standard library source."""
    import transformers

    from lmforge.quickstart import stdlib_files
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer(stdlib_files(4 << 20), vocab_size=vocab)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=dim, intermediate_size=dim * 8 // 3,
                                   num_hidden_layers=layers, num_attention_heads=dim // 64, num_key_value_heads=dim // 64,
                                   max_position_embeddings=1024, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder / "model")
    tok.save(folder / "model")
    return folder / "model"


def lm_eval_requests(tasks: Path, name: str, shots: int):
    """The task's loglikelihood Instances, built by lm-eval itself."""
    from lm_eval.tasks import TaskManager, get_task_dict

    task = get_task_dict([name], TaskManager(include_path=str(tasks), include_defaults=False))[name]
    task.set_config("num_fewshot", shots)
    task.set_fewshot_seed(1234)
    task.build_all_requests()
    return task.instances


def best_of(rounds: int, sides: dict) -> dict:
    """(result, best seconds) of each side, the sides run in alternation (the host is shared and drifts)."""
    best = {name: (None, float("inf")) for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            start = time.perf_counter()
            out = fn()
            best[name] = (out, min(best[name][1], time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=24, help="documents per task")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000, help="tokenizer size (released models have 32k-150k)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each side; the best counts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides (1: on a shared host, more threads mostly wait on each other)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp())
    from lm_eval.models.huggingface import HFLM

    import lmforge
    from lmforge.evaluate.scorer import Scorer

    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tasks, model = write_tasks(folder, args.docs), write_model(folder, args.dim, args.layers, args.vocab)
        hf = HFLM(pretrained=str(model), batch_size=args.batch_size, device="cpu", dtype="float32")
        lm = lmforge.load(model)
        scorer = Scorer(lm.model, lm.tokenizer, batch_size=args.batch_size)
        print(f"LLaMA dim {args.dim} x {args.layers} layers, vocabulary {lm.config.vocab_size}, {args.docs} documents "
              f"per task, {args.shots}-shot, batch {args.batch_size}, best of {args.rounds}, "
              f"{torch.get_num_threads()} threads")
        for name in KINDS:
            figures[name] = measure(hf, scorer, lm_eval_requests(tasks, name, args.shots), args.rounds)
            print(f"{name}: {figures[name]}")
    (ratio, mine, theirs, n), one_token = figures["endings"], figures["labels"]
    print(f"ratio={ratio:.2f} lmforge_req_s={mine:.1f} lm_eval_req_s={theirs:.1f} requests={n} "
          f"ratio_one_token={one_token[0]:.2f} lmforge_one_token_req_s={one_token[1]:.1f} "
          f"lm_eval_one_token_req_s={one_token[2]:.1f}")


def measure(hf, scorer, instances, rounds: int) -> tuple[float, float, float, int]:
    """(speed-up, lmforge requests/s, lm-eval requests/s, requests) on one task's requests."""
    pairs = [inst.args for inst in instances]
    hf.loglikelihood(instances[:8], disable_tqdm=True)  # warm-up: first-call allocations, oneDNN setup
    scorer.loglikelihood(pairs[:8])
    runs = best_of(rounds, {"lm_eval": lambda: hf.loglikelihood(instances, disable_tqdm=True),
                            "lmforge": lambda: scorer.loglikelihood(pairs)})
    (theirs, their_s), (mine, my_s) = runs["lm_eval"], runs["lmforge"]
    worst = max(abs(a[0] - b[0]) for a, b in zip(mine, theirs))
    assert worst < 1e-3, f"log-likelihoods differ by {worst}"
    n = len(pairs)
    return their_s / my_s, n / my_s, n / their_s, n


if __name__ == "__main__":
    main()
