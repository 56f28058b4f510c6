"""Verifiable rewards ``reward(response, ground_truth) -> float``: the demo task's checker and a math checker.

:func:`reward_fn` looks a reward up by name (``"demo"``, ``"math"``) and :func:`reward_name_for_source`
picks one for a veRL ``data_source``.
"""

from tlt.rewards.demo import demo_reward
from tlt.rewards.math import extract_answer, math_reward
from tlt.rewards.registry import REWARDS, RewardFn, reward_fn, reward_name_for_source

__all__ = ["REWARDS", "RewardFn", "demo_reward", "extract_answer", "math_reward", "reward_fn",
           "reward_name_for_source"]
