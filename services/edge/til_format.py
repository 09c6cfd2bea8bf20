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

import functools
import re
from dataclasses import dataclass
from typing import Any

from til.v1 import edge_pb2

from services.edge.diffs import changed_files, guess_language, quotable_lines

HANGUL = "가-힣"
TITLE_LATIN_MAX = 16  # units (1 to 5 characters, see _LATIN_UNIT) of the title's optional leading Latin word
TITLE_WORDS = 3  # Korean words after it
TITLE_WORD_MAX = 8  # characters per Korean word of the title
KEYWORD_WORD_MAX = 12
MAX_KEYWORDS = 3
CONTENT_MAX_CHARS = 8000
# The document's layout: at most this many items (a bullet and its code block), code lines per block,
# characters per bullet sentence (units, see _SENTENCE) and per closing paragraph.
MAX_ITEMS = 5
MAX_CODE_LINES = 8
SENTENCE_UNITS = 80
CLOSING_CHARS = 240
INDENT_MAX = 16
_INDENT = f"(?: {{0,{INDENT_MAX}}}|\\t{{1,4}})"  # spaces or tabs, not a mix of both
# Bumped whenever the way a schema is built from a request changes (it is part of the prompt version).
LAYOUT_VERSION = "layout-7"


# An optional leading Latin word ("Redis 캐시 ...", "C++ 템플릿"): letters, then at most two of + and #, never
# "TIL" (a DFA for the substring: grammars have no lookahead). No '.', '-' or '#' inside, which would make
# it several words that could repeat ("til.json.TIL").
_LATIN_UNIT = "(?:[A-SU-Za-z]|T(?:T|IT)?(?:[A-HJ-SU-Za-z]|I[A-KM-SU-Za-z]))"
_LATIN_END = "(?:T(?:T|IT)?I?)?[+#]{0,2}"  # the word may end in the middle of such a run
# The title after "YYYY-MM-DD TIL - ": short, one line, no digits (the date is never repeated), never
# "TIL": an optional Latin word, then 1 to TITLE_WORDS Korean words. A word said twice ("해당 해당") is left
# to the repetition penalty and reported after generation: a grammar cannot compare two words, and the
# patterns that count letters instead made the schema ~10x larger and ~15x slower to compile (20-50 ms a
# request on vLLM's event loop, one after another: bench/results/issue13-cpu).
TITLE_TAIL = (
    f"(?:{_LATIN_UNIT}{{1,{TITLE_LATIN_MAX}}}{_LATIN_END} )?"
    f"[{HANGUL}]{{1,{TITLE_WORD_MAX}}}(?: [{HANGUL}]{{1,{TITLE_WORD_MAX}}}){{0,{TITLE_WORDS - 1}}}"
)
# The keywords take three forms, in this order, so no keyword can equal another: one Korean word ("캐시"),
# a Latin word and a Korean word ("Redis 캐시"), two Korean words ("비동기 처리"). No digits: never a date
# or a number. (Any order of the forms, as anyOf over prefixItems orders, cost ~6x the compile time.)
_LATIN_KEYWORD_WORD = f"[A-Za-z]{{1,{KEYWORD_WORD_MAX}}}[+#]{{0,2}}"
KEYWORD_FORMS = (
    f"^[{HANGUL}]{{1,{KEYWORD_WORD_MAX}}}$",
    f"^{_LATIN_KEYWORD_WORD} [{HANGUL}]{{1,{KEYWORD_WORD_MAX}}}$",
    f"^[{HANGUL}]{{1,{KEYWORD_WORD_MAX}}} [{HANGUL}]{{1,{KEYWORD_WORD_MAX}}}$",
)
KEYWORD_PATTERN = "^(?:" + "|".join(form[1:-1] for form in KEYWORD_FORMS) + ")$"
KEYWORD_MAX_CHARS = 2 * KEYWORD_WORD_MAX + 3


