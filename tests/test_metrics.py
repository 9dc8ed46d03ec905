"""Prometheus /metrics (``meshstore.metrics``): real nodes on 127.0.0.1 (in-process, port
0, and ``meshstore serve --metrics-port`` as a subprocess), work done over gRPC, a watch
and a mesh pair, /metrics scraped over HTTP and parsed with prometheus_client's parser;
the values follow the work, and agree with GetStats."""

from __future__ import annotations

import re
import socket
import urllib.request

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshstore import Store, StoreOptions
from meshstore.components import make_entity
from meshstore.metrics import HTTP, MESH, PEER, SERVER, STORE, Stat
from meshstore.node import Node, NodeOptions
from meshstore.pb import entity_pb2 as pb
from meshstore.pb import store_pb2, store_pb2_grpc
from partition import FAST_RELAY, eventually, run
from test_cli import TIMEOUT, Served, assert_one_line_error, cli_env
from test_cli import run as run_cli

pytestmark = pytest.mark.timeout(90)

STORE_SERVICE = "store.v1.EntityStoreService"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}; have {sorted(n for n, _ in samples if n.startswith(name))}"
    return samples[key]


def info_labels(samples: Samples, name: str, **match: str) -> dict[str, str]:
    """The labels of the one sample of info metric ``name`` with the ``match`` labels."""
    found = [dict(labels) for n, labels in samples if n == name and match.items() <= dict(labels).items()]
    assert len(found) == 1, (name, match, found)
    return found[0]


async def scrape(address: str) -> Samples:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{address}/metrics") as response:
            assert response.status == 200
            assert response.content_type == "text/plain"
            return parse(await response.text())


async def get_stats(address: str) -> dict[str, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        response = await store_pb2_grpc.EntityStoreServiceStub(channel).GetStats(
            store_pb2.GetStatsRequest(), timeout=TIMEOUT)
    return dict(response.values)


def track(entity_id: str, lat: float = 1.0) -> pb.Entity:
    return make_entity(entity_id, pb.ENTITY_TYPE_TRACK, position=pb.PositionComponent(lat=lat, lon=2))


def test_metrics_follow_the_work_done() -> None:
    async def scenario() -> None:
        async with Node(NodeOptions(metrics_port=0), store=StoreOptions(node_id="m")) as node:
            assert node.metrics_address is not None and node.metrics_address.startswith("127.0.0.1:")
            before = await scrape(node.metrics_address)
            assert value(before, "meshstore_writes_total") == 0
            assert value(before, "meshstore_node_info", node_id="m", incarnation=str(node.store.incarnation),
                         durability="memory") == 1
            async with grpc.aio.insecure_channel(node.address) as channel:
                stub = store_pb2_grpc.EntityStoreServiceStub(channel)
                created = [await stub.CreateEntity(store_pb2.CreateEntityRequest(entity=track(f"t{i}")))
                           for i in range(3)]
                for i in range(4):
                    await stub.UpdateEntity(store_pb2.UpdateEntityRequest(entity=track("t0", lat=10 + i)))
                stale = track("t1", lat=-1)  # based on the version read at create: t1 was updated since
                await stub.UpdateEntity(store_pb2.UpdateEntityRequest(entity=track("t1", lat=5)))
                stale.versions["position"].CopyFrom(created[1].versions["position"])
                await stub.UpdateEntity(store_pb2.UpdateEntityRequest(entity=stale))
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.GetEntity(store_pb2.GetEntityRequest(id="missing"))
            watcher = node.store.watch()
            try:
                after = await scrape(node.metrics_address)
            finally:
                watcher.close()
            closed = await scrape(node.metrics_address)

        assert value(after, "meshstore_writes_total") == 3 + 4 + 2
        assert value(after, "meshstore_stale_keys_total") == 1
        # 3 created, t0 moved 4 times and t1 once; the stale write changed nothing.
        assert value(after, "meshstore_events_total", kind="created") == 3
        assert value(after, "meshstore_events_total", kind="updated") == 5
        assert value(after, "meshstore_events_total", kind="deleted") == 0
        assert value(after, "meshstore_watch_queued_events") == 0
        assert value(after, "meshstore_entities") == 3
        assert value(after, "meshstore_seq") == node.store.seq
        update = dict(service=STORE_SERVICE, method="UpdateEntity")
        assert value(after, "meshstore_grpc_calls_total", **update) == 6
        assert value(after, "meshstore_grpc_latency_seconds_count", **update) == 6
        assert value(after, "meshstore_grpc_latency_seconds_bucket", le="+Inf", **update) == 6
        assert value(after, "meshstore_grpc_latency_seconds_sum", **update) > 0
        buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in after.items()
                         if name == "meshstore_grpc_latency_seconds_bucket" and ("method", "UpdateEntity") in labels)
        assert len(buckets) == 13 and all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))  # cumulative
        assert value(after, "meshstore_grpc_calls_total", service=STORE_SERVICE, method="CreateEntity") == 3
        assert value(after, "meshstore_grpc_failed_calls_total", service=STORE_SERVICE, method="GetEntity",
                     code="NOT_FOUND") == 1
        assert not any(n == "meshstore_grpc_failed_calls_total" and ("method", "UpdateEntity") in labels
                       for n, labels in after)
        assert value(after, "meshstore_watchers") == value(before, "meshstore_watchers") + 1
        assert value(closed, "meshstore_watchers") == value(before, "meshstore_watchers")
        assert not any(name.startswith(("meshstore_peer_", "meshstore_storage_", "meshstore_http_"))
                       for name, _ in after)  # no relay, no data dir, no HTTP side
    run(scenario())


