"""The calibration's robust fit: outliers dropped, the model recovered, its uncertainty reported."""
from __future__ import annotations

import random

import pytest

from actors.calibrate import robust_fit

TRUE = (0.05, 1e-4, 2e-7)  # d0, d_tok, d_kv


def samples(rng: random.Random, repeats: int, noise: float) -> list[tuple[int, int, float]]:
    out = []
    for new in (1, 8, 32, 64, 128, 256):
        for kv in (0, 1000, 8000):
            for _ in range(repeats):
                out.append((new, kv, TRUE[0] + TRUE[1] * new + TRUE[2] * kv + rng.gauss(0, noise)))
    return out


def test_outliers_are_dropped_and_the_model_recovered():
    rng = random.Random(0)
    clean = samples(rng, 5, 0.001)
    spiked = clean + [(64, 1000, 0.6), (8, 0, 1.1), (256, 8000, 2.0)]  # a neighbour's bursts
    fitted = robust_fit(spiked, kv_capacity_tokens=1000, block_size=16)
    assert fitted.num_outliers >= 3 and fitted.num_samples <= len(clean)
    m = fitted.model
    assert m.d0 == pytest.approx(TRUE[0], rel=0.05)
    assert m.d_tok == pytest.approx(TRUE[1], rel=0.05)
    assert fitted.r2 > 0.95


def test_a_mean_preserving_fit_charges_the_outliers_time_to_d0():
    """A replay's mean latency needs the mean step: the bursts' time is kept, their shape not."""
    spiked = samples(random.Random(0), 5, 0.001) + [(64, 1000, 0.6), (8, 0, 1.1), (256, 8000, 2.0)]
    typical = robust_fit(spiked, kv_capacity_tokens=1000, block_size=16).model
    fitted = robust_fit(spiked, kv_capacity_tokens=1000, block_size=16, mean_preserving=True).model
    assert fitted.d_tok == typical.d_tok and fitted.d_kv == typical.d_kv
    total = sum(t for _, _, t in spiked)
    assert sum(fitted.iteration_time(n, kv) for n, kv, _ in spiked) == pytest.approx(total, rel=1e-6)


def test_uncertainty_shrinks_with_more_probes():
    few = robust_fit(samples(random.Random(1), 2, 0.004), kv_capacity_tokens=1000, block_size=16)
    many = robust_fit(samples(random.Random(1), 12, 0.004), kv_capacity_tokens=1000, block_size=16)
    assert 0 < many.rel_uncertainty < few.rel_uncertainty
    assert many.std["d0"] < few.std["d0"]
    assert "±" in many.describe()
