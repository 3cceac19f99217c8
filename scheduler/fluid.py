"""The fluid benchmark (PAPER.md section 2) and the thresholds derived from it (sections 3, 4).

Two cost models (PAPER.md section 1):
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
        """w_j: KV tokens summed over the request's o_j + 1 stages (PAPER.md section 2)."""
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


def _check_model(cost: CostModel, model: str) -> None:
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
    """The fluid equilibrium of PAPER.md section 2 for `types` under `cost`."""
    _check_model(cost, model)
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


# --- WAIT (known lengths, PAPER.md section 3) -------------------------------------------------


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
    """Integer WAIT thresholds just above n_j* that meet PAPER.md section 3's condition.

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


# --- Nested WAIT (unknown lengths, PAPER.md section 4) ----------------------------------------


@dataclass(frozen=True)
class Segments:
    bounds: list[int]  # o_1 < ... < o_m; segment 1 = stages 0..o_1, segment k = o_{k-1}+1..o_k
    rates: list[float]  # Lambda_k: rate of requests reaching segment k (Lambda_1 = total rate)

    def __post_init__(self) -> None:
        if not self.bounds or len(self.bounds) != len(self.rates):
            raise ValueError("segments need as many rates as bounds, at least one")
        if self.bounds[0] < 1 or any(a >= b for a, b in zip(self.bounds, self.bounds[1:])):
            raise ValueError(f"segment bounds must be >= 1 and strictly increasing: {self.bounds}")
        if self.rates[-1] <= 0 or any(a < b for a, b in zip(self.rates, self.rates[1:])):
            raise ValueError(f"segment rates must be > 0 and non-increasing: {self.rates}")

    @property
    def lengths(self) -> list[int]:
        """delta_k: stages in segment k (o_1 + 1 for the first, which includes the prefill)."""
        return [self.bounds[0] + 1] + [b - a for a, b in zip(self.bounds, self.bounds[1:])]

    @property
    def mean_stages(self) -> list[float]:
        """s_bar_k: the mean stage of segment k (o_1/2, then (o_{k-1} + 1 + o_k)/2)."""
        return [self.bounds[0] / 2] + [(a + 1 + b) / 2 for a, b in zip(self.bounds, self.bounds[1:])]

    @property
    def survival(self) -> list[float]:
        """p_k = Lambda_k / Lambda_{k-1}: survival past boundary k-1 (p_1 = 1 by convention)."""
        return [1.0] + [b / a for a, b in zip(self.rates, self.rates[1:])]


def quantile_bounds(lengths: Sequence[int], num_bins: int) -> list[int]:
    """Upper edges of `num_bins` empirical quantile bins of `lengths`, deduplicated (<= num_bins).

    Edge k is the smallest length with at least k/num_bins of the sample at or below it, so every
    bin holds at least one sample and the last edge is the maximum.
    """
    if num_bins < 1:
        raise ValueError(f"need at least one bin, got {num_bins}")
    data = sorted(lengths)
    if not data:
        raise ValueError("no lengths to bin")
    n = len(data)
    edges = (data[max(0, math.ceil(k * n / num_bins) - 1)] for k in range(1, num_bins + 1))
    return sorted({int(e) for e in edges})


def segments_from_types(output_lens: list[int], rates: list[float]) -> Segments:
    """Segments at the distinct output lengths of known types (equal lengths merge)."""
    if len(output_lens) != len(rates):
        raise ValueError("need one rate per output length")
    by_len: dict[int, float] = {}
    for o, r in zip(output_lens, rates):
        if r < 0:
            raise ValueError(f"negative rate {r}")
        if r > 0:  # a type that never arrives adds no segment
            by_len[int(o)] = by_len.get(int(o), 0.0) + r
    bounds = sorted(by_len)
    if not bounds:
        raise ValueError("no type has a positive rate")
    rates_reaching = [sum(by_len[b] for b in bounds[k:]) for k in range(len(bounds))]
    return Segments(bounds, rates_reaching)


def segments_from_lengths(lengths: Sequence[int], rate: float, num_segments: int) -> Segments:
    """Segments at the L quantile bins of an output-length sample (PAPER.md section 4, L ~ 10)."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    data = sorted(max(1, int(x)) for x in lengths)  # a 0-token answer still had a prefill token
    bounds = quantile_bounds(data, num_segments)
    n = len(data)
    rates, i = [rate], 0
    for b in bounds[:-1]:  # Lambda_{k+1} = rate * P(o > o_k)
        while i < n and data[i] <= b:
            i += 1
        rates.append(rate * (n - i) / n)
    return Segments(bounds, rates)


