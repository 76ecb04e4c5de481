from velo.v1 import chat_pb2 as _chat_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ContextQA(_message.Message):
    __slots__ = ("question", "answer")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    question: str
    answer: str
    def __init__(self, question: _Optional[str] = ..., answer: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "context", "max_tokens", "request_id", "background", "history", "shape")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    context: _containers.RepeatedCompositeFieldContainer[ContextQA]
    max_tokens: int
    request_id: str
    background: bool
    history: _containers.RepeatedCompositeFieldContainer[_chat_pb2.ChatMessage]
    shape: _chat_pb2.AnswerShape
    def __init__(self, prompt: _Optional[str] = ..., context: _Optional[_Iterable[_Union[ContextQA, _Mapping]]] = ..., max_tokens: _Optional[int] = ..., request_id: _Optional[str] = ..., background: bool = ..., history: _Optional[_Iterable[_Union[_chat_pb2.ChatMessage, _Mapping]]] = ..., shape: _Optional[_Union[_chat_pb2.AnswerShape, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "model", "prompt_tokens", "completion_tokens", "llm_s", "finish_reason", "tool_calls_json", "logprobs_json", "max_tokens", "usage_estimated", "load", "queue_s")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LLM_S_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_JSON_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    USAGE_ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    llm_s: float
    finish_reason: str
    tool_calls_json: str
    logprobs_json: str
    max_tokens: int
    usage_estimated: bool
    load: CloudLoad
    queue_s: float
    def __init__(self, text: _Optional[str] = ..., model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., llm_s: _Optional[float] = ..., finish_reason: _Optional[str] = ..., tool_calls_json: _Optional[str] = ..., logprobs_json: _Optional[str] = ..., max_tokens: _Optional[int] = ..., usage_estimated: bool = ..., load: _Optional[_Union[CloudLoad, _Mapping]] = ..., queue_s: _Optional[float] = ...) -> None: ...

class CloudLoad(_message.Message):
    __slots__ = ("in_flight", "queued", "slots", "mean_service_s", "estimated_wait_s")
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    MEAN_SERVICE_S_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    in_flight: int
    queued: int
    slots: int
    mean_service_s: float
    estimated_wait_s: float
    def __init__(self, in_flight: _Optional[int] = ..., queued: _Optional[int] = ..., slots: _Optional[int] = ..., mean_service_s: _Optional[float] = ..., estimated_wait_s: _Optional[float] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("text", "done", "logprobs_json")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_JSON_FIELD_NUMBER: _ClassVar[int]
    text: str
    done: GenerateResponse
    logprobs_json: str
    def __init__(self, text: _Optional[str] = ..., done: _Optional[_Union[GenerateResponse, _Mapping]] = ..., logprobs_json: _Optional[str] = ...) -> None: ...

class CloudStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CloudStats(_message.Message):
    __slots__ = ("llm_up", "llm_down_reason", "llm_restarts", "requests", "failures", "in_flight", "queued", "background_refused", "llm_timeouts", "load")
    LLM_UP_FIELD_NUMBER: _ClassVar[int]
    LLM_DOWN_REASON_FIELD_NUMBER: _ClassVar[int]
    LLM_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_REFUSED_FIELD_NUMBER: _ClassVar[int]
    LLM_TIMEOUTS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    llm_up: bool
    llm_down_reason: str
    llm_restarts: int
    requests: int
    failures: int
    in_flight: int
    queued: int
    background_refused: int
    llm_timeouts: int
    load: CloudLoad
    def __init__(self, llm_up: bool = ..., llm_down_reason: _Optional[str] = ..., llm_restarts: _Optional[int] = ..., requests: _Optional[int] = ..., failures: _Optional[int] = ..., in_flight: _Optional[int] = ..., queued: _Optional[int] = ..., background_refused: _Optional[int] = ..., llm_timeouts: _Optional[int] = ..., load: _Optional[_Union[CloudLoad, _Mapping]] = ...) -> None: ...
