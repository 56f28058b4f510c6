"""A drafter-training spot worker as its own process, for preemption tests: it starts from the newest
drafter version in the store, trains on the responses in ``--examples`` and pushes deltas to a drafter
service over gRPC until it is preempted. SIGTERM is a graceful preemption (the unpushed work is pushed on
the way out); SIGKILL loses what was not pushed yet. Prints ``start version=V`` and, after every push,
``pushed steps=S``, where S counts the steps whose work has reached the aggregator."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path

import torch

from tlt.drafter.aggregator import trainable_state
from tlt.drafter.service import RemoteDrafter
from tlt.drafter.spot import SpotDrafterTrainer
from tlt.models.drafter_io import copy_drafter_tensors, load_drafter
from tlt.models.loader import load_model
from tlt.store import ArtifactStore
from tlt.store.kinds import DRAFTER_KIND


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--drafter-init", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--aggregator", required=True)
    ap.add_argument("--examples", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    preempted: list[int] = []  # a list, not an Event: a signal handler must take no lock (tlt.rpc.server)
    signal.signal(signal.SIGTERM, lambda signum, _frame: preempted.append(signum))

    target = load_model(args.model, dtype="bfloat16")
    drafter = load_drafter(args.drafter_init, target)
    store = ArtifactStore(args.store)
    latest = store.latest(DRAFTER_KIND)
    copy_drafter_tensors(drafter, store.load_tensors(DRAFTER_KIND, latest.version), f"drafter v{latest.version}")
    remote = RemoteDrafter(args.aggregator)
    steps = {"trained": 0, "pushed": 0}

    def push(delta: dict[str, torch.Tensor], tokens: int) -> None:
        remote.push_delta(f"spot-{args.seed}", delta, tokens)
        steps["pushed"] = steps["trained"]
        print(f"pushed steps={steps['pushed']}", flush=True)

    spot = SpotDrafterTrainer(target, drafter, push, lr=1e-3, batch_size=8, push_every=4, ttt_steps=4,
                              seed=args.seed)
    for prompt, response in json.loads(Path(args.examples).read_text()):
        spot.add_response(prompt, response)
    spot.start_from(trainable_state(drafter))  # resume from the newest merged and published state
    print(f"start version={latest.version}", flush=True)

    def count_step(*_: object) -> None:  # after every optimizer step, a preempted part-step included
        steps["trained"] += 1

    spot.optimizer.register_step_post_hook(count_step)
    spot.train(lambda: bool(preempted))
    remote.close()


if __name__ == "__main__":
    main()
