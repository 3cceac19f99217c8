"""The fluid benchmark (scheduler/SCHEDULING.md §2) and the thresholds derived from it (§3, §4).

Two cost models (scheduler/SCHEDULING.md §1):
- "ours": tau = d0 + d_tok * new_tokens + d_kv * attended_kv. Over its life a type-j request
  costs c_j = d_tok (l_j + o_j) + d_kv o_j (l_j + (o_j + 1)/2) seconds of iteration time.
- "paper": tau = d0 + d1 * sum(l + s). A type-j request costs d1 * w_j, with
  w_j = (o_j + 1)(l_j + o_j/2) = sum_{s=0..o_j} (l_j + s).
With d_tok = d_kv = d1, ours is d1 (w_j + o_j): the two agree up to the lower-order d1 * o_j (one
decode step counted both as a new token and as an attended KV token), hence the `model` flag.

In both, load = sum_j lambda_j c_j, dT* = d0 / (1 - load), n_j* = lambda_j dT*,
M* = sum_j n_j* w_j (memory counts every resident KV token, whatever the cost model).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.cost import CostModel

MODELS = ("ours", "paper")


class FluidWarning(UserWarning):
    """Thresholds could not meet the paper's conditions (unstable load or C too small)."""


@dataclass(frozen=True)
class JobType:
    prompt_len: int
    output_len: int
    rate: float  # requests/s

    def __post_init__(self) -> None:
        if self.prompt_len < 0 or self.output_len < 1:
            raise ValueError(f"job type needs prompt_len >= 0 and output_len >= 1: {self}")
        if not (self.rate >= 0 and math.isfinite(self.rate)):
            raise ValueError(f"job type needs a finite rate >= 0: {self}")

    @property
    def kv_stages(self) -> float:
        """w_j: KV tokens summed over the request's o_j + 1 stages (scheduler/SCHEDULING.md §2)."""
        return (self.output_len + 1) * (self.prompt_len + self.output_len / 2)


@dataclass(frozen=True)
class FluidSolution:
    stable: bool
    load: float  # rho, the bracketed sum; stable iff load < 1
    iteration_time_s: float  # dT* (inf when unstable)
    per_stage: list[float]  # n_j* per type (requests per stage)
    memory_tokens: float  # M*
    throughput_tok_s: float  # sum_j lambda_j o_j (the demand; reachable only when stable)
    kv_capacity_tokens: int
    fits: bool  # M* <= C

    def message(self) -> str:
        """A one-line verdict on the load and the memory it needs."""
        cap = f"C = {self.kv_capacity_tokens:,}"
        if not self.stable:
            return (f"unstable, load {self.load:.3f} >= 1: latency grows without bound under any "
                    f"policy (demand {self.throughput_tok_s:,.0f} tok/s)")
        head = (f"stable, load {self.load:.3f}, dT* = {self.iteration_time_s * 1e3:.1f} ms, "
                f"M* = {self.memory_tokens:,.0f} tokens")
        if self.fits:
            return f"{head} <= {cap}, Throughput* = {self.throughput_tok_s:,.0f} tok/s"
        return f"{head} > {cap}: the load needs more KV memory than the cache has"


def check_model(cost: CostModel, model: str) -> None:
    if model not in MODELS:
        raise ValueError(f"unknown fluid model {model!r}; known: {', '.join(MODELS)}")
    if model == "paper" and not math.isclose(cost.d_tok, cost.d_kv, rel_tol=1e-9):
        raise ValueError("the paper's model needs d_tok == d_kv (use CostModel.paper(d0, d1))")


def _seconds_per_request(prompt_len: float, output_len: float, cost: CostModel, model: str) -> float:
    """Iteration time one request adds over its whole life (its share of the load per unit rate)."""
    if model == "paper":
        return cost.d_kv * (output_len + 1) * (prompt_len + output_len / 2)
    attended = output_len * (prompt_len + (output_len + 1) / 2)
    return cost.d_tok * (prompt_len + output_len) + cost.d_kv * attended


def solve(types: list[JobType], cost: CostModel, model: str = "ours") -> FluidSolution:
    """The fluid equilibrium of scheduler/SCHEDULING.md §2 for `types` under `cost`."""
    check_model(cost, model)
    if not types:
        raise ValueError("the fluid model needs at least one job type")
    load = sum(t.rate * _seconds_per_request(t.prompt_len, t.output_len, cost, model) for t in types)
    throughput = sum(t.rate * t.output_len for t in types)
    if load >= 1:
        inf = math.inf
        return FluidSolution(False, load, inf, [inf] * len(types), inf, throughput,
                             cost.kv_capacity_tokens, False)
    dt = cost.d0 / (1 - load)
    per_stage = [t.rate * dt for t in types]
    memory = sum(n * t.kv_stages for n, t in zip(per_stage, types))
    return FluidSolution(True, load, dt, per_stage, memory, throughput, cost.kv_capacity_tokens,
                         memory <= cost.kv_capacity_tokens)


@dataclass(frozen=True)
class RateLimits:
    """The two rates a load's total arrival rate must stay below (same mix of types)."""

    load: float  # the rate at which load = 1: past it latency grows without bound
    memory: float  # the rate at which M* = C: past it the fluid equilibrium does not fit the cache

    @property
    def tighter(self) -> float:
        return min(self.load, self.memory)


