"""The RLJob's children as plain manifests: pure functions of the RLJob object (no API calls).

:func:`build_children` renders everything the operator owns, in creation order:

* ConfigMap ``<job>-spec`` (``job.yaml`` = ``spec.job``),
* headless Service + StatefulSet ``<job>-rollout`` (one pod per ``job.rollout.workers``),
* Service + Deployment ``<job>-drafter`` and ``<job>-trainer`` (one replica each),
* Job ``<job>-controller`` (``tlt run ... --planner external``: the operator moves the roles).

Every child carries the labels of the contract (``docs``: k8s-contract) and an ownerReference to the RLJob
(``controller``/``blockOwnerDeletion`` true). ``spec.suspend`` renders replicas 0 and a suspended Job. Pod
templates carry ``tlt.dev/config-hash`` so a changed job spec or image rolls the pods.

Optional gRPC TLS (:class:`GrpcTLS`, from the operator's environment, which the chart's ``grpcTLS`` values
set): ``TLT_GRPC_TLS_SECRET`` names a ``kubernetes.io/tls`` Secret (``tls.crt``, ``tls.key``, ``ca.crt``) in
the RLJob's namespace. Every pod then mounts it at ``/etc/tlt-tls``; the services serve with ``--tls-cert``/
``--tls-key`` (and ``--tls-client-ca``, mutual TLS, unless ``TLT_GRPC_TLS_CLIENT_AUTH=false``), and the
clients (the controller, the rollout workers' drafter connection) dial with ``--tls-ca`` (presenting the same
certificate) and ``--tls-server-name $TLT_TLS_SERVER_NAME`` when set. Probes use the HTTP metrics port and
do not change.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from tlt.config import JobSpec, job_spec_from_dict
from tlt.errors import ConfigError
from tlt.store_s3 import is_s3

GROUP = "tlt.dev"
VERSION = "v1alpha1"
PLURAL = "rljobs"
KIND = "RLJob"
API_VERSION = f"{GROUP}/{VERSION}"

GRPC_PORT = 50051
METRICS_PORT = 8080
CONFIG_DIR = "/etc/tlt"
CONFIG_KEY = "job.yaml"
DEFAULT_MOUNT_PATH = "/var/lib/tlt"
ROLES = ("rollout", "drafter", "trainer", "controller")

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_JOB = "tlt.dev/job"
LABEL_ROLE = "tlt.dev/role"
ANNOTATION_CONFIG_HASH = "tlt.dev/config-hash"
# Test / debugging overrides read by the operator from a pod (the contract ports are the defaults).
ANNOTATION_METRICS_PORT = "tlt.dev/metrics-port"
ANNOTATION_GRPC_PORT = "tlt.dev/grpc-port"

# gRPC TLS: the operator's environment (see GrpcTLS) and where the Secret lands in the pods.
ENV_GRPC_TLS_SECRET = "TLT_GRPC_TLS_SECRET"
ENV_GRPC_TLS_CLIENT_AUTH = "TLT_GRPC_TLS_CLIENT_AUTH"
ENV_TLS_SERVER_NAME = "TLT_TLS_SERVER_NAME"  # = tlt.rpc.tls.ENV_SERVER_NAME (the operator's own SetRole client)
GRPC_TLS_VOLUME = "grpc-tls"
GRPC_TLS_DIR = "/etc/tlt-tls"
GRPC_TLS_CERT = f"{GRPC_TLS_DIR}/tls.crt"
GRPC_TLS_KEY = f"{GRPC_TLS_DIR}/tls.key"
GRPC_TLS_CA = f"{GRPC_TLS_DIR}/ca.crt"
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

PULL_POLICIES = ("IfNotPresent", "Always", "Never")
DEFAULT_INTERVAL_S = 1.0
MIN_INTERVAL_S = 0.1


# ---- names ------------------------------------------------------------------------------------------


def spec_configmap_name(job: str) -> str:
    return f"{job}-spec"


def rollout_name(job: str) -> str:
    return f"{job}-rollout"


def drafter_name(job: str) -> str:
    return f"{job}-drafter"


def trainer_name(job: str) -> str:
    return f"{job}-trainer"


def controller_name(job: str) -> str:
    return f"{job}-controller"


def rollout_pod_name(job: str, index: int) -> str:
    return f"{job}-rollout-{index}"


def rollout_addresses(job: str, workers: int) -> list[str]:
    """Stable DNS names of the rollout pods through the headless Service (same namespace)."""
    return [f"{rollout_pod_name(job, i)}.{rollout_name(job)}:{GRPC_PORT}" for i in range(workers)]


def child_refs(job: str) -> list[tuple[str, str, str]]:
    """(apiVersion, kind, name) of every child, in creation order (delete in reverse)."""
    return [
        ("v1", "ConfigMap", spec_configmap_name(job)),
        ("v1", "Service", rollout_name(job)),
        ("v1", "Service", drafter_name(job)),
        ("v1", "Service", trainer_name(job)),
        ("apps/v1", "StatefulSet", rollout_name(job)),
        ("apps/v1", "Deployment", drafter_name(job)),
        ("apps/v1", "Deployment", trainer_name(job)),
        ("batch/v1", "Job", controller_name(job)),
    ]


# ---- validation -------------------------------------------------------------------------------------


def validate_spec(spec: Any) -> JobSpec:
    """Check an RLJob ``spec``; the :class:`ConfigError` message starts with the field path (``spec.job...``)."""
    if not isinstance(spec, Mapping):
        raise ConfigError("spec must be a mapping")
    image = spec.get("image")
    if not isinstance(image, str) or not image.strip():
        raise ConfigError("spec.image is required (the TLT image, e.g. ghcr.io/tlt-dev/tlt:0.1.0)")
    policy = spec.get("imagePullPolicy", "IfNotPresent")
    if policy not in PULL_POLICIES:
        raise ConfigError(f"spec.imagePullPolicy must be one of {', '.join(PULL_POLICIES)}, got {policy!r}")
    if not isinstance(spec.get("suspend", False), bool):
        raise ConfigError(f"spec.suspend must be a boolean, got {spec.get('suspend')!r}")
    pods = spec.get("pods") or {}
    if not isinstance(pods, Mapping):
        raise ConfigError("spec.pods must be a mapping of role -> settings")
    for role, settings in pods.items():
        if role not in ROLES:
            raise ConfigError(f"spec.pods.{role}: unknown role; valid roles: {', '.join(ROLES)}")
        if settings is not None and not isinstance(settings, Mapping):
            raise ConfigError(f"spec.pods.{role} must be a mapping")
    for section in ("storage", "planner"):
        if spec.get(section) is not None and not isinstance(spec.get(section), Mapping):
            raise ConfigError(f"spec.{section} must be a mapping, got {type(spec.get(section)).__name__}")
    volume = (spec.get("storage") or {}).get("volume")
    if volume is not None and not (isinstance(volume, Mapping) and volume.get("claimName")):
        raise ConfigError("spec.storage.volume.claimName is required when a volume is set")
    interval = (spec.get("planner") or {}).get("intervalSeconds", DEFAULT_INTERVAL_S)
    if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
        raise ConfigError(f"spec.planner.intervalSeconds must be a number > 0, got {interval!r}")
    job = spec.get("job")
    if not isinstance(job, Mapping):
        raise ConfigError("spec.job is required: the `tlt run` job config (a mapping)")
    try:
        return job_spec_from_dict(dict(job))
    except ConfigError as exc:
        raise ConfigError(f"spec.job.{exc}") from None


def planner_interval(spec: Mapping[str, Any]) -> float:
    """``spec.planner.intervalSeconds`` (default 1 s), never below 0.1 s."""
    value = (spec.get("planner") or {}).get("intervalSeconds", DEFAULT_INTERVAL_S)
    try:
        return max(MIN_INTERVAL_S, float(value))
    except (TypeError, ValueError):
        return DEFAULT_INTERVAL_S


# ---- gRPC TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GrpcTLS:
    """TLS for the gRPC traffic between an RLJob's pods: the ``kubernetes.io/tls`` Secret every pod mounts,
    the name clients check the services' certificates against (None: the dialed host), and whether the
    services require client certificates (mutual TLS; every pod presents the Secret's certificate)."""

    secret_name: str
    server_name: str | None = None
    client_auth: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GrpcTLS | None:
        """From ``TLT_GRPC_TLS_SECRET`` (unset or empty: no TLS), ``TLT_TLS_SERVER_NAME`` and
        ``TLT_GRPC_TLS_CLIENT_AUTH`` (default true); a bad value is a ConfigError naming the variable."""
        env = os.environ if env is None else env
        secret = env.get(ENV_GRPC_TLS_SECRET, "").strip()
        if not secret:
            return None
        if len(secret) > 253 or not _DNS_SUBDOMAIN.fullmatch(secret):
            raise ConfigError(f"{ENV_GRPC_TLS_SECRET}={secret!r} is not a Secret name (lowercase letters, digits, "
                              f"'-' and '.'); set the chart's grpcTLS.secretName")
        auth = env.get(ENV_GRPC_TLS_CLIENT_AUTH, "true").strip().lower()
        if auth not in _TRUE + _FALSE:
            raise ConfigError(f"{ENV_GRPC_TLS_CLIENT_AUTH}={auth!r}: write true or false")
        return cls(secret, env.get(ENV_TLS_SERVER_NAME, "").strip() or None, auth in _TRUE)

    def volume(self) -> dict[str, Any]:
        return {"name": GRPC_TLS_VOLUME, "secret": {"secretName": self.secret_name}}

    def volume_mount(self) -> dict[str, Any]:
        return {"name": GRPC_TLS_VOLUME, "mountPath": GRPC_TLS_DIR, "readOnly": True}

    def server_args(self) -> list[str]:
        """`tlt serve` flags: serve with the Secret's certificate (and require client certificates)."""
        return ["--tls-cert", GRPC_TLS_CERT, "--tls-key", GRPC_TLS_KEY,
                *(["--tls-client-ca", GRPC_TLS_CA] if self.client_auth else [])]

    def client_args(self, certificate: bool = True) -> list[str]:
        """Client flags: trust the Secret's CA, present its certificate (unless the command already names it
        with ``--tls-cert``/``--tls-key``: ``certificate=False``), check ``server_name``."""
        return ["--tls-ca", GRPC_TLS_CA,
                *(["--tls-cert", GRPC_TLS_CERT, "--tls-key", GRPC_TLS_KEY] if certificate else []),
                *(["--tls-server-name", self.server_name] if self.server_name else [])]


# ---- shared pieces ----------------------------------------------------------------------------------


def labels(job: str, component: str) -> dict[str, str]:
    return {LABEL_NAME: "tlt", LABEL_INSTANCE: job, LABEL_COMPONENT: component, LABEL_JOB: job}


def selector(job: str, component: str) -> dict[str, str]:
    """Selector labels (immutable on StatefulSets/Deployments): never the role label, which the operator moves."""
    return {LABEL_INSTANCE: job, LABEL_COMPONENT: component, LABEL_JOB: job}


def owner_reference(rljob: Mapping[str, Any]) -> dict[str, Any]:
    meta = rljob.get("metadata") or {}
    if not meta.get("uid"):
        raise ValueError(f"RLJob {meta.get('name')!r} has no metadata.uid; cannot own children")
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def _metadata(rljob: Mapping[str, Any], name: str, component: str) -> dict[str, Any]:
    meta = rljob["metadata"]
    return {"name": name, "namespace": meta.get("namespace") or "default",
            "labels": labels(meta["name"], component), "ownerReferences": [owner_reference(rljob)]}


def job_yaml(spec: Mapping[str, Any]) -> str:
    """``spec.job`` as YAML; ``store.uri`` defaults to ``<volume mount>/store`` when a volume is set."""
    job = copy.deepcopy(dict(spec.get("job") or {}))
    for section in ("storage", "planner"):
        if spec.get(section) is not None and not isinstance(spec.get(section), Mapping):
            raise ConfigError(f"spec.{section} must be a mapping, got {type(spec.get(section)).__name__}")
    volume = (spec.get("storage") or {}).get("volume")
    if volume:
        store = dict(job.get("store") or {})
        if not store.get("uri"):
            store["uri"] = f"{volume.get('mountPath') or DEFAULT_MOUNT_PATH}/store"
            job["store"] = store
    return yaml.safe_dump(job, sort_keys=False)


def config_hash(spec: Mapping[str, Any]) -> str:
    """Changes whenever the rendered job.yaml changes (pods are rolled)."""
    return hashlib.sha256(job_yaml(spec).encode()).hexdigest()[:16]


def _pod_settings(spec: Mapping[str, Any], role: str) -> Mapping[str, Any]:
    return (spec.get("pods") or {}).get(role) or {}


def _env(spec: Mapping[str, Any], role: str) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    s3 = (spec.get("storage") or {}).get("s3") or {}
    if s3.get("endpoint"):
        env.append({"name": "AWS_ENDPOINT_URL", "value": str(s3["endpoint"])})
    if s3.get("region"):
        env.append({"name": "AWS_DEFAULT_REGION", "value": str(s3["region"])})
    user = list(_pod_settings(spec, role).get("env") or [])
    user_names = {e.get("name") for e in user}
    return [e for e in env if e["name"] not in user_names] + [dict(e) for e in user]


def _container(spec: Mapping[str, Any], role: str, command: list[str], grpc: bool) -> dict[str, Any]:
    settings = _pod_settings(spec, role)
    ports = [{"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"}] if grpc else []
    ports.append({"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"})
    container: dict[str, Any] = {
        "name": role,
        "image": spec["image"],
        "imagePullPolicy": spec.get("imagePullPolicy") or "IfNotPresent",
        "command": command,
        "ports": ports,
        "env": _env(spec, role),
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}],
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": METRICS_PORT},
                          "initialDelaySeconds": 5, "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": METRICS_PORT},
                           "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
        "resources": copy.deepcopy(dict(settings.get("resources") or {})),
    }
    s3 = (spec.get("storage") or {}).get("s3") or {}
    if s3.get("credentialsSecret"):
        container["envFrom"] = [{"secretRef": {"name": str(s3["credentialsSecret"])}}]
    for section in ("storage", "planner"):
        if spec.get(section) is not None and not isinstance(spec.get(section), Mapping):
            raise ConfigError(f"spec.{section} must be a mapping, got {type(spec.get(section)).__name__}")
    volume = (spec.get("storage") or {}).get("volume")
    if volume:
        container["volumeMounts"].append({"name": "data", "mountPath": volume.get("mountPath") or DEFAULT_MOUNT_PATH})
    return container


