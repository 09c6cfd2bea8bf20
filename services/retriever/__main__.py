"""`python -m services.retriever`: settings -> encoders -> store (Edge shard or server) -> index -> serve()."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

from services.common.server import serve
from services.common.settings import load_settings
from services.retriever.config import RetrieverSettings
from services.retriever.documents import VectorStore
from services.retriever.edge_store import EdgeStore
from services.retriever.embedding import SentenceTransformerEncoder
from services.retriever.index import HybridIndex, SparseEncoder
from services.retriever.lexical import Bm25, LexicalEncoder
from services.retriever.morphemes import KiwiEncoder
from services.retriever.server_store import ServerStore
from services.retriever.servicer import INDEX_DISK_BYTES, RequestLimits, RetrieverServicer, retriever_service


def make_store(settings: RetrieverSettings) -> VectorStore:
    """A Qdrant server when RETRIEVER_QDRANT_URL is set, else an Edge shard on this machine's disk."""
    if settings.qdrant_url:
        return ServerStore(
            settings.qdrant_url,
            settings.collection,
            api_key=settings.qdrant_api_key,
            timeout_s=settings.qdrant_timeout_s,
        )
    return EdgeStore(
        Path(settings.qdrant_path) / settings.collection,
        search_threads=settings.edge_search_threads or None,
    )


def make_sparse_encoder(settings: RetrieverSettings) -> SparseEncoder:
    bm25 = Bm25(settings.bm25_k1, settings.bm25_b, settings.bm25_avg_terms)
    if settings.sparse_analyser == "kiwi":
        return KiwiEncoder(words=settings.sparse_words, bm25=bm25)
    return LexicalEncoder(bm25=bm25)


def main() -> None:
    settings = load_settings(RetrieverSettings)
    store = make_store(settings)
    INDEX_DISK_BYTES.set_function(lambda: store.disk_bytes() or 0)
    index = HybridIndex(
        store,
        SentenceTransformerEncoder(
            settings.embedding_model,
            device=settings.embedding_device,
            batch_size=settings.embedding_batch,
            threads=settings.embedding_threads,
            backend=settings.embedding_backend,
        ),
        make_sparse_encoder(settings),
        multilingual_embeddings=settings.embedding_multilingual,
        english_only_weight=settings.embedding_english_only_weight,
        mmr_candidates=settings.mmr_candidates,
    )
    servicer = RetrieverServicer(
        index,
        RequestLimits(
            default_top_k=settings.default_top_k,
            max_top_k=settings.max_top_k,
            max_text_chars=settings.max_text_chars,
            max_title_chars=settings.max_title_chars,
            max_field_chars=settings.max_field_chars,
            max_tags=settings.max_tags,
            max_attributes=settings.max_attributes,
            max_attribute_chars=settings.max_attribute_chars,
            max_batch=settings.max_batch,
        ),
    )
    asyncio.run(serve(settings, [retriever_service(servicer)], warmup=index.start, shutdown=index.close))
    # The shard is closed and the server stopped. The interpreter's last garbage collection walks every
    # object torch, transformers and Kiwi left behind (28 s after "stopped" on the 2-core machine, past a
    # pod's grace period); frozen objects are left to the process's exit instead.
    gc.freeze()


if __name__ == "__main__":
    main()
