"""The TIL output contract: the JSON Schema given to the generator and the rules a finished TIL is checked on.

A TIL is `{"title", "keywords", "content"}`: title "YYYY-MM-DD TIL - <Korean title>", one to three short
Korean technical keywords, and Korean Markdown content that opens with "# YYYY-MM-DD TIL", lists the key
changes as bullet points with code, and stays impersonal.

What a grammar can enforce is in the schema; the rest is checked afterwards and reported as violations.
Schema patterns follow JSON Schema (they match the decoded string). The title and keyword patterns
exclude every character JSON escapes, so they mean the same to engines that match patterns against the
raw JSON text instead (xgrammar does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from til.v1 import edge_pb2

HANGUL = "가-힣"
# Characters a JSON string must escape: kept out of title and keyword patterns (see above).
_JSON_ESCAPED = '"\\\\\\x00-\\x1f'
TITLE_PART_MAX = 60  # characters before and after the first Hangul character of the title text
KEYWORD_PART_MAX = 15
KEYWORD_SYMBOLS = "A-Za-z0-9 .+#/_-"
MAX_KEYWORDS = 3
CONTENT_MAX_CHARS = 8000

TITLE_TAIL = (
    f"[^{_JSON_ESCAPED}{HANGUL}]{{0,{TITLE_PART_MAX}}}[{HANGUL}][^{_JSON_ESCAPED}]{{0,{TITLE_PART_MAX}}}"
)
KEYWORD_PATTERN = f"^[{KEYWORD_SYMBOLS}]{{0,{KEYWORD_PART_MAX}}}[{HANGUL}][{HANGUL}{KEYWORD_SYMBOLS}]{{0,{KEYWORD_PART_MAX}}}$"


def title_prefix(date: str) -> str:
    return f"{date} TIL - "


def content_heading(date: str) -> str:
    return f"# {date} TIL"


# Most characters the title and keywords can take (prefix + pattern bounds), plus the JSON around them.
TITLE_AND_KEYWORDS_MAX_CHARS = (
    len("YYYY-MM-DD TIL - ") + 2 * TITLE_PART_MAX + 1 + MAX_KEYWORDS * (2 * KEYWORD_PART_MAX + 1) + 40
)


def content_budget(max_tokens: int, chars_per_token: float) -> int:
    """Most content characters that fit in `max_tokens` after the title and keywords, so that the grammar closes
    the document before the budget runs out (at `chars_per_token` or better) instead of it being cut off."""
    room = max_tokens - TITLE_AND_KEYWORDS_MAX_CHARS / chars_per_token
    return max(len("# YYYY-MM-DD TIL\n") + 1, min(CONTENT_MAX_CHARS, int(room * chars_per_token)))


def til_schema(date: str, content_max_chars: int = CONTENT_MAX_CHARS) -> dict[str, Any]:
    """The JSON Schema of a TIL for `date` (YYYY-MM-DD), with properties in the order they are written."""
    return {
        "type": "object",
        "properties": {
            "title": {"type": "string", "pattern": f"^{title_prefix(date)}{TITLE_TAIL}$"},
            "keywords": {
                "type": "array",
                "items": {"type": "string", "pattern": KEYWORD_PATTERN},
                "minItems": 1,
                "maxItems": MAX_KEYWORDS,
            },
            # Starts with the heading line; what follows is free Markdown.
            "content": {
                "type": "string",
                "pattern": f"^{content_heading(date)}\\n",
                "maxLength": content_max_chars,
            },
        },
        "required": ["title", "keywords", "content"],
        "additionalProperties": False,
    }


@dataclass(frozen=True)
class Violation:
    """A broken rule. `enforced` rules are in the schema: breaking one means the output is unusable."""

    message: str
    enforced: bool


_BULLET = re.compile(r"^[ \t]*(?:[-*+]|\d+[.)])[ \t]+\S", re.MULTILINE)
_TOP_BULLET = re.compile(r"^(?:[-*+]|\d+[.)])[ \t]+(.*\S)[ \t]*$", re.MULTILINE)
_FENCED = re.compile(r"^[ \t]*(`{3,}|~{3,})[^\n]*\n.*?(?:^[ \t]*\1[ \t]*$|\Z)", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]+`")
_HANGUL_CHAR = re.compile(f"[{HANGUL}]")
_KEYWORD = re.compile(KEYWORD_PATTERN)
_TITLE_TAIL = re.compile(f"^{TITLE_TAIL}$")
# First-person and opinion phrasing; Korean forms must start a word (so 삭제가 is not 제가).
_PERSONAL = re.compile(
    r"\bI\s+(?:learned|learnt|think|thought|feel|felt|believe|realized|realised|found|guess)\b"
    r"|\bin my (?:opinion|view)\b|\bpersonally\b"
    rf"|(?<![{HANGUL}])(?:저는|제가|저의|나는|내가|나의|우리는)(?![{HANGUL}])"
    r"|느꼈|배웠|깨달았|생각한다|생각합니다|생각했|것 같다|것 같습니다",
    re.IGNORECASE,
)


def prose(markdown: str) -> str:
    """The Markdown without its code (fenced blocks and inline spans)."""
    return _INLINE_CODE.sub(" ", _FENCED.sub("\n", markdown))


def personal_expressions(text: str) -> list[str]:
    """Distinct personal expressions in the prose of `text`, in order of appearance."""
    return list(dict.fromkeys(m.group(0) for m in _PERSONAL.finditer(prose(text))))


def check_til(document: Any, *, date: str, truncated: bool = False) -> list[Violation]:
    """Every rule of the TIL format that `document` (parsed JSON) breaks."""
    found: list[Violation] = []

    def broken(message: str, *, enforced: bool) -> None:
        found.append(Violation(message, enforced))

    if truncated:
        broken("truncated: the output hit max_tokens before the TIL was complete", enforced=True)
    if not isinstance(document, dict):
        broken("the output is not a JSON object", enforced=True)
        return found
    extra = sorted(set(document) - {"title", "keywords", "content"})
    if extra:
        broken(f"unexpected fields: {', '.join(extra)}", enforced=True)

    title = document.get("title")
    if not isinstance(title, str) or not title:
        broken("title is missing", enforced=True)
    elif not title.startswith(title_prefix(date)):
        broken(f"title must start with '{title_prefix(date)}'", enforced=True)
    elif not _TITLE_TAIL.fullmatch(title[len(title_prefix(date)) :]):
        broken(
            f"title text must be Korean, one line, at most {2 * TITLE_PART_MAX + 1} characters, "
            "without quotes or backslashes",
            enforced=True,
        )

    keywords = document.get("keywords")
    if not isinstance(keywords, list) or not keywords:
        broken("keywords must be a list of 1 to 3 Korean terms", enforced=True)
    else:
        if len(keywords) > MAX_KEYWORDS:
            broken(f"{len(keywords)} keywords; at most {MAX_KEYWORDS}", enforced=True)
        bad = [k for k in keywords if not isinstance(k, str) or not _KEYWORD.fullmatch(k)]
        if bad:
            shown = ", ".join(repr(k) for k in bad[:3])
            broken(
                f"keywords must be short terms containing Korean ({2 * KEYWORD_PART_MAX + 1} characters "
                f"at most): {shown}",
                enforced=True,
            )
        strings = [k.strip().lower() for k in keywords if isinstance(k, str)]
        if len(set(strings)) < len(strings):
            broken("keywords repeat", enforced=False)

    content = document.get("content")
    if not isinstance(content, str) or not content:
        broken("content is missing", enforced=True)
        return found
    heading = content_heading(date)
    if not content.startswith(heading + "\n"):
        broken(f"content must start with the line '{heading}'", enforced=True)
    if len(content) > CONTENT_MAX_CHARS:
        broken(f"content has {len(content)} characters; at most {CONTENT_MAX_CHARS}", enforced=True)
    text = prose(content)
    if not _BULLET.search(text):
        broken("content has no bullet list of the key changes", enforced=False)
    else:
        bullets = _TOP_BULLET.findall(text)
        unfinished = [b for b in bullets if not b.endswith(".")]
        if unfinished:
            broken(
                f"{len(unfinished)} of {len(bullets)} bullet points do not end with a period", enforced=False
            )
    if "```" not in content and "~~~" not in content and not _INLINE_CODE.search(content):
        broken("content has no code snippet", enforced=False)
    if not _HANGUL_CHAR.search(text):
        broken("content is not written in Korean", enforced=False)
    personal = personal_expressions(f"{title if isinstance(title, str) else ''}\n{content}")
    if personal:
        broken(f"personal expressions: {', '.join(personal[:5])}", enforced=False)
    return found


def proto_text(value: Any) -> str:
    """`value` if it is a string that can travel in a proto (lone surrogates replaced), else ""."""
    if not isinstance(value, str):
        return ""
    return value.encode("utf-8", "replace").decode("utf-8")


def to_til(document: Any) -> edge_pb2.Til:
    """The fields of `document` that have the right types, as a Til message."""
    if not isinstance(document, dict):
        return edge_pb2.Til()
    keywords = document.get("keywords")
    return edge_pb2.Til(
        title=proto_text(document.get("title")),
        keywords=[proto_text(k) for k in keywords if isinstance(k, str)]
        if isinstance(keywords, list)
        else [],
        content=proto_text(document.get("content")),
    )
