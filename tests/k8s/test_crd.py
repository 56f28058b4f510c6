"""The RLJob CRD: generated from tlt.config (one source of truth), structurally sound, strictly valid, and
its bounds, patterns and CEL rules reject exactly what tlt.config.job_spec_from_dict rejects."""

from __future__ import annotations

import copy
import dataclasses
import re
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import jsonschema
import pytest

from tests.k8s.chart_helpers import CRD_FILE, KUBE_VERSION
from tlt.config import JobSpec, job_spec_from_dict
from tlt.errors import ConfigError
from tlt.trainer.grpo import GRPOConfig
from tlt_operator import crd as crdmod
from tlt_operator.crd import BOUNDS, PATTERNS, RULES, Bound, default_rljob, job_schema, rljob_errors


def rljob(job: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "tlt.dev/v1alpha1", "kind": "RLJob", "metadata": {"name": "demo"},
            "spec": {"image": "ghcr.io/tlt-dev/tlt:0.1.0", "job": job if job is not None else {}, **spec}}


def nested(path: str, value: Any) -> dict[str, Any]:
    """{"a": {"b": value}} for "a.b"; a ``[]`` leaf is a two-item list of ``value`` (betas has two)."""
    *parents, leaf = path.split(".")
    if leaf.endswith("[]"):
        leaf, value = leaf[:-2], [value, value]
    out: dict[str, Any] = {leaf: value}
    for key in reversed(parents):
        out = {key: out}
    return out


def schema_at(path: str) -> dict[str, Any]:
    node = job_schema()
    for part in path.split("."):
        items = part.endswith("[]")
        node = node["properties"][part.removesuffix("[]")]
        if items:
            node = node["items"]
    return node


def config_accepts(job: dict[str, Any]) -> bool:
    try:
        job_spec_from_dict(job)
    except ConfigError:
        return False
    return True


def crd_accepts(job: dict[str, Any]) -> bool:
    """What the API server does: default, then check the schema and the CEL rules."""
    obj = default_rljob(rljob(job))
    if rljob_errors(obj):
        return False
    return all(_cel(rule["rule"], _get(obj["spec"]["job"], path)) for path, rules in RULES.items() for rule in rules)


def _get(value: Any, path: str) -> Any:
    for key in filter(None, path.split(".")):
        value = value[key]
    return value


# --------------------------------------------------------------------------------------------------------
# One source of truth


def test_committed_crd_is_generated():
    """Regenerating gives no diff: run `python -m tlt_operator.crd --out deploy/helm/tlt/crds/rljob.yaml`."""
    assert CRD_FILE.read_text() == crdmod.render_crd_yaml(), "stale CRD: python -m tlt_operator.crd --out " + \
        str(CRD_FILE.relative_to(CRD_FILE.parents[4]))
    assert crdmod.main(["--out", str(CRD_FILE), "--check"]) == 0


def test_main_writes_and_checks(tmp_path, capsys):
    out = tmp_path / "crds" / "rljob.yaml"
    assert crdmod.main(["--out", str(out), "--check"]) == 1
    assert crdmod.main(["--out", str(out)]) == 0
    assert crdmod.main(["--out", str(out), "--check"]) == 0
    out.write_text(out.read_text().replace("minimum: 1", "minimum: 2", 1))
    assert crdmod.main(["--out", str(out), "--check"]) == 1
    assert "out of date" in capsys.readouterr().err


def _walk_dataclass(cls: type, schema: dict[str, Any], path: str = ""):
    yield cls, schema, path
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _walk_dataclass(hints[f.name], schema["properties"][f.name], f"{path}{f.name}.")


def test_job_schema_mirrors_the_dataclasses():
    schema = job_schema()
    for cls, node, path in _walk_dataclass(JobSpec, schema):
        assert node["type"] == "object"
        assert list(node["properties"]) == [f.name for f in dataclasses.fields(cls)], path
        doc = " ".join(cls.__doc__.split()).replace("``", "`")
        assert " ".join(node["description"].split()).endswith(doc), path
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            prop, tp = node["properties"][f.name], hints[f.name]
            if get_origin(tp) in (Union, UnionType):
                assert type(None) in get_args(tp)
                assert prop["nullable"] is True and "default" not in prop, path + f.name
            if get_origin(tp) is Literal:
                assert prop["enum"] == list(get_args(tp)), path + f.name
    assert schema["properties"]["rollout"]["properties"]["speculative"]["properties"]["strategies"]["items"] == {
        "type": "string", "pattern": crdmod.STRATEGY_PATTERN}
    betas = schema["properties"]["trainer"]["properties"]["grpo"]["properties"]["betas"]
    assert betas["type"] == "array" and betas["minItems"] == betas["maxItems"] == 2


