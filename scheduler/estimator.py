"""Online estimates of the arrival rate and the output-length distribution (scheduler/SCHEDULING.md §5).

The paper assumes lambda and the length distribution are known; live, the scheduler estimates
them from arrivals and completions and recomputes thresholds and segments from the estimates.
"""
from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Sequence

from scheduler.segments import Segments, quantile_bounds, segments_from_lengths


class RateEstimator:
    """Arrivals per second, exponentially decayed with a half-life (O(1) per observation).

    rate = S / E: S is the decayed count of arrivals, E the decayed length of the time watched,
    (1 - e^{-a t}) / a after t seconds. Dividing by E rather than its limit 1/a keeps the estimate
    unbiased in the first half-lives; when idle S decays and so does the rate, toward 0.
    Without `start`, watching begins at the first arrival, which is then not counted (its time
    was not random), so one arrival alone gives rate 0, not infinity.
    """

    def __init__(self, half_life_s: float = 30.0, start: float | None = None) -> None:
        if not half_life_s > 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        self.half_life_s = half_life_s
        self._decay = math.log(2) / half_life_s  # a
        self._start = start
        self._last = start
        self._weight = 0.0  # S at time self._last
        self.count = 0  # arrivals observed, all of them

    def observe(self, t: float, n: int = 1) -> None:
        """Record n arrivals at time t (s). Times slightly out of order count as simultaneous."""
        if n < 0:
            raise ValueError(f"arrival count must be >= 0, got {n}")
        self.count += n
        if self._last is None:
            self._start = self._last = t
            n = max(0, n - 1)
        elif t > self._last:
            self._weight *= math.exp(-self._decay * (t - self._last))
            self._last = t
        self._weight += n

    def rate(self, now: float) -> float:
        """Estimated arrivals per second at time `now`."""
        if self._last is None or self._start is None:
            return 0.0
        weight = self._weight * math.exp(-self._decay * max(0.0, now - self._last))
        # Floor the window so a burst right at the start cannot give an absurd rate.
        watched = max(now - self._start, self.half_life_s / 100)
        return weight * self._decay / -math.expm1(-self._decay * watched)


class LengthEstimator:
    """The output-length distribution over the last `window` finished requests.

    An optional prior sample (e.g. a trace's lengths) fills the window first; real observations
    push it out. Zero lengths count as 1 (a prefill always emits a token).
    """

    def __init__(self, window: int = 2000, prior: Sequence[int] = ()) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._lengths: deque[int] = deque(maxlen=window)
        self._sum = 0
        for length in prior:
            self.observe(length)

    def observe(self, output_len: int) -> None:
        """Record the output length of a finished request (O(1))."""
        if output_len < 0:
            raise ValueError(f"output length must be >= 0, got {output_len}")
        length = max(1, int(output_len))
        if len(self._lengths) == self._lengths.maxlen:
            self._sum -= self._lengths[0]
        self._lengths.append(length)
        self._sum += length

    @property
    def count(self) -> int:
        """Lengths currently in the window (prior included)."""
        return len(self._lengths)

    def mean(self) -> float:
        """Mean output length in the window (ValueError when empty)."""
        if not self._lengths:
            raise ValueError("no output lengths observed yet")
        return self._sum / len(self._lengths)

    def sample(self) -> list[int]:
        """The lengths in the window (prior included), oldest first."""
        return list(self._lengths)

    def quantile_bounds(self, num_segments: int) -> list[int]:
        """Segment ends o_1 < ... < o_m at the L quantiles of the window (m <= L when tied)."""
        if not self._lengths:
            raise ValueError("no output lengths observed yet")
        return quantile_bounds(self._lengths, num_segments)

    def survival(self, bounds: Sequence[int]) -> list[float]:
        """p_k = P(o > o_{k-1}) / P(o > o_{k-2}) for each segment (p_1 = 1; 0 if none reach k-1)."""
        if not self._lengths:
            raise ValueError("no output lengths observed yet")
        data = sorted(self._lengths)
        beyond = [len(data)] + [len(data) - bisect.bisect_right(data, b) for b in bounds[:-1]]
        return [1.0] + [b / a if a else 0.0 for a, b in itertools.pairwise(beyond)]

    def segments(self, rate: float, num_segments: int) -> Segments:
        """Nested WAIT segments for total arrival rate `rate` from the window's quantiles."""
        if not self._lengths:
            raise ValueError("no output lengths observed yet")
        return segments_from_lengths(self._lengths, rate, num_segments)

