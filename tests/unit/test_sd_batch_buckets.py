"""Decode iterations counted per batch-size bucket with SD on or off, and their metric
``tlt_rollout_batch_decode_iterations_total{sd, batch_size}`` (the "SD on/off by batch size" panels)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tlt import metrics as m
from tlt.config import job_spec_from_dict
from tlt.drafter.warmup import new_drafter
from tlt.models import load_model
from tlt.rollout.engine import RolloutEngine
from tlt.rollout.sampling import SamplingParams
from tlt.rollout.speculative import SpecDecodeStats
from tlt.rollout.tuner import BegMabTuner, TunerConfig
from tlt.rollout.worker import RolloutWorker, add_stats, bucket_labels
from tlt.store import ArtifactStore

BOUNDS = [1, 2, 3, 5]
# ragged lengths so the batch shrinks through every bucket as requests finish
MAX_NEW_TOKENS = (3, 5, 7, 9, 12, 16)


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (4 + i,), generator=g).tolist() for i in range(len(MAX_NEW_TOKENS))]


def _params() -> list[SamplingParams]:
    return [SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True) for n in MAX_NEW_TOKENS]


@pytest.fixture(scope="module")
def target(peaky_model_dir):
    return load_model(peaky_model_dir, dtype="float32")


def test_iterations_are_counted_in_the_bucket_of_the_decode_batch(target):
    # no "off" arm and threshold 2: SD runs exactly when 1 or 2 requests decode
    tuner = BegMabTuner(TunerConfig(sd_batch_threshold=2, strategies=["3_1_4"], bucket_bounds=BOUNDS, epsilon=0.0,
                                    allow_sd_off_arm=False))
    engine = RolloutEngine(target, max_running=6, drafter=new_drafter(target, seed=0), tuner=tuner)
    for prompt, params in zip(_prompts(target.config.vocab_size), _params(), strict=True):
        engine.submit(prompt, params)
    expected: dict[bool, Counter[int]] = {True: Counter(), False: Counter()}
    while engine.has_work():
        batch = engine.progress().running  # the requests the next step decodes
        sd_before = engine.stats.sd_iterations
        engine.step()
        if batch:
            sd = engine.stats.sd_iterations > sd_before
            assert sd == (batch <= 2), f"batch {batch}: SD {'on' if sd else 'off'}"
            expected[sd][max(b for b in BOUNDS if b <= batch)] += 1
    stats = engine.stats
    assert stats.sd_iterations_by_bucket == dict(expected[True])
    assert stats.plain_iterations_by_bucket == dict(expected[False])
    assert set(stats.sd_iterations_by_bucket) == {1, 2} and set(stats.plain_iterations_by_bucket) == {3, 5}
    assert sum(stats.sd_iterations_by_bucket.values()) == stats.sd_iterations
    assert sum(stats.plain_iterations_by_bucket.values()) == stats.plain_iterations


def test_plain_engine_counts_in_the_default_buckets(target):
    engine = RolloutEngine(target, max_running=6)
    engine.generate(_prompts(target.config.vocab_size), _params())
    assert engine.bucket_bounds == TunerConfig().bucket_bounds
    assert engine.stats.sd_iterations_by_bucket == {}
    assert set(engine.stats.plain_iterations_by_bucket) == {1, 2, 3, 5}
    assert sum(engine.stats.plain_iterations_by_bucket.values()) == engine.stats.plain_iterations


def test_add_stats_sums_bucket_counts():
    a = SpecDecodeStats(sd_iterations_by_bucket={1: 2}, plain_iterations_by_bucket={3: 1, 5: 4})
    b = SpecDecodeStats(sd_iterations_by_bucket={1: 1, 2: 5}, plain_iterations_by_bucket={5: 1})
    total = add_stats(a, b)
    assert total.sd_iterations_by_bucket == {1: 3, 2: 5}
    assert total.plain_iterations_by_bucket == {3: 1, 5: 5}
    assert a.sd_iterations_by_bucket == {1: 2}  # the operands are left alone


def test_bucket_labels_name_the_batch_sizes_of_each_bucket():
    assert bucket_labels([1, 2, 3, 5, 9, 17]) == {1: "1", 2: "2", 3: "3-4", 5: "5-8", 9: "9-16", 17: "17+"}
    assert bucket_labels([1]) == {1: "1+"}
    assert bucket_labels([]) == {}


def test_worker_exports_every_bucket_for_both_sd_states(target, peaky_model_dir, tmp_path):
    spec = job_spec_from_dict({
        "name": "buckets", "output_dir": str(tmp_path / "run"),
        "model": {"path": str(peaky_model_dir), "dtype": "float32"},
        "rollout": {"max_running": 6, "speculative": {"mode": "adaptive", "sd_batch_threshold": 2,
                                                       "strategies": ["3_1_4"]}},
        "store": {"uri": str(tmp_path / "store")},
    })
    worker = RolloutWorker("w0", target, spec, new_drafter(target, seed=0), ArtifactStore(spec.store_uri))
    worker.engine.generate(_prompts(target.config.vocab_size), _params())
    stats = worker.engine.stats
    samples = {(labels["sd"], labels["batch_size"]): value for metric, labels, value in worker.metric_samples()
               if metric is m.ROLLOUT_BATCH_DECODE_ITERATIONS and labels["worker"] == "w0"}
    labels = bucket_labels(worker.engine.bucket_bounds)
    assert samples == {(sd, label): counts.get(bucket, 0) for sd, counts in
                       (("on", stats.sd_iterations_by_bucket), ("off", stats.plain_iterations_by_bucket))
                       for bucket, label in labels.items()}
    assert samples[("off", "17+")] == samples[("on", "17+")] == 0  # never reached, still exported
    assert sum(v for (sd, _), v in samples.items() if sd == "on") == stats.sd_iterations > 0
    assert sum(v for (sd, _), v in samples.items() if sd == "off") == stats.plain_iterations > 0
