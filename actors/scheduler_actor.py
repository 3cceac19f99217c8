"""The central scheduler: one SchedulerCore for the whole deployment, one dispatch loop per model
actor (`actors.dispatch`: plans sent ahead, results committed), token streams (`actors.streams`),
and metrics.

Runs as the single replica of a Serve deployment. An ingress replica opens one `subscribe`
stream, then admits each request with `submit` (a typed error, or its id) and hears its tokens
in that stream's batches {request_id: message}, one Serve message per stream interval for all
its requests; `cancel` (client gone) frees a request's KV at once, and so does the subscription
ending. `generate` is one request's own stream, for Python callers. A model actor that dies
mid-iteration is restarted by Ray; its requests re-prefill their prompt plus the tokens already
streamed (`actors.recovery`), so streams just continue. `GET /metrics` is rendered in a thread at
most every `metrics_refresh_s`, never on the dispatch loops. What tests and benchmarks ask
(state, dispatch statistics, an in-replica load generator) is in `actors.scheduler_probes`.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from actors.dispatch import Dispatcher
from actors.naming import owner_scope
from actors.placement import EngineArgs, create_model_actors
from actors.recovery import RayActorLink
from actors.scheduler_probes import SchedulerProbes
from actors.streams import StreamHub, Subscriber
from monitoring.metrics import MetricsCache, ServingMetrics
from scheduler.core import SchedulerCore, TokenEvent
from scheduler.cost import CostModel, OnlineCostFit
from scheduler.errors import SchedulingError
from scheduler.plan import ScheduledBatch, StepResult
from scheduler.policies import PolicyConfig, make_policy
from scheduler.request import Request, SamplingParams

__all__ = ["EngineArgs", "SchedulerActor"]
logger = logging.getLogger("fluidserve.scheduler")
# A thread rendering /metrics hands the interpreter back to the event loop this often.
GIL_SWITCH_INTERVAL_S = 0.001
START_ATTEMPTS = 3  # start-up (model actors, their capacity) is retried with backoff
START_BACKOFF_S = 2.0
CAPACITY_TIMEOUT_S = 900.0  # model actors load their weights (and profile, on a GPU) before answering


class SchedulerActor(SchedulerProbes):
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.model_name = args.model_name or args.model
        self.metrics = ServingMetrics(self.model_name)
        self.metrics_cache = MetricsCache(self.metrics, args.metrics_refresh_s)
        self.actors: list[Any] = []  # Ray handles of the model actors
        self.owner = owner_scope()  # their names: fluidserve-<app>-<replica>-model-<i>
        self.core: SchedulerCore | None = None
        self.capacity: dict[str, Any] = {}
        self.hub = StreamHub(args.stream_interval_s)
        self.dispatchers: list[Dispatcher] = []
        self._loops: list[asyncio.Task] = []
        self._cost_fit: OnlineCostFit | None = None
        self._ready = asyncio.Event()
        self._start_error: str | None = None
        self._start_task: asyncio.Task | None = None
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)

    def _ensure_started(self) -> None:
        # Started from the first call, inside the replica's event loop, in a fresh context: Ray
        # treats calls made in a request's context as that request's children and cancels them
        # when it ends, and the dispatch loops outlive every request.
        if self._start_task is None:
            loop = asyncio.get_running_loop()
            self._start_task = loop.create_task(self._start(), context=contextvars.Context())

    # -- start-up ------------------------------------------------------------------------------
    async def _started(self) -> None:
        """Start on the first call; return once start-up has finished (or failed for good)."""
        self._ensure_started()
        await self._ready.wait()

    async def _start(self) -> None:
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                await self._start_once()
                self._ready.set()
                return
            except Exception as exc:  # surfaced through health(), check_health() and every request
                logger.exception("scheduler start-up failed (attempt %d of %d)", attempt, START_ATTEMPTS)
                self._start_error = f"{type(exc).__name__}: {exc}"
                if attempt < START_ATTEMPTS:
                    await asyncio.sleep(START_BACKOFF_S * 2 ** (attempt - 1))
        self._ready.set()

    async def _start_once(self) -> None:
        self.actors = await create_model_actors(self.args, self.owner)
        # Bounded: a model actor that never finishes loading must not hang every request.
        caps = await asyncio.wait_for(asyncio.gather(*(a.capacity.remote() for a in self.actors)),
                                      CAPACITY_TIMEOUT_S)
        self.capacity = caps[0]
        self.core = self._build_core(caps)
        pool = self.core.workers[0].pool
        self._cost_fit = OnlineCostFit(kv_capacity_tokens=pool.capacity_tokens, block_size=pool.block_size)
        a = self.args
        for i, handle in enumerate(self.actors):
            self.metrics.set_worker_up(i, True)
            self.metrics.set_kv(i, 0, caps[i]["kv_capacity_tokens"])
            self.dispatchers.append(Dispatcher(self.core, i, RayActorLink(handle), self, a.dispatch_depth,
                                               a.step_deadline_floor_s, a.actor_restart_wait_s))
        self._loops = [asyncio.create_task(d.run()) for d in self.dispatchers]
        if a.max_queue_wait_s > 0:
            self._loops.append(asyncio.create_task(self._expire_loop()))
        self._start_error = None

    def _build_core(self, caps: list[dict]) -> SchedulerCore:
        a = self.args
        config = PolicyConfig(max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                              num_workers=len(caps))
        cost = CostModel.load(a.cost_file) if a.cost_file else None
        params = dict(a.policy_args)
        if a.policy in ("nested-wait", "wait"):
            params.setdefault("kv_capacity_tokens", min(c["kv_capacity_tokens"] for c in caps))
        policy = make_policy(a.policy, config, cost=cost, **params)
        total_tokens = sum(c["kv_capacity_tokens"] for c in caps)
        # Default queue bound: a few KV caches' worth of 256-token requests. Past it, 429.
        queue_len = a.max_queue_len or max(64, 4 * total_tokens // 256)
        return SchedulerCore(policy, [c["num_blocks"] for c in caps], caps[0]["block_size"],
                             max_model_len=caps[0]["max_model_len"], max_queue_len=queue_len,
                             max_queued_tokens=a.max_queued_tokens, max_queue_wait_s=a.max_queue_wait_s)

    # -- requests ------------------------------------------------------------------------------
    async def subscribe(self, subscriber_id: str) -> AsyncIterator[dict[str, dict]]:
        """One ingress replica's stream of all its requests' messages (`actors.streams`): first an
        empty acknowledgement (the subscriber exists: `submit` may name it), then batches
        {request_id: {"token_ids": [...], "finish_reason": ...}}. Closing it cancels the
        requests still running (the ingress is gone)."""
        await self._started()
        sub = self.hub.subscribe(subscriber_id)
        try:
            yield {}
            async for batch in self.hub.messages(sub):
                yield batch
        finally:
            self._unsubscribe(sub)

    async def submit(self, request: dict, subscriber_id: str) -> dict:
        """Admit one request whose messages go to `subscriber_id`'s stream: returns
        {"request_id", "prompt_tokens"} or {"error": {"status", "message", "code", ...}}."""
        await self._started()
        sub = self.hub.subscribers.get(subscriber_id)
        if sub is None:
            return {"error": {"status": 503, "code": "resubscribe",
                              "message": "unknown subscriber (the scheduler restarted): subscribe again"}}
        return self._admit(request, sub)

    async def cancel(self, request_id: str) -> None:
        """The client went away: free the request's KV at once."""
        self.hub.close(request_id)
        self._cancel(request_id)

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """Admit one request and stream its tokens, one stream per request (Python callers and
        tests; the ingress multiplexes through `subscribe`): the first item acknowledges
        admission or carries a typed error, later items {"token_ids": [...], "finish_reason": ...}.
        Closing the generator cancels the request."""
        await self._started()
        sub = self.hub.subscribe(uuid.uuid4().hex)
        try:
            first = self._admit(request, sub)
            yield first
            if "error" in first:
                return
            async for batch in self.hub.messages(sub):
                for message in batch.values():
                    yield message
                    if message["finish_reason"] is not None:
                        return
        finally:
            self._unsubscribe(sub)

    def _unsubscribe(self, sub: Subscriber) -> None:
        """The subscriber is gone: its requests still running are cancelled (KV freed at once)."""
        for rid in self.hub.unsubscribe(sub):
            self._cancel(rid)

    def _admit(self, request: dict, sub: Subscriber) -> dict:
        if self._start_error:
            return {"error": {"status": 503, "message": f"the model is not available: {self._start_error}",
                              "code": "service_unavailable"}}
        rid = request.get("request_id") or uuid.uuid4().hex
        try:
            req = self._submit(rid, request)
        except SchedulingError as exc:
            self.metrics.on_reject(exc.code)
            return {"error": {"status": exc.status, "message": str(exc), "code": exc.code,
                              "retry_after_s": getattr(exc, "retry_after_s", None)}}
        self.hub.open(req, sub)
        self.dispatchers[req.worker].poke()
        return {"request_id": rid, "prompt_tokens": req.prompt_len}

    def _submit(self, rid: str, request: dict) -> Request:
        ids = list(request["prompt_token_ids"])
        sampling = SamplingParams(
            temperature=float(request.get("temperature", 0.0)),
            top_p=float(request.get("top_p", 1.0)),
            top_k=int(request.get("top_k", 0)),
            seed=request.get("seed"),
            stop_token_ids=tuple(request.get("stop_token_ids") or ()),
            ignore_eos=bool(request.get("ignore_eos", False)),
            logprobs=bool(request.get("logprobs", False)),
            top_logprobs=int(request.get("top_logprobs") or 0),
        )
        # No max_tokens: up to the context, or the KV cache when that is smaller (else every such
        # request would be rejected as too long for the cache).
        limit = min(self.capacity["max_model_len"], self.capacity["kv_capacity_tokens"])
        max_tokens = request.get("max_tokens") or max(1, limit - len(ids))
        req = Request(rid, len(ids), int(max_tokens), time.monotonic(), prompt_token_ids=ids,
                      sampling=sampling)
        self.core.submit(req, req.arrival_time)
        self.metrics.on_submit(req)
        return req

    async def finish(self, request_id: str, num_tokens: int) -> bool:
        """The ingress found a stop string at output token `num_tokens`: a finish, not a
        cancellation (finish_reason "stop", latency recorded, the policy's length estimate fed
        with the true length). False if the request is no longer running."""
        if self.core is None:
            return False
        req = self.core.finish(request_id, int(num_tokens), time.monotonic())
        if req is None:
            return False
        self.metrics.on_finish(req)
        self.hub.wake(request_id)  # its generator sends the finish and ends
        self.dispatchers[req.worker].poke()  # freed KV may let a waiting request in
        return True

    def _cancel(self, rid: str) -> None:
        req = self.core.cancel(rid, time.monotonic()) if self.core else None
        if req is not None:
            self.metrics.on_cancel(req)
            self.dispatchers[req.worker].poke()  # freed KV may let a waiting request in

    async def _expire_loop(self) -> None:
        """Requests not admitted within max_queue_wait_s get 503 with Retry-After. The core
        expires them before every plan; this also catches them while no plan is made."""
        limit = self.args.max_queue_wait_s
        period = min(1.0, max(0.05, limit / 10))
        while True:
            await asyncio.sleep(period)
            self.core.expired += self.core.expire_waiting(limit, time.monotonic())
            self._fail_expired()

    def _fail_expired(self) -> None:
        expired, self.core.expired = self.core.expired, []
        limit = self.args.max_queue_wait_s
        for req in expired:
            self.hub.fail(req.request_id, f"the request was not admitted within max_queue_wait_s "
                          f"({limit:g} s): the server is overloaded; retry later", status=503,
                          code="queue_timeout", retry_after_s=max(1.0, limit / 4))
            self.metrics.on_failure(req, "queue_timeout")

    # -- what the dispatch loops report (the Sink of actors.dispatch) ---------------------------
    def deliver(self, events: list[TokenEvent]) -> None:
        self.hub.deliver(events)

    def record(self, worker: int, step: ScheduledBatch, result: StepResult,
               events: list[TokenEvent], period_s: float) -> None:
        m = self.metrics
        if self.core.expired:
            self._fail_expired()
        m.on_iteration(worker, result.step_time_s, step.num_new_tokens, len(step))
        if step.evicted:
            m.on_evictions(len(step.evicted))
        if events:
            m.on_batch_tokens([ev.request for ev in events if ev.finish_reason != "error"], time.monotonic())
            for ev in events:
                if ev.finish_reason == "error":
                    m.on_failure(ev.request, "model_error")
                elif ev.finish_reason:
                    m.on_finish(ev.request)
        self._learn_cost(step, period_s)

    def fail(self, requests: list[Request], message: str, reason: str = "model_error", **info) -> None:
        """End these requests with a typed error in their own streams (`info`: see StreamHub.fail)."""
        now = time.monotonic()
        for req in requests:
            self.hub.fail(req.request_id, message, **info)
            if self.core.cancel(req.request_id, now) is not None:
                self.metrics.on_failure(req, reason)

    def actor_up(self, worker: int, up: bool) -> None:
        self.metrics.set_worker_up(worker, up)

    def rerouted(self, moved: list[Request], stranded: list[Request]) -> None:
        self.fail(stranded, "no model actor is available for this request: its actor stays down "
                  "and no other can hold it; retry later", "actor_unavailable", status=503,
                  code="service_unavailable", retry_after_s=5.0)
        for worker in {req.worker for req in moved}:
            self.dispatchers[worker].poke()

    def _learn_cost(self, step: ScheduledBatch, period_s: float) -> None:
        """Fit the iteration-time model online, so thresholds follow the real engine: a step's
        period on its actor (its time plus the gap before it) is what an iteration costs."""
        if not self.args.online_cost_fit:
            return
        model = self._cost_fit.observe(step.num_new_tokens, step.num_attended_kv, period_s)
        if model is not None and hasattr(self.core.policy, "set_cost"):
            self.core.policy.set_cost(model)

    # -- what the ingress asks -----------------------------------------------------------------------
    async def info(self) -> dict:
        await self._started()
        if self._start_error:
            raise RuntimeError(self._start_error)
        return {**self.capacity, "model_name": self.model_name, "policy": self.core.policy.describe(),
                "num_model_actors": len(self.actors)}

    async def check_health(self) -> None:
        """Serve's health check of this replica: unhealthy (Serve replaces it) when start-up
        failed for good or a dispatch loop has ended."""
        self._ensure_started()
        if not self._ready.is_set():
            return
        if self._start_error:
            raise RuntimeError(f"start-up failed: {self._start_error}")
        for task in self._loops:
            if task.done():
                error = None if task.cancelled() else task.exception()
                raise RuntimeError(f"a dispatch loop ended: {error!r}")

    async def health(self) -> dict:
        self._ensure_started()
        if not self._ready.is_set():
            return {"ready": False, "reason": "starting"}
        if self._start_error:
            return {"ready": False, "reason": self._start_error}
        return {"ready": True, **self.core.counts()}

    async def metrics_text(self) -> bytes:
        self._ensure_started()
        return await self.metrics_cache.text(self._refresh_gauges if self.core is not None else None)

    def _refresh_gauges(self) -> None:
        """Gauges are read at render time only: the dispatch loops never update them."""
        counts = self.core.counts()
        self.metrics.set_queue_state(counts["running"], counts["waiting"], counts["paused"])
        for q in self.core.workers:
            self.metrics.set_kv(q.worker, q.pool.num_used_blocks * q.pool.block_size, q.pool.capacity_tokens)
        policy = self.core.policy
        q = self.core.workers[0]
        entries = policy.entry_counts(q) if hasattr(policy, "entry_counts") else [q.num_waiting]
        thresholds = list(getattr(policy, "thresholds", [0.0] * len(entries)))
        rate = policy.rates.rate(time.monotonic()) if hasattr(policy, "rates") else 0.0
        self.metrics.set_policy_state(entries, thresholds[: len(entries)], rate, *self._fluid_numbers(policy, rate))

    def _fluid_numbers(self, policy, rate: float) -> tuple[float, float, float]:
        """(Throughput*, M*, load) of the estimated live load, when a cost model is known."""
        if getattr(policy, "cost", None) is None or rate <= 0 or not policy.lengths.count:
            return 0.0, 0.0, 0.0
        workers = len(self.actors)
        sol = policy.fluid_solution(rate / max(1, workers)).solution
        memory = sol.memory_tokens if sol.stable else float(sol.kv_capacity_tokens)
        return sol.throughput_tok_s * workers, memory, sol.load
