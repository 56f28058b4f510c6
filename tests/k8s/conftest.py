"""Fixtures for the Helm chart and RLJob CRD tests (operator fixtures live with the operator tests)."""

from __future__ import annotations

import pytest
import yaml

from tests.k8s.chart_helpers import CHART_DIR, CRD_FILE, DASHBOARDS_DIR, copy_chart


@pytest.fixture(scope="session")
def chart_dir(tmp_path_factory):
    """The chart directory to load. Its ``dashboards`` is a link to the repository's ``dashboards/``; until
    that directory exists Helm cannot load the chart, so a copy with an empty ``dashboards/`` is used."""
    if DASHBOARDS_DIR.is_dir():
        return CHART_DIR
    return copy_chart(tmp_path_factory.mktemp("chart"), dashboards={})


@pytest.fixture(scope="session")
def chart(chart_dir):
    helm = pytest.importorskip("helm_python")
    with helm.Chart.load(chart_dir) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def rljob_crd():
    """The committed CRD object (deploy/helm/tlt/crds/rljob.yaml)."""
    return yaml.safe_load(CRD_FILE.read_text())
