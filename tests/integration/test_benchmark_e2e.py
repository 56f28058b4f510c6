"""``benchmarks/e2e.py``: the three RL jobs step in lockstep, the order reversed every step, and the script
runs end to end on a one-step job (the full comparison is the benchmark's)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "e2e.py"


def load_script():
    """The benchmark script as a module (``benchmarks/`` is not a package)."""
    spec = importlib.util.spec_from_file_location("e2e_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeJob:
    """Records the calls the interleaving makes, in one shared list."""

    def __init__(self, name: str, steps: int, calls: list[str]) -> None:
        self.name, self.steps, self.step, self.calls = name, steps, 0, calls

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    def begin(self) -> None:
        self.calls.append(f"begin {self.name}")

    def run_step(self) -> dict:
        self.step += 1
        self.calls.append(f"{self.name}{self.step}")
        return {"step": self.step}

    def finish(self) -> None:
        self.calls.append(f"finish {self.name}")

    def close(self) -> None:
        self.calls.append(f"close {self.name}")


def test_jobs_step_in_lockstep_in_alternating_order():
    calls: list[str] = []
    jobs = {name: FakeJob(name, steps, calls) for name, steps in (("a", 3), ("b", 3), ("c", 2))}
    records = load_script().run_interleaved(jobs)
    assert calls == ["begin a", "begin b", "begin c", "a1", "b1", "c1", "c2", "b2", "a2", "a3", "b3",
                     "finish a", "finish b", "finish c", "close a", "close b", "close c"]
    assert [r["step"] for r in records["a"]] == [1, 2, 3] and len(records["c"]) == 2


def test_jobs_are_closed_when_a_step_fails():
    calls: list[str] = []
    jobs = {name: FakeJob(name, 2, calls) for name in "ab"}

    def broken() -> dict:
        raise RuntimeError("worker lost")

    jobs["b"].run_step = broken
    with pytest.raises(RuntimeError, match="worker lost"):
        load_script().run_interleaved(jobs)
    assert calls[-2:] == ["close a", "close b"]


@pytest.mark.parametrize("services", ["inproc", "processes"])
def test_one_step_job_end_to_end(services, demo_model_dir, demo_drafter_dir, tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--steps", "1", "--out", str(tmp_path),
                           "--services", services], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    result = done.stdout.strip().splitlines()[-1]
    assert re.match(r"RESULT e2e_speedup=\d+\.\d\d rollout_speedup=\d+\.\d\d frozen_e2e_speedup=\d+\.\d\d "
                    r"step_speedup_median=\d+\.\d\d reward_tlt=0\.\d+ reward_off=0\.\d+ reward_frozen=0\.\d+ ", result)
    for arm in ("TLT", "SD-off", "frozen-drafter"):
        lines = [json.loads(line) for line in (tmp_path / arm / "steps.jsonl").read_text().splitlines()]
        assert [line.get("event") for line in lines] == ["start", None, "end"]
        # the job's own time: its step and final evaluation, not the other arms' steps in between
        assert lines[1]["wall_s"] <= lines[2]["total_s"] < lines[1]["wall_s"] + 60
        # with processes, each arm's workers ran as services of their own (the launcher logs them there)
        assert (tmp_path / arm / "services" / "rollout-0.log").is_file() == (services == "processes")
    assert (tmp_path / "report").is_dir()
