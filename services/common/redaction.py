"""Finds secrets in text (diffs, commit messages) and replaces them before they reach a prompt, a cache, an index
or a log line."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# Each pattern's first group (or the whole match, if it has none) is the secret; the rest is kept for context.
# Patterns start at a literal where they can, and every repetition that can fail after it is bounded (names
# {0,64}, blanks {0,32}): otherwise a failing search is quadratic, and a 256 KiB diff of `a.a.a.` takes minutes.
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "private-key",
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)",
            re.DOTALL,
        ),
    ),
    (
        "aws-access-key-id",
        re.compile(r"\b((?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA)[A-Z0-9]{16})\b"),
    ),
    (
        "aws-secret-access-key",
        re.compile(
            r"aws.{0,20}?(?:secret|key).{0,20}?[=:][ \t]{0,32}[\"']?([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])",
            re.IGNORECASE,
        ),
    ),
    (
        "github-token",
        re.compile(r"\b((?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})"),
    ),
    ("gitlab-token", re.compile(r"\b(glpat-[A-Za-z0-9_\-]{20,})")),
    ("slack-token", re.compile(r"\b(xox[abposr]-[A-Za-z0-9-]{10,})")),
    ("google-api-key", re.compile(r"\b(AIza[0-9A-Za-z_\-]{35})")),
    ("stripe-key", re.compile(r"\b((?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,})")),
    ("openai-key", re.compile(r"\b(sk-(?:proj-)?[A-Za-z0-9_\-]{20,})")),
    ("jwt", re.compile(r"\b(eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,})")),
    ("url-credentials", re.compile(r"://[^\s:/@]{1,256}:([^\s:/@]{3,256})@")),
    (
        "password-assignment",
        re.compile(
            r"(?:password|passwd|pwd|secret|token|api[_\-]?key|access[_\-]?key|client[_\-]?secret|auth)"
            r"[\w.\-]{0,64}[ \t]{0,32}[:=][ \t]{0,32}[\"']([^\"'\s]{6,})[\"']",
            re.IGNORECASE,
        ),
    ),
    # KEY=value lines in env files and shell scripts (upper-case names only: code uses other spellings).
    (
        "password-assignment",
        re.compile(
            r"(?m)^[+\- ]?[ \t]*(?:export[ \t]+)?[A-Z0-9_]{0,64}(?:PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY)"
            r"[A-Z0-9_]{0,64}[ \t]*=[ \t]*([^\s\"'#,;$]{8,})[ \t]*$"
        ),
    ),
    # `password: value` lines in YAML and similar configs.
    (
        "password-assignment",
        re.compile(
            r"^[+\- ]?[ \t]*[\w\-]{0,64}(?:password|passwd|secret|token|api[_\-]?key|access[_\-]?key)[\w\-]{0,64}"
            r"[ \t]*:[ \t]*([^\s\"'#,;(){}\[\]$]{8,})[ \t]*$",
            re.IGNORECASE | re.MULTILINE,
        ),
    ),
)


# For each pattern, literals of which any match contains at least one (lower-case ones are looked for in the
# lower-cased text, for the case-insensitive patterns): a pattern none of whose literals occurs is not run,
# which saves most of the cost (a 2.6 KiB diff: ~1 ms with every pattern, a few microseconds without).
_LITERALS: dict[int, tuple[str, ...]] = {
    0: ("PRIVATE KEY",),
    1: ("AKIA", "ASIA", "ABIA", "ACCA", "AGPA", "AIDA", "AROA", "AIPA", "ANPA", "ANVA"),
    2: ("aws",),
    3: ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    4: ("glpat-",),
    5: ("xox",),
    6: ("AIza",),
    7: ("_live_", "_test_"),
    8: ("sk-",),
    9: ("eyJ",),
    10: ("://",),
    11: ("password", "passwd", "pwd", "secret", "token", "api", "access", "client", "auth"),
    12: ("PASSWORD", "PASSWD", "SECRET", "TOKEN", "API_KEY", "ACCESS_KEY"),
    13: ("password", "passwd", "secret", "token", "api", "access"),
}
# Characters that a case-insensitive pattern matches to an ASCII letter but that str.lower() does not map
# to that one letter.
_FOLD = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"})
_FOLDED = tuple(chr(c) for c in _FOLD)
# Each case-insensitive pattern without the flag, run on the lower-cased text instead: it finds the same
# matches at the same offsets, since lower-casing (after _FOLD) keeps every character's place and maps
# each character to one that the pattern's classes and letters take or refuse alike, and it runs several
# times faster (the engine can skip to the letters a match starts with; a 4.6 KiB diff: 310 -> 45 us).
_TWINS: dict[int, re.Pattern[str]] = {
    index: re.compile(pattern.pattern, pattern.flags & ~re.IGNORECASE)
    for index, (_, pattern) in enumerate(_PATTERNS)
    if pattern.flags & re.IGNORECASE
}
# The lower-case literals (of the case-insensitive patterns), each looked for once per text.
_LOWER_LITERALS = tuple(
    dict.fromkeys(
        literal
        for index, (_, pattern) in enumerate(_PATTERNS)
        if pattern.flags & re.IGNORECASE
        for literal in _LITERALS.get(index, ())
    )
)


def _occurs(literals: tuple[str, ...]) -> Callable[[str], bool]:
    """Whether any of `literals` occurs in a text: one search when they share their first character (the
    engine then skips ahead to it; ten AWS prefixes in a 2.8 KiB diff: 23 -> 2 us), else one scan each."""
    if len({literal[0] for literal in literals}) == 1:
        search = re.compile("|".join(map(re.escape, literals))).search
        return lambda text: search(text) is not None
    return lambda text: any(literal in text for literal in literals)


# Per case-sensitive pattern, its test of the text; per case-insensitive one, its lower-case literals.
_GATES: dict[int, Callable[[str], bool] | frozenset[str]] = {
    index: frozenset(literals) if pattern.flags & re.IGNORECASE else _occurs(literals)
    for index, (_, pattern) in enumerate(_PATTERNS)
    if (literals := _LITERALS.get(index)) is not None
}


def _may_match(index: int, text: str, found: set[str]) -> bool:
    """Whether pattern `index` may match `text`, `found` being the lower-case literals that occur in it."""
    gate = _GATES.get(index)
    if gate is None:
        return True
    if isinstance(gate, frozenset):
        return not found.isdisjoint(gate)
    return gate(text)


def _lowered(text: str) -> str:
    if not text.isascii() and any(ch in text for ch in _FOLDED):
        text = text.translate(_FOLD)
    return text.lower()


@dataclass(frozen=True)
class Redacted:
    text: str
    # Kinds of secrets found, one entry per secret (for notices and metrics; never the secrets).
    kinds: tuple[str, ...]


def redact(text: str) -> Redacted:
    """Replaces every secret found in `text` with `[REDACTED:<kind>]`."""
    kinds: list[str] = []
    lowered = _lowered(text)
    # The lower-case literals are looked for in the text as it came in (not as redacted so far); a twin
    # runs on the text as redacted so far, lower-cased.
    found = {literal for literal in _LOWER_LITERALS if literal in lowered}
    for index, (kind, pattern) in enumerate(_PATTERNS):
        if not _may_match(index, text, found):
            continue
        twin = _TWINS.get(index)
        if twin is not None and len(lowered) == len(text):  # (a Unicode version may lengthen a lower-casing)
            matches = twin.finditer(lowered)
        else:
            matches = pattern.finditer(text)
        replaced = _replaced(text, matches, kind, kinds)
        if replaced is not text:
            text = replaced
            lowered = _lowered(text)
    return Redacted(text, tuple(kinds))


def _replaced(text: str, matches: Iterator[re.Match[str]], kind: str, kinds: list[str]) -> str:
    """`text` with the secret of each match (its first group, or all of it) replaced; `text` itself when
    none was (a secret already redacted is left as it is)."""
    parts: list[str] = []
    done = 0
    for match in matches:
        start, end = match.span(1) if match.re.groups else match.span(0)
        if "[REDACTED:" in text[start:end]:
            continue
        kinds.append(kind)
        parts += (text[done:start], f"[REDACTED:{kind}]")
        done = end
    if not parts:
        return text
    parts.append(text[done:])
    return "".join(parts)
