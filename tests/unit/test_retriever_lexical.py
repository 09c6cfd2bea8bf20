"""The lexical tokenizer of the retriever's sparse channel: Korean n-grams, code identifiers, stable ids."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.retriever.fusion import ENGLISH_ONLY_WEIGHT, dense_weight
from services.retriever.lexical import (
    BM25_AVG_TERMS,
    BM25_B,
    BM25_K1,
    Bm25,
    LexicalEncoder,
    SparseTerms,
    code_terms,
    iter_terms,
    ngram_terms,
    strip_particle,
    term_id,
)
from services.retriever.morphemes import WORD_PREFIX, KiwiEncoder


def terms(text: str) -> set[str]:
    return set(iter_terms(text))


@pytest.mark.parametrize(
    "spelling",
    ["camelCaseName", "CamelCaseName", "camel_case_name", "camel-case-name", "CAMEL_CASE_NAME"],
)
def test_identifier_spellings_share_their_subwords_and_joined_form(spelling: str) -> None:
    assert {"camel", "case", "name", "camelcasename"} <= terms(spelling)


def test_identifier_keeps_itself_lowercased() -> None:
    assert "camel_case_name" in terms("camel_case_name")
    assert "camelcasename" in terms("camelCaseName")


def test_acronyms_and_digits_split_where_a_reader_would() -> None:
    assert {"http", "server", "error", "httpservererror"} <= terms("HTTPServerError")
    assert {"parse", "json", "parsejson2"} <= terms("parseJSON2")


def test_dotted_paths_yield_the_whole_path_and_each_part() -> None:
    got = terms("asyncio.Queue를 쓰자")
    assert {"asyncio.queue", "asyncio", "queue"} <= got
    # The particle is its own Hangul token, not glued to the identifier.
    assert "를" in got
    assert {"std::vec::vec", "std", "vec"} <= terms("std::vec::Vec")
    assert {"services/retriever/index.py", "retriever", "index"} <= terms("services/retriever/index.py")


def test_a_sentence_final_period_is_not_part_of_an_identifier() -> None:
    assert "asyncio.queue" in terms("I used asyncio.Queue.")
    assert not any(t.endswith(".") for t in terms("I used asyncio.Queue."))


def test_single_letters_are_dropped_but_not_single_hangul_syllables() -> None:
    assert "x" not in terms("x_axis x")
    assert "axis" in terms("x_axis")
    assert "값" in terms("값")


def test_hangul_stems_yield_themselves_bigrams_and_trigrams() -> None:
    assert ngram_terms("트랜잭션을") == {"트랜잭션", "트랜", "랜잭", "잭션", "트랜잭", "랜잭션"}


@pytest.mark.parametrize(
    ("word", "stem"),
    [
        ("트랜잭션을", "트랜잭션"),
        ("트랜잭션에서", "트랜잭션"),
        ("캐시를", "캐시"),
        ("데이터베이스의", "데이터베이스"),
        ("값에서", "값"),  # a two-syllable particle may leave one syllable
        ("나이", "나이"),  # a one-syllable particle must leave two
        ("회의", "회의"),
        ("트랜잭션", "트랜잭션"),
    ],
)
def test_strip_particle(word: str, stem: str) -> None:
    assert strip_particle(word) == stem


def test_words_with_different_particles_index_alike() -> None:
    assert terms("트랜잭션을 커밋했다") & terms("트랜잭션이") == ngram_terms("트랜잭션")
    assert terms("루프를") == terms("루프는") == terms("루프에서")


def test_terms_never_span_a_particle() -> None:
    # Two texts that share only a particle (에서) share no term.
    assert not terms("헤더에서") & terms("스트림에서")


def test_other_endings_still_share_the_stem_bigram() -> None:
    assert "해결" in terms("해결한 기록") & terms("바꾸니 해결됐다")


def test_hangul_is_split_from_latin_in_mixed_words() -> None:
    assert {"redis", "의"} <= terms("Redis의")
    assert {"http", "요청"} <= terms("HTTP요청")


def test_nfkc_folds_fullwidth_letters() -> None:
    assert "queue" in terms("Ｑｕｅｕｅ")


def test_code_terms_of_one_token() -> None:
    assert code_terms("max_retries") == {"max_retries", "max", "retries", "maxretries"}
    assert code_terms("max-retries") == {"max-retries", "max", "retries", "maxretries"}


def bm25(tf: int, length: int) -> float:
    norm = BM25_K1 * (1 - BM25_B + BM25_B * length / BM25_AVG_TERMS)
    return tf * (BM25_K1 + 1) / (tf + norm)


def test_term_frequency_counts_each_token_once_per_occurrence() -> None:
    encoder = LexicalEncoder()
    vector = encoder.encode("queue queue 큐")
    weights = dict(zip(vector.indices, vector.values, strict=True))
    assert weights[term_id("queue")] == pytest.approx(bm25(2, 3))
    assert weights[term_id("큐")] == pytest.approx(bm25(1, 3))
    # 루프를 and 루프는 are two occurrences of the stem 루프.
    repeated = encoder.encode("루프를 루프는")
    assert dict(zip(repeated.indices, repeated.values, strict=True)) == {
        term_id("루프"): pytest.approx(bm25(2, 2))
    }
    # A two-syllable word is also its own bigram: still one count per occurrence.
    single = LexicalEncoder().encode("루프")
    assert dict(zip(single.indices, single.values, strict=True)) == {
        term_id("루프"): pytest.approx(bm25(1, 1))
    }


def test_weights_saturate_and_long_documents_weigh_each_term_less() -> None:
    # BM25: a repeated term gains less and less, and the same count in a longer text weighs less.
    assert bm25(1, 10) < bm25(2, 10) < bm25(20, 10) < BM25_K1 + 1
    short = LexicalEncoder().encode("트랜잭션 격리")
    long = LexicalEncoder().encode("트랜잭션 격리 " + " ".join(f"word{i}" for i in range(500)))
    assert (
        dict(zip(short.indices, short.values, strict=True))[term_id("격리")]
        > dict(zip(long.indices, long.values, strict=True))[term_id("격리")]
    )


def test_text_without_indexable_terms_gives_an_empty_vector() -> None:
    assert len(LexicalEncoder().encode("!!! ??? ... - _")) == 0


def test_term_ids_are_stable_across_processes() -> None:
    # blake2b, not hash(): the ids must not depend on PYTHONHASHSEED.
    code = "from services.retriever.lexical import term_id; print(term_id('asyncio.queue'), term_id('루프'))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert [int(x) for x in out] == [term_id("asyncio.queue"), term_id("루프")]
    assert term_id("asyncio.queue") != term_id("루프")


@given(st.text(max_size=200))
def test_any_text_encodes_to_a_valid_sparse_vector(text: str) -> None:
    vector = LexicalEncoder().encode(text)
    assert list(vector.indices) == sorted(set(vector.indices))
    assert all(0 <= i < 2**32 for i in vector.indices)
    assert all(v >= 1.0 for v in vector.values)
    assert len(vector.indices) == len(vector.values)


@pytest.fixture(scope="module")
def kiwi() -> KiwiEncoder:
    encoder = KiwiEncoder()
    encoder.load()
    return encoder


def test_kiwi_keeps_nouns_and_stems_without_particles_or_endings(kiwi: KiwiEncoder) -> None:
    got = set(kiwi.iter_terms("데이터베이스에서 트랜잭션을 격리하는 수준에 따라 팬텀 읽기가 생길 수 있다."))
    assert {"데이터베이스", "트랜잭션", "격리", "수준", "팬텀", "읽", "생기"} <= got
    assert not got & {"에서", "을", "는", "다", "있다", "트랜잭션을"}
    # Other particles and endings give the same terms.
    assert {"트랜잭션", "격리"} <= set(kiwi.iter_terms("트랜잭션이 격리된다"))


def test_kiwi_splits_code_identifiers_as_the_lexical_encoder_does(kiwi: KiwiEncoder) -> None:
    text = "asyncio.Queue를 쓰면 parse_http_header 함수는"
    got = set(kiwi.iter_terms(text))
    assert code_terms("asyncio.Queue") | code_terms("parse_http_header") <= got
    assert "함수" in got and "queue를" not in got


def test_kiwi_vectors_are_bm25_weighted_and_stable(kiwi: KiwiEncoder) -> None:
    a, b = kiwi.encode("캐시 캐시 무효화"), kiwi.encode("캐시 캐시 무효화")
    assert a == b and list(a.indices) == sorted(a.indices)
    weights = dict(zip(a.indices, a.values, strict=True))
    assert weights[term_id("캐시")] > weights[term_id("무효")] if term_id("무효") in weights else True
    assert len(kiwi.encode("!!! ...")) == 0


def test_bm25_parameters_are_checked_and_b_sets_how_much_length_counts() -> None:
    for bad in ({"k1": 0.0}, {"b": 1.5}, {"b": -0.1}, {"avg_terms": 0.0}):
        with pytest.raises(ValueError, match="BM25 needs"):
            Bm25(**bad)
    short, long = ["격리"], ["격리", *(f"w{i}" for i in range(500))]

    def weight(bm25: Bm25, terms: list[str]) -> float:
        v = bm25.terms(terms)
        return dict(zip(v.indices, v.values, strict=True))[term_id("격리")]

    assert weight(Bm25(b=0.0), short) == pytest.approx(weight(Bm25(b=0.0), long))
    assert weight(Bm25(b=1.0), short) / weight(Bm25(b=1.0), long) > weight(Bm25(b=0.3), short) / weight(
        Bm25(b=0.3), long
    )
    assert LexicalEncoder(bm25=Bm25(b=0.0)).encode("격리 " * 3 + "x1 " * 300) != LexicalEncoder().encode(
        "격리 " * 3 + "x1 " * 300
    )


def overlap(a: SparseTerms, b: SparseTerms) -> float:
    weights = dict(zip(b.indices, b.values, strict=True))
    return sum(v * weights.get(i, 0.0) for i, v in zip(a.indices, a.values, strict=True))


def test_kiwi_words_are_terms_of_their_own_beside_the_morphemes(kiwi: KiwiEncoder) -> None:
    got = list(kiwi.iter_terms("트랜잭션에서 격리 수준을 정한다. 수 있다"))
    assert {WORD_PREFIX + "트랜잭션에서", WORD_PREFIX + "수준을", WORD_PREFIX + "격리"} <= set(got)
    assert {"트랜잭션", "격리", "수준"} <= set(got)
    assert WORD_PREFIX + "수" not in got  # one syllable says nothing on its own
    plain = KiwiEncoder(words=False)
    assert not [t for t in plain.iter_terms("트랜잭션에서 격리 수준을") if t.startswith(WORD_PREFIX)]
    assert (kiwi.name, plain.name) == ("kiwi-morphemes+words", "kiwi-morphemes")


def test_with_words_the_text_that_uses_the_asked_form_ranks_first(kiwi: KiwiEncoder) -> None:
    query = "트랜잭션에서 수준을"
    same_form, other_form = "트랜잭션에서 격리 수준을 정한다", "트랜잭션의 격리와 수준이 정해진다"
    plain = KiwiEncoder(words=False)
    # Morphemes alone cannot tell the two apart; whole words can.
    assert overlap(plain.encode(query), plain.encode(same_form)) == pytest.approx(
        overlap(plain.encode(query), plain.encode(other_form)), rel=0.05
    )
    assert overlap(kiwi.encode(query), kiwi.encode(same_form)) > 1.5 * overlap(
        kiwi.encode(query), kiwi.encode(other_form)
    )


def test_an_english_only_model_counts_by_the_query_s_latin_share_times_its_weight() -> None:
    assert dense_weight("connection pool size", multilingual=False) == pytest.approx(ENGLISH_ONLY_WEIGHT)
    assert dense_weight("커넥션 풀 pool_size", multilingual=False) == pytest.approx(ENGLISH_ONLY_WEIGHT / 3)
    assert dense_weight("커넥션 풀", multilingual=False) == 0.0
    assert dense_weight("pool size", multilingual=False, english_only_weight=1.0) == 1.0
    assert dense_weight("커넥션 풀", multilingual=True) == 1.0
