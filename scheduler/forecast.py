"""KVForecast: the KV memory resident requests are expected to grow into, from the length law.

The fluid memory M* (scheduler/SCHEDULING.md §2) counts, for every request, the KV it holds over its
whole remaining life; Nested WAIT's segments do the same per survival band. Admission control
needs that quantity per request and over time: a request at stage s (tokens generated) with a
prompt of l tokens holds l + s + k tokens k iterations from now if it is still running then,
which happens with probability S(s + k) / S(s), S(x) = P(output length > x), estimated from the
lengths of finished requests. Summing over residents gives the expected KV k iterations ahead,
assuming every resident advances each iteration (what continuous batching does); its variance
is that of a sum of independent Bernoulli survivors. A request may be admitted when

    max_k  E[KV(k)] + z * sd[KV(k)]  <=  C      (k on a grid covering the longest output)

with the candidate counted too. z is the safety margin of scheduler/SCHEDULING.md §4 buffer (the
binomial fluctuation of survivors), here as a normal bound rather than a Chernoff one.
The grid is every offset for the next 16 iterations, then 32 evenly spaced ones. Between two
grid offsets a survivor's block-rounded KV grows by at most the whole blocks the iterations
strictly between them can fill, and survival only falls, so a grid value plus that growth times
the expected survivors bounds the gap; only a gap whose bound exceeds C is then evaluated at
every offset. So the peak is checked exactly, at the cost of a coarse grid. KV is counted in
whole blocks, as the pool allocates it. Everything is vectorised with numpy: one forecast costs
tens of microseconds for a few hundred residents.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from scheduler.request import Request


def _grid(max_len: int, points: int = 32) -> np.ndarray:
    """Offsets 0..max_len: every one of the next 16 iterations, then `points` evenly spaced."""
    step = max(1, max_len // points)
    return np.unique(np.array(list(range(16)) + list(range(16, max_len + step, step)), dtype=np.int64))


class KVForecast:
    def __init__(self, lengths: Sequence[int], block_size: int = 16, z: float = 1.5) -> None:
        data = np.sort(np.maximum(1, np.asarray(lengths, dtype=np.int64)))
        if data.size == 0:
            raise ValueError("a forecast needs at least one observed output length")
        self.max_len = int(data[-1])
        xs = np.arange(self.max_len + 2)
        # survival[x] = P(o > x); survival[max_len + 1] = 0 closes the table.
        self.survival = 1.0 - np.searchsorted(data, xs, side="right") / data.size
        self.grid = _grid(self.max_len)
        # KV a survivor may add at the offsets strictly between a grid point and the next one.
        between = np.append(np.diff(self.grid), 1) - 1
        self.growth = -(-between // block_size) * block_size
        self.block_size = block_size
        self.z = z

    def curves(self, prompt: np.ndarray, stage: np.ndarray, cap: np.ndarray,
               offsets: np.ndarray | None = None) -> np.ndarray:
        """Summed over the requests, at each grid offset (or `offsets`): the expected KV, its
        variance and the expected number still running (`[3, offsets]`). `cap` is each
        request's max_tokens."""
        top = self.max_len + 1
        at = stage[:, None] + (self.grid if offsets is None else offsets)[None, :]
        s_now = self.survival[np.minimum(stage, top)]
        s_then = self.survival[np.minimum(at, top)]
        # A request that has outlived every observed length: assume it runs on to its cap
        # (rare; conservative). Otherwise the conditional survival S(s + k) / S(s).
        alive = np.where(s_now[:, None] > 0, s_then / np.maximum(s_now, 1e-300)[:, None], 1.0)
        alive = np.where(at < cap[:, None], alive, 0.0)
        size = self.block_size
        kv = -(-(prompt[:, None] + at) // size) * size  # whole blocks
        return np.stack([(alive * kv).sum(axis=0), (alive * (1.0 - alive) * kv * kv).sum(axis=0),
                         alive.sum(axis=0)])

    def residents(self, requests: Iterable[Request]) -> np.ndarray:
        """The summed curves of resident requests (prefills count from stage 0 on)."""
        return self.curves(*as_arrays(requests))

    def fits(self, requests: tuple[np.ndarray, np.ndarray, np.ndarray], curves: np.ndarray,
             capacity: float) -> bool:
        """Whether the peak of `requests` (their grid `curves` given) stays within `capacity`:
        on the grid, then at every offset of each gap whose bound does not rule it out."""
        mean, var, alive = curves
        at_grid = mean + self.z * np.sqrt(var)
        if at_grid.max() > capacity:
            return False
        for j in np.flatnonzero(at_grid + alive * self.growth > capacity):
            inside = np.arange(self.grid[j] + 1, self.grid[j + 1])
            m, v, _ = self.curves(*requests, offsets=inside)
            if (m + self.z * np.sqrt(v)).max() > capacity:
                return False
        return True


def as_arrays(requests: Iterable[Request]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt lengths, stages, max_tokens) of `requests`, the forecast's inputs."""
    reqs = list(requests)
    n = len(reqs)
    return (np.fromiter((r.prompt_len for r in reqs), np.int64, n),
            np.fromiter((r.num_generated for r in reqs), np.int64, n),
            np.fromiter((r.max_tokens for r in reqs), np.int64, n))
