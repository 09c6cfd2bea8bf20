"""JSON schemas on the vLLM backend: checked as the llama.cpp backend checks them, and with each
string's pattern and length bounds folded into one pattern that accepts exactly the same strings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.generator.engine import InvalidRequest
from services.generator.json_grammar import fold_lengths_into_patterns, llguidance_schema
from services.generator.vllm_inputs import prepared_schema


def ecma_search(pattern: str, text: str) -> bool:
    """`pattern` searched as ECMAScript does: a final `$` matches only at the very end."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.search(pattern, text) is not None


# (pattern, minLength, maxLength): fixed-length prefixes and suffixes, and fully anchored patterns
# whose own lengths lie within the bounds.
FOLDABLE = [
    ("^# T\\n", 0, 12),
    ("^ab", 3, None),
    ("^(?:a|b)c", 2, 6),
    ("x$", 2, 5),
    ("^(?:ab|cd)", 1, 4),
    ("^[ab]{2}$", 1, 3),
]


def matches(pattern: str, min_length: int, max_length: int | None, text: str) -> bool:
    long_enough = len(text) >= min_length and (max_length is None or len(text) <= max_length)
    return long_enough and ecma_search(pattern, text)


@pytest.mark.parametrize(("pattern", "min_length", "max_length"), FOLDABLE)
@given(text=st.text(alphabet='abcdx#T \n"\\', max_size=14))
def test_a_folded_pattern_accepts_exactly_the_strings_the_pair_accepts(
    pattern: str, min_length: int, max_length: int | None, text: str
) -> None:
    schema: dict[str, Any] = {"type": "string", "pattern": pattern, "minLength": min_length}
    if max_length is not None:
        schema["maxLength"] = max_length
    folded = fold_lengths_into_patterns(schema)
    assert set(folded) == {"type", "pattern"}
    assert ecma_search(folded["pattern"], text) == matches(pattern, min_length, max_length, text)


def test_folding_reaches_nested_schemas_and_leaves_data_and_names_alone() -> None:
    item = {"type": "string", "pattern": "^k", "maxLength": 4}
    schema = {
        "type": "object",
        "properties": {
            "minLength": {"type": "string", "pattern": "^p", "maxLength": 3},
            "list": {"type": "array", "items": item},
            "choice": {"anyOf": [item, {"type": "integer"}]},
        },
        "$defs": {"d": item},
        "examples": [{"pattern": "^k", "maxLength": 4}],
    }
    folded = fold_lengths_into_patterns(schema)
    assert folded["properties"]["minLength"] == {"type": "string", "pattern": "^(?:p)[\\s\\S]{0,2}$"}
    assert folded["properties"]["list"]["items"] == {"type": "string", "pattern": "^(?:k)[\\s\\S]{0,3}$"}
    assert folded["properties"]["choice"]["anyOf"][0] == folded["$defs"]["d"]
    assert folded["examples"] == schema["examples"]
    assert schema["properties"]["list"]["items"] == item  # the caller's schema is not changed


def test_strings_without_both_a_pattern_and_a_bound_are_left_alone() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "string", "maxLength": 5},
            "b": {"type": "string", "pattern": "^x"},
            "c": {"type": "string", "pattern": "^x", "minLength": 0},
        },
    }
    folded = fold_lengths_into_patterns(schema)
    assert folded["properties"]["a"] == schema["properties"]["a"]
    assert folded["properties"]["b"] == schema["properties"]["b"]
    assert folded["properties"]["c"] == {"type": "string", "pattern": "^x"}


def test_the_til_schema_reaches_vllm_as_llama_cpp_compiles_it_but_compact() -> None:
    from services.edge.til_format import til_schema

    diff = (Path(__file__).resolve().parents[2] / "examples" / "sample.diff").read_text()
    schema = til_schema("2026-11-24", diff=diff)
    sent = prepared_schema(schema)
    # What the llama.cpp engine compiles, but for its whitespace option (vllm_compat.guidance_schema)
    compiled = llguidance_schema(schema)
    assert compiled["x-guidance"]["whitespace_pattern"]
    assert sent == {k: v for k, v in compiled.items() if k != "x-guidance"}
    # The document is written in the edge's order, not sorted (a schema's order is its output's).
    assert list(sent["properties"]) == list(schema["properties"]) == ["title", "keywords", "content"]
    content = sent["properties"]["content"]
    assert set(content) == {"type", "pattern"}  # no length bound beside the pattern
    assert content["pattern"].startswith("^# 2026-11-24 TIL")


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"type": "string", "pattern": "a+", "maxLength": 5}, "only combine with a fixed-length prefix"),
        ({"type": "string", "pattern": "^(?=a)"}, "lookarounds"),
        ({"type": "string", "maxLength": 10**9}, "maxLength must be an integer"),
    ],
)
def test_schemas_the_llama_cpp_backend_refuses_are_refused_with_its_message(
    schema: dict[str, Any], says: str
) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(says)) as refused:
        prepared_schema(schema)
    assert str(refused.value).startswith("output.json_schema: ")


def test_properties_keep_their_order_and_the_order_reaches_the_grammar() -> None:
    from llguidance import LLMatcher

    from services.generator.fake_engine import _BYTE_TOKENIZER

    def schema(names: list[str]) -> dict[str, Any]:
        properties = {n: {"type": "string", "pattern": "^[a-z]$"} for n in names}
        return {"type": "object", "properties": properties, "required": names}

    zyx = prepared_schema(schema(["z", "y", "x"]))
    assert list(zyx["properties"]) == ["z", "y", "x"]
    assert list(prepared_schema(schema(["x", "y", "z"]))["properties"]) == ["x", "y", "z"]
    # llguidance writes properties in that order: the sorted document is refused.
    grammar = LLMatcher.grammar_from_json_schema(zyx, defaults={"whitespace_flexible": False})
    matcher = LLMatcher(_BYTE_TOKENIZER, grammar)
    assert not matcher.consume_tokens(list(b'{"x":"a"'))
    matcher = LLMatcher(_BYTE_TOKENIZER, grammar)
    assert matcher.consume_tokens(list(b'{"z":"a","y":"b","x":"c"}'))


def test_each_call_gets_its_own_copy() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    first = prepared_schema(schema)
    first["additionalProperties"] = False  # what vLLM's guidance backend does to the schema it gets
    assert "additionalProperties" not in prepared_schema(schema)


@pytest.mark.parametrize(
    ("options", "kept"),
    [
        ({"whitespace_pattern": " ?"}, None),
        ({"whitespace_pattern": " ?", "coerce_one_of": True}, {"coerce_one_of": True}),
        (None, None),
    ],
)
def test_only_the_whitespace_option_is_dropped_for_vllm(
    options: dict[str, Any] | None, kept: dict[str, Any] | None
) -> None:
    from services.generator.vllm_compat import guidance_schema

    schema: dict[str, Any] = {"type": "string"}
    if options is not None:
        schema["x-guidance"] = options
    expected = {"type": "string", **({"x-guidance": kept} if kept else {})}
    assert guidance_schema(schema) == expected
