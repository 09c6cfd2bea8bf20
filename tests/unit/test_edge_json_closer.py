"""close_json: every prefix of a JSON document closes into a document that parses."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.edge.json_closer import NotAJsonPrefix, close_json

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**12), max_value=10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
dump_styles = st.fixed_dictionaries(
    {
        "ensure_ascii": st.booleans(),
        "indent": st.none() | st.integers(0, 2),
        "separators": st.none() | st.just((",", ":")),
    }
)


def proto_safe(value: Any) -> None:
    """Strings must survive UTF-8 encoding (a lone surrogate would not travel in a proto string)."""
    json.dumps(value, ensure_ascii=False).encode("utf-8")


@settings(max_examples=150, deadline=None)
@given(json_values, dump_styles)
def test_every_prefix_closes_into_json(value: Any, style: dict[str, Any]) -> None:
    text = json.dumps(value, **style)
    for end in range(len(text) + 1):
        closed = close_json(text[:end])
        parsed = json.loads(closed)
        proto_safe(parsed)
    assert close_json(text) == text  # a whole document is left as it is


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_closing_keeps_what_was_complete(value: Any) -> None:
    """Closing a document cut right after a member keeps every member before the cut."""
    if not isinstance(value, dict) or not value:
        return
    text = json.dumps(value, ensure_ascii=False)
    members = list(value.items())
    for n in range(1, len(members) + 1):
        prefix = json.dumps(dict(members[:n]), ensure_ascii=False)[:-1]  # drop the closing brace
        assert json.loads(close_json(prefix)) == dict(members[:n])
        assert text.startswith(prefix)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet='{}[]",:\\ tfnrule0123456789.-+eEabc\n\t', max_size=30))
def test_arbitrary_text_either_closes_or_says_where_it_breaks(text: str) -> None:
    try:
        closed = close_json(text)
    except NotAJsonPrefix as exc:
        assert 0 <= exc.position < len(text)
        json.loads(close_json(text[: exc.position]))
    else:
        json.loads(closed)


@pytest.mark.parametrize(
    ("prefix", "closed"),
    [
        ("", "null"),
        ('{"title": "2024-05-01 TIL - 캐', '{"title": "2024-05-01 TIL - 캐"}'),
        ('{"a": 1, "b', '{"a": 1}'),
        ('{"a": 1, "b":', '{"a": 1}'),
        ('{"a": 1,', '{"a": 1}'),
        ('{"a', "{}"),
        ("[1, 2,", "[1, 2]"),
        ("[", "[]"),
        ('{"a": [1, {"b": "c', '{"a": [1, {"b": "c"}]}'),
        ('{"a": tr', '{"a": true}'),
        ("[nul", "[null]"),
        ('{"a": -', "{}"),
        ('{"a": 12.', '{"a": 12}'),
        ("[1e+", "[1]"),
        ('"ab\\', '"ab"'),
        ('"ab\\u00', '"ab"'),
        ('"ab\\ud83d', '"ab"'),  # a high surrogate whose low half was cut off
        ('"ab\\ud83d\\ude0', '"ab"'),
        ('"ab\\ud83d\\ude00', '"ab\\ud83d\\ude00"'),
        ('{"c": "x\\n- y', '{"c": "x\\n- y"}'),
        ('  {"x": {}, "y" :  [ ', '  {"x": {}, "y" :  [ ]}'),
        ('{"x": {\n  ', '{"x": {\n  }}'),
    ],
)
def test_examples(prefix: str, closed: str) -> None:
    assert close_json(prefix) == closed


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ('{"a": x', 6),
        ("[1,]", 3),
        ('{"a" 1}', 5),
        ('{"a": 1} {', 9),
        ('"tab\there"', 4),
        ('"\\x"', 2),
        ("[01]", 2),
        ("{,}", 1),
        ("[tru e]", 4),
    ],
)
def test_non_prefixes_report_the_first_bad_character(text: str, position: int) -> None:
    with pytest.raises(NotAJsonPrefix) as raised:
        close_json(text)
    assert raised.value.position == position
