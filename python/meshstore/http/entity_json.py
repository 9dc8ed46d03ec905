"""Entities as JSON-ready dicts: the one place that says how an entity reads as JSON.

- :func:`summary`: the summary view ``E`` of the HTTP API (docs/http.md): id, type and
  the pipeline's components flattened (position, velocity, threat, classification,
  task, approval with its deadline, source, fusion), times as ISO 8601 UTC strings.
  The web page, ``GET /api/entities``, the SSE feed and ``meshstore list`` columns use it.
- :func:`detail`: ``E`` plus every component (type URL, decoded value, size), each key's
  version, and the siblings a replica state holds (``GET /api/entities/{id}``).
- :func:`pending_dict`: one waiting approval (``GET /api/pending``, ``meshstore pending``).
- :func:`proto_dict`: the protobuf JSON mapping of an entity (proto field names,
  components unpacked where their type is known): ``meshstore get/list/watch --json``
  and ``meshstore export``.

A component holding another type than its key's (``position`` that is not a
PositionComponent) reads as null in the summary, never as an error; non-finite numbers
read as null (JSON has no NaN).
"""

from __future__ import annotations

import base64
import datetime
import functools
import math
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from meshstore.approvals import PendingApproval, deadline_of
from meshstore.components import (
    APPROVAL,
    CLASSIFICATION,
    FUSION,
    POSITION,
    SOURCE,
    TASK,
    THREAT,
    VELOCITY,
)
from meshstore.pb import entity_pb2 as pb

__all__ = ["any_dict", "component_value", "detail", "entity_type_name", "iso", "pending_dict", "proto_dict", "summary",
           "threat_name", "versions_dict"]

_TYPE_NAMES = {v: k.removeprefix("ENTITY_TYPE_") for k, v in pb.EntityType.items()}
_THREAT_NAMES = {v: k.removeprefix("THREAT_LEVEL_") for k, v in pb.ThreatLevel.items()
                 if v != pb.THREAT_LEVEL_UNSPECIFIED}
_APPROVAL_NAMES = {v: k.removeprefix("APPROVAL_STATE_") for k, v in pb.ApprovalState.items()}
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def _num(value: float, digits: int | None = None) -> float | None:
    """A finite float (rounded to ``digits``), else None."""
    if not math.isfinite(value):
        return None
    return round(value, digits) if digits is not None else value