def _decay_ratios(seg: Segments, margin: float = 0.05) -> list[float]:
    """n_k / n_{k-1} = min(p_k + margin, 0.99) for k >= 2 (the paper's q, indexed so that
    p_k < ratio < 1 as section 4 requires; halfway to 1 where p_k >= 0.99)."""
    ratios = []
    for p in seg.survival[1:]:
        q = min(p + margin, 0.99)
        ratios.append(q if q > p else (1 + p) / 2)
    return ratios


def _geometric(seg: Segments, n1: float, margin: float = 0.05) -> list[float]:
    out = [n1]
    for q in _decay_ratios(seg, margin):
        out.append(out[-1] * q)
    return out


def nested_thresholds_from_budget(seg: Segments, budget: float) -> list[float]:
    """PAPER.md section 4's practical thresholds: geometric decay with sum_k delta_k n_k = B.

    n_1 is floored at 1 (then the sum exceeds a budget too small for one request per stage).
    """
    if budget <= 0:
        raise ValueError(f"budget must be > 0, got {budget}")
    shape = _geometric(seg, 1.0)
    n1 = max(1.0, budget / sum(d * r for d, r in zip(seg.lengths, shape)))
    return [n1 * r for r in shape]


def _segment_costs(seg: Segments, prompt_len: float, cost: CostModel, model: str) -> list[float]:
    """Seconds one request per stage of segment k adds to a batch (the c_k of section 4)."""
    out = []
    prev = -1
    for b in seg.bounds:
        first, last = prev + 1, b  # stages first..last
        if model == "paper":
            out.append(cost.d_kv * _sum_kv(prompt_len, first, last))
        else:
            decode_first = max(first, 1)
            new = (prompt_len if first == 0 else 0) + (last - decode_first + 1)
            out.append(cost.d_tok * new + cost.d_kv * _sum_kv(prompt_len, decode_first, last))
        prev = b
    return out


def _sum_kv(prompt_len: float, first: int, last: int) -> float:
    """sum_{s=first..last} (l + s): KV tokens of one request per stage over stages first..last."""
    count = last - first + 1
    return count * (prompt_len + (first + last) / 2) if count > 0 else 0.0


def nested_thresholds_fluid(seg: Segments, prompt_len: float, cost: CostModel,
                            slack: float = 0.1, model: str = "ours") -> list[float]:
    """Nested WAIT thresholds from the fluid model: n_1 just above Lambda_1 dT*, geometric decay.

    n_1 is (1 + slack) times the smallest n_1 meeting section 4's condition
    d0 + sum_k n_k c_k < n_1 / Lambda_1 (which is Lambda_1 dT* when the ratios equal p_k), then
    everything is capped so the base memory M^pi <= C. A FluidWarning says when the condition
    cannot hold (unstable load, or C too small).
    """
    _check_model(cost, model)
    costs = _segment_costs(seg, prompt_len, cost, model)
    lam1 = seg.rates[0]
    n = None
    # A smaller decay margin keeps heavy but stable loads feasible (ratios closer to p_k).
    for margin in (0.05, 0.02, 0.01, 0.005, 0.001):
        shape = _geometric(seg, 1.0, margin)
        denom = 1 - lam1 * sum(r * c for r, c in zip(shape, costs))
        if denom > 0:
            n = [max(1.0, (1 + slack) * lam1 * cost.d0 / denom) * r for r in shape]
            break
    capacity = cost.kv_capacity_tokens
    if n is None:
        warnings.warn(f"nested thresholds: at rate {lam1:g}/s no geometric thresholds meet the "
                      "section 4 condition (each request counted to its segment's end); "
                      "using the largest that fit C", FluidWarning,
                      stacklevel=2)
        shape = _geometric(seg, 1.0)
        return [capacity / nested_base_memory(seg, shape, prompt_len) * r for r in shape]
    memory = nested_base_memory(seg, n, prompt_len)
    if memory > capacity:
        warnings.warn(f"nested thresholds need M^pi = {memory:,.0f} tokens > C = {capacity:,}; "
                      "scaled down to fit C, so the section 4 condition does not hold",
                      FluidWarning, stacklevel=2)
        n = [k * capacity / memory for k in n]
    return n


