"""The demo reasoning task (generation, traces, scoring) and a short supervised-training smoke test."""

from __future__ import annotations

import random
import statistics

import pytest
import torch

from tlt.data.demo_task import (
    DemoProblem,
    apply_op,
    extract_answer,
    generate_problems,
    score,
    solution_trace,
)
from tlt.models.demo_training import (
    EOS_ID,
    TrainConfig,
    accuracy_by_steps,
    ascii_histogram,
    collate,
    decode,
    encode,
    length_stats,
    make_example,
    train,
)


def test_worked_example_prompt_trace_and_answer():
    p = DemoProblem.from_steps(5, ["+7", "*3", "-4"])
    assert p.prompt == "Q: 5 a+7 b*3 c-4 =?\nA:"  # steps labelled a, b, c so a trace line can point back
    assert p.answer == 32 and p.num_steps == 3  # left to right: ((5+7)*3)-4
    trace = solution_trace(p)
    assert trace == " a 05+7=12\nb 12*3=36\nc 36-4=32\n#### 32"
    assert extract_answer(trace) == 32 and score(trace, p) == 1.0


def test_generation_is_seeded():
    assert generate_problems(50, seed=7) == generate_problems(50, seed=7)
    assert generate_problems(50, seed=7) != generate_problems(50, seed=8)


def test_step_counts_are_long_tailed_and_bounded():
    problems = generate_problems(2000, seed=0)
    steps = [p.num_steps for p in problems]
    median = statistics.median(steps)
    assert max(steps) >= 5 * median
    assert max(steps) <= 40 and min(steps) >= 1
    assert sum(k <= 4 for k in steps) / len(steps) > 0.6  # most problems are short ...
    assert sum(k >= 20 for k in steps) >= 20  # ... and a few are very long


def test_correct_values_stay_in_range_and_traces_are_verifiable():
    problems = generate_problems(500, seed=1, max_value=99)
    for p in problems:
        value = p.start
        for op in p.steps:
            value = apply_op(value, op)
            assert 0 <= value <= 99
        assert value == p.answer
        trace = solution_trace(p, error_rate=0.0)
        assert score(trace, p) == 1.0
        lines = trace.strip().splitlines()
        assert len(lines) == p.num_steps + 1
        assert all(len(line) == 9 for line in lines[:-1])  # "L vv+d=rr": label, two-digit values


def test_slips_are_seeded_and_break_answers():
    problems = generate_problems(300, seed=2)
    a = [solution_trace(p, 0.5, random.Random(3)) for p in problems]
    b = [solution_trace(p, 0.5, random.Random(3)) for p in problems]
    assert a == b
    always = [score(solution_trace(p, 1.0, random.Random(i)), p) for i, p in enumerate(problems)]
    assert sum(always) / len(always) < 0.1  # every step slipped: almost never right by chance
    with pytest.raises(ValueError, match="rng"):
        solution_trace(problems[0], 0.5)


def test_error_rate_lowers_trace_accuracy_roughly_as_expected():
    problems = generate_problems(1000, seed=4, max_steps=1)  # one step: wrong iff slipped
    rng = random.Random(0)
    acc = statistics.fmean(score(solution_trace(p, 0.2, rng), p) for p in problems)
    assert 0.72 < acc < 0.88


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" 05+7=12\n#### 12", 12),
        ("#### 7", 7),
        ("####7", 7),
        ("  ####   42  ", 42),
        ("#### -3", -3),
        ("#### 012", 12),
        ("1+1=2\n#### 2\n#### 5", 2),  # the first answer line counts
        ("#### 12x", None),
        ("#### 1 2", None),
        ("####", None),
        ("#### ", None),
        ("12", None),
        ("", None),
        ("x #### 3", None),  # the mark must start the line
        ("05+7=12\n12*3=36", None),  # no answer line (e.g. cut off at max_new_tokens)
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_score_is_binary():
    p = DemoProblem.from_steps(2, ["+3"])
    assert score("#### 5", p) == 1.0
    assert score("#### 6", p) == 0.0
    assert score("no answer", p) == 0.0


def test_encode_matches_the_demo_tokenizer(tmp_path):
    from tlt.models.demo import build_tokenizer

    tokenizer = build_tokenizer(tmp_path)
    text = "Q: 5+7*3-4=?\nA: 05+7=12\n#### 32 abc XYZ ~"
    assert tokenizer.encode(text, add_special_tokens=False) == encode(text)
    assert decode([*encode(text), EOS_ID]) == text
    assert tokenizer.eos_token_id == EOS_ID


def test_collate_puts_loss_on_response_and_eos_only():
    p = DemoProblem.from_steps(5, ["+7"])
    short = make_example(p, 0.0, random.Random(0))
    long = make_example(DemoProblem.from_steps(3, ["+1", "+1"]), 0.0, random.Random(0))
    inputs, targets, mask = collate([short, long])
    ids, prompt_len = short
    n = len(ids) - 1
    assert inputs.shape == targets.shape == mask.shape == (2, len(long[0]) - 1)
    assert decode(targets[0][mask[0]].tolist()) == solution_trace(p)
    assert targets[0][mask[0]][-1].item() == EOS_ID
    assert int(mask[0].sum()) == len(ids) - prompt_len
    assert not mask[0, n:].any()  # padding carries no loss
    assert targets[0, : prompt_len - 1].tolist() == ids[1:prompt_len]


def test_length_stats_and_histogram():
    stats = length_stats([1, 2, 3, 4, 100], bin_width=16)
    assert stats["median"] == 3 and stats["max"] == 100 and stats["p90"] == 100
    assert stats["histogram"][0] == [0, 4] and stats["histogram"][-1] == [96, 1]
    text = ascii_histogram(stats, width=10)
    assert "#" * 10 + " 4" in text and "median=3" in text
    problems = [DemoProblem.from_steps(1, ["+1"]), DemoProblem.from_steps(1, ["+1"] * 25)]
    by_steps = accuracy_by_steps(problems, [1.0, 0.0])
    assert by_steps["1"] == {"n": 1, "accuracy": 1.0} and by_steps["20+"] == {"n": 1, "accuracy": 0.0}


def test_training_smoke_loss_decreases():
    from tlt.models.config import ModelConfig
    from tlt.models.demo import ModelPreset, hf_config_dict
    from tlt.models.transformer import CausalLM

    raw = hf_config_dict(ModelPreset(64, 2, 4, 2, 128, None, 512), 128)
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf_dict(raw))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.02)
    config = TrainConfig(steps=30, batch_tokens=1024, lr=3e-3, warmup_steps=5, pool_size=256,
                         task={"max_steps": 8})
    result = train(model, config, progress=False)
    assert len(result.losses) == 30 and result.loss_tokens > 0
    assert all(torch.isfinite(torch.tensor(result.losses)))
    first, last = statistics.fmean(result.losses[:3]), statistics.fmean(result.losses[-5:])
    assert last < 0.75 * first, result.losses
    assert not model.training
