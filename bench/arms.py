"""The arms of the benchmark: one way each of getting a streamed generation.

Plain workload (a prompt of exactly `--input-len` tokens, `ignore_eos`, `--output-len` tokens):
A. `engine`          vLLM's AsyncLLM in this process (no RPC): the ceiling.
A'. `engine-wrapper` our `VllmEngine.generate()` in this process: what the wrapper costs.
B. `openai`          `vllm serve` over HTTP/SSE (/v1/completions): vLLM's own front end.
C. `generator`       our generator over gRPC (til.v1.GeneratorService/Generate).

TIL workload (the request the edge's own pipeline makes for a diff: its chat, its JSON Schema with
the content budget, `--output-len` tokens with `ignore_eos`; see bench/til_workload.py):
A_til. `engine-til`     that chat and schema straight into AsyncLLM: D's ceiling.
A'_til. `engine-wrapper-til` that chat and schema through our `VllmEngine.generate()` in this process:
                        what the generator's own work before vLLM (tokenizing, readying the schema)
                        costs, without its gRPC hop.
B_til. `openai-til`     that chat and schema through `vllm serve`'s /v1/chat/completions.
C_til. `generator-til`  that GenerateRequest through our generator.
D. `edge`               edge -> generator (til.v1.EdgeService/GenerateTil, CACHE_POLICY_BYPASS,
                        generation.ignore_eos), which builds the same request itself.
E. `edge-hit`           the edge answering from the cache (one seeded diff per client process).

Every arm samples greedily. The network arms talk only the til.v1 contract (and vLLM's OpenAI
API), so they work against any server that implements it.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from bench.metrics import RequestRecord
from bench.prompts import Prompt

if TYPE_CHECKING:
    from bench.til_workload import TilRequest
    from services.generator.engine import EngineRequest
    from services.generator.vllm_engine import VllmEngine

IN_PROCESS = ("engine", "engine-wrapper", "engine-til", "engine-wrapper-til")
NETWORK = ("openai", "openai-til", "generator", "generator-til", "edge", "edge-hit")
ALL_ARMS = IN_PROCESS + NETWORK
# Arms that send the edge's TIL request for a diff made of the prompt's words.
TIL_ARMS = ("engine-til", "engine-wrapper-til", "openai-til", "generator-til", "edge", "edge-hit")

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
    # The model name `vllm serve` serves (the OpenAI arm's "model" field), or for `edge-hit` the
    # generator's model name, which the edge's cache key holds.
    model: str = ""
    # `edge-hit` only: the cacher that the edge reads, to seed.
    cacher: str = ""


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
                _engine_queue(record, out)
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


class EngineTilArm:
    """A_til: the edge's request for a diff, straight into AsyncLLM.

    The chat template ran when the prompt was made (D's edge and generator do theirs inside the clock);
    the schema is the one the generator would hand vLLM, prepared (and so validated, with the same
    llguidance) when the prompt was made. Its hand-off is the generator's: SamplingParams built for
    the request inside the clock, its schema marked validated so that vLLM does not validate it again
    on this event loop (`vllm_compat.skip_revalidation`, installed by the engine's start). Until
    session 20 A_til left vLLM to validate every schema again (~3.5 ms a TIL schema); measured at 100
    streams it made no difference to A_til (bench/results/issue13-h200-s20), but now the two do the
    same work.
    """

    name = "engine-til"

    def __init__(self, engine: VllmEngine) -> None:
        self._engine = engine
        self._ids = itertools.count()

    async def open(self) -> None:
        pass

    def _sampling(self, til: TilRequest, output_len: int) -> Any:
        """As the generator's `VllmEngine.generate` builds and marks them."""
        from services.generator import vllm_compat

        kwargs = {"max_tokens": output_len, "ignore_eos": til.ignore_eos, "temperature": 0.0}
        params = vllm_compat.sampling_params(kwargs, json.loads(til.prepared_schema))
        vllm_compat.VALIDATED.add(params.structured_outputs.json)
        return params

    async def one(self, prompt: Prompt, output_len: int) -> RequestRecord:
        from vllm import TokensPrompt

        llm = self._engine.async_llm
        til = _til(prompt)
        eos = llm.get_tokenizer().eos_token_id
        record = RequestRecord(start=time.monotonic(), prompt_tokens=len(prompt.token_ids))
        try:
            params = self._sampling(til, output_len)  # inside the clock, as the generator's is
            tokens = TokensPrompt(prompt_token_ids=list(prompt.token_ids))
            async for out in llm.generate(tokens, params, request_id=f"bench-at-{next(self._ids)}"):
                _engine_queue(record, out)
                ids = out.outputs[0].token_ids
                if ids:
                    record.message_times.append(time.monotonic())
                    if record.constrained_tokens is None and eos in ids:
                        record.constrained_tokens = record.tokens + list(ids).index(eos) + 1
                    record.tokens += len(ids)
        except Exception as exc:
            record.error = _error_name(exc)
        record.end = time.monotonic()
        return record

    async def close(self) -> None:
        pass


def _engine_queue(record: RequestRecord, out: Any) -> None:
    """The in-process arms' `server_queue_ms`: from the hand-off to vLLM until its scheduler first ran
    the request, measured as the generator measures its own (vllm_compat.queue_s)."""
    if record.server_queue_ms is None:
        from services.generator import vllm_compat

        record.server_queue_ms = vllm_compat.queue_s(out, record.start) * 1000


def _til(prompt: Prompt) -> TilRequest:
    if prompt.til is None:
        raise ValueError("a TIL arm was given a plain prompt; TIL arms take TilWorkload prompts")
    return prompt.til


class EngineWrapperArm:
    """A': our GenerationEngine (tokenizes the text itself, as the generator does).

    Each request is prepared, then generated, as the generator's servicer does, so its
    `server_queue_ms` is the generator's own `queue` (prepare, then vLLM's queue).
    """

    name = "engine-wrapper"

    def __init__(self, engine: VllmEngine) -> None:
        self._engine = engine
        self._ids = itertools.count()

    async def open(self) -> None:
        pass

    def _request(self, prompt: Prompt, output_len: int) -> EngineRequest:
        from services.generator.engine import EngineRequest, Sampling

        return EngineRequest(
            request_id=f"bench-w-{next(self._ids)}",
            prompt=prompt.text,
            messages=None,
            max_tokens=output_len,
            sampling=Sampling(temperature=0.0),
            ignore_eos=True,
        )

    async def one(self, prompt: Prompt, output_len: int) -> RequestRecord:
        from services.generator.engine import EngineDelta, EngineStarted

        record = RequestRecord(start=time.monotonic())
        try:
            request = await self._engine.prepare(self._request(prompt, output_len))
            prepared = time.monotonic() - record.start
            async for event in self._engine.generate(request):
                if isinstance(event, EngineDelta):
                    record.message_times.append(time.monotonic())
                    record.tokens += event.token_count
                elif isinstance(event, EngineStarted):
                    record.prompt_tokens = event.prompt_tokens
                    record.server_queue_ms = (prepared + event.queue_s) * 1000
        except Exception as exc:
            record.error = _error_name(exc)
        record.end = time.monotonic()
        return record

    async def close(self) -> None:
        pass


class EngineWrapperTilArm(EngineWrapperArm):
    """A'_til: the edge's request for a diff through our GenerationEngine in this process.

    What the generator does with C_til's request short of its gRPC hop: `VllmEngine.prepare` renders
    and tokenizes the chat and readies the schema (our checks, llguidance's validation) inside the
    clock, then `generate` hands vLLM the same token ids and schema as A_til, with the request's stop
    strings as C_til's (A_til sends none; with ignore_eos and a grammar that closes the JSON first,
    they end nothing early). A'_til less A_til is that work; C_til less A'_til is the hop. The
    benchmark prepared each schema once when the prompt was made, without leaving it in this
    process's cache (bench.til_workload), so this arm readies it again as the generator does. It does
    not see token ids, so its `JSON tok` column is empty.
    """

    name = "engine-wrapper-til"

    def _request(self, prompt: Prompt, output_len: int) -> EngineRequest:
        from services.generator.engine import ChatTurn, EngineRequest, Sampling

        sent = _til(prompt).request()  # inside the clock: the generator parses its request too
        return EngineRequest(
            request_id=f"bench-wt-{next(self._ids)}",
            prompt=None,
            messages=tuple(ChatTurn(m.role, m.content) for m in sent.chat.messages),
            max_tokens=output_len,
            sampling=Sampling(temperature=0.0),
            stop=tuple(sent.stopping.stop),
            ignore_eos=sent.stopping.ignore_eos,
            json_schema=json.loads(sent.output.json_schema),
        )


class OpenAIArm:
    """B: `vllm serve`'s /v1/completions with stream=true, read as server-sent events; B_til
    (`openai-til`): the edge's chat and JSON Schema on /v1/chat/completions."""

    def __init__(self, spec: ArmSpec) -> None:
        self.name = spec.name
        self._til = spec.name == "openai-til"
        path = "/v1/chat/completions" if self._til else "/v1/completions"
        self._url = spec.target.rstrip("/") + path
        self._model = spec.model
        self._client: Any = None

    async def open(self) -> None:
        import httpx

        # No pool limit: every concurrent stream gets its own connection, as separate clients would.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._client = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(_RPC_TIMEOUT_S))

    def _body(self, prompt: Prompt, output_len: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self._model,
            "max_tokens": output_len,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if not self._til:
            return {**body, "prompt": prompt.text, "ignore_eos": True}
        til = _til(prompt)
        # The schema as our generator hands it to vLLM (lengths folded into patterns), so that both
        # pay the same grammar cost.
        return {
            **body,
            "messages": til.messages(),
            "ignore_eos": til.ignore_eos,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "til", "schema": json.loads(til.prepared_schema)},
            },
        }

    async def one(self, prompt: Prompt, output_len: int) -> RequestRecord:
        body = self._body(prompt, output_len)
        record = RequestRecord(start=time.monotonic())
        try:
            async with self._client.stream("POST", self._url, json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and _chunk_text(chunk["choices"][0]):
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


def _chunk_text(choice: dict[str, Any]) -> str:
    """The text of one streamed choice: `text` (completions) or `delta.content` (chat)."""
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


class _GrpcArm:
    """A gRPC arm. Every stream in flight has a connection of its own, as separate users would (and as
    the HTTP arm has), from a pool that grows to the level's concurrency during its warm-up."""

    def __init__(self, spec: ArmSpec) -> None:
        self._target = spec.target
        self._channels: list[Any] = []
        self._free: list[Any] = []
        self._ids = itertools.count()

    def _stub_for(self, channel: Any) -> Any:
        raise NotImplementedError

    async def _connect(self) -> Any:
        import grpc

        options = [
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            # Its own TCP connection, not one shared with every channel to the same target.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        channel = grpc.aio.insecure_channel(self._target, options=options)
        await channel.channel_ready()
        self._channels.append(channel)
        return self._stub_for(channel)

    async def open(self) -> None:
        self._free.append(await self._connect())

    async def _take(self) -> Any:
        """A connection no stream is using (a new one if every one is busy), before the clock starts."""
        return self._free.pop() if self._free else await self._connect()

    async def _timed(
        self, stub: Any, call: Callable[[], Any], *, cache_status: bool = False
    ) -> RequestRecord:
        """Starts `call` (a til.v1 stream: `started`, deltas, `finished`) and reads it into a record, timed
        from just before it starts; `stub`'s connection is free again after it. `cache_status`: the
        edge's, as the record's note."""
        from til.v1 import edge_pb2

        record = RequestRecord(start=time.monotonic())
        finished = False
        try:
            async for message in call():
                kind = message.WhichOneof("event")
                if kind == "delta":
                    record.message_times.append(time.monotonic())
                    record.tokens += message.delta.token_count
                elif kind == "started":
                    record.prompt_tokens = message.started.prompt_tokens
                    if cache_status:
                        record.note = edge_pb2.CacheStatus.Name(message.started.cache_status)
                elif kind == "finished":
                    finished = True
                    record.tokens = message.finished.usage.completion_tokens
                    record.server_ttft_ms = message.finished.timings.time_to_first_token_ms
                    record.server_queue_ms = message.finished.timings.queue_ms
            if not finished:
                record.error = "stream ended without finished"
        except Exception as exc:
            record.error = _error_name(exc)
        record.end = time.monotonic()
        self._free.append(stub)
        return record

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


class GeneratorArm(_GrpcArm):
    """C: til.v1.GeneratorService/Generate with a raw prompt; C_til (`generator-til`): the edge's
    chat and JSON Schema for a diff, as the edge sends them."""

    def __init__(self, spec: ArmSpec) -> None:
        super().__init__(spec)
        self.name = spec.name
        self._til = spec.name == "generator-til"

    def _stub_for(self, channel: Any) -> Any:
        from til.v1 import generator_pb2_grpc

        return generator_pb2_grpc.GeneratorServiceStub(channel)

    def _request(self, prompt: Prompt, output_len: int) -> Any:
        from til.v1 import common_pb2, generator_pb2

        request_id = f"bench-c-{next(self._ids)}"
        sampling = common_pb2.SamplingParams(temperature=0.0)
        if not self._til:
            return generator_pb2.GenerateRequest(
                request_id=request_id,
                prompt=prompt.text,
                sampling=sampling,
                stopping=common_pb2.StoppingCriteria(max_tokens=output_len, ignore_eos=True),
            )
        # The edge's own request for the diff, byte for byte but for its id and (in warm-ups) the budget.
        request = _til(prompt).request()
        request.request_id = request_id
        request.stopping.max_tokens = output_len
        return request

    async def one(self, prompt: Prompt, output_len: int) -> RequestRecord:
        request = self._request(prompt, output_len)
        stub = await self._take()
        from services.common import sent_at

        return await self._timed(
            stub, lambda: stub.Generate(request, timeout=_RPC_TIMEOUT_S, metadata=sent_at.stamp())
        )


class EdgeArm(_GrpcArm):
    """D (`edge`, cache bypassed) and E (`edge-hit`, every request the same seeded diff)."""

    def __init__(self, spec: ArmSpec) -> None:
        super().__init__(spec)
        self.name = spec.name
        self._spec = spec
        self._hit = spec.name == "edge-hit"
        self._seeded: dict[int, Any] = {}

    def _stub_for(self, channel: Any) -> Any:
        from til.v1 import edge_pb2_grpc

        return edge_pb2_grpc.EdgeServiceStub(channel)

    def hit_request(self, output_len: int) -> Any:
        """`edge-hit`: the request this arm sends for `output_len` once it has seeded it (None before)."""
        return self._seeded.get(output_len)

    async def one(self, prompt: Prompt, output_len: int) -> RequestRecord:
        from til.v1 import common_pb2, edge_pb2

        from bench.til_workload import edge_request

        if self._hit:
            if output_len not in self._seeded:
                self._seeded[output_len] = await seed_hit(self._spec, prompt, output_len)
            request = self._seeded[output_len]
        else:
            til = _til(prompt)
            sampling = common_pb2.SamplingParams(temperature=0.0)
            request = edge_request(
                til.diff, output_len, sampling, edge_pb2.CACHE_POLICY_BYPASS, ignore_eos=til.ignore_eos
            )
        stub = await self._take()
        return await self._timed(
            stub, lambda: stub.GenerateTil(request, timeout=_RPC_TIMEOUT_S), cache_status=True
        )


async def seed_hit(spec: ArmSpec, prompt: Prompt, output_len: int) -> Any:
    """Stores a TIL under the edge's key for this prompt's diff through `spec.cacher` (untimed); returns
    the GenerateTilRequest that the edge answers from it: what `edge-hit` sends, whatever its client."""
    import grpc
    from til.v1 import cacher_pb2, cacher_pb2_grpc, common_pb2, edge_pb2

    from bench.til_workload import cache_seed, diff_for, edge_request

    diff = diff_for(prompt)
    sampling = common_pb2.SamplingParams(temperature=0.0)
    seed = cache_seed(diff, output_len, spec.model, sampling, prompt_tokens=len(prompt.token_ids))
    async with grpc.aio.insecure_channel(spec.cacher) as channel:
        await cacher_pb2_grpc.CacherServiceStub(channel).PutEntry(
            cacher_pb2.PutEntryRequest(namespace=seed.namespace, key=seed.key, value_json=seed.value_json),
            timeout=30,
        )
    return edge_request(diff, output_len, sampling, edge_pb2.CACHE_POLICY_UNSPECIFIED)


def network_arm(spec: ArmSpec) -> Arm:
    if spec.name in ("openai", "openai-til"):
        return OpenAIArm(spec)
    if spec.name in ("generator", "generator-til"):
        return GeneratorArm(spec)
    if spec.name in ("edge", "edge-hit"):
        return EdgeArm(spec)
    raise ValueError(f"unknown network arm {spec.name!r}")
