"""The RL step loop on one machine: rollout workers in threads, the planner, drafter aggregation, GRPO.

One step: workers load the newest policy and drafter versions from the store; the controller queues
``prompts_per_step x group_size`` seeded requests; workers pull and decode them; when the queue is empty
and a worker runs dry, the planner gives it the drafter role and it trains its drafter copy on its own
responses until the rollout ends (preemption); the aggregator merges the pushed deltas into a new drafter
version; rewards and GRPO produce policy version ``k+1``. Each worker thread uses its own core(s), so an
idle worker's core really is free for the drafter, as an idle GPU is on a cluster.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tlt.config import JobSpec
from tlt.controller import components as comp
from tlt.data.datasets import PromptRecord, PromptSampler
from tlt.drafter.aggregator import DRAFTER_KIND, DrafterAggregator, publish_drafter
from tlt.errors import ConfigError
from tlt.models.drafter_io import copy_drafter_tensors
from tlt.models.loader import hf_state_dict, load_model
from tlt.rollout.engine import RequestOutput
from tlt.rollout.sampling import SamplingParams
from tlt.rollout.worker import RequestQueue, RolloutRequest, RolloutWorker
from tlt.store import ArtifactStore
from tlt.trainer.policy import Sample, make_policy_trainer
from tlt_operator.planner import JobProgress, PlannerConfig, in_long_tail, plan_roles, role_changes

POLICY_KIND = "policy"
PLANNER_PERIOD_S = 0.02


@dataclass
class StepResult:
    """Everything one RL step produced (also the JSONL record, see :meth:`record`)."""

    step: int
    samples: list[Sample]
    texts: list[str]
    metrics: dict = field(default_factory=dict)


class Controller:
    """Runs an RL job described by a :class:`JobSpec` (in-process workers and services).

    ``on_event`` receives progress events (dicts with an ``event`` key) for a display; see
    :mod:`tlt.controller.display`.
    """

    def __init__(self, spec: JobSpec, on_event: Callable[[dict], None] | None = None) -> None:
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
        self.step = 0
        self._build_components()

    # ---- set-up ---------------------------------------------------------------------------------

    def _build_components(self) -> None:
        spec = self.spec
        policy = load_model(self.model_dir, dtype="float32")
        self.trainer = make_policy_trainer(policy, spec.trainer.grpo, workers=spec.trainer.workers)
        sd_on = spec.rollout.speculative.mode != "off"
        master = comp.initial_drafter(spec, self.model_dir, policy) if sd_on else None
        self.aggregator = DrafterAggregator(master, self.store, 0, spec.drafter.outer_lr) if master else None
        self.workers = []
        for i in range(spec.rollout.workers):
            model = load_model(self.model_dir, dtype=spec.model.dtype)
            drafter = None
            if master is not None:
                drafter = master.copy_for(model).to(model.dtype).eval()
            push = self.aggregator.push_delta if self.aggregator else None
            self.workers.append(RolloutWorker(f"rollout-{i}", model, spec, drafter, push))
        self._resume_or_publish_initial(policy, master)

    def _resume_or_publish_initial(self, policy, master) -> None:
        """Resume from output_dir/checkpoint when it exists, else publish version 0 of policy and drafter."""
        state_path = self.out_dir / "checkpoint" / "controller.json"
        if not state_path.is_file():
            if self.store.latest(POLICY_KIND) is not None:
                raise ConfigError(f"store {self.spec.store_uri} already holds policy versions but {self.out_dir} "
                                  "has no checkpoint to resume from; use a fresh output_dir or store.uri")
            self._publish_policy(0, hf_state_dict(policy))
            if master is not None:
                publish_drafter(self.store, master, 0, {"source": self.spec.drafter.init})
            return
        state = json.loads(state_path.read_text())
        self.trainer.load_checkpoint(self.out_dir / "checkpoint" / "trainer")
        self.step = state["step"]
        self.sampler = PromptSampler.from_state(self.prompts.train, self.spec.data.prompts_per_step, state["sampler"])
        latest = self.store.latest(POLICY_KIND)
        if latest is None or latest.version < self.step:  # crashed between checkpoint and publish
            self._publish_policy(self.step, self.trainer.policy_state())
        drafter = self.store.latest(DRAFTER_KIND) if self.aggregator is not None else None
        if drafter is not None:  # the newest complete version, even one published after the checkpoint
            copy_drafter_tensors(self.aggregator.drafter, self.store.load_tensors(DRAFTER_KIND, drafter.version),
                                 f"drafter v{drafter.version}")
            self.aggregator.version = drafter.version
        for worker, tuner_state in zip(self.workers, state.get("tuners", [])):
            if worker.engine.tuner is not None and tuner_state:
                worker.engine.tuner.load_state(tuner_state)
        self.on_event({"event": "resumed", "step": self.step})

    def _publish_policy(self, version: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        config = (self.model_dir / "config.json").read_bytes()
        payload = save({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()})
        self.store.publish(POLICY_KIND, version, {"model.safetensors": payload, "config.json": config},
                           metadata={"step": version})

    # ---- the loop ---------------------------------------------------------------------------------

    def run(self) -> list[dict]:
        """Run the remaining steps; returns the JSONL records written for them."""
        log_path = self.out_dir / "steps.jsonl"
        records = []
        if self.step == 0:
            baseline = self.evaluate()
            self._append(log_path, {"event": "start", "config": self.spec.to_dict(),
                                    "baseline_heldout_reward": baseline})
        start = time.perf_counter()
        try:
            while self.step < self.spec.steps:
                record = self.run_step()
                self._append(log_path, record)
                records.append(record)
        finally:
            self.close()
        final = self.evaluate()
        self._append(log_path, {"event": "end", "total_s": time.perf_counter() - start,
                                "final_heldout_reward": final})
        return records

    @staticmethod
    def _append(path: Path, record: dict) -> None:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def run_step(self) -> dict:
        """One RL step; returns its log record."""
        spec = self.spec
        step = self.step + 1
        t0 = time.perf_counter()
        policy_version, drafter_version = self._load_newest()
        batch = self.sampler.next_batch()
        requests = self._requests(step, batch)
        self.on_event({"event": "rollout_start", "step": step, "total": len(requests)})
        results, roles, tail_s, rollout_s = self._rollout(requests)
        t1 = time.perf_counter()
        new_drafter = self.aggregator.publish({"step": step}) if self.aggregator else None
        samples, texts = self._score(batch, requests, results)
        comp.set_threads(self.total_threads)
        self.on_event({"event": "train_start", "step": step})
        train_metrics = self.trainer.train_step(samples)
        self.step = step
        self._checkpoint()  # before publishing: a crash in between republishes from this state on resume
        t2 = time.perf_counter()
        self._publish_policy(step, self.trainer.policy_state())
        self.store.gc(POLICY_KIND, keep=spec.store.keep)
        if self.aggregator is not None:
            self.store.gc(DRAFTER_KIND, keep=spec.store.keep)
        t3 = time.perf_counter()
        record = {
            "step": step, "wall_s": t3 - t0, "rollout_s": rollout_s, "train_s": t2 - t1, "publish_s": t3 - t2,
            "reward_mean": train_metrics.get("reward_mean"), "reward_std": train_metrics.get("reward_std"),
            "heldout_reward": None, "response_lengths": [len(s.response_ids) for s in samples],
            "sd": self._sd_record(), "policy_version": policy_version, "drafter_version": drafter_version,
            "new_drafter_version": new_drafter, "tail_s": tail_s, "roles": roles,
            "drafter_train": self._drafter_record(), "trainer": train_metrics,
            "example": texts[0] if texts else "",
        }
        if spec.data.eval_every and step % spec.data.eval_every == 0 and step < spec.steps:
            record["heldout_reward"] = self.evaluate()
        self.on_event({"event": "step_end", "step": step, "record": record})
        return record

    def _load_newest(self) -> tuple[int, int | None]:
        policy = self.store.latest(POLICY_KIND)
        drafter = self.store.latest(DRAFTER_KIND) if self.aggregator else None
        policy_tensors = drafter_tensors = None  # read (and verified) only when some worker lacks the version
        for worker in self.workers:
            if worker.policy_version != policy.version:
                policy_tensors = policy_tensors or self.store.load_tensors(POLICY_KIND, policy.version)
                worker.load_policy(policy.version, policy_tensors)
            if drafter is not None and worker.drafter_version != drafter.version:
                drafter_tensors = drafter_tensors or self.store.load_tensors(DRAFTER_KIND, drafter.version)
                worker.load_drafter(drafter.version, drafter_tensors)
            worker.spot_reports.clear()
            if worker.engine.spec is not None:
                worker.engine.stats.__init__()
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

    def _rollout(self, requests: list[RolloutRequest]
                 ) -> tuple[dict[str, RequestOutput], list[dict], float | None, float]:
        """Run the rollout phase with the planner in the loop; returns results by id, role spans, tail time."""
        comp.set_threads(max(1, self.total_threads // len(self.workers)))
        queue = RequestQueue(requests, len(self.workers))
        results: dict[str, RequestOutput] = {}
        lock = threading.Lock()
        step_over = threading.Event()

        def on_result(request: RolloutRequest, out: RequestOutput) -> None:
            with lock:
                if request.request_id in results:
                    raise RuntimeError(f"request {request.request_id} finished twice")
                results[request.request_id] = out
            self.on_event({"event": "result", "id": request.request_id, "tokens": len(out.token_ids)})

        base = self.aggregator.base if self.aggregator else None
        threads = [threading.Thread(target=w.run_rollout, args=(queue, on_result, step_over, base),
                                    name=w.name, daemon=True) for w in self.workers]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        roles = {w.name: w.role for w in self.workers}
        tail_start = None
        while True:
            with lock:
                done = len(results) == len(requests)
            if done or not any(t.is_alive() for t in threads):
                break
            progress = JobProgress("rollout", len(queue), tuple(w.progress() for w in self.workers))
            new_roles = plan_roles(progress, self.planner)
            tail = in_long_tail(progress)
            if tail_start is None and tail:
                tail_start = time.monotonic()
            for name, _old, role in role_changes(roles, new_roles):
                next(w for w in self.workers if w.name == name).set_role(role)
                self.on_event({"event": "role", "worker": name, "role": role})
            roles = new_roles
            self.on_event({"event": "progress", "workers": progress.workers, "roles": roles, "tail": tail,
                           "acceptance_length": self._sd_record().get("acceptance_length")})
            time.sleep(PLANNER_PERIOD_S)
        end = time.monotonic()
        update = plan_roles(JobProgress("update", 0, tuple(w.progress() for w in self.workers)), self.planner)
        for worker in self.workers:
            worker.set_role(update[worker.name])
        step_over.set()
        for thread in threads:
            thread.join()
        missing = [r.request_id for r in requests if r.request_id not in results]
        if missing:
            raise RuntimeError(f"rollout ended with {len(missing)} requests unanswered (first: {missing[0]}); "
                               "a worker thread died, see the log above")
        spans = [{"worker": w.name, "spans": [[s.start - start, s.end - start, s.role] for s in w.spans
                                                if s.role != "end"]} for w in self.workers]
        return results, spans, (end - tail_start if tail_start else None), end - start

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

    def _sd_record(self) -> dict:
        mode = self.spec.rollout.speculative.mode
        drafts = sum(w.engine.stats.num_drafts for w in self.workers)
        accepted = sum(w.engine.stats.num_accepted_tokens for w in self.workers)
        return {
            "mode": mode,
            "acceptance_length": (1 + accepted / drafts) if drafts else None,
            "draft_tokens": sum(w.engine.stats.num_draft_tokens for w in self.workers),
            "accepted_tokens": accepted, "num_drafts": drafts,
            "sd_seconds": sum(w.engine.stats.sd_seconds for w in self.workers),
            "plain_seconds": sum(w.engine.stats.plain_seconds for w in self.workers),
        }

    def _drafter_record(self) -> dict:
        reports = [r for w in self.workers for r in w.spot_reports]
        losses = [r.last_loss for r in reports if r.last_loss is not None]
        return {"steps": sum(r.steps for r in reports), "tokens": sum(r.tokens for r in reports),
                "pushes": sum(r.pushes for r in reports), "seconds": sum(r.seconds for r in reports),
                "loss": losses[-1] if losses else None, "preemptions": sum(r.preempted for r in reports)}

    def _checkpoint(self) -> None:
        """Trainer state, sampler position, tuner states and versions, so a restart resumes exactly."""
        ckpt = self.out_dir / "checkpoint"
        ckpt.mkdir(parents=True, exist_ok=True)
        self.trainer.save_checkpoint(ckpt / "trainer")
        state = {"step": self.step, "sampler": self.sampler.state(),
                 "drafter_version": self.aggregator.version if self.aggregator else None,
                 "tuners": [w.engine.tuner.export_state() if w.engine.tuner else None for w in self.workers]}
        tmp = ckpt / "controller.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(ckpt / "controller.json")

    def close(self) -> None:
        """Release the trainer's workers (Ray) if it has any; the controller can still evaluate."""
        close = getattr(self.trainer, "close", None)
        if close is not None:
            close()

    # ---- evaluation -------------------------------------------------------------------------------

    def evaluate(self) -> float | None:
        """Mean reward of the current policy on the held-out prompts, one seeded sample each (same seeds
        every time, so evaluations are paired); None without a held-out set."""
        if not self.prompts.heldout:
            return None
        comp.set_threads(self.total_threads)
        self._load_newest()
        engine = self.workers[0].engine
        r = self.spec.rollout
        temperature = r.temperature if self.spec.data.eval_temperature is None else self.spec.data.eval_temperature
        params = [SamplingParams(temperature=temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                                 seed=self.spec.seed * 7919 + i) for i in range(len(self.prompts.heldout))]
        outs = engine.generate([self.tokenizer.encode(p.prompt) for p in self.prompts.heldout], params)
        rewards = [self.reward(r, self.tokenizer.decode(o.token_ids)) for r, o in zip(self.prompts.heldout, outs)]
        self.on_event({"event": "eval", "step": self.step, "reward": sum(rewards) / len(rewards)})
        return sum(rewards) / len(rewards)
