"""The vLLM backend's speculative-decoding schedule helpers (pure Python: run without vLLM installed)."""

from __future__ import annotations

import os

import pytest
import torch

from tlt.config import SpeculativeSpec
from tlt.errors import ConfigError
from tlt.rollout.backends.vllm import (
    CPU_KV_CACHE_BYTES,
    check_schedule,
    resolve_kv_cache_bytes,
    schedule_for_spec,
    schedule_from_tuner,
)
from tlt.rollout.tuner import BegMabTuner, SpecStrategy, TunerConfig


def test_check_schedule_sorts_and_rejects_what_vllm_rejects():
    assert check_schedule([[9, 64, 0], [1, 8, 3]]) == [(1, 8, 3), (9, 64, 0)]
    for bad in ([], [(2, 8, 3)], [(1, 8, 3), (8, 16, 2)], [(1, 8, -1)], [(1, 0, 3)], [(1, 8)], [(1, 8, 2.5)]):
        with pytest.raises(ConfigError):
            check_schedule(bad)


def test_schedule_for_spec_follows_the_mode():
    assert schedule_for_spec(SpeculativeSpec(mode="off"), 64, "cpu") == (0, None)
    assert schedule_for_spec(SpeculativeSpec(mode="always", strategy="4_1_5"), 64, "cpu") == (4, None)
    # adaptive: the deepest chain of the strategies up to the threshold, none above it
    spec = SpeculativeSpec(strategies=("2_1_3", "4_2_8"), sd_batch_threshold=16)
    for device in ("cpu", "cuda"):  # a threshold that is set holds on every device
        assert schedule_for_spec(spec, 64, device) == (4, [(1, 16, 4), (17, 64, 0)])
    assert schedule_for_spec(SpeculativeSpec(sd_batch_threshold=64), 64, "cpu") == (4, None)


def test_schedule_for_spec_picks_an_unset_threshold_by_device():
    assert schedule_for_spec(SpeculativeSpec(), 64, "cpu") == (4, [(1, 8, 4), (9, 64, 0)])
    assert schedule_for_spec(SpeculativeSpec(), 64, "cuda") == (4, [(1, 32, 4), (33, 64, 0)])


