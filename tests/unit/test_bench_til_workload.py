"""The benchmark's TIL workload: the request every TIL arm sends is the one the real edge sends for the
same diff, prompts have the exact length asked for, and every arm gets the same diffs in the same order.
A word-level tokenizer stands in for the model's; the edge runs in process against fakes."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import pytest
from til.v1 import common_pb2, edge_pb2

from bench.prompts import PromptFactory
from bench.til_workload import (
    TilPool,
    TilWorkload,
    cache_seed,
    diff_of_words,
    edge_generate_request,
    edge_request,
    edge_settings,
)
from tests.unit.test_edge_service import FakeGenerator, edge_stack


class WordTokenizer:
    """One token per whitespace-separated word; a chat template that wraps each message."""

    eos_token_id = 0

    def __init__(self) -> None:
        letters = "abcdefgh"
        self.vocab = ["<eos>", *("".join(w) for w in itertools.product(letters, repeat=4))]
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def decode(self, ids: list[int]) -> str:
        return "".join(" " + self.vocab[i] for i in ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        out = []
        for word in text.split():
            if word not in self.ids:
                self.ids[word] = len(self.vocab)
                self.vocab.append(word)
            out.append(self.ids[word])
        return out

    def __call__(self, text: str, **kwargs: Any) -> dict[str, Any]:
        """The fast-tokenizer call the generator's token counting makes (ids and character spans)."""
        spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        return {"input_ids": self.encode(text), "offset_mapping": spans}

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, tokenize: bool, add_generation_prompt: bool
    ) -> str:
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}> {m['content']} </{m['role']}> " for m in messages) + "<assistant>"


SETTINGS: dict[str, Any] = {
    "retrieval_top_k": 0,
    "question_history_k": 0,
    "index_tils": False,
    "allow_ignore_eos": True,
}


async def test_every_arm_sends_what_the_real_edge_sends_for_the_same_diff() -> None:
    tokenizer = WordTokenizer()
    # The edge's generator counts tokens as the model's tokenizer (here one a word) does.
    generator = FakeGenerator(text_tokens=lambda text: [m.end() for m in re.finditer(r"\S+", text)])
    async with edge_stack(generator=generator, **SETTINGS) as stack:
        info = await stack.generator.GetModelInfo(None, None)
        workload = TilWorkload(
            tokenizer,
            PromptFactory(tokenizer, seed=3),
            target_tokens=700,
            output_len=256,
            info=info,
            settings=edge_settings(),
        )
        items = [await workload.item(i) for i in range(3)]
        for item in items:
            assert item.til is not None
            sampling = common_pb2.SamplingParams(temperature=0.0)
            await stack.til(
                edge_request(item.til.diff, 256, sampling, edge_pb2.CACHE_POLICY_BYPASS, ignore_eos=True)
            )
    assert len(stack.generator.requests) == 3
    for item, sent in zip(items, stack.generator.requests, strict=True):
        assert item.til is not None
        ours = item.til.request()
        ours.request_id = sent.request_id = ""
        assert ours == sent  # chat, schema with its content budget, sampling and stopping, byte for byte
        assert (item.til.max_tokens, item.til.ignore_eos) == (256, True)
        assert item.til.schema() == json.loads(sent.output.json_schema)
        assert item.text == item.til.diff and "+++ b/notes/bench.md" in item.til.diff


async def test_token_counts_come_from_the_running_generator_as_the_edges_do() -> None:
    """The fake generator counts up to 4 ASCII characters a token, the benchmark's tokenizer a word a
    token: the edge's budget follows the generator's counts, and so does the benchmark's copy."""
    from til.v1 import generator_pb2_grpc

    from services.common.server import Service
    from tests.conftest import in_process_server

    tokenizer = WordTokenizer()
    async with edge_stack(**SETTINGS) as stack:
        add = generator_pb2_grpc.add_GeneratorServiceServicer_to_server
        tokenize = Service("til.v1.GeneratorService", lambda server: add(stack.generator, server))
        async with in_process_server([tokenize]) as (server, _):
            info = await stack.generator.GetModelInfo(None, None)

            def workload(addr: str | None) -> TilWorkload:
                return TilWorkload(
                    tokenizer,
                    PromptFactory(tokenizer, seed=3),
                    target_tokens=700,
                    output_len=256,
                    info=info,
                    settings=edge_settings(),
                    tokenize_addr=addr,
                )

            forwarded = await workload(f"127.0.0.1:{server.port}").item(0)
            assert forwarded.til is not None
            local = await edge_generate_request(forwarded.til.diff, 256, info, edge_settings(), tokenizer)
            sampling = common_pb2.SamplingParams(temperature=0.0)
            await stack.til(
                edge_request(forwarded.til.diff, 256, sampling, edge_pb2.CACHE_POLICY_BYPASS, ignore_eos=True)
            )
    (sent,) = stack.generator.requests
    sent.request_id = ""
    ours = forwarded.til.request()
    ours.request_id = ""
    assert ours == sent
    # Counted by the word, the same diff gets another request: the counts are what made them equal.
    local.request_id = ""
    assert local != sent


