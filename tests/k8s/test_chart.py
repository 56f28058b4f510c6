"""The Helm chart (rendered offline with helm-python-sdk), its RBAC, the example RLJobs and the Dockerfile."""

from __future__ import annotations

import json
import re
import tarfile
import tomllib

import pytest
import yaml

from tests.k8s.chart_helpers import (
    CHART_DIR,
    DASHBOARDS_DIR,
    NAMESPACE,
    REPO_ROOT,
    copy_chart,
    example_files,
    find,
    load_yaml_documents,
    render,
    validate_manifest,
)
from tlt.config import job_spec_from_dict
from tlt_operator import rbac
from tlt_operator.crd import default_rljob, rljob_errors

helm = pytest.importorskip("helm_python")

SCENARIOS = {
    "default": {},
    "namespaced": {"operator": {"watchNamespaces": ["team-a", "team-b"]}},
    "peering-clusterwide": {"operator": {"replicas": 2, "peering": {"enabled": True}}},
    "peering-namespaced": {"operator": {"replicas": 2, "watchNamespaces": ["team-a"],
                                        "peering": {"enabled": True, "name": "tlt-a", "priority": 10}}},
    "everything": {
        "image": {"repository": "registry.example.com/tlt", "tag": "dev", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "operator": {"verbose": True, "logFormat": "json", "extraArgs": ["--dev"],
                     "extraEnv": [{"name": "TLT_LOG", "value": "debug"}],
                     "nodeSelector": {"pool": "system"},
                     "tolerations": [{"key": "system", "operator": "Exists", "effect": "NoSchedule"}],
                     "podAnnotations": {"a": "b"}, "podLabels": {"team": "rl"}, "priorityClassName": "high",
                     "prometheusUrl": "http://prometheus-operated.monitoring:9090"},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/tlt"}},
        "objectStore": {"s3": {"endpoint": "http://minio.minio.svc:9000", "region": "us-east-1",
                               "createSecret": True, "accessKeyId": "AKIA", "secretAccessKey": "s3cr3t"}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
        "dashboards": {"namespace": "monitoring", "annotations": {"grafana_folder": "TLT"}},
    },
    "no-rbac-no-sa": {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "tlt-sa"},
                      "dashboards": {"enabled": False}},
    "grpc-tls": {"grpcTLS": {"enabled": True, "secretName": "tlt-grpc-tls"}},
}
TLS_ENV = ("TLT_GRPC_TLS_SECRET", "TLT_GRPC_TLS_CLIENT_AUTH", "TLT_TLS_SERVER_NAME", "TLT_TLS_CA", "TLT_TLS_CERT",
           "TLT_TLS_KEY")


def operator_container(docs):
    (deployment,) = find(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


# --------------------------------------------------------------------------------------------------------
# Lint, render, strict validation


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_lint_is_clean(chart_dir, scenario):
    report = helm.lint(chart_dir, SCENARIOS[scenario], namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []  # info ("icon is recommended") only


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rendered_manifests_validate_strictly(chart, scenario):
    docs = render(chart, SCENARIOS[scenario])
    assert find(docs, "Deployment")
    for doc in docs:
        validate_manifest(doc)
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                               "ClusterKopfPeering"):
            assert doc["metadata"].get("namespace"), doc["metadata"]


def test_chart_crds_validate_strictly(chart):
    crds = chart.crds
    assert [c["name"] for c in crds] == ["crds/rljob.yaml"]
    for entry in crds:
        (doc,) = [d for d in yaml.safe_load_all(entry["data"]) if d]
        validate_manifest(doc)


def test_default_render_is_minimal(chart):
    dashboards = len(list(DASHBOARDS_DIR.glob("*.json"))) if DASHBOARDS_DIR.is_dir() else 0
    assert sorted(d["kind"] for d in render(chart)) == sorted(
        ["ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding", "Deployment", "ServiceAccount"]
        + ["ConfigMap"] * dashboards)


def test_values_schema_rejects_mistakes(chart):
    chart.validate_schema(SCENARIOS["everything"])
    chart.validate_schema(SCENARIOS["grpc-tls"])
    for bad in ({"operator": {"replicaz": 2}}, {"operator": {"watchNamespaces": ["team_*"]}},
                {"image": {"pullPolicy": "Sometimes"}}, {"operator": {"logFormat": "xml"}},
                {"metrics": {"serviceMonitor": {"interval": "often"}}}, {"unknown": 1},
                {"grpcTLS": {"enabled": "yes"}}, {"grpcTLS": {"secretName": "Bad_Name"}},
                {"grpcTLS": {"serverName": ""}}, {"grpcTLS": {"requireClientCert": 1}},
                {"grpcTLS": {"secretname": "x"}}):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(bad)
        with pytest.raises(helm.HelmValuesError):
            render(chart, bad)


# --------------------------------------------------------------------------------------------------------
# The operator Deployment


def test_operator_runs_kopf_standalone_cluster_wide(chart):
    deployment, container = operator_container(render(chart))
    assert container["image"] == f"ghcr.io/tlt-dev/tlt:{chart.metadata['appVersion']}"
    assert container["command"] == ["kopf"]
    assert container["args"] == ["run", "--standalone", "-m", "tlt_operator.handlers", "--all-namespaces",
                                 "--liveness=http://0.0.0.0:8080/healthz", "--log-format=full"]
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    (port,) = [p for p in container["ports"] if p["name"] == probe["port"]]
    assert port["containerPort"] == 8080
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    for name in ("POD_ID", "POD_NAME"):
        assert {"name": name, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    assert not {"TLT_PROMETHEUS_URL", "TLT_DEFAULT_S3_ENDPOINT"} & {e["name"] for e in container["env"]}
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_operator_watches_given_namespaces_with_peering(chart):
    docs = render(chart, SCENARIOS["peering-namespaced"])
    deployment, container = operator_container(docs)
    args = container["args"]
    assert "--namespace=team-a" in args and "--all-namespaces" not in args
    assert "--peering=tlt-a" in args and "--priority=10" in args and "--standalone" not in args
    assert deployment["spec"]["replicas"] == 2 and deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    (peering,) = find(docs, "KopfPeering")
    assert peering["metadata"] == peering["metadata"] | {"name": "tlt-a", "namespace": "team-a"}
    assert peering["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    assert {c["metadata"]["name"] for c in find(docs, "CustomResourceDefinition")} == {
        "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"}


def test_peering_crds_only_when_enabled(chart):
    assert not find(render(chart), "CustomResourceDefinition")
    docs = render(chart, {"operator": {"peering": {"enabled": True, "installCRDs": False}}})
    assert not find(docs, "CustomResourceDefinition")
    assert [p["metadata"]["name"] for p in find(docs, "ClusterKopfPeering")] == ["tlt"]


def test_several_replicas_need_peering(chart):
    with pytest.raises(helm.HelmRenderError, match="peering"):
        render(chart, {"operator": {"replicas": 2}})


def test_everything_scenario(chart):
    docs = render(chart, SCENARIOS["everything"])
    _, container = operator_container(docs)
    assert container["image"] == "registry.example.com/tlt:dev" and container["imagePullPolicy"] == "Always"
    assert container["args"][-3:] == ["--log-format=json", "--verbose", "--dev"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TLT_DEFAULT_S3_ENDPOINT"] == "http://minio.minio.svc:9000"
    assert env["TLT_DEFAULT_S3_REGION"] == "us-east-1"
    assert env["TLT_DEFAULT_S3_CREDENTIALS_SECRET"] == "tlt-s3" and env["TLT_LOG"] == "debug"
    assert env["TLT_PROMETHEUS_URL"] == "http://prometheus-operated.monitoring:9090"
    (secret,) = find(docs, "Secret")
    assert secret["metadata"]["name"] == "tlt-s3"
    assert secret["stringData"] == {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}
    (monitor,) = find(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "tlt"}
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    (pod_monitor,) = find(docs, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "controller"
    (sa,) = find(docs, "ServiceAccount")
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/tlt"}


def test_s3_secret_needs_its_keys(chart):
    with pytest.raises(helm.HelmRenderError, match="accessKeyId"):
        render(chart, {"objectStore": {"s3": {"createSecret": True}}})
    docs = render(chart, {"objectStore": {"s3": {"credentialsSecret": "existing"}}})
    assert not find(docs, "Secret")
    _, container = operator_container(docs)
    assert {"name": "TLT_DEFAULT_S3_CREDENTIALS_SECRET", "value": "existing"} in container["env"]


def test_grpc_tls_is_off_by_default(chart):
    deployment, container = operator_container(render(chart))
    assert not set(TLS_ENV) & {e["name"] for e in container["env"]}
    assert [v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]] == ["tmp"]
    assert [m["name"] for m in container["volumeMounts"]] == ["tmp"]


def test_grpc_tls_reaches_the_operator(chart):
    deployment, container = operator_container(render(chart, SCENARIOS["grpc-tls"]))
    env = {e["name"]: e["value"] for e in container["env"] if e["name"] in TLS_ENV}
    assert env == {"TLT_GRPC_TLS_SECRET": "tlt-grpc-tls", "TLT_GRPC_TLS_CLIENT_AUTH": "true",
                   "TLT_TLS_SERVER_NAME": "tlt-grpc", "TLT_TLS_CA": "/etc/tlt-tls/ca.crt",
                   "TLT_TLS_CERT": "/etc/tlt-tls/tls.crt", "TLT_TLS_KEY": "/etc/tlt-tls/tls.key"}
    # the operator's own SetRole client reads the files where the Secret is mounted
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "grpc-tls"]
    assert mount == {"name": "grpc-tls", "mountPath": "/etc/tlt-tls", "readOnly": True}
    assert all(env[name].startswith(mount["mountPath"] + "/") for name in ("TLT_TLS_CA", "TLT_TLS_CERT", "TLT_TLS_KEY"))
    assert {"name": "grpc-tls", "secret": {"secretName": "tlt-grpc-tls"}} in deployment["spec"]["template"]["spec"][
        "volumes"]
    _, container = operator_container(render(chart, {"grpcTLS": {"enabled": True, "secretName": "s",
                                                                 "serverName": "grpc.tlt.internal",
                                                                 "requireClientCert": False}}))
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TLT_GRPC_TLS_CLIENT_AUTH"] == "false" and env["TLT_TLS_SERVER_NAME"] == "grpc.tlt.internal"
    # a secret name alone does not turn TLS on
    _, container = operator_container(render(chart, {"grpcTLS": {"secretName": "s"}}))
    assert not set(TLS_ENV) & {e["name"] for e in container["env"]}


def test_grpc_tls_needs_a_secret(chart):
    with pytest.raises(helm.HelmRenderError, match=r"grpcTLS\.secretName is required"):
        render(chart, {"grpcTLS": {"enabled": True}})


def test_monitors_follow_watched_namespaces(chart):
    docs = render(chart, {"operator": {"watchNamespaces": ["team-a"]},
                          "metrics": {"serviceMonitor": {"enabled": True, "controllerPodMonitor": False}}})
    (monitor,) = find(docs, "ServiceMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    assert not find(docs, "PodMonitor")


# --------------------------------------------------------------------------------------------------------
# RBAC: exactly tlt_operator.rbac.OPERATOR_RBAC_RULES


def test_rbac_rules_file_is_generated():
    path = CHART_DIR / rbac.CHART_RULES_FILE
    assert path.read_text() == rbac.render_chart_rules(), \
        f"stale: python -m tlt_operator.rbac --out {path.relative_to(REPO_ROOT)}"
    assert rbac.main(["--out", str(path), "--check"]) == 0


def _granted(docs, namespace=None) -> set[tuple[str, str, str]]:
    """(group, resource, verb) the operator's ServiceAccount gets cluster-wide, or in ``namespace``."""
    roles = {r["metadata"]["name"]: r for r in find(docs, "ClusterRole")}
    bindings = find(docs, "ClusterRoleBinding") + [
        b for b in find(docs, "RoleBinding") if b["metadata"]["namespace"] == namespace]
    granted = set()
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tlt-operator", "namespace": NAMESPACE}]
        granted |= rbac.expand_policy_rules(roles[binding["roleRef"]["name"]]["rules"])
    return granted


def _triples(rules) -> set[tuple[str, str, str]]:
    return {(r.api_group, r.resource, verb) for r in rules for verb in r.verbs}


def test_rbac_cluster_wide(chart):
    docs = render(chart)
    assert _granted(docs) == _triples(rbac.rules(peering=False))
    assert not find(docs, "Role") and not find(docs, "RoleBinding")
    docs = render(chart, SCENARIOS["peering-clusterwide"])
    assert _granted(docs) == _triples(rbac.rules(peering=True)) - {("kopf.dev", "kopfpeerings", v)
                                                                     for v in ("get", "list", "watch", "patch")}


def test_rbac_namespaced(chart):
    docs = render(chart, SCENARIOS["namespaced"])
    cluster_only = _triples(rbac.rules(peering=False, cluster_scoped=True))
    assert _granted(docs) == cluster_only
    for namespace in ("team-a", "team-b"):
        assert _granted(docs, namespace) == _triples(rbac.rules(peering=False))
    assert _granted(docs, "elsewhere") == cluster_only
    docs = render(chart, SCENARIOS["peering-namespaced"])
    assert _granted(docs, "team-a") == _triples(rbac.rules(peering=True)) - {
        ("kopf.dev", "clusterkopfpeerings", v) for v in ("get", "list", "watch", "patch")}


def test_rbac_is_least_privilege(chart):
    for scenario in SCENARIOS.values():
        for role in find(render(chart, scenario), "ClusterRole"):
            for rule in role["rules"]:
                assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], rule
                assert not {"secrets", "pods/exec", "roles", "rolebindings"} & set(rule["resources"]), rule
    docs = render(chart, SCENARIOS["no-rbac-no-sa"])
    assert not find(docs, "ClusterRole") and not find(docs, "ServiceAccount")
    deployment, _ = operator_container(docs)
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "tlt-sa"


def test_rbac_contract():
    """The permissions the issue asks for, and the helper the operator tests use."""
    assert _triples(rbac.OPERATOR_RBAC_RULES) >= {
        ("tlt.dev", "rljobs", "patch"), ("tlt.dev", "rljobs/status", "patch"), ("tlt.dev", "rljobs/finalizers",
                                                                              "update"),
        ("", "pods", "patch"), ("apps", "statefulsets", "create"), ("batch", "jobs", "delete"),
        ("", "events", "create"), ("apiextensions.k8s.io", "customresourcedefinitions", "watch")}
    assert rbac.allows("", "pods", "patch") and not rbac.allows("", "pods", "delete")
    assert not rbac.allows("", "pods", "create") and not rbac.allows("", "secrets", "get")
    assert rbac.allows("apps", "deployments", "create") and not rbac.allows("apps", "deployments", "update")
    assert not rbac.allows("kopf.dev", "kopfpeerings", "patch")
    assert rbac.allows("kopf.dev", "kopfpeerings", "patch", peering=True)
    for group, resource, verbs in rbac.OPERATOR_RBAC_RULES:  # plain 3-tuples
        assert isinstance(group, str) and isinstance(resource, str) and verbs


# --------------------------------------------------------------------------------------------------------
# Dashboards


def test_dashboards_link_to_the_repository(tmp_path):
    link = CHART_DIR / "dashboards"
    assert link.is_symlink() and str(link.readlink()) == "../../../dashboards"
    if not DASHBOARDS_DIR.is_dir():
        pytest.skip("the top-level dashboards/ is not written yet: the chart cannot load until it is")
    with tarfile.open(helm.package(CHART_DIR, destination=tmp_path)) as archive:  # `helm package` follows it
        packaged = {m.name for m in archive.getmembers()}
    assert {f"tlt/dashboards/{p.name}" for p in DASHBOARDS_DIR.glob("*.json")} <= packaged
    with helm.Chart.load(CHART_DIR) as real:
        docs = find(render(real), "ConfigMap")
    files = sorted(DASHBOARDS_DIR.glob("*.json"))
    assert len(docs) == len(files) >= 1
    for doc in docs:
        (key, text) = next(iter(doc["data"].items()))
        assert re.fullmatch(r"[-._a-zA-Z0-9]+", key)
        assert json.loads(text) == json.loads((DASHBOARDS_DIR / key).read_text())


def test_dashboards_become_configmaps_for_the_grafana_sidecar(tmp_path):
    boards = {"long_tail.json": json.dumps({"title": "Long tail <util> & roles", "panels": [{"id": 1}]}, indent=2),
              "speculative-decoding.json": json.dumps({"title": "SD", "panels": []})}
    chart_dir = copy_chart(tmp_path, dashboards=boards)
    with helm.Chart.load(chart_dir) as chart:
        docs = find(render(chart, {"dashboards": {"annotations": {"grafana_folder": "TLT"}}}), "ConfigMap")
        assert not find(render(chart, {"dashboards": {"enabled": False}}), "ConfigMap")
    assert sorted(d["metadata"]["name"] for d in docs) == ["tlt-dashboard-long-tail",
                                                           "tlt-dashboard-speculative-decoding"]
    for doc in docs:
        validate_manifest(doc)
        assert doc["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert doc["metadata"]["annotations"] == {"grafana_folder": "TLT"}
        ((key, text),) = doc["data"].items()
        assert text == boards[key]


# --------------------------------------------------------------------------------------------------------
# Examples


def test_there_are_cpu_and_gpu_s3_examples():
    names = [p.name for p in example_files()]
    assert "rljob-demo-cpu.yaml" in names and "rljob-gpu-s3.yaml" in names


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_example_validates(path):
    docs = load_yaml_documents(path)
    jobs = [d for d in docs if d["kind"] == "RLJob"]
    assert jobs
    for doc in docs:
        if doc["kind"] != "RLJob":
            validate_manifest(doc)
            continue
        assert rljob_errors(doc) == []
        spec = job_spec_from_dict(doc["spec"]["job"])
        assert job_spec_from_dict(default_rljob(doc)["spec"]["job"]) == spec
        assert spec.name == doc["metadata"]["name"]


def test_gpu_example_uses_gpus_and_s3():
    (job,) = [d for d in load_yaml_documents(REPO_ROOT / "deploy/examples/rljob-gpu-s3.yaml") if d["kind"] == "RLJob"]
    assert job["spec"]["job"]["store"]["uri"].startswith("s3://")
    assert job["spec"]["storage"]["s3"]["credentialsSecret"]
    assert job["spec"]["pods"]["rollout"]["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_broken_example_is_rejected(path):
    (job,) = [d for d in load_yaml_documents(path) if d["kind"] == "RLJob"]
    for mutate in (lambda j: j["spec"]["job"]["rollout"].update(workers=0),
                   lambda j: j["spec"]["job"]["rollout"].update(speculative={"strategy": 428}),
                   lambda j: j["spec"]["job"].update(stepz=3),
                   lambda j: j["spec"].pop("image")):
        broken = yaml.safe_load(yaml.safe_dump(job))
        mutate(broken)
        assert rljob_errors(broken)


# --------------------------------------------------------------------------------------------------------
# The image


def test_dockerfile():
    text = (REPO_ROOT / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_pin,) = [d for d in deps if d.startswith("torch")]
    assert torch_pin == "torch==2.13.0" and f'"{torch_pin}"' in text
    assert 'ENTRYPOINT ["tlt"]' in instructions
    (user,) = [line.split()[1] for line in instructions if line.startswith("USER ")]
    uid = int(user.split(":")[0])
    assert uid != 0
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert values["operator"]["podSecurityContext"]["runAsUser"] == uid
    for line in instructions:
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO_ROOT / src).exists(), src
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)
    assert not {"services", "operators", "pyproject.toml", "README.md", "proto"} & set(ignored)
