"""Retrieval quality and search latency: the retriever's index on a Qdrant Edge shard against the previous one.

    python -m bench.retrieval                          # both sets, 10k and 100k documents, every arm
    python -m bench.retrieval --sizes 10000 --sets real --arms edge-hybrid   # a part of it

Sets (each a labelled set grown by distractors that are never relevant to its queries):
- ``real``: Korean technical Markdown from public repositories, 3,107 documents and 1,800 queries
  (titles, headings, rewritten sentences; bench/retrieval/realset.py), plus synthetic distractors.
- ``synthetic``: the generated set of bench/retrieval/dataset.py (264 documents, 140 queries).

Arms: ``edge-hybrid``, ``edge-dense``, ``edge-sparse`` (HybridIndex on an EdgeStore, the service's
code, with the sparse encoder the service builds from RETRIEVER_* settings, analyser from --analyser),
and ``previous``: the index of commit `previous.PREVIOUS` (qdrant-client local mode ranked by an
in-memory exact index, hybrid search), run in a subprocess from `previous.ARCHIVE` (that commit's
services/common and services/retriever, committed as `git archive` wrote them, so a shallow clone runs
it too). Every arm indexes the same text (title and body).

Quality: recall@5 and MRR@10 per arm, set, size, query type and split (tune / held-out). Latency:
wall time of one search, query embedding and query analysis included, gRPC excluded, sequential,
and the process's CPU time per search. Document dense vectors are the model's embeddings of the
documents' text (their first --embed-chars characters) for the first --real-embeddings-up-to documents
(default: all). Beyond that bound, a document's dense vector is the embedding of another document
among the first ones (drawn at random), plus Gaussian noise (sigma 0.05) and re-normalised: filler, as
the report says; its sparse vector is always from its own text.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import pickle
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.retrieval import realset
from bench.retrieval.dataset import Doc, LabelledSet, Query, distractors, labelled_set
from bench.retrieval.previous import ARCHIVE
from bench.retrieval.report import markdown
from services.retriever.__main__ import make_sparse_encoder
from services.retriever.config import RetrieverSettings
from services.retriever.documents import Document, SearchMode, SearchQuery, StoredPoint, payload_of, point_id
from services.retriever.edge_store import EdgeStore
from services.retriever.embedding import SentenceTransformerEncoder
from services.retriever.index import DENSE_CHARS, HybridIndex
from services.retriever.lexical import SparseTerms

RECALL_AT, MRR_AT = 5, 10
REAL_EMBEDDINGS_UP_TO = 10**9  # every document
ARMS = ("edge-hybrid", "edge-dense", "edge-sparse", "previous")
MODE_OF = {"edge-hybrid": SearchMode.HYBRID, "edge-dense": SearchMode.DENSE, "edge-sparse": SearchMode.SPARSE}


class Precomputed:
    """The real model, except for texts whose vectors are already known (documents embedded in bulk).
    Queries are never known: every search pays for embedding (and analysing) its query."""

    def __init__(self, model: Any, known: dict[str, Any]) -> None:
        self.model, self.known = model, known

    @property
    def name(self) -> str:
        return str(self.model.name)

    def load(self) -> Any:
        return self.model.load()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in texts if t not in self.known]
        computed = dict(zip(missing, self.model.embed(missing), strict=True)) if missing else {}
        return np.stack([self.known[t] if t in self.known else computed[t] for t in texts])

    def encode(self, text: str) -> SparseTerms:
        return self.known[text] if text in self.known else self.model.encode(text)


def cached(cache: Path, kind: str, texts: list[str], compute: Any) -> list[Any]:
    """compute(texts)'s items, each text's computed once: kept per text in cache/kind.pkl."""
    path = cache / f"{kind}.pkl"
    known: dict[str, Any] = pickle.loads(path.read_bytes()) if path.exists() else {}
    missing = list(dict.fromkeys(t for t in texts if t not in known))
    if missing:
        known.update(zip(missing, compute(missing), strict=True))
        cache.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(known))
    return [known[t] for t in texts]


def embed_all(model: SentenceTransformerEncoder, texts: list[str]) -> np.ndarray:
    chunks = [model.embed(texts[i : i + 128]) for i in tqdm(range(0, len(texts), 128), desc="embedding")]
    return np.concatenate(chunks) if chunks else np.zeros((0, 384), dtype=np.float32)


def text_of(doc: Doc, title: bool) -> str:
    return f"{doc.identifier}\n\n{doc.text}" if title else doc.text


@dataclass
class Corpus:
    name: str
    labelled: LabelledSet
    docs: list[Doc]  # labelled documents first, then distractors
    texts: list[str]  # what is indexed for each
    dense: np.ndarray


def load_corpus(
    name: str, size: int, model: SentenceTransformerEncoder, cache: Path, *, real_up_to: int, embed_chars: int
) -> Corpus:
    labelled = realset.load() if name == "real" else labelled_set()
    extra = list(distractors(labelled_set(), max(0, size - len(labelled.documents))))
    docs = labelled.documents + extra
    texts = [text_of(d, name == "real" and i < len(labelled.documents)) for i, d in enumerate(docs)]
    real = min(len(texts), real_up_to)
    dense = np.stack(
        cached(
            cache,
            f"dense-minilm-{embed_chars}",
            [t[:embed_chars] for t in texts[:real]],
            lambda t: list(embed_all(model, t)),
        )
    )
    if len(texts) > real:  # a real embedding plus noise, re-normalised
        rng = np.random.default_rng(size)
        base = dense[rng.integers(0, real, len(texts) - real)]
        noisy = base + rng.normal(0, 0.05, base.shape).astype(np.float32)
        dense = np.concatenate([dense, noisy / np.linalg.norm(noisy, axis=1, keepdims=True)])
    return Corpus(name, labelled, docs, texts, dense)


@dataclass
class Outcome:
    query: Query
    ranked: list[str]
    seconds: float
    cpu_seconds: float


async def run_edge(corpus: Corpus, arms: list[str], analyser: Any, model: Any, queries: list[Query], cache: Path,
                   folder: Path, sparse_key: str, settings: RetrieverSettings,
                   ) -> tuple[dict[str, list[Outcome]], dict[str, float]]:  # fmt: skip
    sparse = cached(
        cache,
        f"sparse-{sparse_key}",
        corpus.texts,
        lambda ts: [analyser.encode(t) for t in tqdm(ts, desc=f"{analyser.name}")],
    )
    store = EdgeStore(folder / "shard", maintain_every=10**9)  # optimised once, after loading
    index = HybridIndex(
        store,
        Precomputed(model, dict(zip(corpus.texts, corpus.dense, strict=True))),
        Precomputed(analyser, {}),
        multilingual_embeddings=settings.embedding_multilingual,
        english_only_weight=settings.embedding_english_only_weight,
    )
    await index.start()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    for i in tqdm(range(0, len(corpus.docs), 512), desc=f"upserting {len(corpus.docs):,}"):
        await store.upsert([
            StoredPoint(point_id(d.id), corpus.dense[j].tolist(), sparse[j],
                        payload_of(Document(d.id, d.kind, corpus.texts[j], tags=tuple(d.tags))))
            for j, d in enumerate(corpus.docs[i : i + 512], i)
        ])  # fmt: skip
    timings["upsert_s"] = time.perf_counter() - started
    started = time.perf_counter()
    await store.maintain()
    timings["optimize_s"] = time.perf_counter() - started
    timings["disk_mb"] = (store.disk_bytes() or 0) / 2**20
    out: dict[str, list[Outcome]] = {arm: [] for arm in arms}
    for arm in arms:
        await index.search(SearchQuery(queries[0].text, MRR_AT, MODE_OF[arm]))  # warm-up
    for q in tqdm(queries, desc=f"searching {len(corpus.docs):,}"):
        for arm in arms:  # arms interleaved: load on the machine hits them alike
            t0, c0 = time.perf_counter(), time.process_time()
            hits = await index.search(SearchQuery(q.text, MRR_AT, MODE_OF[arm]))
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            out[arm].append(Outcome(q, [h.document.id for h in hits], seconds, cpu))
    await index.close()
    shutil.rmtree(folder / "shard", ignore_errors=True)
    return out, timings


def run_previous(
    corpus: Corpus, queries: list[Query], folder: Path
) -> tuple[list[Outcome], dict[str, float]]:
    tree = folder / "previous-tree"
    tree.mkdir()
    root = Path(__file__).resolve().parents[2]
    subprocess.run(["tar", "-xzf", str(ARCHIVE), "-C", str(tree)], check=True)
    work = folder / "previous-work"
    work.mkdir()
    with (work / "documents.jsonl").open("w") as f:
        for d, t in zip(corpus.docs, corpus.texts, strict=True):
            f.write(json.dumps({"id": d.id, "kind": d.kind, "text": t}, ensure_ascii=False) + "\n")
    np.save(work / "dense.npy", corpus.dense)
    (work / "job.json").write_text(json.dumps({"queries": [{"id": q.id, "text": q.text} for q in queries]}))
    env = {**os.environ, "PYTHONPATH": f"{tree}:{root / 'gen'}"}
    subprocess.run(
        [sys.executable, str(Path(__file__).with_name("previous.py")), str(work)],
        check=True,
        env=env,
        cwd=tree,
    )
    result = json.loads((work / "result.json").read_text())
    by_id = {q.id: q for q in queries}
    outcomes = [Outcome(by_id[r["id"]], r["ranked"], r["seconds"], r["cpu"]) for r in result["results"]]
    return outcomes, {
        "upsert_s": result["upsert_s"],
        "disk_mb": sum(p.stat().st_size for p in (work / "qdrant").rglob("*") if p.is_file()) / 2**20,
    }


def quality(outcomes: list[Outcome]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        for name in ("all", f"all/{o.query.split}", o.query.type, f"{o.query.type}/{o.query.split}"):
            groups.setdefault(name, []).append(o)
    out = {}
    for name, group in sorted(groups.items()):
        recall, rr = [], []
        for o in group:
            relevant = set(o.query.relevant)
            recall.append(len(relevant & set(o.ranked[:RECALL_AT])) / len(relevant))
            rank = next((i for i, d in enumerate(o.ranked[:MRR_AT], 1) if d in relevant), None)
            rr.append(1 / rank if rank else 0.0)
        out[name] = {
            "queries": len(group),
            "recall@5": round(statistics.fmean(recall), 4),
            "mrr@10": round(statistics.fmean(rr), 4),
        }
    return out


def latency(outcomes: list[Outcome]) -> dict[str, float]:
    ms = np.asarray([o.seconds for o in outcomes]) * 1000
    cpu = np.asarray([o.cpu_seconds for o in outcomes]) * 1000
    return {"searches": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "mean_ms": round(float(ms.mean()), 2), "cpu_p50_ms": round(float(np.percentile(cpu, 50)), 2)}  # fmt: skip


def spread_subset(queries: list[Any], n: int) -> list[Any]:
    """About `n` queries spread evenly over each split (tune, held-out) in turn, so that both splits and
    every query type are in it (a plain stride over queries whose splits alternate took one split only)."""
    splits: dict[str, list[Any]] = {}
    for q in queries:
        splits.setdefault(q.split, []).append(q)
    per = max(1, n // len(splits))
    return [q for qs in splits.values() for q in qs[:: max(1, len(qs) // per)][:per]]


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    model = SentenceTransformerEncoder(batch_size=64, threads=args.threads, backend=args.backend)
    model.load()
    settings = RetrieverSettings(sparse_analyser=args.analyser)
    analyser = make_sparse_encoder(settings)
    sparse_key = f"{analyser.name}-k1={settings.bm25_k1}-b={settings.bm25_b}-avg={settings.bm25_avg_terms}"
    rows: list[dict[str, Any]] = []
    for set_name in args.sets:
        for size in sorted(args.sizes):
            corpus = load_corpus(
                set_name,
                size,
                model,
                args.cache_dir,
                real_up_to=args.real_embeddings_up_to,
                embed_chars=args.embed_chars,
            )
            queries = corpus.labelled.queries
            if size > 10_000 and len(queries) > args.queries_at_100k:
                queries = spread_subset(queries, args.queries_at_100k)
            with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as tmp:
                load = os.getloadavg()
                results: dict[str, tuple[list[Outcome], dict[str, float]]] = {}
                edge_arms = [a for a in args.arms if a != "previous"]
                if edge_arms:
                    outs, timings = await run_edge(
                        corpus,
                        edge_arms,
                        analyser,
                        model,
                        queries,
                        args.cache_dir,
                        Path(tmp),
                        sparse_key,
                        settings,
                    )
                    results.update({arm: (outs[arm], timings) for arm in edge_arms})
                if "previous" in args.arms:
                    results["previous"] = run_previous(corpus, queries, Path(tmp))
                for arm, (outcomes, timings) in results.items():
                    rows.append({"set": set_name, "documents": len(corpus.docs), "arm": arm,
                                 "quality": quality(outcomes), "latency": latency(outcomes),
                                 **{k: round(v, 2) for k, v in timings.items()},
                                 "load_average": [round(x, 2) for x in load] + [round(x, 2) for x in os.getloadavg()]})  # fmt: skip
                    print(
                        json.dumps({k: rows[-1][k] for k in ("set", "documents", "arm")}),
                        rows[-1]["quality"]["all/held-out"],
                        rows[-1]["latency"],
                        flush=True,
                    )
    return {
        "command": " ".join(["python -m bench.retrieval", *args.argv]),
        "rows": rows,
        "dense_documents": {
            "embedded_by_the_model": args.real_embeddings_up_to,
            "characters_read": args.embed_chars,
            "largest_collection": max((r["documents"] for r in rows), default=0),
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "qdrant_edge_py": importlib.metadata.version("qdrant-edge-py"),
            "kiwipiepy": importlib.metadata.version("kiwipiepy"),
            "model": model.name,
            "analyser": sparse_key,
            "torch_threads": args.threads,
            "embedding_backend": model.backend,
        },
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sets", nargs="+", default=["real", "synthetic"], choices=["real", "synthetic"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--analyser", default="kiwi", choices=["kiwi", "lexical"])
    parser.add_argument("--queries-at-100k", type=int, default=300, help="queries run above 10k documents")
    parser.add_argument(
        "--threads", type=int, default=1, help="threads of an embedding forward pass (the service's default)"
    )
    parser.add_argument(
        "--backend",
        choices=["auto", "onnx", "torch"],
        default=RetrieverSettings().embedding_backend,
        help="what runs the embedding model (RETRIEVER_EMBEDDING_BACKEND; the service's default)",
    )
    parser.add_argument(
        "--real-embeddings-up-to", type=int, default=REAL_EMBEDDINGS_UP_TO,
        help="documents embedded by the model (default all); the rest get another's embedding plus noise",
    )  # fmt: skip
    parser.add_argument(
        "--embed-chars", type=int, default=DENSE_CHARS,
        help="characters of each document the bulk embedding reads (the service reads DENSE_CHARS)",
    )  # fmt: skip
    parser.add_argument("--cache-dir", type=Path, default=Path(".data/bench-retrieval"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/retrieval"))
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    result = asyncio.run(bench(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
