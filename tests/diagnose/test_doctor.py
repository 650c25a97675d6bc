"""`lmforge doctor RUN`: each classic failure, provoked in a tiny run, is named; a healthy run gets no alarm."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from health_runs import DeepTanhLM, counter_rows, force_uniform_head, random_rows, run, tiny_model
from lmforge.cli.main import main
from lmforge.diagnose.doctor import CODES, check_diversity, diagnose
from lmforge.diagnose.run import RunHistory, read_run
from lmforge.errors import LmforgeError


def codes(folder: Path) -> dict[str, str]:
    return {f.code: f.evidence for f in diagnose(read_run(folder))}


@pytest.fixture(scope="module")
def healthy(tmp_path_factory) -> Path:
    """Counting, learnt to a plateau, validated on held-out rows of the same task."""
    torch.set_num_threads(1)
    return run(tmp_path_factory.mktemp("healthy") / "run", train_rows=counter_rows(256, 0, lag=1),
               eval_rows=counter_rows(16, 1, lag=1), lr=1e-2, min_lr=1e-3, steps=40, eval_every=20, log_every=4)


def test_a_healthy_run_gets_no_false_alarm(healthy: Path) -> None:
    assert codes(healthy) == {}


def test_huge_learning_rate_is_exploding_and_too_high(tmp_path: Path, one_thread) -> None:
    found = codes(run(tmp_path / "run", lr=1.0, min_lr=1.0, steps=24, eval_every=0, log_every=2, watch_attention=False))
    assert {"exploding_gradients", "lr_too_high"} <= set(found), found
    assert "clipped on" in found["exploding_gradients"]


def test_deep_tiny_init_model_has_vanishing_gradients(tmp_path: Path, one_thread) -> None:
    found = codes(run(tmp_path / "run", DeepTanhLM(), steps=12, eval_every=0, log_every=3, watch_attention=False))
    assert "vanishing_gradients" in found and "block.0 vs block.11" in found["vanishing_gradients"]


def test_memorising_a_tiny_corpus_is_overfitting(tmp_path: Path, one_thread) -> None:
    found = codes(run(tmp_path / "run", train_rows=random_rows(8, 0), eval_rows=random_rows(16, 1), lr=1e-2,
                      min_lr=1e-3, steps=40, eval_every=10, log_every=4, watch_attention=False))
    assert "overfitting" in found and "at step 10" in found["overfitting"], found


def test_a_head_forced_constant_is_named(tmp_path: Path, one_thread) -> None:
    model = tiny_model()
    force_uniform_head(model, layer=1, head=0)
    found = codes(run(tmp_path / "run", model, lr=1e-2, min_lr=1e-3, steps=60, eval_every=30, log_every=4))
    assert "collapsed_attention" in found and "layer 1 head 0: 1.00" in found["collapsed_attention"], found
    assert "layer 0 head" not in found["collapsed_attention"]


def test_a_tiny_learning_rate_is_too_low(tmp_path: Path, one_thread) -> None:
    found = codes(run(tmp_path / "run", lr=1e-7, min_lr=1e-8, steps=8, eval_every=0, log_every=2, watch_attention=False))
    assert set(found) == {"lr_too_low"}


def _history(losses: list[float | None], **per_step: list) -> RunHistory:
    train = [{"kind": "train", "step": i + 1, "loss": loss, "grad_norm": 0.5, **{k: v[i] for k, v in per_step.items()}}
             for i, loss in enumerate(losses)]
    return RunHistory(Path("."), train, [])


@pytest.mark.parametrize(("history", "code", "evidence"), [
    (_history([3.0] * 10, expert_tokens=[[[5, 0, 3]]] * 10), "dead_experts", "layer 0 expert 1"),
    (_history([3.0, 2.9, None, 2.8] + [2.7] * 6, skipped=[False, False, True] + [False] * 7), "non_finite", "steps 3"),
    (_history([3.0] * 5 + [9.0] + [3.0] * 4, loss_spike=[False] * 5 + [True] + [False] * 4), "loss_spikes", "steps 6"),
    (_history([4.0 - 0.3 * i for i in range(12)]), "undertrained", "last fifth"),
])
def test_failures_recorded_by_the_loop_are_named(history: RunHistory, code: str, evidence: str) -> None:
    found = {f.code: f for f in diagnose(history)}
    assert code in found and evidence in found[code].evidence, found
    assert found[code].code in CODES and found[code].advice


def test_samples_that_repeat_themselves_have_low_diversity() -> None:
    reference = " ".join(f"word{i % 97} other{i % 89}" for i in range(400))
    assert check_diversity(["the the the the the the the the"] * 6, reference).code == "low_diversity"
    varied = [" ".join(f"word{(i * 7 + j) % 97} other{(i * 5 + j) % 89}" for j in range(8)) for i in range(6)]
    assert check_diversity(varied, reference) is None


# ---------------------------------------------------------------- the command


def test_doctor_command_prints_findings_as_json_and_writes_the_picture(healthy: Path, capsys) -> None:
    assert main(["doctor", str(healthy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert (healthy / "doctor.png").stat().st_size > 10_000
    assert main(["doctor", str(healthy), "--out", str(healthy / "again.png")]) == 0
    text = capsys.readouterr().out
    assert "no problems found" in text and "--reference" in text and (healthy / "again.png").is_file()


def test_doctor_samples_the_run_model_with_a_reference(tmp_path: Path, tiny_lm_dir: Path, capsys, one_thread) -> None:
    run_dir = shutil.copytree(tiny_lm_dir, tmp_path / "run")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 3.0, "grad_norm": 1.0}) + "\n")
    (tmp_path / "train.txt").write_text(" ".join(f"w{i % 50}" for i in range(500)))
    assert main(["doctor", str(run_dir), "--json", "--reference", str(tmp_path / "train.txt"), "--samples", "3"]) == 0
    findings = json.loads(capsys.readouterr().out)
    assert all(set(f) == {"code", "severity", "evidence", "advice"} for f in findings)
    assert "low_diversity" in {f["code"] for f in findings}  # a random model writes nothing like w1 w2 w3


@pytest.mark.parametrize(("files", "message"), [
    (None, "does not exist"),
    ({"checkpoints/step_0000010/train_state.json": "{}"}, "has no metrics.jsonl"),
    ({"metrics.jsonl": '{"kind": "eval", "step": 5, "eval_loss": 3.0}\n{"kind": "tra'}, "holds no training steps"),
])
def test_doctor_errors_are_one_line(tmp_path: Path, cli, files: dict | None, message: str) -> None:
    folder = tmp_path / "run"
    if files is not None:
        folder.mkdir()
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
    out = cli("doctor", folder)
    assert out.returncode == 2 and out.stderr.startswith("lmforge: error:") and out.stderr.count("\n") == 1, out.stderr
    assert message in out.stderr
    with pytest.raises(LmforgeError, match=message):
        read_run(folder)
