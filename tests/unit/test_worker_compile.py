"""`rollout.compile` reaches the worker's engine, which compiles (in its warm-up) before the first step."""

from __future__ import annotations

import pytest
import torch

from tlt.config import job_spec_from_dict
from tlt.drafter.warmup import new_drafter
from tlt.models import load_model
from tlt.rollout.engine import RolloutEngine
from tlt.rollout.worker import RolloutWorker
from tlt.store import ArtifactStore


@pytest.mark.parametrize("compile_", [True, False])
def test_rollout_compile_compiles_the_engine_when_the_worker_starts(compile_, peaky_model_dir, tmp_path,
                                                                   monkeypatch):
    compiled, warmed = [], []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(fn.__name__) or fn)
    warm_up = RolloutEngine.warm_up
    monkeypatch.setattr(RolloutEngine, "warm_up", lambda self, *a, **k: warmed.append(a) or warm_up(self, *a, **k))
    spec = job_spec_from_dict({"rollout": {"compile": compile_, "max_running": 4},
                               "drafter": {"init": "random", "online_training": False}})
    model = load_model(peaky_model_dir, dtype="float32")
    worker = RolloutWorker("w", model, spec, new_drafter(model, seed=0), ArtifactStore(tmp_path / "store"))
    assert worker.engine.spec is not None  # adaptive SD: the drafter catch-up and tree expansion are compiled too
    if compile_:
        assert sorted(compiled) == ["_expand_tree", "forward", "forward_cached_last"] and len(warmed) == 1
        prompt = warmed[0][0]
        assert prompt and all(0 <= t < model.config.vocab_size for t in prompt)
    else:
        assert compiled == [] and warmed == []
    assert worker.engine.progress().finished == 0  # the warm-up's requests are not counted


@pytest.mark.parametrize(("compile_", "expected"), [(True, {"enforce_eager": False}), (False, {})])
def test_rollout_compile_runs_the_vllm_backend_compiled(compile_, expected, tmp_path, monkeypatch):
    """With the vLLM backend, `rollout.compile` turns vLLM's compilation on (it is off by default on CPU);
    false leaves the backend's default alone (compiled with CUDA graphs on GPU)."""
    from tlt.rollout.backends import vllm as backend

    made: list[dict] = []

    class RecordingEngine:
        def __init__(self, model_dir, **kwargs):
            made.append(kwargs)

    monkeypatch.setattr(backend, "VllmRolloutEngine", RecordingEngine)
    spec = job_spec_from_dict({"rollout": {"backend": "vllm", "compile": compile_, "max_running": 4}})
    backend.VllmRolloutWorker("w", tmp_path / "model", spec, ArtifactStore(tmp_path / "store"))
    assert len(made) == 1
    assert {k: v for k, v in made[0].items() if k == "enforce_eager"} == expected
