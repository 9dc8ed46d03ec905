"""Peers from DNS (``serve --peer-dns``, ``meshstore.mesh.discovery``): real nodes on
loopback, each on its own 127.0.0.x address and all on one port, as pods behind a
headless Service are, with the names answered by an injected resolver; and one
``meshstore serve --peer-dns localhost:PORT`` subprocess on the system's resolver."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import subprocess
import sys

import grpc
import pytest

from meshstore import Store, StoreOptions
from meshstore.components import make_entity
from meshstore.mesh.discovery import PeerDiscovery
from meshstore.mesh.relay import Relay
from meshstore.node import Node, NodeOptions
from meshstore.pb import entity_pb2 as pb
from meshstore.pb import store_pb2, store_pb2_grpc
from partition import FAST_RELAY, eventually, free_ports, run

pytestmark = pytest.mark.timeout(60)

NAME = "mesh.test"
INTERVAL = 0.05


class FakeDNS:
    """Answers ``NAME`` with the IPs it is set to, or fails while ``failing``."""

    def __init__(self, *ips: str) -> None:
        self.ips = list(ips)
        self.failing = False
        self.calls = 0

    async def resolve(self, host: str, port: int) -> list[str]:
        self.calls += 1
        if host != NAME or self.failing:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.ips)


def track(entity_id: str) -> pb.Entity:
    return make_entity(entity_id, pb.ENTITY_TYPE_TRACK, position=pb.PositionComponent(lat=1, lon=2))


def has(node: Node, entity_id: str) -> bool:
    return any(e.id == entity_id for e in node.store.list())


async def start(name: str, ip: str, port: int, dns: FakeDNS | None = None, data_dir: str | None = None) -> Node:
    """A node on ip:port (in memory, or on ``data_dir``); with ``dns`` it finds its peers
    under NAME."""
    options = NodeOptions(host=ip, port=port, relay_options=FAST_RELAY)
    if dns is not None:
        options = NodeOptions(host=ip, port=port, relay_options=FAST_RELAY, peer_dns=[f"{NAME}:{port}"],
                              peer_dns_interval=INTERVAL, peer_resolver=dns.resolve)
    return await Node(options, store=StoreOptions(node_id=name, path=data_dir)).start()


def one_port() -> int:
    """A port free on 127.0.0.1 to .4 (one port for every node, as in a cluster)."""
    for port in free_ports(20):
        try:
            for ip in ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"):
                with socket.socket() as s:
                    s.bind((ip, port))
            return port
        except OSError:
            continue
    pytest.skip("no port free on 127.0.0.1-4")


def connected(node: Node) -> dict[str, int]:
    """Connected links of the node's relay: address -> times it connected."""
    return {a: p["connects"] for a, p in node.relay.stats()["peers"].items() if p["connected"]}


def test_peers_that_appear_get_a_link_and_the_data_and_peers_that_go_lose_theirs() -> None:
    port = one_port()
    a_ip, b_ip, c_ip = "127.0.0.1", "127.0.0.2", "127.0.0.3"
    dns = FakeDNS(a_ip)  # at first the name lists only a itself

    async def scenario() -> None:
        a = await start("a", a_ip, port, dns)
        b = await start("b", b_ip, port)
        c = await start("c", c_ip, port)
        try:
            assert a.relay.peers == []  # its own address is left out
            a.store.put(track("t1"))

            dns.ips = [a_ip, b_ip, c_ip]
            await eventually(lambda: connected(a).keys() == {f"{b_ip}:{port}", f"{c_ip}:{port}"},
                             what="links to b and c")
            await eventually(lambda: has(b, "t1") and has(c, "t1"), what="t1 replicated to b and c")

            dns.ips = [b_ip, a_ip]  # c goes
            await eventually(lambda: a.relay.peers == [f"{b_ip}:{port}"], what="c removed")
            await eventually(lambda: c.receiver.stats()["streams_open"] == 0, what="the link to c closed")
            a.store.put(track("t2"))
            await eventually(lambda: has(b, "t2"), what="t2 replicated to b")
            assert connected(a) == {f"{b_ip}:{port}": 1}  # b's link was never restarted
            await asyncio.sleep(0.3)
            assert not has(c, "t2")

            dns.ips = [a_ip, b_ip, c_ip]  # c is back: a link again, and what it missed
            await eventually(lambda: has(c, "t2"), what="t2 replicated to c once it is back")
            assert a.relay.stats()["retired"] == {}
        finally:
            for node in (a, b, c):
                await node.stop(0)
    run(scenario())


