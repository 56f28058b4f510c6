"""Prompt datasets for RL: veRL-style JSONL/Parquet files, the demo task, and a resumable batch sampler.

File layout (one row per prompt, the veRL convention):

* ``prompt`` (or the ``prompt_key`` column): a string, or a chat list ``[{"role": "user", "content": ...}]``.
  A chat list is rendered as the plain ``content`` of its user messages joined with ``"\\n"`` (a message
  without a role counts as a user message; system and assistant messages are dropped). **No chat template
  is applied**: TLT trains base models, which have none.
* the ground truth: ``reward_model.ground_truth``, else ``ground_truth``, else ``answer``. An explicit
  ``answer_key`` (a column, or a dotted path such as ``"extra_info.answer"``) replaces that search.
* ``data_source`` (optional, default ``"unknown"``): selects the reward when the reward is ``auto``.
* any other columns are kept in :attr:`PromptRecord.extra`.

``.jsonl`` files (and ``.json`` files) hold one JSON object per line; a ``.json`` file may instead hold
one JSON array of objects. ``.parquet`` files are read with pyarrow. Errors are
:class:`~tlt.errors.ConfigError` naming the file, the line (JSON, 1-based) or row (Parquet, 1-based)
and the field.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from tlt.errors import ConfigError

SUFFIXES = (".jsonl", ".json", ".parquet")
GROUND_TRUTH_KEYS = ("ground_truth", "answer")  # top-level fallbacks after reward_model.ground_truth
_CONSUMED = {"reward_model", "data_source", *GROUND_TRUTH_KEYS}


@dataclass(frozen=True)
class PromptRecord:
    """One training prompt with its verifiable answer.

    ``index`` is the record's position in its dataset; ``extra`` holds the row's other columns
    (``extra_info``, ``ability``, ...) and is left out of equality and hashing.
    """

    prompt: str
    ground_truth: str
    data_source: str
    index: int
    extra: dict = field(default_factory=dict, compare=False)


def _prompt_text(value: Any, where: str, key: str) -> str:
    """The prompt string of a row: the string itself, or the user contents of a chat list."""
    if isinstance(value, str):
        if value.strip():
            return value
    elif isinstance(value, list) and value:
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
            raise ConfigError(f"{where}: field '{key}' is a list but not a chat list: every message needs a "
                              "string 'content', e.g. [{'role': 'user', 'content': '...'}]")
        text = "\n".join(m["content"] for m in value if (m.get("role") or "user") == "user")
        if text.strip():
            return text
        raise ConfigError(f"{where}: field '{key}' has no non-empty user message")
    raise ConfigError(f"{where}: field '{key}' must be a non-empty string or a chat list "
                      "[{'role': 'user', 'content': '...'}]")


def _lookup(row: dict, dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _present(value: Any) -> bool:
    return value is not None and str(value).strip() != ""


def _ground_truth(row: dict, where: str, answer_key: str | None) -> str:
    """The row's ground truth as a string (see the module docstring for where it is looked up)."""
    if answer_key is not None:
        value = row.get(answer_key) if answer_key in row else _lookup(row, answer_key)
        if not _present(value):
            raise ConfigError(f"{where}: no ground truth in field '{answer_key}' (the configured answer_key)")
        return str(value)
    reward_model = row.get("reward_model")
    if isinstance(reward_model, dict) and _present(reward_model.get("ground_truth")):
        return str(reward_model["ground_truth"])
    for key in GROUND_TRUTH_KEYS:
        if _present(row.get(key)):
            return str(row[key])
    raise ConfigError(f"{where}: no ground truth: add 'reward_model': {{'ground_truth': ...}} or 'ground_truth'")


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(location, row)`` for each non-blank line of a JSON-lines file, or each item of a JSON array."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path.name} line {exc.lineno}: invalid JSON ({exc.msg})") from None
        for i, item in enumerate(items, start=1):
            yield f"{path.name} item {i}", item
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path.name} line {n}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        yield f"{path.name} line {n}", row


