"""BEG-MAB: the adaptive speculative-decoding strategy selector of TLT (bucketed epsilon-greedy bandit).

Whether speculation pays off, and with how big a draft tree, depends on the running batch size: large
batches are already compute-bound, so verifying a wide tree costs more than the extra accepted tokens
bring. BEG-MAB therefore keeps one multi-armed bandit per *batch-size bucket*:

* SD is off outright when the decode batch is larger than ``sd_batch_threshold``.
* Otherwise the batch's bucket picks an arm: every arm is tried once (in config order), after that
  epsilon-greedy: with probability ``epsilon`` a uniformly random arm, else the arm with the highest
  **mean** reward over its sliding window, which tracks the arm's throughput. (Not the median: an SD
  arm's tokens per iteration are skewed, many iterations emit one or two tokens and a few the whole path,
  so its median falls under its mean by how skewed it is, not by how fast it is: at batch 1 on the demo
  workload the median is 14% under the mean for ``8_4_32``, 5% for ``4_2_8``, 6% for plain decoding.)
* The reward is throughput: tokens emitted by the iteration (accepted drafts + bonus tokens, summed over
  the batch) divided by the iteration's wall time.
* OOM guard: only strategies whose ``num_verify * batch_size <= max_verify_tokens`` are eligible; if none
  fits, the smallest strategy is the only candidate.

Extension over the paper: with ``allow_sd_off_arm`` each bucket also has an ``"off"`` arm (plain decoding,
fed by :meth:`BegMabTuner.record_plain`). Since it competes on the same tokens/s reward, the tuner learns to
turn SD off in buckets where no strategy beats plain decoding, so adaptive SD is never (for long) slower
than no SD. Its state can be exported and loaded so that the next RL step starts warm.
"""

from __future__ import annotations

import itertools
import random
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tlt.errors import ConfigError

OFF = "off"
"""Arm name of plain decoding (``None`` strategy) in exported state and summaries."""

