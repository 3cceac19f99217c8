"""OpenAI response objects: completions and chat completions, whole or as stream chunks, with
usage and logprobs in OpenAI's shapes.

Logprobs, per sampled token:
- chat: `logprobs.content[i] = {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`
  with `top_logprobs` the N most likely tokens at that position (N = the request's top_logprobs);
- completions: `logprobs = {tokens, token_logprobs, top_logprobs, text_offset}`, each
  `top_logprobs[i]` a {token: logprob} map of the N alternatives plus the sampled token (OpenAI:
  "up to logprobs + 1 elements"), `text_offset` each token's character offset in the completion
  text (running on across stream chunks).
The alternatives come from the scheduler with each token; where it sends none they are empty.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from deploy.detokenize import TokenTexts

# What OpenAI reports for a token it considers impossible; JSON has no -Infinity.
MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class SampledToken:
    """One generated token as logprobs report it."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the N most likely


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


class _Format:
    """The objects of one response (whole, or the chunks of its stream)."""

    object_name = ""
    chunk_object_name = ""

    def __init__(self, rid: str, model: str, texts: TokenTexts, logprobs: bool) -> None:
        self.rid, self.model, self.texts, self.logprobs = rid, model, texts, logprobs
        self.created = int(time.time())

    def response(self, text: str, finish: str | None, tokens: list[SampledToken],
                 use: dict[str, int]) -> dict[str, Any]:
        return {**self._head(self.object_name), "choices": [self._choice(text, finish, tokens, None)],
                "usage": use}

    def chunk(self, text: str, finish: str | None, tokens: list[SampledToken], first: bool,
              use: dict[str, int] | None, with_usage: bool) -> dict[str, Any]:
        """A stream chunk; `with_usage` adds the usage key (None on all but the usage chunks)."""
        out = {**self._head(self.chunk_object_name), "choices": [self._choice(text, finish, tokens, first)]}
        if with_usage:
            out["usage"] = use
        return out

    def usage_chunk(self, use: dict[str, int]) -> dict[str, Any]:
        """The last chunk of a stream with include_usage: no choices, only the usage."""
        return {**self._head(self.chunk_object_name), "choices": [], "usage": use}

    def _head(self, name: str) -> dict[str, Any]:
        return {"id": self.rid, "object": name, "created": self.created, "model": self.model}

    def _choice(self, text: str, finish: str | None, tokens: list[SampledToken],
                first: bool | None) -> dict[str, Any]:
        raise NotImplementedError


class CompletionFormat(_Format):
    object_name = chunk_object_name = "text_completion"

    def __init__(self, rid: str, model: str, texts: TokenTexts, logprobs: bool) -> None:
        super().__init__(rid, model, texts, logprobs)
        self.text_offset = 0  # characters of token text reported so far

    def _choice(self, text, finish, tokens, first):
        return {"index": 0, "text": text, "logprobs": self._logprobs(tokens) if self.logprobs else None,
                "finish_reason": finish}

    def _logprobs(self, tokens: list[SampledToken]) -> dict[str, list]:
        strings = [self.texts.text(t.token_id) for t in tokens]
        offsets = []
        for s in strings:
            offsets.append(self.text_offset)
            self.text_offset += len(s)
        tops = [{**{self.texts.text(i): _finite(lp) for i, lp in t.top}, s: _finite(t.logprob)}
                for s, t in zip(strings, tokens)]
        return {"tokens": strings, "token_logprobs": [_finite(t.logprob) for t in tokens],
                "top_logprobs": tops, "text_offset": offsets}


class ChatFormat(_Format):
    object_name, chunk_object_name = "chat.completion", "chat.completion.chunk"

    def _choice(self, text, finish, tokens, first):
        lps = {"content": [self._entry(t) for t in tokens], "refusal": None} if self.logprobs else None
        if first is None:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lps,
                    "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": lps, "finish_reason": finish}

    def _entry(self, t: SampledToken) -> dict[str, Any]:
        return {**self._token(t.token_id, t.logprob),
                "top_logprobs": [self._token(i, lp) for i, lp in t.top]}

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = self.texts(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": raw}
