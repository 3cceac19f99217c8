"""The one small interface every batching policy implements, and the batch builders they share.

A policy reads a `WorkerQueues` (requests by stage, KV pool) and returns the batch of one
iteration: (request, number of new tokens) pairs. It never touches Ray, torch or a clock; the
core enforces KV capacity on whatever the policy returns (dropping new admissions, then
evicting by the policy's `victim` rule: LIFO unless the policy says otherwise).

Every policy honours the engine's limits: at most `max_num_seqs` resident requests and at most
`max_num_batched_tokens` new tokens per iteration (a prompt longer than what is left of that
budget is chunked and continues in the next iteration). The paper's vLLM is the one exception:
it never chunks, so a prompt longer than the budget runs alone (as vLLM before chunked prefill).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from scheduler.cost import CostModel
from scheduler.queues import WorkerQueues
from scheduler.request import Request

Batch = list[tuple[Request, int]]
# Decides one admission: (request, tokens of its first chunk) -> admit it now?
Admit = Callable[[Request, int], bool]


@dataclass(frozen=True)
class WorkloadHint:
    """What a policy may know in advance (the paper's assumption); live runs pass none."""

    rate: float | None = None  # total arrivals per second
    output_lens: tuple[int, ...] = ()  # a sample (or the support) of output lengths
    output_weights: tuple[float, ...] = ()  # probabilities of output_lens, if a support
    prompt_len: float | None = None  # mean prompt length


@dataclass
class PolicyConfig:
    max_num_seqs: int = 256
    # vLLM's default for online serving on an A100 (vllm/engine/arg_utils.py, get_batch_defaults).
    max_num_batched_tokens: int = 2048
    num_workers: int = 1
    extra: dict = field(default_factory=dict)


class Policy(ABC):
    name = "base"
    # Threshold policies may idle while work waits; the core's starvation guard watches them.
    may_idle = False
    # On KV overflow, pause residents that need a new block rather than evict (see SchedulerCore).
    pause_on_overflow = False

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()

    def group_of(self, req: Request) -> int:
        """The class a request is queued in (WAIT's type); 0 for single-class policies."""
        return 0

    @property
    def num_groups(self) -> int:
        return 1

    @abstractmethod
    def select(self, q: WorkerQueues, now: float) -> Batch:
        """The batch of the next iteration; empty to idle."""

    def fallback(self, q: WorkerQueues, now: float) -> Batch:
        """A work-conserving batch for the starvation guard (threshold policies override)."""
        return []

    def wake_time(self, q: WorkerQueues) -> float:
        """When the starvation guard runs `fallback` if the policy still holds work back."""
        return float("inf")

    def victim(self, q: WorkerQueues) -> Request:
        """The resident to evict when a batch cannot fit: the newest admission (LIFO), whose
        recomputation loses the least work, as the paper and vLLM do."""
        return q.resident[next(reversed(q.resident))]

    # Hooks for online estimation (scheduler/SCHEDULING.md §5); no-ops for policies that need none.
    def on_arrival(self, req: Request, now: float) -> None:
        pass

    def on_finish(self, req: Request, now: float) -> None:
        pass

    def set_cost(self, cost: CostModel) -> None:
        """A new (e.g. online-fitted) iteration-cost model."""

    @property
    def thresholds(self) -> list[float]:
        """Per-segment (or per-type) thresholds, for metrics; none for baselines."""
        return []

    def entry_counts(self, q: WorkerQueues) -> list[int]:
        """Requests waiting at each threshold's entry (for metrics); here, the prefill queue."""
        return [q.num_waiting]

    def describe(self) -> dict:
        """The policy's parameters, and every deviation from its source that is switched on."""
        return {"policy": self.name}


def take_decodes(q: WorkerQueues, limit: int) -> Batch:
    """Up to `limit` resident decoders in admission order (FCFS), one token each."""
    batch: Batch = []
    for req in q.resident.values():
        if len(batch) >= limit:
            break
        if not req.in_prefill:
            batch.append((req, 1))
    return batch


def decode_first(q: WorkerQueues, config: PolicyConfig, token_budget: int, admit: Admit) -> Batch:
    """Stall-free continuous batching (Sarathi-Serve, vLLM v1): every resident decode, then the
    unfinished prefills, then new admissions FCFS while `admit` accepts them, all within
    `token_budget` new tokens; the last prefill of the iteration is chunked to what is left."""
    batch = take_decodes(q, config.max_num_seqs)
    budget = token_budget - len(batch)
    for req in q.prefilling.values():
        if budget <= 0:
            return batch
        n = min(budget, req.prefill_target - req.num_computed_tokens)
        batch.append((req, n))
        budget -= n
    seats = config.max_num_seqs - q.num_resident
    for req in q.waiting_in_order():
        if budget <= 0 or seats <= 0:
            break
        n = min(budget, req.prefill_target)
        if not admit(req, n):
            break  # FCFS: nobody overtakes a request that does not fit
        batch.append((req, n))
        budget -= n
        seats -= 1
    return batch


class FreeBlocks:
    """Admission by the blocks free now: `whole` reserves a new request's whole prompt
    (Sarathi-Serve), else only the blocks of the chunk scheduled now (vLLM v1)."""

    def __init__(self, q: WorkerQueues, whole: bool) -> None:
        self.pool, self.free, self.whole = q.pool, q.pool.num_free_blocks, whole

    def __call__(self, req: Request, tokens: int) -> bool:
        blocks = self.pool.blocks_for(req.prefill_target if self.whole else tokens)
        if blocks > self.free:
            return False
        self.free -= blocks
        return True
