"""`benchmarks/response_lengths.py` ends every mode with a RESULT line whose figures agree with its histogram."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "response_lengths.py"


def run(*args: str) -> tuple[str, dict[str, float]]:
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1 and out.stdout.rstrip().endswith(lines[0]), out.stdout[-3000:]
    return out.stdout, {k: float(v) for k, v in (item.split("=", 1) for item in lines[0].split()[1:])}


def summary_line(stdout: str) -> dict[str, float]:
    """The histogram's own summary line: ``n=.. mean=.. median=.. p90=.. p99=.. max=..``."""
    match = re.search(r"n=(\d+) mean=([\d.]+) median=([\d.]+) p90=(\d+) p99=(\d+) max=(\d+)", stdout)
    assert match, stdout[-2000:]
    return dict(zip(("n", "mean", "median", "p90", "p99", "max"), map(float, match.groups())))


def check_consistent(stdout: str, fields: dict[str, float]) -> None:
    hist = summary_line(stdout)
    for key in ("median", "p90", "max"):
        assert fields[key] == hist[key], key
    assert fields["p90_over_median"] == pytest.approx(hist["p90"] / hist["median"], abs=0.005)
    assert fields["max_over_median"] == pytest.approx(hist["max"] / hist["median"], abs=0.005)


def test_reference_mode_reports_the_traces_lengths():
    stdout, fields = run("--reference", "--quick")
    assert summary_line(stdout)["n"] == 48
    assert set(fields) == {"median", "p90", "max", "p90_over_median", "max_over_median"}
    check_consistent(stdout, fields)
    assert fields["max_over_median"] > 2  # the demo task's lengths are long-tailed


def test_sampled_mode_reports_accuracy_and_the_ratio_to_the_reference(demo_model_dir):
    stdout, fields = run("--model", str(demo_model_dir), "--problems", "6", "--max-new-tokens", "96")
    _, reference = run("--reference", "--problems", "6")
    assert summary_line(stdout)["n"] == 6
    check_consistent(stdout, fields)
    assert 0 <= fields["accuracy"] <= 1
    assert fields["max"] <= 96
    assert fields["median_vs_reference"] == pytest.approx(fields["median"] / reference["median"], abs=0.005)


def test_bad_problem_count_is_refused_with_the_field_named():
    out = subprocess.run([sys.executable, str(SCRIPT), "--problems", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "--problems: must be at least 1" in out.stderr