def test_no_unknown_fields_anywhere_in_spec_job():
    def walk(node):
        assert "x-kubernetes-preserve-unknown-fields" not in node
        assert "type" in node
        for sub in node.get("properties", {}).values():
            walk(sub)
        if isinstance(node.get("items"), dict):
            walk(node["items"])
    walk(job_schema())


@pytest.mark.parametrize("job", [
    {},
    {"trainer": {}},
    {"trainer": {"grpo": {"lr": 1e-6}}},  # a partial grpo section keeps the other defaults
    {"rollout": {"workers": 5, "speculative": {"mode": "off"}}, "data": {"eval_temperature": 0.0}},
    {"drafter": {"batch_size": 32, "buffer_responses": 64}, "store": {"uri": "s3://b/p"}},
])
def test_api_server_defaulting_keeps_the_meaning(job):
    """The API server fills in the schema defaults; tlt.config must read the stored spec as the original."""
    stored = default_rljob(rljob(job))["spec"]["job"]
    assert job_spec_from_dict(stored) == job_spec_from_dict(job)
    assert not rljob_errors(rljob(stored))
    if not job:  # every field is stored, except the nullable ones whose default is null
        assert stored == _drop_none(JobSpec().to_dict())


@dataclasses.dataclass(frozen=True)
class _SectionWithOwnDefault:
    grpo: GRPOConfig = dataclasses.field(default_factory=lambda: GRPOConfig(lr=1e-3))


def test_a_section_default_other_than_its_class_defaults_is_refused():
    """The API server fills a partial section from the field defaults: a section default of its own would be
    lost once any of its fields is set (trainer.grpo's mini-batch size was, until its defaults moved)."""
    with pytest.raises(TypeError, match=r"trainer\.grpo: a section's default must be its class defaults"):
        crdmod.dataclass_schema(_SectionWithOwnDefault, "trainer", set())


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def test_schema_is_structural(rljob_crd):
    """The rules the API server applies to a v1 CRD schema that kubernetes-validate does not check."""
    def walk(node, path, in_any_of=False):
        assert not {"$ref", "oneOf", "allOf", "not", "definitions", "dependencies", "patternProperties",
                    "additionalItems"} & set(node), path
        if in_any_of:  # only value validations inside anyOf
            assert not {"type", "default", "description", "nullable", "properties"} & set(node), path
        elif not node.get("x-kubernetes-int-or-string"):
            assert node.get("type") in ("object", "array", "string", "integer", "number", "boolean"), path
        else:
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        assert not ("properties" in node and "additionalProperties" in node), path
        if node.get("type") == "array":
            assert isinstance(node["items"], dict), path
        if "x-kubernetes-list-map-keys" in node:
            assert set(node["x-kubernetes-list-map-keys"]) <= set(node["items"]["required"]), path
        for name, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}.{key}")
        for sub in node.get("anyOf", []):
            walk(sub, f"{path}.anyOf", in_any_of=not node.get("x-kubernetes-int-or-string"))
    schema = rljob_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    walk(schema, "")
    assert set(schema["properties"]["metadata"]["properties"]) == {"name"}  # all metadata may restrict


def test_every_default_is_valid_for_its_own_schema(rljob_crd):
    """Kubernetes refuses a CRD whose defaults do not validate (after pruning) against their schema."""
    def walk(node, path):
        if "default" in node:
            jsonschema.Draft4Validator(crdmod.to_json_schema(node)).validate(node["default"])
        for name, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}[]")
    walk(rljob_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "")


# --------------------------------------------------------------------------------------------------------
# Bounds: the table in crd.py against config.py's __post_init__ code


