from til.v1 import common_pb2 as _common_pb2
from til.v1 import retriever_pb2 as _retriever_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CachePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_POLICY_UNSPECIFIED: _ClassVar[CachePolicy]
    CACHE_POLICY_REFRESH: _ClassVar[CachePolicy]
    CACHE_POLICY_BYPASS: _ClassVar[CachePolicy]

class CacheStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_STATUS_UNSPECIFIED: _ClassVar[CacheStatus]
    CACHE_STATUS_HIT: _ClassVar[CacheStatus]
    CACHE_STATUS_MISS: _ClassVar[CacheStatus]
    CACHE_STATUS_BYPASSED: _ClassVar[CacheStatus]
    CACHE_STATUS_UNAVAILABLE: _ClassVar[CacheStatus]

class RetrievalStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETRIEVAL_STATUS_UNSPECIFIED: _ClassVar[RetrievalStatus]
    RETRIEVAL_STATUS_OK: _ClassVar[RetrievalStatus]
    RETRIEVAL_STATUS_UNAVAILABLE: _ClassVar[RetrievalStatus]
    RETRIEVAL_STATUS_SKIPPED: _ClassVar[RetrievalStatus]

class Difficulty(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIFFICULTY_UNSPECIFIED: _ClassVar[Difficulty]
    DIFFICULTY_EASY: _ClassVar[Difficulty]
    DIFFICULTY_MEDIUM: _ClassVar[Difficulty]
    DIFFICULTY_HARD: _ClassVar[Difficulty]
CACHE_POLICY_UNSPECIFIED: CachePolicy
CACHE_POLICY_REFRESH: CachePolicy
CACHE_POLICY_BYPASS: CachePolicy
CACHE_STATUS_UNSPECIFIED: CacheStatus
CACHE_STATUS_HIT: CacheStatus
CACHE_STATUS_MISS: CacheStatus
CACHE_STATUS_BYPASSED: CacheStatus
CACHE_STATUS_UNAVAILABLE: CacheStatus
RETRIEVAL_STATUS_UNSPECIFIED: RetrievalStatus
RETRIEVAL_STATUS_OK: RetrievalStatus
RETRIEVAL_STATUS_UNAVAILABLE: RetrievalStatus
RETRIEVAL_STATUS_SKIPPED: RetrievalStatus
DIFFICULTY_UNSPECIFIED: Difficulty
DIFFICULTY_EASY: Difficulty
DIFFICULTY_MEDIUM: Difficulty
DIFFICULTY_HARD: Difficulty

class GenerationOverrides(_message.Message):
    __slots__ = ("sampling", "max_tokens", "ignore_eos")
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    sampling: _common_pb2.SamplingParams
    max_tokens: int
    ignore_eos: bool
    def __init__(self, sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., max_tokens: _Optional[int] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class Source(_message.Message):
    __slots__ = ("id", "kind", "title", "score")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: _retriever_pb2.DocumentKind
    title: str
    score: float
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[_retriever_pb2.DocumentKind, str]] = ..., title: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class StreamStarted(_message.Message):
    __slots__ = ("request_id", "model", "cache_status", "retrieval_status", "sources", "prompt_version", "prompt_tokens", "notices")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CACHE_STATUS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_STATUS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NOTICES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    cache_status: CacheStatus
    retrieval_status: RetrievalStatus
    sources: _containers.RepeatedCompositeFieldContainer[Source]
    prompt_version: str
    prompt_tokens: int
    notices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., cache_status: _Optional[_Union[CacheStatus, str]] = ..., retrieval_status: _Optional[_Union[RetrievalStatus, str]] = ..., sources: _Optional[_Iterable[_Union[Source, _Mapping]]] = ..., prompt_version: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., notices: _Optional[_Iterable[str]] = ...) -> None: ...

class Til(_message.Message):
    __slots__ = ("title", "keywords", "content")
    TITLE_FIELD_NUMBER: _ClassVar[int]
    KEYWORDS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    title: str
    keywords: _containers.RepeatedScalarFieldContainer[str]
    content: str
    def __init__(self, title: _Optional[str] = ..., keywords: _Optional[_Iterable[str]] = ..., content: _Optional[str] = ...) -> None: ...

class GenerateTilRequest(_message.Message):
    __slots__ = ("diff", "commit_messages", "language", "date", "generation", "cache_policy", "owner")
    DIFF_FIELD_NUMBER: _ClassVar[int]
    COMMIT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    DATE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    CACHE_POLICY_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    diff: str
    commit_messages: _containers.RepeatedScalarFieldContainer[str]
    language: str
    date: str
    generation: GenerationOverrides
    cache_policy: CachePolicy
    owner: str
    def __init__(self, diff: _Optional[str] = ..., commit_messages: _Optional[_Iterable[str]] = ..., language: _Optional[str] = ..., date: _Optional[str] = ..., generation: _Optional[_Union[GenerationOverrides, _Mapping]] = ..., cache_policy: _Optional[_Union[CachePolicy, str]] = ..., owner: _Optional[str] = ...) -> None: ...

