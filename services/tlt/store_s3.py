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

Transient failures are retried with capped exponential backoff and jitter (:func:`backoff`): throttling
(503 SlowDown and the other throttling codes, 429), 500/502/503/504, S3's 400 RequestTimeout, dropped or
reset connections and read timeouts, on every request the store makes (PUT, multipart create / part /
complete / abort, GET, HEAD, LIST, DELETE). A large download that breaks off mid-body resumes where it
stopped (:class:`StreamReader`, same policy); a small object read whole (manifest, LATEST, ``read_bytes``)
is read again by s3fs (5 tries, its own backoff). The policy lives in botocore's own retry hook
(``needs-retry``) on the session the store's s3fs client is made from (:func:`retrying_session`), so it
covers s3fs's internal calls too; botocore's built-in retries are off so attempts do not multiply.
Permanent errors (403 AccessDenied, 404 NoSuchBucket / NoSuchKey, other 4xx) are never retried. A request
still failing after :data:`RETRY_ATTEMPTS` tries, or :data:`RETRY_BUDGET_S` seconds, raises
:class:`S3RetryError` naming the operation, the object and the last cause, which the store reports as its
own error (:meth:`S3Target.translate`). Retries are logged (warnings of this module's logger).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import datetime
from functools import cache
from typing import Any

from tlt.errors import TLTError

PROTOCOLS = ("s3", "s3a")
PART_SIZE = 8 << 20  # multipart part size (doubling every 1000 parts, so 10000 parts hold > 5 TB);
# 8-16 MiB x 4 in flight uploaded 100 MB 1.5-1.7x faster than sequential 64 MiB parts (moto)
UPLOAD_CONCURRENCY = 4  # parts uploaded at once
READ_SIZE = 8 << 20  # bytes taken from the download stream at a time (hashed and written while the next arrive)
ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")

# Retries of transient failures. S3 answers load with 503 SlowDown and asks for exponential backoff with
# jitter (partitions scale up within seconds to minutes; jitter keeps the 4 concurrent part uploads and
# other pods from retrying in lockstep); MinIO / Ceph RGW restarts and load-balancer failovers last a few
# seconds. 6 tries with delays doubling from 0.25 s (capped at 8 s, "equal jitter": half fixed, half random)
# wait 3.9-7.75 s in all: a restart or a throttling burst is ridden out, while a broken endpoint still
# fails within ~10 s plus the attempts' own time. The budget bounds that own time (each try can take a
# whole read timeout): no retry starts once it would end past it.
RETRY_ATTEMPTS = 6  # tries per request (or per block of a download), the first included
RETRY_BASE_S = 0.25  # the first retry's delay cap; doubled for each further retry
RETRY_MAX_DELAY_S = 8.0  # cap of any one delay
RETRY_BUDGET_S = 60.0  # no retry once it would start this long after the request's first try
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_CODES = frozenset({  # S3 error codes that mean "try again" whatever the status (throttling, timeouts)
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable", "PriorRequestNotComplete"})

logger = logging.getLogger(__name__)


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
    environment as it is when the store is made. Transient failures are retried by this module's policy
    (a :func:`retrying_session`) unless the caller passes its own ``session`` or botocore
    ``config_kwargs["retries"]``, which are then used as given.
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
    config = dict(opts.get("config_kwargs") or {})
    if "retries" not in config and "session" not in opts:  # the caller's own botocore retries or session win
        # botocore's retries off, the session's policy replaces them ("standard": its handler, unlike the
        # "legacy" one, never raises from the retry hook, which would cut the session's retries short)
        config["retries"] = {"mode": "standard", "total_max_attempts": 1}
        opts["config_kwargs"] = config
        opts["session"] = retrying_session(opts.pop("profile", None))
    return opts, endpoint


class S3RetryError(Exception):
    """A transient S3 failure that outlasted the retries: names the operation, the object and the last cause."""

    def __init__(self, operation: str, bucket: str, key: str, attempts: int, elapsed: float, cause: str,
                 unreachable: bool = False) -> None:
        self.operation, self.bucket, self.key, self.attempts, self.cause = operation, bucket, key, attempts, cause
        self.unreachable = unreachable  # the endpoint never answered (connection refused, connect timeout)
        target = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
        super().__init__(f"S3 {operation} {target} failed {attempts} times in {elapsed:.1f} s (transient errors "
                         f"are retried with backoff); the last: {cause}")


def backoff(retry: int) -> float:
    """Seconds to wait before retry number ``retry`` (1 = the first): a capped doubling, half of it random."""
    cap = min(RETRY_MAX_DELAY_S, RETRY_BASE_S * 2 ** (retry - 1))
    return cap / 2 + random.uniform(0, cap / 2)


def retry_delay(operation: str, bucket: str, key: str, attempts: int, started: float, cause: str,
                unreachable: bool = False, error: BaseException | None = None) -> float:
    """The delay before retrying a request whose try number ``attempts`` failed transiently with ``cause``.

    ``started`` is the first try's :func:`time.monotonic`. Raises :class:`S3RetryError` (from
    ``error``) when the tries or the time budget are used up.
    """
    elapsed, delay = time.monotonic() - started, backoff(attempts)
    if attempts >= RETRY_ATTEMPTS or elapsed + delay > RETRY_BUDGET_S:
        raise S3RetryError(operation, bucket, key, attempts, elapsed, cause, unreachable) from error
    logger.warning("S3 %s s3://%s/%s failed (%s); retry %d of %d in %.2f s", operation, bucket, key, cause,
                   attempts, RETRY_ATTEMPTS - 1, delay)
    return delay


def transient_cause(response: Any = None, error: BaseException | None = None) -> tuple[str, bool] | None:
    """If a request's outcome is worth retrying: why, and whether the endpoint was unreachable; else None.

    ``response`` is botocore's ``(http_response, parsed)``, ``error`` the exception the request raised.
    """
    import botocore.exceptions as bx

    if error is not None:
        if isinstance(error, bx.SSLError) or not isinstance(
                error, (bx.ConnectionError, bx.HTTPClientError, ConnectionError, TimeoutError)):
            return None  # a bad certificate, credentials, parameters: retrying cannot help
        return _describe(error), _unreachable(error)
    if response is None:
        return None
    http, parsed = response
    fault = (parsed or {}).get("Error") or {}
    code = str(fault.get("Code") or "")
    if http.status_code not in RETRY_STATUSES and code not in RETRY_CODES:
        return None
    words = [f"HTTP {http.status_code}", *([code] if code and code != str(http.status_code) else [])]
    message = fault.get("Message") or ""
    return " ".join(words) + (f": {message}" if message else ""), False


def _describe(error: BaseException) -> str:
    """``Type: message`` of an exception, with what it wraps (botocore's ``error``, or its cause where it
    says nothing itself, e.g. a bare timeout)."""
    text = f"{type(error).__name__}: {error}".rstrip(": ")
    inner = getattr(error, "kwargs", {}).get("error")
    if not isinstance(inner, BaseException) and not str(error):
        inner = error.__cause__ or error.__context__
    return f"{text} ({_describe(inner)})" if isinstance(inner, BaseException) else text


def _unreachable(error: BaseException) -> bool:
    """Whether ``error`` says no connection to the endpoint could be made (not one that broke off later)."""
    import aiohttp
    import botocore.exceptions as bx

    if isinstance(error, bx.ConnectTimeoutError):
        return True
    inner = getattr(error, "kwargs", {}).get("error")
    return isinstance(error, bx.EndpointConnectionError) and (
        inner is None or isinstance(inner, (aiohttp.ClientConnectorError, socket.gaierror)))


def _remember_request(params: Mapping[str, Any], context: dict[str, Any], model: Any, **_: Any) -> None:
    """botocore ``before-parameter-build`` hook: note the operation, object and start for the retry hook."""
    context["tlt_s3_request"] = (model.name, str(params.get("Bucket", "")), str(params.get("Key", "")),
                                 time.monotonic())


def _needs_retry(attempts: int, operation: Any, request_dict: Mapping[str, Any], response: Any = None,
                 caught_exception: BaseException | None = None, **_: Any) -> float | None:
    """botocore ``needs-retry`` hook: seconds to wait before the next try, or None (success, permanent error)."""
    found = transient_cause(response, caught_exception)
    if found is None:
        return None
    name, bucket, key, started = (request_dict.get("context") or {}).get("tlt_s3_request") or (
        operation.name, "?", "", time.monotonic())
    return retry_delay(name, bucket, key, attempts, started, *found, error=caught_exception)


@cache
def _session_class() -> type:
    from aiobotocore.session import AioSession

    class RetryingSession(AioSession):  # type: ignore[misc]
        """An aiobotocore session whose clients retry by this module's policy; pickles as a fresh one."""

        def __init__(self, profile: str | None = None) -> None:
            super().__init__(profile=profile)
            self.tlt_profile = profile
            self.register("before-parameter-build.s3", _remember_request, unique_id="tlt-s3-remember-request")
            self.register("needs-retry.s3", _needs_retry, unique_id="tlt-s3-needs-retry")

        def __reduce__(self) -> tuple[Any, ...]:
            return retrying_session, (self.tlt_profile,)

    return RetryingSession


def retrying_session(profile: str | None = None) -> Any:
    """An aiobotocore session (for s3fs's ``session`` option) whose S3 clients retry transient failures.

    Its clients must have botocore's own retries off (``config_kwargs={"retries": {"mode": "standard",
    "total_max_attempts": 1}}``), as :func:`storage_options` sets, or the two policies interfere.
    """
    return _session_class()(profile)


@cache
def _body_errors() -> tuple[type[BaseException], ...]:
    """What a response body's reader raises when the transfer breaks off (reset, cut short, timed out)."""
    import aiohttp
    import botocore.exceptions as bx

    return (bx.ResponseStreamingError, bx.ReadTimeoutError, bx.IncompleteReadError, aiohttp.ClientPayloadError,
            ConnectionError, TimeoutError)


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
        if isinstance(exc, S3RetryError) and not exc.unreachable:
            return self._error(f"{exc} (store {self.uri}, {self.where}): the service is overloaded or failing; "
                               "retry later")
        if isinstance(exc, bx.FlexibleChecksumError):
            return self._error(
                f"the S3 {self.where} sent bytes for store {self.uri} that do not match the checksum stored with "
                f"the object ({exc}): corrupted in transit or in storage, and not used; retry, and if it persists "
                "restore the object or publish a new version")
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return self._error(
                f"no usable S3 credentials for {self.uri} at {self.where} ({exc}): set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary credentials) in the environment")
        if isinstance(exc, (bx.ConnectionError, S3RetryError)):
            return self._error(
                f"cannot reach the S3 {self.where} for store {self.uri}: {exc}; check that the server runs and "
                "that AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (or storage_options endpoint_url) point at it")
        if isinstance(exc, (bx.HTTPClientError, *_body_errors())):
            return self._error(f"the connection to the S3 {self.where} for store {self.uri} broke off mid-request: "
                               f"{_describe(exc)}; retry later")
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

    ``part_size`` and ``concurrency`` default to :data:`PART_SIZE` and :data:`UPLOAD_CONCURRENCY`.

    Smaller objects go up as one PUT. Nothing is visible under the key until :meth:`close` completes
    the upload; leaving the ``with`` block on an exception aborts it (a killed process leaves an
    invisible upload that :meth:`S3Target.abort_stale_uploads` removes).
    """

    def __init__(self, fs: Any, path: str, part_size: int | None = None, concurrency: int | None = None) -> None:
        self.fs, self.path = fs, path
        self.part_size, self.concurrency = part_size or PART_SIZE, concurrency or UPLOAD_CONCURRENCY
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
    every range). If the transfer breaks off (reset, cut short, read timeout), reading resumes at the
    current offset with a ranged GET pinned to the object's ETag, after a backoff, up to
    :data:`RETRY_ATTEMPTS` tries per block; then :class:`S3RetryError`.
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
        from fsspec.asyn import sync

        view = memoryview(buffer).cast("B")
        attempts, started = 0, time.monotonic()
        while True:
            try:
                n = sync(self.fs.loop, self._fill, view)
            except _body_errors() as exc:
                attempts += 1
                self._close_body()
                time.sleep(retry_delay("GetObject", self.bucket, self.key, attempts, started,
                                       f"the download broke off after byte {self.pos} of {self.size} "
                                       f"({_describe(exc)})", error=exc))
                self._get()  # resume at self.pos: this block is read again from its start
                continue
            self.pos += n
            return n

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
