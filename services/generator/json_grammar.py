"""JSON Schema -> GBNF grammar for llama.cpp, with output that is always valid JSON.

llama.cpp's converter (vendored in `gbnf_schema`) has three gaps that let a constrained model write
invalid JSON or refuse a valid schema:

- its string characters allow raw control characters (a raw newline or tab inside a string);
- `pattern` is matched against the raw JSON text, so `.` allows `"`, `\\` and control characters,
  and `\\n` in a pattern inserts a raw newline;
- `pattern` must be anchored with both `^` and `$`, though JSON Schema patterns are unanchored
  (`^# 2026-11-24 TIL` means "starts with").

This module keeps that converter for everything else (objects, arrays with minItems and maxItems,
strings with minLength and maxLength, enums, formats) but swaps in a JSON-safe string character and
its own pattern translator. Patterns are ECMAScript regular expressions over the decoded string;
the translator turns one into a grammar over the JSON text that encodes it. Within a pattern the
grammar allows fewer encodings than JSON does (classes and `.` never write `\\/` or `\\u` escapes,
nor control characters other than tab, newline and carriage return), which is all a generator
needs. A pattern may come with minLength/maxLength when the two can be combined exactly: the
pattern already implies them, or it is a fixed-length prefix or suffix.

`fold_lengths_into_patterns` rewrites a schema for engines that read JSON Schema themselves (vLLM's
llguidance): the same strings, with such bounds folded into the pattern.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

from services.generator.gbnf_schema import RESERVED_NAMES, BuiltinRule, SchemaConverter

# Bounds on minLength/maxLength (and pattern repetition counts) and on minItems/maxItems: llama.cpp
# expands a bounded repetition into one rule per step, so a huge bound would eat the server's memory.
MAX_LENGTH = 16_384
MAX_ITEMS = 1_000
# llama.cpp refuses a single repetition count above 2000; longer ones are written in chunks.
_CHUNK = 1_000

_MAX_CODEPOINT = 0x10FFFF

# A character inside a JSON string: anything but `"`, `\` and control characters, or an escape.
_JSON_CHAR = BuiltinRule(r'[^"\\\x7F\x00-\x1F] | [\\] (["\\bfnrt] | "u" [0-9a-fA-F]{4})', [])

# Characters that cannot appear raw inside a JSON string (0x7F may, but stays escaped as upstream does).
_NEEDS_ESCAPE: list[tuple[int, int]] = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x7F, 0x7F)]
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
# Of the characters that need an escape, those a character class or `.` may generate.
_GENERATED_ESCAPED = '"\\\t\n\r'

_DIGIT = [(0x30, 0x39)]
_WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
# ECMAScript \s: WhiteSpace and LineTerminator.
_SPACE = [
    (0x09, 0x0D),
    (0x20, 0x20),
    (0xA0, 0xA0),
    (0x1680, 0x1680),
    (0x2000, 0x200A),
    (0x2028, 0x2029),
    (0x202F, 0x202F),
    (0x205F, 0x205F),
    (0x3000, 0x3000),
    (0xFEFF, 0xFEFF),
]
_LINE_TERMINATORS = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]

Ranges = list[tuple[int, int]]


def json_schema_to_grammar(schema: dict[str, Any]) -> str:
    """A GBNF grammar (root rule `root`) for JSON documents that follow `schema`.

    Raises ValueError, naming the problem, for a schema the converter cannot express.
    """
    _check_bounds(schema)
    converter = _JsonSafeConverter()
    try:
        resolved = converter.resolve_refs(schema, "request")
        converter.visit(resolved, "")
    except ValueError:
        raise
    except Exception as exc:  # the bundled converter asserts on schemas it cannot express
        raise ValueError(f"unsupported JSON schema: {exc or type(exc).__name__}") from exc
    return converter.format_grammar()


def fold_lengths_into_patterns(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` in which no string has both a pattern and minLength/maxLength.

    Each such pair becomes one pattern for the same strings (`^# T[\\s\\S]{0,83}$` for `^# T` with
    maxLength 87), or the bare pattern where it already implies the bounds. Engines that intersect a
    pattern with a length bound per token (llguidance) are many times slower than with the one
    pattern. Raises ValueError, as `json_schema_to_grammar` does, for bounds that cannot be folded.
    """
    _check_bounds(schema)
    return _fold(schema)


