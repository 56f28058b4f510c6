"""Filesystem helpers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

COMPLETE_MARKER = ".complete"


def build_once(out: str | Path, build: Callable[[Path], object]) -> Path:
    """Build a directory once: ``build(tmp)`` fills a sibling temp dir, which is renamed into place.

    A finished build carries ``.complete``; an interrupted one never looks finished and is redone.
    """
    out = Path(out)
    if (out / COMPLETE_MARKER).exists():
        return out
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / COMPLETE_MARKER).write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
