"""The one small interface every batching policy implements.

A policy reads a `WorkerQueues` (requests by stage, KV pool) and returns the batch of one
iteration: (request, number of new tokens) pairs. It never touches Ray, torch or a clock; the
core enforces KV capacity (LIFO eviction) on whatever the policy returns.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from scheduler.queues import WorkerQueues
from scheduler.request import Request

Batch = list[tuple[Request, int]]


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
    max_num_batched_tokens: int = 4096
    num_workers: int = 1
    extra: dict = field(default_factory=dict)


class Policy(ABC):
    name = "base"
    # Threshold policies may idle while work waits; the core's starvation guard watches them.
    may_idle = False

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

    # Hooks for online estimation (PAPER.md section 5).
    def on_arrival(self, req: Request, now: float) -> None:
        pass

    def on_finish(self, req: Request, now: float) -> None:
        pass

    def describe(self) -> dict:
        """The policy's current parameters (thresholds, segments) for logs and metrics."""
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