def keywords_schema() -> dict[str, Any]:
    """1 to MAX_KEYWORDS keywords, the i-th of form KEYWORD_FORMS[i]."""
    return {
        "type": "array",
        "prefixItems": [{"type": "string", "pattern": form} for form in KEYWORD_FORMS[:MAX_KEYWORDS]],
        "items": False,
        "minItems": 1,
        "maxItems": MAX_KEYWORDS,
    }


# A bullet's one sentence: it starts with Hangul (after at most one `code` span), has no control
# characters, periods only inside words (`a.b`), and ends with a period.
_SENTENCE_UNIT = "(?:[^\\x00-\\x1f.]|\\.[^\\s.])"
_SENTENCE = f"(?:`[^`\\n]{{1,40}}` ?)?[{HANGUL}]{_SENTENCE_UNIT}{{0,{SENTENCE_UNITS}}}\\."
_SENTENCE_MAX = 43 + 1 + 2 * SENTENCE_UNITS + 1
# A closing paragraph: one line with Hangul that does not start a list, heading, quote or code.
_CLOSING = (
    f"(?:[{HANGUL}]|[^\\s`*+#>0-9{HANGUL}-][^\\x00-\\x1f`{HANGUL}]{{0,40}}[{HANGUL}])"
    f"[^\\x00-\\x1f`]{{0,{CLOSING_CHARS}}}"
)
_CLOSING_MAX = 1 + 1 + 40 + 1 + CLOSING_CHARS  # with the blank line before it


def title_prefix(date: str) -> str:
    return f"{date} TIL - "


def content_heading(date: str) -> str:
    return f"# {date} TIL"


_UNIT_MAX = 5  # T, IT, then a character or I and a character


# Most characters the title and keywords can take (prefix + pattern bounds), plus the JSON around them.
TITLE_AND_KEYWORDS_MAX_CHARS = (
    len("YYYY-MM-DD TIL - ")
    + (TITLE_LATIN_MAX + 1) * _UNIT_MAX
    + 2
    + 1
    + TITLE_WORDS * (TITLE_WORD_MAX + 1)
    + 2 * 3
    + 2
    + MAX_KEYWORDS * (KEYWORD_MAX_CHARS + 4)
    + 40
)


def content_budget(max_tokens: int, chars_per_token: float) -> int:
    """Most content characters that fit in `max_tokens` after the title and keywords, so that the grammar closes
    the document before the budget runs out (at `chars_per_token` or better) instead of it being cut off."""
    room = max_tokens - TITLE_AND_KEYWORDS_MAX_CHARS / chars_per_token
    return max(len("# YYYY-MM-DD TIL\n") + 1, min(CONTENT_MAX_CHARS, int(room * chars_per_token)))


