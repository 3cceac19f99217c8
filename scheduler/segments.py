"""Nested WAIT's segments and thresholds (scheduler/SCHEDULING.md §4).

Decoding is cut into segments at output lengths o_1 < ... < o_m; segment k serves the requests
that survive past o_{k-1}, at rate Lambda_k. Thresholds n_1 > ... > n_m are each segment's entry
threshold and per-stage cap. The paper's conditions on them:

    (1)  d0 + sum_k n_k c_k  <  n_1 / Lambda_1      (a full batch takes less time than it takes
                                                     n_1 requests to arrive)
    (2)  p_k  <  n_k / n_{k-1}  <  1                (p_k = Lambda_k / Lambda_{k-1}, survival)

and the memory the thresholds pin down, M^pi = sum_k n_k (l + s_bar_k) delta_k, plus a safety
buffer for the binomial swings of survivors, must fit the KV capacity C. `paper_thresholds`
returns thresholds meeting all three, or (when the load or C makes that impossible) the largest
that fit C, saying why.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.cost import CostModel
from scheduler.fluid import FluidWarning, check_model

DEFAULT_HORIZON_S = 3600.0  # the horizon T of the buffer's union bound
DEFAULT_DELTA = 0.05  # the buffer's overflow probability over that horizon


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
    """Segments at the L quantile bins of an output-length sample (scheduler/SCHEDULING.md §4, L ~ 10)."""
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
    """scheduler/SCHEDULING.md §4's practical thresholds: geometric decay with sum_k delta_k n_k = B.

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


def nested_base_memory(seg: Segments, thresholds: Sequence[float], prompt_len: float) -> float:
    """M^pi = sum_k n_k (l + s_bar_k) delta_k (scheduler/SCHEDULING.md §4)."""
    return sum(n * (prompt_len + s) * d
               for n, s, d in zip(thresholds, seg.mean_stages, seg.lengths))


