"""The sparse (lexical) channel: text -> terms -> a term-frequency vector that Qdrant weights by IDF.

Two kinds of text matter for TILs, and neither splits well on whitespace:

- Korean attaches particles to words ("트랜잭션을", "트랜잭션이", "트랜잭션에서"), so a word rarely
  matches as a whole. A trailing particle is stripped, and the stem ("트랜잭션") yields itself and its
  syllable bigrams and trigrams, which also match other forms of the word that no rule strips
  (verb endings: "해결한", "해결됐다"). Terms never span a particle, so two documents do not look
  alike merely because both wrote "...에서".
- Code identifiers are written many ways; `camelCaseName`, `CamelCaseName`, `camel_case_name` and
  `camel-case-name` all yield the same sub-words and the same joined form (`camelcasename`), and a
  dotted path (`asyncio.Queue`) yields itself and its parts.

Term ids are a stable 32-bit hash, so no vocabulary has to be stored and ids never change between
processes or versions.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

# An identifier, optionally joined by '.', '-', '/' or '::' to more identifiers (asyncio.Queue,
# max-retries, std::vec::Vec, services/retriever). Digits may follow the first letter.
_CODE = r"[A-Za-z_][A-Za-z0-9_]*(?:(?:\.|-|/|::)[A-Za-z_][A-Za-z0-9_]*)*"
# Scripts written without spaces between morphemes: Hangul syllables, kana, CJK ideographs.
_NGRAM_SCRIPT = r"[\uac00-\ud7a3\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]+"
_NUMBER = r"[0-9]+(?:\.[0-9]+)*"
_TOKEN = re.compile(rf"(?P<code>{_CODE})|(?P<ngram>{_NGRAM_SCRIPT})|(?P<number>{_NUMBER})")

# Parts of a path (asyncio.Queue, std::vec, a/b); '_' and '-' join words within a part.
_PART_SEPARATOR = re.compile(r"\.|/|::")
_WORD_SEPARATOR = re.compile(r"[_-]")
# HTTPServerError -> HTTP Server Error; parseJSON2 -> parse JSON 2; snake_case splits on '_' first.
_SUBWORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")

NGRAM_SIZES = (2, 3)

# Particles (and common particle pairs), longest first. A one-syllable particle is stripped only
# from words of three or more syllables, so short words ("나이", "회의") stay whole; documents and
# queries go through the same rule, so a wrong cut rarely costs a match.
_PARTICLE_LIST = """
    에서부터 으로부터 에게서 한테서 이라고 이라는 에서는 에서도 에서의 으로는 으로도 으로서 으로써
    에게는 라고 라는 로서 로써 로는 로도 에게 한테 께서 부터 까지 마다 조차 마저 처럼 보다 이나 이랑
    에는 에도 에서 으로 와는 과는 은 는 이 가 을 를 의 에 로 와 과 도 만
"""
PARTICLES = tuple(sorted(_PARTICLE_LIST.split(), key=len, reverse=True))


def code_terms(token: str) -> set[str]:
    """Terms of one identifier or dotted path: itself, its parts, their sub-words and joined forms."""
    out = {token.lower()}
    for part in _PART_SEPARATOR.split(token):
        words = [w.lower() for piece in _WORD_SEPARATOR.split(part) for w in _SUBWORD.findall(piece)]
        out.add(part.lower())
        out.update(words)
        out.add("".join(words))
    # One letter says nothing on its own (the `i` of a loop, the `x` of x_axis).
    return {t for t in out if len(t) > 1}


def strip_particle(word: str) -> str:
    """`word` without a trailing Korean particle: 트랜잭션에서 -> 트랜잭션, 캐시를 -> 캐시, 나이 -> 나이."""
    for particle in PARTICLES:
        if word.endswith(particle) and len(word) - len(particle) >= (2 if len(particle) == 1 else 1):
            return word[: -len(particle)]
    return word


def ngram_terms(word: str) -> set[str]:
    """Terms of one run of Hangul (or kana/CJK): its stem and the stem's character bigrams and trigrams."""
    stem = strip_particle(word) if "\uac00" <= word[0] <= "\ud7a3" else word
    out = {stem}
    for n in NGRAM_SIZES:
        out.update(stem[i : i + n] for i in range(len(stem) - n + 1))
    return out


def tokens(text: str) -> Iterator[tuple[str, str]]:
    """(kind, token) for every token of `text`, in order: kind "code" is a Latin-script word or identifier,
    "ngram" a run of Hangul, kana or CJK ideographs, "number" digits; anything else is skipped."""
    for match in _TOKEN.finditer(unicodedata.normalize("NFKC", text)):
        yield match.lastgroup or "", match.group()


def iter_terms(text: str) -> Iterator[str]:
    """Every term of `text`, each token's terms once, in order of appearance (repeats across tokens)."""
    for kind, token in tokens(text):
        if kind == "code":
            yield from sorted(code_terms(token))
        elif kind == "ngram":
            yield from sorted(ngram_terms(token))
        else:
            yield token


def term_id(term: str) -> int:
    """A stable unsigned 32-bit id of `term` (Qdrant sparse indices are u32)."""
    return int.from_bytes(hashlib.blake2b(term.encode(), digest_size=4).digest(), "little")


@dataclass(frozen=True)
class SparseTerms:
    """A sparse vector: sorted unique term ids and their weights (here: term frequencies)."""

    indices: tuple[int, ...]
    values: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.indices)


# BM25's term-frequency saturation and length normalisation (Robertson's k1 and b) against a fixed
# average length in terms, computed here; Qdrant multiplies by the IDF at query time (`Modifier.IDF`), so
# the sparse score is BM25, the way Qdrant recommends BM25 with sparse vectors. Without them a long
# document that repeats common words outranks a short one that names what was asked. b = 0.3 (the usual
# 0.75 in fastembed's Bm25) was chosen on the tuning half of the real Korean set (bench/retrieval):
# Markdown notes run to thousands of terms, and full length normalisation buried them under short texts.
BM25_K1 = 1.2
BM25_B = 0.3
BM25_AVG_TERMS = 256.0


@dataclass(frozen=True)
class Bm25:
    """The client-side half of BM25: how a term's count in a text of some length becomes its weight."""

    k1: float = BM25_K1
    b: float = BM25_B
    avg_terms: float = BM25_AVG_TERMS

    def __post_init__(self) -> None:
        if self.k1 <= 0 or not 0 <= self.b <= 1 or self.avg_terms <= 0:
            raise ValueError(f"BM25 needs k1 > 0, 0 <= b <= 1 and avg_terms > 0, not {self}")

    def terms(self, terms: Iterator[str] | list[str]) -> SparseTerms:
        """The sparse vector of a text's terms: each term id weighted by BM25's saturated frequency."""
        counts = Counter(term_id(t) for t in terms)
        length = sum(counts.values())
        norm = self.k1 * (1.0 - self.b + self.b * length / self.avg_terms)
        indices = tuple(sorted(counts))
        return SparseTerms(indices, tuple(counts[i] * (self.k1 + 1.0) / (counts[i] + norm) for i in indices))


class LexicalEncoder:
    """Sparse encoder for the lexical channel: BM25-weighted frequencies of `iter_terms` under `term_id`
    (Qdrant applies the IDF)."""

    name = "lexical-v2"

    def __init__(self, *, bm25: Bm25 | None = None) -> None:
        self._bm25 = bm25 or Bm25()

    def encode(self, text: str) -> SparseTerms:
        return self._bm25.terms(list(iter_terms(text)))
