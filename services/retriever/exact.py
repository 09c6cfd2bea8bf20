"""Exact dense and sparse ranking over an in-memory copy of the collection, for embedded Qdrant.

qdrant-client's local mode scores a sparse query against every stored point in pure Python and
re-normalises every stored dense vector per query, so one hybrid search over 10k documents takes
~150 ms there (qdrant_client/local/sparse_distances.py). `ExactIndex` keeps what ranking needs (unit
dense vectors, sparse postings, the filterable payload keywords) in arrays and ranks both channels
in a few milliseconds with Qdrant's semantics:

- dense: cosine similarity;
- sparse: the dot product of the query, each term weighted by Qdrant's IDF
  ``ln((n - df + 0.5) / (df + 0.5) + 1)`` over the live points, with the document's values; a point
  that shares no term with the query is not a match at all;
- filters: every condition must hold, a condition holds when the point has any of its values.

It is not a store: `QdrantIndex` fills it from Qdrant at start and changes it only after Qdrant has
accepted a write, and payloads are still read from Qdrant. Not thread-safe: one thread uses it.
"""

from __future__ import annotations

import array
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from services.retriever.lexical import SparseTerms

# A filter: (payload key, accepted values) pairs that must all hold.
Conditions = Sequence[tuple[str, Sequence[str]]]
Ranking = list[tuple[str, float]]


def qdrant_idf(document_frequency: np.ndarray, documents: int) -> np.ndarray:
    """Qdrant's IDF modifier (the BM25 form, never negative)."""
    df = document_frequency.astype(np.float64)
    return np.log((documents - df + 0.5) / (df + 0.5) + 1.0)


