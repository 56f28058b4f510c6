"""The Grafana dashboards in dashboards/: valid dashboard JSON, one per file, every query on the `datasource`
variable, and every metric a query names exported by TLT (cross-checked against :mod:`tlt.metrics`).

tests/integration/test_dashboards_live.py runs every query against a real Prometheus that scraped a short job.
The helpers here (loading, query extraction, template-variable substitution) are shared with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tlt import metrics as m

DASHBOARD_DIR = Path(__file__).resolve().parents[2] / "dashboards"
DASHBOARD_FILES = sorted(DASHBOARD_DIR.glob("*.json"))
EXPECTED_FILES = {"long-tail-utilization.json", "speculative-decoding.json", "training.json"}
PANEL_TYPES = {"timeseries", "stat", "state-timeline"}
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's built-in variables and what the live test puts in their place.
BUILTIN_VARIABLES = {"__rate_interval": "30s", "__interval": "15s", "__range": "5m"}
# Non-TLT series a query may use.
OTHER_METRICS = {"up"}
# Metrics of tlt.metrics that no dashboard shows, and why.
NOT_ON_A_DASHBOARD: dict[str, str] = {}

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                   "offset", "inf", "nan", "atan2"}
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<expr>.+),\s*)?(?P<label>[a-zA-Z_]\w*)\s*\)\s*$")
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
_MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


# ---- helpers (also used by the live test) ----------------------------------------------------------------------

def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL) of every target of every panel."""
    return [(p["title"], t.get("refId", "?"), t["expr"]) for p in panels(dashboard) for t in p.get("targets", [])]


def variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(variable name, series selector, label) of every ``label_values(selector, label)`` query variable."""
    out = []
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = _LABEL_VALUES.match(query)
        assert match and match["expr"], f"variable {var['name']}: expected label_values(<metric>, <label>): {query}"
        out.append((var["name"], match["expr"], match["label"]))
    return out


def substitute(expr: str) -> str:
    """``expr`` with Grafana's variables replaced as for "All": ``$job``/``$worker`` -> ``.*`` (they only appear in
    ``=~`` matchers), ``$__rate_interval`` -> ``30s``, ``$__interval`` -> ``15s``, ``$__range`` -> ``5m``."""
    return _VARIABLE.sub(lambda v: BUILTIN_VARIABLES.get(v[1] or v[2], ".*"), expr)


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (functions, keywords, labels and numbers left out)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range / subquery durations
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = _VARIABLE.sub(" ", s)
    names = set()
    for ident in re.finditer(r"(?<![\w.$])[a-zA-Z_:][\w:]*", s):
        if s[ident.end():].lstrip().startswith("(") or ident[0].lower() in PROMQL_KEYWORDS:
            continue  # a function or aggregation, or a keyword
        if re.fullmatch(r"\d*e\d+", ident[0]):
            continue
        names.add(ident[0])
    return names


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric name, [(label, op, value), ...]) of every ``name{...}`` selector in ``expr``."""
    return [(sel[1], _MATCHER.findall(sel[2] or ""))
            for sel in re.finditer(r"(?<![\w.$])([a-zA-Z_:][\w:]*)\s*(?:\{([^}]*)\})?", expr)
            if sel[2] is not None]


def _series_defs() -> dict[str, m.MetricDef]:
    """Series name (with Prometheus' suffixes) -> its MetricDef."""
    out = {}
    for metric in m.ALL_METRICS:
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                    "gauge": ("",)}[metric.kind]
        for suffix in suffixes:
            out[metric.name + suffix] = metric
    return out


# ---- tests ---------------------------------------------------------------------------------------------------

def test_the_three_dashboards_exist():
    assert {p.name for p in DASHBOARD_FILES} == EXPECTED_FILES


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_is_a_plain_grafana_dashboard(path):
    dash = load(path)
    assert isinstance(dash, dict) and "dashboard" not in dash and "__inputs" not in dash  # not an export wrapper
    assert dash["uid"] and len(dash["uid"]) <= 40 and re.fullmatch(r"[a-zA-Z0-9_-]+", dash["uid"])
    assert dash["title"].startswith("TLT / ")
    assert dash["schemaVersion"] >= 39 and dash.get("id") is None
    assert "tlt" in dash["tags"]
    assert dash["panels"], "no panels"
    assert dash["time"]["from"] and dash["time"]["to"]


