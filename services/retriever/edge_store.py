"""`VectorStore` on a Qdrant Edge shard: Qdrant's Rust engine in the process, its segments and WAL on disk.

Every update is written to the shard's write-ahead log before `update()` returns, so a write that
returned survives a SIGKILL (the WAL is replayed when the shard is loaded). Calls block, so they run in
worker threads: reads concurrently, writes one at a time (in the order they were made).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import qdrant_edge as qe

from services.common.errors import FailedPrecondition, Unavailable
from services.retriever.documents import (
    DENSE,
    FILTERED_KEYS,
    SPARSE,
    Plan,
    SearchFilter,
    StoredHit,
    StoredPoint,
)
from services.retriever.documents import filter_conditions as conditions_of
from services.retriever.lexical import SparseTerms

log = logging.getLogger(__name__)
T = TypeVar("T")
CONFIG_FILE = "edge_config.json"
RRF_K = 2  # Qdrant's default RRF constant, as a server uses for Fusion.RRF


def edge_filter(f: SearchFilter) -> qe.Filter | None:
    must: list[Any] = []
    for key, values in conditions_of(f):
        match = qe.MatchAny(list(values)) if key in ("kind", "tags") else qe.MatchValue(values[0])
        must.append(qe.FieldCondition(key, match=match))
    return qe.Filter(must=must) if must else None


def _sparse(terms: SparseTerms) -> qe.SparseVector:
    return qe.SparseVector(list(terms.indices), list(terms.values))


def edge_request(plan: Plan) -> qe.QueryRequest:
    """The Query API request for `plan`: one channel, or both prefetched and fused by weighted RRF."""
    flt = edge_filter(plan.filter)
    with_vector: Any = [DENSE] if plan.with_vectors else False
    if not plan.fused:
        query = (
            qe.Query.Nearest(plan.dense, using=DENSE)
            if plan.dense is not None
            else qe.Query.Nearest(_sparse(plan.sparse or SparseTerms((), ())), using=SPARSE)
        )
        return qe.QueryRequest(
            limit=plan.limit,
            query=query,
            filter=flt,
            score_threshold=plan.score_threshold,
            with_payload=True,
            with_vector=with_vector,
        )
    prefetches, weights = [], []
    if plan.dense is not None:
        prefetches.append(
            qe.Prefetch(plan.prefetch_limit, query=qe.Query.Nearest(plan.dense, using=DENSE), filter=flt)
        )
        weights.append(plan.dense_weight)
    if plan.sparse is not None:
        prefetches.append(
            qe.Prefetch(
                plan.prefetch_limit, query=qe.Query.Nearest(_sparse(plan.sparse), using=SPARSE), filter=flt
            )
        )
        weights.append(1.0)
    return qe.QueryRequest(
        limit=plan.limit,
        prefetches=prefetches,
        query=qe.Fusion.Rrf(k=RRF_K, weights=None if all(w == 1.0 for w in weights) else weights),  # type: ignore[arg-type]  # the stub types Rrf as not a Fusion
        filter=flt,
        score_threshold=plan.score_threshold,
        with_payload=True,
        with_vector=with_vector,
    )


def directory_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:  # a segment file replaced by the optimiser meanwhile
                continue
    return total


class EdgeStore:
    """A Qdrant Edge shard in the folder `path` (created on first start when the folder is absent or empty).
    `search_threads`: the shard's search pool (None: one per CPU)."""

    def __init__(
        self, path: str | os.PathLike[str], *, search_threads: int | None = None, maintain_every: int = 10_000
    ) -> None:
        self.path = Path(path)
        self._search_threads = search_threads
        self._shard: qe.EdgeShard | None = None
        self._write_lock = threading.Lock()
        self._closing = False
        # The shard optimises (merges segments, builds HNSW) and flushes (truncating its WAL) only when
        # asked: after this many written points, in the background, and once at start.
        self._maintain_every = maintain_every
        self._written = 0
        self._maintenance: asyncio.Task[None] | None = None

    def describe(self) -> str:
        return f"Qdrant Edge shard {self.path}"

    def _config(self, dimensions: int) -> qe.EdgeConfig:
        return qe.EdgeConfig(
            vectors={DENSE: qe.EdgeVectorParams(size=dimensions, distance=qe.Distance.Cosine)},
            sparse_vectors={SPARSE: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)},
            max_search_threads=self._search_threads,
        )

    def _open(self, dimensions: int) -> qe.EdgeShard:
        path = self.path
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            path.mkdir(parents=True, exist_ok=True)
            shard = qe.EdgeShard.create(str(path), self._config(dimensions))
            for key in FILTERED_KEYS:
                shard.update(qe.UpdateOperation.create_field_index(key, qe.PayloadSchemaType.Keyword))
            log.info("created %s for %d-dim vectors", self.describe(), dimensions)
            return shard
        self._check_layout(dimensions)
        try:
            return qe.EdgeShard.load(str(path))
        except Exception as exc:  # the engine's errors are plain exceptions with its message
            raise FailedPrecondition(
                f"{self.describe()} cannot be loaded ({exc}); it is damaged or not a shard: restore it from a "
                "backup, or move it away to start with an empty index (RETRIEVER_QDRANT_PATH)"
            ) from exc

    def _check_layout(self, dimensions: int) -> None:
        """Refuses a folder that is not a shard, or a shard of another layout, before the engine reads it."""
        config_file, segments = self.path / CONFIG_FILE, self.path / "segments"
        if not config_file.is_file():
            raise FailedPrecondition(
                f"{self.path} is not empty but holds no Qdrant Edge shard ({CONFIG_FILE} is missing); "
                "point RETRIEVER_QDRANT_PATH at a shard or at an empty folder"
            )
        if not segments.is_dir():
            raise FailedPrecondition(
                f"{self.describe()} has lost its segments folder; restore the shard from a backup, or move "
                "it away to start with an empty index"
            )
        try:
            config = json.loads(config_file.read_text())
            vectors, sparse = config["vectors"], config.get("sparse_vectors") or {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FailedPrecondition(f"{config_file} is unreadable ({exc}); the shard is damaged") from exc
        dense = vectors.get(DENSE) if isinstance(vectors, dict) else None
        if not isinstance(dense, dict) or SPARSE not in sparse:
            raise FailedPrecondition(
                f"{self.describe()} was not made by the retriever (it needs a {DENSE!r} and a {SPARSE!r} "
                "vector); point RETRIEVER_QDRANT_PATH elsewhere"
            )
        if dense.get("size") != dimensions:
            raise FailedPrecondition(
                f"{self.describe()} holds {dense.get('size')}-dim vectors but the embedding model makes "
                f"{dimensions}-dim ones; re-index into another RETRIEVER_QDRANT_PATH after changing the model"
            )

    def _shard_or_unavailable(self) -> qe.EdgeShard:
        if self._shard is None or self._closing:
            raise Unavailable("the index is not open (the retriever is starting or stopping)")
        return self._shard

    async def _read(self, job: Callable[[qe.EdgeShard], T]) -> T:
        shard = self._shard_or_unavailable()
        return await asyncio.to_thread(job, shard)

    async def _write(self, job: Callable[[qe.EdgeShard], None]) -> None:
        shard = self._shard_or_unavailable()

        def locked() -> None:
            with self._write_lock:
                job(shard)

        await asyncio.to_thread(locked)

    async def open(self, dimensions: int) -> None:
        if self._shard is None:
            self._shard = await asyncio.to_thread(self._open, dimensions)
            await self.maintain()

    async def maintain(self) -> None:
        """Optimises the shard (segments merged, HNSW built where large enough) and flushes it to disk."""

        def job(shard: qe.EdgeShard) -> None:
            shard.optimize()
            shard.flush()

        await self._write(job)

    def _count_written(self, points: int) -> None:
        self._written += points
        if self._written >= self._maintain_every and (self._maintenance is None or self._maintenance.done()):
            self._written = 0
            self._maintenance = asyncio.create_task(self._maintain_logged())

    async def _maintain_logged(self) -> None:
        try:
            await self.maintain()
        except Unavailable:  # closing meanwhile
            pass
        except Exception:
            log.exception("optimising %s failed; searches go on over unoptimised segments", self.describe())

    async def upsert(self, points: Sequence[StoredPoint]) -> None:
        edge_points = [qe.Point(p.id, {DENSE: p.dense, SPARSE: _sparse(p.sparse)}, p.payload) for p in points]
        await self._write(lambda shard: shard.update(qe.UpdateOperation.upsert_points(edge_points)))
        self._count_written(len(edge_points))

    async def query(self, plan: Plan) -> list[StoredHit]:
        request = edge_request(plan)
        points = await self._read(lambda shard: shard.query(request))
        return [
            StoredHit(p.payload or {}, p.score, _dense_of(p.vector) if plan.with_vectors else None)
            for p in points
        ]

    async def retrieve(self, point_id: str) -> dict[str, Any] | None:
        records = await self._read(
            lambda shard: shard.retrieve([point_id], with_payload=True, with_vector=False)
        )
        return (records[0].payload or {}) if records else None

    async def delete(self, point_ids: Sequence[str]) -> None:
        ids: list[Any] = list(point_ids)
        await self._write(lambda shard: shard.update(qe.UpdateOperation.delete_points(ids)))

    async def count(self) -> int:
        return await self._read(lambda shard: shard.count(qe.CountRequest(exact=True)))

    def disk_bytes(self) -> int | None:
        return directory_bytes(self.path) if self.path.exists() else 0

    async def close(self) -> None:
        shard, self._closing = self._shard, True
        if self._maintenance is not None:
            await asyncio.gather(self._maintenance, return_exceptions=True)
        if shard is None:
            return

        def flush_and_close() -> None:
            with self._write_lock:
                shard.flush()
                shard.close()

        await asyncio.to_thread(flush_and_close)
        self._shard = None


def _dense_of(vector: Any) -> list[float]:
    dense = vector.get(DENSE) if isinstance(vector, dict) else None
    if not isinstance(dense, list):
        raise RuntimeError(f"the shard returned a point without its {DENSE!r} vector")
    return dense
