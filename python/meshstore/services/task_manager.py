"""task-manager: threat -> task, with operator approval for intercepts.

Watches TRACK entities that carry a ``threat`` (projected to threat, approval, task and
task_catalog) and keeps ``task`` (TaskComponent.state) and ``task_catalog`` in line:

| threat              | approval                         | task        |
|---------------------|----------------------------------|-------------|
| UNSPECIFIED / NONE  | -                                | idle        |
| LOW                 | -                                | investigate |
| MEDIUM              | -                                | track       |
| HIGH                | none yet -> request it (PENDING) | track       |
| HIGH                | PENDING                          | track       |
| HIGH                | APPROVED / AUTO_APPROVED         | intercept   |
| HIGH                | DENIED                           | idle        |
| HIGH                | TIMED_OUT                        | track       |

- A request is ``ApprovalComponent{PENDING, timeout_seconds, requested_at}``; an operator
  decides it with ApproveAction / DenyAction (``meshstore approve ID`` / ``deny ID``).
- Its timeout is a timer on the EventLoop's cancel map (one loop for the process, one
  key per entity, no timer object per entity): when it fires, the task-manager reads the
  entity and, if still PENDING, writes TIMED_OUT with the approval version it read. A
  decision made before that write makes it stale (the decision stands); one made
  concurrently merges by the approval strategy: DENIED beats TIMED_OUT beats APPROVED.
- A decision holds while the threat stays HIGH. When the threat drops below HIGH the
  task follows the threat and the approval is withdrawn (written back to UNSPECIFIED, over
  the version read), so the next HIGH episode asks again.
- A deleted entity cancels its timer. A restarted task-manager rebuilds the timers of
  pending requests from the store (``requested_at + timeout_seconds``; already past:
  fires at once), because the watch starts with every existing track.
- Unknown threat or approval values are logged and left alone. Tracks without a threat
  are not the task-manager's (no task is written).

Every write carries only the task-manager's keys, each with the version read (absent
keys: a version older than any write), and writes that change nothing are skipped.
Events are handled concurrently across tracks and in order per track
(``meshstore.services.PerEntity``); ``stats()`` reports the lag from the threat write a
task answers to the task write (p50/p99).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from meshstore.grpc.client import DEFAULT_ADDR, Backoff, StoreClient, StoreUnavailableError, UpdateBatcher
from meshstore.components import APPROVAL, TASK, TASK_CATALOG, THREAT, pack
from meshstore.errors import InvalidEntityError, NotFoundError
from meshstore.eventloop import EventLoop, default_loop
from meshstore.pb import entity_pb2 as pb
from meshstore.pb import store_pb2
from meshstore.services import (
    Job,
    PerEntity,
    Service,
    base_version,
    newer,
    read_component,
    timestamp,
    timestamp_seconds,
)
from meshstore.validate import is_number

__all__ = ["CATALOGS", "Plan", "TaskManager", "plan"]

IDLE, INVESTIGATE, TRACK, INTERCEPT = "idle", "investigate", "track", "intercept"

#: The tasks available to an operator in each task state.
CATALOGS: dict[str, tuple[str, ...]] = {
    IDLE: ("monitor",),
    INVESTIGATE: ("monitor", "investigate", "identify"),
    TRACK: ("monitor", "track", "report"),
    INTERCEPT: ("track", "intercept", "escort", "abort"),
}

_BY_LEVEL = {
    pb.THREAT_LEVEL_UNSPECIFIED: IDLE,
    pb.THREAT_LEVEL_NONE: IDLE,
    pb.THREAT_LEVEL_LOW: INVESTIGATE,
    pb.THREAT_LEVEL_MEDIUM: TRACK,
}
_BY_DECISION = {
    pb.APPROVAL_STATE_APPROVED: INTERCEPT,
    pb.APPROVAL_STATE_AUTO_APPROVED: INTERCEPT,
    pb.APPROVAL_STATE_DENIED: IDLE,
    pb.APPROVAL_STATE_TIMED_OUT: TRACK,
    pb.APPROVAL_STATE_PENDING: TRACK,
}

#: What the task manager reads of a track (its watch projection, and its writes' answers).
WATCHED = [THREAT, APPROVAL, TASK, TASK_CATALOG]
KEEP = "keep"
CANCEL = "cancel"


@dataclass(frozen=True)
class Plan:
    """What the task-manager wants for one entity as read.

    ``task``: the task state; ``approval``: an ApprovalComponent to write (None: leave it);
    ``deadline``: when the pending request times out (``CANCEL``: no timer)."""

    task: str
    approval: pb.ApprovalComponent | None = None
    deadline: float | str = CANCEL


def plan(entity: pb.Entity, now: float, timeout: float, log: logging.Logger | None = None) -> Plan | None:
    """The task-manager's rules for one entity (None: not its business, or bad values)."""
    threat = read_component(entity, THREAT, pb.ThreatComponent, log)
    if threat is None:
        return None
    approval = read_component(entity, APPROVAL, pb.ApprovalComponent, log)
    state = approval.state if approval is not None else pb.APPROVAL_STATE_UNSPECIFIED
    if threat.level in _BY_LEVEL:
        withdraw = None
        if state != pb.APPROVAL_STATE_UNSPECIFIED:
            withdraw = pb.ApprovalComponent(state=pb.APPROVAL_STATE_UNSPECIFIED)
        return Plan(_BY_LEVEL[threat.level], withdraw, CANCEL)
    if threat.level != pb.THREAT_LEVEL_HIGH:
        if log is not None:
            log.warning("ignoring unknown threat level", extra={"fields": {"entity_id": entity.id,
                                                                            "level": threat.level}})
        return None
    if state == pb.APPROVAL_STATE_UNSPECIFIED:
        request = pb.ApprovalComponent(state=pb.APPROVAL_STATE_PENDING, timeout_seconds=max(1, math.ceil(timeout)),
                                       requested_at=timestamp(now))
        return Plan(TRACK, request, now + request.timeout_seconds)
    if state not in _BY_DECISION:
        if log is not None:
            log.warning("ignoring unknown approval state", extra={"fields": {"entity_id": entity.id, "state": state}})
        return None
    if state == pb.APPROVAL_STATE_PENDING:
        return Plan(TRACK, None, deadline_of(approval, timeout, now))
    return Plan(_BY_DECISION[state], None, CANCEL)


