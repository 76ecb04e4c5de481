from velo.v1 import chat_pb2 as _chat_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    ACTION_REUSE: _ClassVar[Action]
    ACTION_FORWARD: _ClassVar[Action]
    ACTION_AUGMENT: _ClassVar[Action]
ACTION_UNSPECIFIED: Action
ACTION_REUSE: Action
ACTION_FORWARD: Action
ACTION_AUGMENT: Action

class AskRequest(_message.Message):
    __slots__ = ("prompt", "tenant", "request_id", "reference_answer", "max_tokens", "history", "cache", "shape")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ANSWER_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    tenant: str
    request_id: str
    reference_answer: str
    max_tokens: int
    history: _containers.RepeatedCompositeFieldContainer[_chat_pb2.ChatMessage]
    cache: CacheControl
    shape: _chat_pb2.AnswerShape
    def __init__(self, prompt: _Optional[str] = ..., tenant: _Optional[str] = ..., request_id: _Optional[str] = ..., reference_answer: _Optional[str] = ..., max_tokens: _Optional[int] = ..., history: _Optional[_Iterable[_Union[_chat_pb2.ChatMessage, _Mapping]]] = ..., cache: _Optional[_Union[CacheControl, _Mapping]] = ..., shape: _Optional[_Union[_chat_pb2.AnswerShape, _Mapping]] = ...) -> None: ...

class CacheControl(_message.Message):
    __slots__ = ("no_cache", "no_store", "max_age_s", "min_similarity")
    NO_CACHE_FIELD_NUMBER: _ClassVar[int]
    NO_STORE_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_S_FIELD_NUMBER: _ClassVar[int]
    MIN_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    no_cache: bool
    no_store: bool
    max_age_s: float
    min_similarity: float
    def __init__(self, no_cache: bool = ..., no_store: bool = ..., max_age_s: _Optional[float] = ..., min_similarity: _Optional[float] = ...) -> None: ...

class AskResponse(_message.Message):
    __slots__ = ("answer", "action", "request_id", "edge_id", "policy", "delay_s", "edge_s", "cloud_s", "cached_question", "similarity", "has_satisfaction", "satisfaction", "reward", "cached_entry_id", "cached_age_s", "policy_version", "stored", "finish_reason", "usage", "saved", "tool_calls_json", "logprobs_json", "bypass", "keyed_on", "stored_entry_id", "superseded_entry_ids")
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    DELAY_S_FIELD_NUMBER: _ClassVar[int]
    EDGE_S_FIELD_NUMBER: _ClassVar[int]
    CLOUD_S_FIELD_NUMBER: _ClassVar[int]
    CACHED_QUESTION_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    HAS_SATISFACTION_FIELD_NUMBER: _ClassVar[int]
    SATISFACTION_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    CACHED_ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_AGE_S_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SAVED_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_JSON_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_JSON_FIELD_NUMBER: _ClassVar[int]
    BYPASS_FIELD_NUMBER: _ClassVar[int]
    KEYED_ON_FIELD_NUMBER: _ClassVar[int]
    STORED_ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_ENTRY_IDS_FIELD_NUMBER: _ClassVar[int]
    answer: str
    action: Action
    request_id: str
    edge_id: str
    policy: str
    delay_s: float
    edge_s: float
    cloud_s: float
    cached_question: str
    similarity: float
    has_satisfaction: bool
    satisfaction: float
    reward: float
    cached_entry_id: int
    cached_age_s: float
    policy_version: int
    stored: bool
    finish_reason: str
    usage: _chat_pb2.Usage
    saved: _chat_pb2.Usage
    tool_calls_json: str
    logprobs_json: str
    bypass: _containers.RepeatedScalarFieldContainer[str]
    keyed_on: _containers.RepeatedScalarFieldContainer[str]
    stored_entry_id: int
    superseded_entry_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, answer: _Optional[str] = ..., action: _Optional[_Union[Action, str]] = ..., request_id: _Optional[str] = ..., edge_id: _Optional[str] = ..., policy: _Optional[str] = ..., delay_s: _Optional[float] = ..., edge_s: _Optional[float] = ..., cloud_s: _Optional[float] = ..., cached_question: _Optional[str] = ..., similarity: _Optional[float] = ..., has_satisfaction: bool = ..., satisfaction: _Optional[float] = ..., reward: _Optional[float] = ..., cached_entry_id: _Optional[int] = ..., cached_age_s: _Optional[float] = ..., policy_version: _Optional[int] = ..., stored: bool = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[_chat_pb2.Usage, _Mapping]] = ..., saved: _Optional[_Union[_chat_pb2.Usage, _Mapping]] = ..., tool_calls_json: _Optional[str] = ..., logprobs_json: _Optional[str] = ..., bypass: _Optional[_Iterable[str]] = ..., keyed_on: _Optional[_Iterable[str]] = ..., stored_entry_id: _Optional[int] = ..., superseded_entry_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class AskChunk(_message.Message):
    __slots__ = ("text", "done", "logprobs_json")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_JSON_FIELD_NUMBER: _ClassVar[int]
    text: str
    done: AskResponse
    logprobs_json: str
    def __init__(self, text: _Optional[str] = ..., done: _Optional[_Union[AskResponse, _Mapping]] = ..., logprobs_json: _Optional[str] = ...) -> None: ...

