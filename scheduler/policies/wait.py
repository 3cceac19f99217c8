"""WAIT (scheduler/SCHEDULING.md §3): known output lengths, one threshold per request type.

Type j is eligible when at least n_j type-j requests wait for prefill. An iteration serves every
eligible type at every stage, at most n_j requests per stage; other types pause; with no type
eligible the server idles (the starvation guard bounds that). Types come from the workload hint
(the paper's known types); a live request's type is the one whose output length is nearest its
own known length (or max_tokens). The paper's rule as is, within the engine's token budget.
"""
from __future__ import annotations

from bisect import bisect_left

from scheduler import fluid
from scheduler.policies.base import Batch
from scheduler.policies.threshold import (
    ThresholdPolicy,
    cap_to_seqs,
    continue_prefills,
    take_prefills,
    take_stage,
)
from scheduler.queues import WorkerQueues
from scheduler.request import Request


class WaitPolicy(ThresholdPolicy):
    name = "wait"

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        lens = self.hint.output_lens
        if not lens:
            raise ValueError("the wait policy needs the request types (output lengths) in advance")
        weights = self.hint.output_weights or tuple(1.0 / len(lens) for _ in lens)
        pairs = sorted(zip(lens, weights))
        self.output_lens = [o for o, _ in pairs]
        self.shares = [w for _, w in pairs]
        self.caps = [1] * len(self.output_lens)

    @property
    def thresholds(self) -> list[float]:
        return [float(c) for c in self.caps]

    @property
    def num_groups(self) -> int:
        return len(self.output_lens)

    def group_of(self, req: Request) -> int:
        length = req.output_len if req.output_len is not None else req.max_tokens
        i = bisect_left(self.output_lens, length)
        if i == len(self.output_lens) or (i > 0 and length - self.output_lens[i - 1] < self.output_lens[i] - length):
            i -= 1
        return max(0, i)

    def refresh(self, now: float) -> None:
        rate = self.arrival_rate(now)
        types = [
            fluid.JobType(round(self.prompt_len()), o, max(rate * s, 1e-9))
            for o, s in zip(self.output_lens, self.shares)
        ]
        if self.budget is not None:
            caps = fluid.wait_thresholds_from_budget(types, self.budget)
        elif self.cost is not None:
            caps = fluid.wait_thresholds(types, self.cost, self.slack)
            solution = fluid.solve(types, self.cost)
            self.iteration_time_s = solution.iteration_time_s if solution.stable else None
        else:
            caps = [1] * len(types)
        self.caps = [max(1, int(c)) for c in caps]

    def select(self, q: WorkerQueues, now: float) -> Batch:
        self.maybe_refresh(now)
        eligible = [j for j, g in enumerate(q.groups) if len(g.waiting) + self._restarts(q, j) >= self.caps[j]]
        return self._batch(q, eligible)

    def fallback(self, q: WorkerQueues, now: float) -> Batch:
        return self._batch(q, range(len(q.groups)))

    @staticmethod
    def _restarts(q: WorkerQueues, group: int) -> int:
        return sum(1 for r in q.restart.values() if r.group == group) if q.restart else 0

    def _batch(self, q: WorkerQueues, types) -> Batch:
        """Types `types`: at most caps[j] requests per stage and caps[j] new prefills."""
        batch: Batch = []
        types = list(types)
        for j in types:
            for bucket in q.groups[j].stages.values():
                take_stage(bucket, self.caps[j], batch)
        budget = continue_prefills(q, batch, self.config.max_num_batched_tokens - len(batch))
        # Prefills after every decode (as cap_to_seqs orders them), and only while the batch has
        # room: with hundreds of types, visiting every type's queue would cost more than the plan.
        for j in types:
            if len(batch) >= self.config.max_num_seqs or budget <= 0:
                break
            budget = take_prefills(q, j, self.caps[j], batch, budget)
        return cap_to_seqs(batch, self.config.max_num_seqs)

    def describe(self) -> dict:
        return {"policy": self.name, "output_lens": self.output_lens, "thresholds": self.caps}
