"""A published policy damaged on disk, asked for through a running rollout service: the gRPC client gets
DATA_LOSS naming the damaged file, and the service keeps serving (the intact versions load)."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
import yaml

from tests.reliability.service_process import spawn_service
from tlt.config import apply_overrides, job_spec_from_dict
from tlt.rollout.service import RemoteRolloutWorker
from tlt.rpc.errors import RpcError
from tlt.store import ArtifactStore
from tlt.store.kinds import POLICY_KIND


def _flip_byte(path: Path, offset: int) -> None:
    """Damage one byte in place, as bit rot or a bad copy would (published files are read-only)."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_checksum_mismatch_reaches_the_client_as_data_loss_and_the_service_keeps_serving(tmp_path, demo_model_dir):
    spec = job_spec_from_dict(apply_overrides({}, {"output_dir": str(tmp_path), "rollout.speculative.mode": "off"}))
    store = ArtifactStore(spec.store_uri)
    files = {name: demo_model_dir / name for name in ("model.safetensors", "config.json")}
    for version in (1, 2):
        store.publish(POLICY_KIND, version, files)
    damaged = Path(store.root, POLICY_KIND, "v00000002", "model.safetensors")
    _flip_byte(damaged, damaged.stat().st_size // 2)  # in the tensor data, past the header
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(spec.to_dict()))
    service = spawn_service("rollout", config, tmp_path / "services", "rollout-0")
    try:
        service.wait_serving()
        worker = RemoteRolloutWorker(service.address)
        try:
            with pytest.raises(RpcError) as info:
                worker.load_policy(2)
            assert info.value.code == grpc.StatusCode.DATA_LOSS, info.value
            assert "policy v2/model.safetensors" in str(info.value) and "does not match the manifest" in str(info.value)
            # still serving: the intact version loads; the damaged one keeps failing the same way
            assert worker.load_policy(1) is True and worker.progress().name == "rollout-0"
            assert worker.policy_version == 1
            with pytest.raises(RpcError) as again:
                worker.load_policy(2)
            assert again.value.code == grpc.StatusCode.DATA_LOSS
        finally:
            worker.close()
        assert service.proc.poll() is None, service.log
    finally:
        service.stop()