class TilFinished(_message.Message):
    __slots__ = ("til", "til_json", "finish_reason", "usage", "timings", "violations", "til_id")
    TIL_FIELD_NUMBER: _ClassVar[int]
    TIL_JSON_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    TIL_ID_FIELD_NUMBER: _ClassVar[int]
    til: Til
    til_json: str
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.TokenUsage
    timings: _common_pb2.Timings
    violations: _containers.RepeatedScalarFieldContainer[str]
    til_id: str
    def __init__(self, til: _Optional[_Union[Til, _Mapping]] = ..., til_json: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.TokenUsage, _Mapping]] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ..., violations: _Optional[_Iterable[str]] = ..., til_id: _Optional[str] = ...) -> None: ...

class GenerateTilResponse(_message.Message):
    __slots__ = ("started", "delta", "finished")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    started: StreamStarted
    delta: _common_pb2.TextDelta
    finished: TilFinished
    def __init__(self, started: _Optional[_Union[StreamStarted, _Mapping]] = ..., delta: _Optional[_Union[_common_pb2.TextDelta, _Mapping]] = ..., finished: _Optional[_Union[TilFinished, _Mapping]] = ...) -> None: ...

class Question(_message.Message):
    __slots__ = ("question", "answer", "difficulty", "keywords")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    DIFFICULTY_FIELD_NUMBER: _ClassVar[int]
    KEYWORDS_FIELD_NUMBER: _ClassVar[int]
    question: str
    answer: str
    difficulty: Difficulty
    keywords: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, question: _Optional[str] = ..., answer: _Optional[str] = ..., difficulty: _Optional[_Union[Difficulty, str]] = ..., keywords: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateQuestionsRequest(_message.Message):
    __slots__ = ("til_text", "til_id", "difficulty", "count", "generation", "cache_policy", "owner")
    TIL_TEXT_FIELD_NUMBER: _ClassVar[int]
    TIL_ID_FIELD_NUMBER: _ClassVar[int]
    DIFFICULTY_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    CACHE_POLICY_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    til_text: str
    til_id: str
    difficulty: Difficulty
    count: int
    generation: GenerationOverrides
    cache_policy: CachePolicy
    owner: str
    def __init__(self, til_text: _Optional[str] = ..., til_id: _Optional[str] = ..., difficulty: _Optional[_Union[Difficulty, str]] = ..., count: _Optional[int] = ..., generation: _Optional[_Union[GenerationOverrides, _Mapping]] = ..., cache_policy: _Optional[_Union[CachePolicy, str]] = ..., owner: _Optional[str] = ...) -> None: ...

class QuestionsFinished(_message.Message):
    __slots__ = ("questions", "questions_json", "finish_reason", "usage", "timings", "violations")
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    QUESTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    questions: _containers.RepeatedCompositeFieldContainer[Question]
    questions_json: str
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.TokenUsage
    timings: _common_pb2.Timings
    violations: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, questions: _Optional[_Iterable[_Union[Question, _Mapping]]] = ..., questions_json: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.TokenUsage, _Mapping]] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ..., violations: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateQuestionsResponse(_message.Message):
    __slots__ = ("started", "delta", "finished")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    started: StreamStarted
    delta: _common_pb2.TextDelta
    finished: QuestionsFinished
    def __init__(self, started: _Optional[_Union[StreamStarted, _Mapping]] = ..., delta: _Optional[_Union[_common_pb2.TextDelta, _Mapping]] = ..., finished: _Optional[_Union[QuestionsFinished, _Mapping]] = ...) -> None: ...

class ConversationTurn(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ReviseTilRequest(_message.Message):
    __slots__ = ("til", "history", "instruction", "generation", "owner")
    TIL_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    til: Til
    history: _containers.RepeatedCompositeFieldContainer[ConversationTurn]
    instruction: str
    generation: GenerationOverrides
    owner: str
    def __init__(self, til: _Optional[_Union[Til, _Mapping]] = ..., history: _Optional[_Iterable[_Union[ConversationTurn, _Mapping]]] = ..., instruction: _Optional[str] = ..., generation: _Optional[_Union[GenerationOverrides, _Mapping]] = ..., owner: _Optional[str] = ...) -> None: ...

class ReviseTilResponse(_message.Message):
    __slots__ = ("started", "delta", "finished")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    started: StreamStarted
    delta: _common_pb2.TextDelta
    finished: TilFinished
    def __init__(self, started: _Optional[_Union[StreamStarted, _Mapping]] = ..., delta: _Optional[_Union[_common_pb2.TextDelta, _Mapping]] = ..., finished: _Optional[_Union[TilFinished, _Mapping]] = ...) -> None: ...
