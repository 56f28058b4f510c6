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

from tlt.store.artifact_store import ALLOWED_SUFFIXES, LATEST, LOCK, MAX_VERSION, ArtifactStore
from tlt.store.errors import (
    StoreError,
    StoreFullError,
    StoreIntegrityError,
    UnknownDigestError,
    VersionExistsError,
    VersionNotFoundError,
)
from tlt.store.manifest import DEFAULT_DIGEST, DIGESTS, MANIFEST, FileEntry, Manifest
from tlt.store.staging import STAGING_PREFIX

__all__ = [
    "ALLOWED_SUFFIXES", "DEFAULT_DIGEST", "DIGESTS", "LATEST", "LOCK", "MANIFEST", "MAX_VERSION", "STAGING_PREFIX",
    "ArtifactStore", "FileEntry", "Manifest", "StoreError", "StoreFullError", "StoreIntegrityError",
    "UnknownDigestError", "VersionExistsError", "VersionNotFoundError",
]
