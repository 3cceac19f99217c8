"""Incremental detokenization with stop strings, for streaming text deltas; each token's own
text and bytes, for logprobs."""
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
        self.extend(token_ids)
        return self.emit()

    def extend(self, token_ids: list[int]) -> bool:
        """Append tokens without emitting (callers feeding one token at a time emit once after
        the lot); True once a stop string has ended the text."""
        if self.stopped:
            return True
        self.token_ids.extend(token_ids)
        start = len(self.text)
        self.text += self._decode_new()
        for s in self.stop:
            cut = self.text.find(s, max(0, start - len(s) + 1))
            if cut != -1:
                self.text, self.stopped = self.text[:cut], True
        return self.stopped

    def emit(self) -> str:
        """The text that can go out now: all of it once stopped, else all but what may be the
        start of a stop string."""
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
        last = self.text[-1:]
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                # s[k - 1] == last first: a cheap filter before comparing k characters.
                if s[k - 1] == last and self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's scheme), reversed: char -> byte.
    Printable Latin-1 bytes stand for themselves; the others map to U+0100 onwards in order."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in kept}
    shifted = (b for b in range(256) if b not in chars)
    for n, b in enumerate(shifted):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


class TokenTexts:
    """Each token id's own text and raw UTF-8 bytes, as logprobs report them (OpenAI's `token`
    and `bytes`). A byte-level BPE token can hold part of a character: its bytes are exact and
    its text shows U+FFFD for the partial character. Cached: the same ids recur."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self._bytes_of = _byte_level_alphabet() if type(decoder).__name__ == "ByteLevel" else None
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._lookup(token_id)
        return hit

    def text(self, token_id: int) -> str:
        return self(token_id)[0]

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        if self._bytes_of is not None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str):
                # Added tokens (<|im_end|>) are plain text: their characters are their own UTF-8.
                raw = b"".join(bytes([self._bytes_of[c]]) if c in self._bytes_of else c.encode()
                               for c in piece)
                return raw.decode("utf-8", errors="replace"), list(raw)
        text = self.tokenizer.decode([token_id])
        return text, list(text.encode("utf-8", errors="replace"))
