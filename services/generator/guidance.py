"""llguidance on llama.cpp: a tokenizer from the GGUF's vocabulary, compiled grammars cached by
schema, and a logits processor that lets through only the tokens the grammar allows.

The schema means what `json_grammar` says, as it does on vLLM (whose `guidance` backend runs the
same library). Each request gets its own copy of the compiled matcher; the processor fills the
matcher's token bitmask before each sampling step, and the engine hands every sampled token back
with `consume`. Once the document is complete the mask allows only end-of-sequence.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

import llama_cpp
import llguidance.llamacpp
import numpy as np
from llguidance import LLMatcher, LLParserLimits
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from services.generator.json_grammar import SchemaError, json_schema_to_grammar, schema_key

CACHE_SIZE = 64


# llguidance's own bounds on one grammar (see LLParserLimits): lexer work to build it (~50k per
# ms), per mask step (~14k per ms), and its size in symbols.
def parser_limits() -> LLParserLimits:
    return LLParserLimits(
        initial_lexer_fuel=2_000_000, step_lexer_fuel=400_000, max_grammar_size=400_000, verbose_errors=False
    )


_MAX_ERROR_CHARS = 400


class Grammars:
    """Compiles JSON Schemas for one vocabulary; the last CACHE_SIZE results (errors too) are
    kept by `schema_key`. Thread-safe."""

    def __init__(self, vocab: Any, *, cache_size: int = CACHE_SIZE) -> None:
        self.tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(vocab)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self._cache: OrderedDict[str, LLMatcher | SchemaError] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def matcher(self, schema: dict[str, Any]) -> LLMatcher:
        """A fresh matcher for one request; SchemaError names what the schema breaks."""
        key = schema_key(schema)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
        if compiled is None:
            compiled = self._compile(schema)
            with self._lock:
                self._cache[key] = compiled
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        if isinstance(compiled, SchemaError):
            raise compiled
        return compiled.deep_copy()

    def _compile(self, schema: dict[str, Any]) -> LLMatcher | SchemaError:
        try:
            grammar = json_schema_to_grammar(schema, validate=False)
        except SchemaError as exc:
            return exc
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0, limits=parser_limits())
        if matcher.is_error():
            error = matcher.get_error()
            if len(error) > _MAX_ERROR_CHARS:
                error = error[:_MAX_ERROR_CHARS] + "..."
            return SchemaError(f"unsupported JSON schema: {error}")
        return matcher

    def __len__(self) -> int:
        return len(self._cache)


class TokenMask:
    """A llama-cpp-python logits processor for one request's matcher.

    Each call first hands the grammar the tokens sampled since the previous call (llama-cpp-python
    passes every token evaluated so far), then masks the scores.
    """

    def __init__(self, matcher: LLMatcher, n_vocab: int) -> None:
        self.matcher = matcher
        self._n_vocab = n_vocab
        self._seen: int | None = None  # tokens of `input_ids` already consumed (or the prompt)
        self._bitmask = allocate_token_bitmask(1, n_vocab)
        # Time spent computing and applying masks, and how many, for metrics and benchmarks.
        self.mask_s = 0.0
        self.masks = 0

    def allowed(self) -> np.ndarray:
        """Booleans over the vocabulary: which tokens the grammar allows next."""
        fill_next_token_bitmask(self.matcher, self._bitmask)
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")
        return bits[: self._n_vocab].astype(bool)

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if self._seen is not None:
            for token in input_ids[self._seen :]:
                self.consume(int(token))
        self._seen = len(input_ids)
        started = time.perf_counter()
        scores[~self.allowed()[: len(scores)]] = -np.inf
        self.mask_s += time.perf_counter() - started
        self.masks += 1
        return scores

    def consume(self, token: int) -> None:
        """Advances the grammar past a sampled token (one the mask allowed)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")