def test_uids_and_titles_are_unique_across_dashboards():
    dashes = [load(p) for p in DASHBOARD_FILES]
    assert len({d["uid"] for d in dashes}) == len(dashes)
    assert len({d["title"] for d in dashes}) == len(dashes)


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_panels_have_unique_ids_and_a_layout_without_overlaps(path):
    all_panels = list(panels(load(path)))
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    titles = [p["title"] for p in all_panels]
    assert len(titles) == len(set(titles)), f"duplicate panel titles: {sorted(titles)}"
    boxes = []
    for p in all_panels:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy"), p["title"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        boxes.append((p["title"], g))
    for i, (a, ga) in enumerate(boxes):
        for b, gb in boxes[i + 1:]:
            overlap = (ga["x"] < gb["x"] + gb["w"] and gb["x"] < ga["x"] + ga["w"]
                       and ga["y"] < gb["y"] + gb["h"] and gb["y"] < ga["y"] + ga["h"])
            assert not overlap, f"panels {a!r} and {b!r} overlap"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_panels_are_described_queries_on_the_datasource_variable(path):
    dash = load(path)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables.get("datasource")
    assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus"
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == DATASOURCE_REF, var["name"]
    for p in panels(dash):
        if p["type"] == "row":
            continue
        title = p["title"]
        assert p["type"] in PANEL_TYPES, f"{title}: panel type {p['type']}"
        assert p.get("description", "").strip(), f"{title}: no description"
        assert p["datasource"] == DATASOURCE_REF, f"{title}: panel datasource {p['datasource']}"
        assert p["targets"], f"{title}: no targets"
        if p["type"] != "state-timeline":
            assert p["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        else:
            assert p["fieldConfig"]["defaults"].get("mappings"), f"{title}: state timeline without value mappings"
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"{title}: duplicate refIds"
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"{title} {t['refId']}: no expr"
            assert t["datasource"] == DATASOURCE_REF, f"{title} {t['refId']}: target datasource"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_every_metric_in_a_query_is_exported_by_tlt(path):
    dash = load(path)
    exported = m.exported_names()
    queries = panel_queries(dash) + [(f"${name}", "var", expr) for name, expr, _ in variable_queries(dash)]
    problems = []
    for title, ref, expr in queries:
        names = metric_names(expr)
        if not names:
            problems.append(f"{title} {ref}: no metric in {expr!r}")
        for name in sorted(set(re.findall(r"\btlt_[a-z0-9_]+", expr)) - exported):
            problems.append(f"{title} {ref}: {name} is not exported by tlt.metrics")
        for name in sorted(n for n in names - exported - OTHER_METRICS if not n.startswith("tlt_")):
            problems.append(f"{title} {ref}: {name} is not a TLT metric (nor one of {sorted(OTHER_METRICS)})")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_labels_in_selectors_exist_on_their_metrics(path):
    dash = load(path)
    defs = _series_defs()
    problems = []
    queries = panel_queries(dash) + [(f"${name}", "var", expr) for name, expr, _ in variable_queries(dash)]
    for title, ref, expr in queries:
        for name, matchers in selectors(expr):
            if name not in defs:
                continue
            allowed = {*defs[name].labels, "job", "instance"} | ({"le"} if name.endswith("_bucket") else set())
            problems += [f"{title} {ref}: {name} has no label {label!r}"
                         for label, _, _ in matchers if label not in allowed]
    for name, expr, label in variable_queries(dash):
        metric = metric_names(expr).pop()
        if label not in {*defs[metric].labels, "job", "instance"}:
            problems.append(f"${name}: {metric} has no label {label!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_template_variables_are_defined_and_only_used_as_regex_matchers(path):
    dash = load(path)
    defined = {v["name"] for v in dash["templating"]["list"]}
    queries = panel_queries(dash) + [(f"${name}", "var", expr) for name, expr, _ in variable_queries(dash)]
    for title, ref, expr in queries:
        for used in _VARIABLE.finditer(expr):
            name = used[1] or used[2]
            assert name in defined | set(BUILTIN_VARIABLES), f"{title} {ref}: undefined variable ${name}"
        # $job / $worker stand for regexes ("All" is .*), so they must sit in =~ matchers
        for label, op, value in _MATCHER.findall(expr):
            if _VARIABLE.search(value):
                assert op == "=~" and value == f"${label}", f"{title} {ref}: {label}{op}\"{value}\""
    for p in panels(dash):
        for t in p.get("targets", []):  # a range query would evaluate $__range at every step
            assert "$__range" not in t["expr"] or t.get("instant"), f"{p['title']}: $__range in a range query"
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            assert var["multi"] and var["includeAll"] and var["allValue"] == ".*", var["name"]


def test_every_tlt_metric_is_on_a_dashboard_or_listed_as_an_exception():
    used: set[str] = set()
    for path in DASHBOARD_FILES:
        dash = load(path)
        for _, _, expr in panel_queries(dash):
            used |= metric_names(expr)
    defs = _series_defs()
    shown = {defs[name].name for name in used if name in defs}
    rollout = {metric.name for key, metric in vars(m).items() if key.startswith("ROLLOUT_")
               and isinstance(metric, m.MetricDef)}
    assert rollout - shown == set(), "rollout metrics on no dashboard"
    missing = {metric.name for metric in m.ALL_METRICS} - shown - set(NOT_ON_A_DASHBOARD)
    assert not missing, f"metrics on no dashboard (add a panel or an entry in NOT_ON_A_DASHBOARD): {sorted(missing)}"
    stale = set(NOT_ON_A_DASHBOARD) & shown
    assert not stale, f"listed as not on a dashboard but shown: {sorted(stale)}"


def test_metric_name_parser():
    expr = ('histogram_quantile(0.95, sum by (le, service) (rate(tlt_rpc_server_handling_seconds_bucket'
            '{job=~"$job"}[$__rate_interval]))) / ignoring(position) group_left sum(up) + 1e3 * foo:bar')
    assert metric_names(expr) == {"tlt_rpc_server_handling_seconds_bucket", "up", "foo:bar"}
    assert metric_names('1 + sum by (worker) (rate(a_total{x="rate(b)"}[1m])) / on() c') == {"a_total", "c"}
    assert substitute('rate(x{worker=~"$worker", job=~"${job}"}[$__rate_interval])') == \
        'rate(x{worker=~".*", job=~".*"}[30s])'
    assert selectors('sum(a{b="1", c=~"$c"}) / d') == [("a", [("b", "=", "1"), ("c", "=~", "$c")])]