def _fold(node: Any) -> Any:
    if isinstance(node, list):
        return [_fold(item) for item in node]
    if not isinstance(node, dict):
        return node
    folded: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DATA_KEYWORDS:
            folded[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            folded[key] = {name: _fold(sub) for name, sub in value.items()}
        else:
            folded[key] = _fold(value)
    pattern = folded.get("pattern")
    if isinstance(pattern, str) and ("minLength" in folded or "maxLength" in folded):
        translator = _PatternTranslator(pattern, lambda name, rule: name, "char")
        folded["pattern"] = translator.folded(
            min_length=folded.pop("minLength", 0), max_length=folded.pop("maxLength", None)
        )
    return folded


class _JsonSafeConverter(SchemaConverter):
    def __init__(self) -> None:
        super().__init__(prop_order={})

    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        return super()._add_primitive(name, _JSON_CHAR if name == "char" else rule)

    def visit(self, schema: dict[str, Any], name: str) -> str:
        is_string = schema.get("type") == "string" or ("type" not in schema and "pattern" in schema)
        if (
            not is_string
            or schema.keys() & _NOT_A_PLAIN_STRING
            or ("format" in schema and "pattern" not in schema)
        ):
            return super().visit(schema, name)
        rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
        char = self._add_primitive("char", _JSON_CHAR)
        min_length, max_length = schema.get("minLength", 0), schema.get("maxLength")
        if "pattern" in schema:
            translator = _PatternTranslator(schema["pattern"], self._add_rule, char)
            body = translator.translate(min_length=min_length, max_length=max_length)
        elif "minLength" in schema or "maxLength" in schema:
            # Chunked GBNF repetition rather than the bundled converter's nested optionals, which
            # llama.cpp refuses beyond about 2000 characters.
            body = _repeat(char, min_length, max_length)
        else:
            return super().visit(schema, name)
        return self._add_rule(rule_name, rf'"\"" {body} "\"" space')

    def _visit_pattern(self, pattern: str, name: str) -> str:
        char = self._add_primitive("char", _JSON_CHAR)
        body = _PatternTranslator(pattern, self._add_rule, char).translate()
        return self._add_rule(name, rf'"\"" {body} "\"" space')


# Keywords under which the bundled converter reads a schema as something other than a plain string.
_NOT_A_PLAIN_STRING = {"$ref", "oneOf", "anyOf", "allOf", "const", "enum", "properties", "items"}


# Keywords whose value maps names to subschemas, and keywords whose value is data, not schemas.
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_DATA_KEYWORDS = ("enum", "const", "default", "examples", "required")


def _check_bounds(schema: Any) -> None:
    if not isinstance(schema, dict):
        return
    for key, bound in (
        ("minLength", MAX_LENGTH),
        ("maxLength", MAX_LENGTH),
        ("minItems", MAX_ITEMS),
        ("maxItems", MAX_ITEMS),
    ):
        value = schema.get(key)
        if value is not None and (type(value) is not int or not 0 <= value <= bound):
            raise ValueError(f"{key} must be an integer from 0 to {bound}, not {value!r}")
    for low, high in (("minLength", "maxLength"), ("minItems", "maxItems")):
        if schema.get(high) is not None and schema.get(low, 0) > schema[high]:
            raise ValueError(f"{low} ({schema[low]}) is greater than {high} ({schema[high]})")
    if "pattern" in schema and not isinstance(schema["pattern"], str):
        raise ValueError("pattern must be a string")
    for key, value in schema.items():
        if key in _DATA_KEYWORDS:
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for subschema in value.values():
                _check_bounds(subschema)
        elif isinstance(value, dict):
            _check_bounds(value)
        elif isinstance(value, list):
            for subschema in value:
                _check_bounds(subschema)


@dataclass(frozen=True)
class _Shape:
    """A pattern's anchors, its body as GBNF, and the free characters that minLength/maxLength leave
    beside a fixed-length prefix or suffix (None: the bounds add nothing)."""

    anchored_start: bool
    anchored_end: bool
    body: str
    padding: tuple[int, int | None] | None


class _PatternTranslator:
    """An ECMAScript regular expression over a string's value -> GBNF over the string's JSON text.

    Supported: literals and escapes, `.`, classes (`[a-z]`, `[^"]`, `\\d \\w \\s` and their
    negations), groups (`(...)`, `(?:...)`, `(?<name>...)`), `|`, and the quantifiers
    `* + ? {n} {n,} {n,m}` (lazy forms generate as greedy). `^` and `$` anchor only at the ends;
    an unanchored end may be followed or preceded by any text. Lookarounds, backreferences and
    word boundaries are refused.
    """

    def __init__(self, pattern: str, add_rule: Callable[[str, str], str], any_char: str) -> None:
        self._pattern = pattern
        self._add_rule = add_rule
        self._any_char = any_char
        self._src = ""
        self._pos = 0

    def translate(self, *, min_length: int = 0, max_length: int | None = None) -> str:
        """GBNF for the string's contents; the lengths (in characters) bound the whole string."""
        shape = self._shape(min_length, max_length)
        padding = f"{self._any_char}*"
        if shape.padding is not None:
            low, high = shape.padding
            padding = _repeat(self._any_char, low, high)
        parts = ["" if shape.anchored_start else padding, shape.body, "" if shape.anchored_end else padding]
        return " ".join(part for part in parts if part)

    def folded(self, *, min_length: int = 0, max_length: int | None = None) -> str:
        """One pattern for the same strings as the pattern with these lengths (same checks as `translate`)."""
        shape = self._shape(min_length, max_length)
        if shape.padding is None:
            return self._pattern
        low, high = shape.padding
        padding = f"[\\s\\S]{{{low},{'' if high is None else high}}}"
        if shape.anchored_start:
            return f"^(?:{self._src}){padding}$"
        return f"^{padding}(?:{self._src})$"

    def _shape(self, min_length: int, max_length: int | None) -> _Shape:
        pattern = self._pattern
        anchored_start = pattern.startswith("^")
        anchored_end = pattern.endswith("$") and not _is_escaped(pattern, len(pattern) - 1)
        self._src = pattern[1 if anchored_start else 0 : len(pattern) - 1 if anchored_end else len(pattern)]
        self._pos = 0
        body, low, high = self._alternation()
        if self._pos < len(self._src):
            self._fail("unbalanced ')'")
        padding: tuple[int, int | None] | None = None
        if anchored_start and anchored_end:
            if low < min_length or (max_length is not None and (high is None or high > max_length)):
                self._fail_lengths("the pattern allows strings outside minLength/maxLength")
        elif (min_length, max_length) != (0, None):
            if not (anchored_start or anchored_end) or low != high:
                self._fail_lengths("minLength/maxLength only combine with a fixed-length prefix or suffix")
            if max_length is not None and max_length < low:
                self._fail_lengths("maxLength is shorter than the pattern")
            padding = (max(min_length - low, 0), None if max_length is None else max_length - low)
        return _Shape(anchored_start, anchored_end, body, padding)

    def _fail_lengths(self, problem: str) -> NoReturn:
        raise ValueError(
            f"pattern {self._pattern!r}: {problem}; put the bound in the pattern instead, "
            "e.g. ^# Title[\\s\\S]{0,2000}$"
        )

    def _fail(self, problem: str) -> NoReturn:
        offset = self._pos + (1 if self._pattern.startswith("^") else 0)
        raise ValueError(f"pattern {self._pattern!r}: {problem} at offset {offset}")

    def _peek(self, ahead: int = 0) -> str:
        i = self._pos + ahead
        return self._src[i] if i < len(self._src) else ""

    # Each part below comes with the least and most characters it matches (None: no limit).

    def _alternation(self) -> tuple[str, int, int | None]:
        alternatives = [self._sequence()]
        while self._peek() == "|":
            self._pos += 1
            alternatives.append(self._sequence())
        low = min(a[1] for a in alternatives)
        highs = [a[2] for a in alternatives]
        high = None if None in highs else max(h for h in highs if h is not None)
        if len(alternatives) == 1:
            return alternatives[0]
        return "(" + " | ".join(a[0] for a in alternatives) + ")", low, high

    def _sequence(self) -> tuple[str, int, int | None]:
        # (element, JSON text when the element is a plain literal that may merge with its neighbours)
        items: list[tuple[str, str | None]] = []
        low, high = 0, 0
        unbounded = False
        while self._pos < len(self._src) and self._peek() not in "|)":
            element, text, atom_low, atom_high = self._atom()
            bounds = self._quantifier()
            if bounds:
                times_low, times_high = bounds
                items.append((_repeat(element, times_low, times_high), None))
                low += atom_low * times_low
                if times_high != 0 and atom_high != 0:
                    if times_high is None or atom_high is None:
                        unbounded = True
                    else:
                        high += atom_high * times_high
            else:
                items.append((element, text))
                low += atom_low
                if atom_high is None:
                    unbounded = True
                else:
                    high += atom_high
        merged: list[str] = []
        run: list[str] = []
        for element, text in [*items, ("", None)]:
            if text is not None:
                run.append(text)
                continue
            if run:
                merged.append(_literal("".join(run)))
                run = []
            if element:
                merged.append(element)
        return " ".join(merged), low, None if unbounded else high

    def _atom(self) -> tuple[str, str | None, int, int | None]:
        """One element: its GBNF, its JSON text if a plain character, and its length range."""
        c = self._peek()
        if c == "(":
            self._pos += 1
            if self._src.startswith("?:", self._pos):
                self._pos += 2
            elif self._src.startswith("?<", self._pos) and self._peek(2) not in ("=", "!"):
                end = self._src.find(">", self._pos)
                if end < 0:
                    self._fail("unterminated group name")
                self._pos = end + 1
            elif self._peek() == "?":
                self._fail("lookarounds and other (? groups are not supported")
            inner, low, high = self._alternation()
            if self._peek() != ")":
                self._fail("missing ')'")
            self._pos += 1
            return f"({inner})", None, low, high
        if c == "[":
            return self._charset(self._class()), None, 1, 1
        if c == ".":
            self._pos += 1
            return self._add_rule("json-dot", _charset_rule(_complement(_LINE_TERMINATORS))), None, 1, 1
        if c == "\\":
            escaped = self._escape(in_class=False)
            if isinstance(escaped, list):
                return self._charset(escaped), None, 1, 1
            return _literal(_json_text(escaped)), _json_text(escaped), 1, 1
        if c in "*+?{":
            self._fail(f"nothing to repeat before {c!r}")
        if c in "^$":
            self._fail(f"{c!r} is supported only at the start or end of the pattern")
        self._pos += 1
        return _literal(_json_text(c)), _json_text(c), 1, 1

    def _charset(self, ranges: Ranges) -> str:
        rule = _charset_rule(ranges)
        if not rule:
            self._fail("this class matches no character that can be generated")
        return rule if " | " not in rule else f"({rule})"

    def _quantifier(self) -> tuple[int, int | None] | None:
        """(min, max) of a quantifier at the current position (max None: unbounded), or None."""
        c = self._peek()
        bounds: tuple[int, int | None]
        if c in _QUANTIFIERS:
            self._pos += 1
            bounds = _QUANTIFIERS[c]
        elif c == "{":
            match = _BRACES.match(self._src, self._pos)
            if match is None:
                self._fail("malformed {n,m} quantifier")
            low = int(match.group(1))
            high = None if match.group(2) and not match.group(3) else int(match.group(3) or low)
            if high is not None and high < low:
                self._fail(f"quantifier {match.group(0)} has max < min")
            if max(low, high or 0) > MAX_LENGTH:
                self._fail(f"repetition counts above {MAX_LENGTH} are not supported")
            self._pos = match.end()
            bounds = (low, high)
        else:
            return None
        if self._peek() == "?":  # lazy: matches the same strings
            self._pos += 1
        return bounds

    def _class(self) -> Ranges:
        self._pos += 1  # [
        negated = self._peek() == "^"
        if negated:
            self._pos += 1
        ranges: Ranges = []
        while True:
            c = self._peek()
            if not c:
                self._fail("missing ']'")
            if c == "]":
                self._pos += 1
                break
            low = self._class_atom()
            if isinstance(low, list):
                ranges += low
                continue
            if self._peek() == "-" and self._peek(1) not in ("]", ""):
                self._pos += 1
                high = self._class_atom()
                if isinstance(high, list) or ord(high) < ord(low):
                    self._fail("invalid range in class")
                ranges.append((ord(low), ord(high)))
            else:
                ranges.append((ord(low), ord(low)))
        ranges = _normalize(ranges)
        return _complement(ranges) if negated else ranges

    def _class_atom(self) -> str | Ranges:
        c = self._peek()
        if c == "\\":
            return self._escape(in_class=True)
        self._pos += 1
        return c

    def _escape(self, *, in_class: bool) -> str | Ranges:
        self._pos += 1  # backslash
        e = self._peek()
        if not e:
            self._fail("pattern ends with a lone backslash")
        self._pos += 1
        sets = {"d": _DIGIT, "w": _WORD, "s": _SPACE}
        if e in sets:
            return sets[e]
        if e.lower() in sets:
            return _complement(sets[e.lower()])
        simple = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}
        if e in simple:
            return simple[e]
        if e == "b" and in_class:
            return "\b"
        if e in "xu":
            digits = 2 if e == "x" else 4
            text = self._src[self._pos : self._pos + digits]
            if len(text) != digits or not all(ch in "0123456789abcdefABCDEF" for ch in text):
                self._fail(f"malformed \\{e} escape")
            self._pos += digits
            return chr(int(text, 16))
        if e in "bB":
            self._fail("word boundaries are not supported")
        if e.isdigit() or e == "k":
            self._fail("backreferences are not supported")
        if e in "pPc":
            self._fail(f"\\{e} escapes are not supported")
        return e


