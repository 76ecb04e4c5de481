from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Experience(_message.Message):
    __slots__ = ("edge_id", "seq", "unix_time", "correlation", "top_p", "embedding", "action_mask", "action", "action_probs", "policy_version", "delay_s", "has_satisfaction", "satisfaction", "shadow_verified", "request_id", "load")
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ACTION_MASK_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ACTION_PROBS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    DELAY_S_FIELD_NUMBER: _ClassVar[int]
    HAS_SATISFACTION_FIELD_NUMBER: _ClassVar[int]
    SATISFACTION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    edge_id: str
    seq: int
    unix_time: float
    correlation: _containers.RepeatedScalarFieldContainer[float]
    top_p: int
    embedding: _containers.RepeatedScalarFieldContainer[float]
    action_mask: _containers.RepeatedScalarFieldContainer[bool]
    action: int
    action_probs: _containers.RepeatedScalarFieldContainer[float]
    policy_version: int
    delay_s: float
    has_satisfaction: bool
    satisfaction: float
    shadow_verified: bool
    request_id: str
    load: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, edge_id: _Optional[str] = ..., seq: _Optional[int] = ..., unix_time: _Optional[float] = ..., correlation: _Optional[_Iterable[float]] = ..., top_p: _Optional[int] = ..., embedding: _Optional[_Iterable[float]] = ..., action_mask: _Optional[_Iterable[bool]] = ..., action: _Optional[int] = ..., action_probs: _Optional[_Iterable[float]] = ..., policy_version: _Optional[int] = ..., delay_s: _Optional[float] = ..., has_satisfaction: bool = ..., satisfaction: _Optional[float] = ..., shadow_verified: bool = ..., request_id: _Optional[str] = ..., load: _Optional[_Iterable[float]] = ...) -> None: ...

class ExperienceAck(_message.Message):
    __slots__ = ("stored", "duplicates", "conflicts")
    STORED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    CONFLICTS_FIELD_NUMBER: _ClassVar[int]
    stored: int
    duplicates: int
    conflicts: int
    def __init__(self, stored: _Optional[int] = ..., duplicates: _Optional[int] = ..., conflicts: _Optional[int] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class PolicyInfo(_message.Message):
    __slots__ = ("version", "sha256", "name", "created_unix", "size_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    sha256: str
    name: str
    created_unix: float
    size_bytes: int
    def __init__(self, version: _Optional[int] = ..., sha256: _Optional[str] = ..., name: _Optional[str] = ..., created_unix: _Optional[float] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("info", "onnx")
    INFO_FIELD_NUMBER: _ClassVar[int]
    ONNX_FIELD_NUMBER: _ClassVar[int]
    info: PolicyInfo
    onnx: bytes
    def __init__(self, info: _Optional[_Union[PolicyInfo, _Mapping]] = ..., onnx: _Optional[bytes] = ...) -> None: ...

class WatchPoliciesRequest(_message.Message):
    __slots__ = ("after_version",)
    AFTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    after_version: int
    def __init__(self, after_version: _Optional[int] = ...) -> None: ...

class PublishPolicyRequest(_message.Message):
    __slots__ = ("name", "onnx")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ONNX_FIELD_NUMBER: _ClassVar[int]
    name: str
    onnx: bytes
    def __init__(self, name: _Optional[str] = ..., onnx: _Optional[bytes] = ...) -> None: ...
