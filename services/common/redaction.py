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


@dataclass(frozen=True)
class Redacted:
    text: str
    # Kinds of secrets found, one entry per secret (for notices and metrics; never the secrets).
    kinds: tuple[str, ...]


def redact(text: str) -> Redacted:
    """Replaces every secret found in `text` with `[REDACTED:<kind>]`."""
    kinds: list[str] = []
    for kind, pattern in _PATTERNS:

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
