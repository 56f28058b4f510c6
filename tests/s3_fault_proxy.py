"""A fault-injecting HTTP/1.1 proxy for S3 tests, run as its own process in front of a real S3 server (moto).

Requests are forwarded to the upstream unchanged; rules (first match wins, each for its next ``times``
matching requests) replace the upstream's answer with a fault:

============  ========================================================================================
``error``     answer ``status`` with an S3 XML error ``code`` (e.g. 503 SlowDown); nothing is forwarded
``reset``     read the request, then reset the connection (TCP RST); nothing is forwarded
``drop``      forward the request, then reset the connection: the upstream acted, the answer is lost
``stall``     hold the request ``seconds`` (past the client's read timeout), then close without answering;
              with ``fraction``, forward it and stall after that fraction of the response body instead
``truncate``  forward, then close the connection after ``fraction`` of the response body
``corrupt``   forward, and flip the bits of one response-body byte (at ``fraction`` of its length)
============  ========================================================================================

A rule's ``match`` is a regular expression searched for in ``"METHOD /path?query"``. Control paths (never
forwarded): ``POST /__proxy__/rules`` (a JSON list of rules, appended), ``DELETE /__proxy__/rules``,
``GET /__proxy__/log`` (every request seen: method, target, Range header, status answered, fault applied)
and ``DELETE /__proxy__/log``.

Run: ``python tests/s3_fault_proxy.py --upstream http://127.0.0.1:PORT`` prints ``listening <url>`` once
it accepts connections. Tests use :class:`FaultProxy`, which starts and drives such a process.
Standard library only (asyncio streams); bodies are held in memory, which suits test-sized objects.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

CONTROL = "/__proxy__/"
ACTIONS = ("error", "reset", "drop", "stall", "truncate", "corrupt")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


@dataclass
class Rule:
    """One fault: which requests it hits (``match``, the next ``times`` of them; None = all) and what it does."""

    match: str
    action: str
    times: int | None = 1
    status: int = 503
    code: str = "SlowDown"
    seconds: float = 30.0
    fraction: float | None = None
    pattern: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; choose one of {ACTIONS}")
        self.pattern = re.compile(self.match)


@dataclass
class Message:
    """A parsed HTTP message: start line, headers in order, body (de-chunked: it is sent on with a Content-Length)."""

    start: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)

    def encode(self, body: bytes | None = None, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
        """The message with hop-by-hop headers replaced: ``body`` (default: its own) sent with Content-Length."""
        body = self.body if body is None else body
        lines = [self.start, *(f"{k}: {v}" for k, v in self.headers
                               if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length")]
        lines += [f"{k}: {v}" for k, v in extra]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close the connection with a TCP RST (the client sees "connection reset by peer")."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _read_head(reader: asyncio.StreamReader) -> Message | None:
    """Start line and headers, or None at a clean end of the connection."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise
        return None
    start, *lines = raw[:-4].decode("latin-1").split("\r\n")
    return Message(start, [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines)])


