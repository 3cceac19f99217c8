"""Incremental detokenization with stop strings, for streaming text deltas."""
from __future__ import annotations

from typing import Any

# Tokens decoded again before the new ones: enough context for a tokenizer to merge across
# token boundaries (leading spaces, multi-byte characters split over byte tokens).
CONTEXT_TOKENS = 6


class TextStream:
    """Turns a growing list of token ids into text deltas; cuts the text at a stop string.

    Each step decodes only a short window: the last few already-emitted tokens plus the new
    ones, and emits what the new ones add (vLLM's and TGI's scheme), so a long stream costs
    O(tokens), not O(tokens^2). A window ending in U+FFFD is an unfinished character: it is
    held back until the next token completes it. Text that could be the start of a stop string
    is held back too, so a stop string never leaks into the stream.
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # window start: context tokens, decoded again for merges
        self.read_offset = 0  # tokens before this are in self.text
        self.text = ""  # decoded text so far, after stop-string truncation
        self.sent = 0  # characters of self.text already emitted
        self.stopped = False

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; returns the newly emittable text."""
        if self.stopped:
            return ""
        self.token_ids.extend(token_ids)
        start = len(self.text)
        self.text += self._decode_new()
        for s in self.stop:
            cut = self.text.find(s, max(0, start - len(s) + 1))
            if cut != -1:
                self.text, self.stopped = self.text[:cut], True
        return self._emit(final=self.stopped)

    def flush(self) -> str:
        """The rest of the text when the request ends."""
        return self._emit(final=True)

    def _decode_new(self) -> str:
        decode = self.tokenizer.decode
        window = self.token_ids[self.prefix_offset:]
        prefix = decode(window[: self.read_offset - self.prefix_offset], skip_special_tokens=True)
        full = decode(window, skip_special_tokens=True)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an unfinished character (or nothing visible yet): wait for more tokens
        self.prefix_offset = max(self.prefix_offset, len(self.token_ids) - CONTEXT_TOKENS)
        self.read_offset = len(self.token_ids)
        return full[len(prefix):]

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
