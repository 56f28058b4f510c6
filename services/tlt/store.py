"""ArtifactStore: versioned, checksummed, atomically published policy and drafter weights over fsspec.

Layout under the root URL (a local path or ``file://`` by default, ``s3://bucket/prefix`` in clusters)::

    <kind>/v00000042/model.safetensors, config.json, ...
    <kind>/v00000042/MANIFEST.json      written last: every file's sha256 and size, metadata, created
    <kind>/LATEST                       {"version": 42}, only ever moved forward
    <kind>/.staging-<uuid>[/]           in-flight writes (local filesystems), never visible as a version

Atomicity. A version is visible only once its MANIFEST.json exists, so an interrupted publish is
invisible (and removed by :meth:`ArtifactStore.gc` once stale). On a local filesystem a version is
written to a hidden staging directory and renamed into place, and LATEST is replaced via a temp file
and ``os.replace``; the commit (existence check, rename, LATEST update) holds an ``flock`` on
``<kind>/.lock``, so concurrent publishers, threads or processes, always leave LATEST at the highest
version. On object stores files are written first and the manifest last (single-object PUTs are
atomic); there LATEST is guarded only within one process, so give each kind a single publisher.

Every read is verified against the manifest (size and sha256). Only safetensors and text formats are
accepted: nothing from the store is ever unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tlt.errors import TLTError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: thread-level locking only
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import torch

MANIFEST = "MANIFEST.json"
LATEST = "LATEST"
LOCK = ".lock"
STAGING_PREFIX = ".staging-"
ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".md", ".yaml", ".jsonl")
MAX_VERSION = 10**8 - 1
_KIND = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_VERSION_DIR = re.compile(r"^v(\d{8})$")
_CHUNK = 8 << 20
_MAX_SAFETENSORS_HEADER = 100 << 20


class StoreError(TLTError):
    """A store operation failed (bad argument, unreachable store, permission)."""


class StoreIntegrityError(StoreError):
    """Stored bytes do not match their manifest."""


class VersionNotFoundError(StoreError):
    """No complete version with that number exists."""


class VersionExistsError(StoreError):
    """Different content was already published under that version."""


@dataclass(frozen=True)
class FileEntry:
    """Size and sha256 (hex) of one file of a version."""

    sha256: str
    size: int


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
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse :meth:`to_json` output (raises ``ValueError``/``KeyError``/``TypeError`` if malformed)."""
        raw = json.loads(text)
        files = {str(name): FileEntry(str(e["sha256"]), int(e["size"])) for name, e in raw["files"].items()}
        return cls(str(raw["kind"]), int(raw["version"]), files, dict(raw.get("metadata") or {}),
                   float(raw.get("created", 0.0)))


# ---- validation and hashing helpers ----------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if not isinstance(kind, str) or not _KIND.match(kind):
        raise StoreError(f"artifact kind {kind!r} is invalid: use a short lowercase name matching "
                         "[a-z][a-z0-9_-]* (e.g. 'policy', 'drafter')")


