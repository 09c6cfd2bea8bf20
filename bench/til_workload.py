"""The TIL workload: what the edge sends the generator for a diff, taken from the edge's own code path so
that every TIL arm sends exactly the same request.

For each diff, `TilWorkload` runs the edge's `TilPipeline` (validation, redaction, diff fitting, the
chat, the JSON Schema with its content budget, the stopping rule) against a generator stand-in that
records the `GenerateRequest` the edge would send and goes no further. The arms then send that request:
`generator-til` (C_til) as it is, `engine-til` (A_til) as the chat template's token ids plus the
schema, `openai-til` (B_til) as chat messages plus the schema, and `edge` (D) sends the diff itself
with the same overrides, so the real edge builds the same request again. Whatever the edge's code
does to the request (a new budget rule, a new schema), every arm follows.

Every request yields the same number of tokens by construction: the benchmark asks for
`generation.ignore_eos` (edge: `EDGE_ALLOW_IGNORE_EOS=true`), so generation runs to max_tokens. Under
a grammar, vLLM masks every token but end-of-sequence once the JSON is closed; with ignore_eos the
end-of-sequence token does not stop the request, the grammar counts as terminated and the rest is
unconstrained. Diffs are sized so that the chat prompt has exactly `target_tokens` tokens (within a
few where the tokenizer will not allow it; rows show the mean).

Arm E (`edge-hit`) needs a cached TIL. A model with random weights never closes the TIL's JSON within
a few hundred tokens, so the edge would never store one; `cache_seed` stores a TIL under the key the
edge computes for the request, through the cacher's own API.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from bench.prompts import Prompt, PromptFactory

DATE = "2025-01-01"
LANGUAGE = "markdown"
COMMIT_MESSAGES = ("Add benchmark notes",)
WORDS_PER_LINE = 12


# A TIL that meets every rule of the format (for the cache seed).
def seed_til(diff: str) -> dict[str, Any]:
    """The TIL that `edge-hit` replays for `diff`: one that meets the edge's TIL contract for it (the
    title and keyword layout, a bullet with a fenced block quoting the diff's first added line)."""
    from services.edge.diffs import changed_files
    from services.edge.til_format import fence_language, guess_language

    added = next(
        line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")
    )
    fence = fence_language(guess_language(changed_files(diff)))
    return {
        "title": f"{DATE} TIL - 벤치마크 메모",
        "keywords": ["벤치마크", "Markdown 메모", "캐시 설정"],
        "content": f"# {DATE} TIL\n\n- 벤치마크 메모가 추가되었다.\n```{fence}\n{added}\n```\n",
    }


def diff_of_words(words: list[str], tail: list[str] | None = None) -> str:
    """A unified diff that adds `words` as a Markdown file, `tail` all on its last line (a word there is
    one token, where one that starts a line costs more: the way to size a prompt to the token)."""
    lines = [" ".join(words[i : i + WORDS_PER_LINE]) for i in range(0, len(words), WORDS_PER_LINE)]
    if tail:
        lines[-1] = " ".join([lines[-1], *tail])
    header = (
        "diff --git a/notes/bench.md b/notes/bench.md\n"
        "--- a/notes/bench.md\n+++ b/notes/bench.md\n"
        f"@@ -0,0 +1,{len(lines)} @@\n"
    )
    return header + "".join(f"+{line}\n" for line in lines)


def diff_for(prompt: Prompt) -> str:
    """The diff a prompt stands for: its own (TIL prompts), or one made of its words."""
    if prompt.til is not None:
        return prompt.til.diff
    return diff_of_words(prompt.text.split())


def edge_request(diff: str, output_len: int, sampling: Any, policy: int, *, ignore_eos: bool = False) -> Any:
    """The GenerateTil request the benchmark sends the edge for `diff`."""
    from til.v1 import edge_pb2

    return edge_pb2.GenerateTilRequest(
        diff=diff,
        commit_messages=list(COMMIT_MESSAGES),
        language=LANGUAGE,
        date=DATE,
        generation=edge_pb2.GenerationOverrides(
            sampling=sampling, max_tokens=output_len, ignore_eos=ignore_eos
        ),
        cache_policy=policy,
        owner="bench",
    )


def edge_settings(**overrides: Any) -> Any:
    """The edge's settings as the benchmark's edge runs: its EDGE_* environment, with retrieval, indexing
    and the cache out of the way (D is edge -> generator) and ignore_eos allowed."""
    from services.edge.config import EdgeSettings

    fixed: dict[str, Any] = {
        "retrieval_top_k": 0,
        "question_history_k": 0,
        "index_tils": False,
        "allow_ignore_eos": True,
    }
    return EdgeSettings(**{**fixed, **overrides})


