"""The server's edge, against a real ``meshstore serve`` subprocess: request bytes that
do not decode, and shutdown with a publisher mid-stream.

Bytes are sent over a raw channel (no serializer), as a client built on another
protobuf library, or a broken one, would send them.
"""

from __future__ import annotations

import pathlib
import queue
import signal
from collections.abc import Iterator

import grpc
import pytest

from meshstore.components import make_entity
from meshstore.pb import entity_pb2, store_pb2, store_pb2_grpc
from meshstore.grpc.server import SERVICE_NAME
from test_cli import TIMEOUT, Served, wait_for

pytestmark = pytest.mark.timeout(90)

METHODS = store_pb2.DESCRIPTOR.services_by_name["EntityStoreService"].methods
MALFORMED = {
    "truncated": b"\x0a\x05ab",  # field 1, 5 bytes announced, 2 sent
    "bad tag": b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
}
INVALID_UTF8 = b"\x0a\x01\xff"  # for requests whose field 1 is a string
CASES = [(m, name, payload) for m in METHODS for name, payload in MALFORMED.items()] + [
    (m, "invalid utf-8", INVALID_UTF8) for m in METHODS
    if (f := m.input_type.fields_by_number.get(1)) is not None and f.type == f.TYPE_STRING]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server = Served(tmp_path_factory.mktemp("serve"))
    yield server
    assert server.stop() == 0


def raw_call(channel: grpc.Channel, method, payload: bytes):
    """Calls ``method`` with ``payload`` as the request bytes; the answer undecoded."""
    path = f"/{SERVICE_NAME}/{method.name}"
    if method.client_streaming:
        return channel.stream_unary(path)(iter([payload]), timeout=TIMEOUT)
    if method.server_streaming:
        return next(channel.unary_stream(path)(payload, timeout=TIMEOUT))
    return channel.unary_unary(path)(payload, timeout=TIMEOUT)


@pytest.mark.parametrize("method, payload", [(m, p) for m, _, p in CASES], ids=[f"{m.name}-{n}" for m, n, _ in CASES])
def test_undecodable_request_is_invalid_argument(served: Served, method, payload: bytes) -> None:
    before = served.stats()["seq"]
    with grpc.insecure_channel(served.addr) as channel:
        if method.client_streaming:
            # PublishEntities goes on past a bad message: it counts it in the summary.
            summary = store_pb2.PublishSummary.FromString(raw_call(channel, method, payload))
            assert (summary.applied, summary.rejected) == (0, 1)
            details = summary.errors[0]
        else:
            with pytest.raises(grpc.RpcError) as info:
                raw_call(channel, method, payload)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            details = info.value.details()
            assert details == f"malformed request: the bytes are not a {method.input_type.full_name}"
    assert "malformed" in details
    assert "<class" not in details and "Error" not in details.split(":")[0]
    assert served.stats()["seq"] == before  # nothing written


def test_sigterm_drains_an_open_publish_stream(tmp_path: pathlib.Path) -> None:
    server = Served(tmp_path, "--grace", "5")
    outbox: queue.Queue = queue.Queue()
    end = object()

    def requests() -> Iterator[store_pb2.PublishRequest]:
        while (item := outbox.get()) is not end:
            yield item

    channel = grpc.insecure_channel(server.addr)
    try:
        call = store_pb2_grpc.EntityStoreServiceStub(channel).PublishEntities.future(requests(), timeout=30)
        for i in range(3):
            outbox.put(store_pb2.PublishRequest(entity=make_entity(
                f"p{i}", entity_pb2.ENTITY_TYPE_TRACK, position=entity_pb2.PositionComponent(lat=i, lon=i))))
        wait_for(lambda: server.stats()["entities"] == 3, what="three entities applied")
        # The stream is still open (the publisher has more to say) when the server stops.
        assert server.stop(signal.SIGTERM) == 0
        summary = call.result(timeout=TIMEOUT)
        assert (summary.applied, summary.stale, summary.rejected) == (3, 0, 0)
    finally:
        outbox.put(end)
        channel.close()
    log = server.text()
    assert "Traceback" not in log and "CancelledError" not in log, log
    assert "publish stream drained at shutdown" in log and "msg=stopped" in log

