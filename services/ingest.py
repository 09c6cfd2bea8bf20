"""`til ingest`: Markdown and JSON files (TILs, questions, docs) into the retriever, batched, with progress."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import grpc
from til.v1 import retriever_pb2, retriever_pb2_grpc

_TIL_HEADING = re.compile(r"^#\s*\d{4}-\d{2}-\d{2}\s+TIL", re.MULTILINE)


def documents_from_file(path: Path, root: Path, owner: str) -> list[retriever_pb2.Document]:
    """Markdown becomes one document (a TIL if it has a `# YYYY-MM-DD TIL` heading); JSON holds a TIL object, a
    question object, or a list of them. Ids derive from the file's path, so ingesting again replaces, never duplicates."""
    relative = path.relative_to(root).as_posix() if path != root else path.name
    base_id = f"ingest:{relative}"
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() in (".md", ".markdown"):
        first_line = next((line for line in text.splitlines() if line.strip()), path.stem)
        kind = (
            retriever_pb2.DOCUMENT_KIND_TIL if _TIL_HEADING.search(text) else retriever_pb2.DOCUMENT_KIND_DOC
        )
        return [
            retriever_pb2.Document(
                id=base_id,
                kind=kind,
                text=text,
                title=first_line.lstrip("# ").strip(),
                owner=owner,
                attributes={"source": relative},
            )
        ]
    document = json.loads(text)
    items = document if isinstance(document, list) else document.get("questions", [document])
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{relative}: item {i} is not a JSON object")
        doc_id = base_id if len(items) == 1 else f"{base_id}#{i}"
        if "question" in item:
            out.append(
                retriever_pb2.Document(
                    id=doc_id,
                    kind=retriever_pb2.DOCUMENT_KIND_QUESTION,
                    text=f"{item['question']}\n{item.get('answer', '')}".strip(),
                    title=str(item["question"])[:200],
                    owner=owner,
                    difficulty=str(item.get("difficulty", "")),
                    tags=[str(k) for k in item.get("keywords", [])],
                    attributes={"source": relative},
                )
            )
        elif "content" in item:
            out.append(
                retriever_pb2.Document(
                    id=doc_id,
                    kind=retriever_pb2.DOCUMENT_KIND_TIL,
                    text=str(item["content"]),
                    title=str(item.get("title", "")),
                    owner=owner,
                    tags=[str(k) for k in item.get("keywords", [])],
                    attributes={"source": relative},
                )
            )
        else:
            raise ValueError(f"{relative}: item {i} has neither `content` (a TIL) nor `question`")
    return out


def _progress(done: int, total: int, note: str = "") -> None:
    width = 30
    filled = int(width * done / total) if total else width
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} files {note}")
    sys.stderr.flush()


def discover(paths: list[str]) -> list[tuple[Path, Path]]:
    """Every .md / .json file under `paths`, each with the root its id is made relative to."""
    files: list[tuple[Path, Path]] = []
    for given in paths:
        root = Path(given)
        if root.is_file():
            files.append((root, root.parent))
        elif root.is_dir():
            files += [
                (p, root)
                for p in sorted(root.rglob("*"))
                if p.is_file() and p.suffix.lower() in (".md", ".markdown", ".json")
            ]
        else:
            raise FileNotFoundError(f"{given} does not exist")
    return files


async def ingest(paths: list[str], *, addr: str, owner: str, batch_size: int) -> int:
    """Indexes every file under `paths`; returns the exit code. Raises grpc.aio.AioRpcError if the retriever fails."""
    try:
        files = discover(paths)
    except FileNotFoundError as exc:
        _err(f"error: {exc}")
        return 2
    if not files:
        _err("nothing to ingest: no .md or .json files found")
        return 1
    stored = skipped = 0
    batch: list[retriever_pb2.Document] = []
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = retriever_pb2_grpc.RetrieverServiceStub(channel)

        async def flush() -> None:
            nonlocal stored
            if batch:
                reply = await stub.UpsertDocuments(
                    retriever_pb2.UpsertDocumentsRequest(documents=batch), timeout=120
                )
                stored += len(reply.ids)
                batch.clear()

        try:
            for i, (path, root) in enumerate(files, 1):
                try:
                    batch.extend(documents_from_file(path, root, owner))
                except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                    skipped += 1
                    sys.stderr.write("\n")
                    _err(f"skipped {path}: {exc}")
                if len(batch) >= batch_size:
                    await flush()
                _progress(i, len(files), f"| {stored} documents indexed")
            await flush()
            _progress(len(files), len(files), f"| {stored} documents indexed")
        finally:
            sys.stderr.write("\n")
    _err(f"ingested {stored} documents from {len(files) - skipped} files ({skipped} skipped)")
    return 0 if skipped == 0 else 1


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
