"""What the scheduler tells a model actor to run in one iteration, and what comes back.

Two forms of a plan, both plain data (picklable, no torch):

* `DiffPlan`, the wire form (vLLM v1's `SchedulerOutput` is the model): the actor keeps every
  resident request's state (tokens, positions, block table, sampling) in slots the scheduler
  assigns, so a plan carries only what changed: new or resumed requests once
  (`NewRequestData`: token ids, blocks, sampling), blocks appended to resident requests, the
  slots freed since the last plan (finished, cancelled, evicted), and per scheduled row its slot,
  its number of new tokens and its start position (which the actor checks against its own).
  A decode's input token is the one the actor itself sampled last, so the scheduler can plan step
  t+1 before step t's tokens are back. Integer vectors are `array('i')`: cheap to pickle and
  read on the actor with `numpy.frombuffer`.
* `Plan` / `ScheduledChunk`, the self-contained form: per request the token ids, positions,
  block table and slot mapping. Used by tests, benchmarks of the engine, calibration, debugging
  and replay; `PlanExpander` turns a stream of diff plans (and their results) into it.

A row samples a token when it reaches the end of the tokens the actor knows (the last chunk of
a prefill, or a decode); results come back in plan order, one per sampled row, as compact
arrays (`StepResult`).
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Any

from scheduler.request import SamplingParams


def int_array(values=()) -> array:
    """A compact int32 vector for the wire."""
    return array("i", values)


# -- the wire form -----------------------------------------------------------------------------
@dataclass(slots=True)
class NewRequestData:
    """A request the actor does not hold yet (first admission, or resumed after an eviction or
    a reset): everything its (re)prefill computes, once."""

    slot: int
    request_id: str
    token_ids: array  # prompt, plus the tokens generated before an eviction
    block_ids: array  # its blocks, in position order, as of this plan
    sampling: SamplingParams
    prompt_len: int = 0  # of token_ids, the prompt's (the rest was generated before)


@dataclass(slots=True)
class DiffPlan:
    worker: int
    iteration: int
    epoch: int  # a new epoch tells the actor to drop every request it holds first
    block_size: int
    # The iteration of the plan sent to this actor just before, in this epoch (-1: none): an
    # actor that may receive calls out of order runs this plan only after that one.
    prev_iteration: int = -1
    new_requests: list[NewRequestData] = field(default_factory=list)
    freed_slots: array = field(default_factory=int_array)  # finished or cancelled since the last plan
    evicted_slots: array = field(default_factory=int_array)  # evicted to make room for this plan
    # Blocks appended to requests the actor already holds (one entry per block, slots ascending
    # in plan order: the blocks of one slot are contiguous and in position order).
    grow_slots: array = field(default_factory=int_array)
    grow_blocks: array = field(default_factory=int_array)
    # The scheduled rows, in plan order.
    slots: array = field(default_factory=int_array)
    num_tokens: array = field(default_factory=int_array)
    start_pos: array = field(default_factory=int_array)

    @property
    def num_rows(self) -> int:
        return len(self.slots)

    def set_rows(self, slots: list[int], num_tokens: list[int], start_pos: list[int]) -> None:
        self.slots, self.num_tokens, self.start_pos = int_array(slots), int_array(num_tokens), int_array(start_pos)


# -- the self-contained form -------------------------------------------------------------------
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


# -- results -----------------------------------------------------------------------------------
@dataclass(slots=True)
class TokenResult:
    request_id: str
    token_id: int  # -1 in simulation
    finish_reason: str | None = None  # "stop" when EOS / a stop token was sampled
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first


@dataclass
class StepResult:
    """One executed iteration: a token per sampled row, in plan order, as compact arrays."""

    worker: int
    iteration: int
    token_ids: Any = field(default_factory=int_array)  # array('i') (or a list)
    stop_rows: Any = field(default_factory=int_array)  # sampled rows that hit EOS / a stop token
    step_time_s: float = 0.0  # the model's own compute time for this iteration
    logprobs: list[float | None] | None = None  # per sampled row, when any row asked
    epoch: int = 0
    started_at: float = 0.0  # the actor's time.monotonic() at the start and end of the step
    finished_at: float = 0.0
    request_ids: list[str] | None = None  # full-form plans only: the sampled rows' requests
    extras: dict = field(default_factory=dict)  # room for per-row outputs
    # Per sampled row, when any row asked: the top-N (token id, logprob), most likely first.
    top_logprobs: list[list[tuple[int, float]] | None] | None = None
    # Requests whose rows failed in this step (the sampler refused the row, or the forward pass
    # raised on it even alone): each ends with finish_reason "error"; a sampled one's token is -1.
    failed: list[str] | None = None

    def __post_init__(self) -> None:
        # The older form, a list of TokenResult as the third argument, still builds a result.
        tokens = self.token_ids
        if len(tokens) and isinstance(tokens[0], TokenResult):
            self._from_tokens(tokens)

    def _from_tokens(self, tokens: list[TokenResult]) -> None:
        self.token_ids = int_array(t.token_id for t in tokens)
        self.stop_rows = int_array(i for i, t in enumerate(tokens) if t.finish_reason == "stop")
        self.request_ids = [t.request_id for t in tokens]
        if any(t.logprob is not None for t in tokens):
            self.logprobs = [t.logprob for t in tokens]
        if any(t.top_logprobs is not None for t in tokens):
            self.top_logprobs = [t.top_logprobs for t in tokens]
        failed = [t.request_id for t in tokens if t.finish_reason == "error"]
        self.failed = (self.failed or []) + failed if failed else self.failed

    @classmethod
    def from_tokens(cls, worker: int, iteration: int, tokens: list[TokenResult],
                    step_time_s: float = 0.0, **kw: Any) -> StepResult:
        out = cls(worker, iteration, step_time_s=step_time_s, **kw)
        out._from_tokens(tokens)
        return out

    @property
    def tokens(self) -> list[TokenResult]:
        """The sampled tokens as objects (tests, debugging; the hot path reads the arrays)."""
        stops = set(self.stop_rows)
        ids = self.request_ids or [""] * len(self.token_ids)
        lps = self.logprobs or [None] * len(self.token_ids)
        tops = self.top_logprobs or [None] * len(self.token_ids)
        failed = set(self.failed or ())
        return [TokenResult(ids[i], int(t), "error" if ids[i] in failed else "stop" if i in stops else None,
                            lps[i], tops[i])
                for i, t in enumerate(self.token_ids)]


# -- expanding diff plans ----------------------------------------------------------------------
@dataclass
class _Held:
    request_id: str
    tokens: list[int]  # every token known: prompt (+ generated before a resume) + sampled since
    prefill_len: int  # tokens given with NewRequestData: rows inside them are prefill
    blocks: list[int]
    computed: int
    sampling: SamplingParams


class PlanExpander:
    """Replays diff plans (and the results of the steps they ran) into self-contained `Plan`s:
    the same bookkeeping a model actor does, in plain Python, for tests, debugging and replay.

        full = expander.expand(diff)         # before the step runs
        expander.observe(diff, result)       # after: sampled tokens become the next inputs
    """

    def __init__(self) -> None:
        self.held: dict[int, _Held] = {}
        self.epoch: int | None = None

    def expand(self, diff: DiffPlan) -> Plan:
        if diff.epoch != self.epoch:
            self.held.clear()
            self.epoch = diff.epoch
        evicted = [self.held[s].request_id for s in diff.evicted_slots if s in self.held]
        for slot in (*diff.freed_slots, *diff.evicted_slots):
            self.held.pop(slot, None)
        for new in diff.new_requests:
            self.held[new.slot] = _Held(new.request_id, list(new.token_ids), len(new.token_ids),
                                        list(new.block_ids), 0, new.sampling)
        for slot, block in zip(diff.grow_slots, diff.grow_blocks):
            self.held[slot].blocks.append(block)
        bs = diff.block_size
        chunks = []
        for slot, n, start in zip(diff.slots, diff.num_tokens, diff.start_pos):
            h = self.held[slot]
            end = start + n
            chunks.append(ScheduledChunk(
                h.request_id, h.tokens[start:end], start, n, list(h.blocks),
                [h.blocks[p // bs] * bs + p % bs for p in range(start, end)],
                sample=end >= len(h.tokens), sampling=h.sampling, is_prefill=start < h.prefill_len,
            ))
        return Plan(diff.worker, diff.iteration, chunks, bs, evicted)

    def observe(self, diff: DiffPlan, result: StepResult) -> None:
        tokens = iter(result.token_ids)
        for slot, n in zip(diff.slots, diff.num_tokens):
            h = self.held[slot]
            h.computed += n
            if h.computed >= len(h.tokens):
                h.tokens.append(int(next(tokens)))


# -- the scheduler's own record of a plan ------------------------------------------------------
@dataclass(slots=True)
class ScheduledRow:
    """One row of a `ScheduledBatch`, as an object (tests and debugging)."""

    request_id: str
    start_pos: int
    num_tokens: int
    sample: bool
    is_prefill: bool

    @property
    def context_len(self) -> int:
        return self.start_pos + self.num_tokens


class ScheduledBatch:
    """What `SchedulerCore.plan` returns and `commit` takes back; it never leaves the scheduler.

    Rows are kept as parallel lists (appending is all the hot path does); `sampled` holds the
    requests whose rows sample, in plan order, which is the order of the step's results. `wire`
    is the `DiffPlan` sent to the model actor (None in the simulator, which sends nothing)."""

    __slots__ = (
        "epoch",
        "evicted",
        "is_prefill",
        "iteration",
        "num_attended_kv",
        "num_new_tokens",
        "num_tokens",
        "requests",
        "sampled",
        "start_pos",
        "wire",
        "worker",
    )

    def __init__(self, worker: int, iteration: int, epoch: int, evicted: list[str],
                 wire: DiffPlan | None) -> None:
        self.worker, self.iteration, self.epoch = worker, iteration, epoch
        self.requests: list = []
        self.num_tokens: list[int] = []
        self.start_pos: list[int] = []
        self.is_prefill: list[bool] = []
        self.sampled: list = []
        self.evicted = evicted
        self.num_new_tokens = 0
        self.num_attended_kv = 0  # KV tokens read by decodes (the d_kv term of the cost model)
        self.wire = wire

    def __len__(self) -> int:
        return len(self.requests)

    def add_row(self, req, num_tokens: int, start_pos: int, is_prefill: bool, sample: bool) -> None:
        self.requests.append(req)
        self.num_tokens.append(num_tokens)
        self.start_pos.append(start_pos)
        self.is_prefill.append(is_prefill)
        self.num_new_tokens += num_tokens
        if sample:
            self.sampled.append(req)

    @property
    def num_sampled(self) -> int:
        return len(self.sampled)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(n for n, p in zip(self.num_tokens, self.is_prefill) if p)

    @property
    def num_decode_tokens(self) -> int:
        return self.num_new_tokens - self.num_prefill_tokens

    @property
    def chunks(self) -> list[ScheduledRow]:
        sampled = {id(r) for r in self.sampled}
        return [ScheduledRow(r.request_id, s, n, id(r) in sampled, p)
                for r, n, s, p in zip(self.requests, self.num_tokens, self.start_pos, self.is_prefill)]
