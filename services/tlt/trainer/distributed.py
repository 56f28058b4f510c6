"""Data-parallel GRPO training on Ray Train (``TorchTrainer``, gloo, CPU workers).

:class:`RayPolicyTrainer` has the :class:`~tlt.trainer.policy.PolicyTrainer` API (``train_step``,
``policy_state``, ``save_checkpoint``, ``load_checkpoint``, ``step``) and runs ``num_workers`` ranks.

Design:

- **Persistent workers.** One ``TorchTrainer.fit()`` runs for the trainer's whole life (in a driver thread);
  its per-worker function is a command loop that reads ``(op, args)`` from a per-rank Ray queue and answers
  on a shared one. Model, optimizer state and the gloo process group therefore stay alive across steps: a
  step costs its compute plus ~30 ms of queue and object-store traffic, where re-launching a ``TorchTrainer``
  per step would pay the worker-group start (15-25 s on a 2-core machine) and a weight round-trip every step.
- **Same maths as one worker.** Every rank receives the whole batch (token ids only, one object-store copy)
  and computes the advantages, the update plan (mini-batches, epochs) and each update's aggregation normaliser
  from it, with no communication; it then forwards/backwards only its shard, whole groups balanced by tokens
  (:func:`shard_by_group`). Micro-batch losses are shares of the global normaliser, so summing gradients
  (one flat ``all_reduce`` per optimizer update) gives the one-worker gradient, up to fp32 summation order.
  Gradient clipping and AdamW then run identically on every rank.
- **Manual all-reduce rather than DDP:** gradient accumulation over a rank-dependent number of micro-batches,
  and ranks with no sample in a mini-batch, need no ``no_sync`` bookkeeping and cannot hang DDP's hooks.
- **Checkpoints** are the single-worker format (interchangeable), written by rank 0 and read by every rank,
  so on a multi-node cluster the directory must be on storage all workers see.
- Ray is imported lazily; a Ray runtime is started only when none is running (small: ``num_cpus`` =
  workers x threads, no dashboard) and shut down by :meth:`RayPolicyTrainer.close`.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tlt.errors import ConfigError, TLTError
from tlt.models.transformer import CausalLM
from tlt.trainer.grpo import GRPOConfig
from tlt.trainer.policy import PolicyTrainer, Sample, model_limits, validate_samples


def shard_by_group(samples: Sequence[Sample], num_workers: int) -> list[list[int]]:
    """Sample indices per worker: whole groups, largest (in tokens) first, each to the least-loaded worker."""
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.group, []).append(i)

    def tokens(members: list[int]) -> int:
        return sum(len(samples[i].prompt_ids) + len(samples[i].response_ids) for i in members)

    loads, shards = [0] * num_workers, [[] for _ in range(num_workers)]
    for members in sorted(groups.values(), key=lambda m: (-tokens(m), m[0])):
        worker = min(range(num_workers), key=lambda k: (loads[k], k))
        shards[worker].extend(members)
        loads[worker] += tokens(members)
    return [sorted(shard) for shard in shards]


class DataParallelPolicyTrainer(PolicyTrainer):
    """The trainer of one rank in an initialised ``torch.distributed`` group (CPU tensors, gloo).

    It computes on its shard of the batch and sums gradients and loss statistics over all ranks.
    """

    def train_shard(self, samples: Sequence[Sample], owned: Sequence[int]) -> dict[str, float]:
        """One train step of the whole batch ``samples`` of which this rank computes ``owned``."""
        return self._train_step(samples, owned)

    def _all_reduce(self, tensors: list[torch.Tensor]) -> None:
        flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()


# ---- the worker side --------------------------------------------------------------------------

def _op_train_step(trainer: DataParallelPolicyTrainer, rank: int, samples_ref: Any, shard: list[int]
                   ) -> dict[str, float]:
    import ray

    return trainer.train_shard(ray.get(samples_ref), shard)


def _op_policy_state(trainer: DataParallelPolicyTrainer, rank: int) -> dict[str, torch.Tensor] | None:
    return trainer.policy_state() if rank == 0 else None


def _op_save(trainer: DataParallelPolicyTrainer, rank: int, directory: str) -> str | None:
    return str(trainer.save_checkpoint(directory)) if rank == 0 else None


def _op_load(trainer: DataParallelPolicyTrainer, rank: int, directory: str) -> int:
    trainer.load_checkpoint(directory)
    return trainer.step


_OPS: dict[str, Callable[..., Any]] = {
    "train_step": _op_train_step, "policy_state": _op_policy_state, "save": _op_save, "load": _op_load}
# A rank failing inside these may leave its peers blocked in a collective: end the group (bugs only).
_COLLECTIVE_OPS = {"train_step"}


def _worker_loop(config: dict[str, Any]) -> None:
    """The Ray Train per-worker function: build this rank's trainer, then serve commands until ``stop``."""
    import ray
    import ray.train

    torch.set_num_threads(config["threads"])
    rank = ray.train.get_context().get_world_rank()
    commands, results = config["commands"][rank], config["results"]
    model = copy.deepcopy(ray.get(config["model"]))  # own, writable copies of the weights
    reference = copy.deepcopy(ray.get(config["reference"])) if config["reference"] is not None else None
    trainer = DataParallelPolicyTrainer(model, config["grpo"], reference)
    while True:
        call, op, args = commands.get()
        if op == "stop":
            return
        try:
            results.put((call, rank, True, _OPS[op](trainer, rank, *args)))
        except Exception as exc:
            user_error = isinstance(exc, TLTError)  # input checks run on every rank alike, before any collective
            results.put((call, rank, False, exc if user_error else traceback.format_exc()))
            if op in _COLLECTIVE_OPS and not user_error:
                raise