# What `regex_literal` writes for each character it changes, and those characters.
_REGEX_ESCAPES = {**{ch: "\\" + ch for ch in "\\^$.|?*+()[]{}/"}, "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_REGEX_SPECIAL = re.compile("[" + re.escape("".join(_REGEX_ESCAPES)) + "]")


def regex_literal(text: str) -> str:
    """`text` as a regular expression that matches it literally, in the syntax ECMAScript, Python, Rust's
    regex (llguidance) and the generator's translator share: metacharacters escaped, tab as \\t."""
    return _REGEX_SPECIAL.sub(lambda special: _REGEX_ESCAPES[special.group()], text)


def lines_alternation(lines: tuple[str, ...] | list[str]) -> str:
    """A regular expression matching exactly one of `lines` (at least one), as a trie: lines that share a
    start share its branch, so a grammar engine follows one path per distinct prefix instead of one per line."""
    unique = sorted(set(lines))
    if not unique or "" in unique:
        raise ValueError("lines must be non-empty strings, at least one")
    return _trie(unique)


def _trie(words: list[str]) -> str:
    """`words` (sorted, distinct; "" marks that the prefix so far is itself a line) as one expression."""
    optional = bool(words) and words[0] == ""
    rest = words[1:] if optional else words
    branches: list[str] = []
    i = 0
    while i < len(rest):
        j = i + 1
        first = rest[i][0]
        while j < len(rest) and rest[j][0] == first:
            j += 1
        if j - i == 1:  # a line no other shares a start with: itself
            branches.append(regex_literal(rest[i]))
        else:
            group = rest[i:j]
            prefix = _common_prefix(group[0], group[-1])  # sorted: the first and last differ most
            branches.append(regex_literal(prefix) + _trie([w[len(prefix) :] for w in group]))
        i = j
    if not branches:
        return ""
    alternation = branches[0] if len(branches) == 1 and not optional else "(?:" + "|".join(branches) + ")"
    return alternation + ("?" if optional else "")


def _common_prefix(first: str, last: str) -> str:
    """The longest common prefix of two strings (a binary search over slice comparisons, done in C)."""
    low, high = 0, min(len(first), len(last))
    while low < high:
        mid = (low + high + 1) // 2
        if first[:mid] == last[:mid]:
            low = mid
        else:
            high = mid - 1
    return first[:low]


@dataclass(frozen=True)
class Layout:
    """The document a schema allows: how many items, code lines per block, and which code lines."""

    items: int
    code_lines: int
    closing: bool
    pattern: str
    max_chars: int


def _layout(date: str, language: str, lines: tuple[str, ...] | None, content_max_chars: int) -> Layout:
    """The content pattern for `date`, fenced code in `language`, code lines from `lines` (None: any line
    that does not open a fence; (): no code block at all), sized to fit in `content_max_chars`."""
    heading = content_heading(date) + "\n\n"
    fence_open = "```" + language + "\n"
    # Unknown language (no diff to guess from): any one-word info string.
    fence_pattern = "```[A-Za-z0-9+#._-]{0,20}\\n" if language == _ANY_LANGUAGE else regex_literal(fence_open)
    if language == _ANY_LANGUAGE:
        fence_open = "```" + "x" * 20 + "\n"
    room = content_max_chars - len(heading)
    closing = room >= 4 * _CLOSING_MAX
    if closing:
        room -= _CLOSING_MAX
    block_overhead = len(fence_open) + len("```\n")
    bullet_max = 2 + _SENTENCE_MAX + 1
    code_room = room - bullet_max - block_overhead - 1
    code_line, code_lines, line_max = "", 0, 0
    if lines is None:
        line_max = 160
        code_lines = max(1, min(MAX_CODE_LINES, code_room // (line_max + 1)))
        code_line = f"{_INDENT}[^\\s`~][^\\n]{{0,{160 - INDENT_MAX - 1}}}"
    elif lines:
        # A line of the diff at any indentation (up to INDENT_MAX spaces or tabs): models dedent code.
        stripped = tuple(dict.fromkeys(line.lstrip(" \t") for line in lines))
        # Shorter lines only when the longest would leave room for fewer than three in a block. Every
        # bullet has its code block even when the budget is too small for one (then maxLength is dropped).
        quoted: tuple[str, ...] = ()
        for cap in (max(len(line) for line in stripped), 80, 60, 40, 20):
            fitting = tuple(line for line in stripped if len(line) <= cap)
            if not fitting:
                break
            quoted = fitting
            line_max = INDENT_MAX + max(len(line) for line in fitting)
            code_lines = max(1, min(MAX_CODE_LINES, code_room // (line_max + 1)))
            if code_room // (line_max + 1) >= 3:
                break
        code_line = f"{_INDENT}{lines_alternation(quoted)}"  # built once, for the cap chosen
    item_max = bullet_max + (block_overhead + code_lines * (line_max + 1) if code_line else 0)
    items = max(1, min(MAX_ITEMS, (room + 1) // (item_max + 1)))
    block = f"{fence_pattern}(?:(?:{code_line})\\n){{1,{code_lines}}}```\\n" if code_line else ""
    item = f"- {_SENTENCE}\\n{block}"
    pattern = f"^{regex_literal(heading)}{item}" + (f"(?:\\n{item}){{0,{items - 1}}}" if items > 1 else "")
    if closing:
        pattern += f"(?:\\n{_CLOSING})?"
    max_chars = len(heading) + items * (item_max + 1) - 1 + (_CLOSING_MAX if closing else 0)
    return Layout(items, code_lines, closing, pattern + "$", max_chars)


@functools.lru_cache(maxsize=32)
def _quotable(diff: str) -> tuple[str, ...]:
    """`quotable_lines` of a diff seen recently (the schema and the check of one request read it twice)."""
    return quotable_lines(diff)


@functools.lru_cache(maxsize=256)
def _cached_layout(date: str, language: str, lines: tuple[str, ...] | None, content_max_chars: int) -> Layout:
    return _layout(date, language, lines, content_max_chars)


def til_layout(
    date: str,
    content_max_chars: int = CONTENT_MAX_CHARS,
    *,
    diff: str | None = None,
    language: str | None = None,
) -> Layout:
    """The document layout for a TIL of `diff` (None: code lines are free) in `language` (None: guessed
    from the diff's files). Cached per (date, language, quotable lines, budget): what shapes the grammar."""
    lines = None if diff is None else _quotable(diff)
    if language is None:
        fence = fence_language(guess_language(changed_files(diff))) if diff is not None else _ANY_LANGUAGE
    else:
        fence = fence_language(language)
    return _cached_layout(date, fence, lines, content_max_chars)


_ANY_LANGUAGE = "*"


def fence_language(language: str) -> str:
    """The info string of the code fences: the language name if it is one word, else none."""
    return language if re.fullmatch(r"[A-Za-z0-9+#._-]{1,20}", language or "") else ""


def til_schema(
    date: str,
    content_max_chars: int = CONTENT_MAX_CHARS,
    *,
    diff: str | None = None,
    language: str | None = None,
) -> dict[str, Any]:
    """The JSON Schema of a TIL for `date` (YYYY-MM-DD), with properties in the order they are written.

    The content pattern holds the whole document (see `til_layout`); with `diff`, every code line is one
    of its lines. Build it from the same diff text the prompt shows."""
    layout = til_layout(date, content_max_chars, diff=diff, language=language)
    content: dict[str, Any] = {"type": "string", "pattern": layout.pattern}
    if layout.max_chars <= content_max_chars:  # the pattern implies it; engines check that it does
        content["maxLength"] = content_max_chars
    return {
        "type": "object",
        "properties": {
            "title": {"type": "string", "pattern": f"^{title_prefix(date)}{TITLE_TAIL}$"},
            "keywords": keywords_schema(),
            "content": content,
        },
        "required": ["title", "keywords", "content"],
        "additionalProperties": False,
    }


@dataclass(frozen=True)
class Violation:
    """A broken rule. `enforced` rules are in the schema: breaking one means the output is unusable."""

    message: str
    enforced: bool


_TOP_BULLET = re.compile(r"^(?:[-*+]|\d+[.)])[ \t]+(.*\S)[ \t]*$", re.MULTILINE)
_FENCED = re.compile(r"^[ \t]*(`{3,}|~{3,})[^\n]*\n.*?(?:^[ \t]*\1[ \t]*$|\Z)", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]+`")
_HANGUL_CHAR = re.compile(f"[{HANGUL}]")
_KEYWORD = re.compile(KEYWORD_PATTERN)
_KEYWORD_FORMS = tuple(re.compile(form) for form in KEYWORD_FORMS)
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


_WORD = re.compile(r"[^\s.,:;!?()\[\]\"'`-]{2,}")


_DOUBLED = re.compile(r"(.{2,}?)\1+")


def repeated_phrase(text: str) -> str | None:
    """A word (2+ characters) or date that `text` holds twice, case aside, or a word that is one run of 2+
    characters over again ("해당해당"); None if neither."""
    seen: set[str] = set()
    for match in _WORD.finditer(text):
        word = match.group(0).lower()
        if word in seen or _DOUBLED.fullmatch(word):
            return match.group(0)
        seen.add(word)
    return None


def layout_problem(content: str, layout: Layout, quoted: frozenset[str] | None) -> str | None:
    """Why `content` does not follow `layout` or quotes a line (indentation aside) not in `quoted`; None
    when it does neither."""
    stray = []
    if quoted is not None:
        for block in _FENCED.finditer(content):
            for line in block.group(0).split("\n")[1:-1]:
                if line.lstrip(" \t") not in quoted and not line.lstrip().startswith(("```", "~~~")):
                    stray.append(line)
    if stray:
        return f"a code block quotes a line that is not in the diff: {stray[0][:80]!r}"
    if re.fullmatch(layout.pattern[1:-1], content, flags=re.DOTALL) is not None:
        return None
    if not _TOP_BULLET.search(content):
        return "content has no bullet list of the key changes"
    return (
        f"content must be '{content.split(chr(10), 1)[0][:40]}...' followed by a blank line and 1 to "
        f"{layout.items} items, each a bullet of one Korean sentence ending in a period"
        + (" followed by a fenced code block" if layout.code_lines else "")
        + ", then optionally one closing paragraph"
    )


def diff_lines(diff: str) -> frozenset[str]:
    """Every line a code block may quote from `diff` (indentation aside), with no bound on how many."""
    every = quotable_lines(diff, max_lines=1 << 30, max_bytes=1 << 40, max_line_chars=1 << 30)
    return frozenset(line.lstrip(" \t") for line in every)


def check_til(
    document: Any,
    *,
    date: str,
    truncated: bool = False,
    diff: str | None = None,
    language: str | None = None,
) -> list[Violation]:
    """Every rule of the TIL format that `document` (parsed JSON) breaks. The content is checked against the
    layout at its largest (any budget's schema allows less) and, with `diff`, each code line against the diff."""
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
            f"title text must be an optional Latin word (no digits, never 'TIL') and 1 to {TITLE_WORDS} "
            f"Korean words (at most {TITLE_WORD_MAX} characters each), so it never repeats the date",
            enforced=True,
        )
    else:
        again = repeated_phrase(title[len(title_prefix(date)) :])
        if again:
            broken(f"title repeats '{again}'", enforced=False)

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
                "keywords must be short terms containing Korean and no digits: one Korean word, a Latin word "
                f"and a Korean word, or two Korean words: {shown}",
                enforced=True,
            )
        else:
            if not all(form.fullmatch(k) for form, k in zip(_KEYWORD_FORMS, keywords, strict=False)):
                broken(
                    "keywords must be, in order, one Korean word, a Latin word and a Korean word, and two "
                    "Korean words, so that none repeats another",
                    enforced=True,
                )
        looping = [k for k in keywords if isinstance(k, str) and repeated_phrase(k)]
        if looping:
            broken(f"a keyword repeats a word: {looping[0]!r}", enforced=False)

    content = document.get("content")
    if not isinstance(content, str) or not content:
        broken("content is missing", enforced=True)
        return found
    heading = content_heading(date)
    if not content.startswith(heading + "\n"):
        broken(f"content must start with the line '{heading}'", enforced=True)
    elif len(content) > CONTENT_MAX_CHARS:
        broken(f"content has {len(content)} characters; at most {CONTENT_MAX_CHARS}", enforced=True)
    else:
        # The layout with free code lines, and each code line looked up in the whole diff: the schema's
        # quoted lines are a bounded part of the diff (or of the part the prompt showed).
        if language is None and diff is not None:
            language = guess_language(changed_files(diff))
        if diff is None or quotable_lines(diff, max_lines=1):
            layout = til_layout(date, language=language)
        else:  # nothing to quote: bullets without code blocks
            layout = til_layout(date, diff=diff, language=language)
        quoted = None if diff is None else diff_lines(diff)
        problem = layout_problem(content, layout, quoted)
        if problem:
            broken(problem, enforced=True)
    text = prose(content)
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
