"""Nested WAIT (PAPER.md section 4): thresholds over output-length segments, no length prediction.

Decoding is cut into segments at the output lengths o_1 < ... < o_m. Requests classify
themselves as they decode: those still running at a boundary queue at the next segment's entry.
With thresholds n_1 > ... > n_m, the batch serves segments 1..k for the largest k whose every
entry queue holds at least its threshold, taking at most n_k' requests at each stage of segment
k'. Later segments pause, keeping their KV.

Stages here count generated tokens: the prefill produces token 1, and a request in segment k
(k >= 2) has generated o_{k-1} .. o_k - 1 tokens; its entry queue is stage o_{k-1}.
"""
from __future__ import annotations

import math
from bisect import bisect_right

from scheduler import fluid
from scheduler.policies.base import Batch
from scheduler.policies.threshold import ThresholdPolicy, cap_to_seqs, take_prefills, take_stage
from scheduler.queues import WorkerQueues


class NestedWaitPolicy(ThresholdPolicy):
    name = "nested-wait"

    def __init__(self, *args, num_segments: int = 10, bounds: list[int] | None = None, **kw) -> None:
        super().__init__(*args, **kw)
        self.num_segments = num_segments
        self.fixed_bounds = sorted(set(bounds)) if bounds else None
        self.bounds: list[int] = self.fixed_bounds or [1]
        self._work_conserving(len(self.bounds))

    # -- thresholds ------------------------------------------------------------------------
    def refresh(self, now: float) -> None:
        seg = self._segments(max(self.arrival_rate(now), 1e-9))
        if seg is None or (self.budget is None and self.cost is None):
            return  # neither lengths nor iteration costs known yet: stay work-conserving
        if self.budget is not None:
            thresholds = fluid.nested_thresholds_from_budget(seg, self.budget)
        else:
            thresholds = self._fluid_thresholds(seg)
        self.bounds = list(seg.bounds)
        self.thresholds = list(thresholds)
        # A fractional threshold: the entry needs floor(n_k) requests (none when n_k < 1: on
        # average fewer than one request per stage), and each stage runs up to ceil(n_k).
        self.entry_needs = [int(t) for t in thresholds]
        self.caps = [max(1, math.ceil(t)) for t in thresholds]

    def _work_conserving(self, num_segments: int) -> None:
        """Before the load can be modelled: every entry open, no per-stage cap (the batch
        limit still applies), so the server never holds work back on a guess."""
        self.thresholds = [float(self.config.max_num_seqs)] * num_segments
        self.caps = [self.config.max_num_seqs] * num_segments
        self.entry_needs = [1] + [0] * (num_segments - 1)

    def _segments(self, rate: float) -> "fluid.Segments | None":
        if self.fixed_bounds is None:
            return self.lengths.segments(rate, self.num_segments) if self.lengths.count else None
        survival = self.lengths.survival(self.fixed_bounds) if self.lengths.count else []
        rates, reach = [], rate
        for k in range(len(self.fixed_bounds)):
            reach *= survival[k] if survival else 1.0
            rates.append(max(reach, 1e-9 * rate))
        return fluid.Segments(list(self.fixed_bounds), rates)

    def _fluid_thresholds(self, seg: "fluid.Segments") -> list[float]:
        """n_1 just above the fluid per-stage count Lambda_1 dT*, decaying geometrically, with
        the base memory M^pi capped at the KV capacity (unstable loads fill C)."""
        cost = self._cost()
        solution = self.fluid_solution(seg.rates[0])
        self.iteration_time_s = solution.iteration_time_s if solution.stable else None
        shape = fluid.geometric_thresholds(seg, 1.0)
        fill_c = cost.kv_capacity_tokens / fluid.nested_base_memory(seg, shape, self.prompt_len())
        n1 = (1 + self.slack) * solution.per_stage_total if solution.stable else fill_c
        return [max(1.0, min(n1, fill_c)) * r for r in shape]

    # -- batching --------------------------------------------------------------------------
    def entry_counts(self, q: WorkerQueues) -> list[int]:
        """Requests waiting at each segment's entry (segment 1: those awaiting prefill)."""
        group = q.groups[0]
        counts = [q.num_waiting]
        counts += [len(group.at_stage(b)) for b in self.bounds[:-1]]
        return counts

    def select(self, q: WorkerQueues, now: float) -> Batch:
        self.maybe_refresh(now)
        if self.relaxed(q):
            return self._batch(q, len(self.bounds), stage_cap=self.config.max_num_seqs)
        active = 0
        for count, need in zip(self.entry_counts(q), self.entry_needs):
            if count < max(need, 1 if active == 0 else 0):
                break
            active += 1
        return self._batch(q, active) if active else []

    def fallback(self, q: WorkerQueues, now: float) -> Batch:
        return self._batch(q, len(self.bounds))

    def _batch(self, q: WorkerQueues, active: int, stage_cap: int | None = None) -> Batch:
        """Segments 1..active, at most caps[k] (or stage_cap) requests at every stage of
        segment k, and at most caps[0] prefills."""
        batch: Batch = []
        last = len(self.bounds) - 1
        for stage, bucket in q.groups[0].stages.items():
            k = bisect_right(self.bounds, stage)
            if k > last:
                k = last
            if k < active:
                take_stage(bucket, stage_cap or self.caps[k], batch)
        take_prefills(q, None, self.caps[0], batch)
        return cap_to_seqs(batch, self.config.max_num_seqs)

    def describe(self) -> dict:
        return {
            "policy": self.name,
            "bounds": self.bounds,
            "thresholds": [round(t, 3) for t in self.thresholds],
            "budget": self.budget,
        }
