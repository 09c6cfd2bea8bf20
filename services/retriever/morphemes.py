"""Sparse terms from Kiwi's morphological analysis: the Korean side of the lexical channel.

Kiwi (kiwipiepy, with the model that kiwipiepy-model packages; nothing is downloaded) splits Korean
words into morphemes, so "트랜잭션을", "트랜잭션이" and "트랜잭션에서" all give the noun "트랜잭션", and
"해결한", "해결됐다" the noun "해결". The terms kept are content morphemes: nouns, verb and adjective
stems, roots and Chinese characters (`CONTENT_TAGS`). Latin-script words and code identifiers are split
as `lexical.code_terms` does (Kiwi cuts identifiers apart), numbers are kept as they are.
"""

from __future__ import annotations

import threading
import unicodedata
from collections.abc import Iterator
from typing import TYPE_CHECKING

from services.retriever.lexical import SparseTerms, bm25_terms, code_terms, ngram_terms, tokens

if TYPE_CHECKING:
    from kiwipiepy import Kiwi

# NNG/NNP nouns, VV verb and VA adjective stems (with their irregular forms, VV-I ...), XR roots, SH hanja.
CONTENT_TAGS = ("NNG", "NNP", "VV", "VA", "XR", "SH")


class KiwiEncoder:
    """`SparseEncoder` on Kiwi morphemes. `ngrams` also keeps the syllable bigrams and trigrams of each
    Hangul word (what `LexicalEncoder` indexes), which match forms the analyser gets wrong."""

    def __init__(self, *, ngrams: bool = False, model_path: str | None = None) -> None:
        self._ngrams = ngrams
        self._model_path = model_path
        self._kiwi: Kiwi | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return "kiwi-morphemes+ngrams" if self._ngrams else "kiwi-morphemes"

    def _analyser(self) -> Kiwi:
        if self._kiwi is None:
            from kiwipiepy import Kiwi

            self._kiwi = Kiwi(model_path=self._model_path)
        return self._kiwi

    def load(self) -> None:
        with self._lock:
            self._analyser()

    def morphemes(self, korean: str) -> list[str]:
        """Content morphemes of Korean text, in order; verb and adjective stems without 다."""
        with self._lock:
            analysed = self._analyser().tokenize(korean)
        return [t.form for t in analysed if t.tag.split("-")[0] in CONTENT_TAGS]

    def iter_terms(self, text: str) -> Iterator[str]:
        korean: list[str] = []
        for kind, token in tokens(unicodedata.normalize("NFKC", text)):
            if kind == "code":
                yield from sorted(code_terms(token))
            elif kind == "ngram":
                korean.append(token)
                if self._ngrams:
                    yield from sorted(ngram_terms(token))
            else:
                yield token
        if korean:
            # One call for all the Hangul runs of the text: Kiwi's per-call cost dominates short words.
            yield from self.morphemes(" ".join(korean))

    def encode(self, text: str) -> SparseTerms:
        return bm25_terms(list(self.iter_terms(text)))
