"""The fluid benchmark and thresholds against hand-computed values (scheduler/SCHEDULING.md §2-4)."""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.cost import CostModel, preset
from scheduler.fluid import (
    FluidWarning,
    JobType,
    rate_limits,
    solve,
    wait_thresholds,
    wait_thresholds_from_budget,
)
from scheduler.segments import (
    Segments,
    nested_safety_buffer,
    nested_thresholds_from_budget,
    paper_thresholds,
    quantile_bounds,
    satisfies_conditions,
    segments_from_lengths,
    segments_from_types,
)

A100 = preset("a100-llama2-7b")  # d0 = 8 ms, d_tok = 7e-5 s, d_kv = 3e-7 s, C = 137,000


def hand_ours(l: int, o: int, lam: float, c: CostModel) -> tuple[float, float, float, float]:
    """scheduler/SCHEDULING.md §2, our cost model, written out for one type."""
    load = lam * (c.d_tok * (l + o) + c.d_kv * o * (l + (o + 1) / 2))
    dt = c.d0 / (1 - load)
    n = lam * dt
    return load, dt, n, n * (o + 1) * (l + o / 2)


def test_p512d20_at_22_matches_hand_computation():
    sol = solve([JobType(512, 20, 22.0)], A100)
    # load = 22 * (7e-5 * 532 + 3e-7 * 20 * 522.5) = 22 * 0.040375 = 0.88825
    assert sol.load == pytest.approx(0.88825)
    assert sol.iteration_time_s == pytest.approx(0.008 / (1 - 0.88825))  # 71.6 ms
    assert sol.per_stage[0] == pytest.approx(22 * 0.008 / 0.11175)  # 1.575 requests per stage
    assert sol.memory_tokens == pytest.approx(22 * 0.008 / 0.11175 * 21 * 522)  # 17,265 tokens
    assert sol.throughput_tok_s == pytest.approx(440.0)
    assert sol.stable and sol.fits and sol.kv_capacity_tokens == 137_000
    assert (sol.load, sol.iteration_time_s, sol.per_stage[0], sol.memory_tokens) == pytest.approx(
        hand_ours(512, 20, 22.0, A100))
    assert sol.message().startswith("stable, load 0.888") and "<= C = 137,000" in sol.message()


def test_p512d20_at_23_is_heavier_but_stable():
    sol = solve([JobType(512, 20, 23.0)], A100)
    assert (sol.load, sol.iteration_time_s, sol.per_stage[0], sol.memory_tokens) == pytest.approx(
        hand_ours(512, 20, 23.0, A100))
    assert sol.load == pytest.approx(0.928625) and sol.stable and sol.fits


def test_papers_model_hand_computed():
    d1 = 3.5e-6
    cost = CostModel.paper(d0=0.008, d1=d1)
    w = 21 * (512 + 20 / 2)  # (o + 1)(l + o/2) = 10,962
    rho = d1 * 22 * w
    sol = solve([JobType(512, 20, 22.0)], cost, model="paper")
    assert sol.load == pytest.approx(rho)
    assert sol.iteration_time_s == pytest.approx(0.008 / (1 - rho))
    assert sol.per_stage[0] == pytest.approx(22 * 0.008 / (1 - rho))
    assert sol.memory_tokens == pytest.approx(0.008 * 22 * w / (1 - rho))


def test_ours_reduces_to_papers_up_to_first_order():
    # With d_tok = d_kv = d1, ours = d1 * sum lambda_j (w_j + o_j): the paper's plus d1 sum lambda o.
    d1 = 3.5e-6
    cost = CostModel.paper(d0=0.008, d1=d1)
    types = [JobType(512, 20, 15.0), JobType(100, 300, 2.0)]
    ours, paper = solve(types, cost, "ours"), solve(types, cost, "paper")
    assert ours.load - paper.load == pytest.approx(d1 * (15 * 20 + 2 * 300))
    assert (ours.load - paper.load) / paper.load < 0.02


