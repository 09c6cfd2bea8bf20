"""Finds secrets in text (diffs, commit messages) and replaces them before they reach a prompt, a cache, an index
or a log line."""

from __future__ import annotations

import re
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
            r"(?i)aws.{0,20}?(?:secret|key).{0,20}?[=:][ \t]{0,32}[\"']?([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"
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
            r"(?i)(?:password|passwd|pwd|secret|token|api[_\-]?key|access[_\-]?key|client[_\-]?secret|auth)"
            r"[\w.\-]{0,64}[ \t]{0,32}[:=][ \t]{0,32}[\"']([^\"'\s]{6,})[\"']"
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
            r"(?im)^[+\- ]?[ \t]*[\w\-]{0,64}(?:password|passwd|secret|token|api[_\-]?key|access[_\-]?key)[\w\-]{0,64}"
            r"[ \t]*:[ \t]*([^\s\"'#,;(){}\[\]$]{8,})[ \t]*$"
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


def _may_match(index: int, pattern: re.Pattern[str], text: str, lowered: str) -> bool:
    literals = _LITERALS.get(index)
    if literals is None:
        return True
    where = lowered if pattern.flags & re.IGNORECASE else text
    return any(literal in where for literal in literals)


@dataclass(frozen=True)
class Redacted:
    text: str
    # Kinds of secrets found, one entry per secret (for notices and metrics; never the secrets).
    kinds: tuple[str, ...]


def redact(text: str) -> Redacted:
    """Replaces every secret found in `text` with `[REDACTED:<kind>]`."""
    kinds: list[str] = []
    lowered = text.translate(_FOLD).lower()
    for index, (kind, pattern) in enumerate(_PATTERNS):
        if not _may_match(index, pattern, text, lowered):
            continue

        def replace(match: re.Match[str], kind: str = kind) -> str:
            secret = match.group(1) if match.re.groups else match.group(0)
            if "[REDACTED:" in secret:
                return match.group(0)
            kinds.append(kind)
            if match.re.groups == 0:
                return f"[REDACTED:{kind}]"
            start, end = match.span(1)
            whole = match.group(0)
            offset = match.start(0)
            return whole[: start - offset] + f"[REDACTED:{kind}]" + whole[end - offset :]

        text = pattern.sub(replace, text)
    return Redacted(text, tuple(kinds))
