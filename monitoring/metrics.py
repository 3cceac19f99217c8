"""The serving metrics of one model, in one Prometheus registry, recorded by the scheduler actor.

Names follow vLLM's (`vllm:time_to_first_token_seconds` -> `fluidserve:time_to_first_token_seconds`)
with the same bucket boundaries, so dashboards and habits carry over. Everything lives in the
`ServingMetrics` instance's own `CollectorRegistry`: the scheduler actor owns it and the Serve
ingress returns `render()` at `GET /metrics`. Ray's own metrics stay where Ray exports them.

All times are seconds on the scheduler's clock (the one `Request` timestamps use). Recording
methods sit on the scheduler's hot path, so label children are resolved once and cached:
a call is a few lock-protected float additions, no label lookups.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from scheduler.request import Request

PREFIX = "fluidserve:"
# What `GET /metrics` must send with `render()`: the classic text format. Do not negotiate
# OpenMetrics (prometheus_client's choose_encoder / start_http_server): its encoder in
# prometheus-client <= 0.26 rewrites the colon of sample names to `_` while HELP/TYPE keep it
# (prometheus/client_python#1177), so `fluidserve:*` series would vanish from Prometheus.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
INTER_TOKEN_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
FAILURE_REASONS = ("model_error", "queue_timeout", "actor_unavailable")
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# Not in vLLM: one scheduler iteration is ~8 ms (A100, Llama-7B) up to ~1 s (CPU model).
ITERATION_DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# Pre-created so that rate() over them has a series (0) before the first such finish.
FINISH_REASONS = ("stop", "length", "error")


def observe_many(histogram: Histogram, values: list[float]) -> None:
    """`histogram.observe(v)` for every value, binned with numpy: one lock per bucket touched
    instead of per value. Reaches into prometheus_client's per-bucket counters (`_buckets`,
    `_upper_bounds`, `_sum`: stable since 0.4); falls back to observe() without them."""
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    if buckets is None or bounds is None or len(values) < 8:
        for v in values:
            histogram.observe(v)
        return
    data = np.asarray(values, dtype=np.float64)
    counts = np.bincount(np.searchsorted(np.asarray(bounds), data, side="left"), minlength=len(bounds))
    for i in np.flatnonzero(counts).tolist():
        buckets[i].inc(int(counts[i]))
    histogram._sum.inc(float(data.sum()))


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


class ServingMetrics:
    """Prometheus metrics of one served model; several instances can coexist in one process."""

    def __init__(
        self,
        model_name: str,
        registry: CollectorRegistry | None = None,
        max_model_len: int = 8192,
    ) -> None:
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry()
        m = (model_name,)
        mw = ["model_name", "worker"]
        reg = self.registry

        def hist(name: str, doc: str, buckets: Sequence[float], labels: list[str]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=reg)

        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=reg)

        def gauge(name: str, doc: str, labels: list[str]) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=reg)

        tok_buckets = build_1_2_5_buckets(max_model_len)
        # Request-level histograms (one child: the model).
        self._ttft = hist("time_to_first_token_seconds", "Time to first token in seconds.",
                          TTFT_BUCKETS, ["model_name"]).labels(*m)
        self._e2e = hist("e2e_request_latency_seconds", "End-to-end request latency in seconds.",
                         REQUEST_LATENCY_BUCKETS, ["model_name"]).labels(*m)
        self._itl = hist("inter_token_latency_seconds", "Inter-token latency in seconds.",
                         INTER_TOKEN_BUCKETS, ["model_name"]).labels(*m)
        self._queue = hist("request_queue_time_seconds",
                           "Time from arrival to first scheduling in seconds.",
                           REQUEST_LATENCY_BUCKETS, ["model_name"]).labels(*m)
        self._prefill = hist("request_prefill_time_seconds",
                             "Time from first scheduling to first token in seconds.",
                             REQUEST_LATENCY_BUCKETS, ["model_name"]).labels(*m)
        self._decode = hist("request_decode_time_seconds",
                            "Time from first token to finish in seconds.",
                            REQUEST_LATENCY_BUCKETS, ["model_name"]).labels(*m)
        self._req_prompt = hist("request_prompt_tokens", "Prompt tokens per finished request.",
                                tok_buckets, ["model_name"]).labels(*m)
        self._req_gen = hist("request_generation_tokens",
                             "Generated tokens per finished request.",
                             tok_buckets, ["model_name"]).labels(*m)
        # Iteration-level histograms, per model actor.
        self._iter_duration = hist("iteration_duration_seconds",
                                   "Wall time of one model-actor iteration in seconds.",
                                   ITERATION_DURATION_BUCKETS, mw)
        self._iter_tokens = hist("iteration_tokens",
                                 "Tokens computed in one iteration (prefill + decode).",
                                 ITERATION_TOKENS_BUCKETS, mw)
        self._batch_size = hist("batch_size", "Requests advanced in one iteration.",
                                BATCH_SIZE_BUCKETS, mw)

        # Counters.
        self._prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled (first prefill "
                                      "of each request; recomputation after eviction excluded).",
                                      ["model_name"]).labels(*m)
        self._gen_tokens = counter("generation_tokens", "Output tokens streamed to clients.",
                                   ["model_name"]).labels(*m)
        self._success = counter("request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"])
        self._rejected = counter("request_rejected", "Requests rejected at submission by reason.",
                                 ["model_name", "reason"])
        self._evictions = counter("num_evictions", "Requests evicted from the KV cache (LIFO); "
                                  "each restarts from prefill.", ["model_name"]).labels(*m)
        self._cancelled = counter("request_cancelled", "Requests cancelled by the client.",
                                  ["model_name"]).labels(*m)
        self._failures = counter("request_failure", "Requests that ended in an error, by reason "
                                 "(model_error: its step failed on the model actor; "
                                 "actor_unavailable: no model actor left that can hold it; "
                                 "queue_timeout: not admitted within max_queue_wait_s).",
                                 ["model_name", "reason"])
        self._arrivals = counter("request_arrivals", "Requests accepted by the scheduler.",
                                 ["model_name"]).labels(*m)

        # Gauges: scheduler state.
        self._running = gauge("num_requests_running",
                              "Requests advanced in the last iteration.", ["model_name"]).labels(*m)
        self._waiting = gauge("num_requests_waiting",
                              "Requests waiting for (re)prefill, holding no KV.",
                              ["model_name"]).labels(*m)
        self._paused = gauge("num_requests_paused",
                             "Resident requests (holding KV) not advanced in the last iteration.",
                             ["model_name"]).labels(*m)
        self._kv_usage = gauge("kv_cache_usage_perc",
                               "KV-cache usage of a model actor. 1 means 100 percent.", mw)
        self._kv_capacity = gauge("kv_cache_capacity_tokens",
                                  "KV-cache capacity of a model actor in tokens.", mw)
        self._actor_up = gauge("model_actor_up", "1 if the model actor answers, else 0.", mw)
        # Gauges: the policy (Nested WAIT) and the fluid benchmark.
        self._seg_queue = gauge("segment_queue_length",
                                "Requests waiting at the entry of a Nested WAIT segment.",
                                ["model_name", "segment"])
        self._seg_threshold = gauge("segment_threshold",
                                    "Entry threshold n_k of a Nested WAIT segment.",
                                    ["model_name", "segment"])
        self._arrival_rate = gauge("estimated_arrival_rate",
                                   "Estimated request arrival rate (requests/s).",
                                   ["model_name"]).labels(*m)
        self._fluid_throughput = gauge("fluid_throughput_bound_tokens_per_second",
                                       "Fluid throughput bound Throughput* (output tokens/s).",
                                       ["model_name"]).labels(*m)
        self._fluid_memory = gauge("fluid_memory_tokens",
                                   "KV tokens M* the fluid optimum needs at the estimated load.",
                                   ["model_name"]).labels(*m)
        self._fluid_load = gauge("fluid_load",
                                 "Fluid load rho; the system is stable only while rho < 1.",
                                 ["model_name"]).labels(*m)

        self._success_by_reason = {r: self._success.labels(model_name, r) for r in FINISH_REASONS}
        self._rejected_by_reason: dict[str, Counter] = {}
        # Every known reason is exported from the start (at 0), so dashboards have a series.
        self._failed_by_reason = {r: self._failures.labels(model_name, r) for r in FAILURE_REASONS}
        self._per_worker: dict[int, tuple] = {}  # worker -> its cached label children
        self._segments: list[tuple[Gauge, Gauge]] = []  # cached (queue, threshold) per segment
        # Time of the last token streamed, per request: the Request's own last_token_time may
        # already be overwritten by the commit that produced the token being recorded.
        self._last_token: dict[str, float] = {}

    # -- requests -----------------------------------------------------------------------------

    def on_submit(self, req: Request) -> None:
        """A request was accepted by the scheduler."""
        self._arrivals.inc()

    def on_reject(self, reason: str) -> None:
        """A request was rejected at submission (e.g. prompt longer than the KV capacity)."""
        child = self._rejected_by_reason.get(reason)
        if child is None:
            child = self._rejected_by_reason[reason] = self._rejected.labels(self.model_name,
                                                                             reason)
        child.inc()

    def on_tokens(self, req: Request, now: float, n: int = 1) -> None:
        """`n` output tokens of `req` were streamed at `now`.

        The first call for a request records TTFT and queue time from its timestamps; later
        calls record inter-token latency (one observation per token).
        """
        prev = self._last_token.get(req.request_id)
        self._last_token[req.request_id] = now
        self._gen_tokens.inc(n)
        if prev is None:
            prev = self._first_token(req, now)
            n -= 1  # the first token has no predecessor
        if n > 0:
            gap = (now - prev) / n
            for _ in range(n):
                self._itl.observe(gap)

    def on_batch_tokens(self, reqs: Iterable[Request], now: float) -> None:
        """One output token for each of `reqs` at `now`: what one iteration's commit streams.

        Same records as `on_tokens(req, now)` for each, at a fraction of the cost: one counter
        update for the whole batch and the inter-token gaps binned with numpy at once.
        """
        last = self._last_token
        gaps = []
        count = 0
        for req in reqs:
            count += 1
            rid = req.request_id
            prev = last.get(rid)
            last[rid] = now
            if prev is None:
                self._first_token(req, now)
            else:
                gaps.append(now - prev)
        if count:
            self._gen_tokens.inc(count)
        if gaps:
            observe_many(self._itl, gaps)

    def _first_token(self, req: Request, now: float) -> float:
        """Record TTFT, queue time and prompt tokens; return the first token's time."""
        first = req.first_token_time if req.first_token_time is not None else now
        self._ttft.observe(first - req.arrival_time)
        if req.first_scheduled_time is not None:
            self._queue.observe(req.first_scheduled_time - req.arrival_time)
        self._prompt_tokens.inc(req.prompt_len)
        return first

    def on_finish(self, req: Request) -> None:
        """`req` finished (stop, length, error): latency breakdown, lengths, finish reason."""
        self._last_token.pop(req.request_id, None)
        finish = req.finish_time
        if finish is not None:
            self._e2e.observe(finish - req.arrival_time)
            if req.first_token_time is not None:
                self._decode.observe(finish - req.first_token_time)
        if req.first_token_time is not None and req.first_scheduled_time is not None:
            self._prefill.observe(req.first_token_time - req.first_scheduled_time)
        self._req_prompt.observe(req.prompt_len)
        self._req_gen.observe(req.num_generated)
        reason = req.finish_reason or "stop"
        child = self._success_by_reason.get(reason)
        if child is None:
            child = self._success_by_reason[reason] = self._success.labels(self.model_name,
                                                                           reason)
        child.inc()

    def on_failure(self, req: Request | None, reason: str) -> None:
        """`req` ended in an error (it gets a typed error in its own stream)."""
        if req is not None:
            self._last_token.pop(req.request_id, None)
        child = self._failed_by_reason.get(reason)
        if child is None:
            child = self._failed_by_reason[reason] = self._failures.labels(self.model_name, reason)
        child.inc()

    def on_cancel(self, req: Request) -> None:
        """The client cancelled `req` (disconnect or abort)."""
        self._last_token.pop(req.request_id, None)
        self._cancelled.inc()

    def on_evictions(self, n: int) -> None:
        """`n` resident requests were evicted to make room (they restart from prefill)."""
        if n:
            self._evictions.inc(n)

    # -- iterations and state ----------------------------------------------------------------

    def _worker(self, worker: int) -> tuple:
        children = self._per_worker.get(worker)
        if children is None:
            labels = (self.model_name, str(worker))
            children = self._per_worker[worker] = (
                self._iter_duration.labels(*labels),
                self._iter_tokens.labels(*labels),
                self._batch_size.labels(*labels),
                self._kv_usage.labels(*labels),
                self._kv_capacity.labels(*labels),
                self._actor_up.labels(*labels),
            )
        return children

    def on_iteration(self, worker: int, duration_s: float, num_tokens: int,
                     batch_size: int) -> None:
        """Model actor `worker` ran one iteration: its wall time, tokens computed, batch size."""
        duration, tokens, batch, _, _, _ = self._worker(worker)
        duration.observe(duration_s)
        tokens.observe(num_tokens)
        batch.observe(batch_size)

    def set_queue_state(self, running: int, waiting: int, paused: int) -> None:
        """Requests by state across all model actors (see RequestState)."""
        self._running.set(running)
        self._waiting.set(waiting)
        self._paused.set(paused)

    def set_kv(self, worker: int, used_tokens: int, capacity_tokens: int) -> None:
        """KV tokens held on model actor `worker` (block-rounded) and its capacity."""
        children = self._worker(worker)
        children[3].set(used_tokens / capacity_tokens if capacity_tokens > 0 else 0.0)
        children[4].set(capacity_tokens)

    def set_worker_up(self, worker: int, up: bool) -> None:
        """Whether model actor `worker` is alive (the scheduler sees its calls succeed)."""
        self._worker(worker)[5].set(1.0 if up else 0.0)

    def set_policy_state(
        self,
        segment_queues: Sequence[int],
        segment_thresholds: Sequence[float],
        arrival_rate: float,
        fluid_throughput: float,
        fluid_memory: float,
        fluid_load: float,
    ) -> None:
        """The policy's view: queue at each segment's entry and its threshold (segments are
        numbered from 1 as in the paper), estimated arrival rate, and the fluid benchmark."""
        segments = self._segments
        if len(segment_queues) != len(segments):
            self._resize_segments(len(segment_queues))
            segments = self._segments
        for (queue, threshold), q, t in zip(segments, segment_queues, segment_thresholds):
            queue.set(q)
            threshold.set(t)
        self._arrival_rate.set(arrival_rate)
        self._fluid_throughput.set(fluid_throughput)
        self._fluid_memory.set(fluid_memory)
        self._fluid_load.set(fluid_load)

    def _resize_segments(self, num_segments: int) -> None:
        # Segments are recomputed as the length distribution drifts; drop the children of
        # segments that no longer exist, or dashboards would show frozen stale lines.
        for k in range(num_segments, len(self._segments)):
            self._seg_queue.remove(self.model_name, str(k + 1))
            self._seg_threshold.remove(self.model_name, str(k + 1))
        del self._segments[num_segments:]
        for k in range(len(self._segments), num_segments):
            self._segments.append((self._seg_queue.labels(self.model_name, str(k + 1)),
                                   self._seg_threshold.labels(self.model_name, str(k + 1))))

    # -- exposition ---------------------------------------------------------------------------

    def render(self) -> bytes:
        """This registry in the Prometheus text format; serve it with `CONTENT_TYPE`."""
        return generate_latest(self.registry)