def metric_of(key: str) -> tuple[Stat, dict[str, str]]:
    """The metric (and labels) exporting GetStats' ``key``; KeyError if it has none."""
    section, _, rest = key.partition(".")
    if section == "peer":  # peer.<address>.<counter>
        address, _, counter = rest.rpartition(".")
        return PEER[counter], {"peer": address}
    tables = {"server": SERVER, "mesh": MESH, "http": HTTP}
    if section in tables:
        return tables[section][rest], {}
    return STORE[key], {}


def between(got: float, first: float, last: float) -> bool:
    """``got`` lies between two readings (to float rounding: ms scaled to seconds and back)."""
    slack = 1e-9 * max(abs(first), abs(last), 1.0)
    return min(first, last) - slack <= got <= max(first, last) + slack


#: GetStats values that change on their own between two reads.
CLOCKS = ("server.uptime_seconds", "last_commit_age_s", ".silent_s")


def test_get_stats_and_metrics_agree(tmp_path) -> None:
    """Every number GetStats answers is on /metrics with the same value (a node with a data
    dir, an HTTP side, a relay and a peer pushing to it: every section present)."""
    async def scenario() -> None:
        async with Node(store=StoreOptions(node_id="b")) as b:
            options = NodeOptions(metrics_port=0, http_port=0, peers=[b.address], relay_options=FAST_RELAY)
            async with Node(options, store=StoreOptions(node_id="a", path=tmp_path)) as a:
                await b.start_relay([a.address])
                for i in range(5):
                    a.store.put(track(f"a{i}"))
                b.store.put(track("b0"))
                await eventually(lambda: a.store.stats()["entities"] == 6 and b.store.stats()["entities"] == 6
                                 and a.relay.synced() and b.relay.synced(), what="both synced")
                first = await get_stats(a.address)
                samples = await scrape(a.metrics_address)
                last = await get_stats(a.address)

        assert any(k.startswith("peer.") for k in first) and any(k.startswith("http.") for k in first)
        assert "commits" in first and "mesh.streams_open" in first
        commits = value(samples, "meshstore_storage_commit_latency_seconds_count")
        assert between(commits, first["commits"], last["commits"])  # every commit timed
        p99 = value(samples, "meshstore_storage_recent_commit_latency_seconds", quantile="0.99")
        assert between(p99 * 1000, first["commit_ms_p99"], last["commit_ms_p99"])  # ms become seconds
        for key in first:
            # Incarnations are labels of the info metrics (exact; GetStats' doubles round them).
            if key == "incarnation":
                assert float(info_labels(samples, "meshstore_node_info")["incarnation"]) == first[key]
                continue
            if key.startswith("peer.") and key.endswith(".incarnation"):
                address = key.removeprefix("peer.").removesuffix(".incarnation")
                labels = info_labels(samples, "meshstore_peer_info", peer=address)
                assert float(labels["incarnation"]) == first[key]
                continue
            if key == "commit_latency_sum_s":  # the histogram's sum (its buckets are not in GetStats)
                got = value(samples, "meshstore_storage_commit_latency_seconds_sum")
                assert between(got, first[key], last[key]) and got > 0
                continue
            stat, labels = metric_of(key)
            got = value(samples, stat.name, **labels, **dict(stat.labels)) / stat.scale
            if any(clock in key for clock in CLOCKS):
                assert 0 <= got <= max(first[key], last[key]) + 1.0, key
            else:  # read between the two GetStats calls
                assert between(got, first[key], last[key]), (key, first[key], got, last[key])
    run(scenario())


