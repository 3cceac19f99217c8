"""What WAIT and Nested WAIT share: per-stage caps, the starvation guard, online refresh.

Both policies hold work back until enough requests wait to fill a batch (their thresholds).
That is what makes them throughput-optimal in heavy traffic, and what could stall a request
forever at low load; the guard (scheduler/SCHEDULING.md §5) runs a work-conserving batch once the
server has idled `max_idle_s` with work waiting. In heavy traffic thresholds are met, so the
guard does not fire.

Both honour the engine's token budget: a prefill longer than what is left of
`max_num_batched_tokens` is chunked and continues first thing in the next iteration (an
admitted prefill always continues, whatever the gates say, so it never strands its KV).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

from scheduler import fluid
from scheduler.cost import CostModel
from scheduler.estimator import LengthEstimator, RateEstimator
from scheduler.policies.base import Batch, Policy, PolicyConfig, WorkloadHint
from scheduler.queues import WorkerQueues
from scheduler.request import Request

DEFAULT_MAX_IDLE_S = 0.05


@dataclass(frozen=True)
class FluidSummary:
    stable: bool
    iteration_time_s: float
    per_stage_total: float  # Lambda_1 dT*: requests per stage entering segment 1
    solution: fluid.FluidSolution


class ThresholdPolicy(Policy):
    may_idle = True

    def __init__(
        self,
        config: PolicyConfig | None = None,
        cost: CostModel | None = None,
        hint: WorkloadHint | None = None,
        budget: float | None = None,
        kv_capacity_tokens: int | None = None,
        max_idle_s: float | None = None,
        refresh_s: float = 2.0,
        slack: float = 0.1,
    ) -> None:
        super().__init__(config)
        self.cost = cost
        self.hint = hint or WorkloadHint()
        self.budget = budget
        self.kv_capacity_tokens = kv_capacity_tokens or (cost.kv_capacity_tokens if cost else None)
        self._max_idle_s = max_idle_s
        self.refresh_s = refresh_s
        self.slack = slack
        self.rates = RateEstimator()
        self.lengths = LengthEstimator(prior=prior_sample(self.hint))
        self._prompt_mean = float(self.hint.prompt_len or 0.0)
        self._prompt_count = 0
        self._next_refresh = float("-inf")
        self.iteration_time_s: float | None = None  # the fluid dT*, when known
        self.last_arrival = float("-inf")

    # -- online estimates ------------------------------------------------------------------
    def on_arrival(self, req: Request, now: float) -> None:
        self.rates.observe(now)
        self.last_arrival = now
        if self.hint.prompt_len is None:
            self._prompt_count += 1
            self._prompt_mean += (req.prompt_len - self._prompt_mean) / self._prompt_count

    def on_finish(self, req: Request, now: float) -> None:
        self.lengths.observe(req.num_generated)

    def set_cost(self, cost: CostModel) -> None:
        """A new (e.g. online-fitted) cost model; thresholds follow at the next refresh."""
        self.cost = cost
        self._next_refresh = float("-inf")

    def arrival_rate(self, now: float) -> float:
        """Arrivals per second at one model actor."""
        total = self.hint.rate if self.hint.rate else self.rates.rate(now)
        return total / max(1, self.config.num_workers)

    def prompt_len(self) -> float:
        return max(1.0, self._prompt_mean)

    def maybe_refresh(self, now: float) -> None:
        if now >= self._next_refresh:
            self._next_refresh = now + self.refresh_s
            self.refresh(now)

    def refresh(self, now: float) -> None:
        """Recompute thresholds from the current estimates."""

    def _cost(self) -> CostModel:
        """The cost model with this actor's KV capacity (thresholds must fit this cache)."""
        if self.kv_capacity_tokens and self.cost.kv_capacity_tokens != self.kv_capacity_tokens:
            return replace(self.cost, kv_capacity_tokens=self.kv_capacity_tokens)
        return self.cost

    def fluid_solution(self, rate: float) -> FluidSummary:
        """The fluid equilibrium of the estimated load (exact over the length sample)."""
        types = fluid.types_from_sample(self.lengths.sample(), rate, self.prompt_len())
        solution = fluid.solve(types, self._cost())
        per_stage = sum(solution.per_stage) if solution.stable else float("inf")
        return FluidSummary(solution.stable, solution.iteration_time_s, per_stage, solution)

    # -- the guard -------------------------------------------------------------------------
    def wake_time(self, q: WorkerQueues) -> float:
        """Run anyway after idling max_idle_s, or at once when arrivals have paused (no arrival
        for a few mean inter-arrival times): then no threshold fills soon, and holding work
        back only adds latency (this is what drains the tail of a burst quickly)."""
        rate = self.arrival_rate(self.last_arrival) if self.last_arrival > float("-inf") else 0.0
        paused = self.last_arrival + (3.0 / rate if rate > 0 else 0.0)
        return min(q.idle_since + self.max_idle_s(), max(paused, q.idle_since))

    def max_idle_s(self) -> float:
        if self._max_idle_s is not None:
            return self._max_idle_s
        if self.iteration_time_s is not None:
            # A couple of fluid iterations: long enough for arrivals to fill a threshold in
            # heavy traffic, short enough to be invisible at low load.
            # Capped: near saturation dT* grows without bound, and so would every idle.
            cap = 10 * self.cost.d0 if self.cost and self.cost.d0 > 0 else DEFAULT_MAX_IDLE_S
            return min(max(2.0 * self.iteration_time_s, 1e-3), cap)
        return DEFAULT_MAX_IDLE_S