def _pod_template(rljob: Mapping[str, Any], role: str, container: dict[str, Any],
                  extra_labels: Mapping[str, str] | None = None, restart_policy: str | None = None,
                  tls: GrpcTLS | None = None) -> dict[str, Any]:
    spec = rljob["spec"]
    job = rljob["metadata"]["name"]
    settings = _pod_settings(spec, role)
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": spec_configmap_name(job)}}]
    for section in ("storage", "planner"):
        if spec.get(section) is not None and not isinstance(spec.get(section), Mapping):
            raise ConfigError(f"spec.{section} must be a mapping, got {type(spec.get(section)).__name__}")
    volume = (spec.get("storage") or {}).get("volume")
    if volume:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": volume["claimName"]}})
    if tls is not None:
        volumes.append(tls.volume())
        container["volumeMounts"].append(tls.volume_mount())
    pod_spec: dict[str, Any] = {"containers": [container], "volumes": volumes}
    if restart_policy:
        pod_spec["restartPolicy"] = restart_policy
    if settings.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(settings["nodeSelector"])
    if settings.get("tolerations"):
        pod_spec["tolerations"] = copy.deepcopy(list(settings["tolerations"]))
    return {
        "metadata": {"labels": {**labels(job, role), **(extra_labels or {})},
                     "annotations": {ANNOTATION_CONFIG_HASH: config_hash(spec)}},
        "spec": pod_spec,
    }


