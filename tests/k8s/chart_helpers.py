"""Helpers for the chart and CRD tests: paths, rendering with helm-python-sdk, strict manifest validation."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "deploy" / "helm" / "tlt"
CRD_FILE = CHART_DIR / "crds" / "rljob.yaml"
EXAMPLES_DIR = REPO_ROOT / "deploy" / "examples"
DASHBOARDS_DIR = REPO_ROOT / "dashboards"
KUBE_VERSION = "1.33.0"
RELEASE = "tlt"
NAMESPACE = "tlt-system"
# Custom resources kubernetes-validate has no schema for (checked by other means).
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PodMonitor"),
                ("kopf.dev/v1", "ClusterKopfPeering"), ("kopf.dev/v1", "KopfPeering"),
                ("tlt.dev/v1alpha1", "RLJob")}


def copy_chart(dest: Path, dashboards: dict[str, str] | None = None) -> Path:
    """A copy of the chart whose ``dashboards/`` is a real directory holding ``dashboards`` (name -> text),
    or the repository's dashboards when None."""
    chart = dest / "tlt"
    shutil.copytree(CHART_DIR, chart, ignore=shutil.ignore_patterns("dashboards"))
    (chart / "dashboards").mkdir()
    if dashboards is None:
        for path in sorted(DASHBOARDS_DIR.glob("*.json")) if DASHBOARDS_DIR.is_dir() else []:
            shutil.copy(path, chart / "dashboards" / path.name)
    else:
        for name, text in dashboards.items():
            (chart / "dashboards" / name).write_text(text)
    return chart


def render(chart: Any, values: dict[str, Any] | None = None, *, name: str = RELEASE,
           namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Every manifest the chart's templates render (``helm template``), as dicts; NOTES.txt left out."""
    out = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def validate_manifest(doc: dict[str, Any]) -> None:
    """kubernetes-validate in strict mode (unknown fields are errors); custom resources only need the basics."""
    import kubernetes_validate

    if (doc.get("apiVersion"), doc.get("kind")) in CUSTOM_KINDS:
        assert doc["metadata"]["name"], doc
        return
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:  # str(exc) dumps the whole schema
        path = ".".join(map(str, exc.path))
        raise AssertionError(f"{doc['kind']}/{doc['metadata'].get('name')}: {path}: {exc.message}") from None


def example_files() -> list[Path]:
    return sorted(EXAMPLES_DIR.glob("rljob-*.yaml"))


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]
