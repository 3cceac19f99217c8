"""The KV forecast behind production Nested WAIT's admission (scheduler/SCHEDULING.md §5)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.forecast import KVForecast, as_arrays
from scheduler.request import Request

BLOCK = 16


def resident(prompt: int, stage: int, max_tokens: int = 10_000) -> Request:
    req = Request(f"r{prompt}-{stage}", prompt, max_tokens, 0.0)
    req.num_generated = stage
    return req


def true_kv(requests: list[Request], output: int, k: int) -> int:
    """The block-rounded KV the requests hold k iterations on when every output is `output`."""
    return sum(-(-(r.prompt_len + r.num_generated + k) // BLOCK) * BLOCK
               for r in requests if r.num_generated + k < output)


@settings(max_examples=60, deadline=None)
@given(prompts=st.lists(st.integers(1, 300), min_size=1, max_size=20), output=st.integers(1, 200),
       data=st.data())
def test_one_known_length_gives_the_exact_kv_at_every_offset(prompts, output, data):
    stages = [data.draw(st.integers(0, output - 1)) for _ in prompts]
    reqs = [resident(p, s) for p, s in zip(prompts, stages)]
    forecast = KVForecast([output] * 50, BLOCK)
    curves = forecast.residents(reqs)
    mean, var, _ = curves
    for gi, k in enumerate(forecast.grid):
        assert mean[gi] == pytest.approx(true_kv(reqs, output, int(k)))
        assert var[gi] == pytest.approx(0.0, abs=1e-6)
    # The check is exact at every offset, not only on the grid: it fits C iff the true peak does.
    worst = max(true_kv(reqs, output, k) for k in range(output + 1))
    arrays = as_arrays(reqs)
    assert forecast.fits(arrays, curves, worst)
    assert not forecast.fits(arrays, curves, worst - 1)


def test_mean_and_variance_follow_the_survival_law():
    # Half the outputs end at 10, half at 100: a fresh request survives stage 10 w.p. 1/2.
    forecast = KVForecast([10] * 5 + [100] * 5, BLOCK, z=0.0)
    mean, var, alive = forecast.residents([resident(32, 0)])
    at = int(np.searchsorted(forecast.grid, 20))
    kv = -(-(32 + int(forecast.grid[at])) // BLOCK) * BLOCK
    assert alive[at] == pytest.approx(0.5)
    assert mean[at] == pytest.approx(0.5 * kv)
    assert var[at] == pytest.approx(0.25 * kv * kv)
    # Having survived past 10, the same request is certain to run to 100.
    mean, var, alive = forecast.residents([resident(32, 11)])
    assert alive[:int(np.searchsorted(forecast.grid, 88))].min() == pytest.approx(1.0)


def test_max_tokens_ends_a_request_early():
    forecast = KVForecast([100] * 10, BLOCK)
    capped = forecast.residents([resident(32, 0, max_tokens=8)])
    assert capped[2][forecast.grid >= 8].sum() == 0


def test_a_request_past_every_observed_length_is_assumed_to_run_to_its_cap():
    forecast = KVForecast([10] * 10, BLOCK)
    _, _, alive = forecast.residents([resident(32, 50, max_tokens=60)])
    assert alive[0] == 1.0 and alive[forecast.grid >= 10].sum() == 0  # 50 + 10 >= 60
