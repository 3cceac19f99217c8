"""Online rate and length estimators (scheduler/SCHEDULING.md §5, unknown rates)."""
from __future__ import annotations

import random

import pytest

from scheduler.estimator import LengthEstimator, RateEstimator
from scheduler.workload import poisson_arrivals


def test_rate_converges_on_a_poisson_stream():
    est = RateEstimator(half_life_s=30.0)
    times = poisson_arrivals(20.0, 12_000, seed=11)  # 600 s
    for t in times:
        est.observe(t)
    assert est.rate(times[-1]) == pytest.approx(20.0, rel=0.1)
    assert est.count == 12_000


def test_rate_is_sane_at_the_start():
    est = RateEstimator(half_life_s=30.0)
    assert est.rate(0.0) == 0.0
    est.observe(5.0)
    assert est.rate(5.0) == 0.0  # one arrival says nothing about the rate yet
    times = [5.0 + t for t in poisson_arrivals(50.0, 100, seed=2)]  # 2 s of traffic
    for t in times:
        est.observe(t)
    assert est.rate(times[-1]) == pytest.approx(50.0, rel=0.3)  # not diluted by the half-life


def test_rate_tracks_a_change_and_decays_when_idle():
    est = RateEstimator(half_life_s=10.0, start=0.0)
    fast = poisson_arrivals(40.0, 4000, seed=1)  # ~100 s at 40/s
    slow = [fast[-1] + t for t in poisson_arrivals(5.0, 500, seed=2)]  # then ~100 s at 5/s
    for t in fast + slow:
        est.observe(t)
    end = slow[-1]
    assert est.rate(end) == pytest.approx(5.0, rel=0.3)
    assert est.rate(end + 10.0) == pytest.approx(est.rate(end) / 2, rel=0.01)  # one half-life
    assert est.rate(end + 300.0) < 1e-6


def test_rate_counts_batches_and_out_of_order_times():
    est = RateEstimator(half_life_s=30.0, start=0.0)
    for second in range(1, 301):
        est.observe(float(second), n=10)
    est.observe(299.5)  # slightly late report: counted as arriving now
    assert est.rate(300.0) == pytest.approx(10.0, rel=0.05)
    with pytest.raises(ValueError):
        RateEstimator(half_life_s=0)


def test_quantile_bounds_of_a_uniform_distribution():
    est = LengthEstimator(window=1000, prior=range(1, 1001))
    assert est.quantile_bounds(4) == [250, 500, 750, 1000]
    assert est.quantile_bounds(1) == [1000]
    assert est.mean() == pytest.approx(500.5) and est.count == 1000


def test_quantile_bounds_of_a_two_point_distribution_collapse():
    est = LengthEstimator(prior=[20] * 70 + [50] * 30)
    assert est.quantile_bounds(10) == [20, 50]
    assert est.survival([20, 50]) == pytest.approx([1.0, 0.3])


def test_survival_probabilities():
    rng = random.Random(0)
    est = LengthEstimator(window=20_000)
    for _ in range(20_000):
        est.observe(rng.randint(1, 100))
    bounds = [25, 50, 75, 100]
    # P(o > 50 | o > 25) = 50/75 and so on.
    assert est.survival(bounds) == pytest.approx([1.0, 0.75, 50 / 75, 25 / 50], abs=0.02)
    seg = est.segments(10.0, 4)
    assert seg.bounds == est.quantile_bounds(4)
    assert seg.survival == pytest.approx(est.survival(seg.bounds))


def test_window_forgets_the_prior():
    est = LengthEstimator(window=100, prior=[500] * 100)
    for _ in range(100):
        est.observe(10)
    assert est.mean() == 10 and est.quantile_bounds(5) == [10] and est.count == 100
    est.observe(0)  # a 0-token answer still emitted one token
    assert est.quantile_bounds(100)[0] == 1


def test_empty_length_estimator_says_so():
    est = LengthEstimator()
    for call in (est.mean, lambda: est.quantile_bounds(3), lambda: est.survival([1])):
        with pytest.raises(ValueError, match="no output lengths"):
            call()