def test_schedule_from_tuner_takes_each_buckets_best_arm():
    tuner = BegMabTuner(TunerConfig(sd_batch_threshold=8, strategies=["3_1_4", "5_1_6"], bucket_bounds=[1, 3, 5]))
    for _ in range(3):
        tuner.record(1, SpecStrategy.parse("5_1_6"), 10, 1.0)  # bucket 1: the 5-deep chain wins
        tuner.record(1, SpecStrategy.parse("3_1_4"), 5, 1.0)
        tuner.record(3, SpecStrategy.parse("3_1_4"), 10, 1.0)  # bucket 3: the 3-deep chain wins
        tuner.record_plain(5, 20, 1.0)  # bucket 5: plain decoding wins
        tuner.record(5, SpecStrategy.parse("3_1_4"), 10, 1.0)
    k, schedule = schedule_from_tuner(tuner, max_running=32, default_k=2)
    assert k == 5
    assert schedule == [(1, 2, 5), (3, 4, 3), (5, 8, 0), (9, 32, 0)]
    # a cap on the chain depth (a deep tree is no deep chain); K = 0 stays 0
    assert schedule_from_tuner(tuner, max_running=32, default_k=2, max_k=4) == (
        4, [(1, 2, 4), (3, 4, 3), (5, 8, 0), (9, 32, 0)])
    # buckets without samples get the default
    assert schedule_from_tuner(BegMabTuner(TunerConfig(sd_batch_threshold=4, bucket_bounds=[1, 3])), 8, 2) == (
        2, [(1, 2, 2), (3, 4, 2), (5, 8, 0)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU defaults (on GPU vLLM sizes the cache itself)")
def test_kv_cache_size_defaults_to_1gib_on_cpu_and_refuses_two_settings(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert resolve_kv_cache_bytes(None) == CPU_KV_CACHE_BYTES == 1 << 30
    assert resolve_kv_cache_bytes(5 << 20) == 5 << 20
    with pytest.raises(ConfigError, match="kv_cache_bytes must be >= 1"):
        resolve_kv_cache_bytes(0)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    assert resolve_kv_cache_bytes(None) is None  # vLLM reads the variable itself
    with pytest.raises(ConfigError, match="unset VLLM_CPU_KVCACHE_SPACE or drop kv_cache_bytes"):
        resolve_kv_cache_bytes(5 << 20)


def test_the_vllm_worker_schedules_sd_by_the_device_default(tmp_path, monkeypatch):
    from tlt.config import job_spec_from_dict
    from tlt.rollout.backends import vllm as backend
    from tlt.store import ArtifactStore

    made: list[dict] = []
    monkeypatch.setattr(backend, "VllmRolloutEngine", lambda model_dir, **kwargs: made.append(kwargs))
    spec = job_spec_from_dict({"rollout": {"backend": "vllm", "max_running": 64}})
    backend.VllmRolloutWorker("w", tmp_path / "model", spec, ArtifactStore(tmp_path / "store"),
                              drafter_dir=tmp_path / "drafter")
    threshold = 32 if torch.cuda.is_available() else 8
    assert made[0]["schedule"] == [(1, threshold, 4), (threshold + 1, 64, 0)]
    assert made[0]["num_speculative_tokens"] == 4


def test_vllm_env_defaults_turn_the_aot_cache_off_unless_set(monkeypatch):
    from tlt.rollout.backends.vllm import vllm_env_defaults

    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    vllm_env_defaults()
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "0" and os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")  # a value already set wins
    vllm_env_defaults()
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "1"


def test_one_engine_process_defaults_run_vllm_in_one_process_on_cpu_unless_set(monkeypatch):
    from tlt.rollout.backends.vllm import one_engine_process_defaults

    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    one_engine_process_defaults("cuda")  # on a GPU vLLM keeps its own layout
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    one_engine_process_defaults("cpu")
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # a value already set wins
    one_engine_process_defaults("cpu")
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def test_the_vllm_rollout_service_sets_the_layout_before_its_engine_starts(tmp_path, monkeypatch):
    from tlt.config import job_spec_from_dict
    from tlt.rollout.backends import vllm as backend
    from tlt.serving import serve
    from tlt.store import ArtifactStore

    seen: list[str | None] = []

    class StartedError(Exception):
        pass

    def fake_worker(*args, **kwargs):
        seen.append(os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"))
        raise StartedError

    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.setattr(backend, "VllmRolloutWorker", fake_worker)
    spec = job_spec_from_dict({"rollout": {"backend": "vllm", "speculative": {"mode": "off"}}})
    with pytest.raises(StartedError):
        serve._rollout(spec, serve.ServeOptions("rollout"), ArtifactStore(tmp_path / "store"), tmp_path, None)
    assert seen == [None if torch.cuda.is_available() else "0"]


def test_in_process_vllm_workers_refuse_the_one_process_layout(tmp_path, monkeypatch):
    from tlt.config import job_spec_from_dict
    from tlt.controller.services import build_inproc
    from tlt.rollout.backends.vllm import check_engines_can_share_process
    from tlt.store import ArtifactStore

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    check_engines_can_share_process(1)  # one engine may run in this process
    spec = job_spec_from_dict({"rollout": {"backend": "vllm", "workers": 2}})
    with pytest.raises(ConfigError, match="VLLM_ENABLE_V1_MULTIPROCESSING=0"):
        build_inproc(spec, tmp_path / "model", ArtifactStore(tmp_path / "store"))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    check_engines_can_share_process(2)  # vLLM's own layout: each engine's model runs in its own process
