"""JSON Schema -> llguidance grammar, one definition of what a schema means for both engines.

llguidance (the constrained-decoding library vLLM's `guidance` backend runs, and the llama.cpp
engine runs through a logits processor) compiles the schema. It already matches `pattern` against
the decoded string with JSON Schema's unanchored semantics (`^# T` means "starts with", `TIL`
"contains"), writes only valid JSON (no raw control characters in strings), and reads `\\d \\w \\s`
as ASCII classes, as ECMAScript does. This module adds what it lacks:

- limits, checked before anything is compiled: the schema's size, nesting depth, properties per
  object, values per enum, string lengths, item counts and pattern repetition counts;
- refusals that name what is wrong (a lookaround, a backreference, a word boundary, an anchor in
  the middle), found by parsing the pattern with Python's own regular-expression parser;
- classes and `.` in a pattern never write a control character but tab, newline and carriage
  return (a title cannot hold `\\u0001`), which also keeps clear of an llguidance bug (a class
  holding both backspace and form feed lets any short escape through, `\\"` included);
- a pattern with minLength/maxLength is folded into one pattern (`^# T` with maxLength 87 becomes
  `^(?:# T)[\\s\\S]{0,83}$`), where the two combine exactly: llguidance intersects a pattern with
  a length bound per token, many times slower; other combinations are refused with the reason;
- bounded whitespace between JSON tokens (as llama.cpp's own converter has), so a small model
  cannot loop on newlines between fields.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from re import _constants as sre_constants  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any, NoReturn

import numpy as np
from llguidance import LLMatcher

# Bounds on minLength/maxLength (and pattern repetition counts) and on minItems/maxItems.
MAX_LENGTH = 16_384
MAX_ITEMS = 1_000

# Between JSON tokens: nothing, a space, or a newline and some indentation.
WHITESPACE = "(?: |\\n {0,8})?"
COMPILE_OPTIONS: dict[str, Any] = {"whitespace_pattern": WHITESPACE}


@dataclass(frozen=True)
class SchemaLimits:
    """What one request's schema may hold; each is checked before compiling."""

    max_bytes: int = 1 << 20  # the schema's JSON text
    max_depth: int = 64  # nested JSON arrays and objects in that text
    max_properties: int = 256  # per object
    max_enum_values: int = 1_000  # per enum
    max_pattern_chars: int = 256 * 1024  # per pattern
    max_nodes: int = 20_000  # JSON values in the schema, all told


LIMITS = SchemaLimits()


class SchemaError(ValueError):
    """A schema that is refused; the message names the limit or the construct."""


