"""Bad-input fuzzing of the job spec parsers (hypothesis): the dict parser, YAML files, the operator's RLJob
``validate_spec`` and the CLI's ``--set`` overrides. Whatever comes in, the answer is a valid spec or the
user-facing error type (ConfigError) whose message names the offending field path — never a bug exception.
A spec that is accepted must also hold the bounds the CRD advertises and round-trip through ``to_dict``."""

from __future__ import annotations

import dataclasses
import math
import os
import string
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tlt.cli_run import load_spec, parse_overrides
from tlt.config import JobSpec, job_spec_from_dict, load_job_spec
from tlt.errors import ConfigError
from tlt.rollout.sampling import SamplingParams
from tlt_operator import crd, resources

# $TLT_FUZZ_SCALE multiplies the examples for a longer hunt.
FUZZ = settings(max_examples=150 * int(os.environ.get("TLT_FUZZ_SCALE", "1")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


# ---- the spec's field paths ---------------------------------------------------------------------------


def _field_paths(cls: type, prefix: str = "") -> tuple[set[str], set[str]]:
    """(every field path, the paths of the sections) of dataclass ``cls``."""
    fields, sections = set(), {prefix} if prefix else set()
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        fields.add(path)
        if dataclasses.is_dataclass(hints[f.name]):
            sub_fields, sub_sections = _field_paths(hints[f.name], path)
            fields |= sub_fields
            sections |= sub_sections
    return fields, sections


FIELDS, SECTIONS = _field_paths(JobSpec)


def _text(key: Any) -> str:
    try:
        return str(key)
    except ValueError:  # an int over 4300 digits
        return f"<{type(key).__name__} too large to show>"


def _keys(data: Any) -> set[str]:
    """str() of every mapping key anywhere in ``data`` (unknown-field errors name one of them)."""
    out: set[str] = set()
    stack, seen = [data], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            out |= {_text(k) for k in node}
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return out


def names_a_field(message: str, data: Any, prefix: str = "") -> bool:
    """Does ``message`` (after ``prefix``) start with a field path of the spec (or ``config``, the whole)?"""
    if not message.startswith(prefix):
        return False
    message = message[len(prefix):]
    if message.startswith("config must be a mapping"):
        return True
    for path in FIELDS:
        if message.startswith(path) and message[len(path):len(path) + 1] in (" ", ":", "[", "."):
            return True
    if ": unknown field" in message:
        where = message.split(": unknown field")[0]
        keys = _keys(data)
        return any(where == f"{section}.{key}" if section else where == key for section in {"", *SECTIONS}
                   for key in keys)
    return False


def check_accepted(spec: JobSpec) -> None:
    """An accepted spec holds the CRD's bounds, round-trips, and its sampling settings can be used."""
    assert isinstance(spec, JobSpec)
    for path, bound in crd.BOUNDS.items():
        node: Any = spec
        for name in path.removesuffix("[]").split("."):
            node = getattr(node, name)
        for value in (node if path.endswith("[]") else [node]):
            if value is None:  # an optional field left unset (e.g. eval_temperature)
                continue
            assert not math.isnan(value), path
            if bound.minimum is not None:
                assert value > bound.minimum if bound.exclusive_minimum else value >= bound.minimum, (path, value)
            if bound.maximum is not None:
                assert value < bound.maximum if bound.exclusive_maximum else value <= bound.maximum, (path, value)
    assert job_spec_from_dict(spec.to_dict()) == spec
    r = spec.rollout
    # what the controller builds for every rollout / held-out request (a negative eval_temperature is still
    # accepted: see test_negative_eval_temperature_is_refused)
    for temperature in (r.temperature, spec.data.eval_temperature):
        if temperature is not None and temperature >= 0:
            SamplingParams(temperature=temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens)


def parse(data: Any) -> JobSpec | None:
    """``job_spec_from_dict(data)``: the spec, or None after checking the error (any other exception fails)."""
    try:
        spec = job_spec_from_dict(data)
    except ConfigError as exc:
        assert str(exc).strip(), "empty error message"
        assert names_a_field(str(exc), data), f"the error names no field path: {str(exc)[:300]}"
        return None
    check_accepted(spec)
    return spec


# ---- strategies -----------------------------------------------------------------------------------------

# Built lazily: hypothesis describes its strategies with repr(), which refuses ints over 4300 digits.
HUGE_INTS = st.sampled_from([(1, 2, 63), (-1, 2, 63), (1, 2, 64), (1, 10, 30), (1, 10, 400), (-1, 10, 400),
                             (1, 10, 5000), (-1, 10, 5000)]).map(lambda t: t[0] * t[1] ** t[2])
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
NUMERIC_TEXT = st.sampled_from(["1e-4", "1E3", "-0", "nan", "NaN", "inf", "-inf", "1_000", "0x10", "1e999",
                                "1e-999", ".5", "5.", "infinity", " 3 ", "", "4_2_8", "²", "٣"])


def junk(scalars: st.SearchStrategy) -> st.SearchStrategy:
    """Arbitrary nested lists / tuples / mappings of ``scalars``."""
    return st.recursive(scalars, lambda children: st.one_of(
        st.lists(children, max_size=3), st.tuples(children, children),
        st.dictionaries(st.one_of(TEXT, st.integers(), st.none(), st.booleans()), children, max_size=3)),
        max_leaves=8)


JUNK = junk(st.one_of(st.none(), st.booleans(), st.integers(), HUGE_INTS, FLOATS, TEXT, NUMERIC_TEXT))
# What the Kubernetes API can hand the operator (JSON: int64 integers, finite numbers).
K8S_JUNK = junk(st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                          st.floats(allow_nan=False, allow_infinity=False), TEXT))


def _strategy_name() -> st.SearchStrategy[str]:
    part = st.one_of(st.integers(-2, 40), st.sampled_from([2**63, 10**30, 10**40]))
    return st.one_of(st.builds(lambda a, b, c: f"{a}_{b}_{c}", part, part, part),
                     st.sampled_from(["3_2_6", "4_2_8", "2_1_3", "1_1_2", "0_1_2", "3_2", "3-2-6", "3_2_6_1"]),
                     TEXT)


def value_for(tp: Any, path: str) -> st.SearchStrategy:
    """Values for a field of type ``tp``: the right type (in and out of range), the wrong type, or junk."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        right = section(tp, path)
    elif origin in (typing.Union, types.UnionType):
        right = st.one_of(*[value_for(a, path) for a in get_args(tp) if a is not type(None)], st.none())
    elif origin is Literal:
        right = st.one_of(st.sampled_from(get_args(tp)), st.sampled_from(["on", "OFF", "Adaptive", ""]),
                          st.booleans())
    elif origin in (list, tuple):
        item = get_args(tp)[0]
        right = st.lists(value_for(item, f"{path}[]"), max_size=4)
    elif tp is bool:
        right = st.one_of(st.booleans(), st.sampled_from(["yes", "true", 1, 0]))
    elif tp is int:
        right = st.one_of(st.integers(-3, 10), st.integers(), HUGE_INTS, st.sampled_from([1.0, 2.5, "3", True]))
    elif tp is float:
        right = st.one_of(st.floats(-2, 3), FLOATS, st.integers(-3, 10), HUGE_INTS, NUMERIC_TEXT)
    elif tp is str:
        right = _strategy_name() if path.startswith("rollout.speculative.strateg") else st.one_of(
            TEXT, st.sampled_from(["", " ", "demo", "random", "\t\n"]), st.integers(), st.just(428))
    else:
        right = JUNK
    return st.one_of(right, right, right, JUNK) if not dataclasses.is_dataclass(tp) else st.one_of(right, JUNK)


def section(cls: type, path: str = "") -> st.SearchStrategy[dict]:
    """A mapping for dataclass ``cls``: any subset of its fields (values from :func:`value_for`), sometimes
    with unknown or misspelt keys."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    known = st.fixed_dictionaries({}, optional={
        name: st.deferred(lambda name=name: value_for(hints[name], f"{path}.{name}" if path else name))
        for name in names})
    typo = st.sampled_from(names).map(lambda n: n[:-1] + ("x" if n[-1] != "x" else "y"))
    unknown = st.dictionaries(st.one_of(typo, TEXT, st.integers(), st.none(), st.booleans()), JUNK, max_size=2)
    return st.one_of(known, known, known, st.builds(lambda a, b: {**a, **b}, known, unknown))