class MetricsCache:
    """`GET /metrics` without stalling the scheduler: the text is rendered at most every
    `max_age_s`, in a worker thread (prometheus_client's metrics take a lock per update, so the
    dispatch loops keep recording meanwhile), and concurrent scrapes share one render. A scrape
    sees values at most `max_age_s` old, as with any scrape interval."""

    def __init__(self, metrics: ServingMetrics, max_age_s: float = 2.0) -> None:
        self.metrics = metrics
        self.max_age_s = max_age_s
        self._body: bytes | None = None
        self._rendered_at = float("-inf")
        self._rendering: asyncio.Future | None = None
        self.renders = 0

    async def text(self, refresh: Callable[[], None] | None = None) -> bytes:
        """The cached text, or a new render; `refresh` (run on the caller's loop first) sets the
        gauges that are only sampled at render time."""
        if self._body is not None and time.monotonic() - self._rendered_at < self.max_age_s:
            return self._body
        if self._rendering is None:
            self._rendering = asyncio.ensure_future(self._render(refresh))
        return await asyncio.shield(self._rendering)

    async def _render(self, refresh: Callable[[], None] | None) -> bytes:
        try:
            if refresh is not None:
                refresh()
            body = await asyncio.to_thread(self.metrics.render)
            self._body, self._rendered_at = body, time.monotonic()
            self.renders += 1
            return body
        finally:
            self._rendering = None
