"""The model table's scoring (bench.quality.run): what counts as a title or keyword that repeats."""

from __future__ import annotations

from typing import Any

import pytest

from bench.quality.run import DATE, repeated_ngram_rate, title_or_keyword_repeat


@pytest.mark.parametrize(
    ("document", "repeat"),
    [
        ({"title": f"{DATE} TIL - Redis 캐시조회 도입", "keywords": ["캐시", "Redis 캐시"]}, None),
        ({"title": f"{DATE} TIL - 해당 해당", "keywords": ["캐시"]}, "해당"),
        ({"title": f"{DATE} TIL - xtl.json.til.TIL 함수", "keywords": ["캐시"]}, "TIL"),
        ({"title": f"{DATE} TIL - 해당해당", "keywords": ["캐시"]}, "해당해당"),
        ({"title": f"{DATE} TIL - 캐시", "keywords": ["til.go# 해당", "TIL.go# 해당"]}, "til.go# 해당"),
        ({"title": f"{DATE} TIL - 캐시", "keywords": ["til.json.TIL 해당"]}, "TIL"),
        ({"title": f"{DATE} TIL - 캐시", "keywords": "not a list"}, None),
        ({}, None),
    ],
)
def test_title_or_keyword_repeats_are_found(document: dict[str, Any], repeat: str | None) -> None:
    assert title_or_keyword_repeat(document) == repeat


def test_repeated_ngram_rate() -> None:
    assert repeated_ngram_rate("a b c a b c") == pytest.approx(1 / 4)
    assert repeated_ngram_rate("a b c d") == 0.0
