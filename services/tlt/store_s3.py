"""S3 specifics of :class:`tlt.store.ArtifactStore`: options from the environment, the bucket check, error
messages, and streaming transfers.

The store talks to S3 (AWS, MinIO, Ceph RGW, moto, ...) through s3fs. Credentials come from the standard
environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``; botocore also reads
its config files and instance roles), the region from ``AWS_DEFAULT_REGION`` (or ``AWS_REGION``), and a
custom endpoint from ``storage_options={"endpoint_url": ...}``, else ``AWS_ENDPOINT_URL_S3``, else
``AWS_ENDPOINT_URL``.

Transfers stream: an object of at least :data:`PART_SIZE` bytes goes up as a multipart upload with
:data:`UPLOAD_CONCURRENCY` parts in flight (:class:`MultipartWriter`), and every object comes back with
one streaming GET read :data:`READ_SIZE` bytes at a time (:class:`StreamReader`). A 1 GB file is never
held in memory whole: uploads hold at most (concurrency + 1) parts, downloads one block.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import datetime
from typing import Any

from tlt.errors import TLTError

PROTOCOLS = ("s3", "s3a")
PART_SIZE = 8 << 20  # multipart part size (doubling every 1000 parts, so 10000 parts hold > 5 TB);
# 8-16 MiB x 4 in flight uploaded 100 MB 1.5-1.7x faster than sequential 64 MiB parts (moto)
UPLOAD_CONCURRENCY = 4  # parts uploaded at once
READ_SIZE = 8 << 20  # bytes taken from the download stream at a time (hashed and written while the next arrive)
READ_RETRIES = 3  # a dropped download resumes where it stopped, this many times
ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def is_s3(uri: str) -> bool:
    """Whether ``uri`` names an S3 location (``s3://bucket/prefix``)."""
    return uri.split("://", 1)[0].lower() in PROTOCOLS if "://" in uri else False


def endpoint_from_env() -> str:
    """The custom endpoint the environment names (``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``), or ''."""
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return ""
    return next((os.environ[v].strip() for v in ENDPOINT_VARS if os.environ.get(v, "").strip()), "")


def storage_options(options: Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
    """s3fs options for a store: ``options`` completed from the environment; also returns the endpoint ('' = AWS).

    An explicit ``endpoint_url`` (top level or in ``client_kwargs``) wins over the environment. Listing
    caches are off (other processes publish) and each store gets its own client, so it sees the
    environment as it is when the store is made.
    """
    opts = dict(options or {})
    client_kwargs = dict(opts.get("client_kwargs") or {})
    endpoint = str(opts.get("endpoint_url") or client_kwargs.get("endpoint_url") or endpoint_from_env())
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = client_kwargs.get("region_name") or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    opts.setdefault("use_listings_cache", False)
    opts.setdefault("skip_instance_cache", True)
    return opts, endpoint


class S3Target:
    """Which bucket and endpoint a store uses: checks the bucket once and turns S3 failures into clear errors."""

    def __init__(self, uri: str, root: str, endpoint: str, error_cls: type[TLTError]) -> None:
        self.uri, self.bucket, self.endpoint, self._error = uri, root.split("/", 1)[0], endpoint, error_cls
        self._bucket_ok = False

    @property
    def where(self) -> str:
        return f"endpoint {self.endpoint}" if self.endpoint else "the default AWS S3 endpoint"

    def missing_bucket(self) -> TLTError:
        return self._error(
            f"S3 bucket {self.bucket!r} does not exist at {self.where} (store {self.uri}): create it "
            f"(e.g. `aws s3 mb s3://{self.bucket}`, or in the MinIO console), or set store.uri to an existing bucket")

    def ensure_bucket(self, fs: Any) -> None:
        """Raise a clear error if the bucket is missing or the endpoint unreachable (checked once per store)."""
        if self._bucket_ok:
            return
        try:
            fs.call_s3("head_bucket", Bucket=self.bucket)
        except FileNotFoundError:
            raise self.missing_bucket() from None
        except PermissionError:
            pass  # HEAD bucket needs s3:ListBucket; a prefix-scoped policy may still allow the object calls
        except Exception as exc:
            raise (self.translate(exc) or exc) from exc
        self._bucket_ok = True

    def translate(self, exc: BaseException) -> TLTError | None:
        """A clear error for an S3 failure (credentials, endpoint, bucket, permission), or None if not one."""
        import botocore.exceptions as bx

        if isinstance(exc, self._error):
            return None
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return self._error(
                f"no usable S3 credentials for {self.uri} at {self.where} ({exc}): set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary credentials) in the environment")
        if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError)):
            return self._error(
                f"cannot reach the S3 {self.where} for store {self.uri}: {exc}; check that the server runs and "
                "that AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (or storage_options endpoint_url) point at it")
        if isinstance(exc, FileNotFoundError) and "bucket" in str(exc).lower():
            self._bucket_ok = False
            return self.missing_bucket()
        if isinstance(exc, PermissionError):
            return self._error(
                f"S3 {self.where} refused access to s3://{self.bucket} for store {self.uri}: {exc}; check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN and the bucket's policy")
        if isinstance(exc, (bx.BotoCoreError, bx.ClientError)):
            return self._error(f"S3 request to {self.where} for store {self.uri} failed: {exc}")
        return None

    def abort_stale_uploads(self, fs: Any, prefix: str, stale_after_s: float) -> int:
        """Abort multipart uploads under ``prefix`` (bucket-relative) older than ``stale_after_s``; returns the count.

        A publisher killed mid-upload leaves its parts stored (and billed) but invisible.
        """
        now, aborted = time.time(), 0
        with contextlib.suppress(Exception):  # best effort: some S3 clones do not list uploads
            uploads = fs.call_s3("list_multipart_uploads", Bucket=self.bucket, Prefix=prefix).get("Uploads", [])
            for upload in uploads:
                started = upload.get("Initiated")
                started = started.timestamp() if isinstance(started, datetime) else None
                if started is not None and now - started >= stale_after_s:
                    fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=upload["Key"],
                               UploadId=upload["UploadId"])
                    aborted += 1
        return aborted