def _serve_command(job: str, role: str, tls: GrpcTLS | None = None) -> list[str]:
    return ["tlt", "serve", role, "--config", f"{CONFIG_DIR}/{CONFIG_KEY}", "--host", "0.0.0.0",
            "--port", str(GRPC_PORT), "--metrics-port", str(METRICS_PORT), *(tls.server_args() if tls else [])]


def _service(rljob: Mapping[str, Any], name: str, component: str, headless: bool) -> dict[str, Any]:
    job = rljob["metadata"]["name"]
    spec: dict[str, Any] = {
        "selector": selector(job, component),
        "ports": [{"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"},
                  {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}],
    }
    if headless:
        # Per-pod DNS (<pod>.<service>) for the controller, published before readiness so it can wait itself.
        spec["clusterIP"] = "None"
        spec["publishNotReadyAddresses"] = True
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(rljob, name, component), "spec": spec}


def _suspended(rljob: Mapping[str, Any]) -> bool:
    return bool(rljob["spec"].get("suspend", False))


def _workers(rljob: Mapping[str, Any]) -> int:
    return int(((rljob["spec"].get("job") or {}).get("rollout") or {}).get("workers", 2))


# ---- children ---------------------------------------------------------------------------------------


def configmap(rljob: Mapping[str, Any]) -> dict[str, Any]:
    job = rljob["metadata"]["name"]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(rljob, spec_configmap_name(job), "config"),
            "data": {CONFIG_KEY: job_yaml(rljob["spec"])}}


