"""The arms of the benchmark: one way each of getting a streamed generation.

A. `engine`          vLLM's AsyncLLM in this process (no RPC): the ceiling.
A'. `engine-wrapper` our `VllmEngine.generate()` in this process: what the wrapper costs.
B. `openai`          `vllm serve` over HTTP/SSE (/v1/completions): vLLM's own front end.
C. `generator`       our generator over gRPC (til.v1.GeneratorService/Generate).
D. `edge`            edge -> generator (til.v1.EdgeService/GenerateTil, CACHE_POLICY_BYPASS).
E. `edge-hit`        the edge answering from the cache (the same diff every time).

Every arm sends greedy sampling and, where the contract allows, `ignore_eos` with a fixed output
length, so arms A-C produce exactly `output_len` tokens per request. The network arms talk only
the til.v1 contract (and vLLM's OpenAI API), so they work against any server that implements it.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from bench.metrics import RequestRecord
from bench.prompts import Prompt

if TYPE_CHECKING:
    from services.generator.vllm_engine import VllmEngine

IN_PROCESS = ("engine", "engine-wrapper")
NETWORK = ("openai", "generator", "edge", "edge-hit")
ALL_ARMS = IN_PROCESS + NETWORK

# Generous: a request at concurrency 128 behind a slow warm-up may take a while.
_RPC_TIMEOUT_S = 600.0


class Arm(Protocol):
    name: str

    async def open(self) -> None:
        """Connects (and, for `edge-hit`, fills the cache) before anything is timed."""

    async def one(self, prompt: Prompt, output_len: int) -> RequestRecord:
        """Sends one request and times its stream; failures are recorded, not raised."""

    async def close(self) -> None: ...


@dataclass(frozen=True)
class ArmSpec:
    """A network arm, picklable so that client worker processes can build it."""

    name: str
    target: str
    # The model name `vllm serve` serves (the OpenAI arm's "model" field).
    model: str = ""


def _error_name(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if callable(code):  # grpc.aio.AioRpcError
        return f"grpc {code().name}"
    return type(exc).__name__


class EngineArm:
    """A: vLLM's AsyncLLM driven directly with token ids."""

    name = "engine"

    def __init__(self, engine: VllmEngine) -> None:
        self._engine = engine
        self._ids = itertools.count()
        self._params: dict[int, Any] = {}

    async def open(self) -> None:
        pass

    def _sampling(self, output_len: int) -> Any:
        if output_len not in self._params:
            from vllm import SamplingParams
            from vllm.sampling_params import RequestOutputKind

            self._params[output_len] = SamplingParams(
                max_tokens=output_len,
                ignore_eos=True,
                temperature=0.0,
                output_kind=RequestOutputKind.DELTA,
            )
        return self._params[output_len]

    async def one(self, prompt: Prompt, output_len: int) -> RequestRecord:
        from vllm import TokensPrompt

        llm = self._engine.async_llm
        params = self._sampling(output_len)
        record = RequestRecord(start=time.monotonic(), prompt_tokens=len(prompt.token_ids))
        try:
            tokens = TokensPrompt(prompt_token_ids=list(prompt.token_ids))
            async for out in llm.generate(tokens, params, request_id=f"bench-a-{next(self._ids)}"):
                n = len(out.outputs[0].token_ids)
                if n:
                    record.message_times.append(time.monotonic())
                    record.tokens += n
        except Exception as exc:
            record.error = _error_name(exc)
        record.end = time.monotonic()
        return record

    async def close(self) -> None:
        pass


class EngineWrapperArm:
    """A': our GenerationEngine (tokenizes the text itself, as the generator does)."""

    name = "engine-wrapper"

    def __init__(self, engine: VllmEngine) -> None:
        self._engine = engine
        self._ids = itertools.count()

    async def open(self) -> None:
        pass

    async def one(self, prompt: Prompt, output_len: int) -> RequestRecord:
        from services.generator.engine import EngineDelta, EngineRequest, EngineStarted, Sampling

        request = EngineRequest(
            request_id=f"bench-w-{next(self._ids)}",
            prompt=prompt.text,
            messages=None,
            max_tokens=output_len,
            sampling=Sampling(temperature=0.0),
            ignore_eos=True,
        )
        record = RequestRecord(start=time.monotonic())
        try:
            async for event in self._engine.generate(request):
                if isinstance(event, EngineDelta):
                    record.message_times.append(time.monotonic())
                    record.tokens += event.token_count
                elif isinstance(event, EngineStarted):
                    record.prompt_tokens = event.prompt_tokens
        except Exception as exc:
            record.error = _error_name(exc)
        record.end = time.monotonic()
        return record

    async def close(self) -> None:
        pass


class OpenAIArm:
    """B: `vllm serve`'s /v1/completions with stream=true, read as server-sent events."""

    name = "openai"

    def __init__(self, spec: ArmSpec) -> None:
        self._url = spec.target.rstrip("/") + "/v1/completions"
        self._model = spec.model
        self._client: Any = None

    async def open(self) -> None:
        import httpx

        # No pool limit: every concurrent stream gets its own connection, as separate clients would.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._client = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(_RPC_TIMEOUT_S))

    async def one(self, prompt: Prompt, output_len: int) -> RequestRecord:
        body = {
            "model": self._model,
            "prompt": prompt.text,
            "max_tokens": output_len,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        record = RequestRecord(start=time.monotonic())
        try:
            async with self._client.stream("POST", self._url, json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        record.message_times.append(time.monotonic())
                    if usage := chunk.get("usage"):
                        record.tokens = usage["completion_tokens"]
                        record.prompt_tokens = usage["prompt_tokens"]
        except Exception as exc:
            record.error = _error_name(exc)
        record.end = time.monotonic()
        return record

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


class _GrpcArm:
    def __init__(self, spec: ArmSpec) -> None:
        self._target = spec.target
        self._channel: Any = None
        self._ids = itertools.count()

    async def open(self) -> None:
        import grpc

        self._channel = grpc.aio.insecure_channel(
            self._target, options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)]
        )
        await self._channel.channel_ready()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


