"""Benchmark prompts whose token count is exact under the served model's tokenizer.

Every request gets a fresh prompt: repeating one would let vLLM's prefix cache skip the prefill
and flatter whichever arm ran second.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.til_workload import TilRequest

# Whole lower-case words with a leading space: text made of them re-tokenizes stably.
_WORD = re.compile(r"^ [a-z]{3,12}$")


@dataclass(frozen=True)
class Prompt:
    text: str
    # `text` tokenized as a server tokenizes a raw prompt (with BOS where the model adds one); for a TIL
    # prompt, the edge's chat for the diff in `text` as the generator tokenizes it.
    token_ids: tuple[int, ...]
    # TIL prompts: the request every TIL arm sends (bench/til_workload.py).
    til: TilRequest | None = None


class PromptFactory:
    """Makes prompts of exactly `n` tokens from random words of the tokenizer's vocabulary."""

    def __init__(self, tokenizer: Any, seed: int = 0) -> None:
        self._tok = tokenizer
        self._rng = random.Random(seed)
        self._special = len(tokenizer.encode(""))
        words = [i for i in range(len(tokenizer)) if _WORD.match(tokenizer.decode([i]))]
        if len(words) < 100:
            raise ValueError("the tokenizer has too few plain word tokens to build prompts from")
        self._words = words

    def make(self, n: int) -> Prompt:
        target = n - self._special
        if target < 1:
            raise ValueError(f"a prompt needs more than {self._special} tokens")
        ids = self._rng.choices(self._words, k=target)
        for _ in range(20):
            text = self._tok.decode(ids)
            again = self._tok.encode(text, add_special_tokens=False)
            if len(again) == target:
                return Prompt(text=text, token_ids=tuple(self._tok.encode(text)))
            # Cut or pad the re-tokenized ids and try again; this settles in a step or two.
            ids = again[:target] + self._rng.choices(self._words, k=max(0, target - len(again)))
        raise RuntimeError(f"could not build a prompt of exactly {n} tokens")

    def stream(self, n: int) -> Iterator[Prompt]:
        while True:
            yield self.make(n)


def load_dataset(path: Path, tokenizer: Any) -> list[Prompt]:
    """Prompts from a JSON Lines file with one {"prompt": "..."} object a line."""
    prompts = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: expected an object with a 'prompt' string") from exc
            prompts.append(Prompt(text=text, token_ids=tuple(tokenizer.encode(text))))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


class PromptPool:
    """Hands out prompts: fixed-length ones without end, or a dataset's in turn (repeating)."""

    def __init__(self, factory: PromptFactory | None, input_len: int, dataset: list[Prompt] | None) -> None:
        self._factory = factory
        self._input_len = input_len
        self._dataset = dataset
        self._next = 0

    def take(self, count: int) -> list[Prompt]:
        if self._dataset is not None:
            out = [self._dataset[(self._next + i) % len(self._dataset)] for i in range(count)]
            self._next += count
            return out
        assert self._factory is not None
        return [self._factory.make(self._input_len) for _ in range(count)]
