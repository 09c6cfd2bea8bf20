"""Sparse terms from Kiwi's morphological analysis: the Korean side of the lexical channel.

Kiwi (kiwipiepy, with the model that kiwipiepy-model packages; nothing is downloaded) splits Korean
words into morphemes, so "트랜잭션을", "트랜잭션이" and "트랜잭션에서" all give the noun "트랜잭션", and
"해결한", "해결됐다" the noun "해결". The terms kept are content morphemes: nouns, verb and adjective
stems, roots and Chinese characters (`CONTENT_TAGS`). Latin-script words and code identifiers are split
as `lexical.code_terms` does (Kiwi cuts identifiers apart), numbers are kept as they are.

With `words` (the default) every Hangul word as written (an eojeol: "트랜잭션에서", "격리수준을") is a
term too, in a namespace of its own (`WORD_PREFIX`): the morphemes match other forms of a word, the
whole word rewards a text that uses the very form asked for, as Lucene's Korean analyser does with
`decompound_mode: mixed` (the compound and its parts). On the real set's tuning half it raised
sparse recall@5 from 0.91 to 0.97 (bench/results/retrieval-real.md).
"""

from __future__ import annotations

import threading
import unicodedata
from collections.abc import Iterator
from typing import TYPE_CHECKING

from services.retriever.lexical import Bm25, SparseTerms, code_terms, ngram_terms, tokens

if TYPE_CHECKING:
    from kiwipiepy import Kiwi

# NNG/NNP nouns, VV verb and VA adjective stems (with their irregular forms, VV-I ...), XR roots, SH hanja.
CONTENT_TAGS = ("NNG", "NNP", "VV", "VA", "XR", "SH")
# Whole Hangul words are terms apart from morphemes: the word 캐시 and the noun 캐시 are two terms.
WORD_PREFIX = "w:"


class KiwiEncoder:
    """`SparseEncoder` on Kiwi morphemes. `words` also keeps each Hangul word of two or more syllables as
    written; `ngrams` the syllable bigrams and trigrams of each Hangul word (what `LexicalEncoder`
    indexes), which match forms the analyser gets wrong. `bm25` weighs the terms (default `Bm25()`)."""

    def __init__(
        self,
        *,
        words: bool = True,
        ngrams: bool = False,
        bm25: Bm25 | None = None,
        model_path: str | None = None,
    ) -> None:
        self._words = words
        self._ngrams = ngrams
        self._bm25 = bm25 or Bm25()
        self._model_path = model_path
        self._kiwi: Kiwi | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return "kiwi-morphemes" + ("+words" if self._words else "") + ("+ngrams" if self._ngrams else "")

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
                if self._words and len(token) > 1:
                    yield WORD_PREFIX + token
                if self._ngrams:
                    yield from sorted(ngram_terms(token))
            else:
                yield token
        if korean:
            # One call for all the Hangul runs of the text: Kiwi's per-call cost dominates short words.
            yield from self.morphemes(" ".join(korean))

    def encode(self, text: str) -> SparseTerms:
        return self._bm25.terms(list(self.iter_terms(text)))
