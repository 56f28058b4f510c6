"""Kubernetes API access for the operator: plain JSON over the kubernetes client's configured connection."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException

from tlt_operator.resources import GROUP, PLURAL, VERSION

FIELD_MANAGER = "tlt-operator"
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"

_PATHS = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "Pod": ("/api/v1", "pods"),
    "StatefulSet": ("/apis/apps/v1", "statefulsets"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Job": ("/apis/batch/v1", "jobs"),
    "RLJob": (f"/apis/{GROUP}/{VERSION}", PLURAL),
}


def collection_path(kind: str, namespace: str) -> str:
    """The API path of ``kind``'s objects in ``namespace``."""
    prefix, plural = _PATHS[kind]
    return f"{prefix}/namespaces/{namespace}/{plural}"


def object_path(kind: str, namespace: str, name: str) -> str:
    """The API path of one object."""
    return f"{collection_path(kind, namespace)}/{name}"


class Kube:
    """Raw JSON requests through a ``kubernetes.client.ApiClient`` (auth, TLS, token refresh are its job).

    Plain dicts in and out: no typed models, so partial objects (and API emulators) round-trip unchanged.
    """

    def __init__(self, api_client: ApiClient, timeout: float = 30.0) -> None:
        self.api = api_client
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, query: Iterable[tuple[str, str]] = (),
                content_type: str = "application/json") -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        request = self.api.param_serialize(method=method, resource_path=path, query_params=list(query),
                                           header_params=headers, body=body, auth_settings=["BearerToken"])
        reply = self.api.call_api(*request, _request_timeout=self.timeout)
        data = reply.read()
        if not 200 <= reply.status <= 299:
            raise ApiException.from_response(http_resp=reply, body=data.decode(errors="replace"), data=None)
        return json.loads(data) if data else None

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str, label_selector: Mapping[str, str]) -> list[dict[str, Any]]:
        """Objects matching ``label_selector`` (also filtered here: some API emulators ignore selectors)."""
        selector = ",".join(f"{k}={v}" for k, v in label_selector.items())
        reply = self.request("GET", collection_path(kind, namespace), query=[("labelSelector", selector)])
        items = (reply or {}).get("items") or []
        return [o for o in items if all(((o.get("metadata") or {}).get("labels") or {}).get(k) == v
                                        for k, v in label_selector.items())]

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> Any:
        return self.request("PATCH", path, body=patch, content_type=MERGE)

    def create(self, obj: Mapping[str, Any]) -> Any:
        meta = obj["metadata"]
        return self.request("POST", collection_path(obj["kind"], meta["namespace"]), body=obj,
                            query=[("fieldManager", FIELD_MANAGER)])

    def apply(self, obj: Mapping[str, Any]) -> Any:
        """Server-side apply (fields we stop rendering are removed); create when the server reports 404."""
        meta = obj["metadata"]
        path = object_path(obj["kind"], meta["namespace"], meta["name"])
        try:
            return self.request("PATCH", path, body=obj, content_type=APPLY,
                                query=[("fieldManager", FIELD_MANAGER), ("force", "true")])
        except ApiException as exc:
            if exc.status != 404:
                raise
        return self.create(obj)

    def delete(self, path: str) -> bool:
        try:
            self.request("DELETE", path, query=[("propagationPolicy", "Background")])
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise


def api_client_for(server: str) -> ApiClient:
    """A client for an API server URL used without credentials (``kubectl proxy``, an emulator)."""
    config = Configuration()
    config.host = server.rstrip("/")
    config.verify_ssl = False
    return ApiClient(config)
