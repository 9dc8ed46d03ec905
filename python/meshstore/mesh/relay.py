"""The sending side of the mesh: push this node's changes to every peer.

``Relay(store, ["host:port", ...])`` runs one task per peer in asyncio. Each task dials
the peer (``grpc.aio`` insecure channel), opens ``mesh.v1.MeshService/Push``, says Hello
(node id, incarnation) and reads the peer's Hello (node id, incarnation, context
summary, resync). Per peer it keeps a watermark: (peer incarnation, acknowledged seq).
A new incarnation (the peer restarted, or this relay never saw it) means a pass over the
whole change log from seq 0 that skips every entity the peer's context summary already
covers, so the peer gets exactly what it lacks; the same incarnation means resuming after
the acknowledged seq; ``resync`` (the peer forgot deletes while this node was away)
means a pass from seq 0 with nothing skipped. It then streams batches of
``store.replica_changes(cursor, limit=batch_size, skip_source=peer)`` (echo
suppression: a peer is never sent the changes that came from it), several batches in
flight, and waits for new changes on a store watcher (a projection on a key no entity
has, so events stay tiny) with a poll of ``store.seq`` as a fallback (a merge that only
changes a dead entity takes a seq but emits no event). A broken stream or an unreachable
peer is retried with exponential backoff and jitter (``backoff_initial`` doubling up to
``backoff_max``), forever: convergence after a partition heals needs no new write and no
restart. A batch not acknowledged within ``ack_timeout`` (or an idle stream whose
heartbeat is not acknowledged) counts as a broken stream.

Budget (``meshstore.mesh.budget``): changes are read into a per-peer pending map (one
latest state per entity; the read cursor advances) and sent by priority (DELETE > HIGH >
MEDIUM > LOW > NONE > position-only) as the peer's token bucket allows; DELETE and HIGH
bypass it. The acknowledged watermark only moves to a seq once no state at or below it
is still pending (``Batch.last_seq`` says so), so a reconnect resends whatever was
deferred. Unlimited (``bandwidth_bps`` 0, the default): states go out in seq order as
read.

Context summaries: a batch that completes everything the store had up to its
``last_seq`` carries the store's context summary as of then; the peer adopts it once
merged, which lets it forget deleted entities without fearing old states.

Deleted entities: every ``collect_interval`` the relay calls
``store.collect_tombstones(min acknowledged seq over the live peers)``. A peer silent
longer than ``peer_expiry`` (the store's option) stops holding collection back; if it
returns, it is asked to resync (its pass to us sends everything, so our answers tell it
what was removed meanwhile).

Peers at runtime: ``await relay.set_peers(addresses)`` (``meshstore.mesh.discovery``
calls it) starts a link to each new address and stops the link to each address no
longer listed; the other links are untouched. A removed peer that ever answered is
*retired*, not forgotten: for deleted entities it counts as a peer gone silent (it holds
collection back until ``peer_expiry``, then owes a resync), until it is listed again or
its node connects from another address (a restarted pod with a new IP), whose link then
takes over what it owed. Otherwise a node away while the others forgot a delete could
come back still holding the entity.

``stats()`` gives, per peer: connected, sent states/bytes/batches, acknowledged seq,
lag (``store.seq - acked``), pending, retries, full syncs... Connection changes are
logged as structured lines on ``meshstore.mesh.relay``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from meshstore.errors import CursorExpiredError
from meshstore.grpc.client import ClientSecurity, open_channel
from meshstore.logs import event as _log_event
from meshstore.mesh.budget import BudgetConfig, Pending, PendingQueue, Priority, priority_of
from meshstore.mesh.protocol import MAX_MESSAGE_BYTES, PUSH_METHOD, summary_entries, summary_of
from meshstore.pb import entity_pb2, mesh_pb2
from meshstore.store import Store
from meshstore.validate import is_number

__all__ = ["ChannelFactory", "Relay", "RelayError", "default_channel"]

log = logging.getLogger("meshstore.mesh.relay")

#: The projection of the relay's wake-up watcher: a key no entity has, so every event
#: carries only the entity's id and versions-free header.
WAKE_COMPONENT = "__meshstore_relay_wake__"

ChannelFactory = Callable[[str], grpc.aio.Channel]


class RelayError(Exception):
    """A peer broke the protocol, or a stream stalled."""


def default_channel(address: str, security: ClientSecurity | None = None) -> grpc.aio.Channel:
    """A channel of its own (no connection shared with other channels), secured per
    ``security`` (the node's: its certificate or token makes it a ``peer``)."""
    return open_channel(address, [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.enable_retries", 0),
    ], security)


def _identity(data: bytes) -> bytes:
    return data


def _entity_id(state: bytes) -> str:
    """An entity's id from its serialized state without decoding it: the core writes
    field 1 (id) first. Falls back to a full decode."""
    try:
        if state[0] == 0x0A:
            length = shift = 0
            i = 1
            while True:
                byte = state[i]
                i += 1
                length |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
            if i + length <= len(state):
                return state[i:i + length].decode()
    except (IndexError, UnicodeDecodeError):
        pass
    return entity_pb2.Entity.FromString(state).id


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _check_peers(peers: Sequence[str]) -> list[str]:
    """``peers`` stripped; ValueError unless a list of distinct non-empty strings."""
    if isinstance(peers, str) or not all(isinstance(p, str) and p.strip() for p in peers):
        raise ValueError(f"peers must be a list of 'host:port' strings, got {peers!r}")
    peers = [p.strip() for p in peers]
    if len(set(peers)) != len(peers):
        raise ValueError(f"peers has duplicates: {peers!r}")
    return peers


def _positive(name: str, value: Any, *, integer: bool = False) -> Any:
    if not is_number(value, integer=integer) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


class _Peer:
    """One peer: its watermark (incarnation, acked seq), budget, pending map, counters."""

    def __init__(self, address: str, budget: BudgetConfig, clock: Callable[[], float]) -> None:
        self.address = address
        self.node_id = ""
        self.incarnation: int | None = None
        self.acked = 0
        self.acked_once = False
        # When the peer last acknowledged a batch (or the relay started), and when its own
        # stream to us last brought a batch: silence both ways beyond peer_expiry stops it
        # holding back the collection of deleted entities.
        self.last_ack = clock()
        self.last_heard = 0.0
        # Collection went ahead without this peer: ask it to resync when it returns. Until
        # its resync has arrived and our answers up to `summary_after` have reached it,
        # our context summary would claim deletes it never received: it is withheld.
        self.owes_resync = False
        self.withhold_summary = False
        self.summary_after = 0
        # Changes up to this seq may predate the peer's current incarnation: send them
        # even if they came from it (its old self), i.e. no echo suppression below it.
        self.no_skip_until = 0
        self.connected = False
        self.pending = PendingQueue()
        self.bucket = budget.bucket(clock)
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.connects = 0
        self.retries = 0
        self.full_syncs = 0
        self.snapshots = 0
        self.sent_states = 0
        self.sent_bytes = 0
        self.batches = 0
        self.empty_batches = 0
        self.heartbeats = 0
        self.peer_rejected = 0
        self.peer_changed = 0
        self.last_error = ""
        self.connected_since = 0.0


@dataclasses.dataclass
class _Session:
    """One open Push stream."""

    cursor: int  # the store seq read up to (into the pending map)
    inflight: deque = dataclasses.field(default_factory=deque)  # (last_seq, sent at)
    sent_mark: int = -1  # last_seq of the latest batch sent
    last_send: float = 0.0
    # The peer's context summary from its Hello: entities it covers are not sent.
    unless_seen: list | None = None
    # (seq, entries): the store's context summary, valid as of that seq.
    summary: tuple[int, list] | None = None


class Relay:
    """Pushes ``store``'s changes to ``peers`` (``host:port`` each). Use inside a
    running event loop: ``await relay.start()`` ... ``await relay.stop()``, or
    ``async with Relay(...) as relay:``."""

    def __init__(
        self,
        store: Store,
        peers: Sequence[str],
        node_id: str | None = None,
        *,
        batch_size: int = 512,
        max_batch_bytes: int = 1 << 20,
        window: int = 8,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        connect_timeout: float = 5.0,
        ack_timeout: float = 15.0,
        heartbeat_interval: float = 5.0,
        poll_interval: float = 0.1,
        collect_interval: float = 1.0,
        stats_interval: float = 30.0,
        collect_tombstones: bool = True,
        bandwidth_bps: float = 0,
        burst_bytes: float = 0,
        peer_expiry: float | None = None,
        channel_factory: ChannelFactory | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(store, Store):
            raise TypeError(f"store must be a meshstore Store, got {type(store).__name__}")
        peers = _check_peers(peers)
        if node_id is not None and node_id != store.node_id:
            raise ValueError(f"relay node_id {node_id!r} must be the store's node_id {store.node_id!r} "
                             f"(peers record it as the source of what this relay sends)")
        self.store = store
        self.node_id = store.node_id
        self.incarnation = store.incarnation
        self.batch_size = _positive("batch_size", batch_size, integer=True)
        self.max_batch_bytes = _positive("max_batch_bytes", max_batch_bytes, integer=True)
        self.window = _positive("window", window, integer=True)
        self.backoff_initial = _positive("backoff_initial", backoff_initial)
        self.backoff_max = max(_positive("backoff_max", backoff_max), backoff_initial)
        self.connect_timeout = _positive("connect_timeout", connect_timeout)
        self.ack_timeout = _positive("ack_timeout", ack_timeout)
        self.heartbeat_interval = _positive("heartbeat_interval", heartbeat_interval)
        self.poll_interval = _positive("poll_interval", poll_interval)
        self.collect_interval = _positive("collect_interval", collect_interval)
        self.stats_interval = _positive("stats_interval", stats_interval)
        self.collect_enabled = bool(collect_tombstones)
        self.peer_expiry = store.options.peer_expiry if peer_expiry is None else _positive("peer_expiry", peer_expiry)
        self.budget = BudgetConfig(bandwidth_bps, burst_bytes)
        self._channel_factory = channel_factory or default_channel
        self._rng = random.Random(seed)
        self._clock = clock
        self._peers = [self._new_peer(address) for address in peers]
        self._retired: list[_Peer] = []  # removed by set_peers, still counted for collection
        self._tasks: list[asyncio.Task] = []  # the relay's own loops (each link has peer.task)
        self._watcher = None
        self._running = False
        self.collect_mark = 0
        self.tombstones_collected = 0

    # ---- lifecycle -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    @property
    def peers(self) -> list[str]:
        return [p.address for p in self._peers]

    def _new_peer(self, address: str) -> _Peer:
        """A link's state. A restarted node resumes each peer where it acknowledged (kept
        in the data dir), as long as the peer is still the same node and incarnation
        (see _session)."""
        peer = _Peer(address, self.budget, self._clock)
        for stored, node_id, incarnation, acked in self.store.peer_acks():
            if stored == address:
                peer.node_id, peer.incarnation, peer.acked = node_id, incarnation, acked
                peer.acked_once = True
        return peer

    def _start_link(self, peer: _Peer) -> None:
        peer.task = asyncio.create_task(self._run_peer(peer), name=f"relay-{self.node_id}->{peer.address}")

    async def set_peers(self, peers: Sequence[str]) -> tuple[list[str], list[str]]:
        """Replaces the peers at runtime: a link starts to each new address (once the relay
        runs), the link to each address no longer listed stops (stream and channel
        closed), the others are untouched. Returns (added, removed) addresses. A removed
        peer that ever answered is retired (see the module doc). ValueError (nothing
        changed) if ``peers`` is not a list of distinct 'host:port' strings."""
        wanted = _check_peers(peers)
        links = {p.address: p for p in self._peers}
        removed = [p for p in self._peers if p.address not in wanted]
        added = []
        for address in wanted:
            if address not in links:
                back = [p for p in self._retired if p.address == address]
                links[address] = back[0] if back else self._new_peer(address)
                self._retired = [p for p in self._retired if p.address != address]
                added.append(links[address])
        self._peers = [links[address] for address in wanted]
        for peer in removed:
            linked = [p for p in self._peers if peer.node_id and p.node_id == peer.node_id]
            if linked:  # its node is linked at another address already
                self._hand_over(peer, linked[0])
            elif peer.node_id:
                self._retired.append(peer)
        stopping = [p.task for p in removed if p.task is not None]
        for task in stopping:  # cancelled before any await: a link never outlives its removal
            task.cancel()
        if self._running:
            for peer in added:
                self._start_link(peer)
        for peer in removed:
            peer.task = None
        if stopping:
            _, stuck = await asyncio.wait(stopping, timeout=5.0)
            for task in stuck:
                _log_event(log, logging.ERROR, "relay task did not stop", node_id=self.node_id, task=task.get_name())
        return [p.address for p in added], [p.address for p in removed]

    async def start(self) -> Relay:
        """Starts the peer tasks (idempotent)."""
        if self._running:
            return self
        self._running = True
        if self.collect_enabled:
            self.store.manage_collection(self)
        self._watcher = self.store.watch(components=[WAKE_COMPONENT])
        self._tasks.append(asyncio.create_task(self._wake_loop(), name=f"relay-wake-{self.node_id}"))
        for peer in self._peers:
            self._start_link(peer)
        if self.collect_enabled:
            self._tasks.append(asyncio.create_task(self._collect_loop(), name=f"relay-collect-{self.node_id}"))
        self._tasks.append(asyncio.create_task(self._stats_loop(), name=f"relay-stats-{self.node_id}"))
        _log_event(log, logging.INFO, "relay started", node_id=self.node_id, peers=",".join(self.peers),
                   incarnation=f"{self.incarnation:016x}", bandwidth_bps=self.budget.bandwidth_bps,
                   burst_bytes=self.budget.burst_bytes)
        return self

    async def stop(self) -> None:
        """Cancels the peer tasks and closes their streams (idempotent)."""
        if not self._running:
            return
        self._running = False
        tasks = self._tasks + [p.task for p in self._peers if p.task is not None]
        for task in tasks:
            task.cancel()
        # Bounded: every loop also checks _running, so a cancellation swallowed by a
        # library's wait_for (a known race on Python 3.11) still ends the task.
        _, stuck = await asyncio.wait(tasks, timeout=5.0)
        for task in stuck:
            _log_event(log, logging.ERROR, "relay task did not stop", node_id=self.node_id, task=task.get_name())
        self._tasks.clear()
        for peer in self._peers:
            peer.task = None
        if self.collect_enabled:
            self.store.manage_collection(None)
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        _log_event(log, logging.INFO, "relay stopped", node_id=self.node_id)

    async def __aenter__(self) -> Relay:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- observability -------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The relay's counters, and per peer (by address) its link's."""
        seq = self.store.seq
        peers = {}
        for p in self._peers:
            peers[p.address] = {
                "node_id": p.node_id,
                "incarnation": p.incarnation or 0,
                "connected": p.connected,
                "connects": p.connects,
                "retries": p.retries,
                "full_syncs": p.full_syncs,
                "snapshots": p.snapshots,
                "sent_states": p.sent_states,
                "sent_bytes": p.sent_bytes,
                "batches": p.batches,
                "empty_batches": p.empty_batches,
                "heartbeats": p.heartbeats,
                "acked_seq": p.acked,
                "acked_once": p.acked_once,
                "silent_s": round(self._silent_s(p), 3),
                "expired": self._expired(p),
                "lag": max(0, seq - p.acked),
                "pending": len(p.pending),
                "coalesced": p.pending.coalesced,
                "deferred": p.pending.deferred,
                "bypassed": p.pending.bypassed,
                "budget_tokens": None if p.bucket.unlimited else round(p.bucket.tokens),
                "peer_rejected": p.peer_rejected,
                "peer_changed": p.peer_changed,
                "last_error": p.last_error,
            }
        return {
            "node_id": self.node_id,
            "incarnation": self.incarnation,
            "running": self._running,
            "seq": seq,
            "bandwidth_bps": self.budget.bandwidth_bps,
            "collect_mark": self.collect_mark,
            "tombstones_collected": self.tombstones_collected,
            "peers": peers,
            "retired": {p.address: p.node_id for p in self._retired},
        }

    def synced(self) -> bool:
        """Every peer connected, caught up (acked == store.seq) and nothing pending."""
        seq = self.store.seq
        return all(p.connected and p.acked >= seq and not p.pending for p in self._peers)

    # ---- tombstones ----------------------------------------------------------------------

    def _silent_s(self, peer: _Peer) -> float:
        return self._clock() - max(peer.last_ack, peer.last_heard)

    def _expired(self, peer: _Peer) -> bool:
        """Away longer than peer_expiry: no link to it, and nothing from it either way (a
        stalled link breaks on ack_timeout and then counts as away)."""
        return not peer.connected and self._silent_s(peer) > self.peer_expiry

    def heard_from(self, node_id: str) -> None:
        """The node ``node_id`` just pushed us a batch: it is alive, whatever our own
        link to it does."""
        now = self._clock()
        for peer in self._peers + self._retired:
            if peer.node_id == node_id:
                peer.last_heard = now

    def collect_once(self) -> int:
        """Forgets deleted entities every live peer acknowledged (expired peers do not
        count, and owe a resync from then on); 0 while a live peer never acked."""
        known = self._peers + self._retired
        live = [p for p in known if not self._expired(p)]
        if not all(p.acked_once for p in live):
            return 0
        mark = min((p.acked for p in live), default=self.store.seq)
        # Run even if the mark has not moved: an adopted summary or the clock passing a
        # delete's stamp can make more entities forgettable (the pass is cheap: it only
        # visits deleted entities).
        collected = self.store.collect_tombstones(mark)
        self.collect_mark = mark
        self.tombstones_collected += collected
        if collected:
            for peer in known:
                if peer not in live and not peer.owes_resync:
                    peer.owes_resync = peer.withhold_summary = True
                    _log_event(log, logging.WARNING, "mesh peer expired", node_id=self.node_id, peer=peer.address,
                               peer_node=peer.node_id or "unknown", silent_s=round(self._silent_s(peer), 1),
                               detail="deletes forgotten without it; it resyncs when it returns")
            _log_event(log, logging.DEBUG, "deleted entities forgotten", node_id=self.node_id, count=collected,
                       acked_seq=mark)
        return collected

    def resynced(self, node_id: str) -> None:
        """The node ``node_id`` has sent us its whole state (a resync pass): once our
        answers, recorded by now, have reached it, it may adopt our summary again."""
        for peer in self._peers + self._retired:
            if peer.node_id == node_id and peer.withhold_summary and not peer.owes_resync:
                peer.withhold_summary = False
                peer.summary_after = self.store.seq
                _log_event(log, logging.INFO, "mesh peer resynced", node_id=self.node_id, peer=peer.address,
                           peer_node=node_id, summary_after=peer.summary_after)

    def owes_resync(self, node_id: str, *, take: bool = True) -> bool:
        """Whether the node ``node_id``, pushing to us, must resync (send us everything):
        collection went ahead without it, or (when ``take``: a new stream's Hello) without
        a peer whose node we never learned. ``take`` clears what it answers for."""
        known = self._peers + self._retired
        if not take:
            return any(p.owes_resync and p.node_id == node_id for p in known)
        owed = [p for p in known if p.owes_resync and p.node_id in (node_id, "")]
        for peer in owed:
            peer.owes_resync = peer.node_id != node_id  # a peer not yet identified stays owed
        return bool(owed)

    async def _collect_loop(self) -> None:
        while self._running:
            await asyncio.sleep(self.collect_interval)
            try:
                self.collect_once()
            except Exception as exc:  # noqa: BLE001 - keep collecting
                _log_event(log, logging.WARNING, "tombstone collection failed", node_id=self.node_id,
                           error=_describe(exc))

    # ---- stats in the log ----------------------------------------------------------------

    _LOGGED_STATS = ("connected", "sent_states", "sent_bytes", "acked_seq", "lag", "pending", "coalesced",
                     "deferred", "retries", "full_syncs")

    def log_stats(self) -> None:
        """One structured line per peer link with its counters."""
        for address, link in self.stats()["peers"].items():
            _log_event(log, logging.INFO, "mesh peer stats", node_id=self.node_id, peer=address,
                       **{key: link[key] for key in self._LOGGED_STATS})

    async def _stats_loop(self) -> None:
        while self._running:
            await asyncio.sleep(self.stats_interval)
            self.log_stats()

    # ---- wake-up -------------------------------------------------------------------------

    async def _wake_loop(self) -> None:
        watcher = self._watcher
        while self._running and not watcher.closed:
            event = await watcher.aget(timeout=1.0)
            if event is None:
                continue
            watcher.drain()
            for peer in self._peers:
                peer.wake.set()

    # ---- one peer ------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.backoff_max, self.backoff_initial * 2 ** min(attempt, 32))
        return self._rng.uniform(ceiling / 2, ceiling)

    async def _run_peer(self, peer: _Peer) -> None:
        attempt = 0
        failing_since: float | None = None
        while self._running:
            peer.connected_since = 0.0
            try:
                await self._session(peer)
                error = "stream ended"
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # the relay is stopping
                error = "stream cancelled (channel closed)"  # grpc.aio cancels calls of a closed channel
            except Exception as exc:  # noqa: BLE001 - any failure: back off and retry
                error = _describe(exc)
            was_connected = peer.connected_since > 0
            peer.last_error = error
            peer.retries += 1
            if was_connected:
                attempt = 0
            delay = self._backoff(attempt)
            attempt += 1
            if was_connected:
                failing_since = None
                _log_event(log, logging.WARNING, "mesh peer disconnected", node_id=self.node_id,
                           peer=peer.address, peer_node=peer.node_id, error=error, acked_seq=peer.acked,
                           lag=max(0, self.store.seq - peer.acked), retry_in_s=round(delay, 3))
            elif failing_since is None:
                failing_since = time.monotonic()
                _log_event(log, logging.WARNING, "mesh peer unreachable", node_id=self.node_id,
                           peer=peer.address, error=error, retry_in_s=round(delay, 3))
            else:
                _log_event(log, logging.DEBUG, "mesh peer still unreachable", node_id=self.node_id,
                           peer=peer.address, error=error, attempt=attempt,
                           down_s=round(time.monotonic() - failing_since, 1), retry_in_s=round(delay, 3))
            await asyncio.sleep(delay)

    async def _session(self, peer: _Peer) -> None:
        """One connection: handshake, then batches and acks until something breaks."""
        channel = self._channel_factory(peer.address)
        call = None
        tasks: list[asyncio.Task] = []
        try:
            call = channel.stream_stream(PUSH_METHOD, request_serializer=_identity,
                                         response_deserializer=mesh_pb2.PushResponse.FromString)()
            hello_out = mesh_pb2.RawPushRequest(hello=mesh_pb2.Hello(
                node_id=self.node_id, incarnation=self.incarnation, seq=self.store.seq)).SerializeToString()
            async with asyncio.timeout(self.connect_timeout):
                await call.write(hello_out)
                reply = await call.read()
            if reply is grpc.aio.EOF:
                raise RelayError("peer closed the stream before its Hello")
            if not reply.HasField("hello") or not reply.hello.node_id:
                raise RelayError("peer did not answer with a Hello")
            hello = reply.hello
            if hello.node_id == self.node_id:
                raise RelayError(f"peer at {peer.address} has this node's own id '{self.node_id}' "
                                 f"(a node listed as its own peer, or two nodes sharing an id)")
            full = hello.resync or hello.incarnation != peer.incarnation or hello.node_id != peer.node_id
            if full:
                if peer.node_id and peer.node_id != hello.node_id:
                    _log_event(log, logging.WARNING, "mesh peer changed node id", node_id=self.node_id,
                               peer=peer.address, was=peer.node_id, now=hello.node_id)
                peer.node_id = hello.node_id
                peer.incarnation = hello.incarnation
                peer.acked = 0
                peer.acked_once = False
                peer.no_skip_until = self.store.seq
                peer.full_syncs += 1
            self._take_over_retired(peer)
            peer.last_ack = self._clock()
            # Skip what the peer has seen, unless it asked for everything.
            unless_seen = None if hello.resync else summary_entries(hello.context)
            session = _Session(cursor=peer.acked, last_send=time.monotonic(), unless_seen=unless_seen)
            peer.pending.clear()
            peer.connected = True
            peer.connects += 1
            peer.connected_since = time.time()
            _log_event(log, logging.INFO, "mesh peer connected", node_id=self.node_id, peer=peer.address,
                       peer_node=hello.node_id, peer_incarnation=f"{hello.incarnation:016x}",
                       sync="resync" if hello.resync else "full" if full else "resume", from_seq=session.cursor,
                       seq=self.store.seq, peer_context_nodes=len(hello.context))
            tasks = [asyncio.create_task(self._read_acks(peer, call, session)),
                     asyncio.create_task(self._write_batches(peer, call, session))]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.cancelled():
                    raise RelayError("stream cancelled (channel closed)")
                if task.exception() is not None:
                    raise task.exception()
        finally:
            peer.connected = False
            if call is not None:
                call.cancel()  # a pending read or write ends at once
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=2.0)
            await channel.close(None)

    def _take_over_retired(self, peer: _Peer) -> None:
        """``peer``'s node was retired under another address (a restarted pod's new IP):
        this link takes its place."""
        for old in [p for p in self._retired if p.node_id == peer.node_id]:
            self._retired.remove(old)
            self._hand_over(old, peer)

    def _hand_over(self, old: _Peer, new: _Peer) -> None:
        """The link ``new`` to the node ``old`` was linked at: from now on only ``new``
        holds collection back for it (from what it acknowledged), owing what ``old`` owed."""
        new.owes_resync = new.owes_resync or old.owes_resync
        new.withhold_summary = new.withhold_summary or old.withhold_summary
        _log_event(log, logging.INFO, "mesh peer moved", node_id=self.node_id, peer_node=new.node_id,
                   was=old.address, now=new.address)

    async def _read_acks(self, peer: _Peer, call: Any, session: _Session) -> None:
        while self._running and not call.done():
            reply = await call.read()
            if reply is grpc.aio.EOF:
                raise RelayError("peer ended the stream")
            if not reply.HasField("ack"):
                raise RelayError("peer sent something other than an Ack after its Hello")
            ack = reply.ack
            if not session.inflight:
                raise RelayError(f"peer acknowledged seq {ack.seq} with no batch in flight")
            expected, _ = session.inflight.popleft()
            if ack.seq != expected:
                raise RelayError(f"peer acknowledged seq {ack.seq}, expected {expected}")
            if ack.seq > peer.acked:
                peer.acked = ack.seq
                self.store.note_peer_ack(peer.address, peer.node_id, peer.incarnation or 0, peer.acked)
            peer.acked_once = True
            peer.last_ack = self._clock()
            peer.peer_changed += ack.changed
            if ack.rejected:
                peer.peer_rejected += ack.rejected
                _log_event(log, logging.WARNING, "mesh peer rejected states", node_id=self.node_id,
                           peer=peer.address, rejected=ack.rejected, error=ack.first_error)
            peer.wake.set()

    async def _write_batches(self, peer: _Peer, call: Any, session: _Session) -> None:
        while self._running and not call.done():
            peer.wake.clear()
            if await self._step(peer, call, session):
                await asyncio.sleep(0)  # let acks and other peers in
                continue
            timeout = self.poll_interval
            if peer.pending and len(session.inflight) < self.window:
                head = peer.pending.peek()
                timeout = min(timeout, max(peer.bucket.delay(head.size), 0.001))
            if session.inflight:
                timeout = min(timeout, max(0.001, session.inflight[0][1] + self.ack_timeout - time.monotonic()))
            try:
                async with asyncio.timeout(timeout):  # unlike wait_for on 3.11, never swallows a cancel
                    await peer.wake.wait()
            except TimeoutError:
                pass

    async def _step(self, peer: _Peer, call: Any, session: _Session) -> bool:
        """Reads new changes and sends what the window and budget allow; True if it made
        progress (so more may be ready at once)."""
        now = time.monotonic()
        if session.inflight and now - session.inflight[0][1] > self.ack_timeout:
            raise RelayError(f"no Ack within {self.ack_timeout}s (seq {session.inflight[0][0]})")
        if len(session.inflight) >= self.window:
            return False
        queue = peer.pending
        if peer.bucket.unlimited and not queue and self.store.seq > session.cursor:
            # Fast path: nothing deferred, no budget: a chunk of changes goes out as read.
            read = self._read(peer, session)
            if read is not None:
                states, last = read
                if sum(map(len, states)) + 16 * len(states) <= self.max_batch_bytes:
                    session.cursor = max(session.cursor, last)
                    await self._send(peer, call, session, states, session.cursor, heartbeat=False)
                    return True
                self._queue(peer, session, states, last)
        read = self._fill(peer, session)
        batch = queue.take(peer.bucket, self.batch_size, self.max_batch_bytes) if queue else []
        mark = session.cursor
        lowest = queue.min_seq()
        if lowest is not None:
            mark = min(mark, lowest - 1)
        heartbeat = now - session.last_send >= self.heartbeat_interval
        if batch or mark > session.sent_mark or heartbeat:
            await self._send(peer, call, session, batch, mark, heartbeat=heartbeat and not batch)
            return True
        return read

    def _read(self, peer: _Peer, session: _Session) -> tuple[list[bytes], int] | None:
        """The next chunk of changes after the cursor (echo-suppressed), or None after
        falling back to a snapshot (the cursor predates a collected tombstone)."""
        skip = None if session.cursor < peer.no_skip_until else peer.node_id
        try:
            states, last = self.store.replica_changes(session.cursor, limit=self.batch_size, skip_source=skip,
                                                      unless_seen=session.unless_seen)
        except CursorExpiredError:
            self._snapshot(peer, session)
            return None
        seq, entries = self.store.context_summary()
        if seq == last:  # the read reached the head: the summary holds as of `last`
            session.summary = (seq, entries)
        return states, last

    def _queue(self, peer: _Peer, session: _Session, states: list[bytes], last: int) -> None:
        """Puts a chunk read after the cursor into the pending map; moves the cursor."""
        # Each state's seq is above the cursor: the cursor + 1 is a safe lower bound for
        # the watermark (the core does not return per-state seqs).
        base = session.cursor + 1
        limited = not peer.bucket.unlimited
        put = peer.pending.put
        for state in states:
            put(_entity_id(state), state, base, priority_of(state) if limited else Priority.NONE)
        session.cursor = max(session.cursor, last)

    def _fill(self, peer: _Peer, session: _Session) -> bool:
        """Reads changes after the cursor into the pending map: one batch's worth when
        unlimited (they go out at once), up to 8 batches' worth with a budget (so a
        DELETE or HIGH behind a backlog is found and coalescing works)."""
        limited = not peer.bucket.unlimited
        reads = 0
        while self.store.seq > session.cursor and reads < 8:
            if not limited and len(peer.pending) >= self.batch_size:
                break
            reads += 1
            read = self._read(peer, session)
            if read is not None:
                self._queue(peer, session, *read)
        return reads > 0

    def _snapshot(self, peer: _Peer, session: _Session) -> None:
        """The cursor predates a forgotten deleted entity (the peer was away while we
        forgot it): start over from seq 0, which always covers every entity we hold (the
        peer's Hello summary still filters what it has)."""
        session.cursor = 0
        peer.no_skip_until = max(peer.no_skip_until, self.store.seq)
        peer.snapshots += 1
        _log_event(log, logging.INFO, "mesh peer resync from snapshot", node_id=self.node_id, peer=peer.address,
                   reason="cursor older than a forgotten delete")

    async def _send(self, peer: _Peer, call: Any, session: _Session, batch: list, mark: int, *,
                    heartbeat: bool) -> None:
        states = [p.state if isinstance(p, Pending) else p for p in batch]
        shareable = not peer.withhold_summary and mark >= peer.summary_after
        context = summary_of(session.summary[1]) if shareable and session.summary and session.summary[0] == mark else ()
        data = mesh_pb2.RawPushRequest(batch=mesh_pb2.RawBatch(states=states, last_seq=mark, context=context)
                                       ).SerializeToString()
        now = time.monotonic()
        session.inflight.append((mark, now))
        session.sent_mark = max(session.sent_mark, mark)
        session.last_send = now
        async with asyncio.timeout(self.ack_timeout):
            await call.write(data)
        peer.sent_bytes += len(data)
        if batch:
            peer.batches += 1
            peer.sent_states += len(batch)
        elif heartbeat:
            peer.heartbeats += 1
        else:
            peer.empty_batches += 1
