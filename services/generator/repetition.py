"""Repetition control for the llama.cpp engine, on words only.

llama.cpp's own penalties weigh every token of the recent output, so under a JSON Schema they push
the model away from the quotes, colons, newlines, bullets and code fences the document must repeat
(SmolLM2 then never closes an object). This logits processor applies the same three penalties
(repetition as in CTRL, frequency and presence as in OpenAI's API) only to tokens that carry a
letter, digit or non-ASCII character: repeated dates, "TIL" and phrases cost, syntax does not.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def word_tokens(n_vocab: int, piece: Callable[[int], bytes]) -> np.ndarray:
    """Booleans over the vocabulary: the tokens whose text holds a letter, a digit or non-ASCII (JSON's
    escaped newline and tab aside: they are the document's line structure), or an escaped quote (small
    models loop on runs of them)."""
    wordy = np.zeros(n_vocab, dtype=bool)
    for token in range(n_vocab):
        text = piece(token)
        bare = text.replace(b"\\n", b"").replace(b"\\t", b"").replace(b"\\r", b"")
        wordy[token] = b'\\"' in text or any(b >= 0x80 or chr(b).isalnum() for b in bare)
    return wordy


class RepetitionPenalty:
    """A llama-cpp-python logits processor over the last `last_n` generated tokens."""

    def __init__(
        self, wordy: np.ndarray, *, repetition: float, frequency: float, presence: float, last_n: int
    ) -> None:
        self._wordy = wordy
        self._repetition = repetition
        self._frequency = frequency
        self._presence = presence
        self._last_n = last_n
        self._prompt: int | None = None  # llama-cpp-python passes the prompt's tokens too

    @property
    def active(self) -> bool:
        return self._last_n > 0 and (self._repetition != 1 or self._frequency != 0 or self._presence != 0)

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if self._prompt is None:
            self._prompt = len(input_ids)
        start = max(self._prompt, len(input_ids) - self._last_n)
        recent = np.asarray(input_ids[start:], dtype=np.intp)
        if recent.size == 0:
            return scores
        ids, counts = np.unique(recent, return_counts=True)
        keep = self._wordy[ids]
        ids, counts = ids[keep], counts[keep]
        if ids.size:
            logits = scores[ids]
            if self._repetition != 1:
                logits = np.where(logits > 0, logits / self._repetition, logits * self._repetition)
            scores[ids] = logits - counts * self._frequency - self._presence
        return scores
