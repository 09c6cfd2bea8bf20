"""Reading a unified diff: is it one, which files and identifiers it touches, and fitting it in a budget."""

from __future__ import annotations

import collections
import posixpath
import re
from dataclasses import dataclass

_HUNK = re.compile(r"^@@ -\d+(?:,\d+)? \+\d+(?:,\d+)? @@(.*)$", re.MULTILINE)
_GIT_HEADER = re.compile(r"^diff --git (\S+|\"[^\"]*\") (\S+|\"[^\"]*\")\s*$", re.MULTILINE)
_OLD_FILE = re.compile(r"^--- (.+?)(?:\t.*)?$", re.MULTILINE)
_NEW_FILE = re.compile(r"^\+\+\+ (.+?)(?:\t.*)?$", re.MULTILINE)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")

# Words too common in code to say anything about a change.
_NOISE_WORDS = """
    and async await break case catch class const continue def default del elif else enum except export
    extends false final finally for from func function global if impl import in interface int is lambda
    let long match mut new nil none not null object or package pass private protected pub public raise
    return self static str string struct super switch this throw throws true try type use var void while
    with yield bool char float double byte args kwargs len print println todo the that are
"""
_NOISE = frozenset(_NOISE_WORDS.split())

_LANGUAGES = {
    ".py": "python",
    ".pyi": "python",
    ".ipynb": "python",
    ".js": "javascript",
    ".jsx": "javascript",
    ".mjs": "javascript",
    ".cjs": "javascript",
    ".ts": "typescript",
    ".tsx": "typescript",
    ".java": "java",
    ".kt": "kotlin",
    ".kts": "kotlin",
    ".scala": "scala",
    ".groovy": "groovy",
    ".go": "go",
    ".rs": "rust",
    ".rb": "ruby",
    ".php": "php",
    ".swift": "swift",
    ".m": "objective-c",
    ".c": "c",
    ".h": "c",
    ".cc": "c++",
    ".cpp": "c++",
    ".cxx": "c++",
    ".hpp": "c++",
    ".hh": "c++",
    ".cs": "c#",
    ".fs": "f#",
    ".dart": "dart",
    ".lua": "lua",
    ".r": "r",
    ".jl": "julia",
    ".sh": "shell",
    ".bash": "shell",
    ".zsh": "shell",
    ".ps1": "powershell",
    ".sql": "sql",
    ".html": "html",
    ".css": "css",
    ".scss": "css",
    ".vue": "vue",
    ".svelte": "svelte",
    ".proto": "protobuf",
    ".tf": "terraform",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".toml": "toml",
    ".json": "json",
    ".md": "markdown",
    ".dockerfile": "dockerfile",
}
# Files whose language says little when code files are also in the diff.
_SUPPORTING = frozenset({"yaml", "toml", "json", "markdown"})


def looks_like_diff(text: str) -> bool:
    """True for unified diffs (`git diff`, `git show`, `diff -u`): file headers or hunk headers."""
    if _GIT_HEADER.search(text) or _HUNK.search(text):
        return True
    return bool(_OLD_FILE.search(text) and _NEW_FILE.search(text))


def _strip_side(path: str) -> str:
    path = path.strip().strip('"')
    if path.startswith(("a/", "b/")):
        path = path[2:]
    return path


def changed_files(diff: str) -> list[str]:
    """Paths the diff changes, in order, each once (the new name of a renamed file)."""
    files: list[str] = []
    headers = list(_GIT_HEADER.finditer(diff))
    if headers:
        files = [_strip_side(m.group(2)) for m in headers]
    else:
        for old, new in zip(_OLD_FILE.finditer(diff), _NEW_FILE.finditer(diff), strict=False):
            path = new.group(1) if new.group(1).strip() != "/dev/null" else old.group(1)
            files.append(_strip_side(path))
    return list(dict.fromkeys(f for f in files if f and f != "/dev/null"))


def changed_identifiers(diff: str, *, limit: int = 20) -> list[str]:
    """The names that occur most often on changed lines and hunk headers, most frequent first."""
    counts: collections.Counter[str] = collections.Counter()
    for line in diff.splitlines():
        if line.startswith(("+++", "---")):
            continue
        if line.startswith(("+", "-")):
            text = line[1:]
        elif line.startswith("@@"):
            hunk = _HUNK.match(line)
            text = hunk.group(1) if hunk else ""
        else:
            continue
        counts.update(w for w in _IDENTIFIER.findall(text) if w.lower() not in _NOISE)
    return [word for word, _ in counts.most_common(limit)]