def parse_schema(text: str, limits: SchemaLimits = LIMITS) -> dict[str, Any]:
    """The schema in `text`, checked against `limits` before and after parsing (SchemaError)."""
    size = len(text.encode("utf-8"))
    if size > limits.max_bytes:
        raise SchemaError(f"the schema is {size} bytes; at most {limits.max_bytes}")
    # Parsed first: json's C parser is bounded by the interpreter's recursion guard (RecursionError), so
    # the bracket count (`json_depth`, ~10x a parse) is paid only by a schema refused for its depth.
    try:
        schema = json.loads(text)
        check_size(schema, limits)
    except (RecursionError, _TooDeep):
        raise SchemaError(
            f"the schema nests {json_depth(text)} levels deep; at most {limits.max_depth}"
        ) from None
    except json.JSONDecodeError as exc:
        raise SchemaError(f"not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise SchemaError(f"must be a JSON object (a JSON Schema), not a JSON {type(schema).__name__}")
    return schema


class _TooDeep(SchemaError):
    pass


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in JSON `text` (linear, no recursion)."""
    skeleton = _JSON_STRING.sub("", text).encode("utf-8", "replace")
    codes = np.frombuffer(skeleton, dtype=np.uint8)
    steps = np.isin(codes, _OPENERS).astype(np.int64) - np.isin(codes, _CLOSERS)
    return int(np.cumsum(steps).max(initial=0))


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPENERS = np.frombuffer(b"[{", dtype=np.uint8)
_CLOSERS = np.frombuffer(b"]}", dtype=np.uint8)


def check_size(schema: Any, limits: SchemaLimits = LIMITS) -> None:
    """Depth, and counts of values, properties and enum values (SchemaError naming the limit)."""
    for nodes, (node, depth) in enumerate(_values(schema), start=1):
        if depth > limits.max_depth:
            raise _TooDeep(f"the schema nests more than {limits.max_depth} levels deep")
        if nodes > limits.max_nodes:
            raise SchemaError(f"the schema holds more than {limits.max_nodes} JSON values")
        if isinstance(node, dict):
            properties = node.get("properties")
            if isinstance(properties, dict) and len(properties) > limits.max_properties:
                raise SchemaError(
                    f"an object has {len(properties)} properties; at most {limits.max_properties}"
                )
            enum = node.get("enum")
            if isinstance(enum, list) and len(enum) > limits.max_enum_values:
                raise SchemaError(f"an enum has {len(enum)} values; at most {limits.max_enum_values}")
            pattern = node.get("pattern")
            if isinstance(pattern, str) and len(pattern) > limits.max_pattern_chars:
                raise SchemaError(
                    f"a pattern has {len(pattern)} characters; at most {limits.max_pattern_chars}"
                )


def _values(root: Any) -> Iterator[tuple[Any, int]]:
    """Every JSON value under `root` with its depth (containers count one level each)."""
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        yield node, depth
        if isinstance(node, dict):
            stack.extend((value, depth + 1) for value in node.values())
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)


def llguidance_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as llguidance gets it: checked, patterns made JSON-safe and folded with their
    length bounds, and the compile options (`x-guidance`). Raises SchemaError naming the problem."""
    check_size(schema)
    rewritten = _rewrite(schema)
    if not isinstance(rewritten, dict):  # pragma: no cover - _rewrite keeps a dict a dict
        raise SchemaError("must be a JSON object")
    # The compile options are the server's: a caller's own `x-guidance` is replaced.
    return {**rewritten, "x-guidance": dict(COMPILE_OPTIONS)}


def json_schema_to_grammar(schema: dict[str, Any], *, validate: bool = True) -> str:
    """The llguidance grammar for `schema` (see `llguidance_schema`); with `validate`, llguidance
    checks it too (a SchemaError names what it refuses)."""
    try:
        grammar = LLMatcher.grammar_from_json_schema(llguidance_schema(schema))
    except (TypeError, ValueError, RecursionError) as exc:
        if isinstance(exc, SchemaError):
            raise
        raise SchemaError(f"unsupported JSON schema: {exc}") from exc
    if validate:
        error = LLMatcher.validate_grammar(grammar)
        if error:
            raise SchemaError(f"unsupported JSON schema: {error}")
    return grammar


def schema_key(schema: dict[str, Any]) -> str:
    """A cache key that changes whenever the schema (and so the grammar) does."""
    canonical = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{canonical}\n{COMPILE_OPTIONS}".encode()).hexdigest()


def fold_lengths_into_patterns(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` in which no string has both a pattern and minLength/maxLength, and
    patterns are otherwise as written (what the vLLM engine sent to llguidance so far;
    `llguidance_schema` is the whole set of semantics, the same as on llama.cpp)."""
    check_size(schema)
    folded = _rewrite(schema, json_safe=False)
    assert isinstance(folded, dict)
    return folded


# Keywords whose value maps names to subschemas, and keywords whose value is data, not schemas.
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_DATA_KEYWORDS = ("enum", "const", "default", "examples", "required")


def _rewrite(node: Any, *, json_safe: bool = True) -> Any:
    """A copy with every string schema's bounds checked and its pattern rewritten (iterative
    over the depth that `parse_schema` already bounds)."""
    if isinstance(node, list):
        return [_rewrite(item, json_safe=json_safe) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DATA_KEYWORDS:
            out[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _rewrite(sub, json_safe=json_safe) for name, sub in value.items()}
        else:
            out[key] = _rewrite(value, json_safe=json_safe)
    _check_bounds(out)
    pattern = out.get("pattern")
    if isinstance(pattern, str):
        out["pattern"] = _pattern_for_llguidance(
            pattern, out.pop("minLength", 0), out.pop("maxLength", None), json_safe
        )
    return out


# Requests of one day share their title and keyword patterns (only the content quotes the diff):
# each is parsed once, not once a request. A refused pattern raises again each time (not cached).
@functools.lru_cache(maxsize=256)
def _pattern_for_llguidance(pattern: str, min_length: int, max_length: int | None, json_safe: bool) -> str:
    return Pattern(pattern).for_llguidance(min_length=min_length, max_length=max_length, json_safe=json_safe)


def _check_bounds(schema: dict[str, Any]) -> None:
    for key, bound in (
        ("minLength", MAX_LENGTH),
        ("maxLength", MAX_LENGTH),
        ("minItems", MAX_ITEMS),
        ("maxItems", MAX_ITEMS),
    ):
        value = schema.get(key)
        if value is not None and (type(value) is not int or not 0 <= value <= bound):
            raise SchemaError(f"{key} must be an integer from 0 to {bound}, not {value!r}")
    for low, high in (("minLength", "maxLength"), ("minItems", "maxItems")):
        if schema.get(high) is not None and schema.get(low, 0) > schema[high]:
            raise SchemaError(f"{low} ({schema[low]}) is greater than {high} ({schema[high]})")
    if "pattern" in schema and not isinstance(schema["pattern"], str):
        raise SchemaError("pattern must be a string")


class Pattern:
    """An ECMAScript pattern from a schema: its anchors, its body, and the lengths it matches.

    Python's parser reads the body (ECMAScript and Python agree on everything llguidance
    supports), so a construct neither llguidance nor this module can honour is refused here,
    by name, before any grammar is built.
    """

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.anchored_start = pattern.startswith("^")
        self.anchored_end = pattern.endswith("$") and not _is_escaped(pattern, len(pattern) - 1)
        start = 1 if self.anchored_start else 0
        end = len(pattern) - 1 if self.anchored_end and len(pattern) > start else len(pattern)
        self.body = pattern[start:end]
        self.low, self.high = self._parse()

    def for_llguidance(
        self, *, min_length: int = 0, max_length: int | None = None, json_safe: bool = True
    ) -> str:
        """The pattern llguidance gets for these bounds (in characters) on the whole string."""
        body = _json_safe(self.body) if json_safe else self.body
        padding = self._padding(min_length, max_length)
        if padding is None:
            if not json_safe:
                return self.pattern
            return ("^" if self.anchored_start else "") + body + ("$" if self.anchored_end else "")
        low, high = padding
        pad = f"[\\s\\S]{{{low},{'' if high is None else high}}}"
        return f"^(?:{body}){pad}$" if self.anchored_start else f"^{pad}(?:{body})$"

    def _padding(self, min_length: int, max_length: int | None) -> tuple[int, int | None] | None:
        """Free characters beside a fixed-length prefix or suffix that the bounds leave (None:
        the bounds add nothing)."""
        if self.anchored_start and self.anchored_end:
            if self.low < min_length or (
                max_length is not None and (self.high is None or self.high > max_length)
            ):
                self._fail_lengths("the pattern allows strings outside minLength/maxLength")
            return None
        if (min_length, max_length) == (0, None):
            return None
        if not (self.anchored_start or self.anchored_end) or self.low != self.high:
            self._fail_lengths("minLength/maxLength only combine with a fixed-length prefix or suffix")
        if max_length is not None and max_length < self.low:
            self._fail_lengths("maxLength is shorter than the pattern")
        return max(min_length - self.low, 0), None if max_length is None else max_length - self.low

    def _fail_lengths(self, problem: str) -> NoReturn:
        raise SchemaError(
            f"pattern {self.pattern!r}: {problem}; put the bound in the pattern instead, "
            "e.g. ^# Title[\\s\\S]{0,2000}$"
        )

    def _fail(self, problem: str) -> SchemaError:
        return SchemaError(f"pattern {self.pattern!r}: {problem}")

    def _parse(self) -> tuple[int, int | None]:
        """(least, most) characters the body matches (most None: no limit); refuses what cannot
        be honoured."""
        # Python spells ECMAScript's named group (?<name>...) as (?P<name>...).
        python = _NAMED_GROUP.sub(lambda m: "(?P<" if m[0][0] == "(" else m[0], self.body)
        try:
            try:
                parsed = sre_parse.parse(_shorten_literals(python))
            except re.error:
                parsed = sre_parse.parse(python)  # the error as the pattern spells it (offsets)
        except re.error as exc:
            message = _PYTHON_ERRORS.get(exc.msg, exc.msg)
            raise self._fail(f"{message} at offset {exc.pos}") from None
        except RecursionError:
            raise self._fail("groups nest too deeply") from None
        except OverflowError:  # a count past Python's own limit (~4e9)
            raise self._fail(f"repetition counts above {MAX_LENGTH} are not supported") from None
        stack = [parsed]
        while stack:
            for op, argument in stack.pop():
                if op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
                    raise self._fail("lookarounds and other (? groups are not supported")
                if op in (sre_constants.GROUPREF, sre_constants.GROUPREF_EXISTS):
                    raise self._fail("backreferences are not supported")
                if op is sre_constants.AT:
                    if argument in (sre_constants.AT_BOUNDARY, sre_constants.AT_NON_BOUNDARY):
                        raise self._fail("word boundaries are not supported")
                    raise self._fail("'^' and '$' are supported only at the start or end of the pattern")
                if op in (
                    sre_constants.MAX_REPEAT,
                    sre_constants.MIN_REPEAT,
                    sre_constants.POSSESSIVE_REPEAT,
                ):
                    low, high, item = argument
                    if max(low, 0 if high == sre_constants.MAXREPEAT else high) > MAX_LENGTH:
                        raise self._fail(f"repetition counts above {MAX_LENGTH} are not supported")
                    stack.append(item)
                elif op is sre_constants.SUBPATTERN:
                    stack.append(argument[-1])
                elif op is sre_constants.BRANCH:
                    stack.extend(argument[1])
                elif op is sre_constants.ATOMIC_GROUP:
                    stack.append(argument)
        low, high = parsed.getwidth()
        return low, None if high >= sre_constants.MAXREPEAT - 1 else high


# An escape (kept: `\\(?<n>` is a backslash, then a group) or a named group's opening, to rewrite.
_NAMED_GROUP = re.compile(r"\\.|\(\?<(?![=!])", re.DOTALL)
# A pattern is read in pieces: a class, a group's opening, a quantifier, an escape spelled with more
# than two characters, a run of literal characters, or one other character. Only runs are shortened.
_PIECES = re.compile(
    r"""
    (?P<cls>\[\^?+\]?+(?:\\.|[^\]\\])*\])
  | \(\?(?::|P<\w+>)
  | \{\d*(?:,\d*)?\}
  | \\(?:x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|N\{[^}]*\}|[0-9]{1,3})
  | (?P<run>(?:[^\\^$.|?*+()\[\]{}]|\\[^A-Za-z0-9]|\\[nrtfv])+)
  | \\?.
    """,
    re.VERBOSE | re.DOTALL,
)
_LITERAL_UNIT = re.compile(r"\\.|.", re.DOTALL)
_QUANTIFIER_START = frozenset("?*+{")
# Groups other than `(?:` and `(?P<name>` (lookarounds, atomic groups, conditionals, comments, inline
# flags: verbose mode gives whitespace and `#` a meaning) hold syntax a run could swallow.
_OTHER_GROUPS = re.compile(r"\(\?(?!:|P<\w+>)")
# What Python's parser warns of inside a class (a set operation one day): its warning names a position.
_CLASS_WARNINGS = re.compile(r"\[|--|&&|~~|\|\|")


def _shorten_literals(pattern: str) -> str:
    """`pattern` with each run of literal characters written as `x{n}`, for Python's parser, which
    reads a TIL's content pattern (mostly the diff's lines, quoted) character by character: ~2 ms a
    request, most of readying its schema. The same lengths, refusals and messages (an error is read
    again from the pattern itself). The last character of a run that a quantifier follows stays
    itself. A pattern with other groups, with a class Python warns of or with one left open is returned
    as it is."""
    if _OTHER_GROUPS.search(pattern):
        return pattern
    out: list[str] = []
    for piece in _PIECES.finditer(pattern):
        cls = piece.group("cls")
        if (cls is not None and _CLASS_WARNINGS.search(cls, 1)) or piece.group() == "[":
            return pattern  # Python warns of it (a position), or a class left open: an error to come
        run = piece.group("run")
        if run is None:
            out.append(piece.group())
            continue
        units = _LITERAL_UNIT.findall(run)
        kept = ""
        if piece.end() < len(pattern) and pattern[piece.end()] in _QUANTIFIER_START:
            kept = units.pop()
        n = len(units)
        while n > 1:
            count = min(n, MAX_LENGTH)
            out.append(f"x{{{count}}}")
            n -= count
        out.append("x" * n + kept)
    return "".join(out)


_PYTHON_ERRORS = {
    "min repeat greater than max repeat": "a quantifier has max < min",
    "missing ), unterminated subpattern": "missing ')'",
    "unbalanced parenthesis": "unbalanced ')'",
    "nothing to repeat": "nothing to repeat",
}


# Text `_json_safe` leaves as it is.
_PLAIN = re.compile(r"[^\\\[.]+")


def _json_safe(body: str) -> str:
    """`body` for llguidance, with classes that never write a control character but tab, newline
    and carriage return: `.`, `\\D \\S \\W \\s` and every `[...]` lose the others. (llguidance
    also lets a class that holds both backspace and form feed write any short escape, `\\"` too.)
    Inside a class, `[`, `&` and `~` are literals, as in ECMAScript, not set operations."""
    out: list[str] = []
    i = 0
    while i < len(body):
        plain = _PLAIN.match(body, i)  # what stays as it is, copied at once
        if plain is not None:
            out.append(plain.group())
            i = plain.end()
            continue
        c = body[i]
        if c == "\\":
            escape = body[i : i + 2]
            out.append(_SHORTHANDS.get(escape, escape))
            i += 2
        elif c == "[":
            i = _json_safe_class(body, i, out)
        else:
            out.append(_JSON_SAFE_DOT)
            i += 1
    return "".join(out)


def _json_safe_class(body: str, start: int, out: list[str]) -> int:
    """Appends the class that starts at `start` to `out`; returns the index after it."""
    i = start + 1
    negated = body.startswith("^", i)
    i += negated
    items: list[str] = []
    first = True
    while i < len(body) and (body[i] != "]" or first):
        c = body[i]
        if c == "\\":
            items.append(body[i : i + 2])
            i += 2
        else:
            items.append("\\" + c if c in "[&~" else c)
            i += 1
        first = False
    if items and items[-1] == "-":  # a literal `-` at the end would run into the `--` or range after it
        items[-1] = "\\-"
    content = "".join(items)
    out.append(f"[^{content}{_CONTROL}]" if negated else f"[{content}--[{_CONTROL}]]")
    return i + 1


_CONTROL = r"\x00-\x08\x0B\x0C\x0E-\x1F\x7F"
# `.` as ECMAScript reads it (no line terminators), less those control characters.
_JSON_SAFE_DOT = rf"[^\n\r\u2028\u2029{_CONTROL}]"
_SHORTHANDS = {
    r"\D": rf"[^0-9{_CONTROL}]",
    r"\W": rf"[^0-9A-Za-z_{_CONTROL}]",
    r"\s": r"[\t\n\r ]",
    r"\S": rf"[^\t\n\r {_CONTROL}]",
}


def _is_escaped(text: str, index: int) -> bool:
    backslashes = 0
    while index - 1 - backslashes >= 0 and text[index - 1 - backslashes] == "\\":
        backslashes += 1
    return backslashes % 2 == 1