_QUANTIFIERS: dict[str, tuple[int, int | None]] = {"*": (0, None), "+": (1, None), "?": (0, 1)}
_BRACES = re.compile(r"\{(\d+)(,(\d*))?\}")


def _repeat(item: str, low: int, high: int | None) -> str:
    """GBNF for `low` to `high` (None: any number of) repetitions of one element `item`.

    Counts above llama.cpp's limit are split into chunks, without making the grammar ambiguous.
    """
    if (low, high) == (0, None):
        return f"{item}*"
    if (low, high) == (1, None):
        return f"{item}+"
    full, rest = divmod(low, _CHUNK)
    parts = [f"{item}{{{_CHUNK}}}"] * full
    if high is None:
        parts.append(f"{item}{{{rest},}}" if rest else f"{item}*")
    elif rest + (high - low) <= _CHUNK:
        parts.append(_bounded(item, rest, rest + high - low))
    else:
        parts += [_bounded(item, rest, rest), _up_to(item, high - low)]
    return " ".join(part for part in parts if part)


def _bounded(item: str, low: int, high: int) -> str:
    if high == 0:
        return ""
    if low == high:
        return item if low == 1 else f"{item}{{{low}}}"
    if (low, high) == (0, 1):
        return f"{item}?"
    return f"{item}{{{low},{high}}}"