class GeneratorArm(_GrpcArm):
    """C: til.v1.GeneratorService/Generate with a raw prompt."""

    name = "generator"

    async def open(self) -> None:
        from til.v1 import generator_pb2_grpc

        await super().open()
        self._stub = generator_pb2_grpc.GeneratorServiceStub(self._channel)

    async def one(self, prompt: Prompt, output_len: int) -> RequestRecord:
        from til.v1 import common_pb2, generator_pb2

        request = generator_pb2.GenerateRequest(
            request_id=f"bench-c-{next(self._ids)}",
            prompt=prompt.text,
            sampling=common_pb2.SamplingParams(temperature=0.0),
            stopping=common_pb2.StoppingCriteria(max_tokens=output_len, ignore_eos=True),
        )
        record = RequestRecord(start=time.monotonic())
        finished = False
        try:
            async for message in self._stub.Generate(request, timeout=_RPC_TIMEOUT_S):
                kind = message.WhichOneof("event")
                if kind == "delta":
                    record.message_times.append(time.monotonic())
                    record.tokens += message.delta.token_count
                elif kind == "started":
                    record.prompt_tokens = message.started.prompt_tokens
                elif kind == "finished":
                    finished = True
                    record.tokens = message.finished.usage.completion_tokens
            if not finished:
                record.error = "stream ended without finished"
        except Exception as exc:
            record.error = _error_name(exc)
        record.end = time.monotonic()
        return record


def diff_for(prompt: Prompt) -> str:
    """A unified diff that adds the prompt's words as a Markdown file."""
    words = prompt.text.split()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    header = (
        "diff --git a/notes/bench.md b/notes/bench.md\n"
        "--- a/notes/bench.md\n+++ b/notes/bench.md\n"
        f"@@ -0,0 +1,{len(lines)} @@\n"
    )
    return header + "".join(f"+{line}\n" for line in lines)


class EdgeArm(_GrpcArm):
    """D (`edge`, cache bypassed) and E (`edge-hit`, every request the same cached diff)."""

    def __init__(self, spec: ArmSpec) -> None:
        super().__init__(spec)
        self.name = spec.name
        self._hit = spec.name == "edge-hit"
        self._cached_diff: str | None = None

    async def open(self) -> None:
        from til.v1 import edge_pb2_grpc

        await super().open()
        self._stub = edge_pb2_grpc.EdgeServiceStub(self._channel)

    def _request(self, diff: str, output_len: int, policy: int) -> Any:
        from til.v1 import edge_pb2

        return edge_pb2.GenerateTilRequest(
            diff=diff,
            commit_messages=["Add benchmark notes"],
            language="markdown",
            date="2025-01-01",
            generation=edge_pb2.GenerationOverrides(max_tokens=output_len),
            cache_policy=policy,
            owner="bench",
        )

    async def one(self, prompt: Prompt, output_len: int) -> RequestRecord:
        from til.v1 import edge_pb2

        if self._hit:
            if self._cached_diff is None:
                # Fill the cache once (untimed); every later request asks for the same TIL.
                self._cached_diff = diff_for(prompt)
                fill = await self._send(self._cached_diff, output_len, edge_pb2.CACHE_POLICY_REFRESH)
                if fill.error:
                    return fill
            diff, policy = self._cached_diff, edge_pb2.CACHE_POLICY_UNSPECIFIED
        else:
            diff, policy = diff_for(prompt), edge_pb2.CACHE_POLICY_BYPASS
        return await self._send(diff, output_len, policy)

    async def _send(self, diff: str, output_len: int, policy: int) -> RequestRecord:
        from til.v1 import edge_pb2

        record = RequestRecord(start=time.monotonic())
        finished = False
        try:
            call = self._stub.GenerateTil(self._request(diff, output_len, policy), timeout=_RPC_TIMEOUT_S)
            async for message in call:
                kind = message.WhichOneof("event")
                if kind == "delta":
                    record.message_times.append(time.monotonic())
                    record.tokens += message.delta.token_count
                elif kind == "started":
                    record.prompt_tokens = message.started.prompt_tokens
                    record.note = edge_pb2.CacheStatus.Name(message.started.cache_status)
                elif kind == "finished":
                    finished = True
                    record.tokens = message.finished.usage.completion_tokens
            if not finished:
                record.error = "stream ended without finished"
        except Exception as exc:
            record.error = _error_name(exc)
        record.end = time.monotonic()
        return record


def network_arm(spec: ArmSpec) -> Arm:
    if spec.name == "openai":
        return OpenAIArm(spec)
    if spec.name == "generator":
        return GeneratorArm(spec)
    if spec.name in ("edge", "edge-hit"):
        return EdgeArm(spec)
    raise ValueError(f"unknown network arm {spec.name!r}")
