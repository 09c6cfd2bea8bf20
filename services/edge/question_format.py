"""The study-question output contract: schema for the generator and the checks on a finished answer."""

from __future__ import annotations

import re
from typing import Any

from til.v1 import edge_pb2

from services.edge.til_format import (
    HANGUL,
    KEYWORD_WORD_MAX,
    MAX_KEYWORDS,
    Violation,
    personal_expressions,
    proto_text,
)

DIFFICULTIES = {
    edge_pb2.DIFFICULTY_EASY: "easy",
    edge_pb2.DIFFICULTY_MEDIUM: "medium",
    edge_pb2.DIFFICULTY_HARD: "hard",
}
DIFFICULTY_VALUES = {name: value for value, name in DIFFICULTIES.items()}
QUESTION_MAX_CHARS = 500
ANSWER_MAX_CHARS = 2000

# One or two words, the last starting with Hangul: "캐시", "Redis 캐시", "캐시 미스". No digits.
KEYWORD_PATTERN = (
    f"^(?:[A-Za-z][A-Za-z.+#-]{{0,{KEYWORD_WORD_MAX - 1}}} |[{HANGUL}]{{1,{KEYWORD_WORD_MAX}}} )?"
    f"[{HANGUL}][{HANGUL}A-Za-z]{{0,{KEYWORD_WORD_MAX - 1}}}$"
)
_KEYWORD = re.compile(KEYWORD_PATTERN)
_HANGUL = re.compile("[가-힣]")


def questions_schema(difficulty: str, count: int) -> dict[str, Any]:
    """Exactly `count` questions of one difficulty. Free-text fields carry no length keyword: some
    grammar engines then forbid escapes (so newlines and quotes) altogether; max_tokens bounds them."""
    item = {
        "type": "object",
        "properties": {
            "question": {"type": "string"},
            "answer": {"type": "string"},
            "difficulty": {"type": "string", "enum": [difficulty]},
            "keywords": {
                "type": "array",
                "items": {"type": "string", "pattern": KEYWORD_PATTERN},
                "minItems": 1,
                "maxItems": MAX_KEYWORDS,
            },
        },
        "required": ["question", "answer", "difficulty", "keywords"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"questions": {"type": "array", "items": item, "minItems": count, "maxItems": count}},
        "required": ["questions"],
        "additionalProperties": False,
    }


def normalize_question(text: str) -> str:
    """Case, spacing and trailing punctuation folded, to spot a repeated question."""
    return re.sub(r"\s+", " ", text).strip().rstrip("?.!？ ").lower()


def check_questions(
    document: Any, *, difficulty: str, count: int, truncated: bool = False, asked_before: tuple[str, ...] = ()
) -> list[Violation]:
    found: list[Violation] = []

    def broken(message: str, *, enforced: bool) -> None:
        found.append(Violation(message, enforced))

    if truncated:
        broken("truncated: the output hit max_tokens before the questions were complete", enforced=True)
    items = document.get("questions") if isinstance(document, dict) else None
    if not isinstance(items, list):
        broken("the output has no questions list", enforced=True)
        return found
    if len(items) != count:
        broken(f"{len(items)} questions; {count} were asked for", enforced=True)
    earlier = {normalize_question(q) for q in asked_before}
    seen: set[str] = set()
    for n, item in enumerate(items, 1):
        if not isinstance(item, dict):
            broken(f"question {n} is not an object", enforced=True)
            continue
        question, answer = item.get("question"), item.get("answer")
        if not isinstance(question, str) or not question.strip():
            broken(f"question {n} is empty", enforced=True)
            continue
        if not isinstance(answer, str) or not answer.strip():
            broken(f"question {n} has no answer", enforced=True)
        if item.get("difficulty") != difficulty:
            broken(f"question {n} is not '{difficulty}'", enforced=True)
        keywords = item.get("keywords")
        if (
            not isinstance(keywords, list)
            or not 1 <= len(keywords) <= MAX_KEYWORDS
            or not all(isinstance(k, str) and _KEYWORD.fullmatch(k) for k in keywords)
        ):
            broken(f"question {n} needs 1 to {MAX_KEYWORDS} short Korean keywords", enforced=True)
        if len(question) > QUESTION_MAX_CHARS or (isinstance(answer, str) and len(answer) > ANSWER_MAX_CHARS):
            broken(f"question {n} is too long", enforced=False)
        if not _HANGUL.search(question):
            broken(f"question {n} is not written in Korean", enforced=False)
        key = normalize_question(question)
        if key in earlier:
            broken(f"question {n} repeats an earlier question", enforced=False)
        elif key in seen:
            broken(f"question {n} repeats another question in this set", enforced=False)
        seen.add(key)
        personal = personal_expressions(f"{question}\n{answer if isinstance(answer, str) else ''}")
        if personal:
            broken(f"question {n} has personal expressions: {', '.join(personal[:3])}", enforced=False)
    return found


def to_questions(document: Any) -> list[edge_pb2.Question]:
    """The well-typed parts of `document` as Question messages."""
    items = document.get("questions") if isinstance(document, dict) else None
    if not isinstance(items, list):
        return []
    questions = []
    for item in items:
        if not isinstance(item, dict):
            continue
        keywords = item.get("keywords")
        questions.append(
            edge_pb2.Question(
                question=proto_text(item.get("question")),
                answer=proto_text(item.get("answer")),
                difficulty=DIFFICULTY_VALUES.get(
                    str(item.get("difficulty")), edge_pb2.DIFFICULTY_UNSPECIFIED
                ),
                keywords=[proto_text(k) for k in keywords if isinstance(k, str)]
                if isinstance(keywords, list)
                else [],
            )
        )
    return questions
