"""Completes a truncated prefix of a JSON document, e.g. model output cut off by a token budget.

`close_json` scans the prefix once with a strict JSON (RFC 8259) state machine, then keeps as much of it
as can stand and appends what is missing:

- an open string value is closed (a half-written escape such as `\\u00` or a lone high surrogate at the
  end is dropped first, so the result decodes to valid Unicode);
- a member or element that cannot be completed - a key without its value, a dangling comma, a number
  that is only `-` - is dropped back to the preceding comma or bracket;
- a half literal (`tr`, `nul`) is finished, a half number (`1.`, `2e+`) is trimmed to its valid part;
- every open array and object is closed.

A document that is already complete is returned unchanged.
"""

from __future__ import annotations

import re

_WHITESPACE = frozenset(" \t\n\r")
_ESCAPABLE = frozenset('"\\/bfnrtu')
_HEX = frozenset("0123456789abcdefABCDEF")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_LITERALS = {"t": "true", "f": "false", "n": "null"}
# Runs of string characters that need no special handling.
_PLAIN = re.compile(r'[^"\\\x00-\x1f]+')


class NotAJsonPrefix(ValueError):
    """The text cannot be the start of any JSON document; `position` is the first offending character."""

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(f"not a JSON prefix at offset {position}: {reason}")
        self.position = position
        self.reason = reason


def _valid_number_prefix(token: str) -> bool:
    return bool(_NUMBER.fullmatch(token) or _NUMBER.fullmatch(token + "0"))


def _longest_number(token: str) -> str:
    while token and not _NUMBER.fullmatch(token):
        token = token[:-1]
    return token


class _Frame:
    __slots__ = ("closer", "member_start")

    def __init__(self, closer: str, member_start: int) -> None:
        self.closer = closer
        # Where the current member begins (just after the bracket, or at the comma before it):
        # cutting there drops an incomplete member and leaves the container well-formed.
        self.member_start = member_start


def close_json(prefix: str) -> str:
    """A complete JSON document that keeps as much of `prefix` as possible.

    Raises NotAJsonPrefix if no JSON document starts with `prefix`; `close_json(prefix[:exc.position])`
    then always succeeds.
    """
    stack: list[_Frame] = []
    # value: a value is expected; key: a key (or '}') is expected; colon: ':' is expected;
    # after: a value just ended; string / number / literal: inside one; done: the top value ended.
    state = "value"
    may_close = False  # in `value` / `key`: whether ']' / '}' may come (just after the bracket)
    is_key = False
    token_start = 0
    literal = ""
    escape_start = -1  # start of an unfinished escape sequence in the current string
    high_surrogate_end = -1  # end of a \uD800-\uDBFF escape, if nothing has followed it yet
    n = len(prefix)
    i = 0

    def end_value() -> str:
        return "after" if stack else "done"

    while i < n:
        c = prefix[i]
        if state == "string":
            if escape_start >= 0:
                if i == escape_start + 1:
                    if c not in _ESCAPABLE:
                        raise NotAJsonPrefix(i, f"invalid escape \\{c}")
                    if c != "u":
                        escape_start = -1
                elif c not in _HEX:
                    raise NotAJsonPrefix(i, "\\u must be followed by four hex digits")
                elif i == escape_start + 5:
                    if prefix[escape_start + 2] in "dD" and prefix[escape_start + 3] in "89abAB":
                        high_surrogate_end = i + 1
                    escape_start = -1
                i += 1
                continue
            if c == '"':
                state = "colon" if is_key else end_value()
                i += 1
                continue
            if c == "\\":
                escape_start = i
                i += 1
                continue
            plain = _PLAIN.match(prefix, i)
            if plain is None:
                raise NotAJsonPrefix(i, f"unescaped control character {c!r} in a string")
            i = plain.end()
            continue

        if state == "number":
            if c in _NUMBER_CHARS:
                if not _valid_number_prefix(prefix[token_start : i + 1]):
                    raise NotAJsonPrefix(i, f"{c!r} cannot continue the number")
                i += 1
                continue
            if not _NUMBER.fullmatch(prefix[token_start:i]):
                raise NotAJsonPrefix(i, "incomplete number")
            state = end_value()
            # fall through: `c` belongs to what follows the number

        elif state == "literal":
            seen = i - token_start
            if seen < len(literal):
                if c != literal[seen]:
                    raise NotAJsonPrefix(i, f"expected {literal!r}")
                i += 1
                continue
            state = end_value()
            # fall through

        if c in _WHITESPACE:
            i += 1
            continue

        if state == "value":
            if c == '"':
                state, is_key, token_start = "string", False, i
                escape_start = high_surrogate_end = -1
            elif c == "{":
                stack.append(_Frame("}", i + 1))
                state, may_close = "key", True
            elif c == "[":
                stack.append(_Frame("]", i + 1))
                state, may_close = "value", True
            elif c == "]" and may_close and stack and stack[-1].closer == "]":
                stack.pop()
                state = end_value()
            elif c in _LITERALS:
                state, literal, token_start = "literal", _LITERALS[c], i
            elif c == "-" or (c.isascii() and c.isdigit()):
                state, token_start = "number", i
            else:
                raise NotAJsonPrefix(i, f"expected a value, got {c!r}")
        elif state == "key":
            if c == '"':
                state, is_key, token_start = "string", True, i
                escape_start = high_surrogate_end = -1
            elif c == "}" and may_close:
                stack.pop()
                state = end_value()
            else:
                raise NotAJsonPrefix(i, f"expected a string key, got {c!r}")
        elif state == "colon":
            if c != ":":
                raise NotAJsonPrefix(i, f"expected ':', got {c!r}")
            state, may_close = "value", False
        elif state == "after":
            frame = stack[-1]
            if c == ",":
                frame.member_start = i
                state, may_close = ("key" if frame.closer == "}" else "value"), False
            elif c == frame.closer:
                stack.pop()
                state = end_value()
            else:
                raise NotAJsonPrefix(i, f"expected ',' or {frame.closer!r}, got {c!r}")
        else:  # done
            raise NotAJsonPrefix(i, f"unexpected {c!r} after the end of the document")
        i += 1

    closers = "".join(frame.closer for frame in reversed(stack))
    if state in ("done", "after"):
        return prefix + closers if closers else prefix
    if state in ("value", "key") and may_close:  # just after a bracket: nothing to drop
        return prefix + closers
    if state == "literal":
        return prefix + literal[n - token_start :] + closers
    if state == "string" and not is_key:
        end = escape_start if escape_start >= 0 else n
        if high_surrogate_end == end:
            end -= 6  # a high surrogate whose low half was cut off
        return prefix[:end] + '"' + closers
    if state == "number":
        number = _longest_number(prefix[token_start:])
        if number:
            return prefix[:token_start] + number + closers
    # An incomplete member (a key, a key and colon, a comma, or nothing usable): drop it.
    if not stack:
        return "null"
    return prefix[: stack[-1].member_start] + closers
