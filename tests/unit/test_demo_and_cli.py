"""The demo model builder and the ``tlt`` command line (run as real subprocesses, or in process through ``main``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tlt.models import load_model
from tlt.models.demo import ensure_demo_model

FAST_BUILD = {"TLT_DEMO_TRAIN_STEPS": "3", "TLT_DEMO_EVAL_PROBLEMS": "0"}  # the full build takes ~9 min


@pytest.fixture(autouse=True)
def fast_demo_build(monkeypatch):
    for key, value in FAST_BUILD.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def tlt_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tlt_home")


def run_tlt(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **FAST_BUILD, "TLT_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "tlt.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_demo_model_is_a_valid_hf_model(tmp_path):
    path = ensure_demo_model(tmp_path / "demo")
    assert (path / ".complete").exists()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    text = "12+7=19\nx*(3-4)"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    ours = load_model(path, dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, ref(x).logits, atol=1e-4, rtol=1e-4)
    assert ours.config.eos_token_ids == (tokenizer.eos_token_id,)


def test_help_lists_commands(tlt_home):
    out = run_tlt("--help", home=tlt_home).stdout
    assert "generate" in out and "build-demo-model" in out


def test_the_command_line_answers_help_and_argument_errors_without_loading_torch():
    """``tlt --help`` and a mistyped option come back at once (torch takes ~3 s to import, transformers ~7 s)."""
    probe = ("import sys; import tlt.cli; tlt.cli.build_parser(); "
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_build_demo_then_generate_json(tlt_home, tmp_path):
    built = run_tlt("build-demo-model", home=tlt_home)
    assert "demo model ready" in built.stdout
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1="}) + "\n" + json.dumps({"prompt": "abc"}) + "\n")
    proc = run_tlt("generate", "--prompts", str(prompts), "--max-new-tokens", "5", "--json",
                   "--temperature", "0.8", "--seed", "3", home=tlt_home)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["1+1=", "abc"]
    assert all(1 <= len(r["token_ids"]) <= 5 and r["finish_reason"] in ("stop", "length") for r in rows)
    assert "tok/s" in proc.stderr
    again = run_tlt("generate", "--prompts", str(prompts), "--max-new-tokens", "5", "--json",
                    "--temperature", "0.8", "--seed", "3", home=tlt_home)
    assert again.stdout == proc.stdout  # seeded


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("generate", "--model", "/nonexistent/model"), "model directory /nonexistent/model does not exist"),
        (("generate", "--temperature", "-1"), "sampling.temperature must be"),
        (("generate", "--prompts", "/nonexistent.txt"), "--prompts: file /nonexistent.txt does not exist"),
        (("generate", "--dtype", "int3"), "dtype 'int3' is not supported"),
        (("train-drafter", "--steps", "0"), "--steps must be >= 1, got 0"),
        (("train-drafter", "--lr", "0"), "--lr must be > 0, got 0.0"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tlt_home, args, message):
    proc = run_tlt(*args, home=tlt_home, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_generate_with_a_drafter_speculates_and_changes_no_token(demo_model_dir, demo_drafter_dir, capsys):
    from tlt.cli import main

    base = ["generate", "--model", str(demo_model_dir), "--max-new-tokens", "40", "--json", "--temperature", "0"]
    runs = {}
    for name, extra in {"plain": [], "adaptive": ["--drafter", str(demo_drafter_dir)],
                        "always": ["--drafter", str(demo_drafter_dir), "--sd-strategy", "4_2_8"]}.items():
        assert main([*base, *extra]) == 0
        out, err = capsys.readouterr()
        runs[name] = ([json.loads(line)["token_ids"] for line in out.splitlines()], err)
    assert runs["adaptive"][0] == runs["plain"][0] == runs["always"][0]  # greedy SD is lossless
    assert "speculative decoding" not in runs["plain"][1]
    for name in ("adaptive", "always"):
        accepted = float(runs[name][1].rsplit("acceptance length ", 1)[1])
        assert accepted > 1.5, runs[name][1]  # the trained demo drafter gets its drafts accepted


@pytest.mark.parametrize(("args", "message"), [
    (["--sd-strategy", "3_2_6"], "--sd-strategy needs --drafter DIR"),
    (["--drafter", "{drafter}", "--sd-strategy", "3_x_6"], "--sd-strategy: rollout.speculative.strategy '3_x_6' is"),
    (["--drafter", "/nonexistent/drafter"], "drafter directory /nonexistent/drafter does not exist"),
], ids=["strategy-without-drafter", "bad-strategy", "missing-drafter"])
def test_generate_speculation_errors_are_one_line(demo_model_dir, demo_drafter_dir, capsys, args, message):
    from tlt.cli import main

    args = [a.format(drafter=demo_drafter_dir) for a in args]
    assert main(["generate", "--model", str(demo_model_dir), *args]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("tlt generate: error: ") and message in line