def _check_version(version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_VERSION:
        raise StoreError(f"version must be an integer in [0, {MAX_VERSION}], got {version!r}")


def _check_name(label: str, name: str) -> None:
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or "\\" in name or any(p in ("", ".", "..") for p in parts) or name == MANIFEST:
        raise StoreError(f"publish {label}: file name {name!r} is invalid; give a relative path like "
                         f"'model.safetensors' or 'tokenizer/vocab.json' (no '..', no leading '/', not {MANIFEST})")
    if not name.lower().endswith(ALLOWED_SUFFIXES):
        raise StoreError(f"publish {label}: file {name!r} refused; the store takes {', '.join(ALLOWED_SUFFIXES)} "
                         "files only (safetensors only, no pickle): save weights with safetensors.torch.save_file")


def _open_source(label: str, name: str, value: bytes | Path) -> BinaryIO:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return io.BytesIO(value)
    if not isinstance(value, os.PathLike):
        raise StoreError(f"publish {label}: {name!r} must be bytes or a pathlib.Path, got {type(value).__name__} "
                         "(encode text with .encode())")
    try:
        return open(value, "rb")  # returned into the caller's with-block
    except OSError as exc:
        raise StoreError(f"publish {label}: cannot read the source of {name!r}: {exc}") from None


def _copy(src: BinaryIO, dst: BinaryIO | None = None) -> FileEntry:
    """Stream ``src`` (into ``dst`` if given) and return its size and sha256."""
    digest, size = hashlib.sha256(), 0
    while chunk := src.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if dst is not None:
            dst.write(chunk)
    return FileEntry(digest.hexdigest(), size)


def _check_safetensors(label: str, name: str, src: BinaryIO) -> None:
    """Refuse a ``.safetensors`` file whose header is not a safetensors header (e.g. a renamed pickle)."""
    head = src.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else -1
    body = src.read(length) if 0 < length <= _MAX_SAFETENSORS_HEADER else b""
    try:
        ok = len(body) == length and isinstance(json.loads(body), dict)
    except ValueError:
        ok = False
    if not ok:
        raise StoreError(f"publish {label}: {name!r} is not a valid safetensors file (bad header); save weights "
                         "with safetensors.torch.save_file (safetensors only, no pickle)")


def _mismatch(where: str, expected: FileEntry, got: FileEntry) -> StoreIntegrityError:
    return StoreIntegrityError(
        f"{where}: sha256 {got.sha256} ({got.size} bytes) does not match the manifest's {expected.sha256} "
        f"({expected.size} bytes); the stored copy is damaged: restore the file or publish a new version")


def _timestamp(info: Mapping[str, Any]) -> float | None:
    """Modification time of an fsspec info dict, whatever the backend calls it."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def _holds(dest: Path, manifest: Manifest) -> bool:
    """Whether ``dest`` is a verified local copy of ``manifest``'s version."""
    try:
        local = Manifest.from_json((dest / MANIFEST).read_bytes())
        if (local.kind, local.version, local.files) != (manifest.kind, manifest.version, manifest.files):
            return False
        for name, entry in manifest.files.items():
            with open(dest / name, "rb") as f:
                if _copy(f) != entry:
                    return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


# ---- the store -------------------------------------------------------------------------------------


class ArtifactStore:
    """A versioned artifact store rooted at ``uri`` (a local path or any fsspec URL).

    ``storage_options`` go to :func:`fsspec.core.url_to_fs`, e.g. ``{"endpoint_url": ...}`` for S3.
    """

    def __init__(self, uri: str | Path, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = str(uri)
        try:
            self.fs, root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise StoreError(f"store uri {self.uri!r} cannot be opened: {exc} (install the fsspec backend "
                             "for its protocol, e.g. s3fs for s3://)") from None
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.normpath(root) if self.local else root.rstrip("/")
        self._thread_lock = threading.Lock()
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.uri!r})"

    # ---- paths and locking ----------------------------------------------------------------------

    def _kind_dir(self, kind: str) -> str:
        _check_kind(kind)
        return f"{self.root}/{kind}"

    def _version_dir(self, kind: str, version: int) -> str:
        _check_version(version)
        return f"{self._kind_dir(kind)}/v{version:08d}"

    @contextlib.contextmanager
    def _lock(self, kind: str) -> Iterator[None]:
        """Serialize commits of ``kind``: across threads always, across processes on local filesystems."""
        with self._thread_lock:
            if not self.local or fcntl is None:
                yield
                return
            kind_dir = Path(self._kind_dir(kind))
            kind_dir.mkdir(parents=True, exist_ok=True)
            with open(kind_dir / LOCK, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes
                yield

    # ---- publish ------------------------------------------------------------------------------

    def publish(self, kind: str, version: int, files: Mapping[str, bytes | Path],
                metadata: dict[str, Any] | None = None) -> Manifest:
        """Publish ``files`` (name -> bytes or a local Path) as ``kind`` version ``version``.

        LATEST moves to ``version`` if it is higher than the current one. Re-publishing identical
        content returns the existing manifest; different content raises :class:`VersionExistsError`.
        """
        target = self._version_dir(kind, version)
        label = f"{kind} v{version}"
        if not files:
            raise StoreError(f"publish {label}: no files given")
        entries: dict[str, FileEntry] = {}
        for name, value in files.items():
            _check_name(label, name)
            with _open_source(label, name, value) as src:
                if name.lower().endswith(".safetensors"):
                    _check_safetensors(label, name, src)
                    src.seek(0)
                entries[name] = _copy(src)
        manifest = Manifest(kind, version, entries, dict(metadata or {}), time.time())
        try:
            manifest_bytes = manifest.to_json().encode()
        except (TypeError, ValueError) as exc:
            raise StoreError(f"publish {label}: metadata is not JSON-serializable ({exc}); use plain "
                             "str/int/float/bool/list/dict values") from None
        existing = self._read_manifest(kind, version)
        if existing is not None:
            return self._same_or_raise(existing, manifest)
        try:
            if self.local:
                return self._publish_local(target, files, manifest, manifest_bytes)
            for name, value in files.items():
                self.fs.makedirs(posixpath.dirname(f"{target}/{name}"), exist_ok=True)  # no-op on object stores
                with _open_source(label, name, value) as src, self.fs.open(f"{target}/{name}", "wb") as dst:
                    self._check_unchanged(label, name, entries[name], _copy(src, dst))
            self.fs.pipe_file(f"{target}/{MANIFEST}", manifest_bytes)
            with self._lock(kind):
                self._advance_latest(kind, version)
        except OSError as exc:
            raise StoreError(f"publish {label} to {self.uri} failed: {exc}") from exc
        return manifest

    def _publish_local(self, target: str, files: Mapping[str, bytes | Path], manifest: Manifest,
                       manifest_bytes: bytes) -> Manifest:
        kind, version, label = manifest.kind, manifest.version, f"{manifest.kind} v{manifest.version}"
        staging = Path(self._kind_dir(kind)) / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        try:
            for name, value in files.items():
                path = staging / name
                path.parent.mkdir(parents=True, exist_ok=True)
                with _open_source(label, name, value) as src, open(path, "wb") as dst:
                    self._check_unchanged(label, name, manifest.files[name], _copy(src, dst))
                    dst.flush()
                    os.fsync(dst.fileno())
            (staging / MANIFEST).write_bytes(manifest_bytes)
            with self._lock(kind):
                existing = self._read_manifest(kind, version)
                if existing is not None:  # a concurrent publisher of the same version won
                    return self._same_or_raise(existing, manifest)
                if os.path.lexists(target):  # an incomplete leftover: move it out of the way, then drop it
                    leftover = Path(self._kind_dir(kind)) / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
                    os.rename(target, leftover)
                    shutil.rmtree(leftover, ignore_errors=True)
                os.rename(staging, target)
                self._advance_latest(kind, version)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return manifest

    @staticmethod
    def _check_unchanged(label: str, name: str, expected: FileEntry, got: FileEntry) -> None:
        if got != expected:
            raise StoreError(f"publish {label}: source of {name!r} changed while it was being published; retry")

    @staticmethod
    def _same_or_raise(existing: Manifest, manifest: Manifest) -> Manifest:
        if existing.files == manifest.files:
            return existing  # an idempotent retry
        raise VersionExistsError(f"{manifest.kind} v{manifest.version} is already published with different "
                                 "content; publish under a new version number (see versions())")

    def _advance_latest(self, kind: str, version: int) -> None:
        """Move LATEST to ``version`` if that is higher; the caller holds ``self._lock(kind)``."""
        current = self._read_latest_pointer(kind)
        if current is not None and current >= version:
            return
        data = json.dumps({"version": version}).encode()
        path = f"{self._kind_dir(kind)}/{LATEST}"
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        tmp = f"{self._kind_dir(kind)}/{STAGING_PREFIX}{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    # ---- read ---------------------------------------------------------------------------------

    def _read_latest_pointer(self, kind: str) -> int | None:
        try:
            return int(json.loads(self.fs.cat_file(f"{self._kind_dir(kind)}/{LATEST}"))["version"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return None  # a damaged pointer: callers fall back to scanning

    def _read_manifest(self, kind: str, version: int) -> Manifest | None:
        path = f"{self._version_dir(kind, version)}/{MANIFEST}"
        try:
            manifest = Manifest.from_json(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreIntegrityError(f"{kind} v{version}: {path} is unreadable ({exc}); delete that version "
                                      "directory and publish it again") from None
        if (manifest.kind, manifest.version) != (kind, version):
            raise StoreIntegrityError(f"{path} describes {manifest.kind} v{manifest.version}, not {kind} v{version}; "
                                      "the version directory was copied or renamed by hand")
        return manifest

    def versions(self, kind: str) -> list[int]:
        """Complete (manifest-bearing) versions of ``kind``, ascending."""
        kind_dir = self._kind_dir(kind)
        self.fs.invalidate_cache(kind_dir)
        try:
            entries = self.fs.ls(kind_dir, detail=False)
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            match = _VERSION_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if match and self._is_complete(f"{kind_dir}/{match.group(0)}"):
                found.append(int(match.group(1)))
        return sorted(found)

    def _is_complete(self, version_dir: str) -> bool:
        path = f"{version_dir}/{MANIFEST}"
        self.fs.invalidate_cache(path)  # listing caches (s3fs) must not hide a fresh manifest
        return bool(self.fs.exists(path))

    def manifest(self, kind: str, version: int) -> Manifest:
        """The manifest of a complete version (raises :class:`VersionNotFoundError`)."""
        manifest = self._read_manifest(kind, version)
        if manifest is None:
            raise VersionNotFoundError(f"{kind} v{version} is not in {self.uri} (complete versions: "
                                       f"{self.versions(kind)}); publish it first or pick one of those")
        return manifest

    def latest(self, kind: str) -> Manifest | None:
        """The newest version: the one LATEST names, or a scan if LATEST is missing or points nowhere."""
        pointer = self._read_latest_pointer(kind)
        if pointer is not None and 0 <= pointer <= MAX_VERSION:
            manifest = self._read_manifest(kind, pointer)
            if manifest is not None:
                return manifest
        versions = self.versions(kind)
        return self._read_manifest(kind, versions[-1]) if versions else None

    def read_bytes(self, kind: str, version: int, name: str) -> bytes:
        """One file's bytes, verified against the manifest."""
        entry = self.manifest(kind, version).files.get(name)
        if entry is None:
            raise StoreError(f"{kind} v{version} has no file {name!r} (it has "
                             f"{sorted(self.manifest(kind, version).files)})")
        try:
            data = self.fs.cat_file(f"{self._version_dir(kind, version)}/{name}")
        except FileNotFoundError:
            raise StoreIntegrityError(f"{kind} v{version}/{name} is listed in the manifest but missing; "
                                      "restore it or publish a new version") from None
        got = FileEntry(hashlib.sha256(data).hexdigest(), len(data))
        if got != entry:
            raise _mismatch(f"{kind} v{version}/{name}", entry, got)
        return data

    def load_tensors(self, kind: str, version: int, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
        """A verified safetensors file as a dict of torch tensors (never unpickles)."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        data = self.read_bytes(kind, version, name)
        try:
            return load(data)
        except SafetensorError as exc:
            raise StoreIntegrityError(f"{kind} v{version}/{name} is not a valid safetensors file: {exc}") from None

    def fetch(self, kind: str, version: int, dest: str | Path) -> Path:
        """Download a version into directory ``dest``, verifying every file; returns ``dest``.

        Atomic: files go to a hidden sibling staging directory renamed to ``dest`` only when all
        verified, so on failure nothing new is left at ``dest``. A verified copy already at ``dest``
        is reused.
        """
        dest = Path(dest)
        manifest = self.manifest(kind, version)
        if _holds(dest, manifest):
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".{dest.name}{STAGING_PREFIX}{uuid.uuid4().hex}"
        source_dir = self._version_dir(kind, version)
        try:
            for name, entry in manifest.files.items():
                path = staging / name
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with self.fs.open(f"{source_dir}/{name}", "rb") as src, open(path, "wb") as dst:
                        got = _copy(src, dst)
                except FileNotFoundError:
                    raise StoreIntegrityError(f"{kind} v{version}/{name} is listed in the manifest but missing "
                                              "(damaged, or removed by gc); fetch another version") from None
                if got != entry:
                    raise _mismatch(f"{kind} v{version}/{name}", entry, got)
            (staging / MANIFEST).write_text(manifest.to_json())
            if os.path.lexists(dest):  # a stale or damaged copy: swap it out
                old = dest.parent / f".{dest.name}{STAGING_PREFIX}{uuid.uuid4().hex}"
                os.rename(dest, old)
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.rename(staging, dest)
            except OSError:
                if not _holds(dest, manifest):  # not just a concurrent fetch of the same version
                    raise
        except OSError as exc:
            raise StoreError(f"fetch {kind} v{version} into {dest} failed: {exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dest

    # ---- retention ----------------------------------------------------------------------------

    def gc(self, kind: str, keep: int, stale_after_s: float = 3600.0) -> list[int]:
        """Delete all but the newest ``keep`` complete versions (never the one LATEST names).

        Also removes staging leftovers and incomplete versions untouched for ``stale_after_s``
        seconds (younger ones may be publishes in progress). Returns the deleted complete versions.
        """
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise StoreError(f"gc {kind}: keep must be an integer >= 1, got {keep!r}")
        with self._lock(kind):
            versions = self.versions(kind)
            pinned = self._read_latest_pointer(kind)
            doomed = [v for v in versions[:-keep] if v != pinned]
            for version in doomed:
                version_dir = self._version_dir(kind, version)
                self.fs.rm_file(f"{version_dir}/{MANIFEST}")  # invisible first, so a partial delete stays so
                self.fs.rm(version_dir, recursive=True)
            self._remove_stale(kind, stale_after_s)
        return doomed

    def _remove_stale(self, kind: str, stale_after_s: float) -> None:
        kind_dir = self._kind_dir(kind)
        try:
            entries = self.fs.ls(kind_dir, detail=False)
        except FileNotFoundError:
            return
        now = time.time()
        for entry in entries:
            path = entry.rstrip("/")
            name = path.rsplit("/", 1)[-1]
            partial = name.startswith(STAGING_PREFIX) or (_VERSION_DIR.match(name) and not self._is_complete(path))
            if partial and (age := self._age(path, now)) is not None and age >= stale_after_s:
                self.fs.rm(path, recursive=True)

    def _age(self, path: str, now: float) -> float | None:
        """Seconds since anything under ``path`` was modified; None if the backend cannot tell."""
        try:
            infos = [self.fs.info(path), *self.fs.find(path, withdirs=True, detail=True).values()]
        except FileNotFoundError:
            return None
        times = [t for info in infos if (t := _timestamp(info)) is not None]
        return now - max(times) if times else None
