"""ArtifactStore: versions published atomically, verified on every read, kept by retention; see :mod:`tlt.store`."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import posixpath
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tlt import store_s3
from tlt.store.errors import (
    StoreError,
    StoreFullError,
    StoreIntegrityError,
    UnknownDigestError,
    VersionExistsError,
    VersionNotFoundError,
    disk_full_message,
    integrity_mismatch,
)
from tlt.store.manifest import DEFAULT_DIGEST, MANIFEST, FileEntry, Manifest, check_digest
from tlt.store.safetensors_bytes import check_safetensors_header, tensors_from_buffer
from tlt.store.staging import STAGING_PREFIX, staging_name, writer_alive
from tlt.store.streams import (
    CHUNK,
    DurableWriter,
    digest_of,
    file_signature,
    hash_stream,
    open_source,
    read_exact,
    unbuffered_writer,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: thread-level locking only
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import torch

LATEST = "LATEST"
LOCK = ".lock"
ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".md", ".yaml", ".jsonl")
MAX_VERSION = 10**8 - 1
_KIND = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_VERSION_DIR = re.compile(r"^v(\d{8})$")
_READ_ONLY = 0o444  # mode of published files
_WRITABLE = 0o644  # mode of a moved-in file given back to its owner when its publish fails
_F = TypeVar("_F", bound=Callable[..., Any])


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


def _source_size(value: Any) -> int | None:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return memoryview(value).nbytes
    with contextlib.suppress(OSError, TypeError):
        return os.stat(value).st_size
    return None


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


def _same_filesystem(value: bytes | Path, directory: Path) -> bool:
    """Whether ``value`` is a regular local file on ``directory``'s filesystem (so a rename can move it)."""
    if not isinstance(value, os.PathLike):
        return False
    try:
        st = os.lstat(value)
        return stat.S_ISREG(st.st_mode) and st.st_dev == os.stat(directory).st_dev
    except OSError:
        return False


def _hard_link(source: str, path: Path) -> bool:
    """Hard-link ``path`` to ``source``; False where the filesystem cannot (another device, no link support)."""
    try:
        os.link(source, path)
    except FileNotFoundError:
        raise
    except OSError:
        return False
    return True


def _holds(dest: Path, manifest: Manifest) -> bool:
    """Whether ``dest`` is a verified local copy of ``manifest``'s version."""
    try:
        local = Manifest.from_json((dest / MANIFEST).read_bytes())
        if (local.kind, local.version, local.files) != (manifest.kind, manifest.version, manifest.files):
            return False
        for name, entry in manifest.files.items():
            with open(dest / name, "rb", buffering=0) as f:
                if hash_stream(f, entry.algorithm) != entry:
                    return False
    except (OSError, ValueError, KeyError, TypeError, StoreError):
        return False
    return True


def _guarded(method: _F) -> _F:
    """On S3: check the bucket before the first operation and turn S3 failures into clear StoreErrors."""

    @functools.wraps(method)
    def wrapper(self: ArtifactStore, *args: Any, **kwargs: Any) -> Any:
        if self._s3 is None:
            return method(self, *args, **kwargs)
        try:
            self._s3.ensure_bucket(self.fs)
            return method(self, *args, **kwargs)
        except StoreError:
            raise
        except Exception as exc:
            error = self._s3.translate(exc)
            if error is None:
                raise
            raise error from exc

    return wrapper  # type: ignore[return-value]


