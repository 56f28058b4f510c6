"""End-to-end RL job, same seeds and steps, three arms in one run: TLT (adaptive SD + adaptive drafter),
SD off, and adaptive SD with a frozen drafter (what online drafter training adds).

The three jobs run in this process in lockstep: step 1 of each arm, then step 2 of each in the opposite
order, and so on, so that a slow spell of the machine does not fall on one arm's whole job. Times are the
jobs' own step times; the per-step ratios show how much one step varies.

    python benchmarks/e2e.py [--quick] [--steps N] [--out DIR] [--services processes]

By default every arm's services run in this process (worker threads, as ``tlt run --inproc``). With
``--services processes`` each arm gets its own rollout, drafter and trainer processes on loopback, as
``tlt run`` starts them by default (and as pods run them): then a worker that trains the drafter in the
long tail does not share a Python interpreter, and its lock, with the worker still decoding.

Prints per-arm totals and a final ``RESULT`` line; writes a comparison report (Markdown + plots).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

ARMS = {
    "TLT": {"rollout.speculative.mode": "adaptive", "drafter.online_training": True},
    "SD off": {"rollout.speculative.mode": "off", "drafter.online_training": False},
    "frozen drafter": {"rollout.speculative.mode": "adaptive", "drafter.online_training": False},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny job (finishes in about a minute)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--config", type=Path, help="base job spec YAML (default: the demo job)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-e2e"))
    ap.add_argument("--services", choices=("inproc", "processes"), default="inproc",
                    help="each arm's services in this process (threads) or in processes of their own (loopback gRPC)")
    return ap.parse_args(argv)


def base_overrides(args: argparse.Namespace) -> dict:
    if args.quick:
        base = {"steps": 2, "data.prompts_per_step": 4, "data.group_size": 4, "data.heldout": 16,
                "data.eval_every": 0, "rollout.max_new_tokens": 160}
    else:
        base = {"steps": 6, "data.heldout": 64, "data.eval_every": 0}
    if args.steps is not None:
        base["steps"] = args.steps
    return base


def build_arm(label: str, overrides: dict, args: argparse.Namespace, stack: ExitStack):
    """The arm's controller on a fresh output directory; with ``--services processes`` its service processes
    are started and left to ``stack`` to stop."""
    from tlt.config import apply_overrides, job_spec_from_dict, load_job_spec
    from tlt.controller.loop import Controller

    out_dir = args.out / label.replace(" ", "-")
    shutil.rmtree(out_dir, ignore_errors=True)
    merged = {**base_overrides(args), **overrides, "output_dir": str(out_dir), "name": label}
    spec = load_job_spec(args.config, merged) if args.config else job_spec_from_dict(apply_overrides({}, merged))
    if args.services == "inproc":
        return Controller(spec)
    from tlt.serving.launcher import LocalServices

    local = LocalServices(spec)
    return Controller(spec, services=stack.enter_context(local), supervisor=local.revive)


def run_interleaved(controllers: dict) -> dict[str, list[dict]]:
    """Step the jobs in lockstep, the order reversed every step, so that a slow spell of the machine (it
    lasts minutes here) falls on every arm's step alike instead of on whichever arm ran then."""
    records: dict[str, list[dict]] = {label: [] for label in controllers}
    try:
        for controller in controllers.values():
            controller.begin()
        labels = list(controllers)
        while not all(c.done for c in controllers.values()):
            for label in labels:
                if not controllers[label].done:
                    records[label].append(controllers[label].run_step())
            labels.reverse()
        for controller in controllers.values():
            controller.finish()
    finally:
        for controller in controllers.values():
            controller.close()
    return records


def summarize(label: str, controller, records: list[dict]) -> dict:
    """The arm's totals over its steps, and its final held-out reward from the log."""
    log = controller.out_dir / "steps.jsonl"
    end = json.loads(log.read_text().splitlines()[-1])
    acc = [r["sd"]["acceptance_length"] for r in records if r["sd"]["acceptance_length"]]
    return {
        "label": label, "log": log, "steps": [r["wall_s"] for r in records],
        "steps_s": sum(r["wall_s"] for r in records), "rollout_s": sum(r["rollout_s"] for r in records),
        "final_reward": end.get("final_heldout_reward"), "acc": sum(acc) / len(acc) if acc else None,
        "drafter_steps": sum(r["drafter_train"]["steps"] for r in records),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with ExitStack() as stack:  # service processes (--services processes) stop when the jobs are done
        controllers = {label: build_arm(label, overrides, args, stack) for label, overrides in ARMS.items()}
        records = run_interleaved(controllers)
    results = [summarize(label, controllers[label], records[label]) for label in ARMS]
    tlt, off, frozen = results
    print(f"\n{'arm':<16}{'steps s':>9}{'rollout s':>11}{'held-out':>10}{'acc.len':>9}{'drafter steps':>15}"
          "  per step s")
    for r in results:
        acc = f"{r['acc']:.2f}" if r["acc"] else "-"
        reward = f"{r['final_reward']:.3f}" if r["final_reward"] is not None else "-"
        print(f"{r['label']:<16}{r['steps_s']:>9.1f}{r['rollout_s']:>11.1f}{reward:>10}{acc:>9}{r['drafter_steps']:>15}"
              "  " + " ".join(f"{w:.1f}" for w in r["steps"]))
    step_ratios = [o / t for o, t in zip(off["steps"], tlt["steps"])]
    print("SD off / TLT step time per step: " + " ".join(f"{x:.2f}" for x in step_ratios))
    from tlt.controller.report import read_log, write_report

    report = write_report({r["label"]: read_log(r["log"]) for r in results}, args.out / "report",
                          title="TLT vs SD off vs frozen drafter")
    print(f"report: {report}")
    print(f"RESULT e2e_speedup={off['steps_s'] / tlt['steps_s']:.2f} "
          f"rollout_speedup={off['rollout_s'] / tlt['rollout_s']:.2f} "
          f"frozen_e2e_speedup={off['steps_s'] / frozen['steps_s']:.2f} "
          f"step_speedup_median={statistics.median(step_ratios):.2f} "
          f"reward_tlt={tlt['final_reward']} reward_off={off['final_reward']} reward_frozen={frozen['final_reward']} "
          f"accept_len_tlt={tlt['acc'] or 0:.2f} accept_len_frozen={frozen['acc'] or 0:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
