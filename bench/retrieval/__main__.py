"""Retrieval quality and search latency of the retriever's index, in embedded Qdrant.

    python -m bench.retrieval                      # labelled set, then 10k and 100k documents
    python -m bench.retrieval --sizes 10000        # skip 100k
    python -m bench.retrieval --quick              # labelled set and 2k documents, a smoke run

What is measured (and written to bench/results/retrieval.{json,md}):

- Quality: recall@5 and MRR@10 of dense, sparse and hybrid search for every labelled query
  (bench/retrieval/dataset.py), on the labelled documents alone and again after distractors grow
  the collection to 10k. All documents and queries are embedded by the real packaged MiniLM model.
- Latency: wall time of `QdrantIndex.search` (query embedding on CPU included, gRPC excluded),
  sequential calls after a warm-up, at 10k documents (real embeddings) and 100k documents. At 100k
  the dense vectors of the 90k extra distractors are synthetic (real embeddings plus noise): exact
  search costs the same whatever the values, but dense and hybrid *quality* at 100k would mean
  nothing, so only sparse quality (real term vectors) is reported there.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.metadata
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from bench.retrieval.dataset import Doc, LabelledSet, Query, distractors, labelled_set
from services.retriever.embedding import SentenceTransformerEncoder
from services.retriever.index import Document, QdrantIndex, QdrantLocation, SearchMode, SearchQuery
from services.retriever.lexical import LexicalEncoder

MODES = (SearchMode.DENSE, SearchMode.SPARSE, SearchMode.HYBRID)
RECALL_AT, MRR_AT = 5, 10
NOTES = (
    "Every query is Korean, most with a code identifier; the `korean` rows are the subset with no "
    "identifier at all, the hardest case for both channels.",
    "The packaged dense model (all-MiniLM-L6-v2) is English-only: its tokenizer breaks Hangul into "
    "jamo, so dense recall on pure-Korean queries is near zero, and reciprocal-rank fusion mixes that "
    "noise into hybrid (hybrid below sparse on that subset, hybrid MRR below sparse MRR overall). "
    "A multilingual sentence-transformers model, set with RETRIEVER_EMBEDDING_MODEL, is the remedy; "
    "it was not measured (none is packaged, and nothing is downloaded).",
    "Embedded Qdrant (qdrant-client local mode) searches exhaustively in Python: every stored point's "
    "sparse score is a pure-Python merge (qdrant_client/local/sparse_distances.py), and dense search "
    "re-normalises every stored vector per query. Sparse and hybrid latency therefore grow linearly "
    "with the collection. A Qdrant server (HNSW and an inverted sparse index) could not be run in this "
    "sandbox and was not measured.",
    "Query embedding alone (MiniLM on CPU, query by query) takes the p50 shown; it is part of every "
    "dense and hybrid search. The machine ran other jobs too (load averages above), which inflates "
    "latencies.",
    "At sizes above the real-embedding limit the extra documents' dense vectors are synthetic (a real "
    "embedding plus noise) and fewer queries are run; only sparse quality is reported there.",
)
TARGETS = {"hybrid_recall_at_5": 0.90, "hybrid_minus_dense_recall_at_5": 0.20, "p50_ms_at_10k": 20.0}


class PrecomputedEncoder:
    """The real model, except for texts whose vectors are already known (documents embedded in bulk).

    Queries are never in `known`: every search pays for embedding its query, as in the service.
    """

    def __init__(self, model: SentenceTransformerEncoder) -> None:
        self.model = model
        self.known: dict[str, np.ndarray] = {}

    @property
    def name(self) -> str:
        return self.model.name

    def load(self) -> int:
        return self.model.load()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in texts if t not in self.known]
        computed = dict(zip(missing, self.model.embed(missing), strict=True)) if missing else {}
        return np.stack([self.known[t] if t in self.known else computed[t] for t in texts])


def embed_in_bulk(
    model: SentenceTransformerEncoder, texts: list[str], cache_dir: Path
) -> tuple[np.ndarray, float | None]:
    """Embeddings of `texts` and the seconds they took (None: read from the on-disk cache)."""
    key = hashlib.sha256("\n".join([model.name, *texts]).encode()).hexdigest()[:16]
    path = cache_dir / f"embeddings-{key}.npy"
    if path.exists():
        return np.load(path), None
    started = time.perf_counter()
    chunks = []
    batch = 256
    for start in tqdm(range(0, len(texts), batch), desc=f"embedding {len(texts):,} documents", unit="batch"):
        chunks.append(model.embed(texts[start : start + batch]))
    vectors = np.concatenate(chunks)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors, time.perf_counter() - started


def as_document(doc: Doc) -> Document:
    return Document(id=doc.id, kind=doc.kind, text=doc.text, tags=tuple(doc.tags))


async def upsert(index: QdrantIndex, docs: list[Doc], desc: str, batch: int = 512) -> float:
    """Stores `docs` (their vectors already known) and returns the seconds Qdrant took."""
    started = time.perf_counter()
    for start in tqdm(range(0, len(docs), batch), desc=desc, unit="batch"):
        await index.upsert([as_document(d) for d in docs[start : start + batch]])
    return time.perf_counter() - started


@dataclass
class Outcome:
    query: Query
    mode: SearchMode
    ranked: list[str]
    seconds: float


async def run_queries(
    index: QdrantIndex, model: SentenceTransformerEncoder, queries: Sequence[Query], desc: str
) -> tuple[list[Outcome], list[float]]:
    """Every query in every mode (modes interleaved, so load on the machine hits them alike), and the
    milliseconds that embedding each query took on its own."""
    for mode in MODES:  # warm-up: first calls pay for lazy initialisation
        await index.search(SearchQuery(queries[0].text, MRR_AT, mode))
    outcomes, embed_ms = [], []
    with tqdm(total=len(queries) * len(MODES), desc=desc, unit="search") as bar:
        for query in queries:
            started = time.perf_counter()
            model.embed([query.text])
            embed_ms.append((time.perf_counter() - started) * 1000)
            for mode in MODES:
                started = time.perf_counter()
                hits = await index.search(SearchQuery(query.text, MRR_AT, mode))
                seconds = time.perf_counter() - started
                outcomes.append(Outcome(query, mode, [h.document.id for h in hits], seconds))
                bar.update()
    return outcomes, embed_ms


def quality(outcomes: list[Outcome], size: int) -> list[dict[str, Any]]:
    rows = []
    groups: dict[tuple[str, str], list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault((o.mode.value, "all"), []).append(o)
        groups.setdefault((o.mode.value, o.query.type), []).append(o)
    for (mode, qtype), group in sorted(groups.items()):
        recalls, reciprocal_ranks = [], []
        for o in group:
            relevant = set(o.query.relevant)
            recalls.append(len(relevant.intersection(o.ranked[:RECALL_AT])) / len(relevant))
            rank = next((i for i, doc_id in enumerate(o.ranked[:MRR_AT], 1) if doc_id in relevant), None)
            reciprocal_ranks.append(1 / rank if rank else 0.0)
        rows.append({
            "collection_size": size, "mode": mode, "query_type": qtype, "queries": len(group),
            f"recall@{RECALL_AT}": round(statistics.fmean(recalls), 4),
            f"mrr@{MRR_AT}": round(statistics.fmean(reciprocal_ranks), 4),
        })  # fmt: skip
    return rows


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(seconds) * 1000, q)), 2)


def latency(
    outcomes: list[Outcome], size: int, dense_vectors: str, embed_ms: list[float]
) -> list[dict[str, Any]]:
    rows = []
    for mode in MODES:
        seconds = [o.seconds for o in outcomes if o.mode is mode]
        if not seconds:
            continue
        rows.append({
            "collection_size": size, "mode": mode.value, "searches": len(seconds),
            "p50_ms": percentile_ms(seconds, 50), "p99_ms": percentile_ms(seconds, 99),
            "mean_ms": round(statistics.fmean(seconds) * 1000, 2),
            "query_embedding_p50_ms": None if mode is SearchMode.SPARSE else round(float(np.median(embed_ms)), 2),
            "document_dense_vectors": dense_vectors,
        })  # fmt: skip
    return rows


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    labelled: LabelledSet = labelled_set()
    model = SentenceTransformerEncoder(batch_size=64)
    model.load()
    encoder = PrecomputedEncoder(model)
    sizes = sorted(args.sizes)
    real_size = max(s for s in [len(labelled.documents), *sizes] if s <= args.real_embeddings_up_to)
    pool = list(distractors(labelled, max(sizes, default=0) - len(labelled.documents)))
    real_docs = labelled.documents + pool[: real_size - len(labelled.documents)]
    vectors, embed_s = embed_in_bulk(model, [d.text for d in real_docs], args.cache_dir)
    encoder.known.update(zip((d.text for d in real_docs), vectors, strict=True))

    result: dict[str, Any] = {"quality": [], "latency": [], "upsert": []}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as folder:
        index = QdrantIndex(QdrantLocation(path=folder), encoder, LexicalEncoder(), collection="bench")
        await index.start()
        try:
            stored = 0
            for size in [len(labelled.documents), *sizes]:
                batch = (labelled.documents + pool)[stored:size]
                if size > real_size:  # synthetic dense vectors: a real one plus noise, re-normalised
                    rng = np.random.default_rng(size)
                    base = vectors[rng.integers(0, len(vectors), len(batch))]
                    noisy = base + rng.normal(0, 0.05, base.shape).astype(np.float32)
                    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
                    encoder.known.update(zip((d.text for d in batch), noisy, strict=True))
                upsert_s = await upsert(index, batch, f"upserting to {size:,}")
                result["upsert"].append({
                    "collection_size": size, "documents": len(batch), "seconds": round(upsert_s, 2),
                    "docs_per_s": round(len(batch) / upsert_s, 1), "embedding_excluded": True,
                })  # fmt: skip
                stored = size
                synthetic = size > real_size
                queries = labelled.queries
                if synthetic:  # every type of query, spread over the set
                    queries = queries[:: max(1, len(queries) // args.queries_at_synthetic)][
                        : args.queries_at_synthetic
                    ]
                outcomes, embed_ms = await run_queries(index, model, queries, f"searching {size:,} documents")
                kept = [o for o in outcomes if not synthetic or o.mode is SearchMode.SPARSE]
                result["quality"] += quality(kept, size)
                if size >= 1000:
                    vectors_kind = "synthetic" if synthetic else "real"
                    result["latency"] += latency(outcomes, size, vectors_kind, embed_ms)
        finally:
            await index.close()

    result["dataset"] = {
        "documents": len(labelled.documents),
        "queries": len(labelled.queries),
        "queries_by_type": {
            t: sum(q.type == t for q in labelled.queries) for t in ("full", "korean", "identifier")
        },
        "relevant_per_query": 1,
        "distractors_embedded_for_real_up_to": real_size,
    }
    result["bulk_embedding_docs_per_s"] = round(len(real_docs) / embed_s, 1) if embed_s else None
    result["machine"] = {
        "load_average_1_5_15_before": [round(x, 2) for x in load_before],
        "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "qdrant_client": importlib.metadata.version("qdrant-client"),
        "qdrant_mode": "embedded (qdrant-client local mode, exact search, data on disk)",
        "model": model.name,
    }
    result["targets"] = check_targets(result)
    result["notes"] = list(NOTES)
    return result


def check_targets(result: dict[str, Any]) -> dict[str, Any]:
    def recall(size: int, mode: str, qtype: str = "all") -> float | None:
        for row in result["quality"]:
            if (row["collection_size"], row["mode"], row["query_type"]) == (size, mode, qtype):
                return float(row[f"recall@{RECALL_AT}"])
        return None

    out: dict[str, Any] = {}
    for size in sorted({r["collection_size"] for r in result["quality"] if r["mode"] == "dense"}):
        hybrid, dense = recall(size, "hybrid"), recall(size, "dense")
        if hybrid is None or dense is None:
            continue
        out[f"hybrid_recall_at_5_ge_0.90@{size}"] = {
            "value": hybrid,
            "met": hybrid >= TARGETS["hybrid_recall_at_5"],
        }
        gap = round(hybrid - dense, 4)
        out[f"hybrid_minus_dense_ge_0.20@{size}"] = {
            "value": gap,
            "met": gap >= TARGETS["hybrid_minus_dense_recall_at_5"],
        }
    for row in result["latency"]:
        if row["collection_size"] == 10_000:
            out[f"p50_le_20ms@10000[{row['mode']}]"] = {
                "value": row["p50_ms"],
                "met": row["p50_ms"] <= TARGETS["p50_ms_at_10k"],
            }
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Retrieval benchmark",
        "",
        "Generated by `python -m bench.retrieval`; see its docstring for what is measured.",
        "",
    ]
    m, d = result["machine"], result["dataset"]
    lines += [
        f"- Machine: {m['platform']}, {m['cpus']} CPUs, torch threads {m['torch_threads']}, Python {m['python']}; "
        f"load average (1/5/15 min) {m['load_average_1_5_15_before']} before, {m['load_average_1_5_15_after']} after",
        f"- Index: {m['qdrant_mode']}, qdrant-client {m['qdrant_client']}; model {m['model']} on CPU",
        f"- Labelled set: {d['documents']} documents, {d['queries']} queries {d['queries_by_type']}, "
        f"one relevant document each; distractors embedded for real up to {d['distractors_embedded_for_real_up_to']:,} documents",
        "- Bulk document embedding (batch 64, CPU): "
        + (
            f"{rate} docs/s"
            if (rate := result["bulk_embedding_docs_per_s"])
            else "read from the cache this run"
        ),
        "",
        "## Quality (recall@5, MRR@10)",
        "",
        "| documents | query type | queries | dense R@5 | sparse R@5 | hybrid R@5 | dense MRR | sparse MRR | hybrid MRR |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    table: dict[tuple[int, str], dict[str, dict[str, Any]]] = {}
    for row in result["quality"]:
        table.setdefault((row["collection_size"], row["query_type"]), {})[row["mode"]] = row
    for (size, qtype), by_mode in sorted(
        table.items(), key=lambda kv: (kv[0][0], kv[0][1] != "all", kv[0][1])
    ):

        def cell(mode: str, key: str, by_mode: dict[str, dict[str, Any]] = by_mode) -> str:
            return f"{by_mode[mode][key]:.3f}" if mode in by_mode else "n/a"

        n = next(iter(by_mode.values()))["queries"]
        lines.append(
            f"| {size:,} | {qtype} | {n} | {cell('dense', 'recall@5')} | {cell('sparse', 'recall@5')} | "
            f"{cell('hybrid', 'recall@5')} | {cell('dense', 'mrr@10')} | {cell('sparse', 'mrr@10')} | {cell('hybrid', 'mrr@10')} |"
        )
    lines += ["", "## Search latency (QdrantIndex.search, query embedding included, sequential)", "",
              "| documents | mode | searches | p50 ms | p99 ms | mean ms | of which query embedding p50 ms | document dense vectors |",
              "|---:|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in result["latency"]:
        lines.append(
            f"| {r['collection_size']:,} | {r['mode']} | {r['searches']} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r['mean_ms']} | {r['query_embedding_p50_ms'] or '-'} | {r['document_dense_vectors']} |"
        )
    lines += ["", "## Upserts (dense vectors precomputed: sparse encoding and Qdrant writes only)", "",
              "| documents after | added | seconds | docs/s |", "|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["upsert"]:
        lines.append(
            f"| {r['collection_size']:,} | {r['documents']:,} | {r['seconds']} | {r['docs_per_s']} |"
        )
    lines += ["", "## Targets", "", "| target | value | met |", "|---|---:|---|"]
    for name, t in result["targets"].items():
        lines.append(f"| {name} | {t['value']} | {'yes' if t['met'] else '**no**'} |")
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[10_000, 100_000])
    parser.add_argument("--real-embeddings-up-to", type=int, default=10_000,
                        help="collections up to this size use real document embeddings; larger ones synthetic")  # fmt: skip
    parser.add_argument("--queries-at-synthetic", type=int, default=20,
                        help="queries per mode at sizes with synthetic vectors (sparse search is slow there)")  # fmt: skip
    parser.add_argument("--cache-dir", type=Path, default=Path(".data/bench-cache"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/retrieval"))
    parser.add_argument("--quick", action="store_true", help="only 2,000 documents")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args()
    if args.render:
        result = json.loads(args.out.with_suffix(".json").read_text())
        result["notes"] = list(NOTES)
    else:
        if args.quick:
            args.sizes = [2_000]
        result = asyncio.run(bench(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, ensure_ascii=False, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