def _up_to(item: str, n: int) -> str:
    """0 to n repetitions: a full chunk then up to n - chunk more, or less than one chunk."""
    if n <= _CHUNK:
        return _bounded(item, 0, n)
    return f"({item}{{{_CHUNK}}} {_up_to(item, n - _CHUNK)} | {item}{{0,{_CHUNK - 1}}})"


def _is_escaped(text: str, index: int) -> bool:
    backslashes = 0
    while index - 1 - backslashes >= 0 and text[index - 1 - backslashes] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


def _json_text(ch: str) -> str:
    """How `ch` is written inside a JSON string."""
    if ch in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[ch]
    if ord(ch) < 0x20 or ord(ch) == 0x7F:
        return f"\\u{ord(ch):04x}"
    return ch


def _literal(json_text: str) -> str:
    """A GBNF string literal for text that is already JSON-escaped (so has no raw control chars)."""
    return '"' + json_text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _normalize(ranges: Iterable[tuple[int, int]]) -> Ranges:
    merged: Ranges = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def _complement(ranges: Ranges) -> Ranges:
    result: Ranges = []
    start = 0
    for low, high in _normalize(ranges):
        if low > start:
            result.append((start, low - 1))
        start = high + 1
    if start <= _MAX_CODEPOINT:
        result.append((start, _MAX_CODEPOINT))
    return result