def _outside_and_inside(path: str, bound: Bound) -> list[tuple[Any, Any]]:
    """(just outside, at or just inside) pairs for each end of the bound."""
    integer = schema_at(path)["type"] == "integer"
    step = 1 if integer else 1e-3
    pairs = []
    if bound.minimum is not None:
        low = bound.minimum if integer else float(bound.minimum)
        pairs.append((low, low + step) if bound.exclusive_minimum else (low - step, low))
    if bound.maximum is not None:
        high = bound.maximum if integer else float(bound.maximum)
        pairs.append((high, high - step) if bound.exclusive_maximum else (high + step, high))
    return pairs


@pytest.mark.parametrize("path", sorted(BOUNDS))
def test_bound_is_enforced_by_crd_and_config_alike(path):
    for outside, inside in _outside_and_inside(path, BOUNDS[path]):
        bad, good = nested(path, outside), nested(path, inside)
        assert not config_accepts(bad), f"tlt.config accepts {bad}: update BOUNDS in tlt_operator/crd.py"
        assert not crd_accepts(bad), f"the CRD accepts {bad}"
        assert config_accepts(good), f"tlt.config rejects {good}: update BOUNDS in tlt_operator/crd.py"
        assert crd_accepts(good), rljob_errors(rljob(good))


def test_every_integer_field_without_a_bound_takes_any_value():
    """A bound missing from the table shows up here: config rejects a value the CRD would let through."""
    def leaves(node, path):
        for name, sub in node.get("properties", {}).items():
            if sub["type"] == "object":
                yield from leaves(sub, f"{path}{name}.")
            else:
                yield f"{path}{name}", sub
    for path, node in leaves(job_schema(), ""):
        if node["type"] in ("integer", "number") and path not in BOUNDS:
            for value in (-1, 0, 10**6):
                job = nested(path, value)
                assert config_accepts(job) == crd_accepts(job), (path, value)


@pytest.mark.parametrize(("path", "values", "accepted"), [
    ("rollout.speculative.strategy", ["3-2-6", "0_2_6", "3_0_6", "3_2_1", "3_2", "", "a_b_c"], False),
    ("rollout.speculative.strategy", ["3_2_6", "1_1_2", "8_4_32", "10_2_20"], True),
    ("rollout.speculative.strategies[]", ["4-2-8", "2_1_1"], False),
    ("rollout.speculative.strategies[]", ["2_1_3", "4_2_8"], True),
    ("name", ["", "   "], False),
    ("name", ["x", " demo "], True),
])
def test_patterns_match_config(path, values, accepted):
    assert path in PATTERNS
    for value in values:
        job = nested(path, value)
        assert config_accepts(job) is accepted, job
        assert crd_accepts(job) is accepted, job


# --------------------------------------------------------------------------------------------------------
# CEL rules (x-kubernetes-validations): a tiny evaluator for the subset the CRD uses


def _cel(rule: str, value: Any) -> bool:
    """Evaluate the CEL subset the CRD uses: has(), size(), matches(), field access, comparisons, ! && ||."""
    expr = re.sub(r"!has\(self((?:\.\w+)+)\)", lambda m: f"not _has(self, {m.group(1)[1:].split('.')!r})", rule)
    expr = re.sub(r"(self(?:\.\w+)+)\.matches\('([^']*)'\)", r"_matches(\1, r'\2')", expr)
    expr = re.sub(r"\bsize\(", "len(", expr)
    expr = re.sub(r"self((?:\.\w+)+)", lambda m: "self" + "".join(f"[{k!r}]" for k in m.group(1)[1:].split(".")),
                  expr)
    expr = expr.replace("||", " or ").replace("&&", " and ")

    def has(obj, keys):
        for key in keys:
            if not isinstance(obj, dict) or key not in obj:
                return False
            obj = obj[key]
        return True

    return bool(eval(expr, {"_has": has, "_matches": lambda s, p: re.search(p, s) is not None, "len": len},
                     {"self": value}))


def _cel_rules(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, str]]]:
    found = [(path, r) for r in schema.get("x-kubernetes-validations", [])]
    for name, sub in schema.get("properties", {}).items():
        found += _cel_rules(sub, f"{path}.{name}" if path else name)
    return found


def test_cel_rules_are_the_table_plus_the_name_rule(rljob_crd):
    rules = _cel_rules(rljob_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    assert {p for p, _ in rules} == {""} | {f"spec.job.{p}" for p in RULES}
    stored = default_rljob(rljob({}))
    for path, rule in rules:
        assert rule["message"] and _cel(rule["rule"], _get(stored, path)) is True, (path, rule)


@pytest.mark.parametrize(("batch_size", "buffer_responses"), [(8, 7), (8, 8), (64, 512), (1, 1), (16, 15)])
def test_drafter_rule_mirrors_config(batch_size, buffer_responses):
    drafter = {"batch_size": batch_size, "buffer_responses": buffer_responses}
    (rule,) = RULES["drafter"]
    assert _cel(rule["rule"], drafter) == config_accepts({"drafter": drafter})
    defaulted = default_rljob(rljob({"drafter": drafter}))["spec"]["job"]["drafter"]
    assert _cel(rule["rule"], defaulted) == config_accepts({"drafter": drafter})


@pytest.mark.parametrize(("name", "ok"), [
    ("demo", True), ("qwen-gsm8k", True), ("a" * 40, True),
    ("a" * 41, False), ("1job", False), ("Job", False), ("job-", False), ("job.x", False),
])
def test_name_rule(rljob_crd, name, ok):
    (rule,) = rljob_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
    assert _cel(rule["rule"], {"metadata": {"name": name}}) is ok
    obj = rljob()
    obj["metadata"]["name"] = name
    assert (not rljob_errors(obj)) is ok


# --------------------------------------------------------------------------------------------------------
# The CRD object


def test_crd_validates_strictly_with_kubernetes_validate(rljob_crd):
    import kubernetes_validate

    kubernetes_validate.validate(rljob_crd, KUBE_VERSION, strict=True)
    broken = copy.deepcopy(rljob_crd)
    broken["spec"]["versions"][0]["served"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSION, strict=True)


def test_crd_names_scope_and_subresources(rljob_crd):
    spec = rljob_crd["spec"]
    assert rljob_crd["metadata"]["name"] == "rljobs.tlt.dev"
    assert spec["group"] == "tlt.dev" and spec["scope"] == "Namespaced"
    assert spec["names"] | {"shortNames": spec["names"]["shortNames"]} == {
        "kind": "RLJob", "listKind": "RLJobList", "plural": "rljobs", "singular": "rljob",
        "shortNames": ["rlj"], "categories": ["tlt"]}
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def _resolve(schema: dict[str, Any], json_path: str) -> dict[str, Any]:
    node = schema
    for part in json_path.lstrip(".").split("."):
        node = node["properties"][part]
    return node


def test_printer_columns(rljob_crd):
    version = rljob_crd["spec"]["versions"][0]
    columns = version["additionalPrinterColumns"]
    default = [c["name"] for c in columns if not c.get("priority")]
    assert default == ["Phase", "Step", "Policy", "Drafter", "Accept", "Drafters", "Age"]
    schema = version["schema"]["openAPIV3Schema"]
    for column in columns:
        if column["jsonPath"] == ".metadata.creationTimestamp":
            assert column["type"] == "date"
            continue
        node = _resolve(schema, column["jsonPath"])
        assert node["type"] == column["type"], column


def test_spec_and_status_follow_the_contract(rljob_crd):
    schema = rljob_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec, status = schema["properties"]["spec"], schema["properties"]["status"]
    assert spec["required"] == ["image", "job"]
    assert set(spec["properties"]) == {"image", "imagePullPolicy", "suspend", "job", "pods", "storage", "planner"}
    assert spec["properties"]["imagePullPolicy"]["default"] == "IfNotPresent"
    assert spec["properties"]["suspend"]["default"] is False
    assert set(spec["properties"]["pods"]["properties"]) == {"rollout", "drafter", "trainer", "controller"}
    assert spec["properties"]["storage"]["properties"]["volume"]["properties"]["mountPath"]["default"] == \
        "/var/lib/tlt"
    assert spec["properties"]["planner"]["properties"]["intervalSeconds"]["default"] == 1
    props = status["properties"]
    assert props["phase"]["enum"] == ["Pending", "Running", "Suspended", "Complete", "Failed"]
    condition = props["conditions"]["items"]["properties"]
    assert condition["type"]["enum"] == ["Ready", "LongTail", "DrafterTraining", "Suspended", "Complete", "Failed"]
    assert condition["status"]["enum"] == ["True", "False", "Unknown"]
    for field, kind in [("observedGeneration", "integer"), ("step", "integer"), ("policyVersion", "integer"),
                        ("drafterVersion", "integer"), ("acceptanceLength", "number"), ("drafterPods", "integer"),
                        ("roles", "object")]:
        assert props[field]["type"] == kind, field
    assert props["roles"]["additionalProperties"]["enum"] == ["rollout", "drafter"]
    assert props["kopf"]["x-kubernetes-preserve-unknown-fields"] is True  # kopf's progress storage


def test_a_full_status_validates():
    obj = rljob()
    obj["status"] = {
        "phase": "Running", "observedGeneration": 3, "step": 12, "policyVersion": 12, "drafterVersion": 40,
        "acceptanceLength": 2.7, "drafterPods": 1, "roles": {"demo-rollout-0": "rollout", "demo-rollout-1": "drafter"},
        "conditions": [{"type": "LongTail", "status": "True", "reason": "QueueDrained", "message": "1 idle worker",
                        "lastTransitionTime": "2025-01-01T00:00:00Z"}],
        "kopf": {"progress": {"create": {"retries": 1}}},
    }
    assert rljob_errors(obj) == []


# --------------------------------------------------------------------------------------------------------
# Broken RLJobs


BROKEN: list[tuple[str, Any]] = [
    ("missing image", lambda o: o["spec"].pop("image")),
    ("empty image", lambda o: o["spec"].update(image="")),
    ("missing job", lambda o: o["spec"].pop("job")),
    ("unknown spec field", lambda o: o["spec"].update(replicas=3)),
    ("typo in job", lambda o: o["spec"]["job"].update(rollout={"wokers": 2})),
    ("string for integer", lambda o: o["spec"]["job"].update(rollout={"workers": "2"})),
    ("unquoted YAML off", lambda o: o["spec"]["job"].update(rollout={"speculative": {"mode": False}})),
    ("bad enum", lambda o: o["spec"]["job"].update(model={"dtype": "float16"})),
    ("strategy as number", lambda o: o["spec"]["job"].update(rollout={"speculative": {"strategy": 428}})),
    ("three betas", lambda o: o["spec"]["job"].update(trainer={"grpo": {"betas": [0.9, 0.99, 0.999]}})),
    ("bad pull policy", lambda o: o["spec"].update(imagePullPolicy="Sometimes")),
    ("suspend as string", lambda o: o["spec"].update(suspend="yes")),
    ("unknown role", lambda o: o["spec"].update(pods={"gpu": {}})),
    ("bad quantity", lambda o: o["spec"].update(pods={"rollout": {"resources": {"limits": {"cpu": "two"}}}})),
    ("env without name", lambda o: o["spec"].update(pods={"trainer": {"env": [{"value": "1"}]}})),
    ("bad toleration", lambda o: o["spec"].update(pods={"rollout": {"tolerations": [{"operator": "Maybe"}]}})),
    ("volume without claim", lambda o: o["spec"].update(storage={"volume": {"mountPath": "/data"}})),
    ("relative mount path", lambda o: o["spec"].update(storage={"volume": {"claimName": "c", "mountPath": "x"}})),
    ("unknown s3 field", lambda o: o["spec"].update(storage={"s3": {"bucket": "b"}})),
    ("zero planner interval", lambda o: o["spec"].update(planner={"intervalSeconds": 0})),
    ("bad phase", lambda o: o.update(status={"phase": "Sleeping"})),
    ("bad role", lambda o: o.update(status={"roles": {"demo-rollout-0": "trainer"}})),
    ("wrong kind", lambda o: o.update(kind="RLjob")),
]


@pytest.mark.parametrize(("what", "breaks"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_rljobs_are_rejected(what, breaks):
    obj = rljob({"steps": 2})
    assert rljob_errors(obj) == []
    breaks(obj)
    assert rljob_errors(obj), what


def test_errors_name_the_field():
    obj = rljob({"rollout": {"workers": 0}})
    assert rljob_errors(obj) == ["spec.job.rollout.workers: 0 is less than the minimum of 1"]