def deadline_of(approval: pb.ApprovalComponent, default_timeout: float, now: float) -> float:
    """When a pending request times out: requested_at + timeout_seconds (defaults: now, and
    the task-manager's timeout)."""
    requested = timestamp_seconds(approval.requested_at) if approval.HasField("requested_at") else now
    return requested + (approval.timeout_seconds or default_timeout)


def task_write(entity: pb.Entity, p: Plan, now: float, log: logging.Logger | None = None) -> pb.Entity | None:
    """The write that brings ``entity`` to plan ``p`` (None: it is there already)."""
    write = pb.Entity(id=entity.id)
    task = read_component(entity, TASK, pb.TaskComponent, log)
    if task is None or task.state != p.task:
        write.components[TASK].CopyFrom(pack(pb.TaskComponent(state=p.task, updated_at=timestamp(now))))
    catalog = read_component(entity, TASK_CATALOG, pb.TaskCatalogComponent, log)
    wanted = CATALOGS[p.task]
    if catalog is None or tuple(catalog.available_tasks) != wanted:
        write.components[TASK_CATALOG].CopyFrom(pack(pb.TaskCatalogComponent(available_tasks=wanted)))
    if p.approval is not None:
        write.components[APPROVAL].CopyFrom(pack(p.approval))
    if not write.components:
        return None
    for key in write.components:
        write.versions[key].CopyFrom(base_version(entity, key))
    return write


