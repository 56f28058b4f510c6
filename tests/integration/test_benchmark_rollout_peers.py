"""``benchmarks/rollout_peers.py`` runs end to end on a tiny workload: every arm in its own process, the
table, the bandit's choices and the RESULT line (the vLLM arms are in ``tests/vllm``)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "rollout_peers.py"
# eager here: the compiled engine is tested in tests/unit/test_speculative.py
TINY = ["--prompts", "4", "--max-new-tokens", "24", "--steps", "2", "--eager"]


def run_benchmark(*args: str, timeout: int = 600) -> str:
    """Run the benchmark; its stdout (a failure shows its stderr)."""
    done = subprocess.run([sys.executable, str(SCRIPT), *TINY, *args], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def table_row(out: str, arm: str) -> list[str]:
    """The cells of ``arm``'s row in the printed table."""
    rows = [line for line in out.splitlines() if line.startswith(f"{arm} ") and "|" in line]
    assert len(rows) == 1, out
    return [cell.strip() for cell in rows[0].split("|")]


def test_native_and_transformers_arms_in_interleaved_rounds(demo_model_dir, demo_drafter_dir):
    out = run_benchmark("--arms", "tlt-adaptive,tlt-plain,hf", "--rounds", "2")
    order = re.findall(r"running ([\w-]+)", out)
    assert order == ["tlt-adaptive", "tlt-plain", "hf", "hf", "tlt-plain", "tlt-adaptive"], out  # round 2 reversed
    assert not [line for line in out.splitlines() if line.startswith("vllm")]
    result = out.strip().splitlines()[-1]
    # no vLLM arm ran: the first arm is the baseline and the others are ratios against it
    assert re.fullmatch(r"RESULT baseline=tlt-adaptive rounds=2 speedup_tlt_plain=\d+\.\d\d speedup_hf=\d+\.\d\d "
                        r"accept_len_tlt_adaptive=\d+\.\d\d", result), result
    assert "per round s" in out
    adaptive, plain, hf = (table_row(out, arm) for arm in ("tlt-adaptive", "tlt-plain", "hf"))
    for row in (adaptive, plain, hf):
        wall, per_round, tokens, peak_mb = float(row[1]), row[2].split("/"), int(row[6]), float(row[8])
        assert wall > 0 and len(per_round) == 2 and 0 < tokens <= 2 * 4 * 24 and 50 < peak_mb < 8000
        assert abs(sum(map(float, per_round)) / 2 - wall) < 0.06  # the median of two rounds (shown to 0.1 s)
    assert float(adaptive[7]) >= 1.0 and plain[7] == "-" and hf[7] == "-"  # acceptance only where SD ran
    assert adaptive[4] == "-" and plain[4] in ("0/2", "1/2", "2/2")  # rounds slower than the baseline
    assert re.fullmatch(r"tlt-plain \d+%", adaptive[10])  # share of responses identical to plain decoding's
    assert "tlt-adaptive bandit, best arm per batch-size bucket" in out


def test_paired_ratios_are_medians_within_rounds():
    peers = load_script()
    run = {"tokens": [[1, 2], [3]], "accept_len": None, "peak_mb": 100.0, "start_s": 1.0, "walls": [0.0]}
    # the baseline is slow in round 1: per-round ratios 2.0, 1.0 and 1.5 (median 1.5), though the median
    # wall times alone (2.0 vs 2.0) would say 1.0
    walls = [(4.0, 2.0), (1.0, 1.0), (3.0, 2.0)]
    rounds = [{"vllm": {**run, "wall_s": base}, "tlt-plain": {**run, "wall_s": arm, "peak_mb": 100.0 + i}}
              for i, (base, arm) in enumerate(walls)]
    summary = peers.summarize(rounds, "vllm")["tlt-plain"]
    assert summary["ratios"] == [2.0, 1.0, 1.5] and summary["wall_s"] == 2.0
    assert summary["walls"] == [2.0, 1.0, 2.0] and summary["peak_mb"] == 102.0 and summary["tok_s"] == 1.5


def load_script():
    """The benchmark script as a module (``benchmarks/`` is not a package)."""
    spec = importlib.util.spec_from_file_location("rollout_peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_runs_the_engines_eagerly_unless_compile_is_given():
    peers = load_script()

    def compiled(*argv: str) -> bool:
        return peers.compiled_engines(peers.parse_args(list(argv)))

    assert compiled() and compiled("--compile") and compiled("--quick", "--compile")
    assert not compiled("--quick") and not compiled("--eager") and not compiled("--quick", "--eager")


def test_bad_arm_names_are_refused():
    done = subprocess.run([sys.executable, str(SCRIPT), "--arms", "tlt-plain,vllm-fast"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "unknown arm(s) ['vllm-fast']" in done.stderr
    done = subprocess.run([sys.executable, str(SCRIPT), "--arms", "vllm-schedule"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "vllm-schedule needs tlt-adaptive" in done.stderr
    done = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--rounds: must be at least 1" in done.stderr
