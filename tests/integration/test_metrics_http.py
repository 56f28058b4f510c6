"""MetricsServer: /metrics, /healthz, /readyz over real HTTP, and a real Prometheus server scraping it."""

from __future__ import annotations

import errno
import gzip
import http.client
import socket
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tlt.errors import TLTError
from tlt.serving.http import MetricsServer, PortInUseError

# Until tests/conftest.py registers it for the whole suite; harmless (a no-op) once it does.
pytest_plugins = ["tests.integration.prometheus_fixtures"]


def get(server: MetricsServer, path: str, headers: dict[str, str] | None = None, method: str = "GET"):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.counter = Counter("tlt_test", "Test counter.", ["kind"], registry=self.registry)
        self.gauge = Gauge("tlt_test_queue_depth", "Test gauge.", registry=self.registry)
        self.hist = Histogram("tlt_test_latency_seconds", "Test histogram.", buckets=(0.1, 1.0),
                              registry=self.registry)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def server(metrics: Metrics) -> Iterator[MetricsServer]:
    with MetricsServer(registry=metrics.registry) as srv:
        yield srv


def test_binds_loopback_on_a_free_port(server: MetricsServer):
    assert server.host == "127.0.0.1"
    assert server._server.server_address[0] == "127.0.0.1"
    assert server.port > 0 and server.requested_port == 0
    assert server.url == f"http://127.0.0.1:{server.port}"
    assert server.running


def test_metrics_text_format(server: MetricsServer, metrics: Metrics):
    metrics.counter.labels(kind="a").inc(3)
    metrics.gauge.set(5)
    metrics.hist.observe(0.5)
    status, headers, body = get(server, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert 'tlt_test_total{kind="a"} 3.0' in text
    assert "tlt_test_queue_depth 5.0" in text
    assert 'tlt_test_latency_seconds_bucket{le="0.1"} 0.0' in text
    assert 'tlt_test_latency_seconds_bucket{le="1.0"} 1.0' in text
    assert "tlt_test_latency_seconds_count 1.0" in text
    assert "python_gc" not in text  # only the registry we were given

    status, headers, _ = get(server, "/metrics", method="HEAD")
    assert status == 200 and int(headers["content-length"]) == len(body)


def test_metrics_openmetrics_gzip_and_name_filter(server: MetricsServer, metrics: Metrics):
    metrics.counter.labels(kind="b").inc()
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    status, headers, body = get(server, "/metrics", {"Accept": accept})
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n")
    assert 'tlt_test_total{kind="b"} 1.0' in text

    status, headers, body = get(server, "/metrics", {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert 'tlt_test_total{kind="b"} 1.0' in gzip.decompress(body).decode()

    status, _, body = get(server, "/metrics?name[]=tlt_test_queue_depth")
    assert status == 200
    assert "tlt_test_queue_depth" in body.decode() and "tlt_test_total" not in body.decode()


def test_healthz_and_readyz():
    state = {"live": True, "ready": False}
    with MetricsServer(registry=CollectorRegistry(), live=lambda: state["live"],
                       ready=lambda: state["ready"]) as srv:
        assert get(srv, "/healthz")[::2] == (200, b"ok\n")
        status, headers, body = get(srv, "/readyz")
        assert status == 503 and body.decode().count("\n") == 1 and body.startswith(b"not ready")
        assert headers["content-type"].startswith("text/plain")
        state["ready"] = True
        assert get(srv, "/readyz")[::2] == (200, b"ready\n")
        state["live"] = False
        assert get(srv, "/healthz")[0] == 503
        assert get(srv, "/readyz?verbose=1")[0] == 200  # query strings are ignored


def test_readyz_reason_tuple_and_failing_check():
    reason = {"value": (False, "model not loaded\nstill downloading")}

    def ready():
        value = reason["value"]
        if isinstance(value, Exception):
            raise value
        return value

    with MetricsServer(registry=CollectorRegistry(), ready=ready) as srv:
        assert get(srv, "/readyz")[::2] == (503, b"not ready: model not loaded still downloading\n")
        reason["value"] = (True, "warm")
        assert get(srv, "/readyz")[::2] == (200, b"ready\n")
        reason["value"] = RuntimeError("store unreachable")
        status, _, body = get(srv, "/readyz")
        assert status == 503 and b"RuntimeError: store unreachable" in body and body.count(b"\n") == 1
        assert get(srv, "/healthz")[0] == 200  # a failing readiness check does not take down the server


def test_unknown_paths_404(server: MetricsServer):
    for path in ("/", "/metric", "/healthz/x", "/favicon.ico"):
        assert get(server, path)[0] == 404, path
    assert get(server, "/nope", method="HEAD")[0] == 404


def test_quiet_logging(server: MetricsServer, capfd):
    for path in ("/metrics", "/healthz", "/readyz", "/missing"):
        get(server, path)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_port_in_use_is_a_clear_error(server: MetricsServer):
    with pytest.raises(PortInUseError, match=rf"port {server.port} is in use; pass --metrics-port") as info:
        MetricsServer(port=server.port).start()
    assert isinstance(info.value, TLTError) and isinstance(info.value, OSError)
    assert info.value.errno == errno.EADDRINUSE

    with socket.socket() as sock:  # any other process holding the port
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        with pytest.raises(PortInUseError, match="pass --metrics-port"):
            MetricsServer(port=sock.getsockname()[1]).start()


def test_stop_releases_the_port():
    srv = MetricsServer(registry=CollectorRegistry()).start()
    port = srv.port
    srv.stop()
    assert not srv.running
    srv.stop()  # idempotent
    with MetricsServer(port=port, registry=CollectorRegistry()) as again:
        assert again.port == port and get(again, "/healthz")[0] == 200


def test_prometheus_scrapes_the_server(server: MetricsServer, metrics: Metrics, prometheus_factory):
    metrics.counter.labels(kind="rollout").inc(7)
    metrics.gauge.set(3)
    for value in (0.05, 0.5, 0.7):
        metrics.hist.observe(value)

    prom = prometheus_factory({"tlt-test": [f"127.0.0.1:{server.port}"]})
    result = prom.wait_for("tlt_test_total == 7", timeout=30)
    assert len(result) == 1
    labels = result[0]["metric"]
    assert labels["kind"] == "rollout"
    assert labels["job"] == "tlt-test" and labels["instance"] == f"127.0.0.1:{server.port}"
    assert float(result[0]["value"][1]) == 7

    [target] = prom.targets()
    assert target["health"] == "up" and target["lastError"] == ""
    assert prom.query('up{job="tlt-test"}')[0]["value"][1] == "1"
    assert prom.query("tlt_test_queue_depth")[0]["value"][1] == "3"
    assert prom.query('tlt_test_latency_seconds_bucket{le="1.0"}')[0]["value"][1] == "3"
    assert prom.query('tlt_test_latency_seconds_bucket{le="0.1"}')[0]["value"][1] == "1"

    metrics.counter.labels(kind="rollout").inc(2)  # later scrapes pick up changes
    prom.wait_for('tlt_test_total{kind="rollout"} == 9', timeout=10)