class MultipartWriter:
    """A write-only S3 object: buffered into ``part_size`` parts uploaded concurrently, committed on close.

    Smaller objects go up as one PUT. Nothing is visible under the key until :meth:`close` completes
    the upload; leaving the ``with`` block on an exception aborts it (a killed process leaves an
    invisible upload that :meth:`S3Target.abort_stale_uploads` removes).
    """

    def __init__(self, fs: Any, path: str, part_size: int = PART_SIZE,
                 concurrency: int = UPLOAD_CONCURRENCY) -> None:
        self.fs, self.path, self.part_size, self.concurrency = fs, path, part_size, concurrency
        self.bucket, self.key = fs.split_path(path)[:2]
        self._buf = bytearray()
        self._parts: list[Future[dict[str, Any]]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._upload_id: str | None = None
        self._closed = False

    def write(self, data: bytes | memoryview) -> int:
        self._buf += data
        while len(self._buf) >= (size := self.part_size << (len(self._parts) // 1000)):
            if len(self._buf) == size:
                part, self._buf = self._buf, bytearray()  # hand the buffer over: no copy
            else:
                part = self._buf[:size]
                del self._buf[:size]
            self._send(part)
        return len(data)

    def _send(self, part: bytearray) -> None:
        if self._upload_id is None:
            self._upload_id = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)["UploadId"]
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="tlt-s3-upload")
        while len(running := [f for f in self._parts if not f.done()]) >= self.concurrency:
            wait(running, return_when=FIRST_COMPLETED)  # bounds the memory in flight
        for done in self._parts:
            if done.done() and done.exception() is not None:
                raise done.exception()  # type: ignore[misc]
        assert self._pool is not None
        self._parts.append(self._pool.submit(self._upload_part, len(self._parts) + 1, part))

    def _upload_part(self, number: int, data: bytearray) -> dict[str, Any]:
        out = self.fs.call_s3("upload_part", Bucket=self.bucket, Key=self.key, UploadId=self._upload_id,
                              PartNumber=number, Body=data)
        return {"PartNumber": number, "ETag": out["ETag"],
                **{k: v for k, v in out.items() if k.startswith("Checksum") and k != "ChecksumType"}}

    def close(self) -> None:
        """Upload what is left and commit the object."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._upload_id is None:
                self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=bytes(self._buf))
            else:
                if self._buf:
                    self._send(self._buf)
                parts = [f.result() for f in self._parts]
                self.fs.call_s3("complete_multipart_upload", Bucket=self.bucket, Key=self.key,
                                UploadId=self._upload_id, MultipartUpload={"Parts": parts})
        except BaseException:
            self.abort()
            raise
        finally:
            self._buf = bytearray()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self.fs.invalidate_cache(self.path)

    def abort(self) -> None:
        """Drop the upload (best effort); nothing becomes visible."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._upload_id is not None:
            with contextlib.suppress(Exception):
                self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self._upload_id)

    def __enter__(self) -> MultipartWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class StreamReader:
    """A read-only S3 object fetched with one streaming GET and read block by block (``readinto``).

    One request per object (ranged GETs cost a request each, and some servers re-read the object for
    every range). If the connection drops, reading resumes at the current offset with a ranged GET
    pinned to the object's ETag, up to :data:`READ_RETRIES` times.
    """

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path
        self.bucket, self.key = fs.split_path(path)[:2]
        self.pos, self.size = 0, 0
        self._etag: str | None = None
        self._body: Any = None
        self._get()

    def _get(self) -> None:
        kwargs: dict[str, Any] = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        if self._etag:
            kwargs["IfMatch"] = self._etag
        response = self.fs.call_s3("get_object", Bucket=self.bucket, Key=self.key, **kwargs)
        if not self.pos:
            self.size, self._etag = int(response["ContentLength"]), response.get("ETag")
        self._body = response["Body"]

    async def _fill(self, view: memoryview) -> int:
        filled = 0
        while filled < len(view):
            n = await self._body.readinto(view[filled:])
            if not n:
                break
            filled += n
        return filled

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` (fewer bytes only at the end of the object); returns the count."""
        import botocore.exceptions as bx
        from fsspec.asyn import sync

        view = memoryview(buffer).cast("B")
        for attempt in itertools.count(1):
            try:
                n = sync(self.fs.loop, self._fill, view)
            except (bx.ResponseStreamingError, bx.ReadTimeoutError, bx.IncompleteReadError, ConnectionError):
                if attempt >= READ_RETRIES:
                    raise
                self._close_body()
                self._get()  # resume at self.pos: this block is read again from its start
                continue
            self.pos += n
            return n
        raise AssertionError  # pragma: no cover

    def tell(self) -> int:
        return self.pos

    def _close_body(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None

    def close(self) -> None:
        self._close_body()

    def __enter__(self) -> StreamReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
