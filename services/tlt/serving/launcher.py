"""Starts the job's services as separate local processes on loopback (what `tlt run` does by default)
and tears them down on exit, Ctrl-C or failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tlt.config import JobSpec
from tlt.controller.services import ServiceAddresses
from tlt.errors import TLTError

START_TIMEOUT_S = 600.0
PARENT_PID_ENV = "TLT_PARENT_PID"


def die_with_parent() -> None:
    """Called by a service at start when launched by LocalServices: get SIGTERM when the launching process dies,
    even by SIGKILL (Linux), so a killed `tlt run` leaves no orphaned services behind."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class ServiceStartError(TLTError):
    """A service process exited or did not come up; the message holds the tail of its log."""


class LocalServices:
    """``with LocalServices(spec) as addresses:`` — drafter, trainer and rollout processes on 127.0.0.1.

    Logs go to ``<output_dir>/services/<name>.log``. Rollout workers split the machine's threads; the
    trainer gets them all (it runs while the workers wait), the drafter service one.
    """

    def __init__(self, spec: JobSpec, start_timeout: float = START_TIMEOUT_S) -> None:
        self.spec = spec
        self.dir = Path(spec.output_dir) / "services"
        self.start_timeout = start_timeout
        self.procs: dict[str, subprocess.Popen] = {}
        self.metrics_ports: dict[str, int] = {}
        self.ports: dict[str, int] = {}
        self._args: dict[str, tuple[str, Path, int, list[str]]] = {}

    def __enter__(self) -> ServiceAddresses:
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "job.yaml"
        config.write_text(yaml.safe_dump(self.spec.to_dict(), sort_keys=False))
        threads = self.spec.threads or os.cpu_count() or 1
        workers = self.spec.rollout.workers
        try:
            sd_on = self.spec.rollout.speculative.mode != "off"
            ports: dict[str, int] = {}
            # the drafter service publishes drafter v0 that rollout workers start from, so it comes first
            first = [("trainer", "trainer", threads, [])] + ([("drafter", "drafter", 1, [])] if sd_on else [])
            for name, kind, n, extra in first:
                self._spawn(name, kind, config, n, extra)
            for name, *_ in first:
                ports[name] = self._wait(name)
            for i in range(workers):
                extra = ["--drafter", f"127.0.0.1:{ports['drafter']}"] if sd_on else []
                self._spawn(f"rollout-{i}", "rollout", config, max(1, threads // workers), extra)
            rollout = tuple(f"127.0.0.1:{self._wait(f'rollout-{i}')}" for i in range(workers))
        except BaseException:
            self.close()
            raise
        return ServiceAddresses(rollout, f"127.0.0.1:{ports['drafter']}" if sd_on else None,
                                f"127.0.0.1:{ports['trainer']}")

    def __exit__(self, *exc) -> None:
        self.close()

    def _spawn(self, name: str, kind: str, config: Path, threads: int, extra: list[str]) -> None:
        self._args[name] = (kind, config, threads, extra)
        port_file = self.dir / f"{name}.port"
        port_file.unlink(missing_ok=True)
        # a restarted service keeps its ports, so clients reconnect to the same address
        port, metrics_port = self.ports.get(name, 0), self.metrics_ports.get(name, 0)
        cmd = [sys.executable, "-m", "tlt.cli", "serve", kind, "--config", str(config), "--name", name,
               "--port", str(port), "--metrics-port", str(metrics_port), "--threads", str(threads),
               "--port-file", str(port_file), *extra]
        log = (self.dir / f"{name}.log").open("ab")
        # the child ties its life to ours itself (PARENT_PID_ENV): a preexec_fn would run Python between fork and
        # exec, where gRPC's fork handlers abort the child when this process already uses gRPC
        env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env)
        log.close()

    def _wait(self, name: str) -> int:
        """The gRPC port of ``name`` once it serves (raises with its log tail if it died)."""
        port_file = self.dir / f"{name}.port"
        deadline = time.monotonic() + self.start_timeout
        proc = self.procs[name]
        while not port_file.is_file():
            if proc.poll() is not None:
                raise ServiceStartError(f"service {name} exited with code {proc.returncode} while starting:\n"
                                        f"{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise ServiceStartError(f"service {name} did not start within {self.start_timeout:.0f} s:\n"
                                        f"{self.log_tail(name)}")
            time.sleep(0.1)
        info = json.loads(port_file.read_text())
        self.metrics_ports[name] = info["metrics_port"]
        self.ports[name] = info["port"]
        return info["port"]

    def revive(self) -> list[str]:
        """Restart the services that exited (same ports); returns their names. The controller calls this
        before every step, so a crashed worker rejoins at the next step, and when the trainer or drafter
        service stops answering, which it then restores (see Controller._surviving)."""
        dead = [n for n, p in self.procs.items() if p.poll() is not None]
        for name in dead:
            self._spawn(name, *self._args[name])
        for name in dead:
            self._wait(name)
        return dead

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"

    def close(self, grace_s: float = 15.0) -> None:
        """SIGTERM every service (they drain), then SIGKILL what is left after ``grace_s``."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