def _theta(p: float, ratio: float) -> float:
    """The positive root of -theta n_k + n_(k-1) ln(1 - p + p e^theta) = 0, by bisection.

    Dividing by n_(k-1) shows it depends on the ratio n_k / n_(k-1) alone, so scaling every
    threshold by one factor leaves it unchanged (and the buffer affine in that factor)."""

    def f(theta: float) -> float:
        # ln(1 - p + p e^theta), written to neither overflow nor lose precision near 0.
        log_mgf = (math.log1p(p * math.expm1(theta)) if theta < 30
                   else theta + math.log(p + (1 - p) * math.exp(-theta)))
        return -theta * ratio + log_mgf

    lo, hi = 0.0, 1.0
    while f(hi) < 0:  # f < 0 just above 0 (ratio > p), convex, -> +inf (ratio < 1)
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

    scheduler/SCHEDULING.md §4: sum_{k>=2} (l + o_{k-1}) (n_k + ln(m (1 + T/d0) / delta) / theta_k), with
    T/d0 the number of iterations in the horizon. Needs p_k < n_k / n_{k-1} < 1 for every k >= 2.
    """
    return sum(_buffer_parts(seg, thresholds, prompt_len, horizon_s, d0, delta))


def _buffer_parts(seg: Segments, thresholds: Sequence[float], prompt_len: float,
                  horizon_s: float, d0: float, delta: float) -> tuple[float, float]:
    """The buffer as (the part linear in the thresholds, the part set by their ratios alone)."""
    if len(thresholds) != len(seg.bounds):
        raise ValueError("need one threshold per segment")
    if horizon_s <= 0 or d0 <= 0 or not 0 < delta < 1:
        raise ValueError("need horizon_s > 0, d0 > 0 and 0 < delta < 1")
    m = len(seg.bounds)
    log_term = math.log(m * (1 + horizon_s / d0) / delta)
    linear = fixed = 0.0
    for k in range(1, m):
        p, n_prev, n_k = seg.survival[k], thresholds[k - 1], thresholds[k]
        if not p * n_prev < n_k < n_prev:
            raise ValueError(f"segment {k + 1}: need p_k < n_k/n_(k-1) < 1, got p_k = {p:.3f}, "
                             f"ratio {n_k / n_prev:.3f}")
        linear += (prompt_len + seg.bounds[k - 1]) * n_k
        fixed += (prompt_len + seg.bounds[k - 1]) * log_term / _theta(p, n_k / n_prev)
    return linear, fixed


@dataclass(frozen=True)
class NestedThresholds:
    """Thresholds for one estimated load, with what they pin down and whether they are valid."""

    values: list[float]  # n_1 > ... > n_m (real numbers: see the policy for fractional ones)
    base_memory: float  # M^pi
    buffer: float  # the safety buffer above M^pi
    conditions_hold: bool  # (1), (2) and M^pi + buffer <= C all hold
    note: str = ""  # why they do not, when they do not

    @property
    def memory(self) -> float:
        return self.base_memory + self.buffer


def _shape(seg: Segments, costs: list[float]) -> tuple[list[float], float] | None:
    """Decay ratios meeting (2) for which (1) is reachable: the shape n_k / n_1 and
    A = sum_k shape_k c_k, with 1 / Lambda_1 > A. Smaller margins keep heavier loads feasible."""
    for margin in (0.05, 0.02, 0.01, 0.005, 0.001):
        shape = _geometric(seg, 1.0, margin)
        a = sum(r * c for r, c in zip(shape, costs))
        if a < 1 / seg.rates[0]:
            return shape, a
    return None


def paper_thresholds(seg: Segments, prompt_len: float, cost: CostModel, slack: float = 0.1,
                     budget: float | None = None, horizon_s: float = DEFAULT_HORIZON_S,
                     delta: float = DEFAULT_DELTA, model: str = "ours") -> NestedThresholds:
    """scheduler/SCHEDULING.md §4's thresholds, conditions (1) and (2) enforced and M^pi + buffer <= C.

    n_1 is (1 + slack) times the smallest n_1 meeting (1) (or, with `budget`, the paper's
    practical setting sum_k delta_k n_k = B, raised to meet (1)), lowered to fit C when needed.
    When no n_1 meets (1) within C, the largest thresholds that fit C are returned with
    conditions_hold False, and a FluidWarning says why.
    """
    check_model(cost, model)
    costs = _segment_costs(seg, prompt_len, cost, model)
    capacity = cost.kv_capacity_tokens
    found = _shape(seg, costs)
    shape = found[0] if found else _geometric(seg, 1.0)

    # M^pi and the buffer are affine in n_1 for a fixed shape (theta_k depends on the ratios
    # only): memory(n_1) = n_1 * slope + fixed, so the largest n_1 that fits C is exact.
    base_1 = nested_base_memory(seg, shape, prompt_len)
    linear_1, fixed = _buffer_parts(seg, shape, prompt_len, horizon_s, cost.d0, delta)

    no_buffer = fixed >= capacity  # the buffer alone exceeds C: keep within C without it

    def memory(n1: float) -> tuple[float, float]:
        return n1 * base_1, 0.0 if no_buffer else n1 * linear_1 + fixed

    n1_max = capacity / base_1 if no_buffer else (capacity - fixed) / (base_1 + linear_1)
    if no_buffer:
        note = (f"the safety buffer alone ({fixed:,.0f} tokens) exceeds C = {capacity:,}: "
                "thresholds fill C without it")
        return _finish(n1_max, shape, memory, False, note)
    if found is None:
        note = (f"no thresholds meet condition (1) at {seg.rates[0]:g} req/s: the load is beyond "
                "what a full batch can keep up with; using the largest that fit C")
        return _finish(n1_max, shape, memory, False, note)
    n1_min = cost.d0 / (1 / seg.rates[0] - found[1])  # (1) holds for every n_1 above this
    wanted = (1 + slack) * n1_min
    if budget is not None:
        if budget <= 0:
            raise ValueError(f"budget must be > 0, got {budget}")
        wanted = max(budget / sum(d * r for d, r in zip(seg.lengths, shape)), wanted)
    if wanted <= n1_max:
        return _finish(wanted, shape, memory, True)
    if n1_max > n1_min:  # less slack than asked for, but both conditions and C hold
        return _finish(n1_max, shape, memory, True)
    note = (f"M^pi + buffer at the smallest n_1 meeting condition (1) exceeds C = {capacity:,}: "
            "the load needs more KV than the cache has; scaled down to fit C")
    return _finish(n1_max, shape, memory, False, note)


def _finish(n1: float, shape: list[float], memory, holds: bool, note: str = "") -> NestedThresholds:
    if not holds:
        warnings.warn(f"nested thresholds: {note}", FluidWarning, stacklevel=3)
    base, buffer = memory(n1)
    return NestedThresholds([n1 * r for r in shape], base, buffer, holds, note)


def satisfies_conditions(seg: Segments, thresholds: Sequence[float], prompt_len: float,
                         cost: CostModel, model: str = "ours") -> bool:
    """Conditions (1) and (2) of the module docstring, checked directly."""
    costs = _segment_costs(seg, prompt_len, cost, model)
    n = list(thresholds)
    batch = cost.d0 + sum(k * c for k, c in zip(n, costs))
    ratios_ok = all(p * a < b < a for p, a, b in zip(seg.survival[1:], n, n[1:]))
    return batch < n[0] / seg.rates[0] and ratios_ok
