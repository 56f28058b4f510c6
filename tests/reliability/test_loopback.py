"""`tlt serve` without ``--host`` listens on loopback only: its gRPC and metrics ports are bound to 127.0.0.1,
read from the kernel's socket tables (/proc/PID/net/tcp, tcp6) for the sockets the process holds."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest
import yaml

from tests.reliability.service_process import spawn_service
from tlt.config import apply_overrides, job_spec_from_dict

pytestmark = pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
LISTEN = "0A"


def _address(hex_address: str) -> tuple[str, int]:
    """``0100007F:1F90`` (a /proc/net/tcp[6] local address: host byte order words, hex port) -> (ip, port); an
    IPv4-mapped IPv6 address (gRPC binds 127.0.0.1 on an IPv6 socket as ::ffff:127.0.0.1) as its IPv4 one."""
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is little-endian
    ip = ipaddress.ip_address(words)
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip), int(port, 16)


def listening(pid: int) -> set[tuple[str, int]]:
    """The (address, port) of every TCP socket that process ``pid`` listens on, IPv4 and IPv6."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.is_file():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in inodes:
                found.add(_address(fields[1]))
    return found


def test_address_parsing():
    assert _address("0100007F:1F90") == ("127.0.0.1", 8080)
    assert _address("00000000:0050") == ("0.0.0.0", 80)
    assert _address("00000000000000000000000001000000:C350") == ("::1", 50000)
    assert _address("00000000000000000000000000000000:0016") == ("::", 22)
    assert _address("0000000000000000FFFF00000100007F:8B39") == ("127.0.0.1", 35641)


def test_serve_listens_on_loopback_only_by_default(tmp_path, demo_model_dir):
    spec = job_spec_from_dict(apply_overrides({}, {"output_dir": str(tmp_path), "rollout.speculative.mode": "off"}))
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(spec.to_dict()))
    service = spawn_service("rollout", config, tmp_path / "services")  # no --host
    try:
        service.wait_serving()
        bound = listening(service.proc.pid)
    finally:
        service.stop()
    assert bound == {("127.0.0.1", service.port), ("127.0.0.1", service.metrics_port)}, bound
