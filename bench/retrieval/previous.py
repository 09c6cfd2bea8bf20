"""Runs the retriever's previous index (commit PREVIOUS: qdrant-client local mode ranked by its in-memory
ExactIndex, particle-stripping n-gram terms weighted by raw frequency) on a corpus written by
`bench.retrieval`, for the "previous" rows of the benchmark.

This file is run as a script with PYTHONPATH pointing at the unpacked `ARCHIVE` (so `services` is the
old code) and imports nothing from the current tree. `ARCHIVE` is that commit's code as git wrote it
(`git archive --format=tar.gz -9 -o bench/retrieval/data/previous-index-dfa97de.tar.gz dfa97de
services/__init__.py services/common services/retriever`), committed so that a shallow clone runs it:

    python bench/retrieval/previous.py WORKDIR   # reads WORKDIR/job.json, writes WORKDIR/result.json
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

PREVIOUS = "dfa97de"
ARCHIVE = Path(__file__).parent / "data" / f"previous-index-{PREVIOUS}.tar.gz"


async def main(workdir: Path) -> None:
    from services.retriever.embedding import SentenceTransformerEncoder
    from services.retriever.index import Document, QdrantIndex, QdrantLocation, SearchMode, SearchQuery
    from services.retriever.lexical import LexicalEncoder

    job = json.loads((workdir / "job.json").read_text())
    docs = [json.loads(line) for line in (workdir / "documents.jsonl").read_text().splitlines()]
    dense = np.load(workdir / "dense.npy")
    model = SentenceTransformerEncoder(threads=1)
    model.load()
    known = {d["text"]: v for d, v in zip(docs, dense, strict=True)}

    class Precomputed:
        name = model.name

        def load(self) -> int:
            return model.load()

        def embed(self, texts: list[str]) -> np.ndarray:
            missing = [t for t in texts if t not in known]
            computed = dict(zip(missing, model.embed(missing), strict=True)) if missing else {}
            return np.stack([known[t] if t in known else computed[t] for t in texts])

    index = QdrantIndex(
        QdrantLocation(path=str(workdir / "qdrant")), Precomputed(), LexicalEncoder(), collection="b"
    )
    await index.start()
    started = time.perf_counter()
    for start in range(0, len(docs), 512):
        batch = docs[start : start + 512]
        await index.upsert([Document(id=d["id"], kind=d["kind"], text=d["text"]) for d in batch])
    upsert_s = time.perf_counter() - started
    results = []
    await index.search(SearchQuery(job["queries"][0]["text"], 10, SearchMode.HYBRID))  # warm-up
    for q in job["queries"]:
        t0, c0 = time.perf_counter(), time.process_time()
        hits = await index.search(SearchQuery(q["text"], 10, SearchMode.HYBRID))
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        results.append(
            {"id": q["id"], "ranked": [h.document.id for h in hits], "seconds": seconds, "cpu": cpu}
        )
    await index.close()
    (workdir / "result.json").write_text(json.dumps({"upsert_s": upsert_s, "results": results}))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
