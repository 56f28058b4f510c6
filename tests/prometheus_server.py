"""Run a real Prometheus server (the ``prometheus`` binary) against services on loopback, for tests.

    with PrometheusServer({"rollout": [f"127.0.0.1:{metrics.port}"]}) as prom:
        prom.wait_for_targets()                       # every target scraped and "up"
        prom.wait_for("tlt_requests_total >= 3")      # poll an instant query until it returns a sample
        prom.query('up{job="rollout"}')               # -> [{"metric": {...}, "value": [ts, "1"]}]

The binary comes from ``tests/tools/install_prometheus.sh`` (the Debian package, unpacked into the venv). A
missing binary is an error, not a skip: a test that silently skips in CI can never fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.processes import free_port

INSTALL_HINT = "run tests/tools/install_prometheus.sh (with the venv active) to install it"

__all__ = ["PrometheusError", "PrometheusNotInstalledError", "PrometheusServer", "find_prometheus"]


class PrometheusError(RuntimeError):
    """The Prometheus server failed to start, or a query failed."""


class PrometheusNotInstalledError(PrometheusError, FileNotFoundError):
    """No ``prometheus`` binary was found."""


def find_prometheus() -> str:
    """Path of the ``prometheus`` binary: ``$PROMETHEUS_BIN``, else ``PATH``, else next to this Python (the venv)."""
    explicit = os.environ.get("PROMETHEUS_BIN")
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise PrometheusNotInstalledError(f"PROMETHEUS_BIN={explicit} is not an executable file; {INSTALL_HINT}")
        return explicit
    found = shutil.which("prometheus")
    if found:
        return found
    beside_python = Path(sys.executable).parent / "prometheus"  # venv/bin, even when the venv is not activated
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    raise PrometheusNotInstalledError(
        f"the Prometheus server binary `prometheus` is not on PATH nor in {beside_python.parent}; {INSTALL_HINT}"
    )


class PrometheusServer:
    """A ``prometheus`` subprocess scraping ``targets`` (``{"job_name": ["127.0.0.1:port", ...]}``) every second.

    Storage, config and log live in a temporary directory that :meth:`stop` removes. It listens on a free
    loopback port only (the Debian binary's own default is ``0.0.0.0:9090``).
    """

    def __init__(
        self,
        targets: Mapping[str, Sequence[str] | str],
        *,
        scrape_interval: str = "1s",
        binary: str | None = None,
        startup_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
        labels: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        """``labels``: static labels per job name, added to its series as Kubernetes relabelling would add
        ``namespace`` and ``pod``."""
        self.jobs = {job: [addrs] if isinstance(addrs, str) else list(addrs) for job, addrs in targets.items()}
        self.labels = {job: dict(v) for job, v in (labels or {}).items()}
        self.scrape_interval = scrape_interval
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.port: int | None = None
        self.workdir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        if self.port is None:
            raise PrometheusError("Prometheus is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path | None:
        return self.workdir / "prometheus.log" if self.workdir else None

    def config(self) -> dict[str, Any]:
        """The generated ``prometheus.yml`` (as a dict; written as JSON, which YAML parsers accept)."""
        return {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,  # the 10 s default would exceed a 1 s interval
                "evaluation_interval": self.scrape_interval,
            },
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": addrs, "labels": self.labels.get(job, {})}]}
                for job, addrs in self.jobs.items()
            ],
        }

    def start(self) -> PrometheusServer:
        if self.proc is not None:
            return self
        binary = self.binary or find_prometheus()
        self.workdir = Path(tempfile.mkdtemp(prefix="tlt-prometheus-"))
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(json.dumps(self.config(), indent=2) + "\n")
        env = dict(os.environ)
        env.setdefault("GOMAXPROCS", "2")  # shared 2-core CI machines
        last_error: Exception | None = None
        for _attempt in range(3):  # the free port can be taken between probing it and Prometheus binding it
            self.port = free_port()
            cmd = [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                # The Debian build defaults these to /etc/prometheus/*, which an unpacked install does not have.
                f"--web.console.templates={self.workdir / 'consoles'}",
                f"--web.console.libraries={self.workdir / 'console_libraries'}",
                "--log.level=info",
                *self.extra_args,
            ]
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                cwd=self.workdir,
            )
            try:
                self._wait_ready()
                return self
            except PrometheusError as exc:
                last_error = exc
                self._terminate()
                if "address already in use" not in self.log_tail().lower():
                    break
        self.stop()
        raise last_error or PrometheusError("Prometheus failed to start")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError(
                    f"prometheus exited with code {self.proc.returncode} during startup; log:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise PrometheusError(f"prometheus not ready after {self.startup_timeout:.0f} s; log:\n{self.log_tail()}")

    def _terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self) -> None:
        """Terminate Prometheus (SIGTERM, then SIGKILL after 10 s) and delete its temporary directory."""
        self._terminate()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of Prometheus's own log (for failure messages)."""
        path = self.log_path
        if path is None or not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # ---------------------------------------------------------------- HTTP API

    def _api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                payload = json.load(resp)
        except urllib.error.HTTPError as exc:  # 400/422 carry a JSON body with the reason
            try:
                payload = json.load(exc)
            except ValueError:
                raise PrometheusError(f"GET {url}: HTTP {exc.code}") from exc
        if payload.get("status") != "success":
            raise PrometheusError(f"GET {url}: {payload.get('errorType')}: {payload.get('error')}")
        return payload["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query: the result vector, e.g. ``[{"metric": {"__name__": ..., "job": ...}, "value": [ts, "7"]}]``.

        A scalar or string result comes back as one item with an empty ``metric``.
        """
        data = self._api("/api/v1/query", {"query": expr})
        if data["resultType"] in ("vector", "matrix"):
            return data["result"]
        return [{"metric": {}, "value": data["result"]}]

    def wait_for(self, expr: str, timeout: float = 30.0, interval: float = 0.25) -> list[dict[str, Any]]:
        """Poll ``query(expr)`` until it returns a non-empty result; return it. Raises ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Prometheus query {expr!r} still empty after {timeout:.0f} s; targets:\n{self._targets_summary()}"
                )
            time.sleep(interval)

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets (``/api/v1/targets``): dicts with ``labels``, ``health``, ``lastError``..."""
        return self._api("/api/v1/targets")["activeTargets"]

    def wait_for_targets(self, timeout: float = 30.0, health: str = "up") -> list[dict[str, Any]]:
        """Wait until every configured target has been scraped with the given health ("up" or "down")."""
        expected = sum(len(addrs) for addrs in self.jobs.values())
        deadline = time.monotonic() + timeout
        while True:
            active = self.targets()
            if len(active) >= expected and all(t["health"] == health for t in active):
                return active
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Prometheus targets not all {health!r} after {timeout:.0f} s:\n{self._targets_summary()}"
                )
            time.sleep(0.25)

    def _targets_summary(self) -> str:
        with contextlib.suppress(Exception):
            return "\n".join(
                f"  {t['labels'].get('job')} {t['scrapeUrl']}: {t['health']} {t.get('lastError') or ''}".rstrip()
                for t in self.targets()
            ) or "  (none)"
        return "  (could not list targets)"
