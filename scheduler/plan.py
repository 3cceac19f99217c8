"""What the scheduler tells a model actor to run in one iteration, and what comes back.

A plan is plain data (picklable, no torch): per request the new token ids, their positions,
the request's block table and the slot of every new token's KV. The actor writes KV exactly
where `slot_mapping` says and samples one token for every chunk with `sample=True`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.request import SamplingParams


@dataclass(slots=True)
class ScheduledChunk:
    request_id: str
    token_ids: list[int]  # inputs at positions start_pos .. start_pos + num_tokens - 1
    start_pos: int
    num_tokens: int
    block_table: list[int]  # the request's blocks, in position order
    slot_mapping: list[int]  # block_id * block_size + offset, one per new token
    sample: bool  # last chunk of a prefill, or a decode: sample the next token
    sampling: SamplingParams = field(default_factory=SamplingParams)
    is_prefill: bool = True

    @property
    def context_len(self) -> int:
        """Tokens attended by the last new token (its own included)."""
        return self.start_pos + self.num_tokens


@dataclass
class Plan:
    worker: int
    iteration: int
    chunks: list[ScheduledChunk]
    block_size: int
    evicted: list[str] = field(default_factory=list)  # requests whose KV was freed for this plan

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks if c.is_prefill)

    @property
    def num_decode_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks if not c.is_prefill)

    @property
    def num_new_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_attended_kv(self) -> int:
        """KV tokens read by decodes (the d_kv term of the cost model)."""
        return sum(c.context_len for c in self.chunks if not c.is_prefill)


@dataclass(slots=True)
class TokenResult:
    request_id: str
    token_id: int  # -1 in simulation
    finish_reason: str | None = None  # "stop" when EOS / a stop token was sampled
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first


@dataclass
class StepResult:
    worker: int
    iteration: int
    tokens: list[TokenResult]  # one per chunk with sample=True, in plan order
    step_time_s: float = 0.0  # the model's own compute time for this iteration
