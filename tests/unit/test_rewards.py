"""Rewards: the demo checker, the math-answer checker (extraction, equivalence, threads) and the registry."""

import random
import threading

import pytest

from tlt.data.demo_task import generate_problems, solution_trace
from tlt.errors import ConfigError
from tlt.rewards import demo_reward, extract_answer, math_reward, reward_fn, reward_name_for_source
from tlt.rewards.math import last_boxed, normalize, normalized_equal


@pytest.mark.parametrize(("text", "expected"), [
    ("x \\boxed{\\frac{a}{b}} y", "\\frac{a}{b}"),
    ("\\boxed{\\left\\{1, \\{2\\}\\right\\}}", "\\left\\{1, \\{2\\}\\right\\}"),
    ("\\boxed{1} then \\boxed{{2}+{3}}", "{2}+{3}"),
    ("\\boxed{3} then a truncated \\boxed{4", "3"),
    ("\\fbox{5}", "5"),
    ("\\boxed 7", "7"),
    ("no box", None),
])
def test_last_boxed_balances_nested_braces(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("so \\boxed{x^{2}} and #### 5 and 6", "x^{2}"),
    ("Natalia sold 48+24 = 72 clips.\n#### 72\n", "72"),
    ("#### 1\nwait\n#### 2", "2"),
    ("1 then 2 then 3.5.", "3.5"),
    ("she has 1,234 apples", "1,234"),
    ("it is 5, then stop", "5"),
    ("half: 1/2", "1/2"),
    ("temperature -4", "-4"),
    ("no answer here", None),
    ("", None),
])
def test_extract_answer_order_boxed_then_gsm8k_then_last_number(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(("response", "truth", "expected"), [
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\frac12}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac12", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", 1.0),
    ("We get \\boxed{x^{2}+1}.", "x^2+1", 1.0),  # symbolic: needs math-verify
    ("\\boxed{\\sqrt{4}}", "2", 1.0),
    ("\\boxed{\\text{(B)}}", "B", 1.0),
    ("\\boxed{$1,000$.}", "1000", 1.0),
    ("Natalia sold 48+24 = 72 clips.\n#### 72", "72", 1.0),
    ("#### 72", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", 1.0),  # a full GSM8K solution
    ("The total is 1,234 apples.", "1234", 1.0),
    ("the result is 17", "18", 0.0),
    ("\\boxed{3} wait, actually \\boxed{4}", "4", 1.0),
    ("\\boxed{3} wait, actually \\boxed{4}", "3", 0.0),
    ("no answer here", "3", 0.0),
    ("", "3", 0.0),
    ("\\boxed{9^{9^{9}}}", "1", 0.0),  # a power tower skips math-verify instead of hanging
])
def test_math_reward(response, truth, expected):
    assert math_reward(response, truth) == expected


def test_fallback_normalisation_without_math_verify():
    assert normalize(" $\\text{12}$. ") == "12"
    assert normalize("1,234,567") == "1234567"
    assert normalize("\\frac{1}{2}") == "(1)/(2)"
    assert normalized_equal("\\frac12", "0.5")
    assert normalized_equal("\\frac{6}{4}", "1.5")
    assert normalized_equal("-3.", "-3")
    assert not normalized_equal("1/0", "1/0.0") and not normalized_equal("", "")
    assert not normalized_equal("2", "3")


def test_math_reward_from_worker_threads():
    """math-verify's signal-based timeouts must not be used off the main thread."""
    cases = [("\\boxed{\\sqrt{4}}", "2", 1.0), ("\\boxed{x^{2}+1}", "1+x^2", 1.0), ("\\boxed{\\pi}", "3", 0.0)]
    out: dict[int, float] = {}
    errors: list[BaseException] = []

    def work(i: int, response: str, truth: str) -> None:
        try:
            out[i] = math_reward(response, truth)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, *case[:2])) for i, case in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert [out[i] for i in range(len(cases))] == [case[2] for case in cases]


def test_demo_reward_on_real_traces():
    problems = generate_problems(20, seed=3)
    for problem in problems:
        assert demo_reward(solution_trace(problem), str(problem.answer)) == 1.0
        assert demo_reward(solution_trace(problem), str(problem.answer + 1)) == 0.0
    slipped = solution_trace(problems[0], error_rate=1.0, rng=random.Random(0))
    assert demo_reward(slipped, str(problems[0].answer)) == 0.0
    assert demo_reward("no answer line", "3") == 0.0
    assert demo_reward(" a 01+2=03\n#### 3", " 3 ") == 1.0
    with pytest.raises(ConfigError, match="integer ground truth"):
        demo_reward("#### 3", "x^2")


def test_registry_names_and_data_sources():
    assert reward_fn("demo") is demo_reward and reward_fn("math") is math_reward
    assert reward_name_for_source("demo") == "demo"
    for source in ("openai/gsm8k", "lighteval/MATH", "AIME-2024", "AI-MO/NuminaMath-CoT", "unknown", ""):
        assert reward_name_for_source(source) == "math"
    with pytest.raises(ConfigError) as info:
        reward_fn("code")
    message = str(info.value)
    assert message.startswith("reward:") and "'code'" in message and "valid rewards: demo, math" in message