SPEC_DICTS = section(JobSpec)
DATA = st.one_of(SPEC_DICTS, SPEC_DICTS, SPEC_DICTS, JUNK)


# ---- job_spec_from_dict -------------------------------------------------------------------------------


@FUZZ
@given(DATA)
def test_job_spec_from_dict_gives_a_spec_or_a_config_error_naming_the_field(data):
    parse(data)


@pytest.mark.parametrize("data", [
    {"rollout": {"temperature": 10**400}},  # an int too large for a float
    {"steps": -(10**5000)}, {"drafter": {"ttt_steps": 10**5000}}, {"store": {"keep": -(10**5000)}},  # unprintable
    {"name": 10**5000}, {"rollout": {"speculative": {"mode": [10**5000]}}}, {"threads": 2**64},
    {"data": {"eval_temperature": float("nan")}}, {"data": {"eval_temperature": "-inf"}},
    {"rollout": {"temperature": float("inf")}}, {"data": {"eval_temperature": "inf"}},
    {"rollout": {"speculative": {"strategies": ["1" * 5000 + "_1_2"]}}}, {"": 1}, {None: {}}, {3: None},
])
def test_known_nasty_values(data):
    assert parse(data) is None


def test_negative_eval_temperature_is_refused():
    assert parse({"data": {"eval_temperature": -1.0}}) is None


