"""A synthetic reasoning task with verifiable answers and long-tailed chains of thought.

A problem is a start number and a list of operations (``+d``, ``-d``, ``*d`` with a one-digit
operand ``d``) applied **left to right**, with no operator precedence::

    prompt:    "Q: 5+7*3-4=?\\nA:"
    response:  " 5+7=12\\n12*3=36\\n36-4=32\\n#### 32"     (then the EOS token)

The response is a chain of thought with one line per operation ("previous value, operation, new
value") and a final ``#### N`` line with the answer; a model appends EOS (``<|endoftext|>``) after
it. Operations are drawn so that every intermediate value of the correct computation stays in
``[0, max_value]`` (99 by default): numbers have at most two digits, which a small character-level
model can learn.

The number of operations is heavy-tailed: ``P(k) ∝ k^-alpha`` for ``k = 1..max_steps`` (a
truncated discrete Pareto / zeta law; ``alpha=1.5, max_steps=40`` by default), so most problems
take 1-4 steps and a few take 20-40. Response lengths are therefore long-tailed, which is the
regime TLT's adaptive speculative decoding targets.

:func:`solution_trace` can inject arithmetic slips (a step's result off by a few) so that a model
fine-tuned on the traces is imperfect and leaves room for RL; :func:`score` is the verifiable
reward (1.0 when the ``#### N`` answer is right, else 0.0).

Every function here is pure: randomness comes only from an explicit seed or ``random.Random``.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

OPERATORS = ("+", "-", "*")
STEP_LABELS = string.ascii_lowercase + string.ascii_uppercase  # step k (1-based) is labelled STEP_LABELS[k-1]
MAX_STEPS = len(STEP_LABELS)
ANSWER_MARK = "####"
_ANSWER_LINE = re.compile(r"\s*####\s*(-?\d+)\s*")


@dataclass(frozen=True)
class DemoProblem:
    """One problem: ``start`` then ``steps`` (operation strings such as ``"+7"``), applied left to right.

    ``prompt`` is the text given to the model and ``answer`` the correct final value.
    """

    prompt: str
    answer: int
    steps: tuple[str, ...]
    start: int

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @classmethod
    def from_steps(cls, start: int, steps: Sequence[str]) -> DemoProblem:
        """Build a problem (prompt and answer) from a start value and operation strings."""
        steps = tuple(steps)
        if not 1 <= len(steps) <= MAX_STEPS:
            raise ValueError(f"a problem needs 1 to {MAX_STEPS} operations, got {len(steps)}")
        value = start
        for op in steps:
            value = apply_op(value, op)
        return cls(prompt=format_prompt(start, steps), answer=value, steps=steps, start=start)


def format_prompt(start: int, steps: Sequence[str]) -> str:
    """``"Q: 5 a+7 b*3 c-4 =?\\nA:"`` for start 5 and steps ``("+7", "*3", "-4")``."""
    labelled = " ".join(f"{label}{op}" for label, op in zip(STEP_LABELS, steps))
    return f"Q: {start} {labelled} =?\nA:"


def apply_op(value: int, op: str) -> int:
    """Apply one operation string (``"+7"``, ``"-4"``, ``"*3"``) to ``value``."""
    operator, operand = op[0], int(op[1:])
    if operator == "+":
        return value + operand
    if operator == "-":
        return value - operand
    if operator == "*":
        return value * operand
    raise ValueError(f"unknown operation {op!r}; use one of {OPERATORS}")


def step_count_weights(max_steps: int = 40, alpha: float = 1.5) -> list[float]:
    """Normalised ``P(k) ∝ k^-alpha`` for ``k = 1..max_steps`` (index ``k-1``)."""
    raw = [k**-alpha for k in range(1, max_steps + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def _valid_ops(value: int, max_value: int, max_operand: int, operators: str) -> list[str]:
    ops = [f"+{d}" for d in range(1, max_operand + 1) if value + d <= max_value]
    ops += [f"-{d}" for d in range(1, max_operand + 1) if value - d >= 0]
    ops += [f"*{d}" for d in range(2, max_operand + 1) if value * d <= max_value]
    return [op for op in ops if op[0] in operators]


def sample_problem(rng: random.Random, *, num_steps: int, max_value: int = 99, max_operand: int = 9,
                   max_start: int = 20, operators: str = "+-*") -> DemoProblem:
    """One problem with ``num_steps`` operations, every correct intermediate value in ``[0, max_value]``.

    The operator is chosen uniformly among those that have a valid operand, then the operand
    uniformly (so ``*`` is as frequent as ``+`` and ``-`` wherever it can apply).
    """
    start = rng.randint(0, max_start)
    value, steps = start, []
    for _ in range(num_steps):
        by_operator: dict[str, list[str]] = {}
        for op in _valid_ops(value, max_value, max_operand, operators):
            by_operator.setdefault(op[0], []).append(op)
        choices = by_operator[rng.choice(sorted(by_operator))]
        op = rng.choice(choices)
        steps.append(op)
        value = apply_op(value, op)
    return DemoProblem.from_steps(start, steps)


def generate_problems(n: int, seed: int, *, max_steps: int = 40, alpha: float = 1.5, max_value: int = 99,
                      max_operand: int = 9, max_start: int = 20, operators: str = "+-*") -> list[DemoProblem]:
    """``n`` problems, deterministic in ``seed``, with a heavy-tailed number of steps (see module doc)."""
    if not 1 <= max_steps <= MAX_STEPS or max_operand < 2 or max_value < max_operand:
        raise ValueError(f"need 1 <= max_steps <= {MAX_STEPS}, max_operand >= 2 and max_value >= max_operand")
    if not set(operators) <= set(OPERATORS) or not set(operators) & {"+", "-"}:
        raise ValueError(f"operators must be drawn from {OPERATORS} and include '+' or '-', got {operators!r}")
    rng = random.Random(seed)
    counts = rng.choices(range(1, max_steps + 1), weights=step_count_weights(max_steps, alpha), k=n)
    return [sample_problem(rng, num_steps=k, max_value=max_value, max_operand=max_operand, max_start=max_start,
                           operators=operators) for k in counts]


def solution_trace(problem: DemoProblem, error_rate: float = 0.0, rng: random.Random | None = None,
                   max_slip: int = 9) -> str:
    """The chain-of-thought response for ``problem`` (without EOS), e.g. ``" 5+7=12\\n12*3=36\\n#### 36"``.

    With probability ``error_rate`` per step the step's result is off by a nonzero amount of at most
    ``max_slip`` (an arithmetic slip; it never turns a non-negative value negative); later steps
    continue from the wrong value, as a real slip would, so the final answer is wrong. ``rng`` is
    required when ``error_rate > 0``.
    """
    if error_rate > 0 and rng is None:
        raise ValueError("solution_trace needs an rng when error_rate > 0")
    value, lines = problem.start, []
    for label, op in zip(STEP_LABELS, problem.steps):
        result = apply_op(value, op)
        if error_rate > 0 and rng.random() < error_rate:
            slips = [d for d in range(-max_slip, max_slip + 1) if d > 0 or (d < 0 and result + d >= 0)]
            result += rng.choice(slips)
        lines.append(f"{label} {value:02d}{op}={result:02d}")
        value = result
    lines.append(f"{ANSWER_MARK} {value}")
    return " " + "\n".join(lines)


def extract_answer(text: str) -> int | None:
    """The integer on the first ``#### N`` line of ``text``, or None if there is none.

    The line must hold only the mark and an integer (surrounding whitespace allowed): ``"#### 12"``
    gives 12, ``"#### -3"`` gives -3, ``"#### 12x"``, ``"####"`` and ``"12"`` give None.
    """
    for line in text.splitlines():
        if line.lstrip().startswith(ANSWER_MARK):
            match = _ANSWER_LINE.fullmatch(line)
            return int(match.group(1)) if match else None
    return None


def score(text: str, problem: DemoProblem) -> float:
    """Verifiable reward: 1.0 if the response's ``#### N`` answer equals ``problem.answer``, else 0.0."""
    return 1.0 if extract_answer(text) == problem.answer else 0.0