class CacheEntry(_message.Message):
    __slots__ = ("id", "tenant", "scope", "question", "answer", "hits", "value", "created_unix_s", "age_s", "finish_reason", "usage")
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    id: int
    tenant: str
    scope: str
    question: str
    answer: str
    hits: int
    value: float
    created_unix_s: float
    age_s: float
    finish_reason: str
    usage: _chat_pb2.Usage
    def __init__(self, id: _Optional[int] = ..., tenant: _Optional[str] = ..., scope: _Optional[str] = ..., question: _Optional[str] = ..., answer: _Optional[str] = ..., hits: _Optional[int] = ..., value: _Optional[float] = ..., created_unix_s: _Optional[float] = ..., age_s: _Optional[float] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[_chat_pb2.Usage, _Mapping]] = ...) -> None: ...

class ListEntriesRequest(_message.Message):
    __slots__ = ("tenant", "limit", "offset")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    limit: int
    offset: int
    def __init__(self, tenant: _Optional[str] = ..., limit: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class ListEntriesResponse(_message.Message):
    __slots__ = ("entries", "total")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[CacheEntry]
    total: int
    def __init__(self, entries: _Optional[_Iterable[_Union[CacheEntry, _Mapping]]] = ..., total: _Optional[int] = ...) -> None: ...

class GetEntryRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class DeleteEntriesRequest(_message.Message):
    __slots__ = ("ids", "tenant", "question", "min_similarity", "older_than_s", "dry_run")
    IDS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    MIN_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    OLDER_THAN_S_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    tenant: str
    question: str
    min_similarity: float
    older_than_s: float
    dry_run: bool
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., tenant: _Optional[str] = ..., question: _Optional[str] = ..., min_similarity: _Optional[float] = ..., older_than_s: _Optional[float] = ..., dry_run: bool = ...) -> None: ...

class DeleteEntriesResponse(_message.Message):
    __slots__ = ("deleted", "ids")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, deleted: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ImportedPair(_message.Message):
    __slots__ = ("question", "answer")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    question: str
    answer: str
    def __init__(self, question: _Optional[str] = ..., answer: _Optional[str] = ...) -> None: ...

class ImportEntriesRequest(_message.Message):
    __slots__ = ("tenant", "pairs")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    pairs: _containers.RepeatedCompositeFieldContainer[ImportedPair]
    def __init__(self, tenant: _Optional[str] = ..., pairs: _Optional[_Iterable[_Union[ImportedPair, _Mapping]]] = ...) -> None: ...

