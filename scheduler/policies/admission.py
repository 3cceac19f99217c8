"""Production Nested WAIT's admission rule: how many new requests, and whether their KV will fit.

Two fluid-guided limits (scheduler/SCHEDULING.md §5), each switchable:

- The admission cap (optional): at most ceil(n_1) new requests per iteration, n_1 the fluid's
  arrivals per iteration with slack (the paper's first-segment threshold as a rate). Below the
  low-load bypass no cap applies.
- The KV forecast: a request is admitted only if the KV the residents and it are expected to
  grow into stays within the cache (scheduler/forecast.py). With the low-load bypass, when even
  the worst case fits (every resident running to its max_tokens or the longest output seen) the
  forecast is skipped: that is the common, memory-rich case, and it costs one sum.

Both sit on top of the blocks free now (the chunk scheduled now must fit, as in vLLM v1).
"""
from __future__ import annotations

import numpy as np

from scheduler.forecast import KVForecast, as_arrays
from scheduler.queues import WorkerQueues
from scheduler.request import Request


class ForecastAdmission:
    """The admission predicate of one iteration (see `decode_first`)."""

    def __init__(self, q: WorkerQueues, forecast: KVForecast | None, limit: int | None,
                 bypass: bool = True) -> None:
        self.q, self.forecast, self.limit, self.bypass = q, forecast, limit, bypass
        self.free = q.pool.num_free_blocks
        self.admitted: list[Request] = []
        self._worst: int | None = None  # the residents' worst case, in tokens
        self._curves: np.ndarray | None = None  # the forecast of residents and admitted
        self._arrays: tuple[np.ndarray, ...] | None = None  # their (prompt, stage, cap)

    def __call__(self, req: Request, tokens: int) -> bool:
        blocks = self.q.pool.blocks_for(tokens)
        if blocks > self.free:
            return False
        # An idle server always takes one request: holding it back would only leave it idle.
        if self.q.resident or self.admitted:
            if self.limit is not None and len(self.admitted) >= self.limit:
                return False
            if self.forecast is not None and not self._fits(req):
                return False
        self.free -= blocks
        self.admitted.append(req)
        return True

    def _fits(self, req: Request) -> bool:
        pool, forecast = self.q.pool, self.forecast
        capacity = pool.capacity_tokens
        if self._worst is None:
            self._worst = self._worst_case(self.q.resident.values()) + self._worst_case(self.admitted)
        worst = self._worst + self._worst_case((req,))
        if self.bypass and worst <= capacity:
            self._worst = worst
            if self._curves is not None:
                self._arrays, self._curves = self._with(req)
            return True
        if self._curves is None:
            self._arrays = as_arrays([*self.q.resident.values(), *self.admitted])
            self._curves = forecast.curves(*self._arrays)
        arrays, curves = self._with(req)
        if not forecast.fits(arrays, curves, capacity):
            return False
        self._arrays, self._curves, self._worst = arrays, curves, worst
        return True

    def _with(self, req: Request) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
        """The (prompt, stage, cap) arrays and the KV forecast so far, with `req` added."""
        one = as_arrays((req,))
        return (tuple(np.append(a, b) for a, b in zip(self._arrays, one)),
                self._curves + self.forecast.curves(*one))

    def _worst_case(self, requests) -> int:
        """KV of `requests` if each runs to its max_tokens or the longest output seen, each
        rounded up to whole blocks (an upper bound: one generator, this runs every plan)."""
        longest, spare = self.forecast.max_len, self.q.pool.block_size - 1
        return sum(r.prompt_len + min(r.max_tokens, max(longest, r.num_generated)) + spare
                   for r in requests)
