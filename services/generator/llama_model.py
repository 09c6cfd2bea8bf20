"""The llama.cpp model and its vocabulary, for the llama.cpp engine: loading, token pieces, offsets."""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import Llama

from services.generator.repetition import word_tokens

_PARAMS_LOCK = threading.Lock()


def load_llama(**kwargs: Any) -> Llama:
    """`Llama(**kwargs)` without llama.cpp's extra buffer types (weight repacking, AMX kernels).

    On an AMX-capable Xeon in a VM, a build of llama-cpp-python 0.3.36 for the host CPU segfaults
    on the first batch of more than one token when those buffers are in use; the plain CPU buffers
    are as fast for small models. `Llama` has no argument for it, so its default model parameters
    are adjusted while it loads.
    """
    import llama_cpp.llama as llama_module

    defaults = llama_module.llama_cpp.llama_model_default_params

    def params() -> Any:
        value = defaults()
        value.use_extra_bufts = False
        return value

    with _PARAMS_LOCK:
        llama_module.llama_cpp.llama_model_default_params = params
        try:
            return Llama(**kwargs)
        finally:
            llama_module.llama_cpp.llama_model_default_params = defaults


class Vocabulary:
    """A model's tokens as bytes, read once at load."""

    def __init__(self, llama: Llama) -> None:
        self.vocab = llama_cpp.llama_model_get_vocab(llama.model)
        self.pieces = [_piece(self.vocab, token) for token in range(llama.n_vocab())]
        # No token is longer than this: a text's size bounds its token count from below, cheaply.
        self.max_piece_bytes = max(1, *map(len, self.pieces))
        # Tokens with a letter, digit or non-ASCII byte (what repetition penalties weigh).
        self.words = word_tokens(len(self.pieces), self.pieces.__getitem__)

    def text(self, token: int) -> str:
        """A token's text as the vocabulary spells it (for BOS/EOS in chat templates)."""
        if token < 0:
            return ""
        return (llama_cpp.llama_vocab_get_text(self.vocab, token) or b"").decode("utf-8", "replace")

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def end_offsets(self, text: str, tokens: list[int]) -> tuple[int, ...]:
        """The end of each token in `text`, in code points (see `GenerationEngine.tokenize`)."""
        data = text.encode("utf-8")
        ends = np.fromiter(
            itertools.accumulate(len(self.pieces[t]) for t in tokens), dtype=np.int64, count=len(tokens)
        )
        if ends.size and ends[-1] > len(data):  # SentencePiece vocabularies add a leading space
            ends -= ends[-1] - len(data)
        ends = np.clip(ends, 0, len(data))
        starts = (np.frombuffer(data, dtype=np.uint8) & 0xC0) != 0x80  # first bytes of characters
        chars_before = np.concatenate(([0], np.cumsum(starts)))
        # A token that ends inside a character counts up to that character's start.
        inside = np.append(~starts, False)[ends]
        return tuple(int(n) for n in chars_before[ends] - inside)


def _piece(vocab: Any, token: int) -> bytes:
    """The bytes of one token (a special token has none)."""
    size = 64
    while True:
        buffer = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, False)
        if n >= 0:
            return buffer.raw[:n]
        size = -n  # a negative result is the size it needs


def default_threads() -> int:
    """Half the CPUs this process may run on (its affinity mask, which containers narrow).

    llama.cpp's threads spin while they wait for each other; when they compete with the event loop
    and gRPC's threads for every CPU, decoding slows down tenfold, so some CPUs are left free.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // 2)