async def _read_body(reader: asyncio.StreamReader, msg: Message, *, response_to: str = "") -> bytes:
    """The body of ``msg`` (decoded if chunked); for a response, ``response_to`` is the request's method."""
    status = int(msg.start.split()[1]) if response_to else 0
    if response_to == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return b""
    if (msg.header("transfer-encoding") or "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
            if not size:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(chunks)
    if (length := msg.header("content-length")) is not None:
        return await reader.readexactly(int(length))
    return await reader.read() if response_to else b""


class Proxy:
    """The proxy server: forwards to ``upstream`` (host, port), applying :class:`Rule`s; keeps a request log."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rules: list[Rule] = []
        self.log: list[dict[str, Any]] = []

    def _take(self, line: str) -> Rule | None:
        for rule in self.rules:
            if (rule.times is None or rule.times > 0) and rule.pattern.search(line):
                if rule.times is not None:
                    rule.times -= 1
                return rule
        return None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client connection (keep-alive: request after request)."""
        try:
            while (request := await _read_head(reader)) is not None:
                if (request.header("expect") or "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                request.body = await _read_body(reader, request)
                method, target = request.start.split()[:2]
                if target.startswith(CONTROL):
                    writer.write(self._control(method, target, request.body))
                    await writer.drain()
                    continue
                entry: dict[str, Any] = {"method": method, "target": target, "range": request.header("range"),
                                         "status": None, "fault": None, "time": time.time()}
                self.log.append(entry)
                if not await self._serve(request, method, f"{method} {target}", entry, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve(self, request: Message, method: str, line: str, entry: dict[str, Any],
                     writer: asyncio.StreamWriter) -> bool:
        """Answer one request (faulty or forwarded); False if the connection must close."""
        rule = self._take(line)
        entry["fault"] = rule.action if rule else None
        if rule is not None and rule.action == "error":
            entry["status"] = rule.status
            body = b"" if method == "HEAD" else (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{rule.code}</Code><Message>injected by '
                f"s3_fault_proxy</Message><RequestId>fault</RequestId></Error>").encode()
            writer.write(Message(f"HTTP/1.1 {rule.status} Injected", [("Content-Type", "application/xml")]).encode(
                body, (("Content-Length", str(len(body))), ("Connection", "keep-alive"))))
            await writer.drain()
            return True
        if rule is not None and rule.action == "reset":
            _reset(writer)
            return False
        if rule is not None and rule.action == "stall" and rule.fraction is None:
            await asyncio.sleep(rule.seconds)
            return False
        response = await self._forward(request, method)
        entry["status"] = int(response.start.split()[1])
        if rule is not None and rule.action == "drop":
            _reset(writer)
            return False
        body = response.body
        cut = None if rule is None else min(len(body), int(len(body) * (rule.fraction or 0.0)))
        if rule is not None and rule.action == "corrupt" and body:
            at = min(cut or 0, len(body) - 1)
            body = body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1:]
        length = response.header("content-length") if method == "HEAD" else str(len(response.body))
        writer.write(response.encode(b"", (("Content-Length", length or "0"), ("Connection", "keep-alive"))))
        if rule is not None and rule.action in ("truncate", "stall"):
            writer.write(body[:cut])
            await writer.drain()
            if rule.action == "stall":
                await asyncio.sleep(rule.seconds)
            return False
        writer.write(body)
        await writer.drain()
        return True

    async def _forward(self, request: Message, method: str) -> Message:
        """Send ``request`` to the upstream on a fresh connection; its whole response."""
        reader, writer = await asyncio.open_connection(*self.upstream)
        try:
            raw_body = request.body
            writer.write(request.encode(raw_body, (("Content-Length", str(len(raw_body))), ("Connection", "close"))))
            await writer.drain()
            while True:
                response = await _read_head(reader)
                if response is None:
                    raise ConnectionError("the upstream closed the connection without answering")
                if not response.start.split()[1].startswith("1"):  # skip interim 100 Continue
                    break
            response.body = await _read_body(reader, response, response_to=method)
            return response
        finally:
            writer.close()

    def _control(self, method: str, target: str, body: bytes) -> bytes:
        what = target[len(CONTROL):]
        if (method, what) == ("POST", "rules"):
            self.rules += [Rule(**raw) for raw in json.loads(body)]
            out: Any = {"rules": len(self.rules)}
        elif (method, what) == ("DELETE", "rules"):
            self.rules.clear()
            out = {"rules": 0}
        elif (method, what) == ("GET", "log"):
            out = self.log
        elif (method, what) == ("DELETE", "log"):
            self.log.clear()
            out = {"log": 0}
        else:
            out = {"error": f"unknown control request {method} {target}"}
        data = json.dumps(out).encode()
        return (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                "Connection: keep-alive\r\n\r\n").encode() + data


async def _run(upstream: str, host: str, port: int) -> None:
    proxy = Proxy(upstream)
    server = await asyncio.start_server(proxy.handle, host, port, limit=1 << 20)
    bound = server.sockets[0].getsockname()
    print(f"listening http://{bound[0]}:{bound[1]}", flush=True)
    async with server:
        await server.serve_forever()


class FaultProxy:
    """A proxy process in front of ``upstream``, driven over its control paths (see the module docstring)."""

    def __init__(self, upstream: str, host: str = "127.0.0.1") -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--upstream", upstream, "--host", host],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"the fault proxy did not start (exit code {self.proc.poll()}, said {line!r})")
        self.endpoint = line.split(" ", 1)[1]

    def _call(self, method: str, what: str, data: Any = None) -> Any:
        body = None if data is None else json.dumps(data).encode()
        request = urllib.request.Request(f"{self.endpoint}{CONTROL}{what}", data=body, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def add(self, match: str, action: str, times: int | None = 1, **options: Any) -> None:
        """Add a rule: the next ``times`` requests matching ``match`` (None: all of them) get ``action``."""
        Rule(match, action, times, **options)  # validate here, where the mistake is
        self._call("POST", "rules", [{"match": match, "action": action, "times": times, **options}])

    def clear(self) -> None:
        """Drop all rules and forget the requests seen so far."""
        self._call("DELETE", "rules")
        self._call("DELETE", "log")

    def requests(self, match: str = "") -> list[dict[str, Any]]:
        """The requests seen (oldest first) whose ``"METHOD target"`` matches ``match``."""
        pattern = re.compile(match)
        return [e for e in self._call("GET", "log") if pattern.search(f"{e['method']} {e['target']}")]

    def stop(self) -> None:
        """End the proxy process."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def main(argv: list[str] | None = None) -> None:
    """Command line: serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--upstream", required=True, help="the S3 server, e.g. http://127.0.0.1:5000")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(args.upstream, args.host, args.port))


if __name__ == "__main__":
    main()
