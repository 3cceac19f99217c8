"""A request's life in the scheduler: lengths, progress, timestamps and state.

Stage = number of output tokens generated so far. Stage 0 is the prefill (which produces the
first token); each later iteration decodes one token. The KV a resident request holds is
`num_computed_tokens` (prompt + generated tokens whose KV has been written).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestState(enum.Enum):
    WAITING = "waiting"  # queued for (re)prefill, holds no KV
    RUNNING = "running"  # resident and advanced in the last iteration
    PAUSED = "paused"  # resident (keeps its KV) but not advanced in the last iteration
    FINISHED = "finished"
    CANCELLED = "cancelled"
    REJECTED = "rejected"

    @property
    def is_done(self) -> bool:
        return self in DONE_STATES


DONE_STATES = frozenset({RequestState.FINISHED, RequestState.CANCELLED, RequestState.REJECTED})


@dataclass(slots=True)
class SamplingParams:
    """How the model actor picks the next token. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # with logprobs: also this many most likely tokens (<= 20)


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    prompt_len: int
    max_tokens: int
    arrival_time: float
    prompt_token_ids: list[int] | None = None  # None in simulation
    output_len: int | None = None  # known output length (WAIT, simulation truth)
    sampling: SamplingParams = field(default_factory=SamplingParams)

    # Progress.
    state: RequestState = RequestState.WAITING
    worker: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_generated: int = 0
    num_computed_tokens: int = 0
    # Tokens the current (re)prefill computes: the prompt, or after an eviction the prompt plus
    # every generated token (so the next sample continues the stream where it stopped).
    prefill_target: int = 0
    admitted_seq: int = -1  # order of the last admission to KV; LIFO eviction picks the largest
    # Overlapped planning: tokens scheduled but not yet back from the model actor (vLLM's output
    # placeholders). `num_generated` and the stage already count them; `output_token_ids` not.
    num_pending: int = 0
    slot: int = -1  # the request's row in its model actor's request table while it holds KV
    gen_limit: int = 0  # tokens it may generate (max_tokens, output_len, context): set on admission
    planned_iteration: int = -1  # the last iteration of its worker that scheduled it
    num_evictions: int = 0
    num_failed_steps: int = 0  # steps that raised on the model actor with this request in them
    group: int = 0  # policy-assigned class (WAIT: the request's type); 0 otherwise

    # Timestamps (seconds, the scheduler's clock).
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    waiting_since: float = 0.0  # when it last became ready and was not advanced
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "rejected" | "error"

    def __post_init__(self) -> None:
        self.waiting_since = self.arrival_time
        self.prefill_target = self.prompt_len

    @property
    def stage(self) -> int:
        return self.num_generated

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < self.prefill_target

    @property
    def total_len(self) -> int:
        return self.prompt_len + self.num_generated

    @property
    def target_len(self) -> int:
        """The output length at which the request finishes, if nothing stops it earlier."""
        if self.output_len is not None:
            return min(self.output_len, self.max_tokens)
        return self.max_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        """Token ids of positions [start, end) of prompt + output (live requests only)."""
        if self.prompt_token_ids is None:
            return []
        prompt = self.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        out_start = max(0, start - len(prompt))
        return prompt[start:] + self.output_token_ids[out_start : end - len(prompt)]


@dataclass(slots=True)
class TokenEvent:
    """One sampled token of one request, as the streams and metrics see it."""

    request: Request
    token_id: int
    finish_reason: str | None  # "error": the request's row failed on the model actor
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
