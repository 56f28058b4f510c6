"""ArtifactStore: versioned, checksummed, atomically published policy and drafter weights over fsspec.

Layout under the root URL (a local path or ``file://`` by default, ``s3://bucket/prefix`` in clusters)::

    <kind>/v00000042/model.safetensors, config.json, ...
    <kind>/v00000042/MANIFEST.json      written last: every file's size and checksum, metadata, created
    <kind>/LATEST                       {"version": 42}, only ever moved forward
    <kind>/.staging-<uuid>-<writer>[/]  in-flight writes (local filesystems), never visible as a version

Atomicity. A version is visible only once its MANIFEST.json exists, so an interrupted publish is
invisible, and :meth:`ArtifactStore.gc` removes what it left: at once where its writer is known dead
(a staging name records the writer's machine, PID namespace, PID and process start time, so a process
on the same machine can tell), else once stale (other machines, object stores). On a local
filesystem a version is written to a hidden staging directory (its files and manifest fsynced, so a
power loss cannot leave a visible version with missing data) and renamed into place, and LATEST is
replaced via a temp file and ``os.replace``; the commit (existence check, rename, LATEST update) holds an ``flock`` on
``<kind>/.lock``, so concurrent publishers, threads or processes, always leave LATEST at the highest
version. Object stores have no rename: there the files are written under the version's prefix first,
the manifest last (single-object PUTs are atomic), then LATEST. Cross-process locks exist only on local
disks: on S3 each kind must have a single writer (the trainer publishes policies, the drafter service
drafters); within one process LATEST is still guarded by a lock.

S3 (``s3://bucket/prefix``, see :mod:`tlt.store_s3`): credentials from ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, region from ``AWS_DEFAULT_REGION``, a custom
(MinIO-compatible) endpoint from ``storage_options={"endpoint_url": ...}`` or ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``. Large files go up as concurrent 8 MiB multipart parts and come back as one
streaming GET; the store never creates buckets.

Verification. Every read is verified against the manifest (size and checksum), every byte is read
once and hashed as it arrives. Each manifest entry names its digest algorithm::

    "model.safetensors": {"algorithm": "xxh3_128", "digest": "<32 hex>", "size": 104857600}

New versions use xxh3-128 (``xxhash``, > 10 GB/s a core) unless the store is made with
``ArtifactStore(uri, digest="sha256")`` (~1-1.5 GB/s a core; such entries also keep the ``"sha256"`` key
that tlt releases before explicit algorithms read). Manifests written before entries named their
algorithm (``{"sha256": ..., "size": ...}``) are read as sha256 and verified as before. The checksum's
job is integrity: it catches bit rot, truncated, torn or partial writes, a file swapped for another
version's, a bad copy by hand. It is not what makes the store's contents authentic: whoever can write
a file into the store can also rewrite the MANIFEST.json next to it, so a cryptographic hash stored
there proves nothing against a malicious writer. Authenticity rests on who may write to the store
(object-store ACLs / IAM, filesystem permissions); sha256 is offered for users whose policies ask for
a cryptographic digest, at 10-30x the hashing time (~110 ms vs ~4 ms per 100 MB on one core).

Only safetensors and text formats are accepted: nothing from the store is ever unpickled.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import itertools
import json
import math
import mmap
import os
import posixpath
import re
import shutil
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import fsspec
import xxhash
from fsspec.implementations.local import LocalFileSystem

from tlt import store_s3
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
DIGESTS = ("xxh3_128", "sha256")  # checksum algorithms of manifest entries; the first is the default
DEFAULT_DIGEST = DIGESTS[0]
_HEX_DIGITS = {"xxh3_128": 32, "sha256": 64}
_SLOW_DIGESTS = frozenset({"sha256"})  # hashed on a helper thread, overlapping the I/O (cheap ones inline)
_HEX = re.compile(r"[0-9a-f]+")
_CHUNK = 1 << 20  # local read/write size (cache-sized: read, hashed and written while hot)
_THREADED_HASH_MIN = 256 << 10  # chunks of a slow digest at least this large are hashed on a helper thread
_WRITEBACK = 8 << 20  # publish starts writing back to disk every this many bytes, so the final fsync is short
_HUGE_PAGE_MIN = 4 << 20  # load_tensors buffers at least this large are mapped for transparent huge pages
_MAX_SAFETENSORS_HEADER = 100 << 20
_READ_ONLY = 0o444  # mode of published files
_WRITABLE = 0o644  # mode of a moved-in file given back to its owner when its publish fails
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
           "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_F = TypeVar("_F", bound=Callable[..., Any])
# a staging name's writer: machine and PID namespace (hashed), PID, process start time (clock ticks since boot)
_STAGING_WRITER = re.compile(rf"^{re.escape(STAGING_PREFIX)}[0-9a-f]{{32}}-([0-9a-f]{{16}})-(\d+)-(\d+)(?:-|$)")


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


# ---- staging names and their writers ---------------------------------------------------------------


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


def _staging_name(suffix: str = "") -> str:
    """A fresh staging entry name; it names this process as its writer where it can (see :func:`_writer_alive`)."""
    name = f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    host, pid = _host_id(), os.getpid()
    start = _start_time(pid) if host is not None else None
    if start is not None:
        name += f"-{host}-{pid}-{start}"
    return name + (f"-{suffix}" if suffix else "")


def _writer_alive(name: str) -> bool | None:
    """Whether the process that made staging entry ``name`` still runs (a reused PID has another start time);
    None where that cannot be told from here: entries of other machines or PID namespaces, or without a writer."""
    match = _STAGING_WRITER.match(name)
    if match is None or match.group(1) != _host_id():
        return None
    return _start_time(int(match.group(2))) == int(match.group(3))


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


Source = memoryview | BinaryIO  # what publish streams from: the caller's bytes (no copy) or an open file


@contextlib.contextmanager
def _source(label: str, name: str, value: bytes | Path) -> Iterator[Source]:
    """The bytes to publish as ``name``: a view of the caller's bytes, or the opened file."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        yield memoryview(value).cast("B")
        return
    if not isinstance(value, os.PathLike):
        raise StoreError(f"publish {label}: {name!r} must be bytes or a pathlib.Path, got {type(value).__name__} "
                         "(encode text with .encode())")
    try:
        handle = open(value, "rb", buffering=0)  # noqa: SIM115 - closed by the with-block below
    except OSError as exc:
        raise StoreError(f"publish {label}: cannot read the source of {name!r}: {exc}") from None
    with handle:
        yield handle


