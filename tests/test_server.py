"""The gRPC server over a real Store, through a real grpc.aio server on 127.0.0.1:0.

The server runs on its own event loop thread (as in ``meshstore serve``); the tests are
ordinary synchronous gRPC clients. Nothing is mocked. Waits poll with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from meshstore import Store
from meshstore.components import APPROVAL, POSITION, THREAT, make_entity, pack, type_url, unpack
from meshstore.errors import NotFoundError
from meshstore.pb import entity_pb2, store_pb2, store_pb2_grpc
from meshstore.grpc.server import SERVICE_NAME, UPDATE_RESULT_METADATA, GrpcServer
from meshstore.grpc.status import status_for
from meshstore.node import Node

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 5.0
C = grpc.StatusCode
TRACK, ASSET = entity_pb2.ENTITY_TYPE_TRACK, entity_pb2.ENTITY_TYPE_ASSET
PUBLISH = "/store.v1.EntityStoreService/PublishEntities"


def wait_for(predicate: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.005)
    return result


class ServerThread:
    """A started node (``meshstore.node.Node``) over ``store`` on its own asyncio loop thread."""

    def __init__(self, store: Store, **kwargs: Any) -> None:
        self.store = store
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-grpc-server", daemon=True)
        self.thread.start()
        self.running = self.call(Node(store=store, **kwargs).start())
        self.channel = grpc.insecure_channel(self.running.address)
        self.stub = store_pb2_grpc.EntityStoreServiceStub(self.channel)

    def call(self, coro: Any, timeout: float = TIMEOUT) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        if self.loop.is_running():
            self.call(self.running.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(TIMEOUT)
            self.loop.close()
        self.channel.close()


@contextlib.contextmanager
def running_server(**store_options: Any) -> Iterator[ServerThread]:
    server_kwargs = {k: store_options.pop(k) for k in ("max_message_bytes", "watch_queue") if k in store_options}
    store = Store(node_id=store_options.pop("node_id", "srv"), **store_options)
    server = ServerThread(store, **server_kwargs)
    try:
        yield server
    finally:
        server.stop()
        store.close()


@pytest.fixture
def server() -> Iterator[ServerThread]:
    with running_server() as s:
        yield s


def track(entity_id: str, lat: float = 1.0, lon: float = 2.0, **components: Any) -> entity_pb2.Entity:
    return make_entity(entity_id, TRACK, position=entity_pb2.PositionComponent(lat=lat, lon=lon), **components)


def position(entity: entity_pb2.Entity) -> tuple[float, float]:
    p = unpack(entity, POSITION, entity_pb2.PositionComponent)
    return (p.lat, p.lon)


def rpc_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, timeout=TIMEOUT, **kwargs)
    return info.value


def create(server: ServerThread, entity: entity_pb2.Entity) -> entity_pb2.Entity:
    return server.stub.CreateEntity(store_pb2.CreateEntityRequest(entity=entity), timeout=TIMEOUT)


# ---- unary RPCs -------------------------------------------------------------------------

def test_crud_roundtrip(server: ServerThread) -> None:
    stub = server.stub
    created = create(server, track("t1"))
    assert created.id == "t1" and created.type == TRACK and position(created) == (1.0, 2.0)
    assert POSITION in created.versions and created.origin_node == "srv"

    got = stub.GetEntity(store_pb2.GetEntityRequest(id="t1"), timeout=TIMEOUT)
    assert got == created
    create(server, make_entity("a1", ASSET))
    listed = stub.ListEntities(store_pb2.ListEntitiesRequest(), timeout=TIMEOUT).entities
    assert [e.id for e in listed] == ["a1", "t1"]
    only_tracks = stub.ListEntities(store_pb2.ListEntitiesRequest(type_filter=TRACK), timeout=TIMEOUT).entities
    assert [e.id for e in only_tracks] == ["t1"]

    write = track("t1", lat=5.0)
    write.versions[POSITION].CopyFrom(got.versions[POSITION])
    resp = stub.UpdateEntityDetailed(store_pb2.UpdateEntityRequest(entity=write), timeout=TIMEOUT)
    assert list(resp.applied) == [POSITION] and not resp.stale
    assert position(resp.entity) == (5.0, 2.0)
    assert position(server.store.get("t1")) == (5.0, 2.0)

    stub.DeleteEntity(store_pb2.DeleteEntityRequest(id="t1"), timeout=TIMEOUT)
    assert rpc_error(stub.GetEntity, store_pb2.GetEntityRequest(id="t1")).code() == C.NOT_FOUND


def test_update_reports_stale_keys_and_strict_aborts(server: ServerThread) -> None:
    stub = server.stub
    read = create(server, track("t1"))
    server.store.update(track("t1", lat=9.0))  # someone else writes a newer position
    stale = track("t1", lat=7.0)
    stale.versions[POSITION].CopyFrom(read.versions[POSITION])

    err = rpc_error(stub.UpdateEntity, store_pb2.UpdateEntityRequest(entity=stale, strict=True))
    assert err.code() == C.ABORTED and "stale" in err.details()
    assert position(server.store.get("t1")) == (9.0, 2.0)

    resp = stub.UpdateEntityDetailed(store_pb2.UpdateEntityRequest(entity=stale), timeout=TIMEOUT)
    assert list(resp.stale) == [POSITION] and not resp.applied
    assert position(resp.entity) == (9.0, 2.0)


def test_update_entities_answers_each_entity_alone(server: ServerThread) -> None:
    store = server.store
    read = create(server, track("t1"))
    create(server, track("t2"))
    store.update(track("t2", lat=9.0))  # t2 moves on: a write based on the first read is stale
    stale = track("t2", lat=7.0)
    stale.versions[POSITION].CopyFrom(read.versions[POSITION])
    fresh = track("t1", lat=5.0)
    fresh.versions[POSITION].CopyFrom(read.versions[POSITION])
    bad = track("t1", lat=float("nan"))
    seq = store.seq

    resp = server.stub.UpdateEntities(store_pb2.UpdateEntitiesRequest(
        entities=[fresh, track("missing"), stale, bad, track("t2", lat=9.0)]), timeout=TIMEOUT)
    applied, missing, kept, refused, same = resp.results
    assert list(applied.applied) == [POSITION] and position(applied.entity) == (5.0, 2.0)
    assert missing.error_code == C.NOT_FOUND.value[0] and "missing" in missing.error and not missing.HasField("entity")
    assert list(kept.stale) == [POSITION] and position(kept.entity) == (9.0, 2.0)
    assert refused.error_code == C.INVALID_ARGUMENT.value[0] and "finite" in refused.error
    assert list(same.unchanged) == [POSITION] and not same.applied
    assert position(store.get("t1")) == (5.0, 2.0) and position(store.get("t2")) == (9.0, 2.0)
    assert store.seq == seq + 1  # one change: t1's
    with pytest.raises(NotFoundError):
        store.get("missing")

    strict = server.stub.UpdateEntities(store_pb2.UpdateEntitiesRequest(entities=[stale], strict=True), timeout=TIMEOUT)
    assert strict.results[0].error_code == C.ABORTED.value[0] and position(store.get("t2")) == (9.0, 2.0)


def test_update_entities_projects_the_answers(server: ServerThread) -> None:
    create(server, track("t1", threat=entity_pb2.ThreatComponent(level=1)))
    write = make_entity("t1", TRACK, threat=entity_pb2.ThreatComponent(level=2))
    resp = server.stub.UpdateEntities(store_pb2.UpdateEntitiesRequest(entities=[write], components=[THREAT]),
                                      timeout=TIMEOUT)
    entity = resp.results[0].entity
    assert set(entity.components) == {THREAT} and THREAT in entity.versions and POSITION not in entity.versions
    unknown = server.stub.UpdateEntities(store_pb2.UpdateEntitiesRequest(entities=[write], components=["no-such-key"]),
                                         timeout=TIMEOUT)
    assert not unknown.results[0].entity.components and list(unknown.results[0].unchanged) == [THREAT]
    assert not server.stub.UpdateEntities(store_pb2.UpdateEntitiesRequest(), timeout=TIMEOUT).results
    raw = server.channel.unary_unary("/store.v1.EntityStoreService/UpdateEntities")
    with pytest.raises(grpc.RpcError) as info:
        raw(b"\x0a\xff\xff\xff", timeout=TIMEOUT)
    assert info.value.code() == C.INVALID_ARGUMENT and "UpdateEntitiesRequest" in info.value.details()


@pytest.mark.parametrize("call, request_", [
    ("CreateEntity", store_pb2.CreateEntityRequest()),
    ("UpdateEntity", store_pb2.UpdateEntityRequest(strict=True)),
])
def test_request_without_entity_is_invalid_argument(server: ServerThread, call: str, request_: Any) -> None:
    err = rpc_error(getattr(server.stub, call), request_)
    assert err.code() == C.INVALID_ARGUMENT and err.details() == "request has no entity"


def test_error_codes(server: ServerThread) -> None:
    stub = server.stub
    create(server, track("t1"))
    cases = [
        (stub.CreateEntity, store_pb2.CreateEntityRequest(entity=track("t1")), C.ALREADY_EXISTS, "already exists"),
        (stub.CreateEntity, store_pb2.CreateEntityRequest(entity=track("")), C.INVALID_ARGUMENT, "id is empty"),
        (stub.GetEntity, store_pb2.GetEntityRequest(id="nope"), C.NOT_FOUND, "'nope' not found"),
        (stub.GetEntity, store_pb2.GetEntityRequest(id=""), C.INVALID_ARGUMENT, "id is empty"),
        (stub.UpdateEntity, store_pb2.UpdateEntityRequest(entity=track("nope")), C.NOT_FOUND, "not found"),
        (stub.DeleteEntity, store_pb2.DeleteEntityRequest(id="nope"), C.NOT_FOUND, "not found"),
        (stub.DeleteEntity, store_pb2.DeleteEntityRequest(id=""), C.INVALID_ARGUMENT, "id is empty"),
        (stub.ListEntities, store_pb2.ListEntitiesRequest(type_filter=9), C.INVALID_ARGUMENT, "type_filter"),
        (stub.ApproveAction, store_pb2.ApproveActionRequest(entity_id="nope"), C.NOT_FOUND, "not found"),
        (stub.DenyAction, store_pb2.DenyActionRequest(entity_id=""), C.INVALID_ARGUMENT, "id is empty"),
    ]
    for method, request, code, text in cases:
        err = rpc_error(method, request)
        assert (err.code(), text in err.details()) == (code, True), (request, err.code(), err.details())


def test_clock_skew_is_out_of_range(server: ServerThread) -> None:
    create(server, track("t1"))
    future = track("t1", lat=3.0)
    future.versions[POSITION].physical = time.time_ns() + 3600 * 10**9
    future.versions[POSITION].node = "elsewhere"
    err = rpc_error(server.stub.UpdateEntity, store_pb2.UpdateEntityRequest(entity=future))
    assert err.code() == C.OUT_OF_RANGE and "ahead of the local clock" in err.details()
    assert position(server.store.get("t1")) == (1.0, 2.0)


def test_expired_cursor_is_out_of_range(server: ServerThread) -> None:
    create(server, track("t0"))
    create(server, track("t1"))  # seq 2
    server.store.delete("t1")  # seq 3: a tombstone, then collected
    assert server.store.collect_tombstones(acked_seq=server.store.seq) == 1
    # A cursor from before the collected tombstone cannot resume without missing the delete.
    call = server.stub.WatchEntities(store_pb2.WatchEntitiesRequest(since_seq=1), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == C.OUT_OF_RANGE and "fresh snapshot" in info.value.details()


def test_request_errors_are_logged_with_their_code(server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="meshstore.grpc.server"):
        rpc_error(server.stub.GetEntity, store_pb2.GetEntityRequest(id="ghost"))
        wait_for(lambda: any(getattr(r, "fields", {}).get("code") == "NOT_FOUND" for r in caplog.records))
    record = next(r for r in caplog.records if getattr(r, "fields", {}).get("code") == "NOT_FOUND")
    assert record.levelno == logging.INFO
    assert record.fields["method"] == "GetEntity" and "ghost" in record.fields["error"]


def test_unexpected_exceptions_map_to_internal_never_unknown() -> None:
    class PanicLike(BaseException):
        pass

    assert status_for(RuntimeError("boom"))[0] == C.INTERNAL
    assert status_for(PanicLike("core panicked"))[0] == C.INTERNAL
    assert "boom" not in status_for(RuntimeError("boom"))[1]
    assert status_for(KeyError("k"))[0] == C.INTERNAL
    assert status_for(TypeError("t"))[0] == C.INVALID_ARGUMENT


# ---- bad input at the gRPC boundary -----------------------------------------------------

def test_bad_input_is_refused_and_leaves_the_server_and_state_intact() -> None:
    with running_server(max_message_bytes=64 * 1024, max_entity_bytes=16 * 1024) as server:
        stub = server.stub
        before = create(server, track("t1"))
        seq = server.store.seq

        def blob(size: int) -> entity_pb2.Entity:
            return track("t1", source=entity_pb2.SourceComponent(sensor_id="x" * size))

        oversize = rpc_error(stub.UpdateEntity, store_pb2.UpdateEntityRequest(entity=blob(70_000)))
        assert oversize.code() == C.RESOURCE_EXHAUSTED

        over_store_limit = rpc_error(stub.UpdateEntity, store_pb2.UpdateEntityRequest(entity=blob(20_000)))
        assert over_store_limit.code() == C.INVALID_ARGUMENT and "limit" in over_store_limit.details()

        garbage = track("t1")
        garbage.components[THREAT].CopyFrom(any_pb2.Any(type_url=type_url(entity_pb2.ThreatComponent),
                                                         value=b"\xff\xff\xff\xff"))
        err = rpc_error(stub.UpdateEntity, store_pb2.UpdateEntityRequest(entity=garbage))
        assert err.code() == C.INVALID_ARGUMENT and THREAT in err.details()

        level9 = track("t1", threat=entity_pb2.ThreatComponent(level=9))
        err = rpc_error(stub.UpdateEntity, store_pb2.UpdateEntityRequest(entity=level9))
        assert err.code() == C.INVALID_ARGUMENT and THREAT in err.details()
        err = rpc_error(stub.CreateEntity, store_pb2.CreateEntityRequest(entity=make_entity("t2", 7)))
        assert err.code() == C.INVALID_ARGUMENT and "entity type" in err.details()

        # Alive, and nothing changed.
        assert stub.GetEntity(store_pb2.GetEntityRequest(id="t1"), timeout=TIMEOUT) == before
        assert server.store.seq == seq
        assert [e.id for e in server.store.list()] == ["t1"]
        health = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


# ---- the seed system's clients ----------------------------------------------------------

class OldClient(grpc.UnaryUnaryClientInterceptor):
    """A client built on the seed proto (Entity fields 1-8): whatever it sends lacks
    versions, expiry_time, origin_node and deleted_version."""

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if hasattr(request, "entity") and request.HasField("entity"):
            stripped = type(request)()
            stripped.CopyFrom(request)
            for name in ("versions", "expiry_time", "origin_node", "deleted_version"):
                stripped.entity.ClearField(name)
            request = stripped
        return continuation(details, request)


def update_result_metadata(call: Any) -> store_pb2.UpdateResult:
    found = dict(call.initial_metadata())
    return store_pb2.UpdateResult.FromString(found[UPDATE_RESULT_METADATA])


def test_old_client_read_modify_write_gets_the_per_key_merge(server: ServerThread) -> None:
    old = store_pb2_grpc.EntityStoreServiceStub(grpc.intercept_channel(server.channel, OldClient()))
    old.CreateEntity(store_pb2.CreateEntityRequest(entity=track("t1", lat=1.0, lon=1.0)), timeout=TIMEOUT)

    # The classifier (old client) reads the track...
    read = old.GetEntity(store_pb2.GetEntityRequest(id="t1"), timeout=TIMEOUT)
    assert read.hlc_physical and read.hlc_node
    # ...the sensor (old client too) writes a newer position meanwhile...
    sensor, call = old.UpdateEntity.with_call(
        store_pb2.UpdateEntityRequest(entity=track("t1", lat=2.0, lon=2.0)), timeout=TIMEOUT)
    assert position(sensor) == (2.0, 2.0)
    assert list(update_result_metadata(call).applied) == [POSITION]
    # ...and the classifier sends back the whole entity it read, plus its threat.
    read.components[THREAT].CopyFrom(pack(entity_pb2.ThreatComponent(level=entity_pb2.THREAT_LEVEL_HIGH)))
    answer, call = old.UpdateEntity.with_call(store_pb2.UpdateEntityRequest(entity=read), timeout=TIMEOUT)

    # The bare entity answers (the kept position in it); the per-key outcome rides in
    # the trailing metadata, where an old client does not look.
    assert position(answer) == (2.0, 2.0)
    keys = update_result_metadata(call)
    assert list(keys.applied) == [THREAT]
    assert list(keys.stale) == [POSITION]
    assert not keys.HasField("entity")
    final = server.store.get("t1")
    assert position(final) == (2.0, 2.0)  # the sensor's newer position is kept
    assert unpack(final, THREAT, entity_pb2.ThreatComponent).level == entity_pb2.THREAT_LEVEL_HIGH


# ---- approvals --------------------------------------------------------------------------

def pending(entity_id: str) -> entity_pb2.Entity:
    approval = entity_pb2.ApprovalComponent(state=entity_pb2.APPROVAL_STATE_PENDING, timeout_seconds=30)
    approval.requested_at.FromSeconds(1_700_000_000)
    return track(entity_id, approval=approval)


@pytest.mark.parametrize("rpc, state", [
    ("ApproveAction", entity_pb2.APPROVAL_STATE_APPROVED),
    ("DenyAction", entity_pb2.APPROVAL_STATE_DENIED),
])
def test_approve_and_deny_decide_a_pending_approval(server: ServerThread, rpc: str, state: int) -> None:
    create(server, pending("t1"))
    requested = server.store.get("t1").versions[APPROVAL]
    request = (store_pb2.ApproveActionRequest if rpc == "ApproveAction" else store_pb2.DenyActionRequest)(entity_id="t1")
    resp = getattr(server.stub, rpc)(request, timeout=TIMEOUT)
    decided = unpack(resp, APPROVAL, entity_pb2.ApprovalComponent)
    assert decided.state == state
    assert decided.timeout_seconds == 30 and decided.requested_at.seconds == 1_700_000_000
    stored = unpack(server.store.get("t1"), APPROVAL, entity_pb2.ApprovalComponent)
    assert stored == decided
    # The decision is a new write that saw (so replaces) the request, wherever it replicates.
    decision = resp.versions[APPROVAL]
    assert decision.counter > requested.counter and not decision.concurrent

    err = rpc_error(getattr(server.stub, rpc), request)  # nothing pending any more
    assert err.code() == C.FAILED_PRECONDITION and "no pending approval on entity 't1'" in err.details()


def test_approval_preconditions(server: ServerThread) -> None:
    stub = server.stub
    create(server, track("plain"))
    err = rpc_error(stub.ApproveAction, store_pb2.ApproveActionRequest(entity_id="plain"))
    assert err.code() == C.FAILED_PRECONDITION and "no pending approval on entity 'plain'" in err.details()
    wrong_type = track("odd")
    wrong_type.components[APPROVAL].CopyFrom(pack(entity_pb2.SourceComponent(sensor_id="s")))
    create(server, wrong_type)
    assert rpc_error(stub.DenyAction, store_pb2.DenyActionRequest(entity_id="odd")).code() == C.FAILED_PRECONDITION
    err = rpc_error(stub.ApproveAction, store_pb2.ApproveActionRequest(entity_id="ghost"))
    assert err.code() == C.NOT_FOUND and "ghost" in err.details()


# ---- WatchEntities ----------------------------------------------------------------------

class Stream:
    """A watch call read on a background thread, so tests can wait with timeouts."""

    def __init__(self, server: ServerThread, **request: Any) -> None:
        self.watchers_before = server.store.stats()["watchers"]
        self.call = server.stub.WatchEntities(store_pb2.WatchEntitiesRequest(**request), timeout=30)
        self.events: list[store_pb2.EntityEvent] = []
        self.error: grpc.RpcError | None = None
        self.done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        wait_for(lambda: server.store.stats()["watchers"] > self.watchers_before or self.done.is_set(),
                 what="watch registered")

    def _read(self) -> None:
        try:
            for ev in self.call:
                self.events.append(ev)
        except grpc.RpcError as err:
            self.error = err
        finally:
            self.done.set()

    def changes(self) -> list[store_pb2.EntityEvent]:
        return [e for e in self.events if e.type != store_pb2.EVENT_TYPE_HEARTBEAT]

    def wait(self, n: int, heartbeats: bool = False) -> list[store_pb2.EntityEvent]:
        pick = (lambda: self.events) if heartbeats else self.changes
        wait_for(lambda: len(pick()) >= n or self.done.is_set(), what=f"{n} events")
        assert len(pick()) >= n, (self.events, self.error)
        return pick()[:n]

    def close(self) -> None:
        self.call.cancel()
        self.done.wait(TIMEOUT)


def test_watch_live_events_with_type_filter(server: ServerThread) -> None:
    stream = Stream(server, type_filter=TRACK)
    server.store.put(make_entity("a1", ASSET))
    server.store.put(track("t1"))
    server.store.put(track("t1", lat=3.0))
    server.store.delete("t1")
    events = stream.wait(3)
    assert [(e.type, e.entity.id) for e in events] == [
        (store_pb2.EVENT_TYPE_CREATED, "t1"), (store_pb2.EVENT_TYPE_UPDATED, "t1"), (store_pb2.EVENT_TYPE_DELETED, "t1")]
    assert position(events[1].entity) == (3.0, 2.0)
    assert all(e.origin_node == "srv" for e in events)
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    stream.close()


def test_watch_include_existing_then_live(server: ServerThread) -> None:
    server.store.put(track("t1"))
    server.store.put(track("t2"))
    server.store.put(make_entity("a1", ASSET))
    stream = Stream(server, include_existing=True, type_filter=TRACK)
    server.store.put(track("t3"))
    events = stream.wait(3)
    assert [(e.type, e.entity.id) for e in events] == [
        (store_pb2.EVENT_TYPE_CREATED, "t1"), (store_pb2.EVENT_TYPE_CREATED, "t2"), (store_pb2.EVENT_TYPE_CREATED, "t3")]
    stream.close()


def test_watch_since_seq_resumes_after_a_disconnect_without_a_gap(server: ServerThread) -> None:
    store = server.store
    first = Stream(server)
    for i in range(3):
        store.put(track(f"t{i}"))
    cursor = first.wait(3)[-1].seq
    first.close()
    wait_for(lambda: store.stats()["watchers"] == 0, what="watcher closed")

    # Changes while nobody watches: one entity twice, one deleted, one new.
    store.put(track("t0", lat=10.0))
    store.put(track("t0", lat=11.0))
    store.delete("t1")
    store.put(track("t9"))

    resumed = Stream(server, since_seq=cursor)
    store.put(track("t10"))  # live, after the catch-up
    events = resumed.wait(4)
    kinds = {e.entity.id: e.type for e in events[:3]}
    assert kinds == {"t0": store_pb2.EVENT_TYPE_UPDATED, "t1": store_pb2.EVENT_TYPE_DELETED,
                     "t9": store_pb2.EVENT_TYPE_UPDATED}
    assert position(next(e.entity for e in events if e.entity.id == "t0")) == (11.0, 2.0)
    assert events[3].entity.id == "t10" and events[3].type == store_pb2.EVENT_TYPE_CREATED
    assert all(e.seq > cursor for e in events)
    resumed.close()


def test_watch_projects_components(server: ServerThread) -> None:
    stream = Stream(server, components=[THREAT])
    server.store.put(track("t1", threat=entity_pb2.ThreatComponent(level=entity_pb2.THREAT_LEVEL_LOW)))
    (event,) = stream.wait(1)
    assert list(event.entity.components) == [THREAT]
    stream.close()


def test_a_stream_past_its_watch_queue_catches_up_to_the_final_state() -> None:
    # A consumer that does not read: HTTP/2 flow control stops the stream, and its queue
    # of 16 events fills; it falls behind, then ends on every entity's last write.
    with running_server(watch_queue=16) as server:
        call = server.stub.WatchEntities(store_pb2.WatchEntitiesRequest(type_filter=TRACK), timeout=30)
        wait_for(lambda: server.store.stats()["watchers"] == 1, what="watch registered")
        # 16 MB in all: past any flow-control window the client may grow, so the
        # stream stops while its queue has 16 slots.
        pad = {"classification": entity_pb2.ClassificationComponent(label="x" * 8000)}
        for round_ in range(10):
            server.store.put_many([track(f"t{i}", lat=float(round_), **pad) for i in range(200)])
        latest: dict[str, float] = {}
        for ev in call:
            latest[ev.entity.id] = position(ev.entity)[0]
            if len(latest) == 200 and set(latest.values()) == {9.0}:
                break
        call.cancel()
        assert server.store.stats()["coalesced"] > 0  # 2,000 changes did not fit in 16 slots


def test_watch_min_interval_coalesces_per_entity(server: ServerThread) -> None:
    stream = Stream(server, min_interval_ms=400)
    for i in range(6):
        server.store.put(track("t1", lat=float(i)))
    wait_for(lambda: stream.changes() and position(stream.changes()[-1].entity) == (5.0, 2.0), what="latest state")
    events = stream.changes()
    assert len(events) < 6
    assert position(events[-1].entity) == (5.0, 2.0)
    stream.close()


def test_watch_min_interval_releases_an_event_held_while_the_stream_is_idle(server: ServerThread) -> None:
    stream = Stream(server, min_interval_ms=100)
    server.store.put(track("t1", lat=0.0))
    stream.wait(1)  # the server is now parked, waiting for the next event
    time.sleep(0.05)  # let it park (a longer park only makes the case harder)
    server.store.put(track("t1", lat=1.0))  # within the interval: held back, then due
    started = time.monotonic()
    second = stream.wait(2)[1]
    assert position(second.entity) == (1.0, 2.0)
    assert time.monotonic() - started < 2.0
    stream.close()


def test_watch_heartbeats_carry_the_store_seq_when_idle(server: ServerThread) -> None:
    server.store.put(track("t0"))
    stream = Stream(server, heartbeat_interval_ms=50)
    first = stream.wait(1, heartbeats=True)[0]
    assert first.type == store_pb2.EVENT_TYPE_HEARTBEAT and first.seq == server.store.seq
    assert not first.HasField("entity")
    server.store.put(track("t1"))
    update = stream.wait(1)[0]
    wait_for(lambda: stream.events[-1].type == store_pb2.EVENT_TYPE_HEARTBEAT
             and stream.events[-1].seq == update.seq, what="heartbeat after the update")
    stream.close()


def test_watch_client_disconnect_closes_the_server_watcher(server: ServerThread) -> None:
    streams = [Stream(server, heartbeat_interval_ms=0), Stream(server, min_interval_ms=100)]
    assert server.store.stats()["watchers"] == 2
    server.store.put(track("t1"))
    streams[0].wait(1)
    streams[0].close()
    wait_for(lambda: server.store.stats()["watchers"] == 1, what="first watcher closed")
    streams[1].close()
    wait_for(lambda: server.store.stats()["watchers"] == 0, what="second watcher closed")
    wait_for(lambda: server.running.server.stats()["watch_streams"] == 0, what="server streams forgotten")
    # The server still serves watches.
    again = Stream(server)
    server.store.put(track("t2"))
    assert again.wait(1)[0].entity.id == "t2"
    again.close()


def test_watch_bad_request_is_invalid_argument(server: ServerThread) -> None:
    call = server.stub.WatchEntities(store_pb2.WatchEntitiesRequest(type_filter=9), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == C.INVALID_ARGUMENT
    assert server.store.stats()["watchers"] == 0


def test_graceful_shutdown_ends_open_watch_streams() -> None:
    with running_server() as server:
        idle = Stream(server)  # parked, waiting for events
        busy = Stream(server, heartbeat_interval_ms=20)
        server.store.put(track("t1"))
        idle.wait(1)
        started = time.monotonic()
        server.call(server.running.stop(grace=5.0))
        assert idle.done.wait(TIMEOUT) and busy.done.wait(TIMEOUT)
        assert time.monotonic() - started < 2.0  # not the 5 s grace: the streams were ended
        for stream in (idle, busy):
            assert stream.error is not None and stream.error.code() == C.UNAVAILABLE
            assert "shutting down" in stream.error.details()
        assert f"since_seq={server.store.seq}" in idle.error.details()
        assert server.store.stats()["watchers"] == 0


# ---- PublishEntities --------------------------------------------------------------------

def test_publish_counts_applied_stale_and_rejected_without_ending_the_stream(server: ServerThread) -> None:
    store = server.store
    old = store.put(track("s1")).entity  # its versions are about to be outdated
    store.put(track("s1", lat=50.0))

    stale = track("s1", lat=-1.0)
    stale.versions[POSITION].CopyFrom(old.versions[POSITION])
    garbage_threat = track("g1")
    garbage_threat.components[THREAT].CopyFrom(any_pb2.Any(type_url=type_url(entity_pb2.ThreatComponent),
                                                           value=b"\xff\xff"))
    unchanged = track("s1", lat=50.0)  # same bytes as stored: accepted, not stale
    entities = [track("p1"), stale, garbage_threat, track(""), track("p2"),
                track("p3", threat=entity_pb2.ThreatComponent(level=9)), unchanged, track("p4")]
    requests = [store_pb2.PublishRequest(entity=e) for e in entities] + [store_pb2.PublishRequest()]

    summary = server.stub.PublishEntities(iter(requests), timeout=TIMEOUT)
    assert (summary.applied, summary.stale, summary.rejected) == (4, 1, 4)
    assert len(summary.errors) == 4
    assert any("threat" in e for e in summary.errors) and any("id is empty" in e for e in summary.errors)
    assert any("no entity" in e for e in summary.errors)
    assert [e.id for e in store.list()] == ["p1", "p2", "p4", "s1"]
    assert position(store.get("s1")) == (50.0, 2.0)


def test_publish_raw_garbage_and_core_refusals_are_counted(server: ServerThread) -> None:
    store = server.store
    store.put(track("t1"))
    # Refused by the core's validation (a non-finite position), inside a batch as alone.
    refused = track("t1", lat=float("nan"))
    raw = server.channel.stream_unary(PUBLISH)  # bytes in, bytes out
    payloads = [
        store_pb2.PublishRequest(entity=track("ok1")).SerializeToString(),
        b"\xff\xff\xff",  # not a PublishRequest
        store_pb2.PublishRequest(entity=refused).SerializeToString(),
        # Field 1 twice: protobuf merges them into one entity.
        store_pb2.PublishRequest(entity=entity_pb2.Entity(id="m1")).SerializeToString()
        + store_pb2.PublishRequest(entity=track("m1")).SerializeToString(),
        store_pb2.PublishRequest(entity=track("ok2")).SerializeToString(),
    ]
    summary = store_pb2.PublishSummary.FromString(raw(iter(payloads), timeout=TIMEOUT))
    assert (summary.applied, summary.stale, summary.rejected) == (3, 0, 2), summary
    assert any("malformed PublishRequest" in e for e in summary.errors)
    assert any("finite" in e for e in summary.errors)
    assert {e.id for e in store.list()} == {"ok1", "ok2", "m1", "t1"}
    assert position(store.get("m1")) == (1.0, 2.0)


def test_publish_batches_in_one_message_count_each_entity(server: ServerThread) -> None:
    """A PublishRequest may carry a batch (`entities`); a bad entity in it fails alone."""
    store = server.store
    bad = track("b2", threat=entity_pb2.ThreatComponent(level=9))
    requests = [
        store_pb2.PublishRequest(entities=[track("b1"), bad, track("b3")]),
        store_pb2.PublishRequest(entity=track("b4"), entities=[track("b5")]),
    ]
    summary = server.stub.PublishEntities(iter(requests), timeout=TIMEOUT)
    assert (summary.applied, summary.stale, summary.rejected) == (4, 0, 1), summary
    assert any("b2" in e and "threat" in e for e in summary.errors)
    assert [e.id for e in store.list()] == ["b1", "b3", "b4", "b5"]


def test_publish_keeps_at_most_ten_error_messages(server: ServerThread) -> None:
    requests = [store_pb2.PublishRequest(entity=track("")) for _ in range(25)] + [
        store_pb2.PublishRequest(entity=track("fine"))]
    summary = server.stub.PublishEntities(iter(requests), timeout=TIMEOUT)
    assert (summary.applied, summary.rejected, len(summary.errors)) == (1, 25, 10)


def test_publish_applies_a_slow_stream_promptly(server: ServerThread) -> None:
    store = server.store

    def slow() -> Iterator[store_pb2.PublishRequest]:
        yield store_pb2.PublishRequest(entity=track("first"))
        # The stream is still open: the first entity must be applied anyway.
        wait_for(lambda: store.stats()["entities"] == 1, what="first entity applied mid-stream")
        yield store_pb2.PublishRequest(entity=track("second"))

    summary = server.stub.PublishEntities(slow(), timeout=TIMEOUT)
    assert summary.applied == 2 and [e.id for e in store.list()] == ["first", "second"]


def test_publish_large_stream_in_chunks(server: ServerThread) -> None:
    n = 3000
    requests = (store_pb2.PublishRequest(entity=track(f"t{i % 1000}", lat=i / 100)) for i in range(n))
    summary = server.stub.PublishEntities(requests, timeout=30)
    assert (summary.applied, summary.stale, summary.rejected) == (n, 0, 0)
    assert server.store.stats()["entities"] == 1000
    assert position(server.store.get("t999")) == (29.99, 2.0)


# ---- the rest of the surface ------------------------------------------------------------

def test_health_reflection_and_stats(server: ServerThread) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", SERVICE_NAME):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status
        assert status == health_pb2.HealthCheckResponse.SERVING

    reflect = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    (answer,) = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                  timeout=TIMEOUT))
    names = {s.name for s in answer.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names

    server.store.put(track("t1"))
    stats = server.stub.GetStats(store_pb2.GetStatsRequest(), timeout=TIMEOUT)
    assert stats.node_id == "srv"
    assert stats.values["entities"] == 1 and stats.values["seq"] == server.store.seq
    assert "node_id" not in stats.values and stats.values["server.watch_streams"] == 0


def test_port_zero_binds_a_free_port_and_a_taken_port_is_an_error(server: ServerThread) -> None:
    assert server.running.port > 0 and server.running.address == f"127.0.0.1:{server.running.port}"
    other = Store(node_id="other")
    try:
        with pytest.raises(OSError, match="cannot listen"):
            server.call(Node(store=other, port=server.running.port).start())
        with pytest.raises(ValueError):
            server.call(Node(store=other, port=70000).start())
    finally:
        other.close()


def test_a_server_checks_its_options_when_made_and_says_how_many_threads_serve() -> None:
    store = Store(node_id="opts")
    try:
        for bad in ({"workers": 0}, {"workers": 1025}, {"workers": 2.0}, {"watch_queue": 0}):
            with pytest.raises(ValueError):
                GrpcServer(store, **bad)
        server = GrpcServer(store)
        assert server.workers is None
        asyncio.run(server.start())
        try:
            # One per CPU this process may use (a CPU quota may lower it further).
            assert 1 <= server.workers <= len(os.sched_getaffinity(0))
        finally:
            asyncio.run(server.stop(0))
    finally:
        store.close()


# ---- structured logs --------------------------------------------------------------------

def test_log_lines_are_key_value_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import json

    from meshstore import logs
    from meshstore.logs import event

    logger = logging.getLogger("meshstore")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        out = io.StringIO()
        logs.setup("debug", stream=out)
        event(logging.getLogger("meshstore.grpc.server"), logging.INFO, "request failed", code="NOT_FOUND",
              error="entity 'x y' not found", n=3)
        line = out.getvalue().strip()
        assert line.startswith("ts=") and " level=info logger=meshstore.grpc.server msg=\"request failed\"" in line
        assert line.endswith("code=NOT_FOUND error=\"entity 'x y' not found\" n=3")

        out = io.StringIO()
        logs.setup("info", json=True, stream=out)  # replaces the previous handler
        event(logging.getLogger("meshstore.node"), logging.WARNING, "listening", address="127.0.0.1:1")
        event(logging.getLogger("meshstore.node"), logging.DEBUG, "hidden")
        (line,) = out.getvalue().strip().splitlines()
        record = json.loads(line)
        assert record["msg"] == "listening" and record["address"] == "127.0.0.1:1" and record["level"] == "warning"
        assert len([h for h in logger.handlers if isinstance(h, logs._Handler)]) == 1

        monkeypatch.setenv(logs.ENV_LEVEL, "WARNING")
        assert logs.parse_level(None) == logging.WARNING
        with pytest.raises(ValueError, match="unknown log level"):
            logs.parse_level("loud")
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
