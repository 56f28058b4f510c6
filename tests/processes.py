"""Helpers for tests that watch real processes and the step log they write."""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, not yet reaped by its parent, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for a server the test starts next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def scrape(metrics_port: int, family: str) -> list[Sample]:
    """The samples of metric ``family`` (its name without ``_total``) on a local /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return [sample for f in text_string_to_metric_families(text) if f.name == family for sample in f.samples]


def step_records(run_dir: Path) -> list[dict]:
    """The per-step records of ``run_dir/steps.jsonl`` (start/end events left out; [] before the first)."""
    log = Path(run_dir) / "steps.jsonl"
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if '"step"' in line and '"event"' not in line]


def checkpoint_optimizer_steps(run_dir: Path) -> int:
    """The optimizer update count in the trainer checkpoint that ``run_dir``'s committed controller state names."""
    from tlt.controller.loop import committed_trainer_checkpoint
    from tlt.trainer.policy import META_FILE

    return json.loads((committed_trainer_checkpoint(run_dir) / META_FILE).read_text())["step"]
