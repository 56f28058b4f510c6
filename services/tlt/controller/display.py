"""Terminal progress for `tlt run`: a bar for the job's steps and one for the current rollout, with the
long-tail state, each worker's role and the acceptance length; one summary line per finished step."""

from __future__ import annotations

from tqdm.auto import tqdm

ROLE_LETTER = {"rollout": "R", "drafter": "D"}


class ProgressDisplay:
    """Consumes the controller's events (see :class:`tlt.controller.loop.Controller`)."""

    def __init__(self, total_steps: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.steps = tqdm(total=total_steps, desc="RL steps", unit="step", position=0, disable=not enabled)
        self.rollout: tqdm | None = None

    def __call__(self, event: dict) -> None:
        if not self.enabled:
            return
        kind = event["event"]
        if kind == "resumed":
            self.steps.n = event["step"]
            self.steps.refresh()
        elif kind == "rollout_start":
            self._close_rollout()
            self.rollout = tqdm(total=event["total"], desc=f"step {event['step']} rollout", unit="resp",
                                position=1, leave=False)
        elif kind == "result" and self.rollout is not None:
            self.rollout.update(1)
        elif kind == "progress" and self.rollout is not None:
            self.rollout.set_postfix_str(self._progress_text(event), refresh=False)
        elif kind == "train_start" and self.rollout is not None:
            self.rollout.set_description(f"step {event['step']} GRPO update")
        elif kind == "eval":
            tqdm.write(f"  held-out reward after step {event['step']}: {event['reward']:.3f}")
        elif kind in ("worker_failed", "worker_down"):
            tqdm.write(self.worker_line(event))
        elif kind in ("service_down", "service_back"):
            tqdm.write(self.service_line(event))
        elif kind == "step_end":
            self._close_rollout()
            self.steps.update(1)
            tqdm.write(self.step_line(event["record"]))

    @staticmethod
    def _progress_text(event: dict) -> str:
        workers = event["workers"]
        running = sum(w.running + w.queued for w in workers)
        roles = " ".join(f"{w.name.split('-')[-1]}:{ROLE_LETTER[event['roles'][w.name]]}{w.running}" for w in workers)
        acc = event.get("acceptance_length")
        tail = "TAIL " if event.get("tail") else ""
        return f"{tail}running={running} roles[{roles}]" + (f" acc={acc:.2f}" if acc else "")

    @staticmethod
    def service_line(event: dict) -> str:
        if event["event"] == "service_down":
            return f"  warning: the {event['service']} service went away, waiting for its restart ({event['error']})"
        return f"  the {event['service']} service is back; carrying on"

    @staticmethod
    def worker_line(event: dict) -> str:
        what = "failed; its requests go to the others" if event["event"] == "worker_failed" else "is down this step"
        return f"  warning: {event['worker']} {what} ({event['error']})"

    @staticmethod
    def step_line(record: dict) -> str:
        sd = record.get("sd") or {}
        acc = sd.get("acceptance_length")
        dt = record.get("drafter_train") or {}
        parts = [
            f"step {record['step']}: reward {record['reward_mean']:.3f}",
            f"rollout {record['rollout_s']:.1f}s (tail {record['tail_s'] or 0:.1f}s)",
            f"train {record['train_s']:.1f}s",
            f"acc.len {acc:.2f}" if acc else "SD off" if sd.get("mode") == "off" else "acc.len -",
            f"drafter +{dt.get('steps', 0)} steps -> v{record.get('new_drafter_version')}"
            if record.get("new_drafter_version") is not None else "drafter unchanged",
        ]
        return " | ".join(parts)

    def _close_rollout(self) -> None:
        if self.rollout is not None:
            self.rollout.close()
            self.rollout = None

    def close(self) -> None:
        self._close_rollout()
        self.steps.close()
