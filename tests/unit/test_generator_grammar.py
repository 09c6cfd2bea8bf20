"""JSON Schema -> llguidance grammar: the llama.cpp engine's token mask is run token by token, to
check which JSON texts it lets a model write."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.generator.json_grammar import (
    MAX_ITEMS,
    MAX_LENGTH,
    SchemaError,
    json_depth,
    json_schema_to_grammar,
    llguidance_schema,
    parse_schema,
)
from services.generator.models import packaged_gguf

llama_cpp = pytest.importorskip("llama_cpp")
from services.generator.guidance import Grammars, TokenMask  # noqa: E402

TIL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "pattern": "^2026-11-24 TIL - .{1,80}$"},
        "keywords": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 20},
            "minItems": 1,
            "maxItems": 3,
        },
        "content": {"type": "string", "pattern": "^# 2026-11-24 TIL"},
    },
    "required": ["title", "keywords", "content"],
}
GOOD_TIL = {
    "title": '2026-11-24 TIL - 캐시 "무효화" \\ 정리',
    "keywords": ["캐시", "Redis"],
    "content": "# 2026-11-24 TIL\n\n- TTL을 둔다.\n\t```py\nx = 1\n```",
}

Accepts = Callable[[dict[str, Any], str], bool]


@pytest.fixture(scope="module")
def accepts() -> Iterator[Accepts]:
    """accepts(schema, text): whether the llama.cpp engine's token mask (llguidance) lets a model
    write exactly `text`, token by token, and then end."""
    llama = llama_cpp.Llama(model_path=str(packaged_gguf()), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    eos = llama_cpp.llama_vocab_eos(vocab)
    grammars = Grammars(vocab)

    def check(schema: dict[str, Any], text: str) -> bool:
        mask = TokenMask(grammars.matcher(schema), grammars.n_vocab)
        for token in llama.tokenize(text.encode(), add_bos=False, special=False):
            if not mask.allowed()[token]:
                return False
            mask.consume(token)
        return bool(mask.allowed()[eos])  # the document may end here

    yield check
    llama.close()


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


@pytest.mark.model
def test_a_valid_til_is_accepted_with_escapes_and_korean(accepts: Accepts) -> None:
    assert accepts(TIL_SCHEMA, dumps(GOOD_TIL))
    assert accepts(TIL_SCHEMA, json.dumps(GOOD_TIL, indent=None, separators=(",", ":"), ensure_ascii=False))


@pytest.mark.model
def test_an_unfinished_document_is_not_complete(accepts: Accepts) -> None:
    assert not accepts(TIL_SCHEMA, dumps(GOOD_TIL)[:-1])


@pytest.mark.model
@pytest.mark.parametrize(
    ("field", "raw", "escaped_ok"),
    [
        ("title", "\x01", False),  # `.` never writes a \u escape
        ("title", "\t", True),
        ("content", "\n", True),
        ("content", "\x1f", True),
        ("keywords", "\t", True),
    ],
)
def test_raw_control_characters_inside_strings_are_refused(
    accepts: Accepts, field: str, raw: str, escaped_ok: bool
) -> None:
    value = {"title": "2026-11-24 TIL - a@b", "content": "# 2026-11-24 TIL a@b", "keywords": "a@b"}[field]
    document = dumps({**GOOD_TIL, field: [value] if field == "keywords" else value})
    assert not accepts(TIL_SCHEMA, document.replace("@", raw))
    assert accepts(TIL_SCHEMA, document.replace("@", json.dumps(raw)[1:-1])) is escaped_ok


@pytest.mark.model
def test_an_unescaped_quote_cannot_end_a_pattern_string_early(accepts: Accepts) -> None:
    text = dumps(GOOD_TIL).replace('\\"무효화\\"', '"무효화"')
    assert not accepts(TIL_SCHEMA, text)


@pytest.mark.model
@pytest.mark.parametrize(
    ("change", "ok"),
    [
        ({"keywords": ["a", "b", "c"]}, True),
        ({"keywords": ["a", "b", "c", "d"]}, False),  # maxItems 3
        ({"keywords": []}, False),  # minItems 1
        ({"keywords": ["가" * 20]}, True),
        ({"keywords": ["가" * 21]}, False),  # maxLength 20, counted in characters
        ({"keywords": [""]}, False),  # minLength 1
        ({"title": "2026-11-24 TIL - " + "가" * 80}, True),
        ({"title": "2026-11-24 TIL - " + "가" * 81}, False),  # .{1,80}
        ({"title": "2026-11-24 TIL - "}, False),
        ({"title": "2026-11-25 TIL - 캐시"}, False),
        ({"content": "# 2026-11-24 TIL"}, True),  # an unanchored end: "starts with"
        ({"content": "Intro\n# 2026-11-24 TIL"}, False),
    ],
)
def test_lengths_items_and_patterns_are_honoured(accepts: Accepts, change: dict[str, Any], ok: bool) -> None:
    assert accepts(TIL_SCHEMA, dumps({**GOOD_TIL, **change})) is ok


@pytest.mark.model
def test_lengths_beyond_llama_cpps_repetition_limit_compile(accepts: Accepts) -> None:
    schema = {"type": "string", "minLength": 2500, "maxLength": 4200}
    for size, ok in ((2499, False), (2500, True), (3333, True), (4200, True), (4201, False)):
        assert accepts(schema, dumps("가" * size)) is ok, size


@pytest.mark.model
@pytest.mark.parametrize(
    ("schema", "value", "ok"),
    [
        # A fixed-length prefix (17 characters) plus maxLength bounds the rest: 17 + 43 = 60.
        ({"pattern": "^# 2026-11-24 TIL\\n", "maxLength": 60}, "# 2026-11-24 TIL\n" + "가" * 43, True),
        ({"pattern": "^# 2026-11-24 TIL\\n", "maxLength": 60}, "# 2026-11-24 TIL\n" + "가" * 44, False),
        ({"pattern": "^# 2026-11-24 TIL\\n", "minLength": 20}, "# 2026-11-24 TIL\n가나", False),
        ({"pattern": "^# 2026-11-24 TIL\\n", "minLength": 20}, "# 2026-11-24 TIL\n가나다", True),
        ({"pattern": "-v1$", "maxLength": 5}, "ab-v1", True),  # a fixed-length suffix
        ({"pattern": "-v1$", "maxLength": 5}, "abc-v1", False),
        # The pattern already keeps within the bound.
        ({"pattern": "^2026-11-24 TIL - .{1,80}$", "maxLength": 200}, "2026-11-24 TIL - 캐시", True),
    ],
)
def test_patterns_combine_with_length_bounds(
    accepts: Accepts, schema: dict[str, Any], value: str, ok: bool
) -> None:
    assert accepts({"type": "string", **schema}, dumps(value)) is ok


# Characters whose JSON text the grammar can write: anything printable, plus the escapes \" \\ \t \n.
# (It never writes \u escapes, so \b, \f, other control characters and DEL are left out.)
ALPHABET = st.sampled_from([*'ab-1 #가힣:"\\\t\n', "TIL", "2026-11-24"])
texts = st.lists(ALPHABET, max_size=12).map("".join)

PATTERNS = [
    # (JSON Schema pattern, equivalent Python regex for re.fullmatch, with re.ASCII)
    ("^2026-11-24 TIL - .{1,8}$", r"2026-11-24 TIL - .{1,8}"),
    ("^# 2026-11-24 TIL", r"# 2026-11-24 TIL[\s\S]*"),
    ("TIL", r"[\s\S]*TIL[\s\S]*"),
    ("^[가-힣]{1,3}(:[ab]+)?$", r"[가-힣]{1,3}(:[ab]+)?"),
    (r'^[^"\\]*$', r'[^"\\]*'),
    (r"^\d{1,4}-\w*\s?$", r"\d{1,4}-\w*\s?"),
    ("^(a|b\\\\|\\t)*$", r"(a|b\\|\t)*"),
]


@pytest.mark.model
@pytest.mark.parametrize(("pattern", "python"), PATTERNS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=texts)
def test_pattern_strings_match_exactly_what_the_regex_matches(
    accepts: Accepts, pattern: str, python: str, value: str
) -> None:
    schema = {"type": "string", "pattern": pattern}
    assert accepts(schema, dumps(value)) is bool(re.fullmatch(python, value, re.ASCII))


@pytest.mark.model
@pytest.mark.parametrize(
    ("pattern", "python"),
    [("^[a=-]+$", "[a=-]+"), ("^[-a=]+$", "[-a=]+"), (r"^[a=\-]+$", r"[a=\-]+"), ("^[^a-]+$", "[^a-]+")],
)
def test_a_literal_dash_in_a_class_stays_a_dash(accepts: Accepts, pattern: str, python: str) -> None:
    """A class ending in `-` once lost it on llguidance's side (the control characters' `--[...]` came
    right after it), so the grammar refused what Python's re (the TIL checker) allowed."""
    for value in ["a-=", "-", "a", "=a", "b-c"]:
        schema = {"type": "string", "pattern": pattern}
        assert accepts(schema, dumps(value)) is bool(re.fullmatch(python, value)), value