def test_deeply_nested_values_are_refused_by_field():
    deep: Any = "x"
    for _ in range(5000):
        deep = [deep]
    assert parse({"name": deep}) is None
    looped: list = []
    looped.append(looped)  # YAML anchors can build this: a: &x [*x]
    assert parse({"rollout": {"speculative": {"strategies": looped}}}) is None


# ---- load_job_spec on YAML text ----------------------------------------------------------------------

YAML_TOKENS = st.sampled_from([":", ": ", "-", "- ", "[", "]", "{", "}", ",", "&a", "*a", "!!python/object", "!!int",
                               "!!binary", "|", ">", "'", '"', "#", "%YAML 1.1", "---", "...", "?", "@", "`", "\n",
                               "\n  ", "\t", "~", "null", "off", "yes", "1e-4", ".inf", "0x1F", "0o17", "1_0",
                               "4_2_8", "steps", "rollout", "workers", "speculative", "mode", "temperature", "grpo",
                               "betas", "<<", "= ", "\\", "\x00", "\x85", "\ufeff", "!!float", "!!bool",
                               "!!timestamp", "!!set", "!!omap", "!!str", "!!null"])


def _to_yaml(data: Any) -> str:
    try:
        return yaml.safe_dump(data, sort_keys=False)
    except (yaml.YAMLError, ValueError, RecursionError):
        return "steps: 1\n"


YAML_TEXT = st.one_of(
    SPEC_DICTS.map(_to_yaml),
    st.lists(st.one_of(YAML_TOKENS, TEXT), max_size=30).map("".join),
    st.builds(lambda doc, at, junk: doc[:at] + junk + doc[at:], SPEC_DICTS.map(_to_yaml), st.integers(0, 200),
              st.lists(YAML_TOKENS, max_size=4).map("".join)),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=80),
    st.sampled_from(["", "   ", "null", "[]", "[1, 2]", "42", "'just a string'", "steps: " + "9" * 5000,
                     "rollout: {temperature: " + "9" * 400 + "}", "[" * 3000 + "]" * 3000, "a: &x [*x]",
                     "name: &x [*x]", "rollout: &r {speculative: *r}", "{" * 2000, "? [a, b]\n: 1\n",
                     "steps: !!float 3", "steps: !!python/name:os.system", "<<: {steps: 3}", "--- 1\n--- 2\n",
                     "steps: !!int +_", "steps: !!int 0x", "name: !!bool maybe", "name: !!timestamp xyz",
                     "name: !!timestamp 2020-13-45", "rollout: {temperature: !!float abc}", "!!set {a, b}"]),
)


