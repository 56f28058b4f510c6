"""What a published version holds (its MANIFEST.json): files with sizes and checksums, metadata."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tlt.store.errors import StoreError, UnknownDigestError

MANIFEST = "MANIFEST.json"
DIGESTS = ("xxh3_128", "sha256")  # checksum algorithms of manifest entries; the first is the default
DEFAULT_DIGEST = DIGESTS[0]
_HEX_DIGITS = {"xxh3_128": 32, "sha256": 64}
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class FileEntry:
    """One file of a version: its checksum (``digest``, hex, by ``algorithm``: one of :data:`DIGESTS`) and size."""

    algorithm: str
    digest: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        raw: dict[str, Any] = {"algorithm": self.algorithm, "digest": self.digest, "size": self.size}
        if self.algorithm == "sha256":
            raw["sha256"] = self.digest  # what tlt read before entries named their algorithm
        return raw

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> FileEntry:
        """Parse :meth:`to_dict` output, or a legacy ``{"sha256": ..., "size": ...}`` entry.

        Raises :class:`UnknownDigestError` for an algorithm not in :data:`DIGESTS`, ``ValueError`` /
        ``KeyError`` / ``TypeError`` if malformed.
        """
        if "algorithm" in raw:
            algorithm, digest = raw["algorithm"], raw["digest"]
            if "sha256" in raw and (algorithm, digest) != ("sha256", raw["sha256"]):
                raise ValueError(f"entry {dict(raw)!r} has a sha256 that contradicts its digest")
        else:  # written before entries named their algorithm: sha256
            algorithm, digest = "sha256", raw["sha256"]
        if not isinstance(algorithm, str) or not isinstance(digest, str):
            raise TypeError(f"entry {dict(raw)!r}: algorithm and digest must be strings")
        if algorithm not in DIGESTS:
            raise UnknownDigestError(f"digest algorithm {algorithm!r} is unknown to this tlt (it knows "
                                     f"{', '.join(DIGESTS)}); a newer tlt wrote it: upgrade tlt to read this version")
        if len(digest) != _HEX_DIGITS[algorithm] or not _HEX.fullmatch(digest):
            raise ValueError(f"{algorithm} digest {digest!r} is not {_HEX_DIGITS[algorithm]} lowercase hex digits")
        size = raw["size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size {size!r} is not a byte count")
        return cls(algorithm, digest, size)


@dataclass
class Manifest:
    """What a published version holds: its files with checksums, free-form metadata, creation time."""

    kind: str
    version: int
    files: dict[str, FileEntry]
    metadata: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0

    def to_json(self) -> str:
        """Serialize (raises ``TypeError`` if metadata is not JSON-serializable)."""
        return json.dumps({"kind": self.kind, "version": self.version, "metadata": self.metadata,
                           "created": self.created, "files": {n: e.to_dict() for n, e in self.files.items()}},
                          indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse :meth:`to_json` output, also of older tlt (entries with only ``sha256``). Raises
        :class:`UnknownDigestError` for an unknown algorithm, ``ValueError``/``KeyError``/``TypeError`` if malformed."""
        raw = json.loads(text)
        files = {str(name): FileEntry.from_dict(e) for name, e in raw["files"].items()}
        return cls(str(raw["kind"]), int(raw["version"]), files, dict(raw.get("metadata") or {}),
                   float(raw.get("created", 0.0)))


def check_digest(digest: str) -> str:
    """``digest`` if it names a known checksum algorithm (a store option), else a StoreError saying which are."""
    if digest not in DIGESTS:
        raise StoreError(f"store option digest={digest!r} is not supported: choose one of "
                         f"{', '.join(repr(d) for d in DIGESTS)} ('xxh3_128', the default, is a fast integrity "
                         "checksum; 'sha256' a cryptographic one, 10-30x slower to hash)")
    return digest
