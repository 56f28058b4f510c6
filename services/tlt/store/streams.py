"""Streaming bytes in and out of the store: every byte read once and hashed as it passes, durable
writes that start disk write-back early, buffers cheap to fill."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import mmap
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import xxhash

from tlt.store.errors import StoreError
from tlt.store.manifest import FileEntry

if TYPE_CHECKING:
    import torch

_SLOW_DIGESTS = frozenset({"sha256"})  # hashed on a helper thread, overlapping the I/O (cheap ones inline)
CHUNK = 1 << 20  # local read/write size (cache-sized: read, hashed and written while hot)
_THREADED_HASH_MIN = 256 << 10  # chunks of a slow digest at least this large are hashed on a helper thread
_WRITEBACK = 8 << 20  # publish starts writing back to disk every this many bytes, so the final fsync is short
_HUGE_PAGE_MIN = 4 << 20  # load_tensors buffers at least this large are mapped for transparent huge pages


Source = memoryview | BinaryIO  # what publish streams from: the caller's bytes (no copy) or an open file


@contextlib.contextmanager
def open_source(label: str, name: str, value: bytes | Path) -> Iterator[Source]:
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


def file_signature(src: Source) -> tuple[int, int] | None:
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


def _new_hash(algorithm: str) -> Any:
    return hashlib.sha256() if algorithm == "sha256" else xxhash.xxh3_128()


def digest_of(algorithm: str, data: bytes | memoryview) -> FileEntry:
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


def hash_stream(src: Source, algorithm: str, write: Callable[[memoryview], Any] | None = None,
            chunk: int | None = None) -> FileEntry:
    """Stream ``src`` (into ``write`` if given) and return its size and checksum; every byte is read once.

    Two buffers alternate, so with a threaded digest chunk i is hashed (helper thread) while it is written
    and chunk i+1 read.
    """
    chunk = chunk or CHUNK
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
def sync_file_range() -> Callable[[int, int, int, int], int] | None:
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


class DurableWriter:
    """Writes to an unbuffered file whose bytes :meth:`sync` makes durable (fsync).

    Every :data:`_WRITEBACK` bytes it asks the kernel to start writing the new pages to disk
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, Linux; a hint, it waits for nothing), so the disk works
    while the next bytes are copied and the fsync at the end waits only for the last few MiB instead of
    the whole file. Durability still rests on the fsync alone.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.written, self._flushed = raw, 0, 0
        self._start_writeback = sync_file_range()

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


def unbuffered_writer(raw: BinaryIO) -> Callable[[memoryview], None]:
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


def read_exact(src: BinaryIO, size: int, chunk: int, algorithm: str) -> tuple[torch.Tensor, FileEntry]:
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
