"""BEG-MAB tuner: SD on/off threshold, buckets, exploration order, convergence, OOM guard, state, validation."""

from __future__ import annotations

import json
import random

import pytest

from tlt.config import SpeculativeSpec
from tlt.errors import ConfigError
from tlt.rollout.tuner import OFF, BegMabTuner, SpecStrategy, TunerConfig

ARM_NAMES = ["8_4_32", "6_2_12", "4_2_8", "4_1_5", "3_1_4"]  # the arms of MEANS, in exploration order


def config(**kwargs) -> TunerConfig:
    """A TunerConfig over the five strategies of MEANS."""
    return TunerConfig(strategies=ARM_NAMES, **kwargs)


def _pull(tuner: BegMabTuner, batch_size: int, means: dict[str, float], rng: random.Random, sd: float = 30.0) -> str:
    """One choose + record round with a noisy synthetic tokens/s reward; returns the arm name."""
    strategy = tuner.choose(batch_size)
    name = OFF if strategy is None else strategy.name
    tokens = max(0.0, rng.gauss(means[name], sd))  # one second per iteration: tokens == tokens/s
    if strategy is None:
        tuner.record_plain(batch_size, int(tokens), 1.0)
    else:
        tuner.record(batch_size, strategy, int(tokens), 1.0)
    return name


MEANS = {"8_4_32": 120.0, "6_2_12": 150.0, "4_2_8": 200.0, "4_1_5": 175.0, "3_1_4": 160.0, OFF: 100.0}


def test_strategy_parse_and_name() -> None:
    s = SpecStrategy.parse("4_2_8")
    assert (s.depth, s.topk, s.num_verify) == (4, 2, 8)
    assert s.name == str(s) == "4_2_8"
    assert s == SpecStrategy(4, 2, 8)
    assert SpecStrategy(2, 2, 7).max_verify == 7  # root + 2 + 2*2
    assert SpecStrategy(3, 1, 4).max_verify == 4


@pytest.mark.parametrize("name", ["4_2", "4_2_8_1", "a_b_c", "4-2-8", "", "4_2_-8"])
def test_strategy_parse_rejects_malformed(name: str) -> None:
    with pytest.raises(ConfigError, match="depth_topk_verify"):
        SpecStrategy.parse(name)


@pytest.mark.parametrize(("args", "field"), [
    ((0, 1, 2), "strategy.depth"),
    ((1, 0, 2), "strategy.topk"),
    ((1, 1, 1), "strategy.num_verify"),
    ((1, 1, 3), "strategy.num_verify"),
    ((2, 2, 8), r"strategy.num_verify .*\[2, 7\]"),
])
def test_strategy_validation(args: tuple[int, int, int], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        SpecStrategy(*args)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sd_batch_threshold": -1}, "tuner.sd_batch_threshold"),
    ({"sd_batch_threshold": 2.5}, "tuner.sd_batch_threshold"),
    ({"strategies": []}, "tuner.strategies"),
    ({"strategies": ["4_2_8", "4_2_8"]}, "tuner.strategies must not contain duplicates"),
    ({"strategies": [(4, 2, 8)]}, "tuner.strategies entries"),
    ({"strategies": ["4_2_9_"]}, "depth_topk_verify"),
    ({"bucket_bounds": [2, 4]}, "tuner.bucket_bounds"),
    ({"bucket_bounds": [1, 4, 4]}, "tuner.bucket_bounds"),
    ({"bucket_bounds": []}, "tuner.bucket_bounds"),
    ({"epsilon": 1.5}, r"tuner.epsilon must be in \[0, 1\], got 1.5"),
    ({"epsilon": -0.1}, "tuner.epsilon"),
    ({"window": 0}, "tuner.window"),
    ({"min_consecutive_small_batches": 0}, "tuner.min_consecutive_small_batches"),
    ({"max_verify_tokens": 1}, "tuner.max_verify_tokens"),
    ({"allow_sd_off_arm": "yes"}, "tuner.allow_sd_off_arm"),
    ({"seed": "x"}, "tuner.seed"),
])
def test_bad_config_raises_config_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TunerConfig(**kwargs)


