"""Nested WAIT (scheduler/SCHEDULING.md §4-5): segments of output length, thresholds, no length prediction.

Decoding is cut into segments at the output lengths o_1 < ... < o_m; requests classify
themselves as they decode (those still running at a boundary queue at the next segment's entry).
Thresholds n_1 > ... > n_m come from the fluid model of the estimated load (scheduler/segments.py).

Two modes (`policy_args: {"mode": ...}`):

- `paper`: the paper's rule exactly. Segments 1..k run for the largest k whose every entry queue
  holds at least its threshold, at most n_k' requests at each stage of segment k'; later segments
  pause (keeping their KV); with no segment open the server idles (the starvation guard bounds
  that). Thresholds meet conditions (1) and (2) and M^pi + buffer <= C, or are scaled to fit C
  with a FluidWarning. A fractional threshold is compared as a real number (0.4 opens with one
  request waiting, never with none) and caps a stage at ceil(n_k) requests.
- `production` (the default): every resident decodes each iteration (pausing a resident holds
  its KV without progress) within the token budget, and the fluid model decides admission
  instead: a request is admitted only while the KV the residents and it are expected to grow
  into fits the cache (`kv_admission`, scheduler/forecast.py, skipped while even the worst case
  fits: `low_load_bypass`). Optional: at most n_1 new requests per iteration (`admission_cap`,
  lifted below the estimated load `bypass_below_load`); pause rather than evict on overflow
  (`eviction: pause`). scheduler/SCHEDULING.md §5 says why; `describe()` lists the rules on.

Stages here count generated tokens: the prefill produces token 1, and a request in segment k
(k >= 2) has generated o_{k-1} .. o_k - 1 tokens; its entry queue is stage o_{k-1}.
"""
from __future__ import annotations

import math
import warnings
from bisect import bisect_right

from scheduler import segments
from scheduler.fluid import FluidWarning
from scheduler.forecast import KVForecast
from scheduler.policies.admission import ForecastAdmission
from scheduler.policies.base import Batch, decode_first
from scheduler.policies.threshold import (
    ThresholdPolicy,
    cap_to_seqs,
    continue_prefills,
    take_prefills,
    take_stage,
)
from scheduler.queues import WorkerQueues

MODES = ("production", "paper")


