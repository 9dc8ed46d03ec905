"""Operator decisions on an entity's pending approval, and the list of approvals waiting.

One path for every front end: the gRPC servicer (``ApproveAction`` / ``DenyAction``)
and the HTTP API (``POST /api/entities/{id}/approve`` / ``deny``) both call
:func:`decide`; ``meshstore pending`` and ``GET /api/pending`` both list with
:func:`pending`.

    decide(store, "t1", entity_pb2.APPROVAL_STATE_APPROVED)   # -> the entity after it
    for p in pending(store.list(entity_pb2.ENTITY_TYPE_TRACK)):
        print(p.entity.id, p.time_left)

Errors: :class:`~meshstore.errors.NotFoundError` (no live entity),
:class:`~meshstore.errors.NoPendingApprovalError` (nothing PENDING: the gRPC server
answers FAILED_PRECONDITION, the HTTP API 409), ``StaleWriteError`` if the approval
changed between the read and the write (a concurrent decision or time-out).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from meshstore.components import APPROVAL, unpack
from meshstore.errors import InvalidEntityError
from meshstore.pb import entity_pb2
from meshstore.store import Store

__all__ = ["DECISIONS", "PendingApproval", "approval_of", "decide", "deadline_of", "pending"]

#: The states an operator decides an approval into.
DECISIONS = frozenset({entity_pb2.APPROVAL_STATE_APPROVED, entity_pb2.APPROVAL_STATE_DENIED})


def approval_of(entity: entity_pb2.Entity) -> entity_pb2.ApprovalComponent | None:
    """The entity's ``approval`` component, None if absent or of another type."""
    try:
        return unpack(entity, APPROVAL, entity_pb2.ApprovalComponent)
    except TypeError:
        return None


def deadline_of(approval: entity_pb2.ApprovalComponent) -> float | None:
    """When a request times out (``requested_at + timeout_seconds``, Unix seconds), None
    without a request time or a timeout."""
    if not approval.HasField("requested_at") or not approval.timeout_seconds:
        return None
    return approval.requested_at.seconds + approval.requested_at.nanos / 1e9 + approval.timeout_seconds


def decide(store: Store, entity_id: str, state: int, decided_by: str = "") -> entity_pb2.Entity:
    """Moves the entity's pending approval to ``state`` (APPROVED or DENIED), recording
    ``decided_by`` (who decided; empty without security) in the component: a strict
    update over the version read, in the same table lock as the read, so the decision
    replicates and a concurrent one is never lost (the core's ``approval::decide``, which
    the gRPC server's ApproveAction/DenyAction call too). Returns the entity after the
    write. NotFoundError, NoPendingApprovalError."""
    if state not in DECISIONS:
        raise ValueError(f"a decision is APPROVED or DENIED, got {state!r}")
    if not isinstance(entity_id, str) or not entity_id:
        raise InvalidEntityError(f"entity id must be a non-empty str, got {entity_id!r}")
    if not isinstance(decided_by, str):
        raise TypeError(f"decided_by must be a str, got {type(decided_by).__name__}")
    return store._core.decide(entity_id, state, decided_by).entity


@dataclass(frozen=True)
class PendingApproval:
    """An approval waiting for an operator: the entity, its approval, when it was asked
    for and when it times out (Unix seconds, None if unknown) and the seconds left then
    (never below 0)."""

    entity: entity_pb2.Entity
    approval: entity_pb2.ApprovalComponent
    requested_at: float | None
    deadline: float | None
    time_left: float | None


def pending(entities: Iterable[entity_pb2.Entity], now: float | None = None) -> list[PendingApproval]:
    """The entities' PENDING approvals, oldest request first (those without a request
    time last), ties by id. ``now``: Unix seconds (default: the clock)."""
    now = time.time() if now is None else now
    found = []
    for entity in entities:
        approval = approval_of(entity)
        if approval is None or approval.state != entity_pb2.APPROVAL_STATE_PENDING:
            continue
        requested = (approval.requested_at.seconds + approval.requested_at.nanos / 1e9
                     if approval.HasField("requested_at") else None)
        deadline = deadline_of(approval)
        left = None if deadline is None else max(0.0, deadline - now)
        found.append(PendingApproval(entity, approval, requested, deadline, left))
    found.sort(key=lambda p: (p.requested_at is None, p.requested_at or 0.0, p.entity.id))
    return found
