"""A mesh of three ``meshstore serve`` processes (each with ``--peer`` to the other two, its
own ``--data-dir``, fixed ports) restarted every way: one at a time with SIGKILL, all with
SIGTERM, all with SIGKILL at once, one kept down while the others take writes, and one
restarted with an empty data dir. After each the picture (ListEntities on every node:
ids, component bytes, versions, siblings) is the same on all nodes and the same as
before, plus what was acknowledged meanwhile.
"""

from __future__ import annotations

import pathlib
import shutil
import signal
import time
from collections.abc import Iterable, Iterator

import grpc
import pytest

from meshstore.pb import entity_pb2, store_pb2
from partition import free_ports
from test_cli import TIMEOUT
from test_crash import Serve, value_entity, write_of

pytestmark = pytest.mark.timeout(120)

NODES = ("a", "b", "c")
PER_NODE = 100  # entities each node creates at first
CONVERGE_S = 30.0
UNCLEAN = "storage opened after an unclean stop; new incarnation"

Picture = dict[str, tuple]


def entity_picture(e: entity_pb2.Entity) -> tuple:
    return (e.type,
            tuple(sorted((k, a.type_url, a.value) for k, a in e.components.items())),
            tuple(sorted((k, v.SerializeToString(deterministic=True)) for k, v in e.versions.items())),
            tuple(s.SerializeToString(deterministic=True) for s in e.siblings))


def describe_diff(a: Picture, b: Picture) -> str:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    differ = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    return f"{len(a)} vs {len(b)} entities; only first: {only_a[:5]}; only second: {only_b[:5]}; differ: {differ[:5]}"


class Mesh:
    """Three serve processes on fixed ports; each node's data dir survives its restarts."""

    def __init__(self, tmp: pathlib.Path) -> None:
        self.tmp = tmp
        self.addr = {n: f"127.0.0.1:{p}" for n, p in zip(NODES, free_ports(len(NODES)))}
        self.dirs = {n: tmp / f"data-{n}" for n in NODES}
        self.nodes: dict[str, Serve] = {}

    def __getitem__(self, name: str) -> Serve:
        return self.nodes[name]

    def start(self, *names: str) -> None:
        for name in names or NODES:
            assert name not in self.nodes, f"{name} is running"
            peers = [arg for other in NODES if other != name for arg in ("--peer", self.addr[other])]
            self.nodes[name] = Serve(self.tmp, "--node-id", f"mesh-{name}", "--port", self.addr[name].rsplit(":")[1],
                                      "--data-dir", str(self.dirs[name]), *peers)

    def stop(self, sig: int, *names: str) -> None:
        """Signals the nodes all at once, then waits for each (SIGTERM: a clean exit)."""
        stopping = [(name, self.nodes.pop(name)) for name in names or list(self.nodes)]
        for _, node in stopping:
            node.channel.close()
            node.proc.send_signal(sig)
        for name, node in stopping:
            try:
                code = node.proc.wait(TIMEOUT)  # no second signal (Served.stop would send one)
            finally:
                if node.proc.poll() is None:
                    node.proc.kill()
                    node.proc.wait()
                node.log.close()
            expected = 0 if sig == signal.SIGTERM else -sig
            assert code == expected, f"{name} exited {code}, expected {expected}: {node.text()[-2000:]}"

    def close(self) -> None:
        for node in self.nodes.values():
            node.channel.close()
            if node.proc.poll() is None:
                node.proc.kill()
            node.proc.wait(TIMEOUT)
            node.log.close()
        self.nodes.clear()

    # ---- reading ------------------------------------------------------------------------

    def picture(self, name: str) -> Picture:
        entities = self[name].stub.ListEntities(store_pb2.ListEntitiesRequest(), timeout=TIMEOUT).entities
        return {e.id: entity_picture(e) for e in entities}

    def stat(self, name: str, key: str) -> float:
        return self[name].stats()[key]

    def sent(self, src: str, dst: str) -> float:
        """States ``src``'s relay sent to ``dst`` (since ``src`` started)."""
        return self.stat(src, f"peer.{self.addr[dst]}.sent_states")

    def converge(self, expected: Picture | None = None, timeout: float = CONVERGE_S) -> Picture:
        """Waits until every running node shows the same picture (``expected`` if given)."""
        deadline = time.monotonic() + timeout
        while True:
            pictures = {}
            try:
                pictures = {n: self.picture(n) for n in self.nodes}
            except grpc.RpcError as exc:
                pictures = {"error": repr(exc)}
            first = next(iter(pictures.values()))
            target = expected if expected is not None else first
            if "error" not in pictures and all(p == target for p in pictures.values()):
                return first
            if time.monotonic() > deadline:
                if "error" in pictures:
                    raise AssertionError(f"not converged within {timeout}s: {pictures['error']}")
                report = "; ".join(f"{n}: {describe_diff(p, target)}" for n, p in pictures.items())
                raise AssertionError(f"pictures not the same within {timeout}s "
                                     f"({'vs expected' if expected is not None else 'vs the first node'}): {report}")
            time.sleep(0.1)

    def settled(self, timeout: float = CONVERGE_S) -> None:
        """Waits until every link between running nodes is connected with nothing unacknowledged."""
        def unsettled() -> list[str]:
            links = []
            for src in self.nodes:
                stats = self[src].stats()
                for dst in self.nodes:
                    peer = f"peer.{self.addr[dst]}"
                    if dst != src and not (stats[f"{peer}.connected"] == 1 and stats[f"{peer}.lag"] == 0
                                           and stats.get(f"{peer}.pending", 0) == 0):
                        links.append(f"{src}->{dst}")
            return links
        deadline = time.monotonic() + timeout
        while links := unsettled():
            assert time.monotonic() < deadline, f"links {links} not settled within {timeout}s"
            time.sleep(0.05)

    def sent_total(self) -> float:
        """States sent over every link of the running nodes (since each started)."""
        return sum(self.sent(src, dst) for src in self.nodes for dst in self.nodes if dst != src)

    # ---- writing ------------------------------------------------------------------------

    def publish(self, name: str, entities: Iterable[entity_pb2.Entity]) -> None:
        entities = list(entities)
        summary = self[name].stub.PublishEntities(iter([store_pb2.PublishRequest(entities=entities)]),
                                                  timeout=TIMEOUT)
        assert (summary.applied, summary.rejected) == (len(entities), 0), summary

    def populate(self) -> Picture:
        """Creates PER_NODE entities on each node, updates and deletes some of the others'
        on each; returns the converged picture, once every link is settled."""
        wid = 1
        for name in NODES:
            self.publish(name, (value_entity(f"{name}-{i}", wid + i) for i in range(PER_NODE)))
            wid += PER_NODE
        self.converge()
        for i, name in enumerate(NODES):
            other = NODES[(i + 1) % len(NODES)]
            stub = self[name].stub
            for k in range(10):
                stub.UpdateEntity(store_pb2.UpdateEntityRequest(entity=value_entity(f"{other}-{k}", wid)),
                                  timeout=TIMEOUT)
                wid += 1
            for k in range(10, 15):
                stub.DeleteEntity(store_pb2.DeleteEntityRequest(id=f"{other}-{k}"), timeout=TIMEOUT)
        picture = self.converge()
        assert len(picture) == len(NODES) * (PER_NODE - 5)
        self.settled()
        return picture