@FUZZ
@given(YAML_TEXT)
def test_load_job_spec_on_arbitrary_yaml(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "job.yaml"
    try:
        path.write_text(text, encoding="utf-8")
    except UnicodeEncodeError:
        assume(False)
    try:
        spec = load_job_spec(path)
    except ConfigError as exc:
        message = str(exc)
        assert message.strip()
        try:
            data = yaml.safe_load(text)
        except Exception:
            data = None
        assert (message.startswith(f"{path} is not valid YAML") or message.startswith("the config must be a mapping")
                or names_a_field(message, data)), message[:300]
        return
    check_accepted(spec)


def test_load_job_spec_on_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"steps: \xff\xfe\x00\x81\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_job_spec(path)


# ---- the operator's validate_spec (RLJob .spec) ------------------------------------------------------

MAPPING_OR_JUNK = st.one_of(st.none(), st.dictionaries(TEXT, K8S_JUNK, max_size=2), K8S_JUNK)
RLJOB_SPECS = st.one_of(
    st.fixed_dictionaries({}, optional={
        "image": st.one_of(st.just("ghcr.io/tlt-dev/tlt:0.1.0"), TEXT, K8S_JUNK),
        "imagePullPolicy": st.one_of(st.sampled_from(resources.PULL_POLICIES), TEXT, K8S_JUNK),
        "suspend": st.one_of(st.booleans(), K8S_JUNK),
        "job": st.one_of(SPEC_DICTS, SPEC_DICTS, JUNK),
        "pods": st.one_of(st.dictionaries(st.one_of(st.sampled_from(resources.ROLES), TEXT), MAPPING_OR_JUNK,
                                          max_size=3), K8S_JUNK),
        # only mappings (or nothing) here: any other value makes validate_spec raise AttributeError, see
        # test_validate_spec_refuses_non_mapping_sections below
        "storage": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
            "volume": st.one_of(st.none(), st.fixed_dictionaries({}, optional={"claimName": K8S_JUNK,
                                                                              "mountPath": K8S_JUNK}), K8S_JUNK),
            "s3": MAPPING_OR_JUNK})),
        "planner": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
            "intervalSeconds": st.one_of(st.floats(-1, 5), FLOATS, st.integers(), K8S_JUNK)})),
    }),
    K8S_JUNK,
)


@FUZZ
@given(RLJOB_SPECS)
def test_validate_spec_gives_a_job_or_a_config_error_naming_the_field(spec):
    try:
        job = resources.validate_spec(spec)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("spec"), message[:300]
        if message.startswith("spec.job."):
            assert names_a_field(message, spec.get("job"), prefix="spec.job."), message[:300]
        return
    check_accepted(job)


@pytest.mark.parametrize("key", ["storage", "planner"])
def test_validate_spec_refuses_non_mapping_sections(key):
    spec = {"image": "ghcr.io/tlt-dev/tlt:0.1.0", "job": {}, key: ["not", "a", "mapping"]}
    with pytest.raises(ConfigError, match=rf"^spec\.{key}"):
        resources.validate_spec(spec)


# ---- the CLI's --set KEY=VALUE --------------------------------------------------------------------------

DOTTED_KEYS = st.one_of(st.sampled_from(sorted(FIELDS)), st.sampled_from(sorted(FIELDS)).map(lambda p: p + ".x"),
                        st.text(alphabet=string.ascii_lowercase + "._= ", max_size=20), TEXT)
SET_VALUES = st.one_of(st.sampled_from(["3", "0", "-1", "1e-4", "nan", ".inf", "off", "'4_2_8'", "4_2_8", "[1, 2]",
                                        "{a: 1}", "", "~", "true", "[", "{", ": x", "a: b", "&a [*a]", "!!binary x",
                                        "\"unterminated", "'", "- - -"]),
                       TEXT, JUNK.map(_to_yaml))
SET_ITEMS = st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", DOTTED_KEYS, SET_VALUES), TEXT,
                               st.sampled_from(["=", "=3", "steps", " =1", "a==b"])), max_size=4)


@FUZZ
@given(SET_ITEMS)
def test_set_overrides_give_a_spec_or_a_config_error(items):
    try:
        overrides = parse_overrides(items)
    except ConfigError as exc:
        assert str(exc).startswith("--set "), str(exc)[:300]
        return
    assert isinstance(overrides, dict)
    try:
        spec = load_spec(None, overrides)
    except ConfigError as exc:
        assert str(exc).strip()
        # an override key names the field itself; its dotted pieces become the nested mapping's keys
        pieces = {p for key in overrides for p in key.split(".")}
        assert names_a_field(str(exc), {p: None for p in pieces}) or any(
            str(exc).startswith(f"{key}:") or str(exc).startswith(f"{key} ") for key in overrides), str(exc)[:300]
        return
    check_accepted(spec)


@pytest.mark.parametrize("value", ["9" * 5000, "[" * 3000, "!!bool maybe", "!!int +_", "!!timestamp xyz"])
def test_set_override_with_an_unparseable_value(value):
    with pytest.raises(ConfigError, match=r"^--set "):
        parse_overrides([f"steps={value}"])
