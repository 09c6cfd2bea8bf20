"""How the llama.cpp engine turns chat turns into a prompt (GENERATOR_CHAT_FORMAT).

- "" (the default): the GGUF's own chat template; a model without one (a base model) gets the
  plain rendering, so a caller never has to know which kind of model is loaded;
- "plain": the plain rendering, for a base model whose GGUF carries a template anyway;
- any chat format llama-cpp-python registers (chatml, gemma, llama-2, llama-3, mistral-instruct,
  qwen, zephyr, ...), rendered by llama-cpp-python's own formatter.

The plain rendering puts the system text first, then each turn after a "User:" or "Assistant:"
label, and ends with "Assistant:" on its own line, the shape base models continue well.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llama_cpp import llama_chat_format

from services.generator.engine import ChatTurn

PLAIN = "plain"
GGUF = ""


@dataclass(frozen=True)
class RenderedChat:
    text: str
    # Whether the tokenizer should add the beginning-of-sequence token (the text has none).
    add_bos: bool
    # Whether markers of special tokens in the text are read as those tokens (template output)
    # or as text (plain rendering, where they can only come from the turns' contents).
    special: bool


Renderer = Callable[[Sequence[ChatTurn]], RenderedChat]


def registered_formats() -> list[str]:
    """The chat formats llama-cpp-python registers (handlers that only format a prompt)."""
    handlers = llama_chat_format.LlamaChatCompletionHandlerRegistry()._chat_handlers
    return sorted(name for name, handler in handlers.items() if _formatter_of(handler) is not None)


def check_format(name: str) -> None:
    """ValueError naming the choices, for a GENERATOR_CHAT_FORMAT this engine cannot use."""
    if name in (GGUF, PLAIN) or name in registered_formats():
        return
    raise ValueError(
        f"unknown chat format {name!r}: leave it empty for the model's own template, or use "
        f"{PLAIN!r} or one of llama-cpp-python's: {', '.join(registered_formats())}"
    )


def chat_renderer(name: str, *, template: str | None, bos_token: str, eos_token: str) -> tuple[str, Renderer]:
    """(what the engine reports, the renderer) for GENERATOR_CHAT_FORMAT `name` and the GGUF's
    `template` (None when it has none)."""
    if name == GGUF and template:
        jinja = llama_chat_format.Jinja2ChatFormatter(
            template=template, eos_token=eos_token, bos_token=bos_token, add_generation_prompt=True
        )
        return "gguf", _from_formatter(jinja)
    if name in (GGUF, PLAIN):
        return PLAIN if name == PLAIN else "plain (the GGUF has no chat template)", render_plain
    check_format(name)
    handler = llama_chat_format.get_chat_completion_handler(name)
    formatter = _formatter_of(handler)
    assert formatter is not None
    return name, _from_formatter(formatter)


def render_plain(turns: Sequence[ChatTurn]) -> RenderedChat:
    parts = []
    for turn in turns:
        if turn.role == "system":
            parts.append(turn.content)
        else:
            parts.append(f"{'User' if turn.role == 'user' else 'Assistant'}: {turn.content}")
    parts.append("Assistant:\n")
    return RenderedChat("\n\n".join(parts), add_bos=True, special=False)


def _from_formatter(formatter: Callable[..., Any]) -> Renderer:
    def render(turns: Sequence[ChatTurn]) -> RenderedChat:
        messages: Any = [{"role": turn.role, "content": turn.content} for turn in turns]
        response = formatter(messages=messages)
        return RenderedChat(response.prompt, add_bos=not response.added_special, special=True)

    return render


def _formatter_of(handler: Any) -> Callable[..., Any] | None:
    """The prompt formatter a registered format's handler wraps (`chat_formatter_to_chat_completion_handler`),
    or None for handlers that do more than format (function calling, vision)."""
    try:
        formatter = inspect.getclosurevars(handler).nonlocals.get("chat_formatter")
    except TypeError:
        return None
    return formatter if callable(formatter) else None