def _signature(src: Source) -> tuple[int, int] | None:
    """(size, mtime_ns) of a source file, to notice one rewritten while it is published."""
    if isinstance(src, memoryview):
        return None
    st = os.fstat(src.fileno())
    return st.st_size, st.st_mtime_ns


def _size_hint(src: BinaryIO) -> int | None:
    """Bytes left in ``src`` if cheaply known (sizes the copy buffers of small files)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        if isinstance(src, io.BytesIO):
            with src.getbuffer() as view:
                return view.nbytes - src.tell()
        size = getattr(src, "size", None)
        if isinstance(size, int):
            return size - src.tell()
        return os.fstat(src.fileno()).st_size - src.tell()
    return None


def _check_digest(digest: str) -> str:
    if digest not in DIGESTS:
        raise StoreError(f"store option digest={digest!r} is not supported: choose one of "
                         f"{', '.join(repr(d) for d in DIGESTS)} ('xxh3_128', the default, is a fast integrity "
                         "checksum; 'sha256' a cryptographic one, 10-30x slower to hash)")
    return digest


def _new_hash(algorithm: str) -> Any:
    return hashlib.sha256() if algorithm == "sha256" else xxhash.xxh3_128()


def _digest(algorithm: str, data: bytes | memoryview) -> FileEntry:
    """The entry of ``data`` in one call."""
    h = _new_hash(algorithm)
    h.update(data)
    return FileEntry(algorithm, h.hexdigest(), memoryview(data).nbytes)


class _Hasher:
    """Running checksum and size of a stream. xxh3 is hashed inline, right after each chunk is read (still
    in the CPU cache); a slow digest's (sha256) large chunks go to a helper thread (hashlib releases the
    GIL), so hashing overlaps the reads and writes instead of adding to them."""

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self._hash = _new_hash(algorithm)
        self._threaded = algorithm in _SLOW_DIGESTS
        self.size = 0
        self._pool: ThreadPoolExecutor | None = None
        self._last: Future[None] | None = None

    def update(self, view: memoryview | bytes) -> Future[None] | None:
        """Hash ``view`` after everything before it; the returned future completes when it is hashed (the
        caller must not reuse the buffer before); None if hashed already."""
        self.size += len(view)
        if not self._threaded or len(view) < _THREADED_HASH_MIN:
            self._drain()
            self._hash.update(view)
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"tlt-{self.algorithm}")
        self._last = self._pool.submit(self._hash.update, view)
        return self._last

    def _drain(self) -> None:
        if self._last is not None:
            self._last.result()
            self._last = None

    def entry(self) -> FileEntry:
        self._drain()
        return FileEntry(self.algorithm, self._hash.hexdigest(), self.size)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _stream(src: Source, algorithm: str, write: Callable[[memoryview], Any] | None = None,
            chunk: int | None = None) -> FileEntry:
    """Stream ``src`` (into ``write`` if given) and return its size and checksum; every byte is read once.

    Two buffers alternate, so with a threaded digest chunk i is hashed (helper thread) while it is written
    and chunk i+1 read.
    """
    chunk = chunk or _CHUNK
    hasher = _Hasher(algorithm)
    try:
        if isinstance(src, memoryview):
            for start in range(0, len(src), chunk):
                view = src[start:start + chunk]
                hasher.update(view)
                if write is not None:
                    write(view)
            return hasher.entry()
        hint = _size_hint(src)
        length = chunk if hint is None else max(1, min(chunk, hint + 1))
        buffers: list[memoryview] = []
        pending: list[Future[None] | None] = [None, None]
        for i in itertools.count():
            slot = i & 1
            if len(buffers) <= slot:
                buffers.append(memoryview(bytearray(length)))
            if (busy := pending[slot]) is not None:
                busy.result()  # its previous chunk is hashed: the buffer may be reused
            n = src.readinto(buffers[slot])
            if not n:
                break
            view = buffers[slot][:n]
            pending[slot] = hasher.update(view)
            if write is not None:
                write(view)
        return hasher.entry()
    finally:
        hasher.close()


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # pragma: no cover - not glibc/musl
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_SYNC_FILE_RANGE_WRITE = 2


class _DurableWriter:
    """Writes to an unbuffered file whose bytes :meth:`sync` makes durable (fsync).

    Every :data:`_WRITEBACK` bytes it asks the kernel to start writing the new pages to disk
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, Linux; a hint, it waits for nothing), so the disk works
    while the next bytes are copied and the fsync at the end waits only for the last few MiB instead of
    the whole file. Durability still rests on the fsync alone.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.written, self._flushed = raw, 0, 0
        self._start_writeback = _sync_file_range()

    def __call__(self, view: memoryview) -> None:
        raw = self.raw
        while view:
            n = raw.write(view)
            self.written += n
            view = view[n:]
        if self._start_writeback is not None and self.written - self._flushed >= _WRITEBACK:
            if self._start_writeback(self.raw.fileno(), self._flushed, self.written - self._flushed,
                                     _SYNC_FILE_RANGE_WRITE) != 0:
                self._start_writeback = None  # not supported here (e.g. some FUSE filesystems): fsync only
            self._flushed = self.written

    def sync(self) -> None:
        os.fsync(self.raw.fileno())


