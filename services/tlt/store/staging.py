"""Staging entry names, which record their writer process, so a store on the same machine can tell
whether the publish that left one is still under way."""

from __future__ import annotations

import functools
import os
import re
import uuid
from pathlib import Path

import xxhash

STAGING_PREFIX = ".staging-"
# a staging name's writer: machine and PID namespace (hashed), PID, process start time (clock ticks since boot)
_STAGING_WRITER = re.compile(rf"^{re.escape(STAGING_PREFIX)}[0-9a-f]{{32}}-([0-9a-f]{{16}})-(\d+)-(\d+)(?:-|$)")


@functools.cache
def _boot_id() -> str | None:
    """This boot of this machine (Linux); None where unknown."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _host_id() -> str | None:
    """Who can check a PID of ours: this boot of this machine and this PID namespace (containers on one
    machine share the boot id but not PIDs), hashed; None where that cannot be told (no /proc)."""
    boot = _boot_id()
    if boot is None:
        return None
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return xxhash.xxh3_64_hexdigest(f"{boot}/{namespace}".encode())


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot); None if there is none or it has exited."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name before ")" may hold spaces
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):  # exited, not yet reaped: it writes nothing any more
        return None
    return int(fields[19])


def staging_name(suffix: str = "") -> str:
    """A fresh staging entry name; it names this process as its writer where it can (see :func:`writer_alive`)."""
    name = f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    host, pid = _host_id(), os.getpid()
    start = _start_time(pid) if host is not None else None
    if start is not None:
        name += f"-{host}-{pid}-{start}"
    return name + (f"-{suffix}" if suffix else "")


def writer_alive(name: str) -> bool | None:
    """Whether the process that made staging entry ``name`` still runs (a reused PID has another start time);
    None where that cannot be told from here: entries of other machines or PID namespaces, or without a writer."""
    match = _STAGING_WRITER.match(name)
    if match is None or match.group(1) != _host_id():
        return None
    return _start_time(int(match.group(2))) == int(match.group(3))