def test_default_config() -> None:
    cfg = TunerConfig()
    assert [s.name for s in cfg.strategies] == ["2_1_3", "3_2_6", "4_2_8"]
    assert tuple(s.name for s in cfg.strategies) == SpeculativeSpec().strategies  # one default for both
    assert TunerConfig(strategies=["3_1_4"]).strategies == [SpecStrategy(3, 1, 4)]


def test_threshold_turns_sd_off() -> None:
    tuner = BegMabTuner(TunerConfig(sd_batch_threshold=32))
    assert tuner.choose(0) is None
    assert tuner.choose(33) is None
    assert tuner.choose(1000) is None
    assert tuner.choose(32) is not None
    assert tuner.choose(1) is not None
    assert BegMabTuner(TunerConfig(sd_batch_threshold=0)).choose(1) is None


def test_hysteresis_waits_for_consecutive_small_batches() -> None:
    tuner = BegMabTuner(TunerConfig(min_consecutive_small_batches=3))
    assert [tuner.choose(4) for _ in range(2)] == [None, None]
    assert tuner.choose(4) is not None
    assert tuner.choose(4) is not None
    assert tuner.choose(64) is None  # a large batch resets the streak
    assert tuner.choose(4) is None


@pytest.mark.parametrize(("batch", "bucket"), [(1, 1), (2, 2), (3, 3), (4, 3), (5, 5), (8, 5), (9, 9), (16, 9),
                                               (17, 17), (500, 17)])
def test_bucket_mapping(batch: int, bucket: int) -> None:
    assert BegMabTuner().bucket(batch) == bucket


def test_every_arm_tried_once_in_order_before_exploiting() -> None:
    tuner = BegMabTuner(config(epsilon=0.0))
    rng = random.Random(0)
    tried = [_pull(tuner, 4, MEANS, rng, sd=0.0) for _ in range(6)]
    assert tried == [*ARM_NAMES, OFF]
    assert tuner.choose(4).name == "4_2_8"  # then pure exploitation of the best mean
    # An unrecorded choice does not count as tried; another bucket starts from scratch.
    fresh = BegMabTuner(config(epsilon=0.0))
    assert [fresh.choose(4).name for _ in range(3)] == ["8_4_32"] * 3
    assert tuner.choose(20).name == "8_4_32"


def test_sd_off_arm_wins_when_plain_decoding_is_fastest() -> None:
    means = {**MEANS, OFF: 500.0}
    tuner = BegMabTuner(config(epsilon=0.0))
    rng = random.Random(1)
    for _ in range(6):
        _pull(tuner, 2, means, rng, sd=0.0)
    assert tuner.choose(2) is None
    assert tuner.summary()["2"]["best"] == OFF
    no_off = BegMabTuner(config(epsilon=0.0, allow_sd_off_arm=False))
    assert [_pull(no_off, 2, means, rng, sd=0.0) for _ in range(8)].count(OFF) == 0


def test_converges_to_best_arm_under_noise() -> None:
    tuner = BegMabTuner(config(epsilon=0.1, seed=3))
    rng = random.Random(42)
    picks = [_pull(tuner, 4, MEANS, rng) for _ in range(500)]
    assert picks[-200:].count("4_2_8") >= 160
    summary = tuner.summary()["3"]
    assert summary["best"] == "4_2_8"
    assert sum(summary["pulls"].values()) == 500


def test_skewed_sd_rewards_are_scored_by_their_mean() -> None:
    """An SD iteration at batch 1 emits 1..depth+1 tokens in about the same time, mostly few: the arm's
    throughput is the mean of its rewards, which beats plain decoding here although its median does not."""
    tuner = BegMabTuner(TunerConfig(strategies=["4_2_8"], epsilon=0.0))
    strategy = SpecStrategy.parse("4_2_8")
    for i in range(20):
        tuner.record_plain(1, 1, 0.01)  # 100 tokens/s every time
        tuner.record(1, strategy, 1 if i % 5 < 3 else 4, 0.015)  # 67 or 267 tokens/s: median 67, mean 147
    assert tuner.choose(1) == strategy
    assert tuner.summary()["1"]["best"] == "4_2_8"