class TaskManager(Service):
    """Runs the rules of the module docs. ``event_loop`` owns the approval timers (default:
    the process's shared loop); ``clock`` must be that loop's clock (wall time by default)."""

    name = "task-manager"

    def __init__(self, store: str = DEFAULT_ADDR, *, approval_timeout: float = 30.0,
                 event_loop: EventLoop | None = None, clock: Callable[[], float] = time.time,
                 client: StoreClient | None = None, backoff: Backoff | None = None) -> None:
        super().__init__(store, client=client, backoff=backoff)
        if not is_number(approval_timeout) or approval_timeout <= 0:
            raise ValueError(f"approval timeout must be a positive number of seconds, got {approval_timeout!r}")
        self.approval_timeout = float(approval_timeout)
        self.event_loop = event_loop
        self.clock = clock
        #: entity id -> deadline of the timer we scheduled.
        self.deadlines: dict[str, float] = {}
        self._timeouts: asyncio.Queue[str] | None = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._written: dict[str, pb.Version] = {}
        #: The threat version each entity's last write answered (lag is measured once per threat).
        self._answered: dict[str, pb.Version] = {}
        self.keys_written: set[str] = set()
        self.stream = None
        self.workers = PerEntity(self)
        #: Writes go out in batches: what the handlers of many entities write at once
        #: is one UpdateEntities call.
        self.updates = UpdateBatcher(self.client, components=WATCHED)

    # ---- timers (EventLoop thread -> asyncio) ---------------------------------------------

    @property
    def loop(self) -> EventLoop:
        if self.event_loop is None:
            self.event_loop = default_loop()
        return self.event_loop

    def timer_key(self, entity_id: str) -> Hashable:
        return ("meshstore.task-manager", id(self), entity_id)

    def _arm(self, entity_id: str, when: float) -> None:
        if self.deadlines.get(entity_id) == when:
            return
        self.deadlines[entity_id] = when
        aloop, queue = self._aloop, self._timeouts

        def fire() -> None:  # on the EventLoop thread
            if aloop is None or queue is None:
                return
            try:
                aloop.call_soon_threadsafe(queue.put_nowait, entity_id)
            except RuntimeError:
                pass  # that asyncio loop is closed: the service is gone
        self.loop.schedule(self.timer_key(entity_id), when, fire)
        self.event(logging.DEBUG, "approval timer set", entity_id=entity_id, deadline=round(when, 3),
                   in_s=round(when - self.clock(), 3))

    def _disarm(self, entity_id: str) -> None:
        if self.deadlines.pop(entity_id, None) is not None:
            self.loop.cancel(self.timer_key(entity_id))

    # ---- main --------------------------------------------------------------------------

    async def _main(self) -> None:
        self._aloop = asyncio.get_running_loop()
        self._timeouts = asyncio.Queue()
        self.event(logging.INFO, "managing tasks", approval_timeout_s=self.approval_timeout)
        self.stream = self.client.watch(pb.ENTITY_TYPE_TRACK, include_existing=True,
                                        components=WATCHED,
                                        on_reset=self._written.clear)
        timeouts = asyncio.create_task(self._timeout_worker(), name="task-manager-timeouts")
        try:
            async for ev in self.stream:
                await self.workers.submit(ev.entity.id, ev)
        finally:
            timeouts.cancel()
            await asyncio.gather(timeouts, return_exceptions=True)

    async def _cleanup(self) -> None:
        await self.workers.close()
        await self.updates.close()
        for entity_id in list(self.deadlines):  # the loop is shared: leave no timer behind
            self._disarm(entity_id)

    def prepare(self, ev: store_pb2.EntityEvent) -> Job | None:
        """The write ``ev`` calls for (None: nothing to write; a timer is set or cancelled
        here when that is all it needs)."""
        entity = ev.entity
        if ev.type == store_pb2.EVENT_TYPE_DELETED:
            self._written.pop(entity.id, None)
            self._answered.pop(entity.id, None)
            if entity.id in self.deadlines:
                self._disarm(entity.id)
                self.event(logging.DEBUG, "entity deleted: approval timer cancelled", entity_id=entity.id)
            return None
        self.counters["events"] += 1
        written = self._written.get(entity.id)
        if written is not None and newer(written, entity.versions.get(TASK)):
            self.counters["skipped_old_view"] += 1
            return None
        now = self.clock()
        p = plan(entity, now, self.approval_timeout, self.log)
        if p is None:
            if THREAT not in entity.components:
                self._disarm(entity.id)
            return None
        write = task_write(entity, p, now, self.log)
        if write is None:
            self._set_timer(entity.id, p)
            return None
        return functools.partial(self._apply, entity.id, p, write)

    async def _apply(self, entity_id: str, p: Plan, write: pb.Entity) -> None:
        applied = await self._write(write)
        if applied is None:
            return
        if APPROVAL in applied and p.approval is not None and p.approval.state == pb.APPROVAL_STATE_PENDING:
            self.counters["approvals_requested"] += 1
            self.event(logging.DEBUG, "approval requested", entity_id=entity_id, timeout_s=p.approval.timeout_seconds)
        elif APPROVAL in applied and p.approval is not None:
            self.counters["approvals_withdrawn"] += 1
            self.event(logging.DEBUG, "approval withdrawn: threat below HIGH", entity_id=entity_id)
        elif p.approval is not None and APPROVAL not in applied:
            return  # the request lost to a newer approval: its event decides
        self._set_timer(entity_id, p)

    def _set_timer(self, entity_id: str, p: Plan) -> None:
        if p.deadline == CANCEL:
            self._disarm(entity_id)
        else:
            self._arm(entity_id, float(p.deadline))

    async def _write(self, write: pb.Entity) -> list[str] | None:
        self.keys_written.update(write.components.keys())
        try:
            result = await self.updates.update(write)
        except NotFoundError:
            return None
        except InvalidEntityError as exc:
            self.counters["rejected"] += 1
            self.event(logging.WARNING, "store refused the task write", entity_id=write.id, error=str(exc))
            return None
        if result.stale:
            self.counters["stale"] += 1
            self.event(logging.DEBUG, "task write stale: newer value kept", entity_id=write.id,
                       stale=",".join(result.stale))
        threat = result.entity.versions.get(THREAT)
        if result.applied and threat is not None and self._answered.get(write.id) != threat:
            # The first write answering this threat (not a later one for a decision or a time-out).
            self._answered[write.id] = threat
            self.lag.since(threat.physical)
        if TASK in result.applied:
            self._written[write.id] = result.entity.versions[TASK]
            self.counters["task_changes"] += 1
            if self.log.isEnabledFor(logging.DEBUG):  # a burst of new tracks decodes nothing for it
                task = pb.TaskComponent()
                write.components[TASK].Unpack(task)
                self.event(logging.DEBUG, "task", entity_id=write.id, state=task.state)
        return result.applied

    # ---- timeouts --------------------------------------------------------------------

    async def _timeout_worker(self) -> None:
        assert self._timeouts is not None
        while True:
            entity_id = await self._timeouts.get()
            while True:
                try:
                    await self.time_out(entity_id)
                    break
                except StoreUnavailableError:
                    await self.client.wait_ready()

    async def time_out(self, entity_id: str) -> None:
        """The timer of ``entity_id`` fired: TIMED_OUT if its request is still pending."""
        self.deadlines.pop(entity_id, None)
        try:
            entity = await self.client.get(entity_id)
        except NotFoundError:
            return
        approval = read_component(entity, APPROVAL, pb.ApprovalComponent, self.log)
        if approval is None or approval.state != pb.APPROVAL_STATE_PENDING:
            return
        now = self.clock()
        deadline = deadline_of(approval, self.approval_timeout, now)
        if deadline > now + 1e-3:  # a newer request replaced the one this timer was for
            self._arm(entity_id, deadline)
            return
        timed_out = pb.ApprovalComponent(state=pb.APPROVAL_STATE_TIMED_OUT, timeout_seconds=approval.timeout_seconds)
        if approval.HasField("requested_at"):
            timed_out.requested_at.CopyFrom(approval.requested_at)
        write = pb.Entity(id=entity_id)
        write.components[APPROVAL].CopyFrom(pack(timed_out))
        write.versions[APPROVAL].CopyFrom(base_version(entity, APPROVAL))
        self.keys_written.add(APPROVAL)
        try:
            result = await self.updates.update(write)
        except NotFoundError:
            return
        if APPROVAL in result.applied:
            self.counters["approvals_timed_out"] += 1
            self.event(logging.DEBUG, "approval timed out", entity_id=entity_id,
                       timeout_s=approval.timeout_seconds)
        else:
            self.event(logging.DEBUG, "approval decided before its timeout", entity_id=entity_id)
