"""Request preparation: prompts to token ids, checked against the model before the scheduler
sees them, at a cost the client cannot inflate.

- Chat templating and tokenization of long texts run in a thread pool, not on the event loop.
  The fast tokenizer's `encode_batch_fast` releases the GIL while it works and builds no offsets
  (plain `encode` holds the GIL throughout): a huge prompt does not stall other requests' streams.
- A text that cannot fit the context whatever it tokenizes to (more characters than the context
  times the longest vocabulary entry) is rejected without tokenizing it.
- A token-id prompt is checked by its length first (O(1): a 2M-id list is rejected at once), then
  its ids against the vocabulary; stop_token_ids against the vocabulary too.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from deploy.protocol import APIError, ChatRequest, CompletionRequest

# Texts up to this many characters are tokenized inline: ~1 ms, less than a hop to the pool and
# back; longer ones go to the pool, so a short request never queues behind a long one.
INLINE_CHARS = 4096
TOKENIZER_THREADS = 2


@dataclass(frozen=True)
class ModelLimits:
    max_model_len: int
    vocab_size: int

    @classmethod
    def from_info(cls, info: dict) -> ModelLimits:
        return cls(int(info["max_model_len"]), int(info["vocab_size"]))


def context_error(limits: ModelLimits, what: str, param: str) -> APIError:
    return APIError(400, f"this model's maximum context length is {limits.max_model_len} tokens; "
                         f"{what}, which leaves no room for output", code="context_length_exceeded",
                    param=param)


def _longest_entry_chars(tokenizer: Any) -> int | None:
    """Characters of the longest vocabulary entry, when no token can cover more characters of the
    input than that (no normalizer to rewrite the text first); else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return None
    return max(len(piece) for piece in tokenizer.get_vocab())


def _encoder(tokenizer: Any) -> Callable[[str, bool], list[int]]:
    """text, add_special_tokens -> ids: the Rust tokenizer directly where there is one (the same
    ids as tokenizer(text), half the time, and the GIL released), else the tokenizer's own call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return lambda text, special: backend.encode_batch_fast([text], add_special_tokens=special)[0].ids
    return lambda text, special: tokenizer(text, add_special_tokens=special)["input_ids"]


class PromptBuilder:
    def __init__(self, tokenizer: Any, threads: int = TOKENIZER_THREADS) -> None:
        self.tokenizer = tokenizer
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="tokenize")
        self.max_chars_per_token = _longest_entry_chars(tokenizer)
        self._encode = _encoder(tokenizer)

    async def completion(self, req: CompletionRequest, limits: ModelLimits) -> list[int]:
        if isinstance(req.prompt, str):
            return await self._tokenize(req.prompt, limits, "prompt")
        return check_ids(req.prompt, limits)

    async def chat(self, req: ChatRequest, limits: ModelLimits) -> list[int]:
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                    for m in req.messages]
        text = await self._run(sum(len(m["content"]) for m in messages), self._template, messages)
        return await self._tokenize(text, limits, "messages", special_tokens=False)

    def _template(self, messages: list[dict]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - the template rejects this conversation (e.g. role order)
            raise APIError(400, f"the messages do not fit the model's chat template: {exc}",
                           param="messages") from None

    async def _tokenize(self, text: str, limits: ModelLimits, param: str,
                        special_tokens: bool = True) -> list[int]:
        self._check_text(text, limits, param)
        ids = await self._run(len(text), self._encode, text, special_tokens)
        check_length(len(ids), limits, param)
        return ids

    def _check_text(self, text: str, limits: ModelLimits, param: str) -> None:
        try:
            # JSON escapes can carry lone surrogates ("\\ud800"), which no tokenizer encodes.
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "the text contains invalid unicode (a lone surrogate)", param=param) from None
        per_token = self.max_chars_per_token
        if per_token is not None and len(text) > limits.max_model_len * per_token:
            raise context_error(limits, f"a prompt of {len(text)} characters has more than "
                                        f"{limits.max_model_len} tokens", param)

    async def _run(self, size: int, fn: Callable, *args: Any) -> Any:
        if size <= INLINE_CHARS:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


def check_length(num_tokens: int, limits: ModelLimits, param: str) -> None:
    """A prompt must leave room for at least one generated token."""
    if num_tokens >= limits.max_model_len:
        raise context_error(limits, f"the prompt has {num_tokens} tokens", param)


def check_ids(ids: list[int], limits: ModelLimits, param: str = "prompt") -> list[int]:
    """A token-id prompt: the length first (cheap), then the ids against the vocabulary."""
    check_length(len(ids), limits, param)
    check_vocab(ids, limits, param)
    return ids


def check_vocab(ids: list[int], limits: ModelLimits, param: str) -> None:
    if ids and not (0 <= min(ids) and max(ids) < limits.vocab_size):
        bad = [t for t in ids if not 0 <= t < limits.vocab_size][:5]
        raise APIError(400, f"token ids out of range [0, {limits.vocab_size}): {bad}", param=param)
