"""Fitting a prompt into the model's context next to the output budget."""

from __future__ import annotations

from til.v1 import generator_pb2

from services.common.errors import InvalidArgument
from services.edge.call import CallContext
from services.edge.clients import TilGenerator
from services.edge.config import EdgeSettings
from services.edge.contract import F, J, OutputBudget, OutputContract
from services.edge.retrieval import Retrieval

# Tokens the chat template adds around the messages, beyond the estimate from their characters.
CHAT_TEMPLATE_TOKENS = 64


async def fit_prompt(
    generator: TilGenerator,
    contract: OutputContract[J, F],
    job: J,
    retrieval: Retrieval,
    info: generator_pb2.GetModelInfoResponse,
    max_tokens: int,
    settings: EdgeSettings,
    ctx: CallContext,
    notices: list[str],
) -> tuple[generator_pb2.ChatMessages, OutputBudget]:
    """The chat, with the contract's body cut to what the context holds, and the output budget."""
    budget = OutputBudget(max_tokens, settings.output_chars_per_token)
    body = contract.body(job)
    if not info.max_model_len or not body:
        return contract.chat(job, retrieval, body), budget
    per_token = settings.prompt_chars_per_token
    frame = contract.chat(job, retrieval, "")
    frame_tokens = sum(len(m.content) for m in frame.messages) / per_token + CHAT_TEMPLATE_TOKENS
    room_tokens = info.max_model_len - max_tokens - frame_tokens
    if room_tokens < 1:
        raise InvalidArgument(
            f"an output budget of {max_tokens} tokens leaves no room for the diff in the model's "
            f"{info.max_model_len}-token context: ask for fewer generation.max_tokens"
        )
    max_chars = int(room_tokens * per_token)
    if len(body) <= max_chars:
        return contract.chat(job, retrieval, body), budget
    cut, notice = contract.cut(body, max_chars)
    notices.append(notice)
    return contract.chat(job, retrieval, cut), budget