@pytest.fixture
def mesh(tmp_path: pathlib.Path) -> Iterator[Mesh]:
    mesh = Mesh(tmp_path)
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.close()


def values(mesh: Mesh, name: str, ids: Iterable[str]) -> dict[str, int]:
    """The write id each of ``ids`` holds on node ``name``."""
    found = {}
    for entity_id in ids:
        found[entity_id] = write_of(mesh[name].stub.GetEntity(store_pb2.GetEntityRequest(id=entity_id),
                                                              timeout=TIMEOUT))
    return found


# ---- the tests ----------------------------------------------------------------------------

def test_restarts_keep_the_picture(mesh: Mesh) -> None:
    before = mesh.populate()

    # (a) SIGKILL and restart each node, one at a time.
    for name in NODES:
        others = [n for n in NODES if n != name]
        sent = {src: mesh.sent(src, name) for src in others}
        incarnation = mesh.stat(name, "incarnation")
        mesh.stop(signal.SIGKILL, name)
        mesh.start(name)
        assert UNCLEAN in mesh[name].text()
        assert mesh.stat(name, "incarnation") != incarnation
        mesh.converge(before)
        mesh.settled()
        resent = sum(mesh.sent(src, name) - sent[src] for src in others)
        own = sum(mesh.sent(name, dst) for dst in others)
        print(f"(a) {name} killed and restarted: the others sent it {resent:.0f} states, it sent them {own:.0f}")
        assert resent <= 10, f"{name} restarted with its data but was sent {resent} states (it lacked none)"
        assert own <= 10, f"{name} restarted with its data and sent {own} states (the others lacked none)"

    # (b) SIGTERM all three, restart: each resumes its incarnation and dot counter.
    kept = {n: (mesh.stat(n, "incarnation"), mesh.stat(n, "dot_counter")) for n in NODES}
    mesh.stop(signal.SIGTERM)
    mesh.start()
    for name in NODES:
        assert UNCLEAN not in mesh[name].text(), mesh[name].text()
        assert (mesh.stat(name, "incarnation"), mesh.stat(name, "dot_counter")) == kept[name]
    mesh.converge(before)
    mesh.settled()
    resent = mesh.sent_total()
    print(f"(b) all stopped cleanly and restarted: {resent:.0f} states sent")
    assert resent <= 10, f"nodes restarted cleanly with all their data sent each other {resent} states"

    # (c) Writes acknowledged on each node, then SIGKILL all three at once, restart.
    extra = {f"x-{name}-{k}": 10_000 + 100 * i + k for i, name in enumerate(NODES) for k in range(5)}
    for name in NODES:
        mesh.publish(name, (value_entity(key, wid) for key, wid in extra.items() if key.startswith(f"x-{name}-")))
    mesh.stop(signal.SIGKILL)
    mesh.start()
    assert all(UNCLEAN in mesh[n].text() for n in NODES)
    after = mesh.converge()
    assert {k: v for k, v in after.items() if k not in extra} == before, describe_diff(after, before)
    mesh.settled()
    resent = mesh.sent_total()
    print(f"(c) {len(extra)} writes, then all killed at once and restarted: {resent:.0f} states sent")
    assert resent <= 2 * (len(NODES) - 1) * len(extra) + 10, f"{resent} states sent for {len(extra)} writes"
    for name in NODES:
        assert values(mesh, name, extra) == extra


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_node_down_gets_only_what_it_lacks(mesh: Mesh, sig: int) -> None:
    mesh.populate()
    mesh.stop(sig, "c")
    new = {f"n-{name}-{k}": 20_000 + 100 * i + k for i, name in enumerate("ab") for k in range(10)}
    for name in "ab":
        mesh.publish(name, (value_entity(key, wid) for key, wid in new.items() if key.startswith(f"n-{name}-")))
    expected = mesh.converge()  # a and b
    assert set(new) <= set(expected)
    sent = {src: mesh.sent(src, "c") for src in "ab"}
    mesh.start("c")
    mesh.converge(expected)
    mesh.settled()
    assert values(mesh, "c", new) == new
    resent = {src: mesh.sent(src, "c") - sent[src] for src in "ab"}
    total = len(expected)
    print(f"c down ({signal.Signals(sig).name}) for {len(new)} new entities of {total}: sent to c on restart {resent}")
    assert sum(resent.values()) < 2 * len(new) + 10, f"c was sent {resent} states for {len(new)} new entities"
    assert sum(resent.values()) < total / 4, f"c was sent {resent} states: a resync of {total}?"


