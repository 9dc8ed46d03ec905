from meshstore.pb import entity_pb2 as _entity_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Hello(_message.Message):
    __slots__ = ("node_id", "incarnation", "context", "resync", "seq")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    incarnation: int
    context: _containers.RepeatedCompositeFieldContainer[_entity_pb2.Dot]
    resync: bool
    seq: int
    def __init__(self, node_id: _Optional[str] = ..., incarnation: _Optional[int] = ..., context: _Optional[_Iterable[_Union[_entity_pb2.Dot, _Mapping]]] = ..., resync: _Optional[bool] = ..., seq: _Optional[int] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("states", "last_seq", "context")
    STATES_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedCompositeFieldContainer[_entity_pb2.Entity]
    last_seq: int
    context: _containers.RepeatedCompositeFieldContainer[_entity_pb2.Dot]
    def __init__(self, states: _Optional[_Iterable[_Union[_entity_pb2.Entity, _Mapping]]] = ..., last_seq: _Optional[int] = ..., context: _Optional[_Iterable[_Union[_entity_pb2.Dot, _Mapping]]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("seq", "rejected", "changed", "first_error")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    FIRST_ERROR_FIELD_NUMBER: _ClassVar[int]
    seq: int
    rejected: int
    changed: int
    first_error: str
    def __init__(self, seq: _Optional[int] = ..., rejected: _Optional[int] = ..., changed: _Optional[int] = ..., first_error: _Optional[str] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("hello", "batch")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    batch: Batch
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("hello", "ack")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    ack: Ack
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ...) -> None: ...

class RawBatch(_message.Message):
    __slots__ = ("states", "last_seq", "context")
    STATES_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[bytes]
    last_seq: int
    context: _containers.RepeatedCompositeFieldContainer[_entity_pb2.Dot]
    def __init__(self, states: _Optional[_Iterable[bytes]] = ..., last_seq: _Optional[int] = ..., context: _Optional[_Iterable[_Union[_entity_pb2.Dot, _Mapping]]] = ...) -> None: ...

class RawPushRequest(_message.Message):
    __slots__ = ("hello", "batch")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    batch: RawBatch
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., batch: _Optional[_Union[RawBatch, _Mapping]] = ...) -> None: ...