def rate_limits(types: list[JobType], cost: CostModel, model: str = "ours") -> RateLimits:
    """Both limits for the mix of `types` (their rates give the shares; the total is scaled).

    Per unit of total rate, load = c and M* = d0 W / (1 - lambda c), with c and W the rate-weighted
    mean cost and KV-stages of a request; so load < 1 iff lambda < 1 / c, and M* <= C iff
    lambda <= C / (d0 W + C c).
    """
    check_model(cost, model)
    total = sum(t.rate for t in types)
    if not types or total <= 0:
        raise ValueError("rate limits need at least one type with a positive rate")
    c = sum(t.rate * _seconds_per_request(t.prompt_len, t.output_len, cost, model) for t in types) / total
    w = sum(t.rate * t.kv_stages for t in types) / total
    capacity = cost.kv_capacity_tokens
    return RateLimits(load=1 / c, memory=capacity / (cost.d0 * w + capacity * c))


# --- WAIT (known lengths, scheduler/SCHEDULING.md §3) -------------------------------------------------


def _scale_to_memory(n: list[int], types: list[JobType], capacity: int) -> list[int]:
    """Shrink thresholds proportionally until M^pi = sum n_j w_j <= C (each stays >= 1)."""
    memory = sum(k * t.kv_stages for k, t in zip(n, types))
    if memory <= capacity:
        return n
    scaled = [max(1, math.floor(k * capacity / memory)) for k in n]
    if sum(k * t.kv_stages for k, t in zip(scaled, types)) > capacity:
        warnings.warn("even one request per stage of every type exceeds the KV capacity",
                      FluidWarning, stacklevel=3)
    return scaled


def wait_thresholds(types: list[JobType], cost: CostModel, slack: float = 0.1,
                    model: str = "ours") -> list[int]:
    """Integer WAIT thresholds just above n_j* that meet scheduler/SCHEDULING.md §3's condition.

    Condition: a full batch (n_j requests at every stage of every type) takes
    tau(n) = d0 + sum_j n_j c_j <= n_j / lambda_j (for the paper's model, d0 + d1 M^pi), so no
    more than n_j type-j requests arrive during one batch; and M^pi = sum_j n_j w_j <= C.
    When the load is unstable or C < M^pi, the thresholds are scaled down to fit C and a
    FluidWarning says why the condition cannot hold.
    """
    sol = solve(types, cost, model)
    cost_per = [_seconds_per_request(t.prompt_len, t.output_len, cost, model) for t in types]

    def thresholds(period: float) -> list[int]:
        return [max(1, math.ceil(t.rate * period - 1e-9)) for t in types]

    def batch_time(n: list[int]) -> float:
        return cost.d0 + sum(k * c for k, c in zip(n, cost_per))

    def met(n: list[int]) -> bool:
        tau = batch_time(n)
        return all(t.rate * tau <= k for k, t in zip(n, types))

    if not sol.stable:
        # No threshold keeps up; batch as much as memory allows (n_j proportional to lambda_j).
        warnings.warn(f"WAIT thresholds: {sol.message()}; using the largest that fit C",
                      FluidWarning, stacklevel=2)
        weight = sum(t.rate * t.kv_stages for t in types) or 1.0
        n = thresholds(cost.kv_capacity_tokens / weight)
        return _scale_to_memory(n, types, cost.kv_capacity_tokens)
    # n_j = ceil(lambda_j T) meets the condition for every T >= dT* up to rounding; raising T to
    # the batch time of the rounded thresholds converges (n only grows and is bounded).
    period = (1 + slack) * sol.iteration_time_s
    n = thresholds(period)
    for _ in range(10_000):
        if met(n):
            break
        period = max(period * (1 + 1e-9), batch_time(n))
        n = thresholds(period)
    memory = sum(k * t.kv_stages for k, t in zip(n, types))
    if memory > cost.kv_capacity_tokens:
        warnings.warn(f"WAIT thresholds need M^pi = {memory:,.0f} tokens > "
                      f"C = {cost.kv_capacity_tokens:,}; scaled down to fit C, so the "
                      "section 3 condition does not hold", FluidWarning, stacklevel=2)
        n = _scale_to_memory(n, types, cost.kv_capacity_tokens)
    return n


def wait_thresholds_from_budget(types: list[JobType], budget: float) -> list[int]:
    """The paper's practical WAIT setting: n_j = B rho_j / (o_j + 1), rho_j = lambda_j / sum lambda.

    Then sum_j n_j (o_j + 1) = B up to rounding (B is the total batch budget over types and stages).
    """
    if budget <= 0:
        raise ValueError(f"budget must be > 0, got {budget}")
    total = sum(t.rate for t in types)
    if total <= 0:
        raise ValueError("the types' rates sum to 0")
    return [max(1, round(budget * t.rate / total / (t.output_len + 1))) for t in types]


def types_from_sample(lengths: Sequence[int], rate: float, prompt_len: float) -> list[JobType]:
    """One job type per distinct output length of a sample, at its share of `rate`."""
    counts: dict[int, int] = {}
    for o in lengths:
        counts[int(o)] = counts.get(int(o), 0) + 1
    total = sum(counts.values())
    return [JobType(round(prompt_len), o, rate * c / total) for o, c in sorted(counts.items())]
