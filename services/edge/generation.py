"""One generator stream as the edge relays it, and the JSON it produced, closed if it was cut short."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from til.v1 import common_pb2, edge_pb2, generator_pb2

from services.common.errors import Unavailable
from services.common.streams import closing
from services.edge.call import CallContext
from services.edge.json_closer import NotAJsonPrefix, close_json
from services.edge.til_format import Violation


@dataclass
class Outcome:
    """What one generator call produced, with the edge's own timings."""

    text: str = ""
    model: str = ""
    prompt_tokens: int = 0
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    usage: common_pb2.TokenUsage = field(default_factory=common_pb2.TokenUsage)
    queue_ms: float = 0.0
    first_token_ms: float = 0.0

    def timings(self, ctx: CallContext) -> common_pb2.Timings:
        total = ctx.elapsed_ms()
        return common_pb2.Timings(
            queue_ms=self.queue_ms, time_to_first_token_ms=self.first_token_ms or total, total_ms=total
        )


async def stream_generation(
    stream: AsyncIterator[generator_pb2.GenerateResponse],
    ctx: CallContext,
    started: Callable[[generator_pb2.GenerateStarted], edge_pb2.StreamStarted],
    outcome: Outcome,
) -> AsyncIterator[edge_pb2.StreamStarted | common_pb2.TextDelta]:
    """Streams one generation: our `started` (built once the generator's arrives), then the deltas.

    `stream` is the generator call (or a shared generation's listener); it is closed when this ends,
    however it ends. Fills `outcome` as it goes. Runs in the caller's task, so a client that leaves
    cancels the generator call (or leaves the shared generation).
    """
    async with closing(stream):
        first = await anext(aiter(stream), None)
        if first is None or not first.HasField("started"):
            raise Unavailable("the generator's stream did not begin with a started event")
        outcome.model = first.started.model
        outcome.prompt_tokens = first.started.prompt_tokens
        yield started(first.started)
        parts: list[str] = []
        finished: generator_pb2.GenerateFinished | None = None
        async for event in stream:
            kind = event.WhichOneof("event")
            if kind == "delta" and finished is None:
                if event.delta.text and not outcome.first_token_ms:
                    outcome.first_token_ms = ctx.elapsed_ms()
                parts.append(event.delta.text)
                yield event.delta
            elif kind == "finished":
                finished = event.finished
        if finished is None:
            raise Unavailable("the generator's stream ended without a finished event")
    outcome.text = "".join(parts)
    outcome.finish_reason = finished.finish_reason
    outcome.usage.CopyFrom(finished.usage)
    outcome.queue_ms = ctx.queued_s * 1000.0 + finished.timings.queue_ms


def parse_json_output(text: str) -> tuple[Any, str, list[Violation]]:
    """(parsed value, JSON text, problems) for model output that may be cut short or broken.

    The JSON text always parses: a truncated document is closed (see json_closer), and output that
    stops being JSON is cut where it does.
    """
    try:
        return json.loads(text), text, []
    except ValueError:
        pass
    problems: list[Violation] = []
    try:
        closed = close_json(text)
    except NotAJsonPrefix as exc:
        closed = close_json(text[: exc.position])
        problems.append(Violation(f"the output is not JSON from offset {exc.position} ({exc.reason})", True))
    return json.loads(closed), closed, problems


def closing_delta(streamed: str, json_text: str) -> common_pb2.TextDelta | None:
    """The text that completes the streamed output into `json_text`, when the fix only appended.

    Sent as a last delta (with no tokens), so that the deltas a client joins add up to valid JSON.
    """
    if len(json_text) > len(streamed) and json_text.startswith(streamed):
        return common_pb2.TextDelta(text=json_text[len(streamed) :], token_count=0)
    return None
