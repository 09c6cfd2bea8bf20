"""vLLM's second validation of a schema `prepare` already validated is skipped, and only that one.

`processor` stands in for vLLM's input processor module (vllm/v1/engine/input_processor.py in 0.25,
processor.py before): a module whose `_validate_structured_output` looks `validate_guidance_grammar`
up as a global at call time, as vLLM's does.
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace
from typing import Any

import pydantic
import pytest

from services.generator import vllm_compat
from services.generator.engine import EngineRequest
from services.generator.vllm_compat import VALIDATED, ValidatedSchemas, skip_revalidation
from tests.unit.test_vllm_engine_stream import ScriptedLLM, output, vllm_names  # noqa: F401  (a fixture)
from tests.unit.test_vllm_tokenize import PieceTokenizer, engine_with

PROCESSOR = """
def validate_guidance_grammar(sampling_params, tokenizer=None):
    calls.append(sampling_params.structured_outputs.json)
    if sampling_params.structured_outputs.json.get("bad"):
        raise ValueError("Grammar error: bad")


def _validate_structured_output(params):
    params.structured_outputs._backend = "guidance"  # what vLLM's method also does: it must still run
    validate_guidance_grammar(params, tokenizer=None)
"""


@pytest.fixture
def processor(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("fake_vllm_input_processor")
    module.calls = []  # type: ignore[attr-defined]
    exec(PROCESSOR, module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def params(schema: dict[str, Any]) -> Any:
    return SimpleNamespace(structured_outputs=SimpleNamespace(json=schema))


def test_only_the_schema_objects_prepare_validated_skip_vllms_validation(processor: Any) -> None:
    assert (
        skip_revalidation(("not.a.module", processor.__name__)) == f"once, in prepare ({processor.__name__})"
    )
    ours, same_text, bad = {"type": "object"}, {"type": "object"}, {"bad": True}
    VALIDATED.add(ours)
    first = params(ours)
    processor._validate_structured_output(first)
    assert processor.calls == [] and first.structured_outputs._backend == "guidance"
    processor._validate_structured_output(params(ours))  # once only: a second request is validated
    processor._validate_structured_output(params(same_text))  # equal is not the same object
    assert processor.calls == [ours, same_text]
    with pytest.raises(ValueError, match="Grammar error"):
        processor._validate_structured_output(params(bad))  # anything else: vLLM's own refusal
    # Installing again wraps vLLM's function, not our wrapper.
    skip_revalidation((processor.__name__,))
    assert processor.validate_guidance_grammar.__wrapped__.__module__ == processor.__name__


def test_a_caller_that_imports_the_function_at_each_call_skips_too(
    processor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM 0.25.1: `SamplingParams._validate_structured_outputs` runs `from
    vllm.v1.structured_output.backend_guidance import validate_guidance_grammar` inside the method."""
    caller = types.ModuleType("fake_vllm_sampling_params")
    exec(
        f"def _validate_structured_outputs(params):\n"
        f"    from {processor.__name__} import validate_guidance_grammar\n"
        f"    validate_guidance_grammar(params, tokenizer=None)\n",
        caller.__dict__,
    )
    assert skip_revalidation((processor.__name__,)).startswith("once")
    ours = {"type": "object"}
    VALIDATED.add(ours)
    caller._validate_structured_outputs(params(ours))
    caller._validate_structured_outputs(params({"type": "object"}))
    assert processor.calls == [{"type": "object"}]


def test_without_vllms_function_nothing_is_skipped() -> None:
    assert skip_revalidation(("not.a.module",)).startswith("twice")


def test_the_set_is_bounded_and_holds_what_it_names() -> None:
    schemas = ValidatedSchemas(limit=3)
    kept = [{"n": i} for i in range(5)]
    for schema in kept:
        schemas.add(schema)
    assert len(schemas) == 3
    assert not schemas.take(kept[0]) and schemas.take(kept[4]) and not schemas.take(kept[4])
    assert schemas.skipped == 1


@pydantic.dataclasses.dataclass
class PydanticStructuredOutputsParams:
    """vLLM 0.25.1's StructuredOutputsParams: a pydantic dataclass, so `json` is a copy of the dict given."""

    json: str | dict[str, Any] | None = None


@pytest.mark.usefixtures("vllm_names")
async def test_generate_hands_vllm_the_very_schema_it_marks() -> None:
    sys.modules["vllm.sampling_params"].StructuredOutputsParams = PydanticStructuredOutputsParams  # type: ignore[attr-defined]
    llm = ScriptedLLM([output("{}", 1, finish="stop")])
    engine = engine_with(PieceTokenizer(), llm)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    request = await engine.prepare(
        EngineRequest(request_id="r", prompt="x", messages=None, max_tokens=4, json_schema=schema)
    )
    assert request.prepared is not None and request.prepared.constraint is not None
    [_ async for _ in engine.generate(request)]
    sent = llm.requests[0][1].structured_outputs.json
    assert sent == request.prepared.constraint and sent is not request.prepared.constraint  # pydantic's copy
    assert vllm_compat.VALIDATED.take(sent)  # what vLLM's processor looks for, and finds
    assert not vllm_compat.VALIDATED.take(request.prepared.constraint)
