"""Token bytes in, text deltas out: whole characters only, and nothing past a stop string."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    """Assembles the bytes of generated tokens into text that is safe to send.

    A token may end inside a multi-byte UTF-8 character (Korean syllables are three bytes and
    byte-level vocabularies often split them), so bytes are decoded incrementally and a partial
    character waits for the token that completes it. Text that could be the start of a stop
    string is held back until it is known not to be one; when a stop string appears, the text
    before it is released and the stream is `stopped`. Tokens are counted with the text that
    carries them: a token whose bytes are still held back is counted with the next delta.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._held = ""
        self._held_tokens = 0
        self.stopped = False

    def push(self, token_bytes: bytes) -> tuple[str, int]:
        """Adds one token's bytes; returns the text now safe to send and the tokens it carries."""
        if self.stopped:
            return "", 0
        self._held_tokens += 1
        self._held += self._decoder.decode(token_bytes)
        return self._release(final=False)

    def flush(self) -> tuple[str, int]:
        """Releases everything held (an unfinished character becomes U+FFFD) at the end of generation."""
        if self.stopped:
            return "", 0
        self._held += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, *, final: bool) -> tuple[str, int]:
        text = self._held
        ready = len(text)
        if self._stop:
            hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                ready = min(hits)
                text = text[:ready]
            elif not final:
                ready -= self._partial_stop_suffix(text)
        if ready == 0 and not self.stopped:
            return "", 0
        tokens = self._held_tokens
        self._held = "" if self.stopped else text[ready:]
        self._held_tokens = 0
        return text[:ready], tokens

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        for size in range(min(len(text), self._longest_stop - 1), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0
