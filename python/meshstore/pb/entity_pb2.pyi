import datetime

from google.protobuf import any_pb2 as _any_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EntityType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENTITY_TYPE_UNSPECIFIED: _ClassVar[EntityType]
    ENTITY_TYPE_ASSET: _ClassVar[EntityType]
    ENTITY_TYPE_TRACK: _ClassVar[EntityType]
    ENTITY_TYPE_GEO: _ClassVar[EntityType]

class ThreatLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    THREAT_LEVEL_UNSPECIFIED: _ClassVar[ThreatLevel]
    THREAT_LEVEL_NONE: _ClassVar[ThreatLevel]
    THREAT_LEVEL_LOW: _ClassVar[ThreatLevel]
    THREAT_LEVEL_MEDIUM: _ClassVar[ThreatLevel]
    THREAT_LEVEL_HIGH: _ClassVar[ThreatLevel]

class ApprovalState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    APPROVAL_STATE_UNSPECIFIED: _ClassVar[ApprovalState]
    APPROVAL_STATE_AUTO_APPROVED: _ClassVar[ApprovalState]
    APPROVAL_STATE_PENDING: _ClassVar[ApprovalState]
    APPROVAL_STATE_APPROVED: _ClassVar[ApprovalState]
    APPROVAL_STATE_DENIED: _ClassVar[ApprovalState]
    APPROVAL_STATE_TIMED_OUT: _ClassVar[ApprovalState]
ENTITY_TYPE_UNSPECIFIED: EntityType
ENTITY_TYPE_ASSET: EntityType
ENTITY_TYPE_TRACK: EntityType
ENTITY_TYPE_GEO: EntityType
THREAT_LEVEL_UNSPECIFIED: ThreatLevel
THREAT_LEVEL_NONE: ThreatLevel
THREAT_LEVEL_LOW: ThreatLevel
THREAT_LEVEL_MEDIUM: ThreatLevel
THREAT_LEVEL_HIGH: ThreatLevel
APPROVAL_STATE_UNSPECIFIED: ApprovalState
APPROVAL_STATE_AUTO_APPROVED: ApprovalState
APPROVAL_STATE_PENDING: ApprovalState
APPROVAL_STATE_APPROVED: ApprovalState
APPROVAL_STATE_DENIED: ApprovalState
APPROVAL_STATE_TIMED_OUT: ApprovalState

class Dot(_message.Message):
    __slots__ = ("node", "incarnation", "counter")
    NODE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    COUNTER_FIELD_NUMBER: _ClassVar[int]
    node: str
    incarnation: int
    counter: int
    def __init__(self, node: _Optional[str] = ..., incarnation: _Optional[int] = ..., counter: _Optional[int] = ...) -> None: ...

class Version(_message.Message):
    __slots__ = ("physical", "logical", "node", "incarnation", "counter", "concurrent")
    PHYSICAL_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    COUNTER_FIELD_NUMBER: _ClassVar[int]
    CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    physical: int
    logical: int
    node: str
    incarnation: int
    counter: int
    concurrent: _containers.RepeatedCompositeFieldContainer[Dot]
    def __init__(self, physical: _Optional[int] = ..., logical: _Optional[int] = ..., node: _Optional[str] = ..., incarnation: _Optional[int] = ..., counter: _Optional[int] = ..., concurrent: _Optional[_Iterable[_Union[Dot, _Mapping]]] = ...) -> None: ...

class Sibling(_message.Message):
    __slots__ = ("key", "value", "version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: _any_pb2.Any
    version: Version
    def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., version: _Optional[_Union[Version, _Mapping]] = ...) -> None: ...