def test_a_peer_that_left_holds_back_forgetting_a_delete_until_it_is_back_and_has_it() -> None:
    """A node gone from DNS (a pod away) may come back with its data: a delete made
    meanwhile must reach it, so it is not forgotten before."""
    port = one_port()
    dns = FakeDNS("127.0.0.1", "127.0.0.2", "127.0.0.3")

    async def scenario() -> None:
        a = await start("a", "127.0.0.1", port, dns)
        b = await start("b", "127.0.0.2", port)
        c = await start("c", "127.0.0.3", port)
        try:
            a.store.put(track("t1"))
            await eventually(lambda: has(b, "t1") and has(c, "t1"), what="t1 everywhere")
            dns.ips = ["127.0.0.1", "127.0.0.2"]  # c leaves
            await eventually(lambda: list(a.relay.stats()["retired"].values()) == ["c"], what="c retired")
            a.store.delete("t1")
            await eventually(lambda: not has(b, "t1"), what="the delete reached b")
            await eventually(lambda: a.relay.stats()["peers"][f"127.0.0.2:{port}"]["lag"] == 0, what="b acked")
            await asyncio.sleep(5 * FAST_RELAY["collect_interval"])
            assert a.store.stats()["tombstones"] == 1  # c has not seen the delete: kept for it
            dns.ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]  # c is back
            await eventually(lambda: not has(c, "t1"), what="the delete reached c")
            await eventually(lambda: a.store.stats()["tombstones"] == 0, what="the delete forgotten once c has it")
        finally:
            for node in (a, b, c):
                await node.stop(0)
    run(scenario())


def test_a_node_back_at_a_new_address_takes_the_place_of_its_old_one(tmp_path) -> None:
    """A pod rescheduled: same node id and data dir, a new IP. The delete it missed
    reaches it there, and the node it missed it from forgets the delete once it has."""
    port = one_port()
    dns = FakeDNS("127.0.0.1", "127.0.0.2", "127.0.0.3")

    async def scenario() -> None:
        a = await start("a", "127.0.0.1", port, dns)
        b = await start("b", "127.0.0.2", port)
        c = await start("c", "127.0.0.3", port, data_dir=str(tmp_path / "c"))
        try:
            a.store.put(track("t1"))
            await eventually(lambda: has(b, "t1") and has(c, "t1"), what="t1 everywhere")
            await c.stop()
            dns.ips = ["127.0.0.1", "127.0.0.2"]
            await eventually(lambda: a.relay.stats()["retired"] == {f"127.0.0.3:{port}": "c"}, what="c retired")
            a.store.delete("t1")
            await eventually(lambda: not has(b, "t1"), what="the delete reached b")
            c = await start("c", "127.0.0.4", port, data_dir=str(tmp_path / "c"))
            assert has(c, "t1")  # its data dir still has it
            dns.ips = ["127.0.0.1", "127.0.0.2", "127.0.0.4"]
            await eventually(lambda: not has(c, "t1"), what="the delete reached c at its new address")
            assert a.relay.stats()["retired"] == {}
            await eventually(lambda: a.store.stats()["tombstones"] == 0, what="the delete forgotten")
        finally:
            for node in (a, b, c):
                await node.stop(0)
    run(scenario())


def test_a_failed_resolution_keeps_the_peers_found_last(caplog: pytest.LogCaptureFixture) -> None:
    port = one_port()
    dns = FakeDNS("127.0.0.1", "127.0.0.2")

    async def scenario() -> None:
        a = await start("a", "127.0.0.1", port, dns)
        b = await start("b", "127.0.0.2", port)
        try:
            await eventually(lambda: connected(a), what="link to b")
            dns.failing = True
            calls = dns.calls
            await eventually(lambda: dns.calls >= calls + 5, what="resolutions while failing")
            assert a.relay.peers == [f"127.0.0.2:{port}"] and connected(a) == {f"127.0.0.2:{port}": 1}
            assert a.discovery.failures >= 5
            a.store.put(track("t1"))
            await eventually(lambda: has(b, "t1"), what="t1 replicated while the name fails")
            dns.failing = False
            dns.ips = ["127.0.0.1"]  # resolving again: b is gone
            await eventually(lambda: a.relay.peers == [], what="b removed once the name resolves")
        finally:
            await a.stop(0)
            await b.stop(0)
    with caplog.at_level(logging.INFO, logger="meshstore.mesh.discovery"):
        run(scenario())
    logged = [(r.getMessage(), r.fields) for r in caplog.records if r.name == "meshstore.mesh.discovery"]
    changes = [(f["added"], f["removed"]) for msg, f in logged if msg == "mesh peers changed"]
    assert changes == [(f"127.0.0.2:{port}", "none"), ("none", f"127.0.0.2:{port}")]
    failures = [f for msg, f in logged if msg == "peer name did not resolve"]
    assert failures and all(f["keeping"] == f"127.0.0.2:{port}" and "gaierror" in f["error"] for f in failures)


