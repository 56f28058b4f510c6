"""The operator's Kubernetes permissions: the one list the Helm chart's RBAC and the operator's tests share.

:data:`OPERATOR_RBAC_RULES` is the source of truth. ``python -m tlt_operator.rbac --out
deploy/helm/tlt/files/operator-rbac.yaml`` writes it as data that the chart's ``templates/rbac.yaml`` turns
into (Cluster)Roles, so the chart never repeats a rule by hand; a test checks that the committed file is
current and that the rendered chart grants exactly these rules.

Least privilege: the operator reads and patches RLJobs (kopf adds finalizers; the handlers write ``status``
through the subresource), lists rollout pods and patches their role labels, owns the children it creates
(ConfigMap, Services, StatefulSet, Deployments, controller Job) and posts Events. kopf itself lists and
watches CRDs (scanning for resources) and, in namespaced mode, namespaces, and watches and patches its
peering objects when peering is enabled (``operator.peering.enabled``). tests/k8s/test_operator_rbac.py
records every API request the operator makes in each of the chart's modes and checks both directions: each
request is granted, and each granted verb is used (or its need on a real cluster is written down there).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import yaml

from tlt_operator.generated import generator_main


class Rule(NamedTuple):
    """One permission: ``verbs`` on ``resource`` (may be a subresource, ``rljobs/status``) in ``api_group``."""

    api_group: str
    resource: str
    verbs: tuple[str, ...]


_OWN = ("get", "create", "patch", "delete")

OPERATOR_RBAC_RULES: tuple[Rule, ...] = (
    # The custom resource: kopf lists and watches it and patches its finalizer and annotations; the handlers
    # read it and write status through the subresource. rljobs/finalizers: the children's ownerReferences set
    # blockOwnerDeletion, which OwnerReferencesPermissionEnforcement only accepts with update on it.
    Rule("tlt.dev", "rljobs", ("get", "list", "watch", "patch")),
    Rule("tlt.dev", "rljobs/status", ("patch",)),
    Rule("tlt.dev", "rljobs/finalizers", ("update",)),
    # Rollout pods: list a job's pods (IPs, phases, role labels), patch the tlt.dev/role label.
    Rule("", "pods", ("list", "patch")),
    # Children owned by an RLJob: server-side apply (patch; create when missing), get + delete on cleanup and
    # when the controller Job's pod template changes.
    Rule("", "configmaps", _OWN),
    Rule("", "services", _OWN),
    Rule("apps", "statefulsets", _OWN),
    Rule("apps", "deployments", _OWN),
    Rule("batch", "jobs", _OWN),
    # Events on RLJobs (RoleChanged, ...): kopf posts core/v1 Events.
    Rule("", "events", ("create",)),
    # kopf scanning: CRDs (resources appearing later) and, in namespaced mode, which namespaces exist.
    Rule("", "namespaces", ("list", "watch")),
    Rule("apiextensions.k8s.io", "customresourcedefinitions", ("list", "watch")),
    # kopf peering (only granted when the chart enables peering): watch the peers, patch in a heartbeat.
    Rule("kopf.dev", "clusterkopfpeerings", ("list", "watch", "patch")),
    Rule("kopf.dev", "kopfpeerings", ("list", "watch", "patch")),
)

#: (api_group, resource) pairs that are cluster-scoped: granted by a ClusterRole + ClusterRoleBinding even
#: when the operator watches only some namespaces.
CLUSTER_SCOPED: frozenset[tuple[str, str]] = frozenset({
    ("", "namespaces"),
    ("apiextensions.k8s.io", "customresourcedefinitions"),
    ("kopf.dev", "clusterkopfpeerings"),
})

#: (api_group, resource) pairs needed only with kopf peering.
PEERING: frozenset[tuple[str, str]] = frozenset({
    ("kopf.dev", "clusterkopfpeerings"),
    ("kopf.dev", "kopfpeerings"),
})

CHART_RULES_FILE = "files/operator-rbac.yaml"


def rules(*, peering: bool = False, cluster_scoped: bool | None = None) -> tuple[Rule, ...]:
    """The rules in force: without peering the kopf peering rules are left out; ``cluster_scoped`` selects
    only the cluster-scoped (True) or only the namespaced (False) ones."""
    out = []
    for rule in OPERATOR_RBAC_RULES:
        key = (rule.api_group, rule.resource)
        if key in PEERING and not peering:
            continue
        if cluster_scoped is not None and (key in CLUSTER_SCOPED) != cluster_scoped:
            continue
        out.append(rule)
    return tuple(out)


def allows(api_group: str, resource: str, verb: str, *, peering: bool = False) -> bool:
    """Whether the operator's RBAC grants ``verb`` on ``resource`` (``"pods"``, ``"rljobs/status"``) in
    ``api_group`` (``""`` for the core API); operator tests check every API call they make with this."""
    return any(r.api_group == api_group and r.resource == resource and verb in r.verbs
               for r in rules(peering=peering))


def policy_rules(selected: Iterable[Rule]) -> list[dict[str, list[str]]]:
    """Kubernetes PolicyRules: resources of one API group with identical verbs share a rule."""
    merged: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for rule in selected:
        merged.setdefault((rule.api_group, rule.verbs), []).append(rule.resource)
    return [{"apiGroups": [group], "resources": resources, "verbs": list(verbs)}
            for (group, verbs), resources in merged.items()]


def expand_policy_rules(policy: Iterable[dict]) -> set[tuple[str, str, str]]:
    """The inverse of :func:`policy_rules`, flattened to ``(api_group, resource, verb)`` triples."""
    return {(group, resource, verb)
            for rule in policy
            for group in rule.get("apiGroups", [])
            for resource in rule.get("resources", [])
            for verb in rule.get("verbs", [])}


def chart_rules_document() -> dict[str, list[dict[str, list[str]]]]:
    """What ``templates/rbac.yaml`` reads: PolicyRules split by scope and by whether peering is on."""
    def select(cluster: bool, peer: bool) -> list[dict[str, list[str]]]:
        return policy_rules(r for r in rules(peering=True, cluster_scoped=cluster)
                            if ((r.api_group, r.resource) in PEERING) == peer)

    return {
        "namespaced": select(cluster=False, peer=False),
        "cluster": select(cluster=True, peer=False),
        "peeringNamespaced": select(cluster=False, peer=True),
        "peeringCluster": select(cluster=True, peer=True),
    }


def render_chart_rules() -> str:
    header = ("# Generated from tlt_operator.rbac.OPERATOR_RBAC_RULES by\n"
              f"#   python -m tlt_operator.rbac --out deploy/helm/tlt/{CHART_RULES_FILE}\n"
              "# Do not edit by hand; templates/rbac.yaml turns these into (Cluster)Roles.\n")
    return header + yaml.safe_dump(chart_rules_document(), sort_keys=False, default_flow_style=None, width=120)


def main(argv: Sequence[str] | None = None) -> int:
    return generator_main("python -m tlt_operator.rbac", __doc__.splitlines()[0], render_chart_rules, argv)


if __name__ == "__main__":
    raise SystemExit(main())
