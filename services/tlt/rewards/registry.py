"""Reward functions by name, and the reward that fits a veRL ``data_source``."""

from __future__ import annotations

from collections.abc import Callable

from tlt.errors import ConfigError
from tlt.rewards.demo import demo_reward
from tlt.rewards.math import math_reward

RewardFn = Callable[[str, str], float]
"""``reward(response_text, ground_truth) -> float`` in ``[0, 1]``."""

REWARDS: dict[str, RewardFn] = {"demo": demo_reward, "math": math_reward}
MATH_SOURCES = ("gsm8k", "math", "aime", "numina")  # substrings of data_source that select the math reward


def reward_fn(name: str) -> RewardFn:
    """The reward called ``name`` (``"demo"`` or ``"math"``); any other name is a ConfigError."""
    try:
        return REWARDS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"reward: unknown reward {name!r}; valid rewards: {', '.join(REWARDS)}") from None


def reward_name_for_source(data_source: str) -> str:
    """The reward name for a veRL ``data_source``.

    ``"demo"`` gives ``"demo"``; a source containing gsm8k, math, aime or numina (any case, e.g.
    ``"openai/gsm8k"``, ``"lighteval/MATH"``) gives ``"math"``; anything else also gives ``"math"``,
    the most general checker.
    """
    source = str(data_source).strip().lower()
    if source == "demo":
        return "demo"
    if any(marker in source for marker in MATH_SOURCES):
        return "math"
    return "math"
