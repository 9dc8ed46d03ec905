"""Peer discovery: keeps a relay's peers in step with DNS names (``serve --peer-dns``).

``PeerDiscovery(relay, ["meshstore:50051"], static=[...], own=("0.0.0.0", 50051))``
resolves every ``NAME:PORT`` at start and again every ``interval`` seconds, and gives the
relay (``Relay.set_peers``) the static peers plus every address the names resolve to,
less this node's own address (a Kubernetes headless Service, or a compose service
name, lists every node, this one too): links start to addresses that appear and stop
to addresses that go. A name that fails to resolve keeps the addresses it last resolved
to (logged): a DNS hiccup never tears links down. Changes are logged on
``meshstore.mesh.discovery``.

The resolver is injectable: ``async resolver(host, port) -> IP addresses``. The default
(:func:`resolve_dns`) asks the system's resolver (``getaddrinfo``, in a worker thread).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence

from meshstore.logs import event as log_event
from meshstore.mesh.relay import Relay

__all__ = ["PeerDiscovery", "Resolver", "join_address", "resolve_dns", "split_address"]

log = logging.getLogger("meshstore.mesh.discovery")

Resolver = Callable[[str, int], Awaitable[Iterable[str]]]

#: Hosts that mean "every interface of this machine".
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def split_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (``[IPv6]:PORT`` too); ValueError otherwise."""
    host, _, port = address.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host, int(port)


def join_address(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets (as gRPC dials it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve_dns(host: str, port: int) -> list[str]:
    """The IP addresses ``host`` resolves to (the system's resolver, in a worker thread)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def _is_local_ip(ip: str) -> bool:
    """Whether ``ip`` is an address of this machine (binding to it works)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((ip, 0))
        return True
    except (OSError, ValueError):
        return False


class PeerDiscovery:
    """Re-resolves ``names`` (``NAME:PORT`` each) every ``interval`` seconds into
    ``relay``'s peers, with the ``static`` ones (see the module doc). ``own``: the
    ``(host, port)`` this node listens on, so it never becomes its own peer.
    ``await start()`` (resolves once before returning), ``await stop()``."""

    def __init__(self, relay: Relay, names: Sequence[str], *, static: Sequence[str] = (),
                 own: tuple[str, int] | None = None, interval: float = 10.0,
                 resolver: Resolver | None = None, resolve_timeout: float = 5.0) -> None:
        if isinstance(names, str) or not names:
            raise ValueError(f"names must be a non-empty list of 'NAME:PORT' strings, got {names!r}")
        self.names = [(name, *split_address(name)) for name in names]
        if not interval > 0 or not resolve_timeout > 0:
            raise ValueError(f"interval and resolve_timeout must be positive, got {interval!r}, {resolve_timeout!r}")
        self.relay = relay
        self.static = list(static)
        self.own = own
        self.interval = interval
        self.resolve_timeout = resolve_timeout
        self._resolver = resolver or resolve_dns
        #: Per name, the addresses it last resolved to (kept when a resolution fails).
        self.resolved: dict[str, list[str]] = {}
        self.failures = 0
        self._task: asyncio.Task | None = None

    def _is_own(self, ip: str, port: int) -> bool:
        if self.own is None or port != self.own[1]:
            return False
        host = self.own[0]
        if host not in WILDCARD_HOSTS:
            try:
                return ipaddress.ip_address(ip) == ipaddress.ip_address(host.strip("[]"))
            except ValueError:  # a host name: any address of this machine, as a wildcard
                pass
        return _is_local_ip(ip)

    async def refresh(self) -> tuple[list[str], list[str]]:
        """Resolves every name once and updates the relay's peers; returns the (added,
        removed) addresses."""
        for name, host, port in self.names:
            try:
                async with asyncio.timeout(self.resolve_timeout):
                    ips = list(await self._resolver(host, port))
            except Exception as exc:  # noqa: BLE001 - any failure: keep what it resolved to last
                self.failures += 1
                log_event(log, logging.WARNING, "peer name did not resolve", name=name,
                          error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
                          keeping=",".join(self.resolved.get(name, [])) or "none")
                continue
            self.resolved[name] = sorted(join_address(ip, port) for ip in set(ips) if not self._is_own(ip, port))
        found = [a for addresses in self.resolved.values() for a in addresses]
        peers = list(dict.fromkeys(self.static + found))  # static first, each address once
        if set(peers) == set(self.relay.peers):
            return [], []
        added, removed = await self.relay.set_peers(peers)
        log_event(log, logging.INFO, "mesh peers changed", node_id=self.relay.node_id,
                  added=",".join(added) or "none", removed=",".join(removed) or "none", peers=len(peers))
        return added, removed

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.refresh()

    async def start(self) -> PeerDiscovery:
        """Resolves the names once, then again every ``interval`` (idempotent)."""
        if self._task is None:
            await self.refresh()
            self._task = asyncio.create_task(self._run(), name=f"discovery-{self.relay.node_id}")
        return self

    async def stop(self) -> None:
        """Stops re-resolving (the relay keeps its peers). Idempotent."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=5.0)
            self._task = None