def _subtract(ranges: Ranges, remove: Ranges) -> Ranges:
    return _complement(_normalize([*_complement(ranges), *remove]))


def _contains(ranges: Ranges, codepoint: int) -> bool:
    return any(low <= codepoint <= high for low, high in ranges)


def _charset_rule(ranges: Ranges) -> str:
    """GBNF alternatives for the JSON text of one character from `ranges` ("" if none can be generated)."""
    plain = _subtract(ranges, _NEEDS_ESCAPE)
    parts: list[str] = []
    if plain:
        excluded = _complement(plain)
        # A negated class reads better for "almost anything" sets such as `.`.
        if len(excluded) < len(plain):
            parts.append("[^" + "".join(_class_range(r) for r in excluded) + "]")
        else:
            parts.append("[" + "".join(_class_range(r) for r in plain) + "]")
    parts += [_literal(_json_text(ch)) for ch in _GENERATED_ESCAPED if _contains(ranges, ord(ch))]
    return " | ".join(parts)


def _class_range(r: tuple[int, int]) -> str:
    low, high = r
    return _class_char(low) if low == high else f"{_class_char(low)}-{_class_char(high)}"


def _class_char(codepoint: int) -> str:
    ch = chr(codepoint)
    if ch.isascii() and ch.isalnum():
        return ch
    if codepoint <= 0xFF:
        return f"\\x{codepoint:02X}"
    if codepoint <= 0xFFFF:
        return f"\\u{codepoint:04X}"
    return f"\\U{codepoint:08X}"