@functools.lru_cache(maxsize=4096)
def _second(whole: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` of a Unix second (cached: a batch's times share a few)."""
    return (_EPOCH + datetime.timedelta(seconds=whole)).strftime("%Y-%m-%dT%H:%M:%S")


def _iso(whole: int, millis: int) -> str | None:
    try:
        return f"{_second(whole)}.{millis:03d}Z"
    except OverflowError:
        return None


def iso(seconds: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC with milliseconds (``2026-12-02T10:00:00.123Z``)."""
    if seconds is None or not math.isfinite(seconds):
        return None
    whole = math.floor(seconds)
    return _iso(whole, min(999, int((seconds - whole) * 1000)))


def _ts(ts: Any) -> str | None:
    """A protobuf Timestamp as ISO 8601 (None when unset)."""
    seconds, nanos = ts.seconds, ts.nanos
    if not seconds and not nanos:
        return None
    return _iso(seconds, nanos // 1_000_000)


def entity_type_name(value: int) -> str:
    """``TRACK``, ``ASSET``, ``GEO``, ``UNSPECIFIED`` (or the number, if unknown)."""
    return _TYPE_NAMES.get(value, str(value))


def threat_name(value: int) -> str | None:
    """``NONE`` .. ``HIGH``; None for UNSPECIFIED or an unknown value."""
    return _THREAT_NAMES.get(value)


def _unpacked(entity: pb.Entity, key: str, message_class: type) -> Any:
    """The component as ``message_class``, None if absent, of another type or undecodable."""
    components = entity.components
    if key not in components:
        return None
    return _parsed(components[key], message_class)


def _parsed(packed: Any, message_class: type) -> Any:
    """An Any's value as ``message_class``, None if it holds another type or does not parse."""
    if packed.type_url.rpartition("/")[2] != message_class.DESCRIPTOR.full_name:
        return None
    message = message_class()
    try:
        message.ParseFromString(packed.value)
    except DecodeError:
        return None
    return message


def _approval(approval: pb.ApprovalComponent) -> dict[str, Any]:
    return {
        "state": _APPROVAL_NAMES.get(approval.state, str(approval.state)),
        "requested_at": _ts(approval.requested_at) if approval.HasField("requested_at") else None,
        "timeout_seconds": approval.timeout_seconds,
        "deadline": iso(deadline_of(approval)),
        "decided_by": approval.decided_by,
    }


def _position(p: pb.PositionComponent) -> dict[str, Any] | None:
    lat, lon = _num(p.lat), _num(p.lon)
    return None if lat is None or lon is None else {"lat": lat, "lon": lon, "alt": _num(p.alt)}


def _task(k: pb.TaskComponent) -> dict[str, Any]:
    return {"task": k.state, "updated_at": _ts(k.updated_at) if k.HasField("updated_at") else None}


def _fusion(f: pb.FusionComponent) -> dict[str, Any]:
    return {"source_ids": list(f.source_ids), "fused_lat": _num(f.fused_lat), "fused_lon": _num(f.fused_lon),
            "confidence": _num(f.confidence, 4)}


#: The summary's component fields: key -> (message class, how it reads).
_SUMMARY_FIELDS: dict[str, tuple[type, Any]] = {
    POSITION: (pb.PositionComponent, _position),
    VELOCITY: (pb.VelocityComponent, lambda v: {"speed": _num(v.speed), "heading": _num(v.heading)}),
    THREAT: (pb.ThreatComponent, lambda t: _THREAT_NAMES.get(t.level)),
    CLASSIFICATION: (pb.ClassificationComponent,
                     lambda c: {"label": c.label, "confidence": _num(c.confidence, 4)}),
    TASK: (pb.TaskComponent, _task),
    APPROVAL: (pb.ApprovalComponent, _approval),
    SOURCE: (pb.SourceComponent, lambda s: {"sensor_id": s.sensor_id, "sensor_type": s.sensor_type}),
    FUSION: (pb.FusionComponent, _fusion),
}


def summary(entity: pb.Entity) -> dict[str, Any]:
    """The summary view ``E`` (see docs/http.md). Reads each component present once (the
    live feed calls this for every event)."""
    out: dict[str, Any] = {
        "id": entity.id,
        "type": _TYPE_NAMES.get(entity.type, str(entity.type)),
        "position": None, "velocity": None, "threat": None, "classification": None, "task": None,
        "approval": None, "source": None, "fusion": None,
        "expires_at": _ts(entity.expiry_time) if entity.HasField("expiry_time") else None,
        "updated_at": _ts(entity.updated_at) if entity.HasField("updated_at") else None,
        "origin_node": entity.origin_node or None,
    }
    for key, packed in entity.components.items():
        reader = _SUMMARY_FIELDS.get(key)
        if reader is not None and (message := _parsed(packed, reader[0])) is not None:
            out[key] = reader[1](message)
    return out


def component_value(packed: Any) -> dict[str, Any] | None:
    """A component's fields as JSON (protobuf's JSON mapping, proto field names), None
    when its type is unknown or its bytes do not parse as it."""
    try:
        out = json_format.MessageToDict(packed, preserving_proto_field_name=True)
    except Exception:  # noqa: BLE001 - unknown type URL or bytes that do not parse as it
        return None
    out.pop("@type", None)
    return out


def _version(v: Any) -> dict[str, Any]:
    return {"node": v.node, "physical_ns": v.physical, "logical": v.logical,
            "incarnation": f"{v.incarnation:016x}", "counter": v.counter, "concurrent": len(v.concurrent)}


def versions_dict(entity: pb.Entity) -> dict[str, dict[str, Any]]:
    """Each key's version, keys sorted."""
    return {key: _version(entity.versions[key]) for key in sorted(entity.versions)}


def detail(entity: pb.Entity, replica_state: pb.Entity | None = None) -> dict[str, Any]:
    """``E`` plus ``components`` (type URL, decoded value or null, size in bytes),
    ``versions`` and ``siblings`` (the values a replica state holds beside the chosen
    one of a key: concurrent writes its strategy ranked below it)."""
    out = summary(entity)
    out["components"] = {
        key: {"type_url": entity.components[key].type_url, "value": component_value(entity.components[key]),
              "bytes": len(entity.components[key].value)}
        for key in sorted(entity.components)
    }
    out["versions"] = versions_dict(entity)
    siblings = [] if replica_state is None else list(replica_state.siblings)
    out["siblings"] = [
        {"key": s.key, "node": s.version.node, "incarnation": f"{s.version.incarnation:016x}",
         "counter": s.version.counter, "value": component_value(s.value) if s.HasField("value") else None}
        for s in sorted(siblings, key=lambda s: (s.key, s.version.node, s.version.counter))
    ]
    return out


def pending_dict(p: PendingApproval) -> dict[str, Any]:
    """One waiting approval: id, requested_at, deadline, time_left_s, threat, task."""
    t = _unpacked(p.entity, THREAT, pb.ThreatComponent)
    k = _unpacked(p.entity, TASK, pb.TaskComponent)
    return {
        "id": p.entity.id,
        "requested_at": iso(p.requested_at),
        "deadline": iso(p.deadline),
        "time_left_s": None if p.time_left is None else round(p.time_left, 1),
        "threat": None if t is None else _THREAT_NAMES.get(t.level),
        "task": None if k is None else k.state,
    }


def any_dict(packed: Any) -> dict[str, Any]:
    """A component in protobuf's JSON mapping: its fields when the type is known, else
    type URL + base64."""
    try:
        return json_format.MessageToDict(packed, preserving_proto_field_name=True)
    except Exception:  # noqa: BLE001 - unknown type URL or bytes that do not parse as it
        return {"@type": packed.type_url, "value": base64.b64encode(packed.value).decode()}


def proto_dict(entity: pb.Entity) -> dict[str, Any]:
    """``json_format.MessageToDict`` of an entity (proto field names), components
    unpacked where their type is known (``@type`` + fields), else ``@type`` + base64."""
    shell = type(entity)()
    shell.CopyFrom(entity)
    shell.ClearField("components")
    out = json_format.MessageToDict(shell, preserving_proto_field_name=True)
    if entity.components:
        out["components"] = {key: any_dict(entity.components[key]) for key in sorted(entity.components)}
    return out
