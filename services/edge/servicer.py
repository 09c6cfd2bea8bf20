"""til.v1.EdgeService: validates, admits, and streams what the pipelines produce.

A request is validated before it takes an admission slot, so bad input is answered at once even
under load. The pipeline runs inside the handler's task: when the client leaves, the task is
cancelled and the cancellation reaches the generator call (a generation shared by identical calls
is cancelled when the last of them leaves; see flights.py).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypeVar

import grpc
from til.v1 import common_pb2, edge_pb2, edge_pb2_grpc

from services.common.admission import Admission
from services.common.server import Service
from services.common.streams import closing, coalesced
from services.edge.call import CallContext
from services.edge.questions import QuestionEvent, QuestionJob
from services.edge.til import Revision, TilEvent, TilJob

SERVICE_NAME = edge_pb2.DESCRIPTOR.services_by_name["EdgeService"].full_name
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class TilWriter(Protocol):
    def job(self, request: edge_pb2.GenerateTilRequest) -> TilJob: ...

    def generate(self, job: TilJob, ctx: CallContext) -> AsyncIterator[TilEvent]: ...

    def revision(self, request: edge_pb2.ReviseTilRequest) -> Revision: ...

    def revise(self, revision: Revision, ctx: CallContext) -> AsyncIterator[TilEvent]: ...


class QuestionWriter(Protocol):
    def job(self, request: edge_pb2.GenerateQuestionsRequest) -> QuestionJob: ...

    def generate(self, job: QuestionJob, ctx: CallContext) -> AsyncIterator[QuestionEvent]: ...


_EVENT_FIELDS = {
    edge_pb2.StreamStarted: "started",
    common_pb2.TextDelta: "delta",
    edge_pb2.TilFinished: "finished",
    edge_pb2.QuestionsFinished: "finished",
}

J = TypeVar("J")
R = TypeVar("R")


def _is_delta(event: object) -> bool:
    return type(event) is common_pb2.TextDelta


def _is_replay(event: object) -> bool:
    return isinstance(event, edge_pb2.StreamStarted) and event.cache_status == edge_pb2.CACHE_STATUS_HIT


def _joined(deltas: list[common_pb2.TextDelta]) -> common_pb2.TextDelta:
    return common_pb2.TextDelta(
        text="".join(d.text for d in deltas), token_count=sum(d.token_count for d in deltas)
    )


def request_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's x-request-id when it is a sane token, else a new one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return os.urandom(16).hex()  # as random as uuid4().hex, and as long, for a fifth of its cost


class EdgeServicer(edge_pb2_grpc.EdgeServiceServicer):
    def __init__(
        self, tils: TilWriter, questions: QuestionWriter, admission: Admission, *, coalesce_s: float = 0.0
    ) -> None:
        self._tils = tils
        self._questions = questions
        self._admission = admission
        self._coalesce_s = coalesce_s

    async def _stream(
        self,
        job: J,
        run: Callable[[J, CallContext], AsyncIterator[Any]],
        response: Callable[..., R],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[R]:
        arrived = time.monotonic()
        remaining = context.time_remaining()
        async with self._admission.slot():
            ctx = CallContext(
                request_id=request_id(context),
                arrived=arrived,
                deadline=None if remaining is None else arrived + remaining,
                queued_s=time.monotonic() - arrived,
            )
            source = run(job, ctx)
            async with closing(source):
                # `started` is read here: nothing comes before it to merge with.
                first = await anext(source, None)
                if first is None:
                    return
                if _is_replay(first):
                    # A cache hit is replayed (pipeline.py): its events are all ready at once, so none
                    # waits to be merged and they go out as they are, without a reading task.
                    yield response(**{_EVENT_FIELDS[type(first)]: first})
                    async for event in source:
                        yield response(**{_EVENT_FIELDS[type(event)]: event})
                    return
                # Deltas that wait while a message is being sent go out together, as one message.
                events = coalesced(
                    source, mergeable=_is_delta, merge=_joined, interval_s=self._coalesce_s, pending=(first,)
                )
                async with closing(events):
                    async for event in events:
                        yield response(**{_EVENT_FIELDS[type(event)]: event})

    async def GenerateTil(
        self, request: edge_pb2.GenerateTilRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[edge_pb2.GenerateTilResponse]:
        job = self._tils.job(request)
        async for response in self._stream(job, self._tils.generate, edge_pb2.GenerateTilResponse, context):
            yield response

    async def GenerateQuestions(
        self, request: edge_pb2.GenerateQuestionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[edge_pb2.GenerateQuestionsResponse]:
        job = self._questions.job(request)
        response_type = edge_pb2.GenerateQuestionsResponse
        async for response in self._stream(job, self._questions.generate, response_type, context):
            yield response

    async def ReviseTil(
        self, request: edge_pb2.ReviseTilRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[edge_pb2.ReviseTilResponse]:
        revision = self._tils.revision(request)
        async for response in self._stream(revision, self._tils.revise, edge_pb2.ReviseTilResponse, context):
            yield response


def edge_service(servicer: EdgeServicer) -> Service:
    """The servicer as a `Service` to hand to `serve()` or `start_server()`."""

    def register(server: grpc.aio.Server) -> None:
        edge_pb2_grpc.add_EdgeServiceServicer_to_server(servicer, server)

    return Service(SERVICE_NAME, register)
