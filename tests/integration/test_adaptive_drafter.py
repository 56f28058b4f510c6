"""The Adaptive Drafter's point: after the policy drifts away from the drafter's training data, online
training on the policy's own responses (spot trainer -> aggregator -> reload) raises acceptance again."""

from __future__ import annotations

import random

import torch

from tlt.data.demo_task import generate_problems, solution_trace
from tlt.drafter.aggregator import DrafterAggregator
from tlt.drafter.spot import SpotDrafterTrainer
from tlt.models.demo_training import EOS_ID, collate, encode, masked_loss
from tlt.models.drafter_io import copy_drafter_tensors, drafter_state_dict, load_drafter
from tlt.models.loader import load_model
from tlt.rollout.engine import RolloutEngine
from tlt.rollout.sampling import SamplingParams
from tlt.rollout.tuner import BegMabTuner, SpecStrategy, TunerConfig


def drifted(text: str) -> str:
    """A new answer style the drafter never saw: 'a 05+7 is 12 ; b ...'."""
    return text.replace("=", " is ").replace("\n", " ; ")


def drift_policy(model, steps: int = 40, seed: int = 0) -> None:
    """Supervised fine-tuning of ``model`` (fp32, in place) on drifted traces."""
    rng = random.Random(seed)
    problems = generate_problems(steps * 32, seed + 99, max_steps=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for i in range(steps):
        batch = [(encode(p.prompt) + encode(drifted(solution_trace(p, 0.0, rng))) + [EOS_ID], len(encode(p.prompt)))
                 for p in problems[i * 32:(i + 1) * 32]]
        loss = masked_loss(model, *collate(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def acceptance(engine: RolloutEngine, seed: int, n: int = 32):
    engine.stats.__init__()
    prompts = [encode(p.prompt) for p in generate_problems(n, seed, max_steps=8)]
    params = [SamplingParams(temperature=1.0, max_new_tokens=200, seed=seed + i) for i in range(n)]
    outs = engine.generate(prompts, params)
    return engine.stats.acceptance_length, prompts, outs


def test_online_training_recovers_acceptance_on_a_drifted_policy(demo_model_dir, demo_drafter_dir):
    policy = load_model(demo_model_dir, dtype="float32")
    drift_policy(policy)
    target = policy.to(torch.bfloat16)
    drafter = load_drafter(demo_drafter_dir, target)
    tuner = BegMabTuner(TunerConfig(sd_batch_threshold=10**6, strategies=[SpecStrategy.parse("4_2_8")],
                                    allow_sd_off_arm=False))
    engine = RolloutEngine(target, max_running=32, drafter=drafter, tuner=tuner)
    before, prompts, outs = acceptance(engine, seed=5)

    master = load_drafter(demo_drafter_dir, target).float()
    aggregator = DrafterAggregator(master)
    spot = SpotDrafterTrainer(target, drafter, lambda d, t: aggregator.push_delta("w0", d, t), lr=1e-3,
                              batch_size=8, push_every=10, ttt_steps=4)
    for p, o in zip(prompts, outs):
        spot.add_response(p, o.token_ids)
    spot.start_from(aggregator.base()[1])
    report = spot.train(lambda: False, max_steps=60)
    assert report.pushes == 6 and aggregator.publish() == 1
    copy_drafter_tensors(drafter, drafter_state_dict(master), "aggregated drafter")  # what a reload does
    after, _, _ = acceptance(engine, seed=6)  # fresh prompts
    assert after > before + 0.5, (before, after)