# ---- the driver side --------------------------------------------------------------------------

RAY_INIT_ATTEMPTS = 3


# How Ray says a head process (raylet, GCS server) missed its fixed startup window.
RAY_STARTUP_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")


def _init_ray(ray, options: dict[str, Any]) -> None:
    """``ray.init``, retried when the local raylet or GCS server misses Ray's fixed startup window (seen on
    loaded 2-core machines; Ray raises a bare Exception or RuntimeError for it)."""
    for attempt in range(1, RAY_INIT_ATTEMPTS + 1):
        try:
            ray.init(**options)
            return
        except Exception as exc:
            if not any(s in str(exc) for s in RAY_STARTUP_TIMEOUTS) or attempt == RAY_INIT_ATTEMPTS:
                raise
            ray.shutdown()


class RayPolicyTrainer:
    """GRPO on ``num_workers`` data-parallel Ray Train workers, with the :class:`PolicyTrainer` API.

    ``step`` counts optimizer updates, as in :class:`PolicyTrainer`. ``model`` and ``reference`` are copied to
    every worker; the driver's ``model`` is not updated (read the trained weights with :meth:`policy_state` or
    a checkpoint). ``ray_init`` overrides the arguments of the ``ray.init`` call made when no Ray runtime is
    running. Call :meth:`close` (or use ``with``) to stop the workers and the Ray runtime this trainer started.
    Errors in the samples raise the same :class:`~tlt.errors.TLTError` as one worker and leave the workers
    running; a crashed worker raises ``RuntimeError`` with its traceback and closes the trainer.
    """

    def __init__(self, model: CausalLM, config: GRPOConfig, reference: CausalLM | None = None, *,
                 num_workers: int = 2, threads_per_worker: int = 1, ray_init: dict[str, Any] | None = None) -> None:
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
        from ray.util.queue import Queue

        if num_workers < 1:
            raise ConfigError(f"workers must be >= 1, got {num_workers}")
        if threads_per_worker < 1:
            raise ConfigError(f"threads_per_worker must be >= 1, got {threads_per_worker}")
        if config.kl_coef > 0 and reference is None:
            raise ConfigError(f"kl_coef {config.kl_coef} > 0 needs a reference model; pass reference= or set 0")
        self.config, self.num_workers, self.step = config, num_workers, 0
        self._limits = model_limits(model)
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            _init_ray(ray, {"num_cpus": num_workers * threads_per_worker, "include_dashboard": False,
                            "logging_level": "WARNING", **(ray_init or {})})
        self._storage = tempfile.mkdtemp(prefix="tlt-ray-train-")
        self._commands = [Queue(actor_options={"num_cpus": 0}) for _ in range(num_workers)]
        self._results = Queue(actor_options={"num_cpus": 0})
        self._calls = 0
        self._closed = False
        self._error: BaseException | None = None
        loop_config = {
            "commands": self._commands, "results": self._results, "grpo": config, "threads": threads_per_worker,
            "model": ray.put(model), "reference": ray.put(reference) if reference is not None else None}
        trainer = TorchTrainer(
            _worker_loop, train_loop_config=loop_config, torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=False,
                                         resources_per_worker={"CPU": threads_per_worker}),
            run_config=RunConfig(name="tlt-policy-trainer", storage_path=self._storage,
                                 failure_config=FailureConfig(max_failures=0)))
        self._thread = threading.Thread(target=self._fit, args=(trainer,), name="tlt-ray-train", daemon=True)
        self._thread.start()

    def _fit(self, trainer: Any) -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # reported by the next _call
            self._error = exc

    # ---- the PolicyTrainer API ----------------------------------------------------------------

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        """One GRPO train step over all workers; returns the same metrics as :meth:`PolicyTrainer.train_step`."""
        import ray

        self._check_open()
        validate_samples(samples, *self._limits)
        start = time.perf_counter()
        samples_ref = ray.put(list(samples))
        metrics = self._call("train_step", [(samples_ref, shard) for shard in shard_by_group(samples,
                                                                                            self.num_workers)])[0]
        self.step += int(metrics["updates"])
        metrics["seconds"] = time.perf_counter() - start
        return metrics

    def policy_state(self) -> dict[str, torch.Tensor]:
        """The policy as Hugging Face-named bf16 tensors (from rank 0; all ranks hold the same weights)."""
        return self._call("policy_state", [()] * self.num_workers)[0]

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Write a checkpoint in the :class:`PolicyTrainer` format (by rank 0) and return its path."""
        path = Path(directory).resolve()
        self._call("save", [(str(path),)] * self.num_workers)
        return path

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore every rank from a :class:`PolicyTrainer`-format checkpoint."""
        path = Path(directory).resolve()
        self.step = self._call("load", [(str(path),)] * self.num_workers)[0]

    # ---- plumbing -----------------------------------------------------------------------------

    def _call(self, op: str, args_per_rank: list[tuple]) -> list[Any]:
        """Send ``op`` to every rank and return their answers in rank order; raise the first rank's error."""
        from ray.util.queue import Empty

        self._check_open()
        self._calls += 1
        call = self._calls
        for commands, args in zip(self._commands, args_per_rank):
            commands.put((call, op, args))
        answers: dict[int, tuple[bool, Any]] = {}
        while len(answers) < self.num_workers:
            try:
                reply, rank, ok, payload = self._results.get(timeout=1.0)
            except Empty:
                if not self._thread.is_alive():
                    break
                continue
            if reply == call:  # answers to an earlier, failed call are stale
                answers[rank] = (ok, payload)
        failures = sorted((rank, payload) for rank, (ok, payload) in answers.items() if not ok)
        if failures or len(answers) < self.num_workers:
            self._raise(failures)
        return [answers[rank][1] for rank in range(self.num_workers)]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this RayPolicyTrainer is closed (its workers stopped or close() was called)")

    def _raise(self, failures: list[tuple[int, Any]]) -> None:
        if not self._thread.is_alive():
            self.close()
        if failures:
            rank, payload = failures[0]
            if isinstance(payload, BaseException):
                raise payload
            raise RuntimeError(f"policy trainer rank {rank} failed:\n{payload}")
        raise RuntimeError(f"the Ray Train worker group stopped: {self._error!r}")

    def close(self) -> None:
        """Stop the workers and, if this trainer started it, the Ray runtime. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        import ray

        if self._thread.is_alive():
            for commands in self._commands:
                commands.put((0, "stop", ()))
            self._thread.join(timeout=120)
        if self._owns_ray:
            ray.shutdown()
        elif ray.is_initialized():  # someone else's runtime: leave it, but free our queue actors
            for q in (*self._commands, self._results):
                q.shutdown(force=True)
        shutil.rmtree(self._storage, ignore_errors=True)

    def __enter__(self) -> RayPolicyTrainer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