@dataclass(frozen=True)
class TilRequest:
    """One TIL request as every TIL arm sends it."""

    diff: str
    # generator_pb2.GenerateRequest, serialized (it travels to client processes): what the edge sends.
    generate_request: bytes
    # Its JSON Schema as the generator hands it to llguidance (services.generator.vllm_inputs), as JSON.
    prepared_schema: str = "{}"

    def request(self) -> Any:
        from til.v1 import generator_pb2

        return generator_pb2.GenerateRequest.FromString(self.generate_request)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.request().chat.messages]

    def schema(self) -> dict[str, Any]:
        return dict(json.loads(self.request().output.json_schema))

    @property
    def max_tokens(self) -> int:
        return int(self.request().stopping.max_tokens)

    @property
    def ignore_eos(self) -> bool:
        return bool(self.request().stopping.ignore_eos)


class _Captured(Exception):
    def __init__(self, request: Any) -> None:
        super().__init__("captured")
        self.request = request


class _RecordingGenerator:
    """Stands in for the generator client: answers model_info, counts tokens (through the running
    generator's own Tokenize when there is one, else with the model's tokenizer, as that Tokenize does),
    and records the first generate()."""

    def __init__(self, info: Any, tokenizer: Any, tokenize_stub: Any = None) -> None:
        self._info = info
        self._tok = tokenizer
        self._stub = tokenize_stub

    async def tokenize(self, request: Any, *, timeout: float | None) -> Any:
        from til.v1 import generator_pb2

        if self._stub is not None:
            return await self._stub.Tokenize(request, timeout=30.0)
        from services.generator.vllm_inputs import count_tokens

        # What the vLLM generator's Tokenize answers, computed here with the same function.
        inputs = [
            item.text if item.WhichOneof("input") == "text" else tuple(item.chat.messages)
            for item in request.inputs
        ]
        counts = count_tokens(self._tok, inputs, request.return_offsets)
        results = [generator_pb2.TokenizeResult(token_count=c.count, offsets=c.offsets or ()) for c in counts]
        return generator_pb2.TokenizeResponse(results=results, max_model_len=self._info.max_model_len)

    async def model_info(self, *, timeout: float | None = None) -> Any:
        return self._info

    async def generate(self, request: Any, *, timeout: float | None) -> AsyncGenerator[Any, None]:
        raise _Captured(request)
        yield  # an async generator, as the real client's