def test_peer_link_metrics_follow_the_peer() -> None:
    """The sender's link: connected 1, states and bytes sent, lag 0 once acknowledged; the
    receiver counts what it got per sending node; the link goes to 0 when the peer stops."""
    async def scenario() -> None:
        b = await Node(NodeOptions(metrics_port=0), store=StoreOptions(node_id="b")).start()
        try:
            options = NodeOptions(metrics_port=0, peers=[b.address], relay_options=FAST_RELAY)
            async with Node(options, store=StoreOptions(node_id="a")) as a:
                for i in range(4):
                    a.store.put(track(f"t{i}"))
                await eventually(lambda: a.relay.synced(), what="b acknowledged everything")
                sent = await scrape(a.metrics_address)
                got = await scrape(b.metrics_address)
                peer = {"peer": b.address}
                assert value(sent, "meshstore_peer_connected", **peer) == 1
                assert value(sent, "meshstore_peer_sent_states_total", **peer) == 4
                assert value(sent, "meshstore_peer_sent_bytes_total", **peer) > 0
                assert value(sent, "meshstore_peer_lag", **peer) == 0
                assert value(sent, "meshstore_peer_acked_seq", **peer) == a.store.seq
                assert value(sent, "meshstore_peer_budget_deferrals_total", **peer) == 0  # unlimited budget
                assert value(sent, "meshstore_peer_info", node_id="b", incarnation=str(b.store.incarnation),
                             **peer) == 1
                assert value(got, "meshstore_mesh_received_states_total", sender="a") == 4
                assert value(got, "meshstore_mesh_received_open_streams", sender="a") == 1
                assert value(got, "meshstore_merges_changed_total") == 4
                assert value(got, "meshstore_mesh_streams_open") == 1

                await b.stop()
                a.store.put(track("after"))

                async def link_down() -> bool:
                    samples = await scrape(a.metrics_address)
                    return (value(samples, "meshstore_peer_connected", **peer) == 0
                            and value(samples, "meshstore_peer_lag", **peer) >= 1
                            and value(samples, "meshstore_peer_retries_total", **peer) >= 1)

                await eventually(link_down, what="the link to the stopped peer shows down")
        finally:
            await b.stop()
    run(scenario())


def test_the_metrics_server_stops_with_the_node_and_a_taken_port_fails_the_start(tmp_path) -> None:
    async def scenario() -> None:
        node = await Node(NodeOptions(metrics_port=0)).start()
        address = node.metrics_address
        await scrape(address)
        await node.stop()
        with pytest.raises(aiohttp.ClientConnectionError):
            await scrape(address)

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            failed = Node(NodeOptions(metrics_port=port, http_port=0), store=StoreOptions(path=tmp_path))
            with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port} \\(metrics\\)"):
                await failed.start()
            assert not failed.running and failed.http is not None and not failed.http.running
        Store(StoreOptions(path=tmp_path)).close()  # the failed node closed its data dir (unlocked)
    run(scenario())


def test_metrics_options_are_checked() -> None:
    for bad in ({"metrics_port": 70000}, {"metrics_port": -1}, {"metrics_port": "9100"}):
        with pytest.raises(ValueError, match="metrics_port"):
            NodeOptions(**bad)
    with pytest.raises(TypeError, match="metrics_host"):
        NodeOptions(metrics_host=9100)


def test_serve_metrics_port(tmp_path) -> None:
    """``meshstore serve --metrics-port 0`` logs where /metrics listens; a scrape counts
    the writes made over gRPC; --metrics-host defaults to --host."""
    served = Served(tmp_path, "--in-memory", "--metrics-port", "0")
    try:
        address = re.search(r"msg=listening .* metrics=(\S+)", served.text()).group(1)
        assert address.startswith("127.0.0.1:")
        for i in range(2):
            served.stub.CreateEntity(store_pb2.CreateEntityRequest(entity=track(f"t{i}")), timeout=TIMEOUT)
        served.stub.UpdateEntity(store_pb2.UpdateEntityRequest(entity=track("t0", lat=3)), timeout=TIMEOUT)
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=TIMEOUT) as response:
            samples = parse(response.read().decode())
        assert value(samples, "meshstore_writes_total") == served.stats()["writes"] == 3
        assert value(samples, "meshstore_grpc_calls_total", service=STORE_SERVICE, method="UpdateEntity") == 1
    finally:
        assert served.stop() == 0


def test_serve_with_a_taken_metrics_port_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--in-memory", "--port", "0", env=cli_env(MESHSTORE_METRICS_PORT=str(port)))
    assert_one_line_error(result, 1, f"cannot listen on 127.0.0.1:{port} (metrics)")
