"""Production Nested WAIT's admission rule: how many new requests, and whether their KV will fit.

Two fluid-guided limits (docs/scheduling.md, "Production Nested WAIT"), each switchable:

- The admission cap: at most n_1 new requests per iteration, n_1 the first segment's threshold
  (the fluid's arrivals per iteration, with slack). A fractional n_1 carries its remainder to
  the next iteration, so over time exactly n_1 per iteration are allowed. Below the low-load
  bypass no cap applies.
- The KV forecast: a request is admitted only if the KV the residents and it are expected to
  grow into stays within the cache (scheduler/forecast.py). When even the worst case fits (every
  resident running to the longest output seen), the forecast is skipped: that is the common,
  memory-rich case, and it costs one sum.

Both sit on top of the blocks free now (the chunk scheduled now must fit, as in vLLM v1).
"""
from __future__ import annotations

import math

import numpy as np

from scheduler.forecast import KVForecast
from scheduler.queues import WorkerQueues
from scheduler.request import Request


class AdmissionCap:
    """n_1 admissions per iteration on average; the fraction carries over."""

    def __init__(self) -> None:
        self._carry = 0.0

    def allowance(self, n1: float) -> int:
        """Admissions allowed this iteration (call once per planned iteration)."""
        total = self._carry + n1
        allowed = math.floor(total)
        self._carry = total - allowed
        return allowed


class ForecastAdmission:
    """The admission predicate of one iteration (see `decode_first`)."""

    def __init__(self, q: WorkerQueues, forecast: KVForecast | None, limit: int | None) -> None:
        self.q, self.forecast, self.limit = q, forecast, limit
        self.free = q.pool.num_free_blocks
        self.admitted: list[Request] = []
        self._worst: int | None = None  # the residents' worst case, in tokens
        self._curves: np.ndarray | None = None  # the forecast of residents and admitted

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
            self._worst = sum(self._worst_case(r) for r in (*self.q.resident.values(), *self.admitted))
        worst = self._worst + self._worst_case(req)
        if worst <= capacity:
            self._worst = worst
            if self._curves is not None:
                self._add(req)
            return True
        if self._curves is None:
            self._curves = forecast.residents([*self.q.resident.values(), *self.admitted])
        curves = self._curves + forecast.one(req)
        if forecast.peak(curves) > capacity:
            return False
        self._curves = curves
        self._worst = worst
        return True

    def _add(self, req: Request) -> None:
        self._curves = self._curves + self.forecast.one(req)

    def _worst_case(self, req: Request) -> int:
        """Block-rounded KV of `req` if it runs to its cap or the longest output seen."""
        longest = min(req.max_tokens, max(self.forecast.max_len, req.num_generated))
        return self.q.pool.blocks_for(req.prompt_len + longest) * self.q.pool.block_size
