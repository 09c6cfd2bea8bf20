"""A retrieval set from real text: Korean technical Markdown from public TIL and study-note repositories.

Every Markdown file of the repositories in `SOURCES` (at the commits recorded there) with at least
`MIN_HANGUL` Hangul syllables is one document: its first level-1 heading (or its file name) is the
title, the rest of the file, up to `MAX_CHARS` characters, the text. Queries are derived from the
documents, each with exactly one relevant document (the one it came from):

- ``title``: the document's title, which is *not* in its stored text (it is kept only as `title`);
  only titles that no other document has.
- ``heading``: a level-2..4 heading of the document (in its text); only headings no other document has.
- ``sentence``: a prose sentence of the document, rewritten: a third of its words dropped and the
  rest shuffled, so it is never a substring of the document.

Queries alternate between the ``tune`` and the ``held-out`` split (by number, within each type).
The built set is committed as bench/retrieval/data/korean-md.jsonl.gz (see data/README.md for the
sources and licences); rebuilding needs the repositories' git directories:

    python -m bench.retrieval.realset --mirrors /work/.mirror   # rebuild the committed file
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import subprocess
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from bench.retrieval.dataset import Doc, LabelledSet, Query

DATA = Path(__file__).parent / "data" / "korean-md.jsonl.gz"
# (owner/name, commit): public repositories of Korean TILs, study notes and interview notes.
SOURCES = (
    ("ahastudio/til", "bf5f28840400"),
    ("binghe819/TIL", "975da585f265"),
    ("milooy/TIL", "9e7ce07db3d9"),
    ("namjunemy/TIL", "eb5005a5ebe7"),
    ("ParkJiwoon/PrivateStudy", "a2a0d69c2b7f"),
    ("gyoogle/tech-interview-for-developer", "7ce875279945"),
    ("austin-thwoo/TIL", "ba534a55a9f5"),
    ("JaeYeopHan/Interview_Question_for_Beginner", "26c959a31f27"),
    ("WeareSoft/tech-interview", "a69ac28e52ac"),
)
MIN_HANGUL = 200
MAX_CHARS = 8000
QUERIES_PER_TYPE = 600
SEED = 12

_HANGUL = re.compile(r"[\uac00-\ud7a3]")
_H1 = re.compile(r"^#\s+(.+?)\s*#*\s*$", re.MULTILINE)
_HEADING = re.compile(r"^#{2,4}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_MARKUP = re.compile(r"!?\[([^\]]*)\]\([^)]*\)|<[^>]+>|[*_`>#|]")


def _plain(text: str) -> str:
    """Markdown reduced to its words: links to their text, tags and emphasis removed."""
    return re.sub(r"\s+", " ", _MARKUP.sub(r"\1", text)).strip()


def _git(mirrors: Path, repo: str, *args: str) -> bytes:
    git_dir = mirrors / repo.replace("/", "+") / "repo"
    return subprocess.run(["git", "-C", str(git_dir), *args], check=True, capture_output=True).stdout


def _documents(mirrors: Path) -> list[Doc]:
    docs = []
    for repo, commit in SOURCES:
        names = _git(mirrors, repo, "ls-tree", "-r", "--name-only", commit).decode().splitlines()
        for name in sorted(n for n in names if n.lower().endswith(".md")):
            raw = _git(mirrors, repo, "show", f"{commit}:{name}").decode("utf-8", "replace")
            if len(_HANGUL.findall(raw)) < MIN_HANGUL:
                continue
            h1 = _H1.search(raw)
            title = _plain(h1.group(1)) if h1 else Path(name).stem.replace("-", " ").replace("_", " ")
            body = (raw[: h1.start()] + raw[h1.end() :]) if h1 else raw
            text = body.strip()[:MAX_CHARS]
            top = name.split("/")[0] if "/" in name else ""
            docs.append(
                Doc(
                    id=f"{repo}:{name}",
                    kind="doc",
                    text=text,
                    identifier=title,
                    concepts=(repo, top),
                    tags=[t for t in (top.lower(),) if t],
                )
            )
    return docs


def _sentences(text: str) -> list[str]:
    prose = _FENCE.sub(" ", text)
    out = []
    for line in prose.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "|", "```", "http")):
            continue
        for sentence in re.split(r"(?<=[.?!다요])\s+", _plain(line)):
            words = sentence.split()
            if len(words) >= 6 and len(_HANGUL.findall(sentence)) >= 8 and "http" not in sentence:
                out.append(sentence)
    return out


def _rewrite(sentence: str, rng: random.Random) -> str:
    words = [w.strip(".,;:!?()\"'") for w in sentence.split()]
    words = [w for w in words if w]
    keep = sorted(rng.sample(range(len(words)), max(4, len(words) * 2 // 3)))
    kept = [words[i] for i in keep]
    rng.shuffle(kept)
    return " ".join(kept)


def build(mirrors: Path) -> LabelledSet:
    docs = _documents(mirrors)
    rng = random.Random(SEED)
    titles = Counter(d.identifier.lower() for d in docs)
    headings_of = {d.id: [_plain(h) for h in _HEADING.findall(d.text)] for d in docs}
    headings = Counter(h.lower() for hs in headings_of.values() for h in set(hs))
    candidates: dict[str, list[tuple[str, str]]] = {"title": [], "heading": [], "sentence": []}
    for d in docs:
        if titles[d.identifier.lower()] == 1 and len(d.identifier) >= 5:
            candidates["title"].append((d.identifier, d.id))
        unique = [h for h in headings_of[d.id] if headings[h.lower()] == 1 and len(h) >= 5]
        if unique:
            candidates["heading"].append((rng.choice(unique), d.id))
        if sentences := _sentences(d.text):
            rewritten = _rewrite(rng.choice(sentences), rng)
            if rewritten not in d.text:
                candidates["sentence"].append((rewritten, d.id))
    queries = []
    for qtype, pairs in candidates.items():
        for n, (text, doc_id) in enumerate(rng.sample(pairs, min(QUERIES_PER_TYPE, len(pairs)))):
            split = "tune" if n % 2 == 0 else "held-out"
            queries.append(Query(f"{qtype}-{n:04d}", qtype, text, [doc_id], split))
    return LabelledSet(docs, queries)


def save(labelled: LabelledSet, path: Path = DATA) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
        for d in labelled.documents:
            f.write(json.dumps({"record": "document", **asdict(d)}, ensure_ascii=False) + "\n")
        for q in labelled.queries:
            f.write(json.dumps({"record": "query", **asdict(q)}, ensure_ascii=False) + "\n")


def load(path: Path = DATA) -> LabelledSet:
    docs, queries = [], []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.pop("record") == "document":
                docs.append(Doc(**{**row, "concepts": tuple(row["concepts"])}))
            else:
                queries.append(Query(**row))
    return LabelledSet(docs, queries)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mirrors", type=Path, required=True, help="folder of <owner>+<name>/repo git dirs")
    parser.add_argument("--out", type=Path, default=DATA)
    args = parser.parse_args()
    labelled = build(args.mirrors)
    save(labelled, args.out)
    types = Counter(q.type for q in labelled.queries)
    print(f"{len(labelled.documents)} documents, {len(labelled.queries)} queries {dict(types)} -> {args.out}")


if __name__ == "__main__":
    main()