def _writer(raw: BinaryIO) -> Callable[[memoryview], None]:
    """``write`` for an unbuffered file: all of each chunk, straight from the caller's buffer."""

    def write(view: memoryview) -> None:
        while view:
            view = view[raw.write(view):]

    return write


def _empty_bytes(size: int) -> torch.Tensor:
    """An uninitialised, writable uint8 CPU tensor of ``size`` bytes, cheap to fill.

    Fresh memory costs a page fault per 4 KiB page on first touch; for a large buffer that is more
    than reading the file into it (~45 ms per 100 MB on a VM, vs ~8 ms of copying). So large buffers
    are a private anonymous mapping advised for transparent huge pages (one fault per 2 MiB where the
    kernel allows it, THP "madvise" or "always"; plain pages otherwise). The tensor owns the mapping:
    it is unmapped when the last tensor viewing it is freed.
    """
    import torch

    if size >= _HUGE_PAGE_MIN and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError, ValueError):
            buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            with contextlib.suppress(OSError):
                buffer.madvise(mmap.MADV_HUGEPAGE)
            return torch.frombuffer(buffer, dtype=torch.uint8)
    return torch.empty(size, dtype=torch.uint8)


def _read_exact(src: BinaryIO, size: int, chunk: int, algorithm: str) -> tuple[torch.Tensor, FileEntry]:
    """Read ``src`` into one uninitialised uint8 tensor of ``size`` bytes, hashing as it arrives.

    The entry covers everything ``src`` holds, also past ``size`` (a longer file is damaged).
    """
    flat = _empty_bytes(size)
    view = memoryview(flat.numpy()).cast("B")
    hasher = _Hasher(algorithm)
    try:
        pos = 0
        while pos < size:
            n = src.readinto(view[pos:pos + chunk])
            if not n:
                break
            hasher.update(view[pos:pos + n])
            pos += n
        if pos == size:
            scratch = memoryview(bytearray(1 << 20))
            while n := src.readinto(scratch):
                hasher.update(bytes(scratch[:n]))
        return flat, hasher.entry()
    finally:
        hasher.close()


