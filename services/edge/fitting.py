"""Fitting a prompt into the model's context next to the output budget, with the model's own tokenizer.

One Tokenize call per request counts the whole prompt; only when it does not fit, a second counts the
part of it that may be cut (with the end offset of each token, so a cut lands on a token boundary).
Once per model, a sample of Korean Markdown is counted too (how densely the tokenizer packs what the
model writes, to bound free text in the schema). Nothing is estimated from characters: Korean and code
break every ratio.
"""

from __future__ import annotations

from collections.abc import Sequence

from til.v1 import generator_pb2

from services.common.errors import InvalidArgument
from services.edge.call import CallContext
from services.edge.clients import TilGenerator
from services.edge.contract import F, J, OutputBudget, OutputContract
from services.edge.retrieval import Retrieval

# What the model writes at its least dense: Korean prose in Markdown (code packs more into a token).
OUTPUT_SAMPLE = (
    "# 2024-05-01 TIL\n\n"
    "- 사용자 조회 결과를 캐시에 저장하여 데이터베이스 호출을 줄인다.\n"
    "- 만료 시간을 두어 오래된 데이터가 남지 않도록 한다.\n"
    "- 캐시 미스가 발생하면 데이터베이스에서 읽은 뒤 캐시에 다시 기록한다.\n"
    "유지보수성과 확장성을 함께 고려해야 하며, 장애 상황에서의 동작도 검토해야 한다.\n"
)
# Tokens a cut body may differ by from its count alone, once it sits in the prompt (merges at its edges,
# escaping of the tags it sits in).
EDGE_TOKENS = 16


class PromptFitter:
    """Fits prompts with the generator's tokenizer. How densely the model's tokenizer packs Korean
    Markdown is the same for every request to one model: it is counted once per model id. A request
    then costs one Tokenize call (the chat) when its prompt fits, and a second (the body, with token
    offsets) only when the body must be cut."""

    def __init__(self, generator: TilGenerator) -> None:
        self._generator = generator
        self._chars_per_token: dict[str, float] = {}

    async def fit(
        self,
        contract: OutputContract[J, F],
        job: J,
        retrieval: Retrieval,
        max_tokens: int,
        ctx: CallContext,
        notices: list[str],
    ) -> tuple[generator_pb2.ChatMessages, str, OutputBudget]:
        """The chat, with the contract's body cut to what the context holds; the body as shown; the budget."""
        model = (await self._generator.model_info(timeout=ctx.remaining())).model
        density = self._chars_per_token.get(model)
        body = contract.body(job)
        chat = contract.chat(job, retrieval, body)
        inputs = [generator_pb2.TokenizeInput(chat=chat)]
        if density is None:
            inputs.append(generator_pb2.TokenizeInput(text=OUTPUT_SAMPLE))
        counted = await self._generator.tokenize(
            generator_pb2.TokenizeRequest(inputs=inputs), timeout=ctx.remaining()
        )
        prompt = counted.results[0]
        if density is None:
            density = len(OUTPUT_SAMPLE) / max(counted.results[1].token_count, 1)
            self._chars_per_token[model] = density
        budget = OutputBudget(max_tokens, density)
        context = counted.max_model_len
        if not context or prompt.token_count + max_tokens <= context:
            return chat, body, budget
        if not body:
            raise InvalidArgument(
                f"the prompt is {prompt.token_count} tokens and the output budget {max_tokens}: together more "
                f"than the model's {context}-token context; shorten {contract.shortened} or ask for fewer "
                "generation.max_tokens"
            )
        counted = await self._generator.tokenize(
            generator_pb2.TokenizeRequest(
                inputs=[generator_pb2.TokenizeInput(text=body)], return_offsets=True
            ),
            timeout=ctx.remaining(),
        )
        whole = counted.results[0]
        room = context - max_tokens - (prompt.token_count - whole.token_count) - EDGE_TOKENS
        if room < 1:
            raise InvalidArgument(
                f"an output budget of {max_tokens} tokens leaves no room for the {contract.shortened} in the "
                f"model's {context}-token context: ask for fewer generation.max_tokens"
            )
        cut, notice = contract.cut(body, _chars_in(whole.offsets, room))
        notices.append(notice)
        return contract.chat(job, retrieval, cut), cut, budget


def _chars_in(offsets: Sequence[int], tokens: int) -> int:
    """The characters the first `tokens` tokens cover."""
    return int(offsets[min(tokens, len(offsets)) - 1]) if offsets else 0
