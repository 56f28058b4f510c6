"""``benchmarks/rollout_peers.py`` runs end to end on a tiny workload: every arm in its own process, the
table, the bandit's choices and the RESULT line (the vLLM arms are in ``tests/vllm``)."""

from __future__ import annotations

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


def test_native_and_transformers_arms(demo_model_dir, demo_drafter_dir):
    out = run_benchmark("--arms", "tlt-adaptive,tlt-plain,hf")
    assert not [line for line in out.splitlines() if line.startswith("vllm")]
    result = out.strip().splitlines()[-1]
    # no vLLM arm ran: the first arm is the baseline and the others are ratios against it
    assert re.fullmatch(r"RESULT baseline=tlt-adaptive speedup_tlt_plain=\d+\.\d\d speedup_hf=\d+\.\d\d "
                        r"accept_len_tlt_adaptive=\d+\.\d\d", result), result
    adaptive, plain, hf = (table_row(out, arm) for arm in ("tlt-adaptive", "tlt-plain", "hf"))
    for row in (adaptive, plain, hf):
        wall, steps, tokens, peak_mb = float(row[1]), row[2].split("/"), int(row[5]), float(row[7])
        assert wall > 0 and len(steps) == 2 and abs(sum(map(float, steps)) - wall) < 0.15
        assert 0 < tokens <= 2 * 4 * 24 and 50 < peak_mb < 8000
    assert float(adaptive[6]) >= 1.0 and plain[6] == "-" and hf[6] == "-"  # acceptance only where SD ran
    assert re.fullmatch(r"tlt-plain \d+%", adaptive[9])  # share of responses identical to plain decoding's
    assert "tlt-adaptive bandit, best arm per batch-size bucket" in out


def test_bad_arm_names_are_refused():
    done = subprocess.run([sys.executable, str(SCRIPT), "--arms", "tlt-plain,vllm-fast"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "unknown arm(s) ['vllm-fast']" in done.stderr
    done = subprocess.run([sys.executable, str(SCRIPT), "--arms", "vllm-schedule"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "vllm-schedule needs tlt-adaptive" in done.stderr
