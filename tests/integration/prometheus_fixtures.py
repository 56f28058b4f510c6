"""Pytest fixtures for tests that scrape services with a real Prometheus server.

Register once, e.g. in tests/conftest.py::

    pytest_plugins = ["tests.integration.prometheus_fixtures"]

Usage::

    def test_rollout_metrics(prometheus_factory):
        prom = prometheus_factory({"rollout": [f"127.0.0.1:{metrics.port}"]})
        prom.wait_for('tlt_rollout_requests_total >= 1')
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest

from tests.prometheus_server import PrometheusServer


@pytest.fixture
def prometheus_factory() -> Iterator[Callable[..., PrometheusServer]]:
    """Start ``PrometheusServer(targets, **kwargs)`` (already ready); every one is stopped after the test.

    A missing ``prometheus`` binary fails the test with a pointer to tests/tools/install_prometheus.sh.
    """
    started: list[PrometheusServer] = []

    def start(targets: Mapping[str, Sequence[str] | str], **kwargs: Any) -> PrometheusServer:
        server = PrometheusServer(targets, **kwargs)
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in reversed(started):
            if server.proc is not None and server.proc.poll() is not None:  # died mid-test: show why
                print(f"prometheus exited with code {server.proc.returncode}; log:\n{server.log_tail()}")
            server.stop()
