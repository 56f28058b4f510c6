"""Prompt datasets: veRL JSONL/Parquet loading, error messages, demo prompts and the resumable sampler."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tlt.data.datasets import PromptRecord, PromptSampler, demo_prompts, load_prompts
from tlt.data.demo_task import generate_problems
from tlt.errors import ConfigError

ROWS = [
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "user", "content": "Answer after ####."}],
     "reward_model": {"style": "rule", "ground_truth": "4"}, "data_source": "openai/gsm8k",
     "extra_info": {"split": "train", "index": 0}},
    {"prompt": "Compute 3*3.", "ground_truth": 9},
    {"prompt": "Compute 1+1.", "answer": "2", "data_source": "demo"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _check(records):
    assert [r.prompt for r in records] == ["What is 2+2?\nAnswer after ####.", "Compute 3*3.", "Compute 1+1."]
    assert [r.ground_truth for r in records] == ["4", "9", "2"]
    assert [r.data_source for r in records] == ["openai/gsm8k", "unknown", "demo"]
    assert [r.index for r in records] == [0, 1, 2]
    assert records[0].extra["extra_info"] == {"split": "train", "index": 0}


def test_jsonl_verl_layout_with_chat_prompt(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in ROWS[1:]))  # blank line
    records = load_prompts(path)
    _check(records)
    assert load_prompts(str(path), limit=2) == records[:2]


def test_parquet_round_trip(tmp_path):
    rows = [{"prompt": r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}],
             "reward_model": {"style": "rule", "ground_truth": r.get("reward_model", {}).get("ground_truth")},
             "ground_truth": None if "reward_model" in r else str(r.get("ground_truth", r.get("answer"))),
             "data_source": r.get("data_source"), "extra_info": {"split": "train", "index": i}}
            for i, r in enumerate(ROWS)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)  # prompt: list<struct<role, content>>, as veRL writes it
    _check(load_prompts(path))
    assert len(load_prompts(path, limit=1)) == 1


def test_json_array_and_answer_key(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"question": "q1", "solution": {"final": "7"}, "answer": "wrong"}]))
    [record] = load_prompts(path, prompt_key="question", answer_key="solution.final")
    assert (record.prompt, record.ground_truth, record.data_source) == ("q1", "7", "unknown")
    assert record.extra == {"solution": {"final": "7"}}  # other columns are kept


@pytest.mark.parametrize(("content", "kwargs", "needle"), [
    ('{"prompt": "a", "reward_model": {"ground_truth": "1"}}\n{"prompt": "b"}\n', {},
     "d.jsonl line 2: no ground truth: add 'reward_model': {'ground_truth': ...} or 'ground_truth'"),
    ('{"prompt": "a", "ground_truth": ""}\n', {}, "d.jsonl line 1: no ground truth"),
    ('{"prompt": "a", "answer": "1"}\nnot json\n', {}, "d.jsonl line 2: invalid JSON"),
    ('{"question": "a", "answer": "1"}\n', {}, "d.jsonl line 1: no field 'prompt'"),
    ('{"prompt": "", "answer": "1"}\n', {}, "d.jsonl line 1: field 'prompt' must be a non-empty string"),
    ('{"prompt": [{"role": "user"}], "answer": "1"}\n', {}, "d.jsonl line 1: field 'prompt' is a list but not a chat"),
    ('{"prompt": [{"role": "system", "content": "x"}], "answer": "1"}\n', {},
     "d.jsonl line 1: field 'prompt' has no non-empty user message"),
    ('[1, 2]\n', {}, "d.jsonl line 1: expected a JSON object"),
    ('{"q": "a", "answer": "1"}\n', {"prompt_key": "q", "answer_key": "sol"},
     "d.jsonl line 1: no ground truth in field 'sol'"),
    ("\n\n", {}, "d.jsonl: the dataset holds no prompts"),
    ('{"prompt": "a", "answer": "1"}\n', {"limit": 0}, "limit must be >= 1"),
])
def test_errors_name_file_line_and_field(tmp_path, content, kwargs, needle):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_prompts(path, **kwargs)
    assert needle in str(info.value)


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"d\.csv.*use one of \.jsonl, \.json, \.parquet"):
        load_prompts(tmp_path / "d.csv")
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    bad = tmp_path / "d.parquet"
    bad.write_text("not parquet")
    with pytest.raises(ConfigError, match=r"d\.parquet: not a readable Parquet file"):
        load_prompts(bad)
    no_truth = tmp_path / "n.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": None}]), no_truth)
    with pytest.raises(ConfigError, match=r"n\.parquet row 2: no ground truth"):
        load_prompts(no_truth)


def test_demo_prompts():
    records = demo_prompts(5, seed=11)
    problems = generate_problems(5, seed=11)
    assert [(r.prompt, r.ground_truth, r.data_source, r.index) for r in records] == [
        (p.prompt, str(p.answer), "demo", i) for i, p in enumerate(problems)]
    assert demo_prompts(5, seed=11) == records and demo_prompts(5, seed=12) != records
    assert records[0] == PromptRecord(records[0].prompt, records[0].ground_truth, "demo", 0)  # extra not compared
    with pytest.raises(ConfigError):
        demo_prompts(0, seed=1)


def test_sampler_is_deterministic_and_covers_each_epoch():
    records = demo_prompts(10, seed=0)
    batches = [PromptSampler(records, 4, seed=7) for _ in range(2)]
    a, b = ([s.next_batch() for _ in range(5)] for s in batches)
    assert a == b
    flat = [r.index for batch in a for r in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # reshuffled each epoch
    other = PromptSampler(records, 4, seed=8)
    assert [other.next_batch() for _ in range(5)] != a
    with pytest.raises(ConfigError):
        PromptSampler([], 4, seed=0)
    with pytest.raises(ConfigError):
        PromptSampler(records, 0, seed=0)


def test_sampler_resumes_exactly_from_state():
    records = demo_prompts(10, seed=0)
    sampler = PromptSampler(records, 3, seed=5)
    for _ in range(3):
        sampler.next_batch()
    state = json.loads(json.dumps(sampler.state()))  # survives a checkpoint
    assert state["epoch"] == 0 and state["position"] == 9
    rest = [sampler.next_batch() for _ in range(6)]  # crosses two epoch boundaries
    resumed = PromptSampler.from_state(records, 3, state)
    assert [resumed.next_batch() for _ in range(6)] == rest
    assert resumed.state() == sampler.state()
    with pytest.raises(ConfigError, match="same dataset"):
        PromptSampler.from_state(records[:5], 3, state)
