"""`lmforge generate`, `lmforge chat` and `lmforge convert` driven as a user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import lmforge


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


def test_generate_json_matches_library(tiny_lm_dir):
    out = run("generate", str(tiny_lm_dir), "--prompt", "The quick", "--max-new-tokens", "8", "--temperature", "0", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    lm = lmforge.load(tiny_lm_dir)
    assert data["text"] == lm.generate("The quick", max_new_tokens=8, temperature=0)
    assert len(data["tokens"]) <= 8 and data["finish_reason"] in ("stop", "length")


def test_stream_pieces_join_to_full_text(tiny_lm_dir):
    lm = lmforge.load(tiny_lm_dir)
    pieces = list(lm.stream("你好", max_new_tokens=30, temperature=1.0, seed=3))
    ids = lm.tokenizer.encode("你好", add_special_tokens=True)
    tokens = [t.token for t in lm.tokens(lm.request(ids, 30, lm.sampling(temperature=1.0, seed=3)))]
    tokens = [t for t in tokens if t not in (lm.tokenizer.eot_id, lm.tokenizer.eos_id)]
    assert "".join(pieces) == lm.tokenizer.decode(tokens, skip_special_tokens=True)


def test_stop_string_spanning_tokens(tiny_lm_dir):
    lm = lmforge.load(tiny_lm_dir)
    full = lm.generate("The", max_new_tokens=40, temperature=1.0, seed=7)
    assert len(full) > 6
    stop = full[3:6]  # three characters, usually spanning token boundaries
    cut = lm.generate("The", max_new_tokens=40, temperature=1.0, seed=7, stop=[stop])
    assert cut == full[: full.find(stop)]


def test_chat_repl_with_piped_stdin(tiny_lm_dir):
    script = "hello there\n/system be brief\nsecond message\n/reset\n/quit\n"
    out = run("chat", str(tiny_lm_dir), "--max-new-tokens", "5", "--temperature", "0", stdin=script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("assistant>") == 2
    assert "(system prompt set)" in out.stdout and "(conversation reset)" in out.stdout


def test_convert_to_hf_and_back(tiny_lm_dir, tmp_path):
    out = run("convert", str(tiny_lm_dir), "--to", "hf", "--out", str(tmp_path / "hf"))
    assert out.returncode == 0, out.stderr
    a, b = lmforge.load(tiny_lm_dir), lmforge.load(tmp_path / "hf")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(a.model(ids), b.model(ids))
    assert b.tokenizer.encode("hello") == a.tokenizer.encode("hello")


@pytest.mark.parametrize("args", [["generate", "/no/such/model", "--prompt", "x"], ["doctor", "/no/such/model"]])
def test_bad_path_is_one_line(args):
    out = run(*args)
    assert out.returncode == 2
    assert out.stderr.startswith("lmforge: error:") and out.stderr.count("\n") == 1 and "does not exist" in out.stderr


def test_unsupported_model_type_is_one_line_listing_the_supported(tmp_path):
    from lmforge.checkpoint.hf import FAMILIES

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}))
    out = run("generate", str(tmp_path), "--prompt", "x")
    assert out.returncode == 2
    assert out.stderr.startswith("lmforge: error:") and out.stderr.count("\n") == 1, out.stderr
    assert "'t5'" in out.stderr and all(name in out.stderr for name in FAMILIES)


def test_doctor_says_whether_the_native_kernel_runs():
    out = run("doctor")
    assert out.returncode == 0 and "native decode kernels: " in out.stdout
    off = subprocess.run([sys.executable, "-m", "lmforge.cli", "-v", "doctor"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "LMFORGE_NATIVE": "0"})
    assert "native decode kernels: no" in off.stdout and "LMFORGE_NATIVE=0" in off.stderr
    if shutil.which("cc"):  # a CPU without AVX2, as LMFORGE_NATIVE=portable makes any CPU look
        portable = subprocess.run([sys.executable, "-m", "lmforge.cli", "doctor"], capture_output=True, text=True,
                                  timeout=120, env={**os.environ, "LMFORGE_NATIVE": "portable"})
        assert "native decode kernels: no" in portable.stdout and "portable int8 / int4 matmuls" in portable.stdout


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_then_generate(tiny_lm_dir, tmp_path, bits):
    skip = ["--skip", "lm_head", "*.mlp.down"] if bits == 4 else []  # tiny-llama's MLP (172 wide) has no int4 group
    out = run("quantize", str(tiny_lm_dir), "--bits", str(bits), *skip, "--out", str(tmp_path / "q"))
    assert out.returncode == 0, out.stderr
    assert "MiB ->" in out.stdout
    q, full = lmforge.load(tmp_path / "q"), lmforge.load(tiny_lm_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        a, b = q.model(ids), full.model(ids)
    assert (a - b).abs().max() < 0.25 * b.abs().max()  # close, not equal: weights are rounded
    gen = run("generate", str(tmp_path / "q"), "--prompt", "The", "--max-new-tokens", "4", "--temperature", "0", "--json")
    assert gen.returncode == 0, gen.stderr


def test_generate_with_beams(tiny_lm_dir):
    lm = lmforge.load(tiny_lm_dir)
    want = lm.generate("The quick", max_new_tokens=8, num_beams=3)
    args = ["generate", str(tiny_lm_dir), "--prompt", "The quick", "--max-new-tokens", "8", "--num-beams=3"]
    out = run(*args, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["text"] == want
    out = run(*args)
    assert out.returncode == 0, out.stderr
    assert out.stdout == want + "\n"
    out = run(*args, "--temperature", "0.5")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "cannot honour temperature=0.5" in out.stderr


def test_generate_with_a_draft_is_plain_greedy(tiny_lm_dir, tmp_path):
    from dataclasses import replace

    from lmforge.api import LM
    from lmforge.models import build_model

    lm = lmforge.load(tiny_lm_dir)
    model = build_model(replace(lm.config, n_layers=1))  # the target's first layer: agrees some of the time
    model.load_state_dict(lm.model.state_dict(), strict=False)
    LM(model, lm.tokenizer).save(draft := tmp_path / "draft")
    args = ["generate", str(tiny_lm_dir), "--prompt=The quick", "--max-new-tokens=12", "--temperature=0"]
    plain, speculative = run(*args, "--json"), run(*args, "--json", "--draft", str(draft))
    assert speculative.returncode == 0, speculative.stderr
    assert json.loads(speculative.stdout) == json.loads(plain.stdout)
