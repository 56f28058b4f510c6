"""A small HTTP server for Prometheus metrics and Kubernetes liveness/readiness probes.

Every TLT process (rollout, drafter, trainer, controller) runs one of these next to its gRPC server::

    server = MetricsServer(port=args.metrics_port, ready=lambda: (model is not None, "model not loaded")).start()
    ...
    server.stop()

Routes (GET and HEAD):

* ``/metrics`` – the registry in the Prometheus text format, or OpenMetrics when the ``Accept`` header asks
  for it; gzip when ``Accept-Encoding`` allows it; ``?name[]=a&name[]=b`` restricts the output to those series.
* ``/healthz`` – 200 ``ok`` while ``live()`` is true, else 503.
* ``/readyz`` – 200 ``ready`` while ``ready()`` is true, else 503 with a one-line reason. ``ready()`` may return a
  bool or a ``(bool, reason)`` pair.
* anything else – 404.

The server binds to loopback unless told otherwise: metrics can leak job details, so exposing them on all
interfaces (``host="0.0.0.0"``, as a Kubernetes pod needs) must be an explicit choice of the caller.
"""

from __future__ import annotations

import errno
import gzip
import logging
import socket
import socketserver
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import prometheus_client
from prometheus_client.exposition import choose_encoder, gzip_accepted

from tlt.errors import PortInUseError, TLTError

log = logging.getLogger(__name__)

__all__ = ["MetricsServer", "PortInUseError"]

ProbeResult = bool | tuple[bool, str]


def _probe(check: Callable[[], Any], what: str) -> tuple[bool, str]:
    """Run a liveness/readiness callback; normalise its result to ``(ok, one-line reason)``."""
    try:
        result = check()
    except Exception as exc:  # a failing check means "not ok", never a 500 or a dead server thread
        # Debug, not warning: probes run every few seconds and the 503 body already carries the reason.
        log.debug("%s check raised", what, exc_info=True)
        return False, f"{what} check raised {type(exc).__name__}: {exc}"
    reason = ""
    if isinstance(result, tuple):
        ok = result[0] if result else False
        reason = result[1] if len(result) > 1 else ""
    else:
        ok = result
    reason = " ".join(str(reason or "").split())  # one line, whatever the callback returned
    return bool(ok), reason


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "tlt-metrics"
    sys_version = ""

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def _dispatch(self, body: bool) -> None:
        url = urlsplit(self.path)
        owner = self.server.owner
        try:
            if url.path == "/metrics":
                self._metrics(owner.registry, parse_qs(url.query), body)
            elif url.path == "/healthz":
                ok, reason = _probe(owner.live, "liveness")
                self._text(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                           "ok" if ok else f"not live: {reason or 'liveness check failed'}", body)
            elif url.path == "/readyz":
                ok, reason = _probe(owner.ready, "readiness")
                self._text(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                           "ready" if ok else f"not ready: {reason or 'readiness check failed'}", body)
            else:
                self._text(HTTPStatus.NOT_FOUND, f"not found: {url.path} (try /metrics, /healthz, /readyz)", body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the scraper/probe went away; nothing to answer
        except Exception as exc:
            log.exception("error serving %s", self.path)
            self._text(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}: {exc}", body)

    def _metrics(self, registry: Any, params: dict[str, list[str]], body: bool) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        if "name[]" in params:
            registry = registry.restricted_registry(params["name[]"])
        output = encoder(registry)
        headers = {"Content-Type": content_type}
        if gzip_accepted(self.headers.get("Accept-Encoding", "")):
            output = gzip.compress(output)
            headers["Content-Encoding"] = "gzip"
        self._send(HTTPStatus.OK, output, headers, body)

    def _text(self, status: HTTPStatus, text: str, body: bool) -> None:
        headers = {"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"}
        self._send(status, (text + "\n").encode(), headers, body)

    def _send(self, status: HTTPStatus, payload: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        # The stdlib writes one stderr line per request; probes and scrapes would flood the logs.
        log.debug("%s - " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: MetricsServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse-DNS lookup that can stall for seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class MetricsServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` from a background thread.

    ``port=0`` picks a free port; read the real one from :attr:`port` after :meth:`start`. ``host`` defaults to
    loopback; pass ``"0.0.0.0"`` (or ``"::"``) deliberately to let other machines (e.g. a Kubernetes kubelet or
    Prometheus) reach it.
    """

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        registry: Any = prometheus_client.REGISTRY,
        ready: Callable[[], ProbeResult] = lambda: True,
        live: Callable[[], ProbeResult] = lambda: True,
    ) -> None:
        if not 0 <= int(port) <= 65535:
            raise TLTError(f"metrics port must be in 0..65535, got {port}; pass --metrics-port")
        self.host = host
        self.requested_port = int(port)
        self.registry = registry
        self.ready = ready
        self.live = live
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the requested one until :meth:`start` has run)."""
        return self._server.server_address[1] if self._server is not None else self.requested_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> MetricsServer:
        if self._server is not None:
            return self
        server_cls = _Server
        if ":" in self.host:  # an IPv6 literal
            server_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        try:
            server = server_cls((self.host, self.requested_port), _Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                err = PortInUseError(
                    f"port {self.requested_port} is in use; pass --metrics-port with a free port "
                    f"(or 0 to pick one) [{self.host}:{self.requested_port}]"
                )
                err.errno = exc.errno  # (strerror stays unset so str(err) is just the message)
                raise err from exc
            raise
        server.owner = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"metrics-http-{self.port}", daemon=True,
        )
        self._thread.start()
        log.info("serving metrics and probes on %s", self.url)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"MetricsServer({self.host}:{self.port}, {state})"
