"""Bad input: each is refused with an error that says what is wrong, and the store is
left exactly as it was (live entities, counts and seq)."""

from __future__ import annotations

import pytest

from conftest import (
    classification, latlon, make_entity, pack, position, push, raw_component, snapshot, source,
    threat, track, type_url,
)
from meshstore import ClockSkewError, InvalidEntityError, MeshstoreError, NotFoundError, Store
from meshstore.pb import entity_pb2 as pb

THREAT_URL = type_url(pb.ThreatComponent)
NAN, INF = float("nan"), float("inf")


@pytest.fixture
def seeded(store) -> Store:
    """A store holding one track, so "unchanged" is checked against real content."""
    store.put(track("t1", position=position(1, 2), threat=threat(pb.THREAT_LEVEL_LOW)))
    return store


def refused(store: Store, call, error: type[Exception], *words: str) -> Exception:
    """Runs ``call``, expecting ``error`` whose message names every word; checks the
    store did not change. Returns the exception."""
    before = snapshot(store)
    with pytest.raises(error) as exc:
        call()
    message = str(exc.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert snapshot(store) == before
    return exc.value


def garbage_threat(entity_id: str) -> pb.Entity:
    return raw_component(make_entity(entity_id), "threat", THREAT_URL, b"\xff\xff\xff")


# ---- malformed or invalid entities --------------------------------------------------------------


def test_malformed_bytes(seeded):
    refused(seeded, lambda: seeded.put(b"\xff\x00garbage"), InvalidEntityError, "malformed")


def test_malformed_bytes_to_merge(seeded):
    refused(seeded, lambda: seeded.merge(b"\xff\x00garbage"), InvalidEntityError, "malformed")


@pytest.mark.parametrize("call", ["put", "create", "update"])
def test_empty_id_on_write(seeded, call):
    refused(seeded, lambda: getattr(seeded, call)(track("", position=position(1, 1))),
            InvalidEntityError, "id", "empty")


@pytest.mark.parametrize("call", ["get", "delete"])
def test_empty_id_on_lookup(seeded, call):
    refused(seeded, lambda: getattr(seeded, call)(""), InvalidEntityError, "id", "empty")


def test_oversize_entity(make_store):
    s = make_store(node_id="small", max_entity_bytes=1000)
    s.put(track("t1", position=position(1, 2)))
    big = track("t2", source=source("x" * 2048))
    err = refused(s, lambda: s.put(big), InvalidEntityError, "1000")
    assert "bytes" in str(err)


def test_oversize_growth_of_a_stored_entity(make_store):
    s = make_store(node_id="small", max_entity_bytes=1000)
    s.put(track("t1", a=source("x" * 600)))
    refused(s, lambda: s.put(make_entity("t1", b=source("y" * 600))), InvalidEntityError, "t1", "1000")
    assert "b" not in s.get("t1").components


def test_unparsable_bytes_for_a_max_strategy(seeded):
    refused(seeded, lambda: seeded.put(garbage_threat("t1")), InvalidEntityError, "t1", "threat")


def test_unparsable_bytes_in_a_replica_state(make_store, seeded):
    other = make_store(node_id="other")
    other.put(track("t9", threat=threat(pb.THREAT_LEVEL_HIGH)))
    (state,), _ = other.changes_since(0)
    state.components["threat"].value = b"\xff\xff\xff"
    refused(seeded, lambda: seeded.merge(state), InvalidEntityError, "t9", "threat")


def test_unknown_threat_level(seeded):
    refused(seeded, lambda: seeded.put(make_entity("t1", threat=threat(9))), InvalidEntityError, "t1", "threat", "9")


@pytest.mark.parametrize("lat, lon", [(NAN, 1.0), (1.0, NAN), (INF, 1.0), (1.0, -INF)])
def test_non_finite_position(seeded, lat, lon):
    bad = make_entity("t1", position=position(lat, lon))
    refused(seeded, lambda: seeded.put(bad), InvalidEntityError, "t1", "position", "finite")
    assert latlon(seeded.get("t1")) == (1, 2)


def test_nan_classification_confidence(seeded):
    bad = make_entity("t1", classification=classification("ship", NAN))
    refused(seeded, lambda: seeded.put(bad), InvalidEntityError, "t1", "classification", "finite")


def test_non_finite_value_in_a_batch_names_the_item(seeded):
    batch = [track("n0", position=position(1, 1)), track("n1", position=position(NAN, 1))]
    refused(seeded, lambda: seeded.put_many(batch), InvalidEntityError, "batch item 1", "n1", "position")


@pytest.mark.parametrize("key", ["@entity", "@x", ""])
def test_reserved_or_empty_component_key(seeded, key):
    bad = make_entity("t1")
    bad.components[key].CopyFrom(pack(position(5, 5)))
    err = refused(seeded, lambda: seeded.put(bad), InvalidEntityError, "t1", "component key")
    assert repr(key) in str(err) or f'"{key}"' in str(err)


def test_unknown_entity_type(seeded):
    refused(seeded, lambda: seeded.put(make_entity("t1", 7, position=position(1, 1))),
            InvalidEntityError, "t1", "type", "7")


def test_unknown_entity_type_in_a_replica_state(make_store, seeded):
    other = make_store(node_id="other")
    other.put(track("t9", position=position(1, 1)))
    (state,), _ = other.changes_since(0)
    state.type = 7
    refused(seeded, lambda: seeded.merge(state), InvalidEntityError, "t9", "7")




def test_base_version_far_in_the_future(seeded):
    bad = make_entity("t1", position=position(5, 5))
    bad.versions["position"].physical = 2**62
    bad.versions["position"].node = "elsewhere"
    err = refused(seeded, lambda: seeded.put(bad), ClockSkewError, "t1", "position", "ahead")
    assert err.entity_id == "t1"


def test_entity_hlc_far_in_the_future(seeded):
    bad = make_entity("t1", position=position(5, 5))
    bad.hlc_physical, bad.hlc_node = 2**62, "elsewhere"
    refused(seeded, lambda: seeded.update(bad), ClockSkewError, "t1")


def test_replica_state_without_versions(seeded):
    refused(seeded, lambda: seeded.merge(make_entity("t9", position=position(1, 1))), InvalidEntityError, "t9")


# ---- things that are not errors --------------------------------------------------------------


def test_unknown_type_url_is_not_an_error(seeded):
    url = "type.googleapis.com/acme.v1.Gadget"
    result = seeded.put(raw_component(make_entity("t1"), "gadget", url, b"\x08\x05\x12\x02hi"))
    assert result.applied == ["gadget"]
    got = seeded.get("t1").components["gadget"]
    assert (got.type_url, got.value) == (url, b"\x08\x05\x12\x02hi")


# ---- wrong Python types -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda s: s.get(123), TypeError, "str"),
        (lambda s: s.delete(None), TypeError, "str"),
        (lambda s: s.put("str"), TypeError, "Entity"),
        (lambda s: s.put(None), TypeError, "Entity"),
        (lambda s: s.update({"id": "t1"}), TypeError, "Entity"),
        (lambda s: s.merge(42), TypeError, "Entity"),
        (lambda s: s.list("x"), (TypeError, ValueError), "type_filter"),
        (lambda s: s.watch(min_interval=-1), ValueError, "min_interval"),
        (lambda s: s.watch(min_interval="1"), (TypeError, ValueError), "min_interval"),
        (lambda s: s.put_many(track("t2", position=position(1, 1))), TypeError, "put_many"),
        (lambda s: s.put_many(b"bytes"), TypeError, "put_many"),
        (lambda s: s.set_ttl(5, 1.0), TypeError, "str"),
        (lambda s: s.collect_tombstones(acked_seq=-1), (TypeError, ValueError), "seq"),
    ],
)
def test_wrong_python_types(seeded, call, error, words):
    refused(seeded, lambda: call(seeded), error, words)


