"""Completes a truncated prefix of a JSON document, e.g. model output cut off by a token budget.

pydantic-core's JSON parser (jiter) does the reading: strictly, to tell a prefix that is merely cut
short (an end-of-input error) from text no JSON document can start with (any other error, with its
offset); and in its partial mode, to tell what value the complete part stands for (an open string
value kept as far as it goes, a member or element that cannot be completed dropped).

What this module adds is the text. The closed document is the prefix itself, cut back as little as
possible, plus what is missing - the closing quote of an open string (a half-written escape or a lone
high surrogate dropped first, so the result decodes to valid Unicode), the rest of a half literal
(`tr` -> `true`), a half number trimmed to its valid part (`1.` -> `1`), and the brackets still open -
and it must parse to the value the parser read. A document that is already complete is returned
unchanged; the edge relies on the result starting with the streamed text, so it can send the rest as
one last delta.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from pydantic_core import from_json

_POSITION = re.compile(r"at line (\d+) column (\d+)$")
_LITERAL_TAIL = re.compile(r"(?:t(?:r(?:u)?)?|f(?:a(?:l(?:s)?)?)?|n(?:u(?:l)?)?)$")
_LITERALS = {"t": "true", "f": "false", "n": "null"}
_NUMBER_TAIL = re.compile(r"-?[0-9]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]*)?$")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_LONGEST_ESCAPE = 12  # a surrogate pair, \uD83D\uDE00, cut one character short of its end
_UNREAD = object()


class NotAJsonPrefix(ValueError):
    """The text cannot be the start of any JSON document; `position` is the first offending character."""

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(f"not a JSON prefix at offset {position}: {reason}")
        self.position = position
        self.reason = reason


def _parse(text: str, partial: bool | str = False) -> Any:
    return from_json(text, allow_inf_nan=False, allow_partial=partial)  # type: ignore[arg-type]


def _offset(text: str, message: str) -> int:
    """The character offset of the parser's "at line L column C" (C counts UTF-8 bytes in the line)."""
    match = _POSITION.search(message)
    if match is None:
        return len(text)
    line, column = int(match[1]), int(match[2])
    lines = text.split("\n")
    if line > len(lines):
        return len(text)
    before = sum(len(part) + 1 for part in lines[: line - 1])
    within = lines[line - 1].encode()[: max(column - 1, 0)].decode("utf-8", "ignore")
    return before + len(within)


def _read(prefix: str) -> bool:
    """True if `prefix` is a whole document; False if it is cut short; raises NotAJsonPrefix otherwise."""
    try:
        _parse(prefix)
    except ValueError as exc:
        message = str(exc)
        position = _offset(prefix, message)
        if message.startswith("EOF while parsing") or position >= len(prefix):
            return False
        raise NotAJsonPrefix(position, _POSITION.sub("", message).strip()) from None
    return True


def _partial(text: str, mode: bool | str) -> Any:
    try:
        return _parse(text, mode)
    except ValueError:
        return _UNREAD  # a bare scalar cut short ('tr', '1.', '-'): nothing the parser can keep


def _open_containers(value: Any) -> list[str]:
    """The closers of the rightmost path of `value`: the brackets that may still be open, outermost first."""
    closers: list[str] = []
    while isinstance(value, (dict, list)):
        closers.append("}" if isinstance(value, dict) else "]")
        if not value:
            break
        value = value[-1] if isinstance(value, list) else list(value.values())[-1]
    return closers


def _tails(prefix: str) -> Iterator[str]:
    """Candidate texts that keep the whole prefix, or drop only a half escape: longest first."""
    literal = _LITERAL_TAIL.search(prefix)
    if literal is not None and literal.group():
        yield prefix + _LITERALS[literal.group()[0]][len(literal.group()) :]
    number = _NUMBER_TAIL.search(prefix)
    if number is not None and number.group():
        token = number.group()
        while token and not _NUMBER.fullmatch(token):
            token = token[:-1]
        if token:
            yield prefix[: number.start()] + token
    yield prefix
    for cut in range(min(_LONGEST_ESCAPE, len(prefix)) + 1):
        yield prefix[: len(prefix) - cut] + '"'


def _cut_backs(prefix: str) -> Iterator[str]:
    """Candidate texts that drop the incomplete last member: back to a comma, or just after a bracket."""
    end = len(prefix)
    while True:
        end = max(prefix.rfind(c, 0, end) for c in ",[{")
        if end < 0:
            return
        yield prefix[:end] if prefix[end] == "," else prefix[: end + 1]


def close_json(prefix: str) -> str:
    """A complete JSON document that keeps as much of `prefix` as possible.

    Raises NotAJsonPrefix if no JSON document starts with `prefix`; `close_json(prefix[:exc.position])`
    then always succeeds.
    """
    if _read(prefix):
        return prefix
    with_strings = _partial(prefix, "trailing-strings")
    without = _partial(prefix, True)
    closers = _open_containers(with_strings)

    def closings(body: str) -> Iterator[tuple[str, Any]]:
        for depth in range(len(closers), -1, -1):
            text = body + "".join(reversed(closers[:depth]))
            try:
                yield text, _parse(text)
            except ValueError:
                continue

    # The prefix kept whole (its open string, literal or number completed) must read as the parser
    # read it; failing that, the incomplete member is dropped, as the parser dropped it.
    for body in _tails(prefix):
        expected = with_strings if body.endswith('"') or body == prefix else _partial(body, True)
        for text, value in closings(body):
            if value == expected:
                return text
    for body in _cut_backs(prefix):
        for text, value in closings(body):
            if value == without:
                return text
    return "null"
