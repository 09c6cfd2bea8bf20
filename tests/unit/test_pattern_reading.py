"""Reading a schema's pattern: the shortened literal runs Python's parser is given mean the same as the
pattern itself (lengths, refusals, messages), and the JSON-safe rewrite copies plain text unchanged."""

from __future__ import annotations

import random
import warnings
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.edge.til_format import til_schema
from services.generator import json_grammar
from services.generator.json_grammar import MAX_LENGTH, Pattern, SchemaError

# Python's parser warns of `[[`, `--` and the like in a class (set operations one day); the pieces make some.
pytestmark = pytest.mark.filterwarnings("ignore:Possible (nested set|set):FutureWarning")

# Pieces a pattern is drawn from: literals and escapes, classes, groups of every kind, quantifiers
# (well-formed or not), anchors, inline flags and stray brackets.
PIECES = [
    "a", "b", "가", " ", "#", "-", ",", "0", "9", "'", "`", "\\.", "\\\\", "\\-", "\\n", "\\t", "\\d",
    "\\S", "\\b", "\\B", "\\x41", "\\u0041", "\\1", "\\12", "\\012", "\\A", "\\Z", ".", "|", "(", ")",
    "(?:", "(?P<g>", "(?<h>", "(?=", "(?!", "(?<=", "(?i)", "(?x)", "(?x:", "(?#c)", "[a-z]", "[^\\]x]",
    "[]a]", "[]ab]", "[^]ab]", "[\\d.]", "[", "]", "{", "}", "{2}", "{1,3}", "{,2}", "{2,}", "{x}", "{20000}", "*", "+",
    "?", "*?", "+?", "^", "$", "(?>", "(?P=g)", "(?(1)", "[:z-a]", "[)b-a]", "[:\\d-z]", "[a--b]",
    "[[a]", "[a&&b]", ":", "b-a", "x{2}",
]  # fmt: skip


def read(pattern: str) -> Any:
    try:
        parsed = Pattern(pattern)
    except SchemaError as exc:
        return str(exc)
    return parsed.low, parsed.high


def read_unshortened(pattern: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    with monkeypatch.context() as patch:
        patch.setattr(json_grammar, "_shorten_literals", lambda text: text)
        return read(pattern)


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=24).map("".join))
def test_any_pattern_reads_the_same_shortened_or_not(pattern: str) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert read(pattern) == read_unshortened(pattern, monkeypatch), pattern


@pytest.mark.parametrize(
    "pattern",
    # Found by review: a group's syntax read as far as the first `:` or `)` let a run swallow the rest of
    # a class, and its bad range went unseen. Then patterns Python warns of (the position it names).
    [
        "(?<n>[:z-a])", "(?>[:z-a])", "(?P<n>[)z-a])", "(?<n>[:\\d-z])", "ab(?<n>[:c-a]d)", "(?=[:z-a])",
        "(?<=[:z-a])", "(?>[:a--b])", "abcdefghij[[a]", "(?x)a b # c", "(?i)abc{2}", "(?#c:d)abc",
    ],
)  # fmt: skip
def test_patterns_that_once_read_differently_read_the_same(
    pattern: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert read(pattern) == read_unshortened(pattern, monkeypatch)


def diff_with(lines: list[str]) -> str:
    body = "\n".join(f"+{line}" for line in lines)
    return f"diff --git a/x.py b/x.py\n--- a/x.py\n+++ b/x.py\n@@ -0,0 +1,{len(lines)} @@\n{body}\n"


def test_til_content_patterns_read_the_same_and_are_mostly_shortened(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    alphabet = "abcXYZ019 _-.,:;'\"`\\^$|?*+()[]{}<>=!#%&/~가나다"
    for _ in range(20):
        lines = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(30)]
        pattern = til_schema("2026-11-30", 1500, diff=diff_with(lines))["properties"]["content"]["pattern"]
        assert read(pattern) == read_unshortened(pattern, monkeypatch)
        assert isinstance(read(pattern), tuple)  # the edge's own pattern is accepted
        # What Python's parser is given is a fraction of the pattern: the quoted lines are runs.
        assert len(json_grammar._shorten_literals(pattern)) < len(pattern) / 2


@pytest.mark.parametrize(
    ("pattern", "lengths"),
    [
        ("^ab{2}c$", (4, 4)),  # the quantifier stays on the run's last character
        ("^ab*$", (1, None)),
        ("^a\\.b\\n?$", (3, 4)),
        ("^(?x)a b$", (2, 2)),  # verbose: the space is not a character; read as it is
        ("^(?:abc|de){1,2}$", (2, 6)),
        ("^\\\\(?<n>ab)$", (3, 3)),  # an escaped backslash, then an ECMAScript named group
        ("^" + "a" * (MAX_LENGTH + 5) + "$", (MAX_LENGTH + 5, MAX_LENGTH + 5)),  # no repetition count
    ],
)
def test_lengths_of_shortened_runs(pattern: str, lengths: tuple[int, int | None]) -> None:
    assert read(pattern) == lengths


def test_a_refused_pattern_names_the_offset_of_its_own_characters() -> None:
    # The literal run before the error is shortened for the first reading: the message still counts
    # the pattern's own characters (of its body: the leading ^ is not counted).
    message = read("^abcdefgh(ij$")
    assert message == "pattern '^abcdefgh(ij$': missing ')' at offset 8"


def json_safe_by_character(body: str) -> str:
    """The rewrite one character at a time (no plain runs copied at once), to compare with."""
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            escape = body[i : i + 2]
            out.append(json_grammar._SHORTHANDS.get(escape, escape))
            i += 2
        elif c == "[":
            i = json_grammar._json_safe_class(body, i, out)
        else:
            out.append(json_grammar._JSON_SAFE_DOT if c == "." else c)
            i += 1
    return "".join(out)


@settings(max_examples=800, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=24).map("".join))
def test_the_json_safe_rewrite_copies_plain_text_as_it_is(body: str) -> None:
    assert json_grammar._json_safe(body) == json_safe_by_character(body)


@pytest.mark.parametrize("pattern", ["^a{99999999999}$", "^a{1,99999999999}$"])
def test_a_count_past_pythons_own_limit_is_refused_like_any_count_too_large(pattern: str) -> None:
    assert read(pattern) == f"pattern {pattern!r}: repetition counts above {MAX_LENGTH} are not supported"


def warnings_of(pattern: str, monkeypatch: pytest.MonkeyPatch, *, shortened: bool) -> list[str]:
    with monkeypatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if not shortened:
            patch.setattr(json_grammar, "_shorten_literals", lambda text: text)
        read(pattern)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize(
    # Warned of inside a class (its position counted in the pattern), also one left open (then refused).
    "pattern",
    ["^abcdefghij[[a]$", "^abcdef[a--b]$", "^abcdef[[ghij", "^abcdef[]a--bcd", "^abcdef[^][ghij"],
)
def test_pythons_warnings_name_the_patterns_own_positions_once(
    pattern: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert warnings_of(pattern, monkeypatch, shortened=True) == warnings_of(
        pattern, monkeypatch, shortened=False
    )
