"""RLJob status: conditions, minimal merge patches, and the controller Job's outcome (pure, but for the Event)."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any

import kopf

CONDITION_TYPES = ("Ready", "LongTail", "DrafterTraining", "Suspended", "Complete", "Failed")
Condition = tuple[str, str, str, str]  # type, status, reason, message


def now_iso() -> str:
    """The current UTC time as Kubernetes writes it (RFC 3339, seconds)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(conditions: Iterable[Mapping[str, Any]], condition: Condition, now: str) -> list[dict[str, Any]]:
    """The conditions with ``condition`` set; lastTransitionTime changes only when the status does."""
    type_, status, reason, message = condition
    out = [dict(c) for c in conditions]
    for c in out:
        if c.get("type") == type_:
            if c.get("status") != status:
                c["lastTransitionTime"] = now
            c.update(status=status, reason=reason, message=message)
            break
    else:
        out.append({"type": type_, "status": status, "reason": reason, "message": message,
                    "lastTransitionTime": now})
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(out, key=lambda c: order.get(c.get("type"), len(order)))


def status_patch(old: Mapping[str, Any], fields: Mapping[str, Any], conditions: Iterable[Condition],
                 now: str) -> dict[str, Any]:
    """The merge patch turning status ``old`` into one with ``fields`` and ``conditions`` (empty: no change)."""
    patch: dict[str, Any] = {}
    for key, value in fields.items():
        if key == "roles":
            before = old.get("roles") or {}
            if dict(before) != dict(value):
                patch["roles"] = {**{k: None for k in before if k not in value}, **value}
        elif old.get(key) != value:
            patch[key] = value
    before = [dict(c) for c in old.get("conditions") or []]
    after = before
    for condition in conditions:
        after = set_condition(after, condition, now)
    if after != before:
        patch["conditions"] = after
    return patch


def condition_status(status: Mapping[str, Any], type_: str) -> tuple[str | None, str | None]:
    """(status, reason) of the condition ``type_`` in an RLJob status; (None, None) when it is not set."""
    for c in status.get("conditions") or []:
        if c.get("type") == type_:
            return c.get("status"), c.get("reason")
    return None, None


def announce_outcome(body: Mapping[str, Any], old: Mapping[str, Any], patch: Mapping[str, Any],
                     message: str) -> None:
    """Post the Event for a status write that moved the phase to Complete or Failed (controller outcome).

    Both writers call this (the handlers' reconcile and the planner daemon): whichever of them sees the
    finished Job first writes the phase, and the other then finds nothing new, so the Event must go with the write.
    """
    phase = patch.get("phase", old.get("phase"))
    if phase == "Complete" and old.get("phase") != "Complete":
        kopf.event(body, type="Normal", reason="Complete", message=message)
    # Failed may already be the phase for an invalid spec; the controller's failure is news all the same.
    elif phase == "Failed" and patch and condition_status(old, "Failed") != ("True", "ControllerFailed"):
        kopf.event(body, type="Warning", reason="ControllerFailed", message=message)


def controller_outcome(job: Mapping[str, Any] | None) -> tuple[str | None, str]:
    """("Complete" | "Failed" | None, message) from the controller Job's status."""
    if not job:
        return None, ""
    status = job.get("status") or {}
    for c in status.get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "Complete", c.get("message") or "the controller Job succeeded"
        if c.get("status") == "True" and c.get("type") in ("Failed", "FailureTarget"):
            return "Failed", c.get("message") or c.get("reason") or "the controller Job failed"
    if status.get("succeeded"):
        return "Complete", "the controller Job succeeded"
    return None, ""
