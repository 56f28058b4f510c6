"""`tlt serve` processes started by a test on their own (not by `tlt run`), so they outlive any controller;
and how to catch a controller in the middle of a step's rollout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.processes import step_records
from tlt.rollout.service import RemoteRolloutWorker
from tlt.serving.launcher import PARENT_PID_ENV

START_TIMEOUT_S = 300.0


@dataclass
class ServiceProcess:
    """One `tlt serve KIND` process; its ports once :meth:`wait_serving` has returned."""

    name: str
    proc: subprocess.Popen
    directory: Path
    port: int = 0
    metrics_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        path = self.directory / f"{self.name}.log"
        return path.read_text(errors="replace") if path.is_file() else "(no log)"

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> ServiceProcess:
        """Wait for its port file (fails with its log if it exits or takes longer than ``timeout_s``)."""
        port_file = self.directory / f"{self.name}.port"
        deadline = time.monotonic() + timeout_s
        while not port_file.is_file():
            assert self.proc.poll() is None, f"{self.name} exited with {self.proc.returncode}:\n{self.log}"
            assert time.monotonic() < deadline, f"{self.name} did not start in {timeout_s:.0f} s:\n{self.log}"
            time.sleep(0.1)
        info = json.loads(port_file.read_text())
        self.port, self.metrics_port = info["port"], info["metrics_port"]
        return self

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM (the service drains), SIGKILL after ``grace_s``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn_service(kind: str, config: Path | None, directory: Path, name: str = "", *extra: str,
                  threads: int = 1) -> ServiceProcess:
    """Start `tlt serve KIND --config CONFIG` (no config: the defaults) on free ports, logging to
    ``directory/NAME.log``; returns at once (call :meth:`ServiceProcess.wait_serving`). ``extra``: more flags,
    e.g. ``--drafter HOST:PORT`` or ``--set rollout.max_running=8``; without ``--host`` it binds the default
    address."""
    name = name or kind
    directory.mkdir(parents=True, exist_ok=True)
    port_file = directory / f"{name}.port"
    port_file.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != PARENT_PID_ENV}  # tied to nobody's life
    with open(directory / f"{name}.log", "ab") as log:
        config_flags = ["--config", str(config)] if config is not None else []
        proc = subprocess.Popen([sys.executable, "-m", "tlt.cli", "serve", kind, *config_flags, "--name", name,
                                 "--port", "0", "--metrics-port", "0", "--port-file", str(port_file),
                                 "--threads", str(threads), *extra],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return ServiceProcess(name, proc, directory)


def wait_for_rollout(step: int, controller: subprocess.Popen, run_dir: Path, workers: list[RemoteRolloutWorker],
                     log: Path | None = None, timeout_s: float = START_TIMEOUT_S) -> None:
    """Return once one of ``workers`` decodes requests of ``step`` (it holds policy ``step - 1`` and runs
    requests) for the `tlt run` process ``controller`` writing to ``run_dir``. Fails if that step's rollout
    went by unseen or the controller exited (with the tail of its ``log``)."""
    before = list(range(1, step))
    deadline = time.monotonic() + timeout_s
    while True:
        if controller.poll() is not None:
            tail = log.read_text(errors="replace")[-5000:] if log is not None and log.is_file() else ""
            raise AssertionError(f"the controller exited with {controller.returncode}:\n{tail}")
        assert time.monotonic() < deadline, f"step {step}'s rollout did not start in {timeout_s:.0f} s"
        done = [r["step"] for r in step_records(run_dir)]
        assert done == before[:len(done)], f"step {step}'s rollout went by unseen (steps done: {done})"
        if done == before:
            for worker in workers:
                running = worker.progress().running
                if worker.policy_version == step - 1 and running > 0:
                    return
        time.sleep(0.02)