def guess_language(files: list[str]) -> str:
    """The most common programming language among `files` by extension; "" when none is known."""
    found: list[str] = []
    for path in files:
        name = posixpath.basename(path).lower()
        ext = ".dockerfile" if name == "dockerfile" else posixpath.splitext(name)[1]
        if ext in _LANGUAGES:
            found.append(_LANGUAGES[ext])
    code = [lang for lang in found if lang not in _SUPPORTING] or found
    if not code:
        return ""
    counts = collections.Counter(code)
    best = max(counts.values())
    return next(lang for lang in code if counts[lang] == best)


@dataclass(frozen=True)
class FittedDiff:
    text: str
    # Files left out entirely, and whether the last kept file was cut short.
    omitted_files: tuple[str, ...] = ()
    cut: bool = False

    @property
    def trimmed(self) -> bool:
        return self.cut or bool(self.omitted_files)


def fit_diff(diff: str, max_chars: int) -> FittedDiff:
    """Keeps whole files from the start of the diff while they fit in `max_chars`, then cuts at a line."""
    if len(diff) <= max_chars:
        return FittedDiff(diff)
    starts = [m.start() for m in _GIT_HEADER.finditer(diff)]
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    sections = [diff[a:b] for a, b in zip(starts, [*starts[1:], len(diff)], strict=True)]
    kept: list[str] = []
    used = 0
    cut = False
    for index, section in enumerate(sections):
        if used + len(section) <= max_chars:
            kept.append(section)
            used += len(section)
            continue
        room = max_chars - used
        if room >= 200 or not kept:
            head = section[: max(room, 0)]
            head = head[: head.rfind("\n") + 1] if "\n" in head else head
            kept.append(head)
            cut = True
            index += 1
        omitted = tuple(f for s in sections[index:] for f in changed_files(s))
        return FittedDiff("".join(kept), omitted, cut)
    return FittedDiff("".join(kept))


# Bounds on the code a TIL may quote (see `quotable_lines`): they bound the grammar built from them.
QUOTE_MAX_LINES = 200
QUOTE_MAX_BYTES = 12 * 1024
QUOTE_MAX_LINE_CHARS = 120
# A line that starts (after its indentation) with a backtick or tilde could open or close a fence.
_FENCE_START = re.compile(r"^[ \t]*[`~]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_HUNK_COUNTS = re.compile(r"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")


def quotable_lines(
    diff: str,
    *,
    max_lines: int = QUOTE_MAX_LINES,
    max_bytes: int = QUOTE_MAX_BYTES,
    max_line_chars: int = QUOTE_MAX_LINE_CHARS,
) -> tuple[str, ...]:
    """The lines of the diff's hunks a TIL may quote in a code block: added, removed and context lines
    without their marker, trailing whitespace and carriage return, each once.

    Blank lines, lines that start with a backtick or tilde (they could open or close a fence), lines with control characters other
    than tab, and lines over `max_line_chars` are left out. Within `max_lines` lines and `max_bytes`
    UTF-8 bytes, added lines come first, then removed, then context lines, each in diff order.
    """
    added: dict[str, None] = {}
    removed: dict[str, None] = {}
    context: dict[str, None] = {}
    old_left = new_left = 0  # lines of the current hunk still to come, by its header's counts
    for raw in diff.split("\n"):
        if old_left <= 0 and new_left <= 0:
            hunk = _HUNK_COUNTS.match(raw)
            if hunk:
                old_left = int(hunk.group(1) or 1)
                new_left = int(hunk.group(2) or 1)
            continue
        marker = raw[:1]
        if marker == "\\":  # "\ No newline at end of file"
            continue
        if marker == "+":
            bucket, new_left = added, new_left - 1
        elif marker == "-":
            bucket, old_left = removed, old_left - 1
        elif marker in (" ", "", "\r"):  # some tools strip a blank context line's space
            bucket, old_left, new_left = context, old_left - 1, new_left - 1
        else:  # a malformed hunk: stop reading it
            old_left = new_left = 0
            continue
        line = raw[1:].rstrip()
        if (
            line
            and len(line) <= max_line_chars
            and not _FENCE_START.match(line)
            and not _CONTROL.search(line)
        ):
            bucket.setdefault(line, None)
    chosen: dict[str, None] = {}
    used = 0
    for bucket in (added, removed, context):
        for line in bucket:
            if len(chosen) >= max_lines:
                return tuple(chosen)
            size = len(line.encode("utf-8", "surrogatepass")) + 1
            if line in chosen or used + size > max_bytes:
                continue
            chosen[line] = None
            used += size
    return tuple(chosen)
