"""The seed system's store.v1 wire contract, read from the generated descriptors.

The seed system's Go clients (lattice-cli, the sims, classifier, task-manager, fusion)
are compiled against this contract: an RPC whose request or response type changes, or a
field that moves to another number or type, breaks them on the wire (a Go client then
parses one message as another). These tests fail on any such departure. Requests may
gain fields (new numbers only); the responses are exactly the seed's messages.
"""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from meshstore.pb import entity_pb2, store_pb2

F = FieldDescriptor

# rpc: (request, response, server streaming), as the seed system's store.proto has them.
RPCS = {
    "CreateEntity": ("store.v1.CreateEntityRequest", "entity.v1.Entity", False),
    "GetEntity": ("store.v1.GetEntityRequest", "entity.v1.Entity", False),
    "ListEntities": ("store.v1.ListEntitiesRequest", "store.v1.ListEntitiesResponse", False),
    "UpdateEntity": ("store.v1.UpdateEntityRequest", "entity.v1.Entity", False),
    "DeleteEntity": ("store.v1.DeleteEntityRequest", "google.protobuf.Empty", False),
    "WatchEntities": ("store.v1.WatchEntitiesRequest", "store.v1.EntityEvent", True),
    "ApproveAction": ("store.v1.ApproveActionRequest", "entity.v1.Entity", False),
    "DenyAction": ("store.v1.DenyActionRequest", "entity.v1.Entity", False),
}

# A field: (number, wire type, message or enum type name or None, repeated).
ENTITY = "entity.v1.Entity"
FIELDS: dict[str, dict[str, tuple[int, int, str | None, bool]]] = {
    ENTITY: {
        "id": (1, F.TYPE_STRING, None, False),
        "type": (2, F.TYPE_ENUM, "entity.v1.EntityType", False),
        "components": (3, F.TYPE_MESSAGE, "entity.v1.Entity.ComponentsEntry", True),
        "created_at": (4, F.TYPE_MESSAGE, "google.protobuf.Timestamp", False),
        "updated_at": (5, F.TYPE_MESSAGE, "google.protobuf.Timestamp", False),
        "hlc_physical": (6, F.TYPE_UINT64, None, False),
        "hlc_logical": (7, F.TYPE_UINT32, None, False),
        "hlc_node": (8, F.TYPE_STRING, None, False),
    },
    "store.v1.CreateEntityRequest": {"entity": (1, F.TYPE_MESSAGE, ENTITY, False)},
    "store.v1.GetEntityRequest": {"id": (1, F.TYPE_STRING, None, False)},
    "store.v1.ListEntitiesRequest": {"type_filter": (1, F.TYPE_ENUM, "entity.v1.EntityType", False)},
    "store.v1.ListEntitiesResponse": {"entities": (1, F.TYPE_MESSAGE, ENTITY, True)},
    "store.v1.UpdateEntityRequest": {"entity": (1, F.TYPE_MESSAGE, ENTITY, False)},
    "store.v1.DeleteEntityRequest": {"id": (1, F.TYPE_STRING, None, False)},
    "store.v1.WatchEntitiesRequest": {"type_filter": (1, F.TYPE_ENUM, "entity.v1.EntityType", False)},
    "store.v1.EntityEvent": {
        "type": (1, F.TYPE_ENUM, "store.v1.EventType", False),
        "entity": (2, F.TYPE_MESSAGE, ENTITY, False),
        "origin_node": (3, F.TYPE_STRING, None, False),
        "seq": (4, F.TYPE_UINT64, None, False),
    },
    "store.v1.ApproveActionRequest": {"entity_id": (1, F.TYPE_STRING, None, False)},
    "store.v1.DenyActionRequest": {"entity_id": (1, F.TYPE_STRING, None, False)},
}
# Messages a seed client decodes: no field beyond the contract's.
EXACT = {"store.v1.ListEntitiesResponse", "store.v1.EntityEvent"}

SERVICE = store_pb2.DESCRIPTOR.services_by_name["EntityStoreService"]
MESSAGES = {d.full_name: d for d in (
    *store_pb2.DESCRIPTOR.message_types_by_name.values(),
    *entity_pb2.DESCRIPTOR.message_types_by_name.values(),
)}


def shape(field: FieldDescriptor) -> tuple[int, int, str | None, bool]:
    kind = field.message_type or field.enum_type
    return field.number, field.type, kind.full_name if kind else None, field.is_repeated


def test_service_name_and_package() -> None:
    assert SERVICE.full_name == "store.v1.EntityStoreService"
    assert store_pb2.DESCRIPTOR.package == "store.v1" and entity_pb2.DESCRIPTOR.package == "entity.v1"


@pytest.mark.parametrize("rpc", sorted(RPCS))
def test_rpc_types_are_the_contract(rpc: str) -> None:
    method = SERVICE.methods_by_name.get(rpc)
    assert method is not None, f"store.v1 lost the RPC {rpc}"
    request, response, streaming = RPCS[rpc]
    assert (method.input_type.full_name, method.output_type.full_name) == (request, response)
    assert (method.client_streaming, method.server_streaming) == (False, streaming)


@pytest.mark.parametrize("message", sorted(FIELDS))
def test_message_fields_are_the_contract(message: str) -> None:
    descriptor: Descriptor = MESSAGES[message]
    expected = FIELDS[message]
    actual = {name: shape(f) for name, f in descriptor.fields_by_name.items()}
    for name, want in expected.items():
        assert actual.get(name) == want, f"{message}.{name}: {actual.get(name)} != contract {want}"
    if message in EXACT:
        assert set(actual) == set(expected), f"{message} gained fields a seed client would not expect"
    else:
        # An added field must not reuse a contract number.
        numbers = {want[0] for want in expected.values()}
        extra = {name: f[0] for name, f in actual.items() if name not in expected}
        assert not numbers & set(extra.values()), extra


def test_entity_components_map_holds_any() -> None:
    entry = MESSAGES[ENTITY].fields_by_name["components"].message_type
    assert entry.GetOptions().map_entry
    assert shape(entry.fields_by_name["key"])[:2] == (1, F.TYPE_STRING)
    assert shape(entry.fields_by_name["value"]) == (2, F.TYPE_MESSAGE, "google.protobuf.Any", False)


def test_event_and_entity_type_enums() -> None:
    # The values a seed client switches on.
    assert {v.name: v.number for v in store_pb2.EventType.DESCRIPTOR.values if v.number <= 3} == {
        "EVENT_TYPE_UNSPECIFIED": 0, "EVENT_TYPE_CREATED": 1, "EVENT_TYPE_UPDATED": 2, "EVENT_TYPE_DELETED": 3}
    assert {v.name: v.number for v in entity_pb2.EntityType.DESCRIPTOR.values} == {
        "ENTITY_TYPE_UNSPECIFIED": 0, "ENTITY_TYPE_ASSET": 1, "ENTITY_TYPE_TRACK": 2, "ENTITY_TYPE_GEO": 3}
