"""Command-line plumbing shared by the generators of checked-in files (the CRD, the chart's RBAC rules)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def generator_main(prog: str, description: str, render: Callable[[], str], argv: Sequence[str] | None) -> int:
    """``--out FILE`` writes ``render()``; ``--check`` exits 1 when FILE differs (so CI catches drift)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", default="-", help="file to write (default: stdout)")
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from the generated text")
    args = parser.parse_args(argv)
    text = render()
    if args.out == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            print(f"{out} is out of date: run {prog} --out {out}", file=sys.stderr)
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0
