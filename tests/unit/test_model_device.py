"""`model.device`: where the native rollout workers run the policy (auto: a CUDA device when torch sees one).

No GPU here: the tests check what device the rollout builders ask the loader for, and load on the CPU."""

from __future__ import annotations

import pytest
import torch

import tlt.models.loader as loader
import tlt.trainer.service  # noqa: F401  imported before the loader is patched: the trainer's own load is not counted
from tlt.config import job_spec_from_dict
from tlt.errors import ConfigError
from tlt.models.loader import resolve_device
from tlt.store import ArtifactStore


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match=r"model\.device is 'cuda' but torch sees no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == resolve_device("cuda") == "cuda"
    assert resolve_device("cpu") == "cpu"


def test_an_unknown_device_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"model\.device must be one of"):
        job_spec_from_dict({"model": {"device": "tpu"}})


@pytest.fixture
def requested_devices(monkeypatch) -> list[str]:
    """Pretend a GPU is visible; record the device each load_model call asks for, and load on the CPU."""
    asked: list[str] = []
    load = loader.load_model

    def recording_load(model_dir, dtype="bfloat16", device="cpu", **kwargs):
        asked.append(device)
        return load(model_dir, dtype=dtype, device="cpu", **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loader, "load_model", recording_load)
    return asked


@pytest.mark.parametrize(("device", "expected"), [("auto", "cuda"), ("cpu", "cpu")])
def test_in_process_rollout_workers_load_the_policy_on_the_job_device(device, expected, requested_devices,
                                                                      peaky_model_dir, tmp_path):
    from tlt.controller.services import build_inproc

    spec = job_spec_from_dict({"model": {"device": device}, "rollout": {"workers": 2, "max_running": 4},
                               "drafter": {"init": "random"}, "output_dir": str(tmp_path)})
    services = build_inproc(spec, peaky_model_dir, ArtifactStore(tmp_path / "store"))
    try:
        assert requested_devices == [expected, expected]  # each rollout worker's policy
        assert all(w.drafter is not None for w in services.workers)
        assert services.trainer.trainer.model.device.type == "cpu"  # GRPO stays on the CPU
    finally:
        services.close()


def test_a_rollout_service_loads_the_policy_on_the_job_device(requested_devices, peaky_model_dir, tmp_path):
    from tlt.metrics import new_registry
    from tlt.serving.serve import ServeOptions, _rollout

    spec = job_spec_from_dict({"model": {"device": "auto"}, "output_dir": str(tmp_path),
                               "rollout": {"max_running": 4, "speculative": {"mode": "off"}}})
    built = _rollout(spec, ServeOptions("rollout", name="rollout-0"), ArtifactStore(tmp_path / "store"),
                     peaky_model_dir, new_registry())
    built[-1]()  # on_stop
    assert requested_devices == ["cuda"]