async def test_prompts_have_the_exact_length_and_every_arm_the_same_diffs_in_order() -> None:
    tokenizer = WordTokenizer()
    from til.v1 import generator_pb2

    info = generator_pb2.GetModelInfoResponse(model="m", max_model_len=4096, default_max_tokens=1024)
    workload = TilWorkload(
        tokenizer,
        PromptFactory(tokenizer, seed=5),
        target_tokens=650,
        output_len=128,
        info=info,
        settings=edge_settings(),
    )
    from services.generator import vllm_inputs

    vllm_inputs._prepared_schema.cache_clear()
    a, b = TilPool(workload), TilPool(workload)
    first_a = await a.take(4)
    # Prepared for A_til and B_til without being kept: engine-wrapper-til readies each schema again in
    # this process, as the generator does.
    assert vllm_inputs._prepared_schema.cache_info().currsize == 0
    first_b = await b.take(2) + await b.take(2)
    assert [p.til.diff for p in first_a] == [p.til.diff for p in first_b]  # type: ignore[union-attr]
    assert len({p.til.diff for p in first_a}) == 4  # type: ignore[union-attr]  # fresh diffs within an arm
    from services.generator.vllm_inputs import prepared_schema

    for prompt in first_a:
        assert len(prompt.token_ids) == 650
        # A_til and B_til send the schema as the generator hands it to vLLM.
        assert json.loads(prompt.til.prepared_schema) == prepared_schema(prompt.til.schema())  # type: ignore[union-attr]
        assert prompt.token_ids == tuple(
            tokenizer.encode(
                tokenizer.apply_chat_template(
                    prompt.til.messages(), tokenize=False, add_generation_prompt=True
                )  # type: ignore[union-attr]
            )
        )


async def test_a_target_below_the_chat_frame_is_refused() -> None:
    tokenizer = WordTokenizer()
    from til.v1 import generator_pb2

    info = generator_pb2.GetModelInfoResponse(model="m", max_model_len=4096)
    workload = TilWorkload(
        tokenizer,
        PromptFactory(tokenizer, seed=1),
        target_tokens=20,
        output_len=64,
        info=info,
        settings=edge_settings(),
    )
    with pytest.raises(ValueError, match="ask for more than that"):
        await workload.item(0)


async def test_the_tils_that_edge_hit_replays_meet_the_edges_contract_for_their_diff() -> None:
    """E replays a seeded TIL per diff: the edge serves it as a hit, and it breaks no rule of the format."""
    generator = FakeGenerator()
    sampling = common_pb2.SamplingParams(temperature=0.0)
    async with edge_stack(generator=generator, retrieval_top_k=0) as stack:
        for words in (["alpha", "beta"] * 40, ["캐시", "설정", "query_cache()"] * 30):
            diff = diff_of_words(words)
            seed = cache_seed(diff, 256, generator.model, sampling)
            stack.cacher.entries[(seed.namespace, seed.key)] = seed.value_json
            messages = await stack.til(edge_request(diff, 256, sampling, edge_pb2.CACHE_POLICY_UNSPECIFIED))
            started, finished = messages[0].started, messages[-1].finished
            assert started.cache_status == edge_pb2.CACHE_STATUS_HIT
            assert list(finished.violations) == []
            assert diff.splitlines()[4][1:] in finished.til.content  # the diff's first added line, quoted
    assert generator.requests == []
