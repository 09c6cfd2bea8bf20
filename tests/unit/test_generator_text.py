"""TextStream: token bytes in, whole-character deltas out, nothing past a stop string."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.generator.text_stream import TextStream

texts = st.text(alphabet=st.sampled_from(list("ab \n한국어🙂")), max_size=24)


@st.composite
def split_bytes(draw: st.DrawFn, text: str) -> list[bytes]:
    """`text` as UTF-8, cut at arbitrary byte offsets, as a byte-level tokenizer may cut it."""
    data = text.encode()
    cuts = sorted(draw(st.sets(st.integers(1, max(len(data) - 1, 1)), max_size=len(data))))
    bounds = [0, *(c for c in cuts if c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def run(stream: TextStream, tokens: list[bytes]) -> tuple[list[str], int]:
    deltas: list[str] = []
    counted = 0
    for token in tokens:
        text, count = stream.push(token)
        if text:
            deltas.append(text)
            counted += count
    text, count = stream.flush()
    if text:
        deltas.append(text)
        counted += count
    return deltas, counted


@given(data=st.data(), text=texts)
def test_any_byte_split_yields_the_text_in_whole_characters(data: st.DataObject, text: str) -> None:
    tokens = data.draw(split_bytes(text))
    deltas, counted = run(TextStream(), tokens)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert counted == len(tokens)


@given(
    data=st.data(), text=texts, stop=st.lists(st.text(alphabet="ab한\n", min_size=1, max_size=3), max_size=3)
)
def test_output_ends_right_before_a_stop_string(data: st.DataObject, text: str, stop: list[str]) -> None:
    stream = TextStream(stop)
    deltas, _ = run(stream, data.draw(split_bytes(text)))
    out = "".join(deltas)
    assert text.startswith(out)
    assert not any(s in out for s in stop)
    assert stream.stopped is any(s in text for s in stop)
    if stream.stopped:
        assert any(text[len(out) :].startswith(s) for s in stop)
    else:
        assert out == text


def test_korean_syllable_waits_for_its_last_byte() -> None:
    stream = TextStream()
    han = "한".encode()
    assert stream.push(b"A" + han[:1]) == ("A", 1)
    assert stream.push(han[1:2]) == ("", 0)
    assert stream.push(han[2:]) == ("한", 2)  # the two tokens that carried it


def test_text_that_may_begin_a_stop_string_is_held_back() -> None:
    stream = TextStream(["\n\n"])
    assert stream.push(b"line\n") == ("line", 1)
    assert stream.push(b"next") == ("\nnext", 1)
    assert stream.push(b"\n") == ("", 0)
    assert stream.push(b"\n") == ("", 2)  # the stop string's tokens carry no text
    assert stream.stopped
    assert stream.push(b"more") == ("", 0)


def test_a_character_cut_off_by_max_tokens_ends_as_a_replacement_character() -> None:
    stream = TextStream()
    assert stream.push("가".encode()[:2]) == ("", 0)
    assert stream.flush() == ("\ufffd", 1)


def test_empty_stop_strings_are_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        TextStream(["ok", ""])