def test_papers_model_needs_one_slope_and_known_model():
    with pytest.raises(ValueError, match="d_tok == d_kv"):
        solve([JobType(512, 20, 1.0)], A100, model="paper")
    with pytest.raises(ValueError, match="unknown fluid model"):
        solve([JobType(512, 20, 1.0)], A100, model="vidur")


def test_stability_flips_where_load_crosses_one():
    per_request = A100.d_tok * 532 + A100.d_kv * 20 * 522.5
    edge = 1 / per_request  # about 24.77 req/s
    below = solve([JobType(512, 20, edge * 0.999)], A100)
    above = solve([JobType(512, 20, edge * 1.001)], A100)
    assert below.stable and below.load < 1 and math.isfinite(below.iteration_time_s)
    assert not above.stable and above.load > 1
    assert above.iteration_time_s == math.inf and above.memory_tokens == math.inf
    assert not above.fits and above.message().startswith("unstable")


def test_memory_bound_verdict():
    small = CostModel(d0=8e-3, d_tok=7e-5, d_kv=3e-7, kv_capacity_tokens=10_000)
    sol = solve([JobType(512, 20, 22.0)], small)
    assert sol.stable and not sol.fits and "> C = 10,000" in sol.message()


@pytest.mark.parametrize("rate", [1.0, 5.0, 15.0, 20.0])
def test_wait_thresholds_meet_section3_condition(rate):
    types = [JobType(512, 20, rate * 0.7), JobType(512, 50, rate * 0.3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        n = wait_thresholds(types, A100)
    per = [A100.d_tok * (t.prompt_len + t.output_len)
           + A100.d_kv * t.output_len * (t.prompt_len + (t.output_len + 1) / 2) for t in types]
    tau = A100.d0 + sum(k * c for k, c in zip(n, per))  # a full WAIT batch
    sol = solve(types, A100)
    assert all(isinstance(k, int) and k >= 1 for k in n)
    assert all(tau <= k / t.rate for k, t in zip(n, types))
    memory = sum(k * t.kv_stages for k, t in zip(n, types))
    assert sol.memory_tokens <= memory <= A100.kv_capacity_tokens
    assert all(k >= s for k, s in zip(n, sol.per_stage))  # just above n_j*


@pytest.mark.parametrize("rate, expected", [(22.0, 2), (23.0, 3)])
def test_wait_thresholds_p512d20(rate, expected):
    (n,) = wait_thresholds([JobType(512, 20, rate)], A100)
    assert n == expected  # n* = 1.57 and 2.58, rounded up
    assert A100.d0 + n * (A100.d_tok * 532 + A100.d_kv * 20 * 522.5) <= n / rate


def test_wait_thresholds_near_saturation_round_up_past_memory():
    # 70/30 p512d20/p512d50 at 22 req/s: load 0.935, so the integer rounding of small n_j is
    # amplified by 1/(1 - load) and the least integer solution needs more than C.
    types = [JobType(512, 20, 15.4), JobType(512, 50, 6.6)]
    with pytest.warns(FluidWarning, match="scaled down"):
        n = wait_thresholds(types, A100)
    memory = sum(k * t.kv_stages for k, t in zip(n, types))
    assert solve(types, A100).memory_tokens < memory <= A100.kv_capacity_tokens


def test_wait_thresholds_papers_model_condition():
    cost = CostModel.paper(d0=0.008, d1=3.5e-6)
    types = [JobType(512, 20, 22.0)]
    (n,) = wait_thresholds(types, cost, model="paper")
    assert cost.d0 + cost.d_kv * n * types[0].kv_stages <= n / 22.0


def test_wait_thresholds_scale_down_when_unstable_or_too_big():
    with pytest.warns(FluidWarning, match="unstable"):
        n = wait_thresholds([JobType(512, 20, 30.0)], A100)
    assert n[0] * 21 * 522 <= A100.kv_capacity_tokens
    small = CostModel(d0=8e-3, d_tok=7e-5, d_kv=3e-7, kv_capacity_tokens=30_000)
    with pytest.warns(FluidWarning, match="scaled down"):
        n = wait_thresholds([JobType(512, 20, 24.5)], small)
    assert 1 <= n[0] * 21 * 522 <= 30_000


def test_wait_thresholds_from_budget_sum_to_budget():
    types = [JobType(512, 20, 15.4), JobType(512, 50, 6.6)]
    n = wait_thresholds_from_budget(types, 400)
    assert n == [round(400 * 0.7 / 21), round(400 * 0.3 / 51)]
    assert abs(sum(k * (t.output_len + 1) for k, t in zip(n, types)) - 400) <= sum(
        (t.output_len + 1) / 2 for t in types)
    assert wait_thresholds_from_budget(types, 1) == [1, 1]


def test_segments_from_types_and_lengths():
    seg = segments_from_types([50, 20, 20], [3.0, 10.0, 5.0])
    assert seg.bounds == [20, 50] and seg.rates == [18.0, 3.0]
    assert seg.lengths == [21, 30] and seg.survival == pytest.approx([1.0, 3 / 18])
    assert seg.mean_stages == [10.0, (21 + 50) / 2]
    lengths = list(range(1, 101))
    seg = segments_from_lengths(lengths, 10.0, 4)
    assert seg.bounds == [25, 50, 75, 100]
    assert seg.rates == pytest.approx([10.0, 7.5, 5.0, 2.5])
    assert quantile_bounds([5] * 10 + [9], 4) == [5, 9]  # ties collapse bins
    with pytest.raises(ValueError):
        Segments([20, 20], [1.0, 0.5])


def test_nested_budget_thresholds_decrease_and_sum_to_budget():
    seg = segments_from_lengths(list(range(1, 501)), 40.0, 10)
    n = nested_thresholds_from_budget(seg, 1000.0)
    assert all(a > b for a, b in itertools.pairwise(n)) and n[0] >= 1
    assert sum(d * k for d, k in zip(seg.lengths, n)) == pytest.approx(1000.0)
    p = seg.survival
    for k in range(1, len(n)):
        assert n[k] / n[k - 1] == pytest.approx(min(p[k] + 0.05, 0.99))
        assert p[k] < n[k] / n[k - 1] < 1
    # A budget too small for one request per stage floors n_1 at 1.
    assert nested_thresholds_from_budget(seg, 5.0)[0] == 1.0


def test_paper_thresholds_meet_section4_conditions():
    # 70% p512d20 + 30% p512d50 at 22 req/s (the paper's mixed experiment).
    seg = segments_from_types([20, 50], [15.4, 6.6])
    t = paper_thresholds(seg, 512, A100)
    n = t.values
    assert t.conditions_hold and n[0] > n[1]
    assert n[0] > seg.rates[0] * solve([JobType(512, 20, 15.4), JobType(512, 50, 6.6)],
                                       A100).iteration_time_s
    assert seg.survival[1] < n[1] / n[0] < 1
    # Full batch: segment 1 = prefill + 20 decodes, segment 2 = 30 decodes at stages 21..50.
    seg1 = A100.d_tok * (512 + 20) + A100.d_kv * 20 * (512 + 21 / 2)
    seg2 = A100.d_tok * 30 + A100.d_kv * 30 * (512 + (21 + 50) / 2)
    assert A100.d0 + n[0] * seg1 + n[1] * seg2 < n[0] / seg.rates[0]
    assert t.base_memory == pytest.approx(n[0] * 21 * (512 + 10) + n[1] * 30 * (512 + 35.5))
    assert t.buffer == pytest.approx(nested_safety_buffer(seg, n, 512, 3600, A100.d0))
    assert t.memory <= A100.kv_capacity_tokens


def test_paper_thresholds_scaled_to_fit_c_say_why():
    small = replace(A100, kv_capacity_tokens=20_000)
    seg = segments_from_types([20, 50], [16.1, 6.9])
    with pytest.warns(FluidWarning, match="exceeds C"):
        t = paper_thresholds(seg, 512, small)
    assert not t.conditions_hold and "exceeds C" in t.note
    assert t.memory == pytest.approx(20_000, rel=1e-6)
    assert t.values[0] > t.values[1]


def test_paper_thresholds_can_be_fractional_and_are_not_floored():
    # p512d200 at 30k tokens: n_1 well below one request per stage (M^pi must fit C).
    seg = segments_from_types([200], [6.0])
    t = paper_thresholds(seg, 512, replace(A100, kv_capacity_tokens=30_000))
    assert 0 < t.values[0] < 1 and t.conditions_hold
    assert t.memory <= 30_000


@st.composite
def threshold_cases(draw):
    """Random segments (decreasing survivors), prompt length, load and KV capacity."""
    m = draw(st.integers(1, 6))
    bounds = sorted(draw(st.sets(st.integers(1, 800), min_size=m, max_size=m)))
    rate = draw(st.floats(0.1, 60.0))
    survival = draw(st.lists(st.floats(0.05, 0.98), min_size=m - 1, max_size=m - 1))
    rates = [rate]
    for p in survival:
        rates.append(rates[-1] * p)
    cost = replace(A100, kv_capacity_tokens=draw(st.integers(2_000, 400_000)))
    return Segments(bounds, rates), draw(st.floats(1.0, 2000.0)), cost, draw(st.sampled_from([None, 50.0, 2000.0]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=threshold_cases())
def test_every_threshold_set_satisfies_the_conditions_or_says_so(case):
    """Whatever the load and C: thresholds decrease with p_k < n_k / n_(k-1) < 1, never need
    more than C (base memory plus buffer), and when they claim the conditions hold, (1) and (2)
    hold as checked directly."""
    seg, prompt, cost, budget = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FluidWarning)
        t = paper_thresholds(seg, prompt, cost, budget=budget)
    n = t.values
    assert all(x >= 0 for x in n)
    for p, a, b in zip(seg.survival[1:], n, n[1:]):
        assert p * a <= b <= a
    assert t.memory <= cost.kv_capacity_tokens * (1 + 1e-9)
    if t.conditions_hold:
        assert satisfies_conditions(seg, n, prompt, cost)
    else:
        assert t.note


def test_rate_limits_match_solve():
    types = [JobType(512, 20, 0.7), JobType(512, 50, 0.3)]
    limits = rate_limits(types, A100)
    scaled = [replace(t, rate=t.rate * limits.load * 0.999) for t in types]
    assert solve(scaled, A100).stable
    assert not solve([replace(t, rate=t.rate * limits.load * 1.001) for t in types], A100).stable
    at_memory = [replace(t, rate=t.rate * limits.memory) for t in types]
    assert solve(at_memory, A100).memory_tokens == pytest.approx(A100.kv_capacity_tokens)
    assert limits.tighter == min(limits.load, limits.memory)


def test_safety_buffer_positive_finite_and_grows_with_horizon():
    seg = segments_from_lengths(list(range(1, 501)), 40.0, 10)
    n = nested_thresholds_from_budget(seg, 1000.0)
    short = nested_safety_buffer(seg, n, 35, horizon_s=60, d0=A100.d0)
    long = nested_safety_buffer(seg, n, 35, horizon_s=3600, d0=A100.d0)
    assert 0 < short < long < math.inf
    assert nested_safety_buffer(seg, n, 35, 3600, A100.d0, delta=0.001) > long
    with pytest.raises(ValueError, match="p_k <"):
        nested_safety_buffer(seg, [10.0] * len(n), 35, 60, A100.d0)


def test_theta_solves_its_equation():
    from scheduler.segments import _theta

    p, n_prev, n_k = 0.3, 3.0, 1.2
    theta = _theta(p, n_k / n_prev)
    assert theta > 0
    assert math.exp(-theta * n_k) * (1 - p + p * math.exp(theta)) ** n_prev == pytest.approx(1.0)


def test_no_warning_in_the_normal_case():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wait_thresholds([JobType(512, 20, 22.0)], A100)
        paper_thresholds(segments_from_types([20, 50], [15.4, 6.6]), 512, A100)
