"""The RL step loop on one machine: rollout workers in threads, the planner, drafter aggregation, GRPO.

One step: workers load the newest policy and drafter versions from the store; the controller queues
``prompts_per_step x group_size`` seeded requests; workers pull and decode them; when the queue is empty
and a worker runs dry, the planner gives it the drafter role and it trains its drafter copy on its own
responses until the rollout ends (preemption); the aggregator merges the pushed deltas into a new drafter
version; rewards and GRPO produce policy version ``k+1``. Each worker thread uses its own core(s), so an
idle worker's core really is free for the drafter, as an idle GPU is on a cluster.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import torch

from tlt import metrics as m
from tlt.config import JobSpec
from tlt.controller import components as comp
from tlt.controller.services import ServiceAddresses, Services, build_inproc, connect
from tlt.data.datasets import PromptRecord, PromptSampler
from tlt.errors import ConfigError
from tlt.rollout.engine import RequestOutput
from tlt.rollout.sampling import SamplingParams
from tlt.rollout.speculative import SpecDecodeStats
from tlt.rollout.worker import RequestQueue, RolloutRequest, WorkerStepSummary, add_stats, sum_reports
from tlt.rpc.errors import RpcError
from tlt.store import ArtifactStore
from tlt.store.kinds import DRAFTER_KIND, POLICY_KIND
from tlt.trainer.policy import Sample
from tlt_operator.planner import JobProgress, PlannerConfig, WorkerProgress, in_long_tail, plan_roles, role_changes

PLANNER_PERIOD_S = 0.02
SERVICE_RESTART_TIMEOUT_S = 300.0  # how long to wait for a dead trainer/drafter to serve again (a pod restart)
MAX_SERVICE_RESTARTS = 3  # restarts survived per call before the job gives up
_T = TypeVar("_T")
TRAINER_CHECKPOINT_PREFIX = "trainer"  # checkpoint/trainer-<step>: one directory per committed step


def committed_trainer_checkpoint(out_dir: str | Path) -> Path:
    """The trainer checkpoint directory that ``out_dir``'s committed controller state names.

    The trainer's checkpoint and the controller's state are one commit: the trainer writes a new directory per
    step and ``controller.json`` (replaced atomically) says which one belongs to it, so a crash between the two
    writes leaves the previous step's pair in force (``checkpoint/trainer`` is the layout of older runs)."""
    ckpt = Path(out_dir) / "checkpoint"
    state = json.loads((ckpt / "controller.json").read_text())
    return ckpt / state.get("trainer", TRAINER_CHECKPOINT_PREFIX)


@dataclass
class StepResult:
    """Everything one RL step produced (also the JSONL record, see :meth:`record`)."""

    step: int
    samples: list[Sample]
    texts: list[str]
    metrics: dict = field(default_factory=dict)


