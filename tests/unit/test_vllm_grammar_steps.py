"""bench.grammar_steps on the edge's real TIL schemas and SmolLM2's tokenizer (read from the packaged
GGUF): every fill strategy does the same work, token for token, and the plugin's llguidance fill
writes the masks vLLM's own fill writes."""

from __future__ import annotations

from typing import Any

import pytest

from bench import grammar_steps
from tests.unit.test_vllm_prompt_batch import smollm2  # noqa: F401  (a fixture)


def test_every_strategy_replays_the_same_tokens_under_the_same_masks(smollm2: Any) -> None:  # noqa: F811
    import llguidance
    import llguidance.hf
    import llguidance.torch
    import torch

    ll_tokenizer = llguidance.hf.from_tokenizer(smollm2, len(smollm2))
    vocab, eos = len(smollm2), ll_tokenizer.eos_token
    schemas = grammar_steps.til_schemas(smollm2, 3, 700, 64)
    assert list(schemas[0]["properties"]) == ["title", "keywords", "content"]
    grammars = [grammar_steps.vllm_grammar(s) for s in schemas]

    def matchers() -> list[Any]:
        return [llguidance.LLMatcher(ll_tokenizer, g, log_level=1) for g in grammars]

    steps = dict(steps=48, n_vocab=vocab, eos=eos, seed=1)
    recorded, scripts = grammar_steps.run_steps(
        "record", matchers(), grammar_steps.fill_serial, scripts=None, **steps
    )
    assert recorded.open_per_step[0] == 3 and sum(recorded.open_per_step) > 3
    fill, close = grammar_steps.fill_plugin_llguidance(2)
    replayed, tokens = grammar_steps.run_steps("plugin", matchers(), fill, scripts=scripts, **steps)
    close()
    assert tokens == scripts and replayed.open_per_step == recorded.open_per_step
    assert len(replayed.fill_ms) == 48 and replayed.row()["fill_us_per_open_grammar"] > 0

    # Mask for mask: the plugin's fill and vLLM's own per-request fill agree at every step.
    ours, theirs = matchers(), matchers()
    streams = [grammar_steps.Stream(m, None) for m in ours]  # type: ignore[arg-type]
    mine = llguidance.torch.allocate_token_bitmask(3, vocab)
    reference = llguidance.torch.allocate_token_bitmask(3, vocab)
    for step in range(20):
        fill, close = grammar_steps.fill_plugin_llguidance(2)
        fill(streams, mine)
        close()
        for i, m in enumerate(theirs):
            llguidance.torch.fill_next_token_bitmask(m, reference, i)
        assert torch.equal(mine, reference), step
        for i, (stream, m) in enumerate(zip(streams, theirs, strict=True)):
            grammar_steps.accept(stream, scripts[i][step], eos)
            assert m.consume_tokens([scripts[i][step]])


def test_a_refused_token_is_an_error_not_a_silent_step() -> None:
    from llguidance import LLMatcher

    from services.generator.fake_engine import _BYTE_TOKENIZER

    stream = grammar_steps.Stream(LLMatcher(_BYTE_TOKENIZER, LLMatcher.grammar_from_regex("ab")), None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="refused token"):
        grammar_steps.accept(stream, ord("x"), eos=256)