class Entity(_message.Message):
    __slots__ = ("id", "type", "components", "created_at", "updated_at", "hlc_physical", "hlc_logical", "hlc_node", "versions", "expiry_time", "origin_node", "deleted_version", "siblings", "context")
    class ComponentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _any_pb2.Any
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_any_pb2.Any, _Mapping]] = ...) -> None: ...
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Version
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Version, _Mapping]] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    HLC_PHYSICAL_FIELD_NUMBER: _ClassVar[int]
    HLC_LOGICAL_FIELD_NUMBER: _ClassVar[int]
    HLC_NODE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    EXPIRY_TIME_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_NODE_FIELD_NUMBER: _ClassVar[int]
    DELETED_VERSION_FIELD_NUMBER: _ClassVar[int]
    SIBLINGS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    id: str
    type: EntityType
    components: _containers.MessageMap[str, _any_pb2.Any]
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    hlc_physical: int
    hlc_logical: int
    hlc_node: str
    versions: _containers.MessageMap[str, Version]
    expiry_time: _timestamp_pb2.Timestamp
    origin_node: str
    deleted_version: Version
    siblings: _containers.RepeatedCompositeFieldContainer[Sibling]
    context: _containers.RepeatedCompositeFieldContainer[Dot]
    def __init__(self, id: _Optional[str] = ..., type: _Optional[_Union[EntityType, str]] = ..., components: _Optional[_Mapping[str, _any_pb2.Any]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., hlc_physical: _Optional[int] = ..., hlc_logical: _Optional[int] = ..., hlc_node: _Optional[str] = ..., versions: _Optional[_Mapping[str, Version]] = ..., expiry_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., origin_node: _Optional[str] = ..., deleted_version: _Optional[_Union[Version, _Mapping]] = ..., siblings: _Optional[_Iterable[_Union[Sibling, _Mapping]]] = ..., context: _Optional[_Iterable[_Union[Dot, _Mapping]]] = ...) -> None: ...

class PositionComponent(_message.Message):
    __slots__ = ("lat", "lon", "alt")
    LAT_FIELD_NUMBER: _ClassVar[int]
    LON_FIELD_NUMBER: _ClassVar[int]
    ALT_FIELD_NUMBER: _ClassVar[int]
    lat: float
    lon: float
    alt: float
    def __init__(self, lat: _Optional[float] = ..., lon: _Optional[float] = ..., alt: _Optional[float] = ...) -> None: ...

class VelocityComponent(_message.Message):
    __slots__ = ("speed", "heading")
    SPEED_FIELD_NUMBER: _ClassVar[int]
    HEADING_FIELD_NUMBER: _ClassVar[int]
    speed: float
    heading: float
    def __init__(self, speed: _Optional[float] = ..., heading: _Optional[float] = ...) -> None: ...

class ClassificationComponent(_message.Message):
    __slots__ = ("label", "confidence")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    label: str
    confidence: float
    def __init__(self, label: _Optional[str] = ..., confidence: _Optional[float] = ...) -> None: ...

class TaskCatalogComponent(_message.Message):
    __slots__ = ("available_tasks",)
    AVAILABLE_TASKS_FIELD_NUMBER: _ClassVar[int]
    available_tasks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, available_tasks: _Optional[_Iterable[str]] = ...) -> None: ...

class TaskComponent(_message.Message):
    __slots__ = ("state", "updated_at")
    STATE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    state: str
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, state: _Optional[str] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ThreatComponent(_message.Message):
    __slots__ = ("level",)
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    level: ThreatLevel
    def __init__(self, level: _Optional[_Union[ThreatLevel, str]] = ...) -> None: ...

class ApprovalComponent(_message.Message):
    __slots__ = ("state", "timeout_seconds", "requested_at", "decided_by")
    STATE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_AT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    state: ApprovalState
    timeout_seconds: int
    requested_at: _timestamp_pb2.Timestamp
    decided_by: str
    def __init__(self, state: _Optional[_Union[ApprovalState, str]] = ..., timeout_seconds: _Optional[int] = ..., requested_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., decided_by: _Optional[str] = ...) -> None: ...

class FusionComponent(_message.Message):
    __slots__ = ("source_ids", "fused_lat", "fused_lon", "confidence")
    SOURCE_IDS_FIELD_NUMBER: _ClassVar[int]
    FUSED_LAT_FIELD_NUMBER: _ClassVar[int]
    FUSED_LON_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    source_ids: _containers.RepeatedScalarFieldContainer[str]
    fused_lat: float
    fused_lon: float
    confidence: float
    def __init__(self, source_ids: _Optional[_Iterable[str]] = ..., fused_lat: _Optional[float] = ..., fused_lon: _Optional[float] = ..., confidence: _Optional[float] = ...) -> None: ...

class SourceComponent(_message.Message):
    __slots__ = ("sensor_id", "sensor_type")
    SENSOR_ID_FIELD_NUMBER: _ClassVar[int]
    SENSOR_TYPE_FIELD_NUMBER: _ClassVar[int]
    sensor_id: str
    sensor_type: str
    def __init__(self, sensor_id: _Optional[str] = ..., sensor_type: _Optional[str] = ...) -> None: ...