def _parquet_rows(path: Path, limit: int | None) -> Iterator[tuple[str, Any]]:
    """``(location, row)`` for the first ``limit`` (all if None) rows of a Parquet file."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several error types for a damaged or foreign file
        raise ConfigError(f"{path.name}: not a readable Parquet file ({exc})") from None
    if limit is not None:
        table = table.slice(0, limit)
    for i, row in enumerate(table.to_pylist(), start=1):
        yield f"{path.name} row {i}", row


def load_prompts(path: str | Path, *, prompt_key: str = "prompt", answer_key: str | None = None,
                 limit: int | None = None) -> list[PromptRecord]:
    """The prompts of a JSONL or Parquet dataset in the veRL layout (see the module docstring).

    ``limit`` keeps the first ``limit`` rows. Raises :class:`~tlt.errors.ConfigError` for a missing
    file, an unsupported extension, an invalid row (naming file, line/row and field) or an empty
    dataset.
    """
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"{path}: unsupported dataset file type {path.suffix or '(none)'!r}; "
                          f"use one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise ConfigError(f"{path}: dataset file does not exist")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1 (or None for all rows), got {limit}")
    rows = (_parquet_rows(path, limit) if path.suffix.lower() == ".parquet" else islice(_json_rows(path), limit))
    records: list[PromptRecord] = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected a JSON object per row, got {type(row).__name__}")
        if row.get(prompt_key) is None:
            raise ConfigError(f"{where}: no field '{prompt_key}' (the prompt)")
        records.append(PromptRecord(
            prompt=_prompt_text(row[prompt_key], where, prompt_key),
            ground_truth=_ground_truth(row, where, answer_key),
            data_source=str(row.get("data_source") or "unknown"),
            index=len(records),
            extra={k: v for k, v in row.items() if k not in _CONSUMED and k not in (prompt_key, answer_key)},
        ))
    if not records:
        raise ConfigError(f"{path.name}: the dataset holds no prompts")
    return records


def demo_prompts(count: int, seed: int) -> list[PromptRecord]:
    """``count`` demo-task prompts (:func:`tlt.data.demo_task.generate_problems`), deterministic in ``seed``.

    ``data_source`` is ``"demo"``, ``ground_truth`` the answer as a string and ``extra`` holds
    ``num_steps``.
    """
    from tlt.data.demo_task import generate_problems

    if count < 1:
        raise ConfigError(f"the number of demo prompts must be >= 1, got {count}")
    return [PromptRecord(p.prompt, str(p.answer), "demo", i, {"num_steps": p.num_steps})
            for i, p in enumerate(generate_problems(count, seed))]


class PromptSampler:
    """Batches of prompts in a seeded order reshuffled every epoch; resumable from :meth:`state`.

    Epoch ``e`` visits every record once in a permutation that depends only on ``(seed, e)``; a
    batch that runs past the end of an epoch continues into the next one. ``state()`` is a small
    JSON-able dict, and ``from_state(records, batch_size, state)`` continues with exactly the
    batches the original sampler would have produced.
    """

    def __init__(self, records: Sequence[PromptRecord], batch_size: int, seed: int) -> None:
        if not records:
            raise ConfigError("the prompt dataset is empty")
        if batch_size < 1:
            raise ConfigError(f"the prompt batch size must be >= 1, got {batch_size}")
        self.records = list(records)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0  # records of the current epoch already handed out
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(f"tlt-prompts:{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self) -> list[PromptRecord]:
        """The next ``batch_size`` records."""
        batch = []
        while len(batch) < self.batch_size:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            batch.append(self.records[self._order[self.position]])
            self.position += 1
        return batch

    def state(self) -> dict[str, int]:
        """Where the sampler stands: ``{"epoch", "position", "seed", "size"}`` (JSON-able)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": len(self.records)}

    @classmethod
    def from_state(cls, records: Sequence[PromptRecord], batch_size: int, state: dict[str, int]) -> PromptSampler:
        """A sampler over ``records`` that continues from ``state`` (from :meth:`state`).

        Raises ConfigError if ``records`` is not the same size as the dataset the state was taken on.
        """
        sampler = cls(records, batch_size, int(state["seed"]))
        if "size" in state and int(state["size"]) != len(sampler.records):
            raise ConfigError(f"the saved prompt-sampler state is for {state['size']} prompts but the dataset "
                              f"now has {len(sampler.records)}; resume with the same dataset")
        sampler.epoch, sampler.position = int(state["epoch"]), int(state["position"])
        sampler._order = sampler._permutation(sampler.epoch)
        return sampler
