"""Test helper: mesh nodes on loopback that can be cut off and healed.

A :class:`Node` is a Store, a ``meshstore.node.Node`` serving it (store service and
MeshService) on a fixed 127.0.0.1 port, and a Relay pushing to its peers, run here (not
by the served node) so that it outlives partitions: the served node only has it
attached. ``partition()`` isolates it at the network edge, both ways:

- inbound: the served node is stopped (new connections refused, open streams closed);
- outbound: every channel its relay opened is closed and, until ``heal()``, new ones
  are dialed to a port that refuses connections (as an unreachable network would).

``heal()`` serves the same store on the same port again and lets the relay
dial its peers again; the relay itself is never restarted, it reconnects on its own
backoff. ``restart()`` replaces the node by a fresh one (empty store, same node id,
same port, new incarnation). Everything here is bounded in time: ``eventually`` polls
with a timeout.
"""

from __future__ import annotations

import asyncio
import socket
import time
import weakref
from collections.abc import Awaitable, Iterable
from typing import Any

import grpc

from helpers import eventually  # noqa: F401 - re-exported for the mesh tests
from meshstore import Store
from meshstore.mesh.relay import Relay, default_channel
from meshstore.node import Node as ServedNode

#: Relay settings for tests: quick retries and polls, so healing is seen fast.
FAST_RELAY = dict(backoff_initial=0.02, backoff_max=0.25, poll_interval=0.05, collect_interval=0.2,
                  connect_timeout=2.0, ack_timeout=5.0)


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (bound together, so they are distinct)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class _Blackhole:
    """A bound, never-listening socket: connecting to its port is refused."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"

    def close(self) -> None:
        self._sock.close()


class Node:
    """One mesh node on a fixed loopback port (see the module doc)."""

    def __init__(self, name: str, port: int, *, store_options: dict | None = None,
                 relay_options: dict | None = None) -> None:
        self.name = name
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.store_options = dict(store_options or {})
        self.relay_options = {**FAST_RELAY, **(relay_options or {})}
        self.store = Store(node_id=name, **self.store_options)
        self.peers: list[str] = []
        self.server: ServedNode | None = None
        self.relay: Relay | None = None
        self.partitioned = False
        self._blackhole = _Blackhole()
        self._channels: weakref.WeakSet[grpc.aio.Channel] = weakref.WeakSet()

    # ---- the relay's view of the network ---------------------------------------------------

    def _dial(self, address: str) -> grpc.aio.Channel:
        channel = default_channel(self._blackhole.address if self.partitioned else address)
        self._channels.add(channel)
        return channel

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self, peers: Iterable[str] = ()) -> Node:
        self.peers = list(peers)
        self.relay = Relay(self.store, self.peers, channel_factory=self._dial, **self.relay_options)
        self.server = await self._listen()
        await self.relay.start()
        return self

    async def partition(self) -> None:
        """Cuts the node off: server stopped, outbound channels closed and refused."""
        assert not self.partitioned, f"{self.name} is already partitioned"
        self.partitioned = True
        if self.server is not None:
            await self.server.stop(0)
            self.server = None
        for channel in list(self._channels):
            await channel.close(None)

    async def heal(self) -> None:
        """Serves again on the same port (same store); the relay redials by itself."""
        assert self.partitioned, f"{self.name} is not partitioned"
        self.server = await self._listen()
        self.partitioned = False

    async def _listen(self) -> ServedNode:
        # The port was just released by this process: retry briefly if the OS lags.
        deadline = time.monotonic() + 5.0
        while True:
            try:
                node = ServedNode(port=self.port, store=self.store, reflection=False)
                node.attach_relay(self.relay)  # it answers resync requests for the relay
                return await node.start()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def restart(self) -> None:
        """A new process on the same port: fresh empty store (same node id, so a new
        incarnation), fresh relay with the same peers."""
        await self.stop(close_store=True)
        self.store = Store(node_id=self.name, **self.store_options)
        self.partitioned = False
        self.relay = Relay(self.store, self.peers, channel_factory=self._dial, **self.relay_options)
        self.server = await self._listen()
        await self.relay.start()

    async def restart_relay(self) -> None:
        """A fresh relay over the same store (the node's sending side restarted): it
        meets every peer's incarnation for the first time."""
        await self.relay.stop()
        self.relay = Relay(self.store, self.peers, channel_factory=self._dial, **self.relay_options)
        if self.server is not None:
            self.server.attach_relay(self.relay)
        await self.relay.start()

    async def stop(self, close_store: bool = True) -> None:
        if self.relay is not None:
            await self.relay.stop()
            self.relay = None
        if self.server is not None:
            await self.server.stop(0)
            self.server = None
        for channel in list(self._channels):
            await channel.close(None)
        if close_store:
            self.store.close()

    def close(self) -> None:
        self._blackhole.close()

    # ---- observations ----------------------------------------------------------------------

    def peer_stats(self) -> dict[str, dict]:
        return self.relay.stats()["peers"] if self.relay else {}

    def sent(self) -> tuple[int, int]:
        """(states, batches) this node's relay has sent, all peers together."""
        peers = self.peer_stats().values()
        return sum(p["sent_states"] for p in peers), sum(p["batches"] for p in peers)

    def synced(self) -> bool:
        return self.relay is not None and self.relay.synced()


class Cluster:
    """Nodes named ``names`` on fresh loopback ports, wired as ``links`` (pairs of names,
    each link used both ways); default: a full mesh. ``async with Cluster(...)``."""

    def __init__(self, names: Iterable[str], links: Iterable[tuple[str, str]] | None = None, *,
                 store_options: dict | None = None, relay_options: dict | None = None,
                 per_node_relay_options: dict[str, dict] | None = None) -> None:
        names = list(names)
        ports = free_ports(len(names))
        per_node = per_node_relay_options or {}
        self.nodes = {n: Node(n, p, store_options=store_options,
                              relay_options={**(relay_options or {}), **per_node.get(n, {})})
                      for n, p in zip(names, ports, strict=True)}
        if links is None:
            links = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
        self.links = [tuple(link) for link in links]

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def peers_of(self, name: str) -> list[str]:
        out = []
        for a, b in self.links:
            if a == name:
                out.append(self.nodes[b].address)
            elif b == name:
                out.append(self.nodes[a].address)
        return out

    async def start(self) -> Cluster:
        for name, node in self.nodes.items():
            await node.start(self.peers_of(name))
        return self

    async def stop(self) -> None:
        for node in self.nodes.values():
            await node.stop()
            node.close()

    async def __aenter__(self) -> Cluster:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def stores(self) -> list[Store]:
        return [n.store for n in self.nodes.values()]

    def synced(self) -> bool:
        """Every relay connected and caught up with nothing pending."""
        return all(n.synced() for n in self.nodes.values())

    async def settle(self, timeout: float = 15.0) -> None:
        await eventually(self.synced, timeout, what="every relay connected and caught up")


def run(coro: Awaitable[Any], timeout: float = 60.0) -> Any:
    """Runs a test scenario on a fresh event loop, bounded in time."""
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())