def rollout_service(rljob: Mapping[str, Any]) -> dict[str, Any]:
    return _service(rljob, rollout_name(rljob["metadata"]["name"]), "rollout", headless=True)


def drafter_service(rljob: Mapping[str, Any]) -> dict[str, Any]:
    return _service(rljob, drafter_name(rljob["metadata"]["name"]), "drafter", headless=False)


def trainer_service(rljob: Mapping[str, Any]) -> dict[str, Any]:
    return _service(rljob, trainer_name(rljob["metadata"]["name"]), "trainer", headless=False)


def rollout_statefulset(rljob: Mapping[str, Any], tls: GrpcTLS | None = None) -> dict[str, Any]:
    job = rljob["metadata"]["name"]
    command = [*_serve_command(job, "rollout", tls), "--name", "$(POD_NAME)",
               "--drafter", f"{drafter_name(job)}:{GRPC_PORT}",
               *(tls.client_args(certificate=False) if tls else [])]  # its serving certificate doubles as client's
    container = _container(rljob["spec"], "rollout", command, grpc=True)
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": _metadata(rljob, rollout_name(job), "rollout"),
        "spec": {
            "serviceName": rollout_name(job),
            "replicas": 0 if _suspended(rljob) else _workers(rljob),
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector(job, "rollout")},
            "template": _pod_template(rljob, "rollout", container, extra_labels={LABEL_ROLE: "rollout"}, tls=tls),
        },
    }