@pytest.mark.model
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=texts, max_length=st.integers(0, 12))
def test_max_length_counts_characters_not_json_text(accepts: Accepts, value: str, max_length: int) -> None:
    schema = {"type": "string", "maxLength": max_length}
    assert accepts(schema, dumps(value)) is (len(value) <= max_length)


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"type": "string", "pattern": "^(?=a)b$"}, "lookarounds"),
        ({"type": "string", "pattern": r"^(a)\1$"}, "backreferences"),
        ({"type": "string", "pattern": r"\bword"}, "word boundaries"),
        ({"type": "string", "pattern": "^a$b$"}, "only at the start or end"),
        ({"type": "string", "pattern": "^a{3,1}$"}, "max < min"),
        ({"type": "string", "pattern": "^(ab$"}, "missing ')'"),
        ({"type": "string", "pattern": f"^a{{{MAX_LENGTH + 1}}}$"}, "repetition counts above"),
        ({"type": "string", "maxLength": MAX_LENGTH + 1}, "maxLength must be an integer"),
        (
            {"type": "array", "items": {"type": "string"}, "maxItems": MAX_ITEMS + 1},
            "maxItems must be an integer",
        ),
        ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength (5) is greater than maxLength (2)"),
        ({"$ref": "https://example.com/schema.json"}, "unsupported JSON schema"),
        (
            {"type": "string", "pattern": "^abc$", "maxLength": 2},
            "allows strings outside minLength/maxLength",
        ),
        ({"type": "string", "pattern": "^a+", "maxLength": 5}, "only combine with a fixed-length prefix"),
        ({"type": "string", "pattern": "TIL", "maxLength": 5}, "only combine with a fixed-length prefix"),
        ({"type": "string", "pattern": "^abcdef", "maxLength": 5}, "maxLength is shorter than the pattern"),
    ],
)
def test_schemas_it_cannot_express_are_refused_with_the_reason(schema: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        json_schema_to_grammar(schema)


def test_keywords_used_as_property_names_are_not_read_as_bounds(accepts: Accepts) -> None:
    schema = {
        "type": "object",
        "properties": {"pattern": {"type": "string"}, "maxLength": {"type": "integer"}},
        "required": ["pattern", "maxLength"],
    }
    json_schema_to_grammar(schema)  # "pattern" is a property here, not a string's pattern
    assert accepts(schema, dumps({"pattern": "(", "maxLength": -1}))


def _deep(depth: int) -> str:
    return '{"type": "array", "items": ' * depth + '{"type": "string"}' + "}" * depth


HOSTILE = {
    "5,000 levels deep": (_deep(5000), "nests 5001 levels deep; at most 64"),  # past json's recursion guard
    "100 levels deep": (_deep(100), "nests 101 levels deep; at most 64"),  # parsed, then refused by its size
    "10k optional properties": (
        json.dumps({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(10_000)}}),
        "an object has 10000 properties; at most 256",
    ),
    "an enum of 100k values": (
        json.dumps({"enum": list(range(100_000))}),
        "an enum has 100000 values; at most 1000",
    ),
    "2 MB of schema": (json.dumps({"description": "x" * 2_000_000}), "bytes; at most 1048576"),
    "a 300k-character pattern": (
        json.dumps({"type": "string", "pattern": "a" * 300_000}),
        "a pattern has 300000 characters; at most 262144",
    ),
    "30k values in all": (
        json.dumps({"type": "object", "properties": {"a": {"default": list(range(30_000))}}}),
        "more than 20000 JSON values",
    ),
}


