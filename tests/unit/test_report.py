"""The Markdown + PNG report from RL step logs (tlt.controller.report)."""

import json

import pytest

from tlt.controller.report import main_report, read_log, write_report
from tlt.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMAGES = ("response_lengths", "reward", "rollout_time", "acceptance_length", "roles", "step_time")


def _step(step: int, rollout: float, mode: str = "adaptive", acc: float = 2.5) -> dict:
    """A full step record: wall = rollout + 1.5 train + 0.5 publish."""
    return {
        "step": step, "wall_s": rollout + 2.0, "rollout_s": rollout, "train_s": 1.5, "publish_s": 0.5,
        "reward_mean": 0.1 * step, "reward_std": 0.05, "heldout_reward": 0.2 if step == 2 else None,
        "response_lengths": [10 * step, 20, 300, 15, 64, 70],
        "sd": {"mode": mode, "acceptance_length": None if mode == "off" else acc + 0.1 * step,
               "draft_tokens": 100, "accepted_tokens": 60, "sd_seconds": 3.0 if mode != "off" else 0.0,
               "plain_seconds": 1.0},
        "policy_version": step - 1, "drafter_version": None if mode == "off" else step - 1,
        "new_drafter_version": None if mode == "off" else step,
        "tail_s": 1.0,
        "roles": [{"worker": "rollout-0", "spans": [[0, 2, "rollout"], [2, 3, "drafter"]]},
                  {"worker": "rollout-1", "spans": [[0, 2.5, "rollout"], [2.5, 3, "idle"]]}],
        "drafter_train": {"steps": 4, "tokens": 500, "pushes": 1, "loss": 1.2, "preemptions": 1},
        "trainer": {"loss": 0.3, "kl": 0.01},
    }


def _write(path, steps, start=True, end=True):
    rows = [{"event": "start", "config": {}, "baseline_heldout_reward": 0.1}] if start else []
    rows += [{"event": "progress", "step": 1}]  # unknown events are skipped
    rows += steps
    rows += [{"event": "end", "total_s": 15.0, "final_heldout_reward": 0.3}] if end else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


def _assert_pngs(out_dir):
    for name in IMAGES:
        data = (out_dir / f"{name}.png").read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 5000, name


def test_read_log_splits_events(tmp_path):
    log = read_log(_write(tmp_path / "a.jsonl", [_step(s, 2.0) for s in (1, 2, 3)]))
    assert [s["step"] for s in log.steps] == [1, 2, 3]
    assert log.start["baseline_heldout_reward"] == 0.1 and log.end["total_s"] == 15.0
    assert log.steps_s == 12.0 and log.rollout_s == 6.0 and log.total_s == 15.0
    assert log.drafter_versions_published() == 3


def test_two_runs_compared(tmp_path):
    tlt = read_log(_write(tmp_path / "a.jsonl", [_step(s, 2.0) for s in (1, 2, 3)]))
    off = read_log(_write(tmp_path / "b.jsonl", [_step(s, 6.0, mode="off") for s in (1, 2, 3)], end=False))
    report = write_report({"TLT": tlt, "SD off": off}, tmp_path / "out", title="bench")
    text = report.read_text()
    assert report == tmp_path / "out" / "report.md"
    assert text.startswith("# bench\n")
    assert "TLT" in text and "SD off" in text
    # comparison: total (end event 15 s vs 24 s of steps), step time 12 vs 24, rollout 6 vs 18; ratios run / first
    assert "| TLT | 15.0 | 12.0 | 6.0 | 1.00x | 1.00x | 1.00x | 0.300 | 2.70 |" in text
    assert "| SD off | 24.0 | 24.0 | 18.0 | 1.60x | 2.00x | 3.00x | 0.200 | - |" in text
    # summary: mean step 4 s, rollout share 50%, reward 0.1 -> 0.3, held-out 0.1 -> 0.3, 3 drafter versions
    assert "| TLT | adaptive | 3 | 15.0 | 4.00 | 50% | 0.100 → 0.300 | 0.100 → 0.300 | 2.70 | 3 | 12 | 3 |" in text
    assert "| SD off | off | 3 | 24.0 | 8.00 | 75% |" in text
    assert "## TLT: per step" in text and "## SD off: per step" in text
    assert "| 2 | 4.00 | 2.00 | 1.50 | 0.50 | 1.00 | 0.200 ± 0.050 | 0.200 | 2.70 | 1 | 1 | 4 | 1 |" in text
    assert "n=6 mean=" in text  # ASCII histogram from length_stats / ascii_histogram
    for name in IMAGES:
        assert f"]({name}.png)" in text
    _assert_pngs(tmp_path / "out")


def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"step": 1}\n\n{oops\n')
    with pytest.raises(ConfigError, match=r"s\.jsonl line 3: invalid JSON"):
        read_log(path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ConfigError, match="line 2: expected a JSON object"):
        read_log(path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_log(tmp_path / "missing.jsonl")


def test_sd_off_and_missing_optional_keys_render(tmp_path):
    steps = [{"step": 1, "wall_s": 1.0, "rollout_s": 0.5, "sd": {"mode": "off"}},
             {"step": 2, "wall_s": 1.2, "rollout_s": 0.6, "reward_mean": 0.5, "heldout_reward": None},
             {"step": 3}]
    log = _write(tmp_path / "run" / "steps.jsonl", steps, start=False, end=False)
    assert main_report([log], None, tmp_path / "rep") == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| run | off | 3 | 2.2 |" in text  # label defaults to the log's directory name
    assert "| 3 | - | - | - | - | - | - | - | - | - | - | - | - |" in text
    assert "## Comparison" not in text
    _assert_pngs(tmp_path / "rep")


def test_main_report_labels(tmp_path, capsys):
    a = _write(tmp_path / "tlt" / "steps.jsonl", [_step(1, 2.0)], end=False)
    b = _write(tmp_path / "off" / "steps.jsonl", [_step(1, 4.0, mode="off")], end=False)
    with pytest.raises(ConfigError, match="2 names for 1 logs"):
        main_report([a], ["x", "y"], tmp_path / "r")
    with pytest.raises(ConfigError, match="distinct"):
        main_report([a, b], ["x", "x"], tmp_path / "r")
    assert main_report([a, b], None, tmp_path / "r") == 0
    assert "report:" in capsys.readouterr().out
    text = (tmp_path / "r" / "report.md").read_text()
    assert "# TLT comparison: tlt vs off" in text
    assert "| off | 6.0 | 6.0 | 4.0 | 1.50x | 1.50x | 2.00x |" in text