def test_empty_data_dir_takes_a_new_incarnation(mesh: Mesh) -> None:
    before = mesh.populate()
    incarnation, dot_counter = mesh.stat("c", "incarnation"), mesh.stat("c", "dot_counter")
    mesh.stop(signal.SIGTERM, "c")
    shutil.rmtree(mesh.dirs["c"])
    # Fresh c, first on its own (no peers, another port): its first writes are surely made
    # before it has the old picture back - a new key, and keys its old self and a wrote.
    alone = Serve(mesh.tmp, "--node-id", "mesh-c", "--data-dir", str(mesh.dirs["c"]))
    try:
        fresh_incarnation = alone.stats()["incarnation"]
        assert fresh_incarnation != incarnation
        fresh = {"c-new": 30_001, "c-0": 30_002, "a-20": 30_003}
        summary = alone.stub.PublishEntities(iter([store_pb2.PublishRequest(
            entities=[value_entity(key, wid) for key, wid in fresh.items()])]), timeout=TIMEOUT)
        assert summary.applied == len(fresh)
        assert alone.stats()["entities"] == len(fresh)
    finally:
        assert alone.stop() == 0
    # Back in the mesh (a clean restart: the same new incarnation); at once, another write
    # of a key its old self wrote.
    mesh.start("c")
    assert mesh.stat("c", "incarnation") == fresh_incarnation
    fresh["c-1"] = 30_004
    mesh.publish("c", [value_entity("c-1", 30_004)])
    # Once it has everything back: an update and a delete of keys its old self wrote.
    expected_ids = set(before) | {"c-new"}
    deadline = time.monotonic() + CONVERGE_S
    while set(mesh.picture("c")) != expected_ids:
        assert time.monotonic() < deadline, \
            f"c did not get the old picture back: {describe_diff(mesh.picture('c'), before)}"
        time.sleep(0.1)
    fresh["c-30"] = 30_005
    mesh["c"].stub.UpdateEntity(store_pb2.UpdateEntityRequest(entity=value_entity("c-30", 30_005)), timeout=TIMEOUT)
    mesh["c"].stub.DeleteEntity(store_pb2.DeleteEntityRequest(id="c-31"), timeout=TIMEOUT)
    after = mesh.converge()
    assert set(after) == expected_ids - {"c-31"}, describe_diff(after, before)
    for name in NODES:
        assert values(mesh, name, fresh) == fresh, name
    # The new writes carry the new incarnation's dots, counted from the start again.
    version = mesh["a"].stub.GetEntity(store_pb2.GetEntityRequest(id="c-0"), timeout=TIMEOUT).versions["position"]
    assert (version.node, float(version.incarnation)) == ("mesh-c", fresh_incarnation), version
    assert version.counter <= mesh.stat("c", "dot_counter") < dot_counter, version
    untouched = set(before) - set(fresh) - {"c-31"}
    assert {k: after[k] for k in untouched} == {k: before[k] for k in untouched}
