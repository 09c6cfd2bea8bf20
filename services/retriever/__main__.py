"""`python -m services.retriever`: settings -> encoders -> Qdrant index -> servicer -> serve()."""

from __future__ import annotations

import asyncio

from services.common.server import serve
from services.common.settings import load_settings
from services.retriever.config import RetrieverSettings
from services.retriever.embedding import SentenceTransformerEncoder
from services.retriever.index import QdrantIndex, QdrantLocation
from services.retriever.lexical import LexicalEncoder
from services.retriever.servicer import RequestLimits, RetrieverServicer, retriever_service


def main() -> None:
    settings = load_settings(RetrieverSettings)
    index = QdrantIndex(
        QdrantLocation(
            url=settings.qdrant_url,
            api_key=settings.qdrant_api_key,
            path=settings.qdrant_path,
            timeout_s=settings.qdrant_timeout_s,
        ),
        SentenceTransformerEncoder(
            settings.embedding_model,
            device=settings.embedding_device,
            batch_size=settings.embedding_batch,
            threads=settings.embedding_threads,
        ),
        LexicalEncoder(),
        collection=settings.collection,
        multilingual_embeddings=settings.embedding_multilingual,
        mmr_candidates=settings.mmr_candidates,
    )
    servicer = RetrieverServicer(
        index,
        RequestLimits(
            default_top_k=settings.default_top_k,
            max_top_k=settings.max_top_k,
            max_text_chars=settings.max_text_chars,
            max_batch=settings.max_batch,
        ),
    )
    asyncio.run(serve(settings, [retriever_service(servicer)], warmup=index.start, shutdown=index.close))


if __name__ == "__main__":
    main()