class _Nothing:
    """Cache and document store that are never reached (the request bypasses the cache, retrieval is off)."""

    async def get(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("the benchmark's edge pipeline reached the cache or the retriever")

    put = search = upsert = get


async def edge_generate_request(
    diff: str, output_len: int, info: Any, settings: Any, tokenizer: Any, tokenize_stub: Any = None
) -> Any:
    """The GenerateRequest the edge sends the generator for `diff` (asking for ignore_eos), built by the
    edge's own pipeline; `info` is the generator's GetModelInfoResponse, `tokenize_stub` a
    GeneratorServiceStub whose Tokenize the edge's token counts come from (None: `tokenizer`'s)."""
    from til.v1 import common_pb2, edge_pb2

    from services.edge.call import CallContext
    from services.edge.til import TilPipeline

    recording = _RecordingGenerator(info, tokenizer, tokenize_stub)
    pipeline = TilPipeline(recording, _Nothing(), _Nothing(), settings)  # type: ignore[arg-type]
    request = edge_request(
        diff,
        output_len,
        common_pb2.SamplingParams(temperature=0.0),
        edge_pb2.CACHE_POLICY_BYPASS,
        ignore_eos=True,
    )
    try:
        async for _ in pipeline.generate(pipeline.job(request), CallContext(request_id="bench")):
            pass
    except _Captured as captured:
        return captured.request
    raise RuntimeError("the edge's pipeline finished without calling the generator")


class TilWorkload:
    """Makes TIL prompts: diffs of fresh random words whose edge chat has `target_tokens` tokens.

    `item(i)` is the same diff for every arm that asks for index i, so every TIL arm sends the same
    diffs in the same order; each is made once.
    """

    def __init__(
        self,
        tokenizer: Any,
        factory: PromptFactory,
        *,
        target_tokens: int,
        output_len: int,
        info: Any,
        settings: Any,
        tokenize_addr: str | None = None,
    ) -> None:
        """`tokenize_addr`: a running generator whose Tokenize counts tokens for the edge's code, as it
        does for the real edge (None: the benchmark counts with `tokenizer`)."""
        self._tok = tokenizer
        self._tokenize_addr = tokenize_addr
        self._stub: Any = None
        self._factory = factory
        self.target_tokens = target_tokens
        self.output_len = output_len
        self._info = info
        self._settings = settings
        self._items: list[Prompt] = []
        self._words: int | None = None

    async def _measure(self, words: list[str], tail: list[str] | None = None) -> tuple[Prompt, int]:
        diff = diff_of_words(words, tail)
        if self._tokenize_addr and self._stub is None:
            import grpc
            from til.v1 import generator_pb2_grpc

            # Opened once, in the loop that makes the prompts; it lives as long as the workload.
            self._stub = generator_pb2_grpc.GeneratorServiceStub(
                grpc.aio.insecure_channel(self._tokenize_addr)
            )
        request = await edge_generate_request(
            diff, self.output_len, self._info, self._settings, self._tok, self._stub
        )
        from services.generator.vllm_inputs import chat_tokens

        til = TilRequest(diff=diff, generate_request=request.SerializeToString())
        ids = chat_tokens(self._tok, request.chat.messages)
        return Prompt(text=diff, token_ids=tuple(ids), til=til), len(ids)

    async def _start_words(self) -> int:
        """How many words a diff needs for the chat to have about `target_tokens` (found once)."""
        if self._words is None:
            probe = self._factory.make(self.target_tokens).text.split()
            _, frame = await self._measure(probe[:1])
            if frame >= self.target_tokens:
                raise ValueError(
                    f"the TIL prompt has {frame} tokens with a one-word diff; ask for more than that"
                )
            low, high = 1, len(probe)
            while low < high:  # the last size not above the target
                mid = (low + high + 1) // 2
                if (await self._measure(probe[:mid]))[1] <= self.target_tokens:
                    low = mid
                else:
                    high = mid - 1
            self._words = low
        return self._words

    async def _make(self) -> Prompt:
        words = self._factory.make(await self._start_words() + 2).text.split()[: self._words]
        tail: list[str] = []
        prompt, count = await self._measure(words)
        best = (prompt, count)
        for _ in range(16):  # words on the last line are a token each: add or drop them until exact
            if count == self.target_tokens:
                return prompt
            if count < self.target_tokens:
                short = self.target_tokens - count
                tail += self._factory.make(short + 1).text.split()[:short]
            elif tail:
                tail.pop()
            else:
                words = words[:-1]
            prompt, count = await self._measure(words, tail)
            if self._distance(count) < self._distance(best[1]):
                best = (prompt, count)
        return best[0]

    def _distance(self, count: int) -> tuple[int, bool]:
        """How far a prompt is from the target; under it beats over it (over may not fit the context)."""
        return abs(count - self.target_tokens), count > self.target_tokens

    async def item(self, index: int) -> Prompt:
        from services.generator.vllm_inputs import prepared_schema_uncached, schema_key

        while len(self._items) <= index:
            prompt = await self._make()
            assert prompt.til is not None
            # The schema as the generator hands it to llguidance, prepared once for every arm, and not
            # kept in this process's cache: engine-wrapper-til readies it again, as the generator does.
            prepared = prepared_schema_uncached(schema_key(prompt.til.schema()))
            til = dataclasses.replace(prompt.til, prepared_schema=prepared)
            self._items.append(dataclasses.replace(prompt, til=til))
        return self._items[index]


class TilPool:
    """One TIL arm's prompts: the workload's items in order, each taken once by this arm."""

    def __init__(self, workload: TilWorkload) -> None:
        self._workload = workload
        self._next = 0

    async def take(self, count: int) -> list[Prompt]:
        out = [await self._workload.item(self._next + i) for i in range(count)]
        self._next += count
        return out


@dataclass(frozen=True)
class CacheSeed:
    namespace: str
    key: str
    value_json: str


def cache_seed(diff: str, output_len: int, model: str, sampling: Any, prompt_tokens: int = 0) -> CacheSeed:
    """The entry the edge would store after generating a TIL for this GenerateTil request."""
    from til.v1 import common_pb2

    from services.edge.cache import envelope
    from services.edge.config import EdgeSettings
    from services.edge.til import TIL_NAMESPACE, TilPipeline

    request = edge_request(diff, output_len, sampling, policy=0)
    pipeline = TilPipeline(None, None, None, EdgeSettings())  # type: ignore[arg-type]
    job = pipeline.job(request)
    key = TilPipeline.cache_key(job, model=model, max_tokens=job.max_tokens)
    til_json = json.dumps(seed_til(diff), ensure_ascii=False)
    usage = common_pb2.TokenUsage(prompt_tokens=prompt_tokens, completion_tokens=output_len)
    return CacheSeed(TIL_NAMESPACE, key, envelope(json_text=til_json, model=model, usage=usage, til_id=""))
