"""Math-answer reward for GSM8K/MATH/AIME-style data.

The answer of a response is the content of its last closed ``\\boxed{...}`` (nested braces balanced),
else the text after its last ``#### `` mark (GSM8K), else its last number. The ground truth goes
through the same boxed/``####`` extraction, so a full GSM8K solution works as a ground truth.

Two answers are equal when a normalised comparison says so (``$``, spaces, ``\\text{}``, thousands
commas and a trailing ``.`` removed; numbers and fractions such as ``1/2``, ``\\frac12`` and ``0.5``
compared as exact rationals) or, failing that, when math-verify finds them symbolically equal.

Thread safety: math-verify bounds its work with ``signal.alarm``, which only works on the main thread.
Off the main thread its timeouts are disabled (``parsing_timeout=None``, ``timeout_seconds=None``),
and on every thread answers that could make sympy run for ever without yielding to a signal (power
towers, huge exponents or factorials, very long expressions) skip math-verify and are judged by the
normalised comparison alone.
"""

from __future__ import annotations

import logging
import re
import threading
from fractions import Fraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE = re.compile(r"\\boxed\s+([^\s$]+)")  # \boxed 5
_GSM8K = re.compile(r"####[ \t]*([^\n]*)")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\frac\s*\{([^{}]+)\}\s*\{([^{}]+)\}")
_FRAC_DIGITS = re.compile(r"\\frac\s*(\d)\s*(\d)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# Inputs that can make sympy compute for ever without yielding to a signal (power towers such as 9^{9^9},
# huge exponents or factorials): these skip math-verify.
_POW = r"(?:\^|\*\*)"
_RISKY = re.compile("|".join((
    _POW + r"\s*\{[^{}]*" + _POW,  # a^{b^c}
    _POW + r"\s*(?:[\w.]+|\{[^{}]*\}|\([^()]*\))\s*" + _POW,  # a^b^c, a**b**c, a^{b}^c
    _POW + r"\s*[{(]?\s*-?\d{5,}",  # 9^{99999}
    r"\d{4,}\s*!",  # 9999!
)))
_MAX_VERIFY_CHARS = 200
_MAIN_THREAD_TIMEOUT_S = 5


class _DropTimeoutWarning(logging.Filter):
    """math-verify warns once that timeouts are off; we bound its input instead (see module doc)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutWarning())


def last_boxed(text: str) -> str | None:
    """Content of the last closed ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, else None.

    An unclosed box (a truncated response) is skipped in favour of an earlier closed one;
    ``\\boxed 5`` (no braces) is accepted too.
    """
    found = None
    for match in _BOXED.finditer(text):
        depth = 1
        for j in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                found = (match.start(), text[match.end():j].strip())
                break
    bare = list(_BOXED_BARE.finditer(text))
    if bare and (found is None or bare[-1].start() > found[0]):
        return bare[-1].group(1)
    return found[1] if found else None


def extract_answer(text: str) -> str | None:
    """The final answer of a response: last boxed, else the last ``#### ...`` line, else the last number.

    ``"so \\boxed{\\frac{1}{2}}"`` gives ``"\\frac{1}{2}"``, ``"... #### 72"`` gives ``"72"``,
    ``"she has 1,234 apples."`` gives ``"1,234"`` and a text without any gives None.
    """
    boxed = last_boxed(text)
    if boxed:
        return boxed
    marks = [m.strip() for m in _GSM8K.findall(text) if m.strip()]
    if marks:
        return marks[-1]
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _gold_answer(ground_truth: str) -> str:
    """The ground truth's answer: its boxed or ``####`` part when it is a worked solution, else all of it."""
    text = str(ground_truth)
    boxed = last_boxed(text)
    if boxed:
        return boxed
    marks = [m.strip() for m in _GSM8K.findall(text) if m.strip()]
    return marks[-1] if marks else text.strip()


def normalize(answer: str) -> str:
    """A canonical string for ``answer``: no ``$``, spaces, ``\\text{}``, thousands commas or trailing ``.``.

    ``\\frac{a}{b}`` and ``\\frac12`` become ``(a)/(b)`` and ``1/2``.
    """
    s = answer.replace("\\$", "").replace("$", "").strip()
    s = _TEXT.sub(r"\1", s)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ ", " "):
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _FRAC.sub(r"(\1)/(\2)", s)
    s = _FRAC_DIGITS.sub(r"\1/\2", s)
    s = _THOUSANDS.sub("", s)
    return s.rstrip(".")


def _as_number(s: str) -> Fraction | None:
    """``s`` as an exact rational (``"3"``, ``"-0.5"``, ``"(1)/(2)"``, ``"1.5/3"``), else None."""
    parts = s.replace("(", "").replace(")", "").split("/")
    if len(parts) > 2:
        return None
    try:
        value = Fraction(parts[0])
        return value / Fraction(parts[1]) if len(parts) == 2 else value
    except (ValueError, ZeroDivisionError):
        return None


def normalized_equal(answer: str, ground_truth: str) -> bool:
    """Equal after :func:`normalize`, as strings or as exact rationals (the fallback comparison)."""
    a, b = normalize(answer), normalize(ground_truth)
    if a and a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    return x is not None and x == y


def _verifiable(s: str) -> bool:
    return len(s) <= _MAX_VERIFY_CHARS and not _RISKY.search(s)


def math_verify_equal(answer: str, ground_truth: str) -> bool | None:
    """math-verify's judgement of ``answer`` against ``ground_truth``; None if unavailable or unparsable.

    Safe on any thread (see the module docstring): timeouts are used on the main thread only.
    """
    if not (_verifiable(answer) and _verifiable(ground_truth)):
        return None
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    limit = _MAIN_THREAD_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(f"${ground_truth.strip().strip('$')}$", parsing_timeout=limit)
        pred = parse(f"${answer.strip().strip('$')}$", parsing_timeout=limit)
        if not gold or not pred:
            return None
        return bool(verify(gold, pred, timeout_seconds=limit))
    except Exception:  # math-verify and sympy raise many error types on odd input; treat as "cannot tell"
        return None


def math_reward(response: str, ground_truth: str) -> float:
    """1.0 if the response's final answer (:func:`extract_answer`) equals the ground truth's, else 0.0."""
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    truth = _gold_answer(ground_truth)
    if not truth:
        return 0.0
    if normalized_equal(answer, truth):
        return 1.0
    return 1.0 if math_verify_equal(answer, truth) else 0.0
