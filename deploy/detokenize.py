"""Incremental detokenization with stop strings, for streaming text deltas."""
from __future__ import annotations

from typing import Any


class TextStream:
    """Turns a growing list of token ids into text deltas; cuts the text at a stop string.

    Decoding the whole output each step is simple and exact for any tokenizer (merges across
    token boundaries, multi-byte characters); a trailing U+FFFD means an unfinished character,
    held back until the next token completes it. Text that could be the start of a stop string
    is held back too, so a stop string never leaks into the stream.
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""  # decoded text so far, after stop-string truncation
        self.sent = 0  # characters of self.text already emitted
        self.stopped = False

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; returns the newly emittable text."""
        self.token_ids.extend(token_ids)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        for s in self.stop:
            cut = text.find(s, max(0, self.sent - len(s)))
            if cut != -1:
                text, self.stopped = text[:cut], True
        self.text = text
        return self._emit(final=self.stopped)

    def flush(self) -> str:
        """The rest of the text when the request ends."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held_back()
        if end <= self.sent:
            return ""
        delta = self.text[self.sent:end]
        self.sent = end
        return delta

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest
