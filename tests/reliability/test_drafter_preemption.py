"""Drafter training preempted at random moments: every published version is complete and loads, each
stint resumes from the last merged state, and acceptance keeps improving across preemptions."""

from __future__ import annotations

import random

import torch

from tests.integration.test_adaptive_drafter import acceptance, drift_policy
from tlt.drafter.aggregator import DRAFTER_KIND, DrafterAggregator
from tlt.drafter.spot import SpotDrafterTrainer
from tlt.models.drafter_io import copy_drafter_tensors, drafter_state_dict, load_drafter
from tlt.models.loader import load_model
from tlt.rollout.engine import RolloutEngine
from tlt.rollout.tuner import BegMabTuner, SpecStrategy, TunerConfig
from tlt.store import ArtifactStore


def test_random_preemptions_never_tear_a_version_and_acceptance_keeps_rising(tmp_path, demo_model_dir,
                                                                                demo_drafter_dir):
    policy = load_model(demo_model_dir, dtype="float32")
    drift_policy(policy)
    target = policy.to(torch.bfloat16)
    drafter = load_drafter(demo_drafter_dir, target)
    tuner = BegMabTuner(TunerConfig(sd_batch_threshold=10**6, strategies=[SpecStrategy.parse("4_2_8")],
                                    allow_sd_off_arm=False))
    engine = RolloutEngine(target, max_running=32, drafter=drafter, tuner=tuner)
    levels = [acceptance(engine, seed=5)]
    _, prompts, outs = levels[0]

    store = ArtifactStore(tmp_path / "store")
    aggregator = DrafterAggregator(load_drafter(demo_drafter_dir, target).float(), store, 0)
    spot = SpotDrafterTrainer(target, drafter, lambda d, t: aggregator.push_delta("w0", d, t), lr=1e-3,
                              batch_size=8, push_every=5, ttt_steps=4, seed=1)
    for p, o in zip(prompts, outs):
        spot.add_response(p, o.token_ids)
    rng = random.Random(0)
    trained = 0
    for round_ in range(2):
        while trained < 30 * (round_ + 1):
            budget = rng.randint(1, 9)  # preempted after a random number of steps, mid push interval
            steps = {"n": 0}

            def preempt(budget=budget, steps=steps) -> bool:
                steps["n"] += 1
                return steps["n"] > budget

            version, base = aggregator.base()
            spot.start_from(base)  # resume from the last merged state, never from a stale copy
            report = spot.train(preempt)
            assert report.preempted and report.steps == budget
            trained += report.steps
            published = aggregator.publish({"stint": budget})
            assert published == version + 1  # the partial work since the last push was pushed on preemption
            latest = store.latest(DRAFTER_KIND)
            assert latest.version == published
            loaded = store.load_tensors(DRAFTER_KIND, published)  # verified against the manifest's checksum
            for name, value in drafter_state_dict(aggregator.drafter).items():
                assert torch.equal(loaded[name], value.to(loaded[name].dtype)), name
        copy_drafter_tensors(drafter, drafter_state_dict(aggregator.drafter), "aggregated drafter")
        levels.append(acceptance(engine, seed=6 + round_))
    lengths = [level[0] for level in levels]
    assert lengths[1] > lengths[0] + 0.2 and lengths[2] > lengths[0] + 0.5, lengths
