"""ArtifactStore: versioned, checksummed, atomically published policy and drafter weights over fsspec.

Layout under the root URL (a local path / ``file://`` by default, ``s3://bucket/prefix`` in clusters)::

    <kind>/v00000042/model.safetensors, config.json, ...
    <kind>/v00000042/MANIFEST.json      written last: every file's sha256 and size, metadata
    <kind>/LATEST                       {"version": 42}, only ever moved forward

A version is visible only once its MANIFEST.json exists, so an interrupted publish is invisible (and
removed by :meth:`ArtifactStore.gc`). On a local filesystem a version is first written to a hidden
staging directory and renamed into place; single-object writes (the manifest, LATEST) are atomic on
object stores. Every read is verified against the manifest. Only safetensors and text formats are
accepted: nothing from the store is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from tlt.errors import TLTError

MANIFEST = "MANIFEST.json"
LATEST = "LATEST"
ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".md", ".yaml", ".jsonl")
_KIND = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_VERSION_DIR = re.compile(r"^v(\d{8})$")


class StoreError(TLTError):
    """A store operation failed (unreachable, permission, bad argument)."""


class StoreIntegrityError(StoreError):
    """Stored bytes do not match their manifest."""


class VersionNotFoundError(StoreError):
    """No complete version with that number exists."""


class VersionExistsError(StoreError):
    """A different artifact was already published under that version."""


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass
class Manifest:
    """What a published version holds."""

    kind: str
    version: int
    files: dict[str, FileEntry]
    metadata: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        files = {name: FileEntry(**entry) for name, entry in raw["files"].items()}
        return cls(raw["kind"], int(raw["version"]), files, raw.get("metadata", {}), raw.get("created", 0.0))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_kind(kind: str) -> None:
    if not isinstance(kind, str) or not _KIND.match(kind):
        raise StoreError(f"artifact kind {kind!r} is invalid: use lowercase letters, digits, '-' or '_' "
                         "(e.g. 'policy')")


def _check_version(version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version < 10**8:
        raise StoreError(f"version must be an integer in [0, 10^8), got {version!r}")


def _check_name(name: str) -> None:
    parts = Path(name).parts
    if not name or name.startswith(("/", "\\")) or ".." in parts or name in (MANIFEST, LATEST):
        raise StoreError(f"file name {name!r} is invalid: give a relative path without '..'")
    if not name.endswith(ALLOWED_SUFFIXES):
        raise StoreError(f"file {name!r} refused: the store takes {', '.join(ALLOWED_SUFFIXES)} only "
                         "(safetensors only for weights, no pickle)")


class ArtifactStore:
    """A versioned artifact store rooted at ``uri`` (``storage_options`` go to fsspec, e.g. S3 endpoint)."""

    def __init__(self, uri: str | Path, storage_options: dict | None = None) -> None:
        self.uri = str(uri)
        self.fs, root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self._latest_lock = threading.Lock()
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    # ---- paths --------------------------------------------------------------------------------

    def _kind_dir(self, kind: str) -> str:
        _check_kind(kind)
        return f"{self.root}/{kind}"

    def _version_dir(self, kind: str, version: int) -> str:
        _check_version(version)
        return f"{self._kind_dir(kind)}/v{version:08d}"

    # ---- publish ------------------------------------------------------------------------------

    def publish(self, kind: str, version: int, files: Mapping[str, bytes | Path | str],
                metadata: dict | None = None) -> Manifest:
        """Publish ``files`` (name -> bytes or a local path) as ``kind`` version ``version``."""
        target = self._version_dir(kind, version)
        if not files:
            raise StoreError(f"publish {kind} v{version}: no files given")
        payload: dict[str, bytes] = {}
        for name, value in files.items():
            _check_name(name)
            payload[name] = value if isinstance(value, bytes) else Path(value).read_bytes()
        manifest = Manifest(kind, version, {n: FileEntry(_sha256(b), len(b)) for n, b in payload.items()},
                            dict(metadata or {}), time.time())
        existing = self._read_manifest(kind, version)
        if existing is not None:
            if existing.files == manifest.files:
                return existing  # an idempotent retry
            raise VersionExistsError(f"{kind} v{version} is already published with different content; "
                                     "publish under a new version")
        try:
            if self.local:
                self._publish_local(kind, target, payload, manifest)
            else:
                for name, data in payload.items():
                    self.fs.pipe_file(f"{target}/{name}", data)
                self.fs.pipe_file(f"{target}/{MANIFEST}", manifest.to_json().encode())
            self._advance_latest(kind, version)
        except OSError as exc:
            raise StoreError(f"publish {kind} v{version} to {self.uri} failed: {exc}") from exc
        return manifest

    def _publish_local(self, kind: str, target: str, payload: dict[str, bytes], manifest: Manifest) -> None:
        staging = Path(self._kind_dir(kind)) / f".staging-{uuid.uuid4().hex}"
        try:
            for name, data in payload.items():
                path = staging / name
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            (staging / MANIFEST).write_text(manifest.to_json())
            if Path(target).exists():  # an incomplete leftover of a crashed publish
                shutil.rmtree(target)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _advance_latest(self, kind: str, version: int) -> None:
        with self._latest_lock:
            current = self._read_latest_pointer(kind)
            if current is not None and current >= version:
                return
            data = json.dumps({"version": version}).encode()
            path = f"{self._kind_dir(kind)}/{LATEST}"
            if self.local:
                tmp = f"{path}.tmp-{uuid.uuid4().hex}"
                Path(tmp).write_bytes(data)
                os.replace(tmp, path)
            else:
                self.fs.pipe_file(path, data)

    # ---- read ---------------------------------------------------------------------------------

    def _read_latest_pointer(self, kind: str) -> int | None:
        try:
            return int(json.loads(self.fs.cat_file(f"{self._kind_dir(kind)}/{LATEST}"))["version"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return None  # a damaged pointer: fall back to scanning

    def _read_manifest(self, kind: str, version: int) -> Manifest | None:
        try:
            return Manifest.from_json(self.fs.cat_file(f"{self._version_dir(kind, version)}/{MANIFEST}").decode())
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreIntegrityError(f"{kind} v{version}: MANIFEST.json is unreadable ({exc})") from None

    def versions(self, kind: str) -> list[int]:
        """Complete versions of ``kind``, ascending."""
        try:
            entries = self.fs.ls(self._kind_dir(kind), detail=False)
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            match = _VERSION_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if match and self.fs.exists(f"{entry.rstrip('/')}/{MANIFEST}"):
                found.append(int(match.group(1)))
        return sorted(found)

    def manifest(self, kind: str, version: int) -> Manifest:
        manifest = self._read_manifest(kind, version)
        if manifest is None:
            raise VersionNotFoundError(f"{kind} v{version} is not in {self.uri} (published: {self.versions(kind)})")
        return manifest

    def latest(self, kind: str) -> Manifest | None:
        """The newest complete version (LATEST, or a scan when LATEST is missing or points nowhere)."""
        pointer = self._read_latest_pointer(kind)
        if pointer is not None:
            manifest = self._read_manifest(kind, pointer)
            if manifest is not None:
                return manifest
        versions = self.versions(kind)
        return self._read_manifest(kind, versions[-1]) if versions else None

    def read_bytes(self, kind: str, version: int, name: str) -> bytes:
        """One file's bytes, verified against the manifest."""
        entry = self.manifest(kind, version).files.get(name)
        if entry is None:
            raise StoreError(f"{kind} v{version} has no file {name!r}")
        try:
            data = self.fs.cat_file(f"{self._version_dir(kind, version)}/{name}")
        except FileNotFoundError:
            raise StoreIntegrityError(f"{kind} v{version}/{name} is listed in the manifest but missing") from None
        digest = _sha256(data)
        if len(data) != entry.size or digest != entry.sha256:
            raise StoreIntegrityError(f"{kind} v{version}/{name}: sha256 {digest} ({len(data)} bytes) does not match "
                                      f"the manifest's {entry.sha256} ({entry.size} bytes); refusing to load it")
        return data

    def load_tensors(self, kind: str, version: int, name: str = "model.safetensors") -> dict:
        """Verified safetensors file as a dict of torch tensors."""
        from safetensors.torch import load

        return load(self.read_bytes(kind, version, name))

    def fetch(self, kind: str, version: int, dest: str | Path) -> Path:
        """Download a version into ``dest`` (verified; atomic: nothing is left at ``dest`` on failure)."""
        dest = Path(dest)
        manifest = self.manifest(kind, version)
        if (dest / MANIFEST).is_file() and Manifest.from_json((dest / MANIFEST).read_text()).files == manifest.files:
            return dest
        staging = dest.parent / f".{dest.name}.fetch-{uuid.uuid4().hex}"
        try:
            for name in manifest.files:
                path = staging / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(self.read_bytes(kind, version, name))
            (staging / MANIFEST).write_text(manifest.to_json())
            if dest.exists():
                shutil.rmtree(dest)
            os.rename(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dest

    # ---- retention ----------------------------------------------------------------------------

    def gc(self, kind: str, keep: int, stale_after_s: float = 3600.0) -> list[int]:
        """Delete all but the newest ``keep`` complete versions (never LATEST's) and stale partial writes."""
        if keep < 1:
            raise StoreError(f"gc keep must be >= 1, got {keep}")
        versions = self.versions(kind)
        pinned = self._read_latest_pointer(kind)
        doomed = [v for v in versions[:-keep] if v != pinned]
        for version in doomed:
            self.fs.rm(self._version_dir(kind, version), recursive=True)
        self._remove_stale(kind, set(versions), stale_after_s)
        return doomed

    def _remove_stale(self, kind: str, complete: set[int], stale_after_s: float) -> None:
        try:
            entries = self.fs.ls(self._kind_dir(kind), detail=True)
        except FileNotFoundError:
            return
        now = time.time()
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            match = _VERSION_DIR.match(name)
            partial = name.startswith(".staging-") or (match and int(match.group(1)) not in complete)
            if not partial or entry.get("type") != "directory":
                continue
            mtime = entry.get("mtime") or entry.get("created") or 0
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            if now - float(mtime or 0) >= stale_after_s:
                self.fs.rm(entry["name"], recursive=True)
