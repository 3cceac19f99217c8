"""The per-model-actor view a policy reads: who waits for prefill, who is resident at which stage.

Everything is indexed so a policy can plan in O(batch size + number of stages): requests that
wait for (re)prefill in FIFO order, and resident decoders bucketed by stage (tokens generated).
Dicts keep insertion order, so each bucket is FIFO and removal is O(1).

With overlapped planning (a plan made while earlier ones still run) the queues show every
request as it will be once the plans in flight have run: stages and `num_computed_tokens` count
the scheduled work, a request whose last token is in flight is in no stage, and a request
evicted with tokens in flight waits in `parked` (no policy sees it) until they are back.
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


class SlotAllocator:
    """Rows of a model actor's request table. A freed slot may be handed out again in the very
    next plan: that plan tells the actor to free it first (`freed`, then new requests)."""

    def __init__(self) -> None:
        self._free: list[int] = []
        self._next = 0
        # Freed since the last plan (finished, cancelled / evicted): the next plan announces them.
        self.freed: list[int] = []
        self.evicted: list[int] = []

    def take(self) -> int:
        if self._free:
            return self._free.pop()
        self._next += 1
        return self._next - 1

    def release(self, slot: int, evicted: bool = False) -> None:
        self._free.append(slot)
        (self.evicted if evicted else self.freed).append(slot)

    def reset(self) -> None:
        """The actor dropped every request: all slots are free and nothing is to announce."""
        self._free.clear()
        self._next = 0
        self.freed.clear()
        self.evicted.clear()


@dataclass
class WorkerQueues:
    worker: int
    pool: BlockPool
    groups: list[GroupQueues]
    restart: dict[str, Request] = field(default_factory=dict)  # evicted: re-prefill first
    prefilling: dict[str, Request] = field(default_factory=dict)  # resident, prefill unfinished
    resident: dict[str, Request] = field(default_factory=dict)  # holds KV, in admission order
    parked: dict[str, Request] = field(default_factory=dict)  # evicted, tokens still in flight
    idle_since: float = 0.0  # end of the last iteration (for the starvation guard)
    in_flight: int = 0  # plans sent and not committed yet
    epoch: int = 0  # bumped when the actor's state is lost (crash, failed step)
    last_sent: tuple[int, int] = (-1, -1)  # (epoch, iteration) of the last plan made
    slots: SlotAllocator = field(default_factory=SlotAllocator)
    healthy: bool = True  # False while its model actor stays dead: nothing is routed here

    @property
    def busy(self) -> bool:
        """A plan is executing on this worker."""
        return self.in_flight > 0

    @property
    def num_waiting(self) -> int:
        return len(self.restart) + sum(len(g.waiting) for g in self.groups)

    @property
    def num_resident(self) -> int:
        return len(self.resident)

    def has_work(self) -> bool:
        return bool(self.resident) or self.num_waiting > 0 or bool(self.parked)

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
