"""The per-model-actor view a policy reads: who waits for prefill, who is resident at which stage.

Everything is indexed so a policy can plan in O(batch size + number of stages): requests that
wait for (re)prefill in FIFO order, and resident decoders bucketed by stage (tokens generated).
Dicts keep insertion order, so each bucket is FIFO and removal is O(1).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kv.blocks import BlockPool
from scheduler.request import Request


@dataclass
class GroupQueues:
    """One class of requests (WAIT's types; every other policy uses a single group)."""

    waiting: dict[str, Request] = field(default_factory=dict)  # no KV, need a prefill
    stages: dict[int, dict[str, Request]] = field(default_factory=dict)  # resident decoders

    def add_decoder(self, req: Request) -> None:
        stage = req.num_generated  # == req.stage (this runs once per token)
        bucket = self.stages.get(stage)
        if bucket is None:
            bucket = self.stages[stage] = {}
        bucket[req.request_id] = req

    def remove_decoder(self, req: Request) -> None:
        stage = req.num_generated
        bucket = self.stages.get(stage)
        if bucket is not None and bucket.pop(req.request_id, None) is not None and not bucket:
            del self.stages[stage]

    def at_stage(self, stage: int) -> dict[str, Request]:
        return self.stages.get(stage, _EMPTY)

    def num_decoders(self) -> int:
        return sum(len(b) for b in self.stages.values())


_EMPTY: dict[str, Request] = {}


@dataclass
class WorkerQueues:
    worker: int
    pool: BlockPool
    groups: list[GroupQueues]
    restart: dict[str, Request] = field(default_factory=dict)  # evicted: re-prefill first
    prefilling: dict[str, Request] = field(default_factory=dict)  # resident, prefill unfinished
    resident: dict[str, Request] = field(default_factory=dict)  # holds KV, in admission order
    idle_since: float = 0.0  # end of the last iteration (for the starvation guard)
    busy: bool = False  # a plan is executing on this worker

    @property
    def num_waiting(self) -> int:
        return len(self.restart) + sum(len(g.waiting) for g in self.groups)

    @property
    def num_resident(self) -> int:
        return len(self.resident)

    def has_work(self) -> bool:
        return bool(self.resident) or self.num_waiting > 0

    def waiting_in_order(self, group: int | None = None):
        """Requests that need a prefill, evicted ones first, then arrivals FIFO."""
        yield from self.restart.values()
        groups = self.groups if group is None else [self.groups[group]]
        for g in groups:
            yield from g.waiting.values()

    def decoders(self):
        """All resident decoders, by group then stage (ascending)."""
        for g in self.groups:
            for stage in sorted(g.stages):
                yield from g.stages[stage].values()
