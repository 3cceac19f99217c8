"""Pick the next token of each sampled row: greedy, temperature, top-k, top-p, seeded.

Greedy rows (temperature 0) are one argmax over the batch. Random rows draw from their own
torch.Generator seeded from (request seed, position): stateless, so the actor keeps nothing
between steps, and a re-run or a re-prefill after eviction reproduces the same tokens.
Stopping on EOS / stop tokens is reported per token; max_tokens is the scheduler's business.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scheduler.plan import TokenResult
from scheduler.request import SamplingParams

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) pairs apart


@dataclass
class SampleRow:
    request_id: str
    sampling: SamplingParams
    position: int  # position of the token being sampled (seeds its draw)


def generator_seed(seed: int, position: int) -> int:
    return (seed * _SEED_MIX + position) % (2**63 - 1)


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...]) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> list[TokenResult]:
        """`logits` fp32 `[len(rows), vocab]` -> one TokenResult per row, same order."""
        tokens = logits.argmax(dim=-1)
        for r, row in enumerate(rows):
            if row.sampling.temperature > 0:
                tokens[r] = self._draw(logits[r], row)
        want_logprobs = any(row.sampling.logprobs for row in rows)
        logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        ids = tokens.tolist()
        return [self._result(row, ids[r], logprobs[r, ids[r]] if logprobs is not None
                             and row.sampling.logprobs else None)
                for r, row in enumerate(rows)]

    def _result(self, row: SampleRow, token: int, logprob: torch.Tensor | None) -> TokenResult:
        s = row.sampling
        stop = token in s.stop_token_ids or (not s.ignore_eos and token in self.eos_token_ids)
        return TokenResult(row.request_id, token, "stop" if stop else None,
                           float(logprob) if logprob is not None else None)

    @staticmethod
    def _draw(logits: torch.Tensor, row: SampleRow) -> int:
        s = row.sampling
        scaled = logits / s.temperature
        if s.top_k > 0 and s.top_k < scaled.numel():
            kth = torch.topk(scaled, s.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = sorted_probs.cumsum(0) - sorted_probs >= s.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        gen = None
        if s.seed is not None:
            gen = torch.Generator(device=logits.device).manual_seed(
                generator_seed(s.seed, row.position))
        return int(torch.multinomial(probs, 1, generator=gen))