def nested_base_memory(seg: Segments, thresholds: Sequence[float], prompt_len: float) -> float:
    """M^pi = sum_k n_k (l + s_bar_k) delta_k (PAPER.md section 4)."""
    return sum(n * (prompt_len + s) * d
               for n, s, d in zip(thresholds, seg.mean_stages, seg.lengths))


def _theta(p: float, n_prev: float, n_k: float) -> float:
    """The positive root of -theta n_k + n_prev ln(1 - p + p e^theta) = 0, by bisection."""

    def f(theta: float) -> float:
        # ln(1 - p + p e^theta), written to neither overflow nor lose precision near 0.
        log_mgf = (math.log1p(p * math.expm1(theta)) if theta < 30
                   else theta + math.log(p + (1 - p) * math.exp(-theta)))
        return -theta * n_k + n_prev * log_mgf

    lo, hi = 0.0, 1.0
    while f(hi) < 0:  # f < 0 just above 0 (n_k > p n_prev), convex, -> +inf (n_prev > n_k)
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


def nested_safety_buffer(seg: Segments, thresholds: Sequence[float], prompt_len: float,
                         horizon_s: float, d0: float, delta: float = 0.05) -> float:
    """KV tokens to keep above M^pi so survivors' binomial swings overflow w.p. <= delta.

    PAPER.md section 4: sum_{k>=2} (l + o_{k-1}) (n_k + ln(m (1 + T/d0) / delta) / theta_k), with
    T/d0 the number of iterations in the horizon. Needs p_k < n_k / n_{k-1} < 1 for every k >= 2.
    """
    if len(thresholds) != len(seg.bounds):
        raise ValueError("need one threshold per segment")
    if horizon_s <= 0 or d0 <= 0 or not 0 < delta < 1:
        raise ValueError("need horizon_s > 0, d0 > 0 and 0 < delta < 1")
    m = len(seg.bounds)
    log_term = math.log(m * (1 + horizon_s / d0) / delta)
    buffer = 0.0
    for k in range(1, m):
        p, n_prev, n_k = seg.survival[k], thresholds[k - 1], thresholds[k]
        if not p * n_prev < n_k < n_prev:
            raise ValueError(f"segment {k + 1}: need p_k < n_k/n_(k-1) < 1, got p_k = {p:.3f}, "
                             f"ratio {n_k / n_prev:.3f}")
        buffer += (prompt_len + seg.bounds[k - 1]) * (n_k + log_term / _theta(p, n_prev, n_k))
    return buffer


def geometric_thresholds(seg: Segments, n1: float) -> list[float]:
    """n_1, then n_k = n_{k-1} * min(p_k + 0.05, 0.99): the paper's practical decay (section 4)."""
    return _geometric(seg, n1)


def types_from_sample(lengths: Sequence[int], rate: float, prompt_len: float) -> list[JobType]:
    """One job type per distinct output length of a sample, at its share of `rate`."""
    counts: dict[int, int] = {}
    for o in lengths:
        counts[int(o)] = counts.get(int(o), 0) + 1
    total = sum(counts.values())
    return [JobType(round(prompt_len), o, rate * c / total) for o, c in sorted(counts.items())]