def _check_safetensors(label: str, name: str, src: Source) -> None:
    """Refuse a ``.safetensors`` file whose header is not a safetensors header (e.g. a renamed pickle)."""
    if isinstance(src, memoryview):
        head = bytes(src[:8])
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        body = bytes(src[8:8 + length]) if 0 < length <= _MAX_SAFETENSORS_HEADER else b""
    else:
        head = src.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        body = src.read(length) if 0 < length <= _MAX_SAFETENSORS_HEADER else b""
        src.seek(0)
    try:
        ok = len(body) == length and isinstance(json.loads(body), dict)
    except ValueError:
        ok = False
    if not ok:
        raise StoreError(f"publish {label}: {name!r} is not a valid safetensors file (bad header); save weights "
                         "with safetensors.torch.save_file (safetensors only, no pickle)")


def _tensors_from_buffer(flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in the uint8 tensor ``flat``, as views into it (no copy).

    Validates like safetensors itself: known dtypes, sizes matching shapes, data contiguous and covering
    the buffer exactly. Raises ``ValueError`` on any malformation.
    """
    import torch

    total = flat.numel()
    raw = flat.numpy()
    n = int.from_bytes(bytes(raw[:8]), "little") if total >= 8 else -1
    if not 0 < n <= min(_MAX_SAFETENSORS_HEADER, total - 8):
        raise ValueError(f"header length {n} does not fit the file's {total} bytes")
    try:
        header = json.loads(bytes(raw[8:8 + n]))
    except ValueError as exc:
        raise ValueError(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    base, size = 8 + n, total - 8 - n
    tensors, spans = {}, []
    for key, info in header.items():
        try:
            dtype = getattr(torch, _DTYPES[info["dtype"]])
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"tensor {key!r} has a malformed or unsupported entry {info!r}") from None
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= size or \
                end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {key!r}: offsets {begin}..{end} do not fit its shape {shape} "
                             f"{info['dtype']} or the {size} data bytes")
        spans.append((begin, end))
        if begin == end:
            tensors[key] = torch.empty(shape, dtype=dtype)
            continue
        part = flat[base + begin:base + end]
        if (base + begin) % dtype.itemsize:
            part = part.clone()  # unaligned (unusual writer): copy this tensor
        tensors[key] = part.view(dtype).view(shape)
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise ValueError(f"tensor data overlaps or leaves a gap at byte {pos}")
        pos = end
    if pos != size:
        raise ValueError(f"{size - pos} bytes after the last tensor")
    if sys.byteorder == "big":  # pragma: no cover - safetensors is little-endian
        tensors = {k: torch.from_numpy(t.numpy().byteswap()) for k, t in tensors.items()}
    return tensors


def _mismatch(where: str, expected: FileEntry, got: FileEntry) -> StoreIntegrityError:
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


def _disk_full(path: Path, need: int | None, fix: str) -> str:
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
                if _stream(f, entry.algorithm) != entry:
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


# ---- the store -------------------------------------------------------------------------------------


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
        self.digest = _check_digest(digest)
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
        self._chunk = store_s3.READ_SIZE if self._s3 is not None else 0  # 0: _CHUNK
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
            return StoreFullError(f"{message}; {_disk_full(where, need, fix)}")
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
        return kind_dir / _staging_name(posixpath.basename(name))

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
            with _source(label, name, value) as src:
                if name.lower().endswith(".safetensors"):
                    _check_safetensors(label, name, src)
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
            with _source(label, name, value) as src:
                entries[name] = _stream(src, algorithm)
        return entries

    def _copy_source(self, label: str, name: str, value: bytes | Path, write: Callable[[memoryview], Any]) -> FileEntry:
        with _source(label, name, value) as src:
            before = _signature(src)
            entry = _stream(src, self.digest, write)
            if before is not None and (_signature(src) != before or entry.size != before[0]):
                raise StoreError(f"publish {label}: source of {name!r} changed while it was being published; retry")
        return entry

    def _adopt(self, label: str, name: str, value: Path, path: Path) -> FileEntry:
        """Hash ``value`` in place, make it durable and rename it to ``path`` (same filesystem): no copy."""
        with _source(label, name, value) as src:
            before = _signature(src)
            entry = _stream(src, self.digest)
            os.fsync(src.fileno())
            if _signature(src) != before or entry.size != before[0]:  # type: ignore[index]
                raise StoreError(f"publish {label}: source of {name!r} changed while it was being published; retry")
        os.rename(value, path)
        return entry

    def _publish_local(self, kind: str, version: int, files: Mapping[str, bytes | Path],
                       metadata: dict[str, Any], move: bool = False) -> Manifest:
        label, target = f"{kind} v{version}", self._version_dir(kind, version)
        staging = Path(self._kind_dir(kind)) / _staging_name()
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
                        writer = _DurableWriter(dst)
                        entries[name] = self._copy_source(label, name, value, writer)
                        writer.sync()
                os.chmod(path, _READ_ONLY)  # published files never change (fetch may hand out hard links)
            manifest = Manifest(kind, version, entries, metadata, time.time())
            with open(staging / MANIFEST, "wb", buffering=0) as dst:  # durable before the rename makes it visible
                _writer(dst)(memoryview(manifest.to_json().encode()))
                os.fsync(dst.fileno())
            with self._lock(kind):
                existing = self._read_manifest(kind, version)
                if existing is not None:  # a concurrent publisher of the same version won
                    return self._same_or_raise(label, files, existing, entries)
                if os.path.lexists(target):  # an incomplete leftover: move it out of the way, then drop it
                    leftover = Path(self._kind_dir(kind)) / _staging_name()
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
        tmp = f"{self._kind_dir(kind)}/{_staging_name()}"
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
        got = _digest(entry.algorithm, data)
        if got != entry:
            raise _mismatch(f"{kind} v{version}/{name}", entry, got)
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
                flat, got = _read_exact(src, entry.size, self._chunk or _CHUNK, entry.algorithm)
        except FileNotFoundError:
            raise self._missing(kind, version, name) from None
        except OSError as exc:
            raise self._failure(f"read {kind} v{version}/{name} from {self.uri}", exc) from exc
        if got != entry:
            raise _mismatch(f"{kind} v{version}/{name}", entry, got)
        try:
            return _tensors_from_buffer(flat)
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
                            got = _stream(src, entry.algorithm)
                    else:
                        with self._open_read(source) as src, open(path, "wb", buffering=0) as dst:
                            got = _stream(src, entry.algorithm, _writer(dst), self._chunk)
                except FileNotFoundError:
                    if not path.parent.is_dir():
                        raise
                    raise self._missing(kind, version, name) from None
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
            if (self.local and staging and _writer_alive(name) is False) or (
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