class NestedWaitPolicy(ThresholdPolicy):
    name = "nested-wait"

    def __init__(self, *args, mode: str = "production", num_segments: int = 10,
                 bounds: list[int] | None = None, kv_admission: bool = True,
                 low_load_bypass: bool = True, admission_cap: bool = False,
                 bypass_below_load: float = 0.5, z: float = 1.5,
                 horizon_s: float = segments.DEFAULT_HORIZON_S,
                 delta: float = segments.DEFAULT_DELTA,
                 eviction: str = "lifo", **kw) -> None:
        super().__init__(*args, **kw)
        if mode not in MODES:
            raise ValueError(f"unknown nested-wait mode {mode!r}; choose one of: {', '.join(MODES)}")
        if not 0.0 <= bypass_below_load <= 1.0:
            raise ValueError(f"bypass_below_load must be in [0, 1], got {bypass_below_load}")
        self.mode = mode
        self.may_idle = mode == "paper"  # production never holds work back on a threshold
        self.num_segments = num_segments
        self.fixed_bounds = sorted(set(bounds)) if bounds else None
        self.kv_admission, self.admission_cap = kv_admission, admission_cap
        self.low_load_bypass = low_load_bypass
        if eviction not in ("lifo", "pause"):
            raise ValueError(f"unknown eviction rule {eviction!r}; choose lifo or pause")
        self.eviction = eviction
        self.bypass_below_load, self.z = bypass_below_load, z
        self.horizon_s, self.delta = horizon_s, delta
        self.bounds: list[int] = self.fixed_bounds or [1]
        self.load = 0.0  # the fluid load of the estimated traffic (0 until it can be modelled)
        self.conditions_hold: bool | None = None
        self.forecast: KVForecast | None = None
        self.admissions_per_iteration: float | None = None
        self.pause_on_overflow = eviction == "pause"
        self._work_conserving(len(self.bounds))

    @property
    def thresholds(self) -> list[float]:
        return list(self._thresholds)

    # -- thresholds ------------------------------------------------------------------------
    def refresh(self, now: float) -> None:
        if self.lengths.count:
            self.forecast = KVForecast(self.lengths.sample(), self._block_size(), self.z)
        seg = self._segments(max(self.arrival_rate(now), 1e-9))
        if seg is None or self.cost is None:
            return  # neither lengths nor iteration costs known yet: stay work-conserving
        solution = self.fluid_solution(seg.rates[0])
        self.load = solution.solution.load
        self.iteration_time_s = solution.iteration_time_s if solution.stable else None
        with warnings.catch_warnings():
            # Live, the estimated load crosses its limits often; the verdict is kept instead.
            warnings.simplefilter("ignore", FluidWarning)
            result = segments.paper_thresholds(seg, self.prompt_len(), self._cost(), self.slack,
                                               self.budget, self.horizon_s, self.delta)
        self.bounds = list(seg.bounds)
        # The admission cap is the fluid's arrivals per iteration with slack (condition (1)
        # alone): memory is the forecast's business, a memory-scaled n_1 would throttle arrivals.
        self.admissions_per_iteration = (1 + self.slack) * solution.per_stage_total \
            if solution.stable else None
        self._thresholds = list(result.values)
        self.conditions_hold = result.conditions_hold
        self.caps = [max(1, math.ceil(t)) for t in result.values]

    def _work_conserving(self, num_segments: int) -> None:
        """Before the load can be modelled: every entry open, no per-stage cap (the batch
        limit still applies), so the server never holds work back on a guess."""
        self._thresholds = [0.0] * num_segments
        self.caps = [self.config.max_num_seqs] * num_segments

    def _block_size(self) -> int:
        return self.cost.block_size if self.cost else 16

    def _segments(self, rate: float) -> segments.Segments | None:
        if self.fixed_bounds is None:
            return self.lengths.segments(rate, self.num_segments) if self.lengths.count else None
        survival = self.lengths.survival(self.fixed_bounds) if self.lengths.count else []
        rates, reach = [], rate
        for k in range(len(self.fixed_bounds)):
            reach *= survival[k] if survival else 1.0
            rates.append(max(reach, 1e-9 * rate))
        return segments.Segments(list(self.fixed_bounds), rates)

    # -- batching --------------------------------------------------------------------------
    def select(self, q: WorkerQueues, now: float) -> Batch:
        self.maybe_refresh(now)
        if self.mode == "paper":
            return self._select_paper(q)
        limit = None
        n1 = self.admissions_per_iteration
        bypassed = self.low_load_bypass and self.load < self.bypass_below_load
        if self.admission_cap and n1 and not bypassed:
            limit = math.ceil(n1)  # whole requests, as the paper caps a stage at ceil(n_k)
        forecast = self.forecast if self.kv_admission else None
        return decode_first(q, self.config, self.config.max_num_batched_tokens,
                            ForecastAdmission(q, forecast, limit, self.low_load_bypass))

    def entry_counts(self, q: WorkerQueues) -> list[int]:
        """Requests waiting at each segment's entry (segment 1: those awaiting prefill)."""
        group = q.groups[0]
        return [q.num_waiting] + [len(group.at_stage(b)) for b in self.bounds[:-1]]

    def _select_paper(self, q: WorkerQueues) -> Batch:
        active = 0
        for count, need in zip(self.entry_counts(q), self._thresholds):
            # A real-valued threshold: 0.4 needs one request waiting; no gate opens on none.
            if count == 0 or count < need:
                break
            active += 1
        return self._batch(q, active) if active else self._continue_only(q)

    def fallback(self, q: WorkerQueues, now: float) -> Batch:
        return self._batch(q, len(self.bounds))

    def _continue_only(self, q: WorkerQueues) -> Batch:
        """With every gate shut, only admitted prefills continue (their KV is held already)."""
        batch: Batch = []
        continue_prefills(q, batch, self.config.max_num_batched_tokens)
        return batch

    def _batch(self, q: WorkerQueues, active: int) -> Batch:
        """Segments 1..active, at most caps[k] requests at every stage of segment k, and at most
        caps[0] new prefills, within the token budget."""
        batch: Batch = []
        last = len(self.bounds) - 1
        for stage, bucket in q.groups[0].stages.items():
            k = bisect_right(self.bounds, stage)
            k = min(k, last)
            if k < active:
                take_stage(bucket, self.caps[k], batch)
        budget = continue_prefills(q, batch, self.config.max_num_batched_tokens - len(batch))
        take_prefills(q, None, self.caps[0], batch, budget)
        return cap_to_seqs(batch, self.config.max_num_seqs)

    def describe(self) -> dict:
        out = {"policy": self.name, "mode": self.mode, "bounds": self.bounds,
               "thresholds": [round(t, 3) for t in self._thresholds], "budget": self.budget,
               "conditions_hold": self.conditions_hold,
               "max_num_batched_tokens": self.config.max_num_batched_tokens}
        if self.mode == "production":
            rules = ["every resident decodes each iteration", "chunked prefill within the token budget"]
            if self.kv_admission:
                rules.append(f"KV forecast admission (z = {self.z})")
            if self.low_load_bypass:
                rules.append("low-load bypass")
            if self.admission_cap:
                rules.append("at most n_1 admissions per iteration"
                             + (f" above load {self.bypass_below_load}" if self.low_load_bypass else ""))
            rules.append(f"{self.eviction} on overflow")
            out["deviations"] = rules
        return out