@pytest.mark.parametrize(("text", "says"), list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_schemas_are_refused_fast_naming_the_limit(text: str, says: str) -> None:
    started = time.perf_counter()
    with pytest.raises(SchemaError, match=re.escape(says)):
        parse_schema(text)
    assert time.perf_counter() - started < 1.0


def test_depth_counts_brackets_outside_strings_only() -> None:
    assert json_depth('{"a": "[[[[{{{{", "b": [1, [2]]}') == 3
    assert json_depth('"\\"[[["') == 0
    assert parse_schema(_deep(62)) == json.loads(_deep(62))


def test_a_schema_is_compiled_once_and_reused() -> None:
    llama = llama_cpp.Llama(model_path=str(packaged_gguf()), vocab_only=True, verbose=False)
    grammars = Grammars(llama_cpp.llama_model_get_vocab(llama.model), cache_size=2)
    schema = {"type": "string", "pattern": "^a+$"}
    started = time.perf_counter()
    grammars.matcher(schema)
    first = time.perf_counter() - started
    started = time.perf_counter()
    second = grammars.matcher(dict(reversed(list(schema.items()))))  # same schema, keys reordered
    again = time.perf_counter() - started
    assert len(grammars) == 1 and again < first
    assert second.consume_tokens(llama.tokenize(b'"aa"', add_bos=False, special=False))
    for i in range(3):  # bounded: the oldest goes
        grammars.matcher({"type": "string", "maxLength": i})
    assert len(grammars) == 2
    with pytest.raises(SchemaError, match="missing"):
        grammars.matcher({"type": "string", "pattern": "("})
    llama.close()


def test_a_pattern_shared_by_requests_is_parsed_once_and_a_refused_one_every_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.generator import json_grammar

    parsed: list[str] = []
    real = json_grammar.Pattern._parse

    def counting(self: Any) -> Any:
        parsed.append(self.pattern)
        return real(self)

    monkeypatch.setattr(json_grammar.Pattern, "_parse", counting)
    json_grammar._pattern_for_llguidance.cache_clear()
    title = "^2026-11-24 TIL - [가-힣 ]{1,30}$"

    def schema(content: str) -> dict[str, Any]:
        properties = {
            "title": {"type": "string", "pattern": title},
            "content": {"type": "string", "pattern": content},
        }
        return {"type": "object", "properties": properties}

    first = llguidance_schema(schema("^a|b$"))
    second = llguidance_schema(schema("^c|d$"))
    assert parsed.count(title) == 1  # the second request's title came from the cache
    assert first["properties"]["title"] == second["properties"]["title"]
    assert (
        second["properties"]["content"]["pattern"]
        == llguidance_schema(schema("^c|d$"))["properties"]["content"]["pattern"]
    )
    for _ in range(2):
        with pytest.raises(SchemaError, match="lookarounds"):
            llguidance_schema(schema("^(?=x)$"))
    assert parsed.count("^(?=x)$") == 2