def _deployment(rljob: Mapping[str, Any], role: str, name: str, tls: GrpcTLS | None = None) -> dict[str, Any]:
    job = rljob["metadata"]["name"]
    container = _container(rljob["spec"], role, _serve_command(job, role, tls), grpc=True)
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _metadata(rljob, name, role),
        "spec": {
            "replicas": 0 if _suspended(rljob) else 1,
            # One instance holds the state (drafter aggregation, policy weights): never two at once.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector(job, role)},
            "template": _pod_template(rljob, role, container, tls=tls),
        },
    }


def drafter_deployment(rljob: Mapping[str, Any], tls: GrpcTLS | None = None) -> dict[str, Any]:
    return _deployment(rljob, "drafter", drafter_name(rljob["metadata"]["name"]), tls)


def trainer_deployment(rljob: Mapping[str, Any], tls: GrpcTLS | None = None) -> dict[str, Any]:
    return _deployment(rljob, "trainer", trainer_name(rljob["metadata"]["name"]), tls)


def controller_command(job: str, workers: int, tls: GrpcTLS | None = None) -> list[str]:
    command = ["tlt", "run", f"{CONFIG_DIR}/{CONFIG_KEY}", "--no-progress"]
    for address in rollout_addresses(job, workers):
        command += ["--rollout", address]
    command += ["--drafter", f"{drafter_name(job)}:{GRPC_PORT}", "--trainer", f"{trainer_name(job)}:{GRPC_PORT}",
                "--planner", "external", "--metrics-port", str(METRICS_PORT), "--metrics-host", "0.0.0.0"]
    return command + (tls.client_args() if tls else [])


