"""Rebuilds the quality corpus: real single-purpose commits from public repositories' history.

    python -m bench.quality.build_corpus --out bench/quality/corpus.jsonl.gz \\
        psf/requests=/path/to/requests.git pallets/click=... expressjs/express=... spf13/cobra=...

Each argument is `owner/name=GIT_DIR` (a clone or bare mirror). From each repository, newest first, the
first `--per-repo` non-merge commits whose diff touches 1 to 3 files, at least one of them code in the
repository's language, with `--min-bytes` to `--max-bytes` of diff. Commits are chosen by those rules
alone, so the same history gives the same corpus. Each line of the output: id, repo, commit, subject,
language, diff (`git show --format= -p`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
from pathlib import Path

from services.edge.diffs import changed_files, guess_language


def _git(git_dir: str, *args: str) -> str:
    return subprocess.run(
        ["git", "--git-dir", git_dir, *args], check=True, capture_output=True, text=True, errors="replace"
    ).stdout


def pick(repo: str, git_dir: str, *, per_repo: int, min_bytes: int, max_bytes: int) -> list[dict[str, str]]:
    chosen: list[dict[str, str]] = []
    commits = _git(git_dir, "log", "--no-merges", "--format=%H", "-n", "3000", "HEAD").split()
    for commit in commits:
        diff = _git(git_dir, "show", "--format=", "-p", "--no-color", commit)
        if not min_bytes <= len(diff.encode()) <= max_bytes:
            continue
        files = changed_files(diff)
        language = guess_language(files)
        if not 1 <= len(files) <= 3 or language in ("", "markdown", "yaml", "json", "toml"):
            continue
        subject = _git(git_dir, "show", "-s", "--format=%s", commit).strip()
        chosen.append(
            {
                "id": f"{repo}@{commit[:12]}",
                "repo": repo,
                "commit": commit,
                "subject": subject,
                "language": language,
                "diff": diff,
            }
        )
        print(
            f"{repo}: {len(chosen)}/{per_repo} {commit[:12]} {language} {len(diff)}B {subject[:60]}",
            file=sys.stderr,
        )
        if len(chosen) == per_repo:
            break
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("repos", nargs="+", help="owner/name=GIT_DIR")
    parser.add_argument("--out", type=Path, default=Path("bench/quality/corpus.jsonl.gz"))
    parser.add_argument("--per-repo", type=int, default=8)
    parser.add_argument("--min-bytes", type=int, default=600)
    parser.add_argument("--max-bytes", type=int, default=4000)
    args = parser.parse_args(argv)
    rows: list[dict[str, str]] = []
    for spec in args.repos:
        repo, _, git_dir = spec.partition("=")
        heads = _git(git_dir, "rev-parse", "HEAD").strip()
        print(f"{repo} at {heads}", file=sys.stderr)
        rows += pick(
            repo, git_dir, per_repo=args.per_repo, min_bytes=args.min_bytes, max_bytes=args.max_bytes
        )
    # mtime=0: the same rows give the same bytes.
    with gzip.GzipFile(args.out, "wb", mtime=0) as raw:
        for row in rows:
            raw.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
    print(f"{len(rows)} diffs -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
