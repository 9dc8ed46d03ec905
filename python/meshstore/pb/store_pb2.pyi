from google.protobuf import empty_pb2 as _empty_pb2
from meshstore.pb import entity_pb2 as _entity_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_CREATED: _ClassVar[EventType]
    EVENT_TYPE_UPDATED: _ClassVar[EventType]
    EVENT_TYPE_DELETED: _ClassVar[EventType]
    EVENT_TYPE_HEARTBEAT: _ClassVar[EventType]
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_CREATED: EventType
EVENT_TYPE_UPDATED: EventType
EVENT_TYPE_DELETED: EventType
EVENT_TYPE_HEARTBEAT: EventType

class EntityEvent(_message.Message):
    __slots__ = ("type", "entity", "origin_node", "seq")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_NODE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    type: EventType
    entity: _entity_pb2.Entity
    origin_node: str
    seq: int
    def __init__(self, type: _Optional[_Union[EventType, str]] = ..., entity: _Optional[_Union[_entity_pb2.Entity, _Mapping]] = ..., origin_node: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class EntityEventBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[EntityEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[EntityEvent, _Mapping]]] = ...) -> None: ...

class CreateEntityRequest(_message.Message):
    __slots__ = ("entity",)
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    entity: _entity_pb2.Entity
    def __init__(self, entity: _Optional[_Union[_entity_pb2.Entity, _Mapping]] = ...) -> None: ...

class GetEntityRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListEntitiesRequest(_message.Message):
    __slots__ = ("type_filter",)
    TYPE_FILTER_FIELD_NUMBER: _ClassVar[int]
    type_filter: _entity_pb2.EntityType
    def __init__(self, type_filter: _Optional[_Union[_entity_pb2.EntityType, str]] = ...) -> None: ...

class ListEntitiesResponse(_message.Message):
    __slots__ = ("entities",)
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    entities: _containers.RepeatedCompositeFieldContainer[_entity_pb2.Entity]
    def __init__(self, entities: _Optional[_Iterable[_Union[_entity_pb2.Entity, _Mapping]]] = ...) -> None: ...

class UpdateEntityRequest(_message.Message):
    __slots__ = ("entity", "strict")
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    entity: _entity_pb2.Entity
    strict: bool
    def __init__(self, entity: _Optional[_Union[_entity_pb2.Entity, _Mapping]] = ..., strict: _Optional[bool] = ...) -> None: ...

class UpdateResult(_message.Message):
    __slots__ = ("entity", "applied", "stale", "unchanged", "error_code", "error")
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    entity: _entity_pb2.Entity
    applied: _containers.RepeatedScalarFieldContainer[str]
    stale: _containers.RepeatedScalarFieldContainer[str]
    unchanged: _containers.RepeatedScalarFieldContainer[str]
    error_code: int
    error: str
    def __init__(self, entity: _Optional[_Union[_entity_pb2.Entity, _Mapping]] = ..., applied: _Optional[_Iterable[str]] = ..., stale: _Optional[_Iterable[str]] = ..., unchanged: _Optional[_Iterable[str]] = ..., error_code: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class DeleteEntityRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class WatchEntitiesRequest(_message.Message):
    __slots__ = ("type_filter", "include_existing", "since_seq", "components", "heartbeat_interval_ms", "min_interval_ms")
    TYPE_FILTER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_EXISTING_FIELD_NUMBER: _ClassVar[int]
    SINCE_SEQ_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    type_filter: _entity_pb2.EntityType
    include_existing: bool
    since_seq: int
    components: _containers.RepeatedScalarFieldContainer[str]
    heartbeat_interval_ms: int
    min_interval_ms: int
    def __init__(self, type_filter: _Optional[_Union[_entity_pb2.EntityType, str]] = ..., include_existing: _Optional[bool] = ..., since_seq: _Optional[int] = ..., components: _Optional[_Iterable[str]] = ..., heartbeat_interval_ms: _Optional[int] = ..., min_interval_ms: _Optional[int] = ...) -> None: ...

class ApproveActionRequest(_message.Message):
    __slots__ = ("entity_id",)
    ENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    entity_id: str
    def __init__(self, entity_id: _Optional[str] = ...) -> None: ...

class DenyActionRequest(_message.Message):
    __slots__ = ("entity_id",)
    ENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    entity_id: str
    def __init__(self, entity_id: _Optional[str] = ...) -> None: ...

class UpdateEntitiesRequest(_message.Message):
    __slots__ = ("entities", "strict", "components")
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    entities: _containers.RepeatedCompositeFieldContainer[_entity_pb2.Entity]
    strict: bool
    components: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, entities: _Optional[_Iterable[_Union[_entity_pb2.Entity, _Mapping]]] = ..., strict: _Optional[bool] = ..., components: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateEntitiesResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[UpdateResult]
    def __init__(self, results: _Optional[_Iterable[_Union[UpdateResult, _Mapping]]] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("entity", "entities")
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    entity: _entity_pb2.Entity
    entities: _containers.RepeatedCompositeFieldContainer[_entity_pb2.Entity]
    def __init__(self, entity: _Optional[_Union[_entity_pb2.Entity, _Mapping]] = ..., entities: _Optional[_Iterable[_Union[_entity_pb2.Entity, _Mapping]]] = ...) -> None: ...

class PublishRequestView(_message.Message):
    __slots__ = ("entity", "entities")
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    entity: bytes
    entities: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, entity: _Optional[bytes] = ..., entities: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PublishSummary(_message.Message):
    __slots__ = ("applied", "stale", "rejected", "errors")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    applied: int
    stale: int
    rejected: int
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, applied: _Optional[int] = ..., stale: _Optional[int] = ..., rejected: _Optional[int] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("node_id", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    values: _containers.ScalarMap[str, float]
    def __init__(self, node_id: _Optional[str] = ..., values: _Optional[_Mapping[str, float]] = ...) -> None: ...