def test_static_peers_and_names_combine_and_this_node_is_never_its_own_peer() -> None:
    async def scenario() -> None:
        store = Store(node_id="solo")
        relay = Relay(store, [])
        try:
            async def resolve(host: str, port: int) -> list[str]:
                # 127.0.0.1 is this machine (wildcard listener): left out; 192.0.2.1 is not.
                return ["127.0.0.1", "192.0.2.1"] if host == "all" else ["192.0.2.2"]

            discovery = PeerDiscovery(relay, ["all:7000", "other:7001"], static=["10.1.1.1:7000"],
                                      own=("0.0.0.0", 7000), resolver=resolve)
            assert await discovery.refresh() == (["10.1.1.1:7000", "192.0.2.1:7000", "192.0.2.2:7001"], [])
            assert relay.peers == ["10.1.1.1:7000", "192.0.2.1:7000", "192.0.2.2:7001"]
            assert await discovery.refresh() == ([], [])  # nothing changed: the relay is left alone

            listening_on_loopback = PeerDiscovery(relay, ["all:7000"], own=("127.0.0.1", 7000), resolver=resolve)
            await listening_on_loopback.refresh()
            assert relay.peers == ["192.0.2.1:7000"]
            with pytest.raises(ValueError, match="HOST:PORT"):
                PeerDiscovery(relay, ["no-port"])
            with pytest.raises(ValueError, match="duplicates"):
                await relay.set_peers(["10.1.1.1:7000", "10.1.1.1:7000"])
            assert relay.peers == ["192.0.2.1:7000"]  # unchanged
        finally:
            await relay.stop()
            store.close()
    run(scenario())


def test_serve_with_peer_dns_finds_its_peer_through_the_system_resolver(tmp_path) -> None:
    """``meshstore serve --peer-dns localhost:PORT``: real DNS (the hosts file), a real
    process; a write to it reaches the node listening at PORT."""
    (port,) = free_ports(1)

    async def scenario() -> None:
        async with Node(port=port, store=StoreOptions(node_id="receiver")) as receiver:
            log_path = tmp_path / "serve.log"
            with log_path.open("w") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "meshstore.cli", "serve", "--port", "0", "--in-memory", "--node-id",
                     "finder", "--peer-dns", f"localhost:{port}", "--peer-dns-interval", "0.2"],
                    stdout=subprocess.DEVNULL, stderr=log, text=True)
            try:
                match = await eventually(lambda: re.search(r"msg=listening address=(\S+)", log_path.read_text())
                                         or proc.poll() is not None, what="serve listening")
                assert match is not True, log_path.read_text()
                async with grpc.aio.insecure_channel(match.group(1)) as channel:
                    await store_pb2_grpc.EntityStoreServiceStub(channel).CreateEntity(
                        store_pb2.CreateEntityRequest(entity=track("from-finder")), timeout=5)
                await eventually(lambda: has(receiver, "from-finder"), what="the write replicated")
                assert f"127.0.0.1:{port}" in log_path.read_text()  # the discovered peer, logged
            finally:
                proc.terminate()
                assert await asyncio.to_thread(proc.wait, 10) == 0
    run(scenario())


def test_bad_peer_dns_is_one_line_of_error_and_exit_2() -> None:
    for args in (["--peer-dns", "no-port"], ["--peer-dns", "name:70000"], ["--peer-dns-interval", "0"]):
        result = subprocess.run([sys.executable, "-m", "meshstore.cli", "serve", "--in-memory", "--port", "0", *args],
                                capture_output=True, text=True, timeout=20)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, lines
        assert "--peer-dns" in lines[0]
