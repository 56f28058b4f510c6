"""Reward of the synthetic demo task (:mod:`tlt.data.demo_task`): 1.0 when the ``#### N`` answer is right."""

from __future__ import annotations

from tlt.data.demo_task import extract_answer
from tlt.errors import ConfigError


def demo_reward(response: str, ground_truth: str) -> float:
    """1.0 if the response's ``#### N`` line holds ``int(ground_truth)``, else 0.0.

    The answer is parsed by :func:`tlt.data.demo_task.extract_answer` (the task's own checker). A
    ground truth that is not an integer means the demo reward was chosen for other data: that is a
    :class:`~tlt.errors.ConfigError`, not a silent zero.
    """
    try:
        truth = int(str(ground_truth).strip())
    except ValueError:
        raise ConfigError(f"reward 'demo' needs an integer ground truth, got {ground_truth!r}; "
                          "set reward: math (or auto) for this dataset") from None
    return 1.0 if extract_answer(response) == truth else 0.0
