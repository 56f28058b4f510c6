"""Optional gRPC TLS on Kubernetes: the chart's ``grpcTLS`` values reach the operator as environment, and the
operator's children then mount the Secret and pass TLS flags that the real `tlt` command accepts; without it
the children are exactly as before."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.chart_helpers import find, render, validate_manifest
from tests.tls_pki import SERVER_NAME, make_pki, write_tls_secret
from tlt.cli import build_parser
from tlt.errors import ConfigError
from tlt.rpc import tls as rpc_tls
from tlt.rpc.tls import ServerTLS, resolve_client_tls
from tlt_operator import resources
from tlt_operator.resources import GrpcTLS

TLS_ON = GrpcTLS("tlt-grpc-tls", SERVER_NAME, client_auth=True)
POD_KINDS = {"StatefulSet", "Deployment", "Job"}


def _rljob(name: str = "r") -> dict[str, Any]:
    return {"apiVersion": resources.API_VERSION, "kind": resources.KIND,
            "metadata": {"name": name, "namespace": "team-a", "uid": "0b0e6a3c-8a4c-4c3e-9a57-0d3f4bb0d001"},
            "spec": {"image": "ghcr.io/tlt-dev/tlt:0.1.0", "job": {"name": name, "rollout": {"workers": 2}},
                     "storage": {"volume": {"claimName": "tlt-data"}}}}


def _pods(children: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """component -> (pod spec, its container) for every child that runs pods."""
    out = {}
    for child in children:
        if child["kind"] in POD_KINDS:
            pod = child["spec"]["template"]["spec"]
            (container,) = pod["containers"]
            out[child["metadata"]["labels"][resources.LABEL_COMPONENT]] = (pod, container)
    return out


@pytest.fixture
def no_tls_env(monkeypatch):
    for name in (resources.ENV_GRPC_TLS_SECRET, resources.ENV_GRPC_TLS_CLIENT_AUTH, resources.ENV_TLS_SERVER_NAME):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_without_tls_nothing_changes(no_tls_env):
    children = resources.build_children(_rljob())
    assert children == resources.build_children(_rljob(), tls=None)
    text = json.dumps(children)
    assert "--tls-" not in text and resources.GRPC_TLS_VOLUME not in text and resources.GRPC_TLS_DIR not in text


def test_with_tls_every_pod_mounts_the_secret_and_gets_the_flags(no_tls_env):
    no_tls_env.setenv(resources.ENV_GRPC_TLS_SECRET, "tlt-grpc-tls")
    no_tls_env.setenv(resources.ENV_TLS_SERVER_NAME, SERVER_NAME)
    children = resources.build_children(_rljob())  # from the operator's environment
    assert children == resources.build_children(_rljob(), tls=TLS_ON)
    pods = _pods(children)
    assert set(pods) == {"rollout", "drafter", "trainer", "controller"}
    cert, key, ca = ["/etc/tlt-tls/tls.crt", "/etc/tlt-tls/tls.key", "/etc/tlt-tls/ca.crt"]
    for component, (pod, container) in pods.items():
        assert {"name": "grpc-tls", "secret": {"secretName": "tlt-grpc-tls"}} in pod["volumes"], component
        assert {"name": "grpc-tls", "mountPath": "/etc/tlt-tls", "readOnly": True} in container["volumeMounts"]
        command = container["command"]
        if component == "controller":
            assert command[:2] == ["tlt", "run"]
            assert _flags(command) >= {"--tls-ca": ca, "--tls-cert": cert, "--tls-key": key,
                                       "--tls-server-name": SERVER_NAME}.items()
        else:
            assert command[:3] == ["tlt", "serve", component]
            assert _flags(command) >= {"--tls-cert": cert, "--tls-key": key, "--tls-client-ca": ca}.items()
            # only the rollout worker dials another service (the drafter); its certificate doubles as client's
            assert ("--tls-ca" in command) == (component == "rollout")
            assert ("--tls-server-name" in command) == (component == "rollout")
    rollout_cmd = pods["rollout"][1]["command"]
    assert _flags(rollout_cmd) >= {"--tls-ca": ca, "--tls-server-name": SERVER_NAME}.items()
    assert rollout_cmd.count("--tls-cert") == 1


def _flags(command: list[str]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in itertools.pairwise(command) if a.startswith("--tls-")}


def test_tls_changes_only_the_volume_mount_and_flags(no_tls_env):
    plain = resources.build_children(_rljob(), tls=None)
    secure = resources.build_children(_rljob(), tls=TLS_ON)
    for before, after in zip(plain, secure, strict=True):
        after = copy.deepcopy(after)
        if after["kind"] in POD_KINDS:
            pod = after["spec"]["template"]["spec"]
            (container,) = pod["containers"]
            pod["volumes"].remove(TLS_ON.volume())
            container["volumeMounts"].remove(TLS_ON.volume_mount())
            container["command"] = _strip_tls(container["command"])
            if after["kind"] == "Job":  # the template hash follows the template
                after["metadata"]["annotations"] = before["metadata"]["annotations"]
        assert after == before, after["kind"]
    # probes are HTTP on the metrics port, Services still expose grpc and metrics
    for _, container in _pods(secure).values():
        assert container["readinessProbe"]["httpGet"]["port"] == resources.METRICS_PORT
        assert container["livenessProbe"]["httpGet"]["port"] == resources.METRICS_PORT


def _strip_tls(command: list[str]) -> list[str]:
    out, skip = [], False
    for arg in command:
        if skip:
            skip = False
        elif arg.startswith("--tls-"):
            skip = True
        else:
            out.append(arg)
    return out


def test_plain_tls_without_client_certificates(no_tls_env):
    no_tls_env.setenv(resources.ENV_GRPC_TLS_SECRET, "s")
    no_tls_env.setenv(resources.ENV_GRPC_TLS_CLIENT_AUTH, "false")
    assert GrpcTLS.from_env() == GrpcTLS("s", None, client_auth=False)
    pods = _pods(resources.build_children(_rljob()))
    for component in ("rollout", "drafter", "trainer"):
        command = pods[component][1]["command"]
        assert "--tls-cert" in command and "--tls-client-ca" not in command
        assert "--tls-server-name" not in command  # none set: clients check the names they dial


def test_bad_operator_environment_names_the_variable():
    with pytest.raises(ConfigError, match=r"^TLT_GRPC_TLS_SECRET='Not_A_Name' is not a Secret name"):
        GrpcTLS.from_env({"TLT_GRPC_TLS_SECRET": "Not_A_Name"})
    with pytest.raises(ConfigError, match=r"^TLT_GRPC_TLS_CLIENT_AUTH='maybe': write true or false"):
        GrpcTLS.from_env({"TLT_GRPC_TLS_SECRET": "s", "TLT_GRPC_TLS_CLIENT_AUTH": "maybe"})
    assert GrpcTLS.from_env({"TLT_GRPC_TLS_SECRET": "  "}) is None
    assert resources.ENV_TLS_SERVER_NAME == rpc_tls.ENV_SERVER_NAME  # the operator's own client reads the same


def test_children_with_tls_validate_strictly():
    for child in resources.build_children(_rljob(), tls=TLS_ON):
        validate_manifest(child)


def test_the_pods_tls_flags_work_with_the_real_command(tmp_path):
    """Put a real Secret's files where the pods mount them, and check that `tlt` accepts every pod's flags."""
    mount = write_tls_secret(tmp_path / "etc-tlt-tls", make_pki(tmp_path / "pki"))
    pods = _pods(resources.build_children(_rljob(), tls=TLS_ON))
    parser = build_parser()
    for component, (_, container) in pods.items():
        argv = [arg.replace(resources.GRPC_TLS_DIR, str(mount)) for arg in container["command"][1:]]
        args = parser.parse_args(argv)
        client = {"ca": args.tls_ca, "cert": args.tls_cert, "key": args.tls_key, "server_name": args.tls_server_name}
        if component == "controller":
            tls = resolve_client_tls(client)
            assert tls is not None and tls.cert_chain and tls.server_name == SERVER_NAME
            continue
        server = ServerTLS.from_files(args.tls_cert, args.tls_key, args.tls_client_ca)
        assert server is not None and server.mutual
        assert server.cert_chain == (mount / "tls.crt").read_bytes()
        if component == "rollout":
            drafter = resolve_client_tls(client)
            assert drafter is not None and drafter.ca == (mount / "ca.crt").read_bytes()


def test_chart_values_reach_the_operator_and_its_pods(chart):
    """The operator Deployment's environment and mount, as rendered by the chart, are what the operator reads."""
    (deployment,) = find(render(chart, {"grpcTLS": {"enabled": True, "secretName": "tlt-grpc-tls"}}), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert GrpcTLS.from_env(env) == TLS_ON
    # the operator's SetRole client (tlt.rpc.tls.ClientTLS.from_env) finds the Secret's files where they are mounted
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "grpc-tls"]
    assert mount["mountPath"] == resources.GRPC_TLS_DIR
    for variable, file in ((rpc_tls.ENV_CA, "ca.crt"), (rpc_tls.ENV_CERT, "tls.crt"), (rpc_tls.ENV_KEY, "tls.key")):
        assert Path(env[variable]) == Path(resources.GRPC_TLS_DIR) / file
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "grpc-tls"]
    assert volume["secret"]["secretName"] == TLS_ON.secret_name
    (default,) = find(render(chart), "Deployment")
    (container,) = default["spec"]["template"]["spec"]["containers"]
    assert GrpcTLS.from_env({e["name"]: e["value"] for e in container["env"] if "value" in e}) is None
