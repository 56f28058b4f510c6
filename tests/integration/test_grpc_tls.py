"""Optional TLS for the gRPC services, against real `tlt serve trainer` processes: a throwaway CA signs a server
certificate (``localhost`` and ``tlt-grpc``, the name the Kubernetes setup checks instead of pod addresses) and
client certificates; TLS clients get through, plaintext and wrongly trusting clients are refused with
UNAVAILABLE, mutual TLS refuses clients without a certificate from its CA, and bad TLS flags are one-line
errors that name the flag."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from tests.tls_pki import SERVER_NAME, make_pki
from tlt.cli import main
from tlt.controller.services import ServiceAddresses, connect
from tlt.errors import ConfigError
from tlt.rpc.client import call, open_channel, set_worker_role
from tlt.rpc.errors import RpcError
from tlt.rpc.tls import ClientTLS, ServerTLS, resolve_client_tls
from tlt.rpc.v1 import trainer_pb2, trainer_pb2_grpc
from tlt.serving.launcher import PARENT_PID_ENV
from tlt.trainer.service import RemoteTrainer

START_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """The throwaway PKI of tests/tls_pki.py."""
    return make_pki(tmp_path_factory.mktemp("pki"))


# ---- real services ---------------------------------------------------------------------------------------


class Service:
    """A `tlt serve trainer` process on 127.0.0.1 with the given TLS flags."""

    def __init__(self, directory: Path, tls_args: list[str]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port_file = directory / "port.json"
        self.log = directory / "serve.log"
        cmd = [sys.executable, "-m", "tlt.cli", "serve", "trainer", "--set", f"output_dir={directory}",
               "--port", "0", "--metrics-port", "0", "--threads", "1", "--port-file", str(self.port_file), *tls_args]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, PARENT_PID_ENV: str(os.getpid())})
        self.port = 0

    def wait(self) -> Service:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.port_file.is_file():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tlt serve trainer did not start (exit {self.proc.poll()}):\n{self.log.read_text()}")
            time.sleep(0.1)
        self.port = json.loads(self.port_file.read_text())["port"]
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def servers(pki, demo_model_dir, tmp_path_factory):
    """Two trainer services: ``tls`` (server certificate only) and ``mtls`` (client certificates required)."""
    root = tmp_path_factory.mktemp("tls-services")
    server_args = ["--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"])]
    started = {"tls": Service(root / "tls", server_args),
               "mtls": Service(root / "mtls", [*server_args, "--tls-client-ca", str(pki["ca"])])}
    try:
        yield {name: service.wait() for name, service in started.items()}
    finally:
        for service in started.values():
            service.stop()


def _tls(pki, ca: str = "ca", client: str | None = None, server_name: str | None = None) -> ClientTLS:
    flags = {"ca": pki[ca], "server_name": server_name}
    if client:
        flags |= {"cert": pki[f"{client}_cert"], "key": pki[f"{client}_key"]}
    tls = resolve_client_tls(flags)
    assert tls is not None
    return tls


def _status_code(address: str, tls: ClientTLS | None) -> grpc.StatusCode:
    """The code a trainer Status call ends with (OK, or the failure's)."""
    with open_channel(address, tls) as channel:
        try:
            call(trainer_pb2_grpc.TrainerStub(channel).Status, trainer_pb2.TrainerStatusRequest(), "Status", 10)
        except RpcError as exc:
            return exc.code
    return grpc.StatusCode.OK


# ---- TLS on the wire ---------------------------------------------------------------------------------------


def test_tls_client_reaches_the_service_and_plaintext_is_refused(pki, servers):
    port = servers["tls"].port
    trainer = RemoteTrainer(f"localhost:{port}", tls=_tls(pki))
    try:
        trainer.wait_ready(30)
        assert trainer.optimizer_steps == 0
    finally:
        trainer.close()
    assert _status_code(f"localhost:{port}", None) == grpc.StatusCode.UNAVAILABLE  # plaintext
    assert _status_code(f"localhost:{port}", _tls(pki, ca="other_ca")) == grpc.StatusCode.UNAVAILABLE
    plaintext = RemoteTrainer(f"localhost:{port}", timeout=10)
    try:
        with pytest.raises(RpcError, match=rf"^PublishPolicy on trainer service at localhost:{port} failed with "
                                           r"UNAVAILABLE") as info:
            plaintext.publish_policy(1)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        plaintext.close()


def test_certificate_name_is_checked_and_can_be_overridden(pki, servers):
    address = f"127.0.0.1:{servers['tls'].port}"  # the certificate names localhost and tlt-grpc, not the IP
    assert _status_code(address, _tls(pki)) == grpc.StatusCode.UNAVAILABLE
    assert _status_code(address, _tls(pki, server_name=SERVER_NAME)) == grpc.StatusCode.OK
    assert _status_code(address, _tls(pki, server_name="someone-else")) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_its_ca(pki, servers):
    address = f"localhost:{servers['mtls'].port}"
    assert _status_code(address, _tls(pki, client="client")) == grpc.StatusCode.OK
    assert _status_code(address, _tls(pki)) == grpc.StatusCode.UNAVAILABLE  # no client certificate
    assert _status_code(address, _tls(pki, client="intruder")) == grpc.StatusCode.UNAVAILABLE
    assert _status_code(address, None) == grpc.StatusCode.UNAVAILABLE


def test_controller_connects_over_tls(pki, servers):
    services = connect(ServiceAddresses((), None, f"127.0.0.1:{servers['mtls'].port}",
                                        tls=_tls(pki, client="client", server_name=SERVER_NAME)), timeout=30)
    try:
        assert services.trainer.optimizer_steps == 0
    finally:
        services.close()


def test_operator_set_role_takes_tls_from_the_environment(pki, servers, monkeypatch):
    address = f"127.0.0.1:{servers['mtls'].port}"
    with pytest.raises(RpcError) as plain:
        set_worker_role(address, "rollout", timeout=10)
    assert plain.value.code == grpc.StatusCode.UNAVAILABLE
    monkeypatch.setenv("TLT_TLS_CA", str(pki["ca"]))
    monkeypatch.setenv("TLT_TLS_CERT", str(pki["client_cert"]))
    monkeypatch.setenv("TLT_TLS_KEY", str(pki["client_key"]))
    monkeypatch.setenv("TLT_TLS_SERVER_NAME", SERVER_NAME)
    with pytest.raises(RpcError) as secure:  # the handshake passes; a trainer serves no Rollout.SetRole
        set_worker_role(address, "rollout", timeout=10)
    assert secure.value.code == grpc.StatusCode.UNIMPLEMENTED


def test_rollout_and_drafter_handles_over_mutual_tls(pki, tmp_path):
    """The controller's handles on a rollout worker and on the drafter service (RemoteClient subclasses), with
    the services in this process on a tiny random model, over mutual TLS."""
    import torch
    from prometheus_client import CollectorRegistry

    from tests.conftest import MODEL_VARIANTS, _save_random
    from tlt.config import job_spec_from_dict
    from tlt.drafter.aggregator import trainable_state
    from tlt.drafter.service import DrafterServicer, RemoteDrafter, open_aggregator
    from tlt.drafter.warmup import new_drafter
    from tlt.models.loader import load_model
    from tlt.rollout.service import RemoteRolloutWorker, RolloutServicer
    from tlt.rollout.worker import RolloutWorker
    from tlt.rpc.server import start_server
    from tlt.rpc.v1 import drafter_pb2_grpc, rollout_pb2_grpc
    from tlt.store import ArtifactStore

    arch, overrides = MODEL_VARIANTS["qwen2-gqa-tied"]
    model_dir = _save_random(tmp_path / "model", arch, 0.02, **overrides)
    spec = job_spec_from_dict({"name": "tls", "output_dir": str(tmp_path / "run"),
                               "model": {"path": str(model_dir), "dtype": "float32"},
                               "rollout": {"max_running": 2, "max_new_tokens": 4},
                               "drafter": {"init": "random", "online_training": False},
                               "store": {"uri": str(tmp_path / "store")}})
    store = ArtifactStore(spec.store_uri)
    aggregator = open_aggregator(spec, model_dir, load_model(model_dir, dtype="float32"), store)
    model = load_model(model_dir, dtype="float32")
    worker = RolloutWorker("tls-worker", model, spec, new_drafter(model, seed=1), store)
    server_tls = ServerTLS.from_files(pki["cert"], pki["key"], pki["ca"])
    servers = [start_server([(rollout_pb2_grpc.add_RolloutServicer_to_server,
                              RolloutServicer(worker, CollectorRegistry()), "tlt.v1.Rollout")], tls=server_tls),
               start_server([(drafter_pb2_grpc.add_DrafterServicer_to_server,
                              DrafterServicer(aggregator, CollectorRegistry()), "tlt.v1.Drafter")], tls=server_tls)]
    rollout_address, drafter_address = (f"127.0.0.1:{s.port}" for s in servers)
    client = _tls(pki, client="client", server_name=SERVER_NAME)
    handles = []
    try:
        remote_worker = RemoteRolloutWorker(rollout_address, tls=client)
        handles.append(remote_worker)
        assert remote_worker.name == "tls-worker" and remote_worker.progress().running == 0
        assert remote_worker.role == "rollout"
        drafter = RemoteDrafter(drafter_address, tls=client)
        handles.append(drafter)
        assert drafter.version == 0
        delta = {k: torch.full_like(v, 0.01) for k, v in trainable_state(aggregator.drafter).items()}
        drafter.push_delta("tls-worker", delta, tokens=5)
        status = drafter.status()
        assert status.total_pushes == 1 and status.pending_tokens == 5
        assert drafter.publish({"step": 1}) == 1
        with pytest.raises(RpcError, match=rf"^Progress on rollout worker at {rollout_address} failed with "
                                           r"UNAVAILABLE"):
            RemoteRolloutWorker(rollout_address, timeout=10, tls=_tls(pki, server_name=SERVER_NAME))
    finally:
        for handle in handles:
            handle.close()
        for server in servers:
            server.stop(0)


# ---- settings and flags ----------------------------------------------------------------------------------------


def test_client_settings_come_from_flags_then_environment(pki):
    env = {"TLT_TLS_CA": str(pki["other_ca"]), "TLT_TLS_SERVER_NAME": SERVER_NAME}
    assert resolve_client_tls({}, {}) is None
    from_env = resolve_client_tls({}, env)
    assert from_env.ca == pki["other_ca"].read_bytes() and from_env.server_name == SERVER_NAME
    assert from_env.channel_options() == [("grpc.ssl_target_name_override", SERVER_NAME)]
    flagged = resolve_client_tls({"ca": pki["ca"]}, env)
    assert flagged.ca == pki["ca"].read_bytes() and flagged.server_name == SERVER_NAME
    assert resolve_client_tls({"ca": pki["ca"]}, None).server_name is None
    with pytest.raises(ConfigError, match=r"^TLT_TLS_CA /nowhere/ca\.crt: no such file"):
        resolve_client_tls({}, {"TLT_TLS_CA": "/nowhere/ca.crt"})
    with pytest.raises(ConfigError, match=r"^TLT_TLS_KEY needs --tls-cert \(or TLT_TLS_CERT\)"):
        resolve_client_tls({"ca": pki["ca"]}, {"TLT_TLS_KEY": str(pki["client_key"])})
    with_key = resolve_client_tls({"ca": pki["ca"], "cert": pki["client_cert"], "key": pki["client_key"]})
    assert with_key.private_key == pki["client_key"].read_bytes()
    assert "PRIVATE" not in repr(with_key) and "PRIVATE" not in repr(ServerTLS.from_files(pki["cert"], pki["key"]))
    assert ServerTLS.from_files(None, None) is None
    assert ServerTLS.from_files(pki["cert"], pki["key"], pki["ca"]).mutual


def _bad_serve_cases(pki) -> list[tuple[list[str], str]]:
    cert, key = ["--tls-cert", str(pki["cert"])], ["--tls-key", str(pki["key"])]
    return [
        (cert, r"--tls-cert needs --tls-key"),
        (key, r"--tls-key needs --tls-cert"),
        (["--tls-client-ca", str(pki["ca"])], r"--tls-client-ca needs --tls-cert and --tls-key"),
        (["--tls-cert", "/nowhere/tls.crt", *key], r"--tls-cert /nowhere/tls\.crt: no such file"),
        (["--tls-cert", str(pki["ca"].parent), *key], r"--tls-cert \S+: is a directory"),
        (["--tls-cert", str(pki["ca"] / "tls.crt"), *key], r"--tls-cert \S+ca\.crt/tls\.crt: cannot read it"),
        (["--tls-cert", str(pki["not_pem"]), *key], r"--tls-cert \S+not-pem\.txt: not a PEM certificate"),
        (["--tls-cert", str(pki["key"]), *key], r"--tls-cert \S+server\.key: not a PEM certificate"),
        ([*cert, "--tls-key", str(pki["cert"])], r"--tls-key \S+server\.crt: not a PEM private key"),
        ([*cert, "--tls-key", str(pki["client_key"])],
         r"--tls-key \S+client\.key does not belong to the certificate --tls-cert \S+server\.crt"),
        ([*cert, "--tls-key", str(pki["encrypted_key"])], r"--tls-key \S+encrypted\.key: the private key is "
                                                          r"encrypted; gRPC needs an unencrypted PEM key"),
        ([*cert, *key, "--tls-client-ca", str(pki["bad_ca"])],
         r"--tls-client-ca \S+bad-ca\.crt: not a usable CA certificate"),
        ([*cert, *key, "--tls-ca", str(pki["ca"])], r"--tls-ca is for a rollout worker's --drafter connection"),
        (["--tls-server-name", SERVER_NAME], r"--tls-server-name needs --tls-ca: the CA certificate"),
    ]


def test_bad_serve_tls_flags_are_clear_errors(pki, monkeypatch, capsys):
    import tlt.serving.serve

    def must_not_serve(*args, **kwargs):
        raise AssertionError("the TLS flags should have been refused before serving")

    monkeypatch.setattr(tlt.serving.serve, "serve", must_not_serve)
    for flags, message in _bad_serve_cases(pki):
        assert main(["serve", "trainer", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("tlt serve: error: ") and err.count("\n") == 1, err
        assert re.search(message, err), (flags, err)


def test_unreadable_file_is_a_clear_error(pki, tmp_path, monkeypatch, capsys):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    locked = tmp_path / "locked.key"
    locked.write_bytes(pki["key"].read_bytes())
    locked.chmod(0)
    assert main(["serve", "trainer", "--tls-cert", str(pki["cert"]), "--tls-key", str(locked)]) == 2
    assert "cannot read it (Permission denied)" in capsys.readouterr().err


def test_bad_run_tls_flags_are_clear_errors(pki, monkeypatch, capsys):
    for name in ("TLT_TLS_CA", "TLT_TLS_CERT", "TLT_TLS_KEY", "TLT_TLS_SERVER_NAME"):
        monkeypatch.delenv(name, raising=False)
    remote = ["--rollout", "127.0.0.1:9", "--trainer", "127.0.0.1:9", "--no-progress"]
    cases = [(["--tls-ca", str(pki["ca"])], "--tls-ca: TLS applies to running services"),
             ([*remote, "--tls-cert", str(pki["client_cert"])], "--tls-cert needs --tls-ca (or TLT_TLS_CA)"),
             ([*remote, "--tls-ca", str(pki["ca"]), "--tls-key", str(pki["client_key"])],
              "--tls-key needs --tls-cert (or TLT_TLS_CERT)"),
             ([*remote, "--tls-ca", str(pki["not_pem"])], "not a PEM certificate")]
    for flags, message in cases:
        assert main(["run", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("tlt run: error: ") and message in err, err


def test_bad_tls_flags_exit_with_one_line_from_the_real_command(pki):
    out = subprocess.run([sys.executable, "-m", "tlt.cli", "serve", "trainer", "--tls-cert", str(pki["cert"]),
                          "--tls-key", str(pki["client_key"])], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--tls-key" in out.stderr and "does not belong to the certificate" in out.stderr
    assert "Traceback" not in out.stderr


# ---- certificate rotation ----------------------------------------------------------------------------------


def _health_code(address: str, tls: ClientTLS) -> grpc.StatusCode:
    """The code a health Check over a fresh connection ends with."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with open_channel(address, tls) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_server_serves_a_renewed_certificate_and_keeps_the_last_good_one(pki, tmp_path, caplog):
    """cert-manager renews the mounted certificate in place: new connections get the new one without a
    restart; a half-written renewal (a key that does not match) is logged and the last good one stays."""
    from tlt.rpc.server import start_server

    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(pki["cert"].read_bytes())
    key.write_bytes(pki["key"].read_bytes())
    server = start_server([], host="localhost", tls=ServerTLS.from_files(cert, key))
    address = f"localhost:{server.port}"
    try:
        assert _health_code(address, _tls(pki)) == grpc.StatusCode.OK
        assert _health_code(address, _tls(pki, ca="other_ca")) == grpc.StatusCode.UNAVAILABLE

        cert.write_bytes(pki["renewed_cert"].read_bytes())  # the renewal, signed by the other CA
        key.write_bytes(pki["renewed_key"].read_bytes())
        assert _health_code(address, _tls(pki, ca="other_ca")) == grpc.StatusCode.OK
        assert _health_code(address, _tls(pki)) == grpc.StatusCode.UNAVAILABLE

        key.write_bytes(pki["client_key"].read_bytes())  # torn: the key of another certificate
        with caplog.at_level("WARNING", logger="tlt.rpc.tls"):
            assert _health_code(address, _tls(pki, ca="other_ca")) == grpc.StatusCode.OK
        assert "cannot be used, still serving the previous certificate" in caplog.text
        assert "does not belong to the certificate" in caplog.text
    finally:
        server.stop(0)


def test_client_dials_with_renewed_files_and_keeps_the_last_good_ones(pki, tmp_path, caplog):
    """The client side of a rotation: the server restarts with a certificate from another CA and the client's
    mounted CA file was renewed to match; a RemoteClient rereads it and gets through, a client that kept the
    old settings cannot. A renewal that fails the checks is logged and the last good settings stay."""
    import dataclasses

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tlt.rpc.client import RemoteClient
    from tlt.rpc.server import start_server

    class Health(RemoteClient):
        stub_class = health_pb2_grpc.HealthStub
        peer = "health service"

    def check(client: Health) -> None:
        client._call("Check", health_pb2.HealthCheckRequest())

    ca = tmp_path / "ca.crt"
    ca.write_bytes(pki["ca"].read_bytes())
    server = start_server([], host="localhost", tls=ServerTLS.from_files(pki["cert"], pki["key"]))
    port = server.port
    client = Health(f"localhost:{port}", timeout=10, tls=resolve_client_tls({"ca": ca}))
    stale = Health(f"localhost:{port}", timeout=10, tls=dataclasses.replace(client.tls, files=None))
    try:
        check(client)
        check(stale)
        server.stop(0)
        ca.write_bytes(pki["other_ca"].read_bytes())
        server = start_server([], host="localhost", port=port,
                              tls=ServerTLS.from_files(pki["renewed_cert"], pki["renewed_key"]))
        check(client)
        with pytest.raises(RpcError) as refused:
            check(stale)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE

        ca.write_bytes(b"half written")
        with caplog.at_level("WARNING", logger="tlt.rpc.client"):
            check(client)
        assert "changed but cannot be used, keeping the previous ones" in caplog.text
        assert "--tls-ca" in caplog.text
    finally:
        client.close()
        stale.close()
        server.stop(0)
