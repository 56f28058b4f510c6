"""The RLJob CustomResourceDefinition, generated from the typed job spec so the two never drift.

``spec.job`` of an RLJob IS :class:`tlt.config.JobSpec` (the ``tlt run`` YAML). Its openAPIV3Schema is built
from the dataclasses: types from the annotations (``Literal`` -> enum, ``X | None`` -> nullable,
``tuple[str, ...]`` -> array, nested dataclasses -> objects), defaults from the dataclass defaults and
descriptions from the class docstrings. Range checks that config.py enforces in ``__post_init__`` code are
mirrored by the small tables :data:`BOUNDS`, :data:`PATTERNS` and :data:`RULES`; a test checks each bound
against :func:`tlt.config.job_spec_from_dict`.

Regenerate the chart's CRD with ``python -m tlt_operator.crd --out deploy/helm/tlt/crds/rljob.yaml``
(``--check`` exits 1 when the file is stale).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from tlt.config import JobSpec
from tlt.specparse import to_dict
from tlt_operator.generated import generator_main

GROUP = "tlt.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "RLJob"
PLURAL = "rljobs"
SINGULAR = "rljob"
SHORT_NAMES = ("rlj",)
CRD_NAME = f"{PLURAL}.{GROUP}"

PHASES = ("Pending", "Running", "Suspended", "Complete", "Failed")
CONDITION_TYPES = ("Ready", "LongTail", "DrafterTraining", "Suspended", "Complete", "Failed")
ROLES = ("rollout", "drafter", "trainer", "controller")
#: Children are named ``<job>-rollout-<i>``, ``<job>-controller``...; a StatefulSet's revision label
#: ``<job>-rollout-<hash>`` must fit 63 characters and a Service name must be a DNS-1035 label.
MAX_NAME_LENGTH = 40
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DEFAULT_MOUNT_PATH = "/var/lib/tlt"


@dataclasses.dataclass(frozen=True)
class Bound:
    """A numeric range that a dataclass enforces in code (``exclusive`` = the bound itself is invalid)."""

    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.minimum is not None:
            out["minimum"] = self.minimum
            if self.exclusive_minimum:
                out["exclusiveMinimum"] = True
        if self.maximum is not None:
            out["maximum"] = self.maximum
            if self.exclusive_maximum:
                out["exclusiveMaximum"] = True
        return out


# Field paths are relative to spec.job; ``[]`` addresses the items of a list.
BOUNDS: dict[str, Bound] = {
    "steps": Bound(minimum=1),
    "threads": Bound(minimum=0),
    "data.prompts_per_step": Bound(minimum=1),
    "data.group_size": Bound(minimum=2),
    "data.heldout": Bound(minimum=0),
    "data.eval_every": Bound(minimum=0),
    "data.eval_temperature": Bound(minimum=0),
    "rollout.workers": Bound(minimum=1),
    "rollout.max_running": Bound(minimum=1),
    "rollout.max_new_tokens": Bound(minimum=1),
    "rollout.temperature": Bound(minimum=0),
    "rollout.top_p": Bound(minimum=0, exclusive_minimum=True, maximum=1),
    "rollout.speculative.sd_batch_threshold": Bound(minimum=1),
    "drafter.lr": Bound(minimum=0, exclusive_minimum=True),
    "drafter.batch_size": Bound(minimum=1),
    "drafter.push_every": Bound(minimum=1),
    "drafter.min_responses": Bound(minimum=1),
    "drafter.ttt_steps": Bound(minimum=1, maximum=8),
    "drafter.outer_lr": Bound(minimum=0, exclusive_minimum=True, maximum=2),
    "trainer.workers": Bound(minimum=1),
    "trainer.grpo.lr": Bound(minimum=0, exclusive_minimum=True),
    "trainer.grpo.betas[]": Bound(minimum=0, maximum=1, exclusive_maximum=True),
    "trainer.grpo.weight_decay": Bound(minimum=0),
    "trainer.grpo.grad_clip": Bound(minimum=0, exclusive_minimum=True),
    "trainer.grpo.clip_ratio_low": Bound(minimum=0, exclusive_minimum=True, maximum=1, exclusive_maximum=True),
    "trainer.grpo.clip_ratio_high": Bound(minimum=0, exclusive_minimum=True),
    "trainer.grpo.kl_coef": Bound(minimum=0),
    "trainer.grpo.entropy_coef": Bound(minimum=0),
    "trainer.grpo.ppo_epochs": Bound(minimum=1),
    "trainer.grpo.mini_batch_size": Bound(minimum=0),
    "trainer.grpo.micro_batch_tokens": Bound(minimum=16),
    "trainer.grpo.seed": Bound(minimum=0),
    "store.keep": Bound(minimum=1),
}

#: ``depth_topk_verify`` with depth >= 1, topk >= 1, verify >= 2 (SpecStrategy.parse; the upper bound of
#: verify depends on depth and topk and is left to tlt.config).
STRATEGY_PATTERN = r"^[1-9][0-9]*_[1-9][0-9]*_([2-9]|[1-9][0-9]+)$"

#: Extra string constraints: path -> schema keywords.
PATTERNS: dict[str, dict[str, Any]] = {
    "name": {"minLength": 1, "pattern": r"\S"},  # not empty or blank
    "rollout.speculative.strategy": {"pattern": STRATEGY_PATTERN},
    "rollout.speculative.strategies[]": {"pattern": STRATEGY_PATTERN},
}

#: Cross-field checks as CEL rules on an object: path -> x-kubernetes-validations.
RULES: dict[str, list[dict[str, str]]] = {
    "drafter": [{
        "rule": "!has(self.buffer_responses) || !has(self.batch_size) || self.buffer_responses >= self.batch_size",
        "message": "buffer_responses must be >= batch_size",
    }],
}


# --------------------------------------------------------------------------------------------------------
# spec.job from the dataclasses


def _description(cls: type) -> str | None:
    doc = cls.__doc__
    if not doc or doc.startswith(f"{cls.__name__}("):  # dataclass's generated signature, not a docstring
        return None
    paragraphs = inspect.cleandoc(doc).replace("``", "`").split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def _json_type(values: Sequence[Any]) -> str:
    kinds = {type(v) for v in values}
    if kinds == {str}:
        return "string"
    if kinds == {bool}:
        return "boolean"
    if kinds <= {int}:
        return "integer"
    if kinds <= {int, float}:
        return "number"
    raise TypeError(f"a Literal must have values of one JSON type, got {values!r}")


def dataclass_schema(cls: type, path: str = "", used: set[str] | None = None) -> dict:
    """The structural schema of dataclass ``cls``, with the defaults of ``cls()``.

    Defaulting then means what :func:`tlt.specparse.from_dict` does: a section given in part gets the
    class defaults for its missing fields, a missing section ``{}`` and then the class defaults. A section
    whose default differs from its class defaults is refused (a partial section would lose it).
    """
    used = set() if used is None else used
    instance = cls()
    hints = get_type_hints(cls)
    properties = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        sub = f"{path}.{f.name}" if path else f.name
        properties[f.name] = _field_schema(hints[f.name], getattr(instance, f.name), sub, used)
    schema: dict[str, Any] = {"type": "object"}
    description = _description(cls)
    if description:
        schema["description"] = description
    schema["properties"] = properties
    return _constrain(schema, path, used)


def _field_schema(tp: Any, default: Any, path: str, used: set[str]) -> dict[str, Any]:
    schema = _type_schema(tp, path, used)
    if dataclasses.is_dataclass(tp):
        if default != tp():
            # The API server fills a partial section from the field schemas (the class defaults), so a
            # section default of its own would be lost as soon as one of its fields is set.
            raise TypeError(f"{path}: a section's default must be its class defaults; put them in {tp.__name__}")
        schema["default"] = {}  # the API server then fills in every nested default
    elif default is not None:
        schema["default"] = to_dict(default)
    return schema


def _type_schema(tp: Any, path: str, used: set[str]) -> dict[str, Any]:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return dataclass_schema(tp, path, used)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if len(options) != 1:
            raise TypeError(f"{path}: only `X | None` unions map to a structural schema, got {tp}")
        schema = _type_schema(options[0], path, used)
        schema["nullable"] = True
        return schema
    if origin is Literal:
        values = get_args(tp)
        return _constrain({"type": _json_type(values), "enum": list(values)}, path, used)
    if origin in (list, tuple):
        args = get_args(tp)
        schema: dict[str, Any] = {"type": "array"}
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(set(args)) != 1:
                raise TypeError(f"{path}: a fixed-length tuple must have one item type, got {tp}")
            schema["minItems"] = schema["maxItems"] = len(args)
        item = args[0] if args else None
        if item is None:
            raise TypeError(f"{path}: list fields need an item type")
        schema["items"] = _type_schema(item, f"{path}[]", used)
        return _constrain(schema, path, used)
    if origin is dict:
        key, value = get_args(tp)
        if key is not str:
            raise TypeError(f"{path}: mapping keys must be str, got {key}")
        return _constrain({"type": "object", "additionalProperties": _type_schema(value, f"{path}.*", used)},
                          path, used)
    scalar = {bool: "boolean", int: "integer", float: "number", str: "string"}.get(tp)
    if scalar is None or tp is typing.Any:
        raise TypeError(f"{path}: no structural schema for {tp}")
    return _constrain({"type": scalar}, path, used)


def _constrain(schema: dict[str, Any], path: str, used: set[str]) -> dict[str, Any]:
    if path in BOUNDS:
        if schema.get("type") not in ("integer", "number"):
            raise TypeError(f"BOUNDS[{path!r}] is on a {schema.get('type')} field")
        schema.update(BOUNDS[path].schema())
        used.add(path)
    if path in PATTERNS:
        schema.update(PATTERNS[path])
        used.add(path)
    if path in RULES:
        schema["x-kubernetes-validations"] = copy.deepcopy(RULES[path])
        used.add(path)
    return schema


def job_schema() -> dict[str, Any]:
    """The openAPIV3Schema of ``spec.job`` (tlt.config.JobSpec)."""
    used: set[str] = set()
    schema = dataclass_schema(JobSpec, "", used)
    stale = (set(BOUNDS) | set(PATTERNS) | set(RULES)) - used
    if stale:
        raise KeyError(f"constraint table entries name no field of JobSpec: {sorted(stale)}")
    schema["description"] = ("The `tlt run` job spec (tlt.config.JobSpec, snake_case keys), validated again by "
                             "tlt.config.job_spec_from_dict.\n\n" + schema.get("description", ""))
    return schema


# --------------------------------------------------------------------------------------------------------
# The rest of the CRD (handwritten Kubernetes parts)

_QUANTITY = {
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|"
               r"(\.[0-9]+))))?$",
    "x-kubernetes-int-or-string": True,
}


def _string(description: str | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "string"}
    if description:
        out["description"] = description
    out.update(extra)
    return out


def _pod_settings_schema(role: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": f"Kubernetes settings for the {role} pods.",
        "properties": {
            "resources": {
                "type": "object",
                "description": "core/v1 ResourceRequirements (requests, limits) of the container.",
                "properties": {
                    "limits": {"type": "object", "additionalProperties": copy.deepcopy(_QUANTITY)},
                    "requests": {"type": "object", "additionalProperties": copy.deepcopy(_QUANTITY)},
                    "claims": {
                        "type": "array",
                        "items": {"type": "object", "required": ["name"],
                                  "properties": {"name": _string(), "request": _string()}},
                        "x-kubernetes-list-type": "map",
                        "x-kubernetes-list-map-keys": ["name"],
                    },
                },
            },
            "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
            "tolerations": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "key": _string(),
                        "operator": _string(enum=["Exists", "Equal"]),
                        "value": _string(),
                        "effect": _string(enum=["NoSchedule", "PreferNoSchedule", "NoExecute"]),
                        "tolerationSeconds": {"type": "integer", "format": "int64"},
                    },
                },
            },
            "env": {
                "type": "array",
                "description": "Extra core/v1 EnvVars for the container.",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": _string(minLength=1),
                        "value": _string(),
                        "valueFrom": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    },
                },
            },
        },
    }


def spec_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "An RL training job: the TLT job spec plus how to run it on Kubernetes.",
        "required": ["image", "job"],
        "properties": {
            "image": _string("The TLT image all components run from, e.g. ghcr.io/tlt-dev/tlt:0.1.0.",
                             minLength=1),
            "imagePullPolicy": _string(enum=["Always", "IfNotPresent", "Never"], default="IfNotPresent"),
            "suspend": {"type": "boolean", "default": False,
                        "description": "true scales the workloads to zero and pauses the controller Job; "
                                       "false resumes."},
            "job": job_schema(),
            "pods": {
                "type": "object",
                "description": "Per-role Kubernetes settings (all optional).",
                "properties": {role: _pod_settings_schema(role) for role in ROLES},
            },
            "storage": {
                "type": "object",
                "description": "Where the artifact store lives: S3 settings for s3:// stores and/or a shared "
                               "ReadWriteMany volume for file:// stores.",
                "properties": {
                    "s3": {
                        "type": "object",
                        "properties": {
                            "endpoint": _string("S3 endpoint URL (AWS_ENDPOINT_URL on every pod); empty for AWS."),
                            "region": _string("AWS_DEFAULT_REGION on every pod."),
                            "credentialsSecret": _string(
                                "Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (envFrom)."),
                        },
                    },
                    "volume": {
                        "type": "object",
                        "description": "A PVC shared by all pods; job.store.uri defaults to <mountPath>/store.",
                        "required": ["claimName"],
                        "properties": {
                            "claimName": _string(minLength=1),
                            "mountPath": _string(default=DEFAULT_MOUNT_PATH, pattern="^/"),
                        },
                    },
                },
            },
            "planner": {
                "type": "object",
                "default": {},
                "description": "The long-tail role planner the operator runs.",
                "properties": {
                    "intervalSeconds": {"type": "number", "default": 1, "minimum": 0, "exclusiveMinimum": True,
                                        "description": "How often the operator reads progress and plans roles."},
                },
            },
        },
    }


def status_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "Written by the operator.",
        "properties": {
            "phase": _string(enum=list(PHASES)),
            "conditions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["type", "status"],
                    "properties": {
                        "type": _string(enum=list(CONDITION_TYPES)),
                        "status": _string(enum=["True", "False", "Unknown"]),
                        "reason": _string(),
                        "message": _string(),
                        "lastTransitionTime": _string(format="date-time"),
                    },
                },
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "observedGeneration": {"type": "integer", "format": "int64"},
            "step": {"type": "integer", "description": "RL steps completed."},
            "policyVersion": {"type": "integer", "description": "Newest policy version in the store."},
            "drafterVersion": {"type": "integer", "description": "Newest drafter version in the store."},
            "acceptanceLength": {"type": "number", "description": "Mean accepted tokens per verify step."},
            "drafterPods": {"type": "integer", "description": "Rollout pods now in the drafter role."},
            "roles": {"type": "object", "description": "Role of each rollout pod (pod name -> role).",
                      "additionalProperties": _string(enum=["rollout", "drafter"])},
            "kopf": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                     "description": "kopf's handler progress (internal)."},
        },
    }


PRINTER_COLUMNS: tuple[dict[str, Any], ...] = (
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.step"},
    {"name": "Policy", "type": "integer", "jsonPath": ".status.policyVersion"},
    {"name": "Drafter", "type": "integer", "jsonPath": ".status.drafterVersion"},
    {"name": "Accept", "type": "number", "jsonPath": ".status.acceptanceLength"},
    {"name": "Drafters", "type": "integer", "jsonPath": ".status.drafterPods"},
    {"name": "Workers", "type": "integer", "jsonPath": ".spec.job.rollout.workers", "priority": 1},
    {"name": "Model", "type": "string", "jsonPath": ".spec.job.model.path", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
)


def openapi_schema() -> dict[str, Any]:
    """The whole RLJob openAPIV3Schema."""
    return {
        "type": "object",
        "description": "RLJob runs one TLT RL training job (rollout workers, drafter, trainer, controller).",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {
                "type": "object",
                "properties": {"name": _string(maxLength=MAX_NAME_LENGTH, pattern=NAME_PATTERN)},
            },
            "spec": spec_schema(),
            "status": status_schema(),
        },
        "x-kubernetes-validations": [{
            "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH} && "
                    f"self.metadata.name.matches('{NAME_PATTERN}')",
            "message": f"metadata.name must be a DNS-1035 label of at most {MAX_NAME_LENGTH} characters "
                       "(it prefixes the names of the job's Services, StatefulSet and Job)",
        }],
    }


def rljob_crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/name": "tlt",
                                                  "app.kubernetes.io/component": "crd"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": SINGULAR,
                      "shortNames": list(SHORT_NAMES), "categories": ["tlt"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [dict(c) for c in PRINTER_COLUMNS],
                "schema": {"openAPIV3Schema": openapi_schema()},
            }],
        },
    }


HEADER = ("# Generated from tlt.config (the job spec dataclasses) by\n"
          "#   python -m tlt_operator.crd --out deploy/helm/tlt/crds/rljob.yaml\n"
          "# Do not edit by hand: change tlt/config.py or tlt_operator/crd.py and regenerate.\n")


def render_crd_yaml() -> str:
    return HEADER + yaml.safe_dump(rljob_crd(), sort_keys=False, width=110, allow_unicode=True)


# --------------------------------------------------------------------------------------------------------
# Validating RLJobs offline (tests, tools): the structural schema as a JSON Schema


def to_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Translate a structural (OpenAPI v3.0) schema into a Draft 4 JSON Schema that rejects what the API
    server rejects with strict field validation: ``nullable`` becomes a ``null`` type and objects with
    ``properties`` refuse unknown fields (unless ``x-kubernetes-preserve-unknown-fields``). CEL rules
    (``x-kubernetes-validations``) are not evaluated."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        else:
            out[key] = copy.deepcopy(value)
    if schema.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def rljob_json_schema() -> dict[str, Any]:
    """A Draft 4 JSON Schema for whole RLJob objects (``metadata`` beyond ``name`` is not checked)."""
    schema = to_json_schema(openapi_schema())
    schema["properties"]["metadata"]["additionalProperties"] = True
    schema["properties"]["apiVersion"]["enum"] = [API_VERSION]
    schema["properties"]["kind"]["enum"] = [KIND]
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return schema


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it on create: a missing property with a ``default``
    gets a copy of it, then defaulting goes on inside it (so ``default: {}`` fills in nested defaults)."""
    if isinstance(value, dict):
        properties = schema.get("properties")
        if properties:
            out = dict(value)
            for name, sub in properties.items():
                if name not in out and "default" in sub:
                    out[name] = copy.deepcopy(sub["default"])
                if name in out:
                    out[name] = apply_defaults(sub, out[name])
            return out
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            return {k: apply_defaults(extra, v) for k, v in value.items()}
        return value
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], v) for v in value]
    return value


def default_rljob(obj: dict[str, Any]) -> dict[str, Any]:
    """An RLJob as the API server stores it: every schema default filled in (``spec.job`` complete)."""
    return apply_defaults(openapi_schema(), obj)


def rljob_errors(obj: Any) -> list[str]:
    """Every schema violation of an RLJob object as ``path: message`` (empty when valid); needs jsonschema."""
    import jsonschema

    validator = jsonschema.Draft4Validator(rljob_json_schema())
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


# --------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    return generator_main("python -m tlt_operator.crd", "Write the RLJob CRD generated from tlt.config.",
                          render_crd_yaml, argv)


if __name__ == "__main__":
    raise SystemExit(main())
