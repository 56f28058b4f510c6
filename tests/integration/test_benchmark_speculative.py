"""``benchmarks/speculative.py`` runs end to end on a tiny workload: four arms in interleaved rounds, the
same tokens in every arm (fp32, where SD reproduces plain sampling exactly) and the RESULT line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "speculative.py"
ARMS = ("no SD", "SD always (3_2_6)", "adaptive SD", "adaptive SD, warm bandit")


def test_every_arm_runs_the_same_tokens_and_a_result_line_ends_it(demo_model_dir, demo_drafter_dir):
    done = subprocess.run([sys.executable, str(SCRIPT), "--prompts", "4", "--max-new-tokens", "24", "--repeats",
                           "2", "--dtype", "float32", "--strategy", "3_2_6", "--threshold", "3"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "engines=eager" in out, out
    for arm in ARMS:
        rows = [line for line in out.splitlines() if line.startswith(f"{arm} ") and "|" in line]
        assert len(rows) == 1, out
        cells = [cell.strip() for cell in rows[0].split("|")]
        assert cells[7] == "100%", rows[0]  # same tokens as no SD
        assert len(cells[8].split()) == 2, rows[0]  # one wall time per round
    result = out.strip().splitlines()[-1]
    fields = dict(item.split("=") for item in result.split()[1:])
    assert re.fullmatch(r"RESULT( \w+=\d+\.\d\d){5}", result) and fields["accept_len_always"] != "0.00", result