class ExactIndex:
    """Points (an id, a dense vector, sparse terms, payload keywords) in rows; a replaced or removed
    point's row stays dead until dead rows outnumber live ones, then rows are compacted."""

    def __init__(self, dimensions: int, *, min_compaction: int = 1024) -> None:
        self.dimensions = dimensions
        self._min_compaction = min_compaction
        self._clear()

    def _clear(self) -> None:
        self._ids: list[str] = []
        self._row_of: dict[str, int] = {}
        self._live = np.zeros(0, dtype=bool)
        self._dense = np.zeros((0, self.dimensions), dtype=np.float32)
        # term id -> (rows, values), and (key, keyword) -> rows; dead rows are masked out when read.
        self._postings: dict[int, tuple[array.array[int], array.array[float]]] = {}
        self._keywords: dict[tuple[str, str], array.array[int]] = {}

    def __len__(self) -> int:
        return len(self._row_of)

    def __contains__(self, point_id: object) -> bool:
        return point_id in self._row_of

    def put(
        self,
        point_id: str,
        dense: np.ndarray,
        terms: SparseTerms,
        keywords: Mapping[str, Iterable[str]],
    ) -> None:
        """Stores a point, replacing the one with the same id."""
        vector = np.asarray(dense, dtype=np.float32).reshape(-1)
        if vector.shape != (self.dimensions,):
            raise ValueError(f"point {point_id} has a {vector.shape[0]}-dim vector, not {self.dimensions}")
        norm = float(np.linalg.norm(vector))
        self.remove([point_id])
        row = len(self._ids)
        self._grow(row + 1)
        self._ids.append(point_id)
        self._row_of[point_id] = row
        self._live[row] = True
        self._dense[row] = vector / norm if norm > 0 else vector
        for term, value in zip(terms.indices, terms.values, strict=True):
            rows, values = self._postings.setdefault(term, (array.array("I"), array.array("f")))
            rows.append(row)
            values.append(value)
        for key, values_of_key in keywords.items():
            for keyword in set(values_of_key):
                self._keywords.setdefault((key, keyword), array.array("I")).append(row)

    def remove(self, point_ids: Iterable[str]) -> None:
        """Removes the points with these ids; unknown ids are ignored."""
        for point_id in point_ids:
            row = self._row_of.pop(point_id, None)
            if row is not None:
                self._live[row] = False
        dead = len(self._ids) - len(self._row_of)
        if dead > max(self._min_compaction, len(self._row_of)):
            self._compact()

    def _grow(self, rows: int) -> None:
        if rows <= len(self._live):
            return
        capacity = max(rows, 2 * len(self._live), 64)
        live = np.zeros(capacity, dtype=bool)
        live[: len(self._live)] = self._live
        dense = np.zeros((capacity, self.dimensions), dtype=np.float32)
        dense[: len(self._dense)] = self._dense
        self._live, self._dense = live, dense

    def _compact(self) -> None:
        used = len(self._ids)
        keep = np.flatnonzero(self._live[:used])
        new_row = np.full(used, -1, dtype=np.int64)
        new_row[keep] = np.arange(len(keep))
        ids, dense = [self._ids[r] for r in keep], self._dense[keep]
        postings, keywords = self._postings, self._keywords
        self._clear()
        self._grow(len(ids))
        self._ids = ids
        self._row_of = {point_id: row for row, point_id in enumerate(ids)}
        self._live[: len(ids)] = True
        self._dense[: len(ids)] = dense
        for term, (rows, values) in postings.items():
            moved, kept = _remap(rows, new_row)
            if len(moved):
                self._postings[term] = (
                    array.array("I", moved.astype(np.uint32).tobytes()),
                    array.array("f", np.asarray(values, dtype=np.float32)[kept].tobytes()),
                )
        for key, rows in keywords.items():
            moved, _ = _remap(rows, new_row)
            if len(moved):
                self._keywords[key] = array.array("I", moved.astype(np.uint32).tobytes())

    def allowed(self, conditions: Conditions) -> np.ndarray:
        """Which rows are live and meet every condition."""
        mask = self._live[: len(self._ids)].copy()
        for key, accepted in conditions:
            meets = np.zeros_like(mask)
            for value in accepted:
                rows = self._keywords.get((key, value))
                if rows is not None:
                    meets[_rows(rows)] = True
            mask &= meets
        return mask

    def dense_ranking(
        self,
        query: np.ndarray,
        limit: int,
        conditions: Conditions = (),
        score_threshold: float | None = None,
    ) -> Ranking:
        """Up to `limit` (point id, cosine similarity), best first."""
        used = len(self._ids)
        vector = np.asarray(query, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(vector))
        # einsum, not BLAS: as fast on one core, and no BLAS thread left spinning on the other cores
        # (on a 2-core machine it would take a core from the query embedding and the generator).
        scores = np.einsum("ij,j->i", self._dense[:used], vector / norm if norm > 0 else vector)
        return self._best(scores, self.allowed(conditions), limit, score_threshold)

    def sparse_ranking(
        self,
        query: SparseTerms,
        limit: int,
        conditions: Conditions = (),
        score_threshold: float | None = None,
    ) -> Ranking:
        """Up to `limit` (point id, IDF-weighted dot product) of the points that share a term, best first."""
        used = len(self._ids)
        live = self._live[:used]
        documents = len(self._row_of)
        scores = np.zeros(used, dtype=np.float64)
        matched = np.zeros(used, dtype=bool)
        for term, weight in zip(query.indices, query.values, strict=True):
            posting = self._postings.get(term)
            if posting is None:
                continue
            rows, values = _rows(posting[0]), np.array(posting[1], dtype=np.float64)
            alive = live[rows]
            rows, values = rows[alive], values[alive]
            if not len(rows):
                continue
            idf = float(qdrant_idf(np.array([len(rows)]), documents)[0])
            scores[rows] += weight * idf * values  # a term lists each row at most once
            matched[rows] = True
        return self._best(scores, self.allowed(conditions) & matched, limit, score_threshold)

    def _best(
        self, scores: np.ndarray, mask: np.ndarray, limit: int, score_threshold: float | None
    ) -> Ranking:
        if score_threshold is not None:
            mask = mask & (scores >= score_threshold)
        candidates = np.flatnonzero(mask)
        if limit <= 0 or not len(candidates):
            return []
        if len(candidates) > limit:
            top = np.argpartition(-scores[candidates], limit - 1)[:limit]
            candidates = candidates[top]
        # Best score first; equal scores in the order the points were stored.
        order = np.lexsort((candidates, -scores[candidates]))
        return [(self._ids[row], float(scores[row])) for row in candidates[order]]


def _rows(rows: array.array[int]) -> np.ndarray:
    # A copy: a live numpy view would stop the array from growing.
    return np.array(rows, dtype=np.int64)


def _remap(rows: array.array[int], new_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows that survive a compaction, under their new numbers, and which positions they were at."""
    old = _rows(rows)
    moved = new_row[old]
    kept = moved >= 0
    return moved[kept], kept