class ImportEntriesResponse(_message.Message):
    __slots__ = ("imported", "skipped", "ids")
    IMPORTED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    imported: int
    skipped: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, imported: _Optional[int] = ..., skipped: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ExportEntriesRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ActionStats(_message.Message):
    __slots__ = ("action", "requests", "delay_sum_s", "satisfaction_count", "satisfaction_sum", "reward_sum")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DELAY_SUM_S_FIELD_NUMBER: _ClassVar[int]
    SATISFACTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    SATISFACTION_SUM_FIELD_NUMBER: _ClassVar[int]
    REWARD_SUM_FIELD_NUMBER: _ClassVar[int]
    action: Action
    requests: int
    delay_sum_s: float
    satisfaction_count: int
    satisfaction_sum: float
    reward_sum: float
    def __init__(self, action: _Optional[_Union[Action, str]] = ..., requests: _Optional[int] = ..., delay_sum_s: _Optional[float] = ..., satisfaction_count: _Optional[int] = ..., satisfaction_sum: _Optional[float] = ..., reward_sum: _Optional[float] = ...) -> None: ...

class EdgeStats(_message.Message):
    __slots__ = ("edge_id", "requests", "errors", "actions", "cached_rows", "evicted_rows", "policy", "policy_version", "experience_pending", "experience_sent", "experience_dropped", "parts", "shadow_verified", "shadow_skipped", "policies_rejected", "reuses_vetoed", "reuses_verified", "reuses_judged_wrong", "false_hit_estimate", "bypassed", "entries_superseded", "entries_deleted", "reuse_threshold", "reuse_threshold_questions")
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    CACHED_ROWS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_ROWS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPERIENCE_PENDING_FIELD_NUMBER: _ClassVar[int]
    EXPERIENCE_SENT_FIELD_NUMBER: _ClassVar[int]
    EXPERIENCE_DROPPED_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    SHADOW_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    POLICIES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    REUSES_VETOED_FIELD_NUMBER: _ClassVar[int]
    REUSES_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    REUSES_JUDGED_WRONG_FIELD_NUMBER: _ClassVar[int]
    FALSE_HIT_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    BYPASSED_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_SUPERSEDED_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_DELETED_FIELD_NUMBER: _ClassVar[int]
    REUSE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REUSE_THRESHOLD_QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    edge_id: str
    requests: int
    errors: int
    actions: _containers.RepeatedCompositeFieldContainer[ActionStats]
    cached_rows: int
    evicted_rows: int
    policy: str
    policy_version: int
    experience_pending: int
    experience_sent: int
    experience_dropped: int
    parts: _containers.RepeatedCompositeFieldContainer[PartStatus]
    shadow_verified: int
    shadow_skipped: int
    policies_rejected: int
    reuses_vetoed: int
    reuses_verified: int
    reuses_judged_wrong: int
    false_hit_estimate: float
    bypassed: int
    entries_superseded: int
    entries_deleted: int
    reuse_threshold: float
    reuse_threshold_questions: int
    def __init__(self, edge_id: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., actions: _Optional[_Iterable[_Union[ActionStats, _Mapping]]] = ..., cached_rows: _Optional[int] = ..., evicted_rows: _Optional[int] = ..., policy: _Optional[str] = ..., policy_version: _Optional[int] = ..., experience_pending: _Optional[int] = ..., experience_sent: _Optional[int] = ..., experience_dropped: _Optional[int] = ..., parts: _Optional[_Iterable[_Union[PartStatus, _Mapping]]] = ..., shadow_verified: _Optional[int] = ..., shadow_skipped: _Optional[int] = ..., policies_rejected: _Optional[int] = ..., reuses_vetoed: _Optional[int] = ..., reuses_verified: _Optional[int] = ..., reuses_judged_wrong: _Optional[int] = ..., false_hit_estimate: _Optional[float] = ..., bypassed: _Optional[int] = ..., entries_superseded: _Optional[int] = ..., entries_deleted: _Optional[int] = ..., reuse_threshold: _Optional[float] = ..., reuse_threshold_questions: _Optional[int] = ...) -> None: ...

class PartStatus(_message.Message):
    __slots__ = ("name", "up", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    up: bool
    reason: str
    def __init__(self, name: _Optional[str] = ..., up: bool = ..., reason: _Optional[str] = ...) -> None: ...
