"""Moving a policy version from trainer to rollout through the ArtifactStore vs plain copies.

A policy version is one safetensors file of N bytes (random bf16 tensors with the shapes of a
transformer's layers). The trainer side starts from that file on local disk, the rollout side ends
with either a local copy (fetch) or the weights copied into its model (load). Arms:

    plain copy                shutil.copyfile(src, dst)                 (baseline of the fetch arms)
    2 copies, 1st fsynced     copyfile(src, mid) + fsync(mid), copyfile(mid, dst): the I/O any store on the
                              same disk must do (a durable publish, then a copy out); no checksums
    copy + 2x <digest>        hash(src), copyfile, hash(dst)  (one copy, both checksums)
    file:// publish+fetch     store.publish(src), store.fetch(version, dir)  (publish copies src in)
    file:// move+fetch        the trainer's path: src is a store.scratch_path() file (put there untimed),
                              store.publish(move=True) hashes, fsyncs and renames it in; fetch copies out
    file:// move+fetch(link)  the same, fetch(link=True): hard links for read-only consumers, no copy
    plain copy + load         copyfile, safetensors load_file(dst), copy into the model (baseline)
    file:// publish+load      store.publish(src), store.load_tensors(version), copy into the model
    file:// move+load         the trainer's and rollout's real path: publish(move=True), load_tensors
    boto3 upload+download     boto3 upload_file + get_object to a file  (baseline of s3:// fetch)
    s3:// publish+fetch       the store on s3:// (a moto server the benchmark starts, or --s3-endpoint)
    boto3 upload+load         boto3 upload_file + get_object + safetensors load (baseline of s3:// load)
    s3:// publish+load        store.publish(src), store.load_tensors(version) on s3://

The store does more than a copy: it hashes every byte on publish and again on every read (--digest:
xxh3_128, the store's default, > 10 GB/s a core; sha256, ~1-1.5 GB/s a core, shows what the cryptographic
option costs), makes what it publishes durable (fsync) and publishes atomically, and a version travels
twice on one machine (trainer -> store on publish, store -> rollout on fetch) where the baseline copies
once: "2 copies, 1st fsynced" is that I/O alone, the floor of any store-mediated transfer on one disk.
Ratio = store time / plain time of the same size, best of --repeats runs each (arms interleaved).
The goal for file:// is a ratio <= 1.5 on the path TLT takes (move+load: the trainer writes its file
on the store's filesystem and the rollout loads straight from the store); the copy-publish arms show
what a producer that cannot write there pays. --cold evicts the files from the page cache before each step, so
both sides read from disk (as a rollout on another machine would).

    python benchmarks/transport.py            # 100 MB and 1 GB
    python benchmarks/transport.py --quick    # 100 MB only, fewer repeats (< 1 min)
    python benchmarks/transport.py --quick --digest sha256   # the store publishing sha256 manifests
    python benchmarks/transport.py --cold --no-s3    # disk-bound file:// arms
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import xxhash

from tlt.store import DEFAULT_DIGEST, DIGESTS

MB = 1_000_000


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 MB only, 3 repeats (2 on s3://)")
    ap.add_argument("--sizes", default=None, help="comma-separated sizes in MB (default 100,1000; --quick 100)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs per arm, the best counts (default 5, 3 on s3://; --quick 3, 2 on s3://)")
    ap.add_argument("--hidden", type=int, default=2048, help="hidden size of the fake model's layers")
    ap.add_argument("--no-s3", action="store_true", help="skip the s3:// arms")
    ap.add_argument("--digest", default=DEFAULT_DIGEST, choices=DIGESTS,
                    help=f"checksum the store publishes with, and the floor arm hashes with (default {DEFAULT_DIGEST})")
    ap.add_argument("--cold", action="store_true",
                    help="evict the benchmark's files from the page cache before each timed step (disk-bound)")
    ap.add_argument("--s3-endpoint", default="", help="use this S3 endpoint (and existing --bucket) instead of moto")
    ap.add_argument("--bucket", default="tlt-bench")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    return ap.parse_args()


def make_weights(path: Path, size: int, hidden: int) -> int:
    """Write ~``size`` bytes of random bf16 safetensors with transformer-layer shapes; returns tensor count."""
    from safetensors.torch import save_file

    inter = hidden * 11 // 4
    layer = {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (hidden // 4, hidden),
             "self_attn.v_proj.weight": (hidden // 4, hidden), "self_attn.o_proj.weight": (hidden, hidden),
             "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
             "mlp.down_proj.weight": (hidden, inter), "input_layernorm.weight": (hidden,),
             "post_attention_layernorm.weight": (hidden,)}
    layer_bytes = 2 * sum(torch.Size(shape).numel() for shape in layer.values())
    shapes, total = {}, 0
    while total + layer_bytes <= size:
        shapes |= {f"model.layers.{len(shapes) // len(layer)}.{name}": shape for name, shape in layer.items()}
        total += layer_bytes
    if rows := (size - total) // (2 * hidden):  # the rest: an embedding-like block
        shapes["lm_head.weight"] = (rows, hidden)
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
               for name, shape in shapes.items()}
    save_file(tensors, str(path))
    return len(tensors)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server on a free local port; yields its endpoint."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = Path(sys.executable).parent / "moto_server"
    exe = str(exe) if exe.exists() else shutil.which("moto_server")
    if not exe:
        raise SystemExit("moto_server not found: pip install 'moto[server]', or pass --s3-endpoint / --no-s3")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"moto_server did not start on {endpoint}") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def rm(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def evict(root: Path) -> None:
    """Drop the files under ``root`` from the page cache (written back first), so the next reads hit the disk."""
    os.sync()
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class Arm:
    """One way of moving the version: a trainer step, a rollout step (both timed), an untimed cleanup."""

    cold_root: Path | None = None  # set by --cold: evict this tree before each timed step

    def __init__(self, name: str, trainer: Callable[[int], object], rollout: Callable[[int], object] | None,
                 cleanup: Callable[[int], None], baseline: str | None = None,
                 prepare: Callable[[int], object] | None = None) -> None:
        self.name, self.trainer, self.rollout, self.cleanup, self.baseline = name, trainer, rollout, cleanup, baseline
        self.prepare = prepare  # untimed: puts the trainer's file where this arm's trainer starts from
        self.best = (float("inf"), float("inf"))

    def run(self, i: int) -> None:
        if self.prepare:
            self.prepare(i)
            os.sync()  # as clean in the page cache as src itself
        if self.cold_root:
            evict(self.cold_root)
        up = timed(lambda: self.trainer(i))
        if self.cold_root:
            evict(self.cold_root)
        down = timed(lambda: self.rollout(i)) if self.rollout else 0.0
        self.cleanup(i)
        os.sync()  # no write-back of this run's pages slows the next one
        if up + down < sum(self.best):
            self.best = (up, down)

    @property
    def total(self) -> float:
        return sum(self.best)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def hash_file(path: Path, digest: str) -> str:
    with open(path, "rb", buffering=0) as f:
        return hashlib.file_digest(f, "sha256" if digest == "sha256" else xxhash.xxh3_128).hexdigest()


def copy_durable(src: Path, dst: Path) -> None:
    """copyfile, then fsync the copy (what a crash-safe publish must at least do)."""
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def into_model(model: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """What a rollout worker does with loaded weights: copy them into its model (touches every byte)."""
    for name, dst in model.items():
        dst.copy_(tensors[name])


def file_arms(src: Path, work: Path, model: dict[str, torch.Tensor], digest: str) -> list[Arm]:
    from safetensors.torch import load_file

    from tlt.store import ArtifactStore

    store = ArtifactStore(work / "store", digest=digest)
    hashed = functools.partial(hash_file, digest=digest)
    out = work / "rollout"
    out.mkdir()

    def drop(i: int) -> None:  # keep disk and page cache flat between runs
        rm(work / "store" / "policy" / f"v{i:08d}")
        rm(work / f"mid-v{i}")
        rm(out / f"v{i}")

    def copy(i: int) -> None:
        shutil.copyfile(src, out / f"v{i}")

    scratch: dict[int, Path] = {}

    def to_scratch(i: int) -> None:  # the trainer wrote its version on the store's filesystem
        scratch[i] = store.scratch_path("policy", "model.safetensors")
        shutil.copyfile(src, scratch[i])

    def move(i: int) -> None:
        store.publish("policy", i, {"model.safetensors": scratch.pop(i)}, move=True)

    return [
        Arm("plain copy", copy, None, drop),
        Arm("2 copies, 1st fsynced", lambda i: copy_durable(src, work / f"mid-v{i}"),
            lambda i: shutil.copyfile(work / f"mid-v{i}", out / f"v{i}"), drop, "plain copy"),
        Arm(f"copy + 2x {digest}", lambda i: (hashed(src), copy(i)), lambda i: hashed(out / f"v{i}"),
            drop, "plain copy"),
        Arm("file:// publish+fetch", lambda i: store.publish("policy", i, {"model.safetensors": src}),
            lambda i: store.fetch("policy", i, out / f"v{i}"), drop, "plain copy"),
        Arm("file:// move+fetch", move, lambda i: store.fetch("policy", i, out / f"v{i}"), drop, "plain copy",
            to_scratch),
        Arm("file:// move+fetch(link)", move, lambda i: store.fetch("policy", i, out / f"v{i}", link=True), drop,
            "plain copy", to_scratch),
        Arm("plain copy + load", copy, lambda i: into_model(model, load_file(out / f"v{i}")), drop),
        Arm("file:// publish+load", lambda i: store.publish("policy", i, {"model.safetensors": src}),
            lambda i: into_model(model, store.load_tensors("policy", i)), drop, "plain copy + load"),
        Arm("file:// move+load", move, lambda i: into_model(model, store.load_tensors("policy", i)), drop,
            "plain copy + load", to_scratch),
    ]


def s3_arms(src: Path, work: Path, model: dict[str, torch.Tensor], endpoint: str, bucket: str,
            digest: str) -> list[Arm]:
    import boto3
    from safetensors.torch import load

    from tlt.store import ArtifactStore

    client = boto3.client("s3", endpoint_url=endpoint)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    store = ArtifactStore(f"s3://{bucket}/{prefix}", storage_options={"endpoint_url": endpoint}, digest=digest)
    out = work / "rollout-s3"
    out.mkdir()
    key = f"{prefix}/plain/model.safetensors"

    def drop(i: int) -> None:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [{"Key": o["Key"]} for page in pages for o in page.get("Contents", [])]
        for start in range(0, len(keys), 1000):
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys[start:start + 1000]})
        rm(out / f"v{i}")

    def upload(i: int) -> None:
        client.upload_file(str(src), bucket, key)  # multipart, 10 threads (boto3's defaults)

    def download(i: int) -> None:  # one streaming GET: boto3's download_file does 8 MiB ranged GETs, and moto
        body = client.get_object(Bucket=bucket, Key=key)["Body"]  # re-reads the whole object for every range
        with open(out / f"v{i}", "wb") as f:
            shutil.copyfileobj(body, f, 8 << 20)

    return [
        Arm("boto3 upload+download", upload, download, drop),
        Arm("s3:// publish+fetch", lambda i: store.publish("policy", i, {"model.safetensors": src}),
            lambda i: store.fetch("policy", i, out / f"v{i}"), drop, "boto3 upload+download"),
        Arm("boto3 upload+load", upload,
            lambda i: into_model(model, load(client.get_object(Bucket=bucket, Key=key)["Body"].read())), drop),
        Arm("s3:// publish+load", lambda i: store.publish("policy", i, {"model.safetensors": src}),
            lambda i: into_model(model, store.load_tensors("policy", i)), drop, "boto3 upload+load"),
    ]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    sizes = [int(s) for s in (args.sizes or ("100" if args.quick else "100,1000")).split(",")]
    repeats = args.repeats or (3 if args.quick else 5)
    s3_repeats = min(repeats, 2 if args.quick else 3)
    headline: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        work_root = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        endpoint = ""
        if not args.no_s3:
            os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
            os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
            endpoint = args.s3_endpoint or stack.enter_context(moto_server())
            if not args.s3_endpoint:
                import boto3

                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=args.bucket)
        print(f"cpus={os.cpu_count()} repeats={repeats} file://, {s3_repeats} s3:// (best counts) workdir={work_root} "
              f"s3={'off' if args.no_s3 else endpoint + ('' if args.s3_endpoint else ' (moto)')} "
              f"page cache={'cold' if args.cold else 'warm'} digest={args.digest}")
        for size_mb in sizes:
            work = work_root / f"{size_mb}MB-{uuid.uuid4().hex[:6]}"
            work.mkdir(parents=True)
            src = work / "model.safetensors"
            n_tensors = make_weights(src, size_mb * MB, args.hidden)
            nbytes = src.stat().st_size
            from safetensors.torch import load_file

            model = {k: torch.empty_like(v) for k, v in load_file(src).items()}  # the rollout's weights
            Arm.cold_root = work if args.cold else None
            arms = file_arms(src, work, model, args.digest)
            for i in range(repeats):  # round robin, so a slow spell of the machine hits every arm
                for arm in arms:
                    arm.run(i)
            if not args.no_s3:
                more = s3_arms(src, work, model, endpoint, args.bucket, args.digest)
                for i in range(s3_repeats):
                    for arm in more:
                        arm.run(i)
                arms += more
            by_name = {arm.name: arm for arm in arms}
            copy = by_name["plain copy"].total
            print(f"\n{size_mb} MB policy version: {nbytes / MB:.1f} MB, {n_tensors} bf16 tensors")
            print(f"{'arm':<25} | {'trainer s':>9} | {'rollout s':>9} | {'total s':>7} | {'MB/s':>6} | "
                  f"{'ratio':>5} | {'x copy':>6} | ratio vs")
            for arm in arms:
                up, down = arm.best
                ratio = arm.total / by_name[arm.baseline].total if arm.baseline else 1.0
                print(f"{arm.name:<25} | {up:>9.3f} | {down:>9.3f} | {arm.total:>7.3f} | "
                      f"{nbytes / MB / arm.total:>6.0f} | {ratio:>5.2f} | {arm.total / copy:>6.2f} | "
                      f"{arm.baseline or '(baseline)'}")
            tag = f"{size_mb}MB"
            loaded = by_name["plain copy + load"].total
            headline[f"file_load_ratio_{tag}"] = by_name["file:// move+load"].total / loaded  # TLT's path
            headline[f"file_fetch_ratio_{tag}"] = by_name["file:// move+fetch"].total / copy
            headline[f"file_fetch_link_ratio_{tag}"] = by_name["file:// move+fetch(link)"].total / copy
            headline[f"file_copy_publish_load_ratio_{tag}"] = by_name["file:// publish+load"].total / loaded
            headline[f"file_copy_publish_fetch_ratio_{tag}"] = by_name["file:// publish+fetch"].total / copy
            headline[f"io_floor_ratio_{tag}"] = by_name["2 copies, 1st fsynced"].total / copy
            headline[f"file_fetch_vs_io_floor_{tag}"] = (by_name["file:// publish+fetch"].total
                                                         / by_name["2 copies, 1st fsynced"].total)
            headline[f"hash_floor_ratio_{tag}"] = by_name[f"copy + 2x {args.digest}"].total / copy
            if not args.no_s3:
                headline[f"s3_fetch_ratio_{tag}"] = (by_name["s3:// publish+fetch"].total
                                                     / by_name["boto3 upload+download"].total)
                headline[f"s3_load_ratio_{tag}"] = (by_name["s3:// publish+load"].total
                                                    / by_name["boto3 upload+load"].total)
            del model
            shutil.rmtree(work)
    print(f"RESULT digest={args.digest} " + " ".join(f"{k}={v:.2f}" for k, v in headline.items()))


if __name__ == "__main__":
    main()
