"""The services as separate processes over gRPC on loopback: the same job as in one process, metrics
scraped by a real Prometheus, and bad requests answered with clear status codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from safetensors.torch import load_file

from tests.integration.conftest import TINY_JOB
from tests.processes import alive, free_port, scrape, step_records
from tlt.config import apply_overrides, job_spec_from_dict
from tlt.controller.loop import Controller
from tlt.rpc.client import open_channel, set_worker_role
from tlt.rpc.errors import RpcError
from tlt.rpc.v1 import (
    common_pb2,
    drafter_pb2,
    drafter_pb2_grpc,
    rollout_pb2,
    rollout_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from tlt.serving.launcher import LocalServices
from tlt.store import ArtifactStore
from tlt.store.kinds import POLICY_KIND


def _spec(path, **extra):
    return job_spec_from_dict(apply_overrides({}, {**TINY_JOB, "output_dir": str(path), **extra}))




@pytest.mark.usefixtures("demo_drafter_dir")
def test_services_give_the_same_job_as_one_process(tmp_path):
    extra = {"rollout.workers": 1, "rollout.speculative.mode": "off", "steps": 2, "data.heldout": 4}
    inproc = _spec(tmp_path / "inproc", **extra)
    Controller(inproc).run()
    split = _spec(tmp_path / "split", **extra)
    with LocalServices(split) as addresses:
        Controller(split, services=addresses).run()
    a, b = step_records(tmp_path / "inproc"), step_records(tmp_path / "split")
    assert [r["response_lengths"] for r in a] == [r["response_lengths"] for r in b]
    assert [r["reward_mean"] for r in a] == [r["reward_mean"] for r in b]
    assert [r["trainer"]["loss"] for r in a] == pytest.approx([r["trainer"]["loss"] for r in b], rel=1e-5)
    weights = [ArtifactStore(s.store_uri).load_tensors(POLICY_KIND, 2) for s in (inproc, split)]
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])
    assert load_file  # safetensors only: the store refuses anything else (see test_store)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, demo_drafter_dir):
    """Drafter, trainer and two rollout processes for a tiny adaptive-SD job (not run yet)."""
    spec = _spec(tmp_path_factory.mktemp("cluster"), **{"data.heldout": 4, "drafter.min_responses": 1})
    services = LocalServices(spec)
    addresses = services.__enter__()
    yield spec, services, addresses
    services.close()


def test_job_across_services_is_scraped_by_prometheus(cluster, prometheus_factory):
    spec, services, addresses = cluster

    from tlt.metrics import new_registry
    from tlt.serving.http import MetricsServer

    controller = Controller(spec, services=addresses)
    registry = new_registry(controller.metric_samples)
    with MetricsServer(0, "127.0.0.1", registry) as http:
        targets = {name: [f"127.0.0.1:{port}"] for name, port in services.metrics_ports.items()}
        prom = prometheus_factory({**targets, "controller": [f"127.0.0.1:{http.port}"]})
        prom.wait_for_targets(timeout=30)
        records = controller.run()
        assert [r["step"] for r in records] == [1, 2]
        assert all(r["sd"]["num_drafts"] > 0 for r in records)
        finished = prom.wait_for("tlt_rollout_requests_finished_total > 0")
        assert {r["metric"]["worker"] for r in finished} == {"rollout-0", "rollout-1"}
        prom.wait_for("tlt_trainer_steps_total == 2")
        prom.wait_for("tlt_controller_step == 2")
        prom.wait_for("tlt_controller_unanswered_requests == 0")
        prom.wait_for("tlt_rollout_policy_version == 2")
        prom.wait_for("tlt_drafter_version >= 0")
        prom.wait_for("tlt_rollout_spec_decode_num_accepted_tokens_total > 0")
        prom.wait_for('tlt_rpc_server_handled_total{service="rollout",method="Generate",code="OK"} > 0')
        prom.wait_for('tlt_rpc_server_handled_total{service="trainer",method="TrainStep",code="OK"} == 2')
        prom.wait_for("up == 1")
        assert len(prom.query("up == 1")) == len(targets) + 1


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_bad_requests_get_clear_status_codes_and_the_services_keep_serving(cluster):
    _, _services, addresses = cluster
    rollout = rollout_pb2_grpc.RolloutStub(open_channel(addresses.rollout[0]))
    params = common_pb2.SamplingParams(temperature=1.0, max_new_tokens=4, seed=1)

    def generate(*requests):
        return list(rollout.Generate(iter(requests), timeout=30))

    code, msg = _code(lambda: generate(rollout_pb2.GenerateRequest(request_id="a", prompt_ids=[], params=params)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt is empty" in msg
    code, msg = _code(lambda: generate(rollout_pb2.GenerateRequest(request_id="b", prompt_ids=[10**6],
                                                                    params=params)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "outside the vocabulary" in msg
    bad_params = common_pb2.SamplingParams(temperature=-1.0, max_new_tokens=4)
    code, msg = _code(lambda: generate(rollout_pb2.GenerateRequest(request_id="c", prompt_ids=[5], params=bad_params)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in msg
    code, msg = _code(lambda: rollout.SetRole(rollout_pb2.SetRoleRequest(role=common_pb2.ROLE_UNSPECIFIED),
                                              timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "role" in msg
    code, msg = _code(lambda: rollout.LoadPolicy(rollout_pb2.LoadVersionRequest(version=999), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND and "999" in msg
    # a good request still works after all that
    ok = generate(rollout_pb2.GenerateRequest(request_id="ok", prompt_ids=[5, 6], params=params))
    assert ok[0].completion.request_id == "ok" and ok[-1].HasField("summary")

    drafter = drafter_pb2_grpc.DrafterStub(open_channel(addresses.drafter))
    code, msg = _code(lambda: drafter.PushDelta(iter([drafter_pb2.DeltaChunk(data=b"x")]), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "header" in msg
    chunks = [drafter_pb2.DeltaChunk(header=drafter_pb2.DeltaHeader(worker="w", tokens=3, size_bytes=5)),
              drafter_pb2.DeltaChunk(data=b"junk!")]
    code, msg = _code(lambda: drafter.PushDelta(iter(chunks), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "PushDelta from 'w'" in msg
    assert drafter.Status(drafter_pb2.DrafterStatusRequest(), timeout=10).deltas_rejected >= 1

    trainer = trainer_pb2_grpc.TrainerStub(open_channel(addresses.trainer))
    sample = trainer_pb2.TrainStepChunk(sample=trainer_pb2.Sample(prompt_ids=[1], response_ids=[2], reward=1))
    code, msg = _code(lambda: trainer.TrainStep(iter([sample]), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "header" in msg
    code, msg = _code(lambda: trainer.PublishPolicy(trainer_pb2.PublishPolicyRequest(version=-3), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "version" in msg
    code, msg = _code(lambda: trainer.SaveCheckpoint(trainer_pb2.CheckpointRequest(directory=""), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "directory" in msg
    assert trainer.Status(trainer_pb2.TrainerStatusRequest(), timeout=10).workers == 1


def test_health_reflection_and_role_rpc(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, _services, addresses = cluster
    channel = open_channel(addresses.rollout[1])
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tlt.v1.Rollout"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10))
    names = {s.name for s in reply.list_services_response.service}
    assert {"tlt.v1.Rollout", "grpc.health.v1.Health"} <= names
    set_worker_role(addresses.rollout[1], "drafter")
    progress = rollout_pb2_grpc.RolloutStub(channel).Progress(rollout_pb2.ProgressRequest(), timeout=10)
    assert progress.role == common_pb2.ROLE_DRAFTER
    set_worker_role(addresses.rollout[1], "rollout")
    with pytest.raises(RpcError, match=r"127\.0\.0\.1:9 failed with (UNAVAILABLE|DEADLINE_EXCEEDED)"):
        set_worker_role("127.0.0.1:9", "rollout", timeout=2)


def test_sigterm_drains_and_exits_cleanly(cluster):
    _, services, _addresses = cluster
    proc = services.procs["drafter"]
    # the drafter answered RPCs above; after SIGTERM it must stop within the grace period with code 0
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0
    assert "shutting down" in services.log_tail("drafter")


def test_serve_rejects_a_bad_service_name():
    out = subprocess.run([sys.executable, "-m", "tlt.cli", "serve", "nonsense"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def _service_pids(run_dir):
    return [json.loads(p.read_text())["pid"] for p in (run_dir / "services").glob("*.port")]


def _start_run(run_dir, *extra, metrics_port: int | None = None):
    args = [f"--set={k}={v}" for k, v in {**TINY_JOB, "steps": 50, "data.heldout": 4, **dict(extra)}.items()]
    if metrics_port is not None:
        args.append(f"--metrics-port={metrics_port}")
    return subprocess.Popen([sys.executable, "-m", "tlt.cli", "run", *args, "--output-dir", str(run_dir),
                             "--no-progress", "--no-report"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(run_dir, proc, n=1, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        if len(step_records(run_dir)) >= n:
            return
        time.sleep(0.2)
    raise AssertionError("the run made no progress")


@pytest.mark.usefixtures("demo_drafter_dir")
def test_ctrl_c_tears_the_services_down(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start_run(run_dir)
    _wait_for_steps(run_dir, proc)
    pids = _service_pids(run_dir)
    assert len(pids) == 4 and all(alive(p) for p in pids)
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    assert proc.returncode == 130
    assert not [p for p in pids if alive(p)]


def _wait_for_running_requests(run_dir, proc, names, at_least=2, timeout=120):
    """Wait until the workers ``names`` decode ``at_least`` requests between them (a rollout is under way)."""
    services = {n: json.loads((run_dir / "services" / f"{n}.port").read_text()) for n in names}
    channels = [open_channel(f"127.0.0.1:{s['port']}") for s in services.values()]
    stubs = [rollout_pb2_grpc.RolloutStub(channel) for channel in channels]
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1]
            if sum(stub.Progress(rollout_pb2.ProgressRequest(), timeout=10).running for stub in stubs) >= at_least:
                return
            time.sleep(0.01)
    finally:
        for channel in channels:
            channel.close()
    raise AssertionError("no rollout got under way")


def _freeze_mid_step(run_dir, proc, metrics_port: int, names, attempts: int = 20) -> None:
    """Stop (SIGSTOP) the workers ``names`` while the step in progress still owes answers.

    Seeing them decode over Progress is not enough: the step can finish between that answer and the stop. Once
    they are stopped nothing more comes from them, so the controller's unanswered count, read after the
    answers already sent have arrived, says for sure; when it is 0 they are let go and the next step is tried."""
    pids = [json.loads((run_dir / "services" / f"{n}.port").read_text())["pid"] for n in names]
    for _ in range(attempts):
        _wait_for_running_requests(run_dir, proc, names)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(1.0)
        if scrape(metrics_port, "tlt_controller_unanswered_requests")[0].value > 0:
            return
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    raise AssertionError(f"no step was caught unfinished in {attempts} tries")


@pytest.mark.usefixtures("demo_drafter_dir")
def test_losing_every_worker_fails_the_run_clearly_and_the_rest_is_torn_down(tmp_path):
    # Killed between steps, the workers are restarted before the next one (tlt run supervises its services) and
    # the run goes on; killed while the step waits on them, it cannot finish and the run must stop naming a worker.
    run_dir, metrics_port = tmp_path / "run", free_port()
    proc = _start_run(run_dir, ("rollout.max_new_tokens", 400), metrics_port=metrics_port)
    _wait_for_steps(run_dir, proc)
    workers = ("rollout-0", "rollout-1")
    _freeze_mid_step(run_dir, proc, metrics_port, workers)
    ports = {p.stem: json.loads(p.read_text())["pid"] for p in (run_dir / "services").glob("*.port")}
    for name in workers:
        os.kill(ports[name], signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 2, err
    assert "rollout worker at 127.0.0.1:" in err and "Traceback" not in err
    assert not [p for p in ports.values() if alive(p)]