class ArtifactStore:
    """A versioned artifact store rooted at ``uri`` (a local path or any fsspec URL).

    ``storage_options`` go to :func:`fsspec.core.url_to_fs`, e.g. ``{"endpoint_url": ...}`` for S3
    (where they are completed from the AWS_* environment, see :mod:`tlt.store_s3`); they are kept as given in
    :attr:`storage_options`, so ``ArtifactStore(store.uri, store.storage_options)`` opens the same store in
    another process. ``digest`` is the
    checksum of new publishes, one of :data:`DIGESTS`: ``"xxh3_128"`` (default, fast) or ``"sha256"``
    (cryptographic, 10-30x slower to hash; see the module docstring). Reads verify each file by the
    algorithm its manifest entry names, whatever ``digest`` is.
    """

    def __init__(self, uri: str | Path, storage_options: dict[str, Any] | None = None, *,
                 digest: str = DEFAULT_DIGEST) -> None:
        self.digest = check_digest(digest)
        self.uri = str(uri)
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        options, endpoint = dict(self.storage_options), ""
        if store_s3.is_s3(self.uri):
            options, endpoint = store_s3.storage_options(options)
        try:
            self.fs, root = fsspec.core.url_to_fs(self.uri, **options)
        except (ImportError, ValueError) as exc:
            raise StoreError(f"store uri {self.uri!r} cannot be opened: {exc} (install the fsspec backend "
                             "for its protocol, e.g. s3fs for s3://)") from None
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.normpath(root) if self.local else root.rstrip("/")
        self._s3 = store_s3.S3Target(self.uri, self.root, endpoint, StoreError) if store_s3.is_s3(self.uri) else None
        self._chunk = store_s3.READ_SIZE if self._s3 is not None else 0  # 0: CHUNK
        self._thread_lock = threading.Lock()
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.uri!r})"

    # ---- paths, files and locking ---------------------------------------------------------------

    def _kind_dir(self, kind: str) -> str:
        _check_kind(kind)
        return f"{self.root}/{kind}"

    def _version_dir(self, kind: str, version: int) -> str:
        _check_version(version)
        return f"{self._kind_dir(kind)}/v{version:08d}"

    def _open_read(self, path: str) -> BinaryIO:
        if self.local:
            return open(path, "rb", buffering=0)
        if self._s3 is not None:
            return store_s3.StreamReader(self.fs, path)  # type: ignore[return-value]
        return self.fs.open(path, "rb")

    def _open_write(self, path: str) -> BinaryIO:
        """A remote file for writing (on S3 a multipart upload of PART_SIZE parts once it is that large)."""
        if self._s3 is None:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)  # never on S3: s3fs would create buckets
            return self.fs.open(path, "wb")
        return store_s3.MultipartWriter(self.fs, path)  # type: ignore[return-value]

    def _failure(self, what: str, exc: BaseException, where: Path | None = None, need: int | None = None,
                 fix: str = "") -> StoreError:
        """A StoreError for ``what`` failing with ``exc``: S3 failures explained, a full disk with its numbers."""
        if self._s3 is not None and (error := self._s3.translate(exc)) is not None:
            return error
        message = f"{what} failed: {exc}"
        if where is not None and isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StoreFullError(f"{message}; {disk_full_message(where, need, fix)}")
        return StoreError(message)

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

    def scratch_path(self, kind: str, name: str) -> Path | None:
        """A fresh path on the store's own filesystem for a producer to write ``name`` to and then publish
        with ``move=True``, which renames it into the version instead of copying it; None on object stores.

        It lives in ``<kind>/`` under a staging name, so :meth:`gc` removes it if the producer dies first.
        """
        _check_name(f"{kind} scratch", name)
        if not self.local:
            return None
        kind_dir = Path(self._kind_dir(kind))
        kind_dir.mkdir(parents=True, exist_ok=True)
        return kind_dir / staging_name(posixpath.basename(name))

    @_guarded
    def publish(self, kind: str, version: int, files: Mapping[str, bytes | Path],
                metadata: dict[str, Any] | None = None, *, move: bool = False) -> Manifest:
        """Publish ``files`` (name -> bytes or a local Path) as ``kind`` version ``version``.

        LATEST moves to ``version`` if it is higher than the current one. Re-publishing identical
        content returns the existing manifest; different content raises :class:`VersionExistsError`.
        Every file is read once: hashed while it is written.

        ``move=True`` hands the Path sources over to the store: a file on the store's own filesystem
        (see :meth:`scratch_path`) is hashed in place, fsynced and renamed into the version, never
        copied; others are copied. Once the version is published the sources are gone; if the publish
        fails they are left where they were.
        """
        self._version_dir(kind, version)  # validates kind and version first
        label = f"{kind} v{version}"
        if not files:
            raise StoreError(f"publish {label}: no files given")
        for name in files:
            _check_name(label, name)
        metadata = dict(metadata or {})
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"publish {label}: metadata is not JSON-serializable ({exc}); use plain "
                             "str/int/float/bool/list/dict values") from None
        for name, value in files.items():
            with open_source(label, name, value) as src:
                if name.lower().endswith(".safetensors"):
                    check_safetensors_header(label, name, src)
        existing = self._read_manifest(kind, version)
        try:
            if existing is not None:  # a retry, or a conflict: compare checksums, write no files
                manifest = self._same_or_raise(label, files, existing, self._hash_sources(label, files, existing))
                with self._lock(kind):  # a publish that failed only at its LATEST write is finished by its retry
                    self._advance_latest(kind, version)
            elif self.local:
                manifest = self._publish_local(kind, version, files, metadata, move)
            else:
                manifest = self._publish_remote(kind, version, files, metadata)
        except OSError as exc:
            need = sum(_source_size(v) or 0 for v in files.values())
            raise self._failure(f"publish {label} to {self.uri}", exc, Path(self._kind_dir(kind)), need,
                                "free space there, or set store.uri to a larger volume") from exc
        if move:  # the store holds them now (sources that were renamed in are already gone)
            for value in files.values():
                if isinstance(value, os.PathLike):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(value)
        return manifest

    def _hash_sources(self, label: str, files: Mapping[str, bytes | Path], like: Manifest) -> dict[str, FileEntry]:
        """Entries of ``files`` hashed as ``like`` (an existing version) hashed them, to compare with it."""
        entries = {}
        for name, value in files.items():
            algorithm = like.files[name].algorithm if name in like.files else self.digest
            with open_source(label, name, value) as src:
                entries[name] = hash_stream(src, algorithm)
        return entries

    def _copy_source(self, label: str, name: str, value: bytes | Path, write: Callable[[memoryview], Any]) -> FileEntry:
        with open_source(label, name, value) as src:
            before = file_signature(src)
            entry = hash_stream(src, self.digest, write)
            if before is not None and (file_signature(src) != before or entry.size != before[0]):
                raise StoreError(f"publish {label}: source of {name!r} changed while it was being published; retry")
        return entry

    def _adopt(self, label: str, name: str, value: Path, path: Path) -> FileEntry:
        """Hash ``value`` in place, make it durable and rename it to ``path`` (same filesystem): no copy."""
        with open_source(label, name, value) as src:
            before = file_signature(src)
            entry = hash_stream(src, self.digest)
            os.fsync(src.fileno())
            if file_signature(src) != before or entry.size != before[0]:  # type: ignore[index]
                raise StoreError(f"publish {label}: source of {name!r} changed while it was being published; retry")
        os.rename(value, path)
        return entry

    def _publish_local(self, kind: str, version: int, files: Mapping[str, bytes | Path],
                       metadata: dict[str, Any], move: bool = False) -> Manifest:
        label, target = f"{kind} v{version}", self._version_dir(kind, version)
        staging = Path(self._kind_dir(kind)) / staging_name()
        entries: dict[str, FileEntry] = {}
        adopted: list[tuple[Path, Path]] = []  # (where it is now, where the caller had it)
        try:
            for name, value in files.items():
                path = staging / name
                path.parent.mkdir(parents=True, exist_ok=True)
                if move and _same_filesystem(value, staging):
                    entries[name] = self._adopt(label, name, Path(value), path)
                    adopted.append((path, Path(value)))
                else:
                    with open(path, "wb", buffering=0) as dst:
                        writer = DurableWriter(dst)
                        entries[name] = self._copy_source(label, name, value, writer)
                        writer.sync()
                os.chmod(path, _READ_ONLY)  # published files never change (fetch may hand out hard links)
            manifest = Manifest(kind, version, entries, metadata, time.time())
            with open(staging / MANIFEST, "wb", buffering=0) as dst:  # durable before the rename makes it visible
                unbuffered_writer(dst)(memoryview(manifest.to_json().encode()))
                os.fsync(dst.fileno())
            with self._lock(kind):
                existing = self._read_manifest(kind, version)
                if existing is not None:  # a concurrent publisher of the same version won
                    return self._same_or_raise(label, files, existing, entries)
                if os.path.lexists(target):  # an incomplete leftover: move it out of the way, then drop it
                    leftover = Path(self._kind_dir(kind)) / staging_name()
                    os.rename(target, leftover)
                    shutil.rmtree(leftover, ignore_errors=True)
                os.rename(staging, target)
                self._advance_latest(kind, version)
        except BaseException:
            for path, origin in adopted:  # nothing was accepted: give the caller its files back
                with contextlib.suppress(OSError):
                    os.chmod(path, _WRITABLE)
                    os.rename(path, origin)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return manifest

    def _publish_remote(self, kind: str, version: int, files: Mapping[str, bytes | Path],
                        metadata: dict[str, Any]) -> Manifest:
        """Object stores: files under the version prefix, then the manifest (the commit), then LATEST."""
        label, target = f"{kind} v{version}", self._version_dir(kind, version)
        entries, written, committed = {}, [], False
        try:
            for name, value in files.items():
                path = f"{target}/{name}"
                with self._open_write(path) as dst:
                    entries[name] = self._copy_source(label, name, value, dst.write)
                written.append(path)
            manifest = Manifest(kind, version, entries, metadata, time.time())
            with self._lock(kind):
                existing = self._read_manifest(kind, version)
                if existing is not None:  # another thread of this process published it meanwhile
                    committed = True  # its files, not ours: leave them
                    return self._same_or_raise(label, files, existing, entries)
                self.fs.pipe_file(f"{target}/{MANIFEST}", manifest.to_json().encode())
                committed = True
                self._advance_latest(kind, version)
        finally:
            if not committed and written:  # best effort; gc removes what is left once stale
                with contextlib.suppress(Exception):  # a manifest PUT that landed but whose answer was lost
                    self.fs.rm_file(f"{target}/{MANIFEST}")  # goes first: never a visible version without files
                with contextlib.suppress(Exception):
                    self.fs.rm(written)
        return manifest

    def _same_or_raise(self, label: str, files: Mapping[str, bytes | Path], existing: Manifest,
                       entries: dict[str, FileEntry]) -> Manifest:
        """``existing`` if ``files`` (hashed as ``entries``) is its content, else :class:`VersionExistsError`."""
        if any(name in existing.files and existing.files[name].algorithm != entry.algorithm
               for name, entry in entries.items()):  # published with another digest: hash the sources like it
            entries = self._hash_sources(label, files, existing)
        if existing.files == entries:
            return existing  # an idempotent retry
        raise VersionExistsError(f"{existing.kind} v{existing.version} is already published with different "
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
        tmp = f"{self._kind_dir(kind)}/{staging_name()}"
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
        except UnknownDigestError as exc:
            raise UnknownDigestError(f"{kind} v{version}: {path}: {exc}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreIntegrityError(f"{kind} v{version}: {path} is unreadable ({exc}); delete that version "
                                      "directory and publish it again") from None
        if (manifest.kind, manifest.version) != (kind, version):
            raise StoreIntegrityError(f"{path} describes {manifest.kind} v{manifest.version}, not {kind} v{version}; "
                                      "the version directory was copied or renamed by hand")
        return manifest

    @_guarded
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

    @_guarded
    def manifest(self, kind: str, version: int) -> Manifest:
        """The manifest of a complete version (raises :class:`VersionNotFoundError`)."""
        manifest = self._read_manifest(kind, version)
        if manifest is None:
            raise VersionNotFoundError(f"{kind} v{version} is not in {self.uri} (complete versions: "
                                       f"{self.versions(kind)}); publish it first or pick one of those")
        return manifest

    @_guarded
    def latest(self, kind: str) -> Manifest | None:
        """The newest version: the one LATEST names, or a scan if LATEST is missing or points nowhere."""
        pointer = self._read_latest_pointer(kind)
        if pointer is not None and 0 <= pointer <= MAX_VERSION:
            manifest = self._read_manifest(kind, pointer)
            if manifest is not None:
                return manifest
        versions = self.versions(kind)
        return self._read_manifest(kind, versions[-1]) if versions else None

    def _entry(self, kind: str, version: int, name: str) -> FileEntry:
        files = self.manifest(kind, version).files
        if name not in files:
            raise StoreError(f"{kind} v{version} has no file {name!r} (it has {sorted(files)})")
        return files[name]

    def _missing(self, kind: str, version: int, name: str) -> StoreIntegrityError:
        return StoreIntegrityError(f"{kind} v{version}/{name} is listed in the manifest but missing "
                                   "(damaged, or removed by gc); restore it, or use or publish another version")

    @_guarded
    def read_bytes(self, kind: str, version: int, name: str) -> bytes:
        """One file's bytes, verified against the manifest (for weights prefer :meth:`load_tensors`)."""
        entry = self._entry(kind, version, name)
        try:
            data = self.fs.cat_file(f"{self._version_dir(kind, version)}/{name}")
        except FileNotFoundError:
            raise self._missing(kind, version, name) from None
        got = digest_of(entry.algorithm, data)
        if got != entry:
            raise integrity_mismatch(f"{kind} v{version}/{name}", entry, got)
        return data

    @_guarded
    def load_tensors(self, kind: str, version: int, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
        """A verified safetensors file as a dict of CPU torch tensors (never unpickles).

        The file is read once, hashed as it arrives, into one buffer the tensors are views of: peak
        memory is the file's size, not twice it.
        """
        entry = self._entry(kind, version, name)
        try:
            with self._open_read(f"{self._version_dir(kind, version)}/{name}") as src:
                flat, got = read_exact(src, entry.size, self._chunk or CHUNK, entry.algorithm)
        except FileNotFoundError:
            raise self._missing(kind, version, name) from None
        except OSError as exc:
            raise self._failure(f"read {kind} v{version}/{name} from {self.uri}", exc) from exc
        if got != entry:
            raise integrity_mismatch(f"{kind} v{version}/{name}", entry, got)
        try:
            return tensors_from_buffer(flat)
        except ValueError as exc:
            raise StoreIntegrityError(f"{kind} v{version}/{name} is not a valid safetensors file: {exc}") from None

    @_guarded
    def fetch(self, kind: str, version: int, dest: str | Path, *, link: bool = False) -> Path:
        """Download a version into directory ``dest``, verifying every file; returns ``dest``.

        Atomic: files go to a hidden sibling staging directory renamed to ``dest`` only when all
        verified, so on failure nothing new is left at ``dest``. A verified copy already at ``dest``
        is reused. ``link=True`` is for read-only consumers: from a local store to ``dest`` on the same
        filesystem the files become hard links to the store's (read-only, never-changing) files,
        verified all the same, instead of copies. A consumer that writes into such a file in place (root
        ignores the read-only mode) damages the stored version too, which the next verified read refuses.
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
                source = f"{source_dir}/{name}"
                try:
                    if link and self.local and _hard_link(source, path):
                        with open(path, "rb", buffering=0) as src:
                            got = hash_stream(src, entry.algorithm)
                    else:
                        with self._open_read(source) as src, open(path, "wb", buffering=0) as dst:
                            got = hash_stream(src, entry.algorithm, unbuffered_writer(dst), self._chunk)
                except FileNotFoundError:
                    if not path.parent.is_dir():
                        raise
                    raise self._missing(kind, version, name) from None
                if got != entry:
                    raise integrity_mismatch(f"{kind} v{version}/{name}", entry, got)
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
            need = sum(e.size for e in manifest.files.values())
            raise self._failure(f"fetch {kind} v{version} into {dest}", exc, dest.parent, need,
                                "free space there, or fetch into a directory on another disk") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dest

    # ---- retention ----------------------------------------------------------------------------

    @_guarded
    def gc(self, kind: str, keep: int, stale_after_s: float = 3600.0) -> list[int]:
        """Delete all but the newest ``keep`` complete versions (never the one LATEST names).

        Also removes interrupted writes: staging leftovers and incomplete versions untouched for
        ``stale_after_s`` seconds (younger ones may be publishes in progress), and at once, whatever
        their age, staging entries whose writer is known dead (a local disk's staging names record the
        writer: a process of this machine that no longer runs; so a publish killed mid-way is cleaned
        up at the next gc). On S3 it aborts multipart uploads abandoned ``stale_after_s``. Returns the
        deleted complete versions.
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
            if self._s3 is not None:
                key_prefix = self._kind_dir(kind).partition("/")[2] + "/"
                self._s3.abort_stale_uploads(self.fs, key_prefix, stale_after_s)
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
            staging = name.startswith(STAGING_PREFIX)
            partial = staging or (_VERSION_DIR.match(name) and not self._is_complete(path))
            if (self.local and staging and writer_alive(name) is False) or (
                    partial and (age := self._age(path, now)) is not None and age >= stale_after_s):
                self.fs.rm(path, recursive=True)

    def _age(self, path: str, now: float) -> float | None:
        """Seconds since anything under ``path`` was modified; None if the backend cannot tell."""
        try:
            infos = [self.fs.info(path), *self.fs.find(path, withdirs=True, detail=True).values()]
        except FileNotFoundError:
            return None
        times = [t for info in infos if (t := _timestamp(info)) is not None]
        return now - max(times) if times else None
