"""The HTTP API's handlers (aiohttp): JSON reads of a store, approve/deny, the node's
mesh links, and the live feed as Server-Sent Events. The contract is docs/http.md.

    GET  /api/entities[?type=track|asset|geo]   {"seq", "entities": [E, ...]} by id
    GET  /api/entities/{id}                     E + components, versions, siblings
    GET  /api/entities.geojson[?type=]          a FeatureCollection of Point features
    GET  /api/pending                           approvals waiting, oldest request first
    POST /api/entities/{id}/approve | /deny     the decision (meshstore.approvals.decide)
    GET  /api/mesh                              node id, address, seq, peer links, storage
    GET  /api/events[?since=SEQ][&type=]        SSE: snapshot (unless resuming), then batches

Every error is JSON ``{"error": message}`` with its status: 400 bad input, 404 no such
entity or route, 405 wrong method, 409 no pending approval (or a concurrent decision),
413 body too large, 503 a failing disk or shutting down, 500 a bug (logged). Bad input
never changes state.

The SSE feed (:meth:`Api.events`): one ``store.watch(..., min_interval=flush_interval)``
per connection; every event ready is sent in one ``batch`` message (coalesced per
entity), at most every ``flush_interval`` (0.1 s), and never more often than leaves the
feed a third of the loop (the pause after a batch is at least ``FEED_SHARE`` times the
time it took to build, so heavy ingest is not starved: batches come less often and
coalesce more); a big batch yields to the loop every ``YIELD_EVERY`` events; a
``: heartbeat`` comment when idle for
``heartbeat`` seconds (15). The watcher is closed when the client goes away (the
server runs with handler cancellation: the handler is cancelled on disconnect) or the
server stops (:meth:`Api.close_streams`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from meshstore.approvals import decide, pending
from meshstore.errors import CursorExpiredError
from meshstore.http.entity_json import detail, pending_dict, summary
from meshstore.logs import event as log_event
from meshstore.pb import entity_pb2 as pb
from meshstore.security import IDENTITY
from meshstore.store import Store
from meshstore.watcher import Watcher

__all__ = ["MAX_ID_BYTES", "Api", "json_error"]

log = logging.getLogger("meshstore.http")

#: The store's own limit on an entity id (UTF-8 bytes).
MAX_ID_BYTES = 1024
_TYPES = {"track": pb.ENTITY_TYPE_TRACK, "asset": pb.ENTITY_TYPE_ASSET, "geo": pb.ENTITY_TYPE_GEO}
_EVENT_NAMES = {1: "CREATED", 2: "UPDATED", 3: "DELETED"}
_DELETED = 3
#: A batch being built yields to the event loop after this many events.
YIELD_EVERY = 500
#: The pause after a batch is at least this many times the time it took to build (so
#: the feed takes at most a third of the node's loop, however heavy the load).
FEED_SHARE = 2.0
#: ...but a client hears from the feed at least this often (seconds) while things change.
MAX_PAUSE = 2.0


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def json_response(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None,
                  content_type: str = "application/json") -> web.Response:
    return web.Response(text=_dumps(obj), status=status, content_type=content_type, headers=headers)


def json_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """``{"error": message}`` with ``status``."""
    return json_response({"error": " ".join(message.split())}, status, headers)


class BadRequest(Exception):
    """A request refused with 400 (its message is the error)."""


def _type_filter(request: web.Request) -> int:
    """``?type=track|asset|geo`` (any case; missing or empty: every type)."""
    raw = request.query.get("type", "").strip()
    if not raw:
        return 0
    value = _TYPES.get(raw.lower())
    if value is None:
        raise BadRequest(f"unknown type {raw[:64]!r}: expected track, asset or geo")
    return value


def _entity_id(request: web.Request) -> str:
    entity_id = request.match_info["id"]
    size = len(entity_id.encode("utf-8", "surrogatepass"))
    if size > MAX_ID_BYTES:
        raise BadRequest(f"entity id is {size} bytes, over the limit of {MAX_ID_BYTES}")
    return entity_id


def _cursor(request: web.Request) -> int | None:
    """``?since=SEQ``, else the ``Last-Event-ID`` header (what an EventSource sends when
    it reconnects); None: no resume."""
    raw = request.query.get("since")
    what = "since"
    if raw is None:
        raw = request.headers.get("Last-Event-ID")
        what = "Last-Event-ID"
        if raw is not None and not raw.strip():
            return None
    if raw is None:
        return None
    text = raw.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise BadRequest(f"{what} must be a non-negative integer seq, got {raw[:64]!r}")
    return int(text)


@dataclass(eq=False)
class _Stream:
    """An open SSE stream, so that shutdown can end it."""

    watcher: Watcher | None = None
    closed: bool = False


class Api:
    """The handlers over ``store``. ``stats``: the node's ``stats()`` (for ``/api/mesh``;
    None: the store's alone). ``heartbeat``, ``flush_interval``: seconds (SSE)."""

    def __init__(self, store: Store, stats: Callable[[], Mapping[str, Any]] | None = None, *,
                 heartbeat: float = 15.0, flush_interval: float = 0.1) -> None:
        self.store = store
        self.stats_source = stats
        self.heartbeat = heartbeat
        self.flush_interval = flush_interval
        self._streams: set[_Stream] = set()
        self._closing = False
        #: Counters: SSE streams opened, batches and events sent, resets.
        self.counters = {"sse_opened": 0, "sse_batches": 0, "sse_events": 0, "sse_resets": 0, "decisions": 0}

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/entities", self.list_entities, allow_head=False),
            web.get("/api/entities.geojson", self.geojson, allow_head=False),
            web.get("/api/entities/{id}", self.get_entity, allow_head=False),
            web.post("/api/entities/{id}/approve", self.approve),
            web.post("/api/entities/{id}/deny", self.deny),
            web.get("/api/pending", self.pending, allow_head=False),
            web.get("/api/mesh", self.mesh, allow_head=False),
            web.get("/api/events", self.events, allow_head=False),
        ]

    # ---- reads ------------------------------------------------------------------------

    async def list_entities(self, request: web.Request) -> web.Response:
        type_filter = _type_filter(request)
        seq = self.store.seq
        return json_response({"seq": seq, "entities": [summary(e) for e in self.store.list(type_filter)]})

    async def get_entity(self, request: web.Request) -> web.Response:
        entity_id = _entity_id(request)
        entity = self.store.get(entity_id)
        state = self.store.replica_state(entity_id)
        replica = pb.Entity.FromString(state[0]) if state is not None else None
        return json_response(detail(entity, replica))

    async def geojson(self, request: web.Request) -> web.Response:
        type_filter = _type_filter(request)
        features = []
        for entity in self.store.list(type_filter):
            props = summary(entity)
            position = props["position"]
            if position is None:
                continue
            features.append({"type": "Feature", "id": entity.id,
                             "geometry": {"type": "Point", "coordinates": [position["lon"], position["lat"]]},
                             "properties": props})
        return json_response({"type": "FeatureCollection", "features": features},
                             content_type="application/geo+json")

    async def pending(self, request: web.Request) -> web.Response:
        waiting = pending(self.store.list(), time.time())
        return json_response({"pending": [pending_dict(p) for p in waiting]})

    async def mesh(self, request: web.Request) -> web.Response:
        stats = dict(self.stats_source()) if self.stats_source is not None else {}
        store = stats.get("store") or self.store.stats()
        relay = stats.get("relay") or {}
        peers = []
        for address, link in sorted((relay.get("peers") or {}).items()):
            peers.append({"address": address, "node_id": link.get("node_id") or None,
                          **{k: link.get(k) for k in ("connected", "lag", "pending", "deferred", "coalesced",
                                                      "sent_states", "last_error")}})
        storage = None
        if self.store.storage is not None:
            storage = {k: store.get(k) for k in (
                "data_dir", "durability", "committed_seq", "pending_changes", "commits", "commit_ms_p50",
                "commit_ms_p99", "storage_bytes", "loss_window_ms", "storage_error")}
        return json_response({
            "node_id": self.store.node_id,
            "address": stats.get("address"),
            "http_address": stats.get("http_address"),
            "seq": self.store.seq,
            "entities": store.get("entities"),
            "peers": peers,
            "storage": storage,
        })

    # ---- decisions --------------------------------------------------------------------

    async def approve(self, request: web.Request) -> web.Response:
        return await self._decide(request, pb.APPROVAL_STATE_APPROVED)

    async def deny(self, request: web.Request) -> web.Response:
        return await self._decide(request, pb.APPROVAL_STATE_DENIED)

    async def _decide(self, request: web.Request, state: int) -> web.Response:
        await request.read()  # the body is not used; past client_max_size it is a 413
        if self._closing:
            return json_error(503, "server shutting down")
        entity = decide(self.store, _entity_id(request), state, request.get(IDENTITY, ""))
        self.counters["decisions"] += 1
        await self.store.durable()  # answered once durable, as the gRPC writes are
        return json_response(summary(entity))

    # ---- the live feed ----------------------------------------------------------------

    async def events(self, request: web.Request) -> web.StreamResponse:
        type_filter = _type_filter(request)
        since = _cursor(request)
        if self._closing:
            return json_error(503, "server shutting down")
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        })
        stream = _Stream()
        self._streams.add(stream)
        self.counters["sse_opened"] += 1
        try:
            await response.prepare(request)
            await self._feed(response, stream, type_filter, since)
        except ConnectionError:
            pass  # the client went away while we wrote (else aiohttp cancels the handler)
        finally:
            self._streams.discard(stream)
            if stream.watcher is not None:
                stream.watcher.close()
        return response

    async def _start(self, response: web.StreamResponse, stream: _Stream, type_filter: int,
                     since: int | None) -> None:
        """Opens the stream's watcher: from ``since``, else (or when ``since`` cannot be
        resumed: a ``reset`` message first) after a snapshot."""
        store = self.store
        if since is not None:
            if since > store.seq:  # a cursor from another life of the node (e.g. restarted in memory)
                await self._reset(response, f"cursor {since} is ahead of the store's seq {store.seq}")
            else:
                try:
                    stream.watcher = store.watch(type_filter, since_seq=since, min_interval=self.flush_interval)
                    return
                except CursorExpiredError as exc:
                    await self._reset(response, str(exc))
        seq = store.seq  # before the list: a change in between is sent again, never lost
        entities = [summary(e) for e in store.list(type_filter)]
        stream.watcher = store.watch(type_filter, since_seq=seq, min_interval=self.flush_interval)
        await response.write(_message("snapshot", {"seq": seq, "entities": entities}, seq))

    async def _reset(self, response: web.StreamResponse, reason: str) -> None:
        self.counters["sse_resets"] += 1
        await response.write(_message("reset", {"reason": reason, "seq": self.store.seq}))

    async def _feed(self, response: web.StreamResponse, stream: _Stream, type_filter: int,
                    since: int | None) -> None:
        await self._start(response, stream, type_filter, since)
        watcher = stream.watcher
        assert watcher is not None
        if stream.closed:  # the server began stopping meanwhile
            watcher.close()
        loop = asyncio.get_running_loop()
        clock = loop.time
        heartbeat, interval = self.heartbeat, self.flush_interval
        last_write = clock()
        last_flush = -interval
        pause = interval
        while True:
            event = await watcher.aget(max(0.001, heartbeat - (clock() - last_write)))
            if event is None:
                if watcher.closed:
                    return
                if clock() - last_write >= heartbeat:
                    await response.write(b": heartbeat\n\n")
                    last_write = clock()
                continue
            delay = last_flush + pause - clock()
            if delay > 0:  # at most one batch per pause: what arrives meanwhile joins it
                await asyncio.sleep(delay)
            started = clock()
            seq, latest = _coalesce([event, *watcher.drain()])
            body = []
            for i, (entity_id, kind, ev) in enumerate(latest, 1):
                body.append({"type": _EVENT_NAMES.get(kind, str(kind)), "id": entity_id,
                             "entity": None if kind == _DELETED else summary(ev.entity)})
                if i % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # a big batch does not hold the loop (ingest, other clients)
            message = _message("batch", {"seq": seq, "events": body}, seq)
            # The feed takes at most 1 / (1 + FEED_SHARE) of the loop: under a load that
            # makes batches slow to build, they come less often (and coalesce more).
            pause = max(interval, min(MAX_PAUSE, (clock() - started) * FEED_SHARE))
            await response.write(message)
            self.counters["sse_batches"] += 1
            self.counters["sse_events"] += len(body)
            last_flush = last_write = clock()

    def close_streams(self) -> None:
        """Ends every open SSE stream (their handlers return) and refuses new ones."""
        self._closing = True
        for stream in list(self._streams):
            stream.closed = True
            if stream.watcher is not None:
                stream.watcher.close()


def _message(event: str, data: Any, seq: int | None = None) -> bytes:
    """One SSE message (``id`` only for a resumable position)."""
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {event}\ndata: {_dumps(data)}\n\n".encode()


def _coalesce(events: list[Any]) -> tuple[int, list[tuple[str, int, Any]]]:
    """One (id, type, event) per entity of ``events`` (its latest; CREATED stays CREATED
    through later updates), ordered by each entity's latest event, and the cursor after
    them."""
    latest: dict[str, tuple[int, Any]] = {}
    for ev in events:
        kind = ev.type
        before = latest.pop(ev.entity_id, None)
        if before is not None and before[0] == 1 and kind == 2:
            kind = 1
        latest[ev.entity_id] = (kind, ev)  # re-inserted: ordered by each entity's latest event
    return max(ev.seq for ev in events), [(entity_id, kind, ev) for entity_id, (kind, ev) in latest.items()]