class Controller:
    """Runs an RL job described by a :class:`JobSpec`.

    ``services``: addresses of running services to drive over gRPC; None builds them in this process.
    ``move_roles``: False leaves role moves to someone else (the Kubernetes operator).
    ``supervisor``: called before each step to restart services that died (e.g. LocalServices.revive); it
    returns the names of the restarted workers.
    ``on_event`` receives progress events (dicts with an ``event`` key) for a display; see
    :mod:`tlt.controller.display`.
    """

    def __init__(self, spec: JobSpec, on_event: Callable[[dict], None] | None = None,
                 services: ServiceAddresses | None = None, move_roles: bool = True,
                 supervisor: Callable[[], list[str]] | None = None) -> None:
        self.spec = spec
        self.on_event = on_event or (lambda event: None)
        self.out_dir = Path(spec.output_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.total_threads = spec.threads or torch.get_num_threads()
        self.model_dir = comp.resolve_model_dir(spec)
        self.tokenizer = comp.Tokenizer(self.model_dir)
        self.prompts = comp.load_prompt_sets(spec)
        self.reward = comp.make_reward(spec)
        self.store = ArtifactStore(spec.store_uri)
        self.sampler = PromptSampler(self.prompts.train, spec.data.prompts_per_step, spec.seed)
        self.planner = PlannerConfig(drafter_training=spec.drafter.online_training,
                                     min_responses=spec.drafter.min_responses,
                                     train_during_update=spec.drafter.train_during_update)
        self.move_roles = move_roles
        self.supervisor = supervisor
        self.inproc = services is None
        self.step = 0
        self._run_s = 0.0  # this run's own time: its steps and final evaluation, not the time between calls
        self._trainer_checkpoint: Path | None = None  # the committed one (see committed_trainer_checkpoint)
        self.active: list = []
        self.failed_workers: list[str] = []
        self._revived: set[str] = set()  # services the supervisor restarted, not yet caught up
        self.status = {"phase": "update", "pending": 0, "unanswered": 0, "last_step": {}, "reward_mean": None,
                       "heldout": None, "acceptance_length": None, "policy_version": None, "drafter_version": None}
        self._check_fresh_or_resumable()
        self.services: Services = build_inproc(spec, self.model_dir, self.store) if self.inproc else connect(services)
        self.workers = self.services.workers
        self.trainer = self.services.trainer
        self.drafter = self.services.drafter
        self._resume_or_publish_initial()

    # ---- set-up ---------------------------------------------------------------------------------

    @property
    def _state_path(self) -> Path:
        return self.out_dir / "checkpoint" / "controller.json"

    def _check_fresh_or_resumable(self) -> None:
        if not self._state_path.is_file() and self.store.latest(POLICY_KIND) is not None:
            raise ConfigError(f"store {self.spec.store_uri} already holds policy versions but {self.out_dir} "
                              "has no checkpoint to resume from; use a fresh output_dir or store.uri")

    def _resume_or_publish_initial(self) -> None:
        """Resume from output_dir/checkpoint when it exists, else publish policy version 0 (the drafter
        service publishes drafter version 0 itself)."""
        if not self._state_path.is_file():
            self.trainer.publish_policy(0)
            return
        state = json.loads(self._state_path.read_text())
        self._trainer_checkpoint = committed_trainer_checkpoint(self.out_dir)
        self.trainer.load_checkpoint(self._trainer_checkpoint)
        self._drop_uncommitted_trainer_checkpoints()
        self.step = state["step"]
        self._recover_step_record(state.get("record"))
        self.sampler = PromptSampler.from_state(self.prompts.train, self.spec.data.prompts_per_step, state["sampler"])
        latest = self.store.latest(POLICY_KIND)
        if latest is None or latest.version < self.step:  # crashed between checkpoint and publish
            self.trainer.publish_policy(self.step)
        for worker, tuner_state in zip(self.workers, state.get("tuners", [])):
            worker.load_tuner_state(tuner_state)
        self._collect_garbage()  # e.g. the staging of a publish the crash cut short
        self.on_event({"event": "resumed", "step": self.step})

    # ---- the loop ---------------------------------------------------------------------------------

    def run(self) -> list[dict]:
        """Run the remaining steps; returns the JSONL records written for them."""
        records = []
        try:
            self.begin()
            while not self.done:
                records.append(self.run_step())
            self.finish()
        finally:
            self.close()
        return records

    @property
    def done(self) -> bool:
        """Whether every step of the job has run."""
        return self.step >= self.spec.steps

    def begin(self) -> None:
        """Start (or resume) the run: a fresh job first logs its config and the starting policy's held-out
        reward. ``run`` is ``begin``, ``run_step`` until ``done``, ``finish``; callers that interleave
        several jobs (``benchmarks/e2e.py``) call them one by one."""
        if self.step == 0:
            baseline = self.evaluate()
            self._append(self._log_path, {"event": "start", "config": self.spec.to_dict(),
                                          "baseline_heldout_reward": baseline})
        self._run_s = 0.0

    def finish(self) -> None:
        """Log the final held-out reward and the run's total time; the job is done."""
        start = time.perf_counter()
        final = self.evaluate()
        self._run_s += time.perf_counter() - start
        self._append(self._log_path, {"event": "end", "total_s": self._run_s, "final_heldout_reward": final})
        self.status["phase"] = "done"

    @property
    def _log_path(self) -> Path:
        return self.out_dir / "steps.jsonl"

    def _recover_step_record(self, record: dict | None) -> None:
        """Log the committed step's record if the crash came before ``run_step`` wrote it (its timings are lost)."""
        log_path = self._log_path
        if record is None or record.get("step") != self.step:
            return
        logged = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] \
            if log_path.is_file() else []
        if any(r.get("step") == self.step and "event" not in r for r in logged):
            return
        self._append(log_path, {**record, "recovered": True})

    @staticmethod
    def _append(path: Path, record: dict) -> None:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def run_step(self) -> dict:
        """One RL step, logged; returns its log record."""
        spec = self.spec
        step = self.step + 1
        t0 = time.perf_counter()
        policy_version, drafter_version = self._load_newest()
        batch = self.sampler.next_batch()
        requests = self._requests(step, batch)
        self.on_event({"event": "rollout_start", "step": step, "total": len(requests)})
        results, summaries, tail_s, rollout_s = self._rollout(requests)
        t1 = time.perf_counter()
        new_drafter = self._publish_drafter(step) if self.drafter is not None else None
        samples, texts = self._score(batch, requests, results)
        comp.set_threads(self.total_threads)
        self.on_event({"event": "train_start", "step": step})
        sd = self._sd_record([s.stats for s in summaries])
        roles = [{"worker": s.worker, "spans": [[x.start, x.end, x.role] for x in s.spans if x.role != "end"]}
                 for s in summaries]
        # Everything but the timings, known before the checkpoint, which keeps it (see _recover_step_record).
        record = {
            "step": step, "wall_s": None, "rollout_s": rollout_s, "train_s": None, "publish_s": None,
            "reward_mean": None, "reward_std": None,
            "heldout_reward": None, "response_lengths": [len(s.response_ids) for s in samples],
            "sd": sd, "policy_version": policy_version, "drafter_version": drafter_version,
            "new_drafter_version": new_drafter, "tail_s": tail_s, "roles": roles,
            "drafter_train": self._drafter_record(summaries), "trainer": None,
            "example": texts[0] if texts else "", "failed_workers": list(self.failed_workers),
        }
        self._train(step, samples, summaries, record)
        t2 = time.perf_counter()
        self._surviving("trainer", self.trainer, lambda: self.trainer.publish_policy(step), self._restore_trainer)
        self._collect_garbage()
        t3 = time.perf_counter()
        record.update(wall_s=t3 - t0, train_s=t2 - t1, publish_s=t3 - t2)
        self.status.update(phase="update", reward_mean=record["reward_mean"], acceptance_length=sd["acceptance_length"],
                           last_step={"total": t3 - t0, "rollout": rollout_s, "tail": tail_s or 0.0,
                                      "train": t2 - t1, "publish": t3 - t2})
        if spec.data.eval_every and step % spec.data.eval_every == 0 and step < spec.steps:
            record["heldout_reward"] = self.evaluate()
        self._append(self._log_path, record)
        self._run_s += time.perf_counter() - t0
        self.on_event({"event": "step_end", "step": step, "record": record})
        return record

    def _collect_garbage(self) -> None:
        """Drop versions beyond ``store.keep``, and staging left by writers that died (at once on this
        machine's disks; after the store's age limit elsewhere)."""
        self.store.gc(POLICY_KIND, keep=self.spec.store.keep)
        if self.drafter is not None:
            self.store.gc(DRAFTER_KIND, keep=self.spec.store.keep)

    # ---- surviving a trainer or drafter restart --------------------------------------------------

    def _surviving(self, name: str, service, call: Callable[[], _T], after_restart: Callable[[], None] | None = None
                   ) -> _T:
        """``call()``; if ``service`` went away (UNAVAILABLE), wait until it serves again (restarted by the
        supervisor here, by Kubernetes in a cluster), run ``after_restart`` and call again."""
        for attempt in range(MAX_SERVICE_RESTARTS + 1):
            try:
                return call()
            except RpcError as exc:
                if self.inproc or exc.code != grpc.StatusCode.UNAVAILABLE or attempt == MAX_SERVICE_RESTARTS:
                    raise
                self.on_event({"event": "service_down", "service": name, "error": str(exc)})
                self._supervise()
                service.wait_ready(SERVICE_RESTART_TIMEOUT_S)
                self.on_event({"event": "service_back", "service": name})
                if after_restart is not None:
                    after_restart()
        raise AssertionError("unreachable")

    def _supervise(self) -> None:
        """Let the supervisor restart dead services; restarted rollout workers reload versions next step."""
        if self.supervisor is not None:
            self._revived.update(self.supervisor() or ())

    def _restore_trainer(self) -> None:
        """Put a restarted trainer back to the last checkpoint (a fresh one already is at step 0)."""
        ckpt = self._trainer_checkpoint
        if ckpt is not None and ckpt.is_dir():
            self.trainer.load_checkpoint(ckpt)
        elif self.trainer.optimizer_steps != 0:
            raise RpcError("the trainer service lost its answer before the first checkpoint and kept its state; "
                           "restart the job to resume", grpc.StatusCode.ABORTED)

    def _train(self, step: int, samples: list[Sample], summaries: list[WorkerStepSummary], record: dict) -> dict:
        """GRPO on the step's samples, then the checkpoint with the step's ``record`` (before publishing: a
        crash in between republishes on resume). A trainer restart is rolled back to the checkpoint and the
        update redone unless the checkpoint already holds it (then only its metrics are lost)."""
        before = self._surviving("trainer", self.trainer, lambda: self.trainer.optimizer_steps, self._restore_trainer)
        metrics: dict | None = None

        def attempt() -> dict:
            nonlocal metrics
            if metrics is None:
                metrics = self.trainer.train_step(samples)
            self.step = step
            record.update(reward_mean=metrics.get("reward_mean"), reward_std=metrics.get("reward_std"),
                          trainer=metrics)
            self._checkpoint(summaries, record)
            return metrics

        def restored() -> None:
            nonlocal metrics
            self._restore_trainer()
            self.step = step - 1
            metrics = (metrics or {}) if self.trainer.optimizer_steps != before else None

        return self._surviving("trainer", self.trainer, attempt, restored)

    def _publish_drafter(self, step: int) -> int | None:
        """Merge the step's drafter deltas into a new version; a restarted drafter service has lost the
        unmerged ones and starts again from the newest version in the store."""
        return self._surviving("drafter", self.drafter, lambda: self.drafter.publish({"step": step}))

    def _load_newest(self) -> tuple[int, int | None]:
        """Load the newest versions into every reachable worker; the unreachable ones sit this step out
        (``self.active``), the job goes on while at least one answers."""
        self._supervise()
        revived, self._revived = self._revived, set()
        if "trainer" in revived:  # died between steps
            self._restore_trainer()
        for worker in self.workers:
            if worker.name in revived:
                worker.wait_ready()
        policy = self.store.latest(POLICY_KIND)
        drafter = self.store.latest(DRAFTER_KIND) if self.drafter is not None else None
        self.active = []
        failures = []
        for worker in self.workers:
            try:
                worker.load_policy(policy.version)
                if drafter is not None:
                    worker.load_drafter(drafter.version)
            except RpcError as exc:
                if len(self.workers) == 1:
                    raise
                self.on_event({"event": "worker_down", "worker": worker.name, "error": str(exc)})
                failures.append(f"{worker.name}: {exc}")
                continue
            self.active.append(worker)
        if not self.active:
            raise RpcError("no rollout worker is reachable; see the service logs. "
                           + "; ".join(failures))
        self.status.update(policy_version=policy.version, drafter_version=drafter.version if drafter else None)
        return policy.version, (drafter.version if drafter else None)

    def _requests(self, step: int, batch: list[PromptRecord]) -> list[RolloutRequest]:
        r = self.spec.rollout
        out = []
        for g, record in enumerate(batch):
            ids = self.tokenizer.encode(record.prompt)
            for k in range(self.spec.data.group_size):
                seed = (self.spec.seed * 1_000_003 + step * 10_007 + g * 101 + k) % (2**62)
                params = SamplingParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                                        seed=seed)
                out.append(RolloutRequest(f"s{step}-p{record.index}-g{g}-k{k}", ids, params, g))
        return out

    def _rollout(self, requests: list[RolloutRequest], workers: list | None = None, plan: bool = True
                 ) -> tuple[dict[str, RequestOutput], list[WorkerStepSummary], float | None, float]:
        """Run the rollout phase with the planner in the loop; returns results by id, the summaries of the
        workers that finished the step, the tail time and the rollout time. A worker that fails hands its
        unanswered requests back to the queue (remote workers do) and the others finish them."""
        workers = workers or self.active
        if self.inproc:
            comp.set_threads(max(1, self.total_threads // len(workers)))
        queue = RequestQueue(requests, len(workers))
        results: dict[str, RequestOutput] = {}
        summaries: dict[int, WorkerStepSummary] = {}
        failures: dict[int, BaseException] = {}
        lock = threading.Lock()
        step_over = threading.Event()

        def on_result(worker: str, request: RolloutRequest, out: RequestOutput) -> None:
            with lock:
                if request.request_id in results:
                    raise RuntimeError(f"request {request.request_id} finished twice")
                results[request.request_id] = out
                # Counted here, not in the planner loop, which a hung worker's Progress call can hold up.
                self.status["unanswered"] = len(requests) - len(results)
            self.on_event({"event": "result", "id": request.request_id, "tokens": len(out.token_ids),
                           "worker": worker})

        def drive(i: int) -> None:
            try:
                summaries[i] = workers[i].run_rollout(queue, functools.partial(on_result, workers[i].name),
                                                      step_over)
            except Exception as exc:
                failures[i] = exc
                self.on_event({"event": "worker_failed", "worker": workers[i].name, "error": str(exc)})

        threads = [threading.Thread(target=drive, args=(i,), name=w.name, daemon=True) for i, w in enumerate(workers)]
        self.status.update(phase="rollout", unanswered=len(requests))
        start = time.monotonic()
        for thread in threads:
            thread.start()
        roles = {w.name: w.role for w in workers}
        tail_start = None
        while True:
            with lock:
                done = len(results) == len(requests)
            live = [w for i, w in enumerate(workers) if i not in failures and threads[i].is_alive()]
            if done or not live:
                break
            progress = JobProgress("rollout", len(queue), tuple(self._progress(w) for w in live))
            self.status["pending"] = len(queue)
            tail = in_long_tail(progress)
            if tail_start is None and tail:
                tail_start = time.monotonic()
            if plan and self.move_roles:
                roles = self._apply_roles(roles, plan_roles(progress, self.planner), live)
            self.on_event({"event": "progress", "workers": progress.workers, "roles": roles, "tail": tail,
                           "acceptance_length": self._sd_record([w.live_stats() for w in live])[
                               "acceptance_length"]})
            time.sleep(PLANNER_PERIOD_S)
        end = time.monotonic()
        self.status.update(phase="update", pending=0)
        live = [w for i, w in enumerate(workers) if i not in failures]
        if plan and self.move_roles and live:
            update = plan_roles(JobProgress("update", 0, tuple(self._progress(w) for w in live)), self.planner)
            self._apply_roles(roles, update, live)
        step_over.set()
        for thread in threads:
            thread.join()
        missing = [r.request_id for r in requests if r.request_id not in results]
        if missing:
            if failures:
                raise next(iter(failures.values()))
            raise RuntimeError(f"rollout ended with {len(missing)} requests unanswered (first: {missing[0]}); "
                               "a worker failed, see the log above")
        self.failed_workers = [workers[i].name for i in sorted(failures)]
        ordered = [summaries[i] for i in sorted(summaries)]
        return results, ordered, (end - tail_start if tail_start else None), end - start

    @staticmethod
    def _progress(worker) -> WorkerProgress:
        """A worker's progress; one that does not answer is reported unhealthy (the planner leaves it be)."""
        try:
            return worker.progress()
        except RpcError:
            return WorkerProgress(worker.name, 0, 0, 0, 0, healthy=False)

    def _apply_roles(self, roles: dict, new_roles: dict, workers: list) -> dict:
        applied = dict(roles)
        for name, _old, role in role_changes(roles, new_roles):
            try:
                next(w for w in workers if w.name == name).set_role(role)
            except RpcError:  # a worker that died; its failure is reported by its rollout thread
                continue
            applied[name] = role
            self.on_event({"event": "role", "worker": name, "role": role})
        return applied

    def _score(self, batch: list[PromptRecord], requests: list[RolloutRequest],
               results: dict[str, RequestOutput]) -> tuple[list[Sample], list[str]]:
        samples, texts = [], []
        for request in requests:
            out = results[request.request_id]
            text = self.tokenizer.decode(out.token_ids)
            samples.append(Sample(request.prompt_ids, list(out.token_ids), self.reward(batch[request.group], text),
                                  request.group))
            texts.append(text)
        return samples, texts

    def _sd_record(self, stats: list[SpecDecodeStats]) -> dict:
        total = SpecDecodeStats()
        for s in stats:
            total = add_stats(total, s)
        return {
            "mode": self.spec.rollout.speculative.mode,
            "acceptance_length": total.acceptance_length if total.num_drafts else None,
            "draft_tokens": total.num_draft_tokens, "accepted_tokens": total.num_accepted_tokens,
            "num_drafts": total.num_drafts, "sd_seconds": total.sd_seconds, "plain_seconds": total.plain_seconds,
        }

    @staticmethod
    def _drafter_record(summaries: list[WorkerStepSummary]) -> dict:
        report = sum_reports([r for s in summaries for r in s.drafter])
        return {"steps": report.steps, "tokens": report.tokens, "pushes": report.pushes, "seconds": report.seconds,
                "loss": report.last_loss, "preemptions": sum(r.preempted for s in summaries for r in s.drafter),
                "failed_pushes": report.failed_pushes}

    def _checkpoint(self, summaries: list[WorkerStepSummary], record: dict) -> None:
        """Trainer state, sampler position, tuner states, versions and the step's record, so a restart resumes
        exactly. Committed by replacing controller.json, which names the step's trainer checkpoint."""
        ckpt = self.out_dir / "checkpoint"
        ckpt.mkdir(parents=True, exist_ok=True)
        trainer_dir = ckpt / f"{TRAINER_CHECKPOINT_PREFIX}-{self.step:06d}"
        self.trainer.save_checkpoint(trainer_dir)
        state = {"step": self.step, "trainer": trainer_dir.name, "sampler": self.sampler.state(),
                 "drafter_version": summaries[0].drafter_version if summaries else None,
                 "tuners": [self._tuner_state(w) for w in self.workers], "record": record}
        tmp = ckpt / "controller.json.tmp"
        with tmp.open("w") as f:
            f.write(json.dumps(state))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(ckpt / "controller.json")
        self._trainer_checkpoint = trainer_dir
        self._drop_uncommitted_trainer_checkpoints()

    def _drop_uncommitted_trainer_checkpoints(self) -> None:
        """Remove trainer checkpoints other than the committed one (older steps, or one a crash left uncommitted)."""
        ckpt = self.out_dir / "checkpoint"
        for path in [*ckpt.glob(f"{TRAINER_CHECKPOINT_PREFIX}*"), *ckpt.glob(f".{TRAINER_CHECKPOINT_PREFIX}*")]:
            if path.is_dir() and path != self._trainer_checkpoint:
                shutil.rmtree(path, ignore_errors=True)

    def _tuner_state(self, worker) -> dict | None:
        """A worker's bandit state for the checkpoint (None for one that is down: it restarts cold)."""
        try:
            return worker.tuner_state()
        except RpcError:
            return None

    def close(self) -> None:
        """Release the services' resources (Ray workers, channels); idempotent."""
        self.services.close()
        self.services.closers.clear()

    # ---- evaluation -------------------------------------------------------------------------------

    def evaluate(self) -> float | None:
        """Mean reward of the current policy on the held-out prompts, one seeded sample each (same seeds
        every time, so evaluations are paired), generated by the first worker; None without a held-out set."""
        if not self.prompts.heldout:
            return None
        comp.set_threads(self.total_threads)
        self._load_newest()
        r = self.spec.rollout
        temperature = r.temperature if self.spec.data.eval_temperature is None else self.spec.data.eval_temperature
        requests = [RolloutRequest(f"eval{self.step}-{i}", self.tokenizer.encode(p.prompt),
                                   SamplingParams(temperature=temperature, top_p=r.top_p,
                                                  max_new_tokens=r.max_new_tokens, seed=self.spec.seed * 7919 + i), i)
                    for i, p in enumerate(self.prompts.heldout)]
        results = self._rollout(requests, workers=self.active[:1], plan=False)[0]
        rewards = [self.reward(p, self.tokenizer.decode(results[q.request_id].token_ids))
                   for p, q in zip(self.prompts.heldout, requests)]
        mean = sum(rewards) / len(rewards)
        self.status["heldout"] = mean
        self.on_event({"event": "eval", "step": self.step, "reward": mean})
        return mean

    # ---- metrics ----------------------------------------------------------------------------------

    def metric_samples(self) -> list[m.Sample]:
        """The controller's series (and, in process, the workers') for a CallbackCollector."""
        s = self.status
        out: list[m.Sample] = [
            (m.CONTROLLER_STEP, {}, self.step), (m.CONTROLLER_PENDING_REQUESTS, {}, s["pending"]),
            (m.CONTROLLER_UNANSWERED_REQUESTS, {}, s["unanswered"]),
            *m.one_hot(m.CONTROLLER_PHASE, s["phase"], ("rollout", "update", "done")),
            *[(m.CONTROLLER_LAST_STEP_SECONDS, {"phase": k}, v) for k, v in s["last_step"].items()],
            (m.CONTROLLER_REWARD_MEAN, {}, s["reward_mean"]), (m.CONTROLLER_HELDOUT_REWARD, {}, s["heldout"]),
            (m.CONTROLLER_ACCEPTANCE_LENGTH, {}, s["acceptance_length"]),
            (m.CONTROLLER_POLICY_VERSION, {}, s["policy_version"]),
            (m.CONTROLLER_DRAFTER_VERSION, {}, s["drafter_version"]),
        ]
        if self.inproc:
            for worker in self.workers:
                out += worker.metric_samples()
        return out
