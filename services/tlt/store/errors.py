"""The store's errors, and the messages of two common ones (a damaged file, a full disk)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from tlt.errors import TLTError

if TYPE_CHECKING:
    from tlt.store.manifest import FileEntry


class StoreError(TLTError):
    """A store operation failed (bad argument, unreachable store, permission)."""


class StoreFullError(StoreError):
    """The disk (or quota) under a local store or fetch destination is full."""


class StoreIntegrityError(StoreError):
    """Stored bytes do not match their manifest."""


class VersionNotFoundError(StoreError):
    """No complete version with that number exists."""


class VersionExistsError(StoreError):
    """Different content was already published under that version."""


class UnknownDigestError(StoreError):
    """A manifest names a digest algorithm this version of tlt does not know (a newer tlt wrote it)."""


def integrity_mismatch(where: str, expected: FileEntry, got: FileEntry) -> StoreIntegrityError:
    """The error for bytes at ``where`` that hashed to ``got`` where the manifest says ``expected``."""
    return StoreIntegrityError(
        f"{where}: {got.algorithm} {got.digest} ({got.size} bytes) does not match the manifest's {expected.digest} "
        f"({expected.size} bytes); the stored copy is damaged: restore the file or publish a new version")


def _human(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover


def disk_full_message(path: Path, need: int | None, fix: str) -> str:
    """Why a write under ``path`` ran out of space, with the numbers."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{_human(shutil.disk_usage(probe).free)} free"
    except OSError:
        free = "free space unknown"
    needed = f"{_human(need)} needed" if need is not None else "size unknown"
    return f"the disk holding {path} is full ({needed}, {free}); {fix}"