_STATE_VERSION = 1


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """Raise ConfigError unless ``value`` is an int in ``[low, high]`` (``high`` None: unbounded)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value and (high is None or value <= high)
    if not ok:
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name} must be an integer {allowed}, got {value!r}")


@dataclass(frozen=True)
class SpecStrategy:
    """One draft-tree shape: ``depth`` drafter steps, ``topk`` branching, ``num_verify`` verified nodes.

    ``num_verify`` counts the root; the drafted tree has ``topk + (depth - 1) * topk**2`` nodes, so
    ``2 <= num_verify <= 1 + topk + (depth - 1) * topk**2``.
    """

    depth: int
    topk: int
    num_verify: int

    def __post_init__(self) -> None:
        _check_int("strategy.depth", self.depth, 1)
        _check_int("strategy.topk", self.topk, 1)
        _check_int(f"strategy.num_verify (depth={self.depth}, topk={self.topk})", self.num_verify, 2,
                   self.max_verify)

    @property
    def max_verify(self) -> int:
        """Largest valid ``num_verify`` for this depth and topk (root + every drafted node)."""
        return 1 + self.topk + (self.depth - 1) * self.topk * self.topk

    @property
    def name(self) -> str:
        """``"depth_topk_verify"``, e.g. ``"4_2_8"``."""
        return f"{self.depth}_{self.topk}_{self.num_verify}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str) -> SpecStrategy:
        """Parse ``"depth_topk_verify"`` (e.g. ``"4_2_8"``); raises ConfigError on a malformed name."""
        parts = name.split("_") if isinstance(name, str) else []
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ConfigError(f"strategy must look like 'depth_topk_verify' (e.g. '4_2_8'), got {name!r}")
        return cls(*(int(p) for p in parts))


DEFAULT_STRATEGIES: tuple[str, ...] = ("2_1_3", "3_2_6", "4_2_8")
"""The strategy set of the tuner and of a job's ``rollout.speculative.strategies``. Every arm costs a first
try in every bucket, and a wide tree tried at batch 17-32 verifies hundreds of tokens: in same-process A/B
runs on the demo workload (64 prompts, CPU) adaptive SD was faster with this set than with the wider default
it replaced (``8_4_32 6_2_12 4_2_8 4_1_5 3_1_4``), cold and warm (README, *Benchmarks*)."""

#: ``sd_batch_threshold`` when a job leaves it unset, by the device the target runs on. On a GPU a decode
#: batch stays memory-bound up to a few dozen rows, so SD pays up to the paper's 32. On a CPU every row
#: costs compute: the rollout-peers threshold sweep (README, Benchmarks) had adaptive SD behind plain
#: decoding at 32 and 16 on the 64-prompt workload and level with it at 8.
SD_BATCH_THRESHOLD_BY_DEVICE: dict[str, int] = {"cuda": 32, "cpu": 8}


def default_sd_batch_threshold(device_type: str) -> int:
    """The SD batch threshold for a target on ``device_type`` (``torch.device.type``); other accelerators
    get the GPU value."""
    return SD_BATCH_THRESHOLD_BY_DEVICE.get(device_type, SD_BATCH_THRESHOLD_BY_DEVICE["cuda"])


def _default_strategies() -> list[SpecStrategy]:
    return [SpecStrategy.parse(n) for n in DEFAULT_STRATEGIES]


@dataclass
class TunerConfig:
    """Settings of :class:`BegMabTuner`; validated on construction (ConfigError names the field).

    Attributes:
        sd_batch_threshold: SD is off when the running decode batch is larger than this.
        strategies: candidate tree shapes (``SpecStrategy`` or names such as ``"4_2_8"``).
        bucket_bounds: strictly ascending batch-size lower bounds starting at 1; a batch size belongs to
            the bucket of the last bound ``<=`` it.
        epsilon: exploration probability once every arm of a bucket has been tried.
        window: reward samples kept per (bucket, arm); older ones slide out.
        min_consecutive_small_batches: SD is switched on only after this many consecutive batches at or
            below the threshold. The reference implementation waits 10 because turning SD on there
            re-prefills the running requests; here switching on costs only a drafter catch-up (the drafter
            consumes target features recorded during plain decoding), so the default is 1.
        max_verify_tokens: OOM guard, a strategy is eligible only if ``num_verify * batch_size`` fits.
        allow_sd_off_arm: add plain decoding as an arm of every bucket (extension over the paper).
        seed: seeds the exploration RNG.
    """

    sd_batch_threshold: int = 32
    strategies: list[SpecStrategy] = field(default_factory=_default_strategies)
    bucket_bounds: list[int] = field(default_factory=lambda: [1, 2, 3, 5, 9, 17])
    epsilon: float = 0.1
    window: int = 50
    min_consecutive_small_batches: int = 1
    max_verify_tokens: int = 2048
    allow_sd_off_arm: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("tuner.sd_batch_threshold", self.sd_batch_threshold, 0)
        if not isinstance(self.strategies, list | tuple) or not self.strategies:
            raise ConfigError(f"tuner.strategies must be a non-empty list, got {self.strategies!r}")
        self.strategies = [SpecStrategy.parse(s) if isinstance(s, str) else s for s in self.strategies]
        for s in self.strategies:
            if not isinstance(s, SpecStrategy):
                raise ConfigError(f"tuner.strategies entries must be SpecStrategy or 'depth_topk_verify', got {s!r}")
        names = [s.name for s in self.strategies]
        if len(set(names)) != len(names):
            raise ConfigError(f"tuner.strategies must not contain duplicates, got {names}")
        bounds = self.bucket_bounds
        if (not isinstance(bounds, list | tuple) or not bounds or bounds[0] != 1
                or any(isinstance(b, bool) or not isinstance(b, int) for b in bounds)
                or any(a >= b for a, b in itertools.pairwise(bounds))):
            raise ConfigError(f"tuner.bucket_bounds must be strictly ascending integers starting at 1, got {bounds!r}")
        self.bucket_bounds = list(bounds)
        eps = self.epsilon
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0.0 <= eps <= 1.0:
            raise ConfigError(f"tuner.epsilon must be in [0, 1], got {eps!r}")
        _check_int("tuner.window", self.window, 1)
        _check_int("tuner.min_consecutive_small_batches", self.min_consecutive_small_batches, 1)
        _check_int("tuner.max_verify_tokens", self.max_verify_tokens, 2)
        if not isinstance(self.allow_sd_off_arm, bool):
            raise ConfigError(f"tuner.allow_sd_off_arm must be true or false, got {self.allow_sd_off_arm!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"tuner.seed must be an integer, got {self.seed!r}")


class _Arm:
    """Sliding window of rewards (tokens/s) plus the total number of recorded pulls."""

    def __init__(self, window: int) -> None:
        self.rewards: deque[float] = deque(maxlen=window)
        self.pulls = 0

    def mean(self) -> float | None:
        return statistics.fmean(self.rewards) if self.rewards else None


class BegMabTuner:
    """Per-batch-size-bucket epsilon-greedy bandit over speculative strategies (and optionally "SD off")."""

    def __init__(self, config: TunerConfig | None = None) -> None:
        self.config = config if config is not None else TunerConfig()
        self._by_name = {s.name: s for s in self.config.strategies}
        self._rng = random.Random(self.config.seed)
        self._buckets = self._empty_buckets()
        self._small_streak = 0

    def _empty_buckets(self) -> dict[int, dict[str, _Arm]]:
        names = [*self._by_name, OFF]
        return {b: {n: _Arm(self.config.window) for n in names} for b in self.config.bucket_bounds}

    def bucket(self, batch_size: int) -> int:
        """The bucket (its lower bound) of ``batch_size >= 1``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return max(b for b in self.config.bucket_bounds if b <= batch_size)

    def choose(self, batch_size: int) -> SpecStrategy | None:
        """The strategy for the next decode iteration of ``batch_size`` sequences; None means plain decoding."""
        cfg = self.config
        if batch_size <= 0 or batch_size > cfg.sd_batch_threshold:
            self._small_streak = 0
            return None
        self._small_streak += 1
        if self._small_streak < cfg.min_consecutive_small_batches:
            return None
        fitting = [s for s in cfg.strategies if s.num_verify * batch_size <= cfg.max_verify_tokens]
        if not fitting:
            fitting = [min(cfg.strategies, key=lambda s: (s.num_verify, s.depth * s.topk))]
        candidates: list[str] = [s.name for s in fitting] + ([OFF] if cfg.allow_sd_off_arm else [])
        arms = self._buckets[self.bucket(batch_size)]
        untried = [n for n in candidates if not arms[n].rewards]
        if untried:
            pick = untried[0]
        elif self._rng.random() < cfg.epsilon:
            pick = candidates[self._rng.randrange(len(candidates))]
        else:  # max() keeps the first of equal means: ties go to config order
            pick = max(candidates, key=lambda n: arms[n].mean() or 0.0)
        return None if pick == OFF else self._by_name[pick]

    def record(self, batch_size: int, strategy: SpecStrategy, accepted_tokens: int, seconds: float) -> None:
        """Record one SD iteration: ``accepted_tokens`` (drafts + bonus, whole batch) emitted in ``seconds``."""
        if strategy.name not in self._by_name:
            raise ValueError(f"strategy {strategy.name} is not one of the tuner's strategies {list(self._by_name)}")
        self._add(batch_size, strategy.name, accepted_tokens, seconds)

    def record_plain(self, batch_size: int, tokens: int, seconds: float) -> None:
        """Record one plain-decoding iteration (the ``"off"`` arm): ``tokens`` emitted in ``seconds``."""
        self._add(batch_size, OFF, tokens, seconds)

    def _add(self, batch_size: int, arm: str, tokens: int, seconds: float) -> None:
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        if seconds <= 0:  # a clock too coarse for the iteration: no usable throughput sample
            return
        a = self._buckets[self.bucket(batch_size)][arm]
        a.rewards.append(tokens / seconds)
        a.pulls += 1

    def summary(self) -> dict[str, Any]:
        """Per bucket: best arm by mean tokens/s (None before any sample), means and pull counts."""
        out: dict[str, Any] = {}
        for b, arms in self._buckets.items():
            means = {n: m for n, a in arms.items() if (m := a.mean()) is not None}
            out[str(b)] = {
                "best": max(means, key=means.__getitem__) if means else None,
                "mean_tokens_per_s": means,
                "pulls": {n: a.pulls for n, a in arms.items() if a.pulls},
            }
        return out

    def export_state(self) -> dict[str, Any]:
        """JSON-serializable learned state: reward windows, pull counts, the RNG and the hysteresis streak."""
        version, internal, gauss = self._rng.getstate()
        return {
            "version": _STATE_VERSION,
            "buckets": {str(b): {n: {"rewards": list(a.rewards), "pulls": a.pulls} for n, a in arms.items() if a.pulls}
                        for b, arms in self._buckets.items()},
            "rng": [version, list(internal), gauss],
            "small_streak": self._small_streak,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Replace the learned state with one from :meth:`export_state`; ConfigError names a bad key.

        Windows longer than ``config.window`` keep their newest samples. The state is checked completely
        before anything is replaced.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else state
            raise ConfigError(f"tuner state.version must be {_STATE_VERSION}, got {got!r}")
        buckets = self._empty_buckets()
        raw_buckets = state.get("buckets")
        if not isinstance(raw_buckets, dict):
            raise ConfigError(f"tuner state.buckets must be a mapping, got {raw_buckets!r}")
        for key, raw_arms in raw_buckets.items():
            where = f"tuner state.buckets[{key!r}]"
            if not isinstance(key, str) or not key.isdigit() or int(key) not in buckets:
                raise ConfigError(f"{where}: not a bucket of tuner.bucket_bounds {self.config.bucket_bounds}")
            if not isinstance(raw_arms, dict):
                raise ConfigError(f"{where} must be a mapping of arm name to window")
            for name, raw in raw_arms.items():
                if name not in buckets[int(key)]:
                    raise ConfigError(f"{where}[{name!r}]: unknown arm (known: {[*self._by_name, OFF]})")
                rewards, pulls = (raw.get("rewards"), raw.get("pulls")) if isinstance(raw, dict) else (None, None)
                if (not isinstance(rewards, list) or not all(isinstance(r, int | float) and r >= 0 for r in rewards)
                        or not isinstance(pulls, int) or pulls < len(rewards)):
                    raise ConfigError(f"{where}[{name!r}] must hold 'rewards' (non-negative numbers) and "
                                      f"'pulls' (an integer >= len(rewards)), got {raw!r}")
                arm = buckets[int(key)][name]
                arm.rewards.extend(float(r) for r in rewards)
                arm.pulls = pulls
        rng = random.Random()
        try:
            version, internal, gauss = state["rng"]
            rng.setstate((version, tuple(internal), gauss))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"tuner state.rng is missing or corrupt: {e}") from e
        streak = state.get("small_streak", 0)
        if isinstance(streak, bool) or not isinstance(streak, int) or streak < 0:
            raise ConfigError(f"tuner state.small_streak must be an integer >= 0, got {streak!r}")
        self._buckets, self._rng, self._small_streak = buckets, rng, streak

    @classmethod
    def from_state(cls, config: TunerConfig, state: dict[str, Any]) -> BegMabTuner:
        """A tuner with ``config`` that continues from ``state`` (see :meth:`export_state`)."""
        tuner = cls(config)
        tuner.load_state(state)
        return tuner