def test_invalid_input_errors_name_the_entity_and_keys_as_documented(seeded):
    """meshstore.errors: each error names the entity (``entity_id``) and, where it is about
    components, the keys (``keys``)."""
    with pytest.raises(InvalidEntityError) as exc:
        seeded.put(make_entity("t1", threat=threat(9)))
    assert exc.value.entity_id == "t1"
    assert exc.value.keys == ["threat"]


def test_every_error_is_a_meshstore_error(seeded):
    for call in (lambda: seeded.put(b"\xff"), lambda: seeded.get("nope"), lambda: seeded.create(track("t1"))):
        with pytest.raises(MeshstoreError):
            call()


def test_bad_input_is_counted_as_rejected(seeded):
    before = seeded.stats()["rejected"]
    with pytest.raises(InvalidEntityError):
        seeded.put(b"\xff\x00garbage")
    assert seeded.stats()["rejected"] == before + 1


def test_store_keeps_working_after_bad_input(make_store, seeded):
    for bad in (b"\xff\x00garbage", garbage_threat("t1"), make_entity("t1", 7)):
        with pytest.raises(InvalidEntityError):
            seeded.put(bad)
    seeded.put(make_entity("t1", position=position(3, 4)))
    assert latlon(seeded.get("t1")) == (3, 4)
    other = make_store(node_id="other")
    push(seeded, other)
    assert latlon(other.get("t1")) == (3, 4)
    with pytest.raises(NotFoundError):
        other.get("t2")