def test_oom_guard_limits_tree_size() -> None:
    tuner = BegMabTuner(config(max_verify_tokens=128, epsilon=0.5))
    rng = random.Random(0)
    picks = {_pull(tuner, 16, MEANS, rng) for _ in range(200)}
    assert picks == {"4_2_8", "4_1_5", "3_1_4", OFF}  # 12 * 16 and 32 * 16 exceed 128
    # Nothing fits: the smallest strategy is the only candidate.
    tight = BegMabTuner(config(max_verify_tokens=16, allow_sd_off_arm=False, epsilon=1.0))
    assert {tight.choose(8).name for _ in range(20)} == {"3_1_4"}


def test_record_validation_and_degenerate_timing() -> None:
    tuner = BegMabTuner(config())
    with pytest.raises(ValueError, match="not one of"):
        tuner.record(1, SpecStrategy(2, 1, 3), 3, 1.0)
    with pytest.raises(ValueError, match="tokens"):
        tuner.record_plain(1, -1, 1.0)
    tuner.record_plain(1, 5, 0.0)  # zero-length timing: dropped, not a division error
    assert tuner.summary()["1"]["pulls"] == {}
    tuner.record(1, SpecStrategy(4, 2, 8), 6, 0.5)
    assert tuner.summary()["1"]["mean_tokens_per_s"] == {"4_2_8": 12.0}


def _drive(tuner: BegMabTuner, rng: random.Random, n: int) -> list[str]:
    return [_pull(tuner, rng.choice([1, 3, 4, 12, 20, 40]), MEANS, rng) for _ in range(n)]


def test_export_load_roundtrip_continues_identically() -> None:
    cfg = config(seed=7, window=20)
    a = BegMabTuner(cfg)
    _drive(a, random.Random(5), 150)
    state = json.loads(json.dumps(a.export_state()))
    b = BegMabTuner.from_state(cfg, state)
    assert b.export_state() == a.export_state()
    assert b.summary() == a.summary()
    assert _drive(a, random.Random(9), 200) == _drive(b, random.Random(9), 200)


def test_load_state_truncates_to_smaller_window() -> None:
    a = BegMabTuner(config(window=50))
    for t in range(10):
        a.record_plain(1, t, 1.0)
    b = BegMabTuner.from_state(config(window=3), a.export_state())
    assert b.export_state()["buckets"]["1"][OFF] == {"rewards": [7.0, 8.0, 9.0], "pulls": 10}


@pytest.mark.parametrize(("mutate", "key"), [
    (lambda s: s.update(version=99), "state.version"),
    (lambda s: s.update(buckets=[]), "state.buckets"),
    (lambda s: s["buckets"].update({"4": {}}), r"state.buckets\['4'\]"),
    (lambda s: s["buckets"]["1"].update({"9_9_9": {"rewards": [], "pulls": 0}}), "'9_9_9'.*unknown arm"),
    (lambda s: s["buckets"]["1"].update({OFF: {"rewards": "x", "pulls": 1}}), r"\['off'\] must hold"),
    (lambda s: s["buckets"]["1"].update({OFF: {"rewards": [1.0, 2.0], "pulls": 1}}), r"\['off'\] must hold"),
    (lambda s: s.pop("rng"), "state.rng"),
    (lambda s: s.update(rng=[3, [1, 2], None]), "state.rng"),
    (lambda s: s.update(small_streak=-1), "state.small_streak"),
])
def test_load_state_rejects_corrupt_state(mutate, key: str) -> None:
    tuner = BegMabTuner(config())
    tuner.record_plain(1, 10, 1.0)
    before = tuner.export_state()
    state = json.loads(json.dumps(before))
    mutate(state)
    with pytest.raises(ConfigError, match=key):
        tuner.load_state(state)
    assert tuner.export_state() == before  # a failed load leaves the tuner untouched