def controller_job(rljob: Mapping[str, Any], tls: GrpcTLS | None = None) -> dict[str, Any]:
    job = rljob["metadata"]["name"]
    container = _container(rljob["spec"], "controller", controller_command(job, _workers(rljob), tls), grpc=False)
    template = _pod_template(rljob, "controller", container, restart_policy="OnFailure", tls=tls)
    out = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _metadata(rljob, controller_name(job), "controller"),
        "spec": {"backoffLimit": 3, "suspend": _suspended(rljob), "template": template},
    }
    # The pod template of a Job is immutable: a changed one means delete + create (see handlers).
    out["metadata"]["annotations"] = {ANNOTATION_CONFIG_HASH: template_hash(template)}
    return out


def template_hash(template: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:16]


# Object-store defaults for RLJobs on s3:// that leave spec.storage.s3 fields unset (the chart's objectStore.s3).
ENV_S3_DEFAULTS = {"endpoint": "TLT_DEFAULT_S3_ENDPOINT", "region": "TLT_DEFAULT_S3_REGION",
                   "credentialsSecret": "TLT_DEFAULT_S3_CREDENTIALS_SECRET"}


def with_s3_defaults(rljob: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Mapping[str, Any]:
    """``rljob`` with the ``spec.storage.s3`` fields it leaves empty taken from the operator's environment
    (:data:`ENV_S3_DEFAULTS`), when its store is on S3; unchanged otherwise."""
    env = os.environ if env is None else env
    defaults = {field: env[var].strip() for field, var in ENV_S3_DEFAULTS.items() if env.get(var, "").strip()}
    spec = rljob.get("spec") or {}
    job = spec.get("job") if isinstance(spec.get("job"), Mapping) else {}
    store = job.get("store") if isinstance(job.get("store"), Mapping) else {}
    storage = spec.get("storage") if spec.get("storage") is not None else {}
    if not defaults or not is_s3(str(store.get("uri") or "")) or not isinstance(storage, Mapping):
        return rljob
    out = copy.deepcopy(dict(rljob))
    s3 = dict(storage.get("s3") or {})
    out["spec"]["storage"] = {**storage, "s3": {**s3, **{k: v for k, v in defaults.items() if not s3.get(k)}}}
    return out


def build_children(rljob: Mapping[str, Any], tls: GrpcTLS | Literal["env"] | None = "env",
                   env: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Every child of ``rljob`` (a full RLJob object: metadata.name/namespace/uid and spec), creation order.
    ``tls``: gRPC TLS for the pods; ``"env"`` (default): :meth:`GrpcTLS.from_env`, None: plaintext.
    ``env``: the operator's environment for S3 defaults (:func:`with_s3_defaults`; default ``os.environ``)."""
    if tls == "env":
        tls = GrpcTLS.from_env()
    rljob = with_s3_defaults(rljob, env)
    return [configmap(rljob), rollout_service(rljob), drafter_service(rljob), trainer_service(rljob),
            rollout_statefulset(rljob, tls), drafter_deployment(rljob, tls), trainer_deployment(rljob, tls),
            controller_job(rljob, tls)]