def prior_sample(hint: WorkloadHint, size: int = 2000) -> list[int]:
    """A sample of output lengths drawn to the hint's weights (deterministic), to seed estimates."""
    if not hint.output_lens:
        return []
    if not hint.output_weights:
        return list(hint.output_lens)
    sample: list[int] = []
    for length, weight in zip(hint.output_lens, hint.output_weights):
        sample += [length] * max(1, round(weight * size))
    # Shuffled: real observations push the oldest out of the window, which must not be
    # all the short (or all the long) lengths.
    random.Random(0).shuffle(sample)
    return sample


def continue_prefills(q: WorkerQueues, batch: Batch, budget: int) -> int:
    """Append every unfinished (chunked) prefill, within `budget` new tokens; returns the rest."""
    for req in q.prefilling.values():
        if budget <= 0:
            break
        n = min(budget, req.prefill_target - req.num_computed_tokens)
        batch.append((req, n))
        budget -= n
    return budget


def take_prefills(q: WorkerQueues, group: int | None, cap: float, batch: Batch, budget: int) -> int:
    """Append up to `cap` requests that wait for prefill (evicted first; a fractional cap admits
    whole requests below it), chunked to `budget` new tokens; returns what is left of it."""
    taken = 0
    for req in q.waiting_in_order(group):
        if taken >= cap or budget <= 0:
            break
        if group is not None and req.group != group:
            continue  # an evicted request of another type
        n = min(budget, req.prefill_target)
        batch.append((req, n))
        budget -= n
        taken += 1
    return budget


def take_stage(bucket: dict[str, Request], cap: int, batch: Batch) -> None:
    """Append the `cap` oldest decoders of one stage."""
    for i, req in enumerate(bucket.values()):
        if i >= cap:
            return
        batch.append((req, 1))


def cap_to_seqs(batch: Batch, max_num_seqs: int) -> Batch:
    """Keep decodes before prefills when the batch exceeds the sequence limit."""
    if len(batch) <= max_num_seqs:
        return batch
    decodes: Batch = []
    prefills: Batch = []
    for item in batch:
        (prefills if item[0].in_prefill else decodes).append(item)
    return (decodes + prefills)[:max_num_seqs]
