"""The central scheduler: one SchedulerCore for the whole deployment, one dispatch loop per
model actor (plan -> execute -> commit -> stream tokens).

Runs as the single replica of a Serve deployment. Requests arrive through `generate`, an async
generator: the first item acknowledges admission (or carries a typed error), later items carry
token ids as the model actors produce them. Closing the generator (client gone) cancels the
request and frees its KV at once. A model actor that dies mid-iteration is restarted by Ray; its
requests re-prefill their prompt plus the tokens already streamed, so streams just continue.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.model_actor import RAY_NAMESPACE, ModelActor, actor_name
from monitoring.metrics import ServingMetrics
from scheduler.core import SchedulerCore, TokenEvent
from scheduler.cost import CostModel, OnlineCostFit
from scheduler.errors import SchedulingError
from scheduler.plan import Plan
from scheduler.policies import PolicyConfig, make_policy
from scheduler.request import Request, SamplingParams

logger = logging.getLogger("fluidserve.scheduler")

COST_REFIT_EVERY = 64  # iterations between online refits of the cost model
COST_WINDOW = 2048  # most recent iterations the fit uses
STALE_ACTOR_TIMEOUT_S = 60.0  # how long a dead scheduler's model actor may take to go away
RESTART_PROBE_TIMEOUT_S = 60.0  # one health probe of a restarting model actor (it reloads the model)


@dataclass
class EngineArgs:
    """Everything the scheduler needs to build the model actors and the core."""

    model: str = "default"
    policy: str = "nested-wait"
    policy_args: dict = field(default_factory=dict)
    num_model_actors: int = 1
    model_actor_resources: dict = field(default_factory=lambda: {"num_cpus": 1, "num_gpus": 0})
    kv_cache_tokens: int = 16384  # CPU model actors: the KV cache in tokens
    gpu_memory_utilization: float = 0.9  # GPU model actors: vLLM's fraction of total memory
    kv_cache_memory_fraction: float | None = None  # deprecated name of gpu_memory_utilization
    enforce_eager: bool = False  # no CUDA graphs (vLLM's flag)
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    max_queue_len: int = 0  # 0: sized from the KV capacity
    dtype: str = "auto"
    attention: str = "auto"
    cost_file: str | None = None
    model_name: str | None = None  # the name clients pass as `model` (default: model)
    # After a stream's first token, send its tokens at most this often (like Ray Serve LLM's
    # stream batching): at GPU speed every iteration would otherwise be one message per request
    # through Serve. 0 sends every iteration's token at once.
    stream_interval_s: float = 0.05


class SchedulerActor:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.model_name = args.model_name or args.model
        self.metrics = ServingMetrics(self.model_name)
        self.workers: list[Any] = []
        self.core: SchedulerCore | None = None
        self.capacity: dict[str, Any] = {}
        self.streams: dict[str, asyncio.Queue] = {}
        self._wakeups: list[asyncio.Event] = []
        self._loops: list[asyncio.Task] = []
        self._ready = asyncio.Event()
        self._start_error: str | None = None
        self._start_task: asyncio.Task | None = None

    def _ensure_started(self) -> None:
        # Started from the first call, inside the replica's event loop, in a fresh context: Ray
        # treats calls made in a request's context as that request's children and cancels them
        # when it ends, and the dispatch loops outlive every request.
        if self._start_task is None:
            loop = asyncio.get_running_loop()
            self._start_task = loop.create_task(self._start(), context=contextvars.Context())

    # -- start-up ------------------------------------------------------------------------------
    async def _start(self) -> None:
        try:
            self.workers = await self._create_model_actors()
            caps = await asyncio.gather(*(w.capacity.remote() for w in self.workers))
            self.capacity = caps[0]
            self.core = self._build_core(caps)
            pool = self.core.workers[0].pool
            self._cost_fit = OnlineCostFit(kv_capacity_tokens=pool.capacity_tokens, block_size=pool.block_size)
            for i in range(len(self.workers)):
                self._wakeups.append(asyncio.Event())
                self.metrics.set_worker_up(i, True)
                self.metrics.set_kv(i, 0, caps[i]["kv_capacity_tokens"])
            self._loops = [asyncio.create_task(self._dispatch(i)) for i in range(len(self.workers))]
            self._ready.set()
        except Exception as exc:  # surfaced through health() and every request
            logger.exception("scheduler start-up failed")
            self._start_error = f"{type(exc).__name__}: {exc}"
            self._ready.set()

    async def _create_model_actors(self) -> list[Any]:
        a = self.args
        res = dict(a.model_actor_resources)
        num_gpus, num_cpus = float(res.get("num_gpus", 0)), float(res.get("num_cpus", 1))
        threads = max(1, int(num_cpus))
        actor_cls = ray.remote(ModelActor)
        strategy = None
        if num_gpus > 0:
            # One bundle per GPU so each model actor gets a whole device (SPREAD over nodes).
            pg = placement_group([{"GPU": num_gpus, "CPU": num_cpus}] * a.num_model_actors, strategy="PACK")
            await asyncio.wait_for(pg.ready(), timeout=600)
            strategy = pg
        workers = []
        for i in range(a.num_model_actors):
            await _kill_stale(actor_name(i))
            options = dict(
                name=actor_name(i), namespace=RAY_NAMESPACE, num_cpus=num_cpus, num_gpus=num_gpus,
                max_restarts=-1, max_task_retries=0, max_concurrency=1,
                # Idle OpenMP threads spin and steal the cores other actors need.
                runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}},
            )
            if strategy is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(strategy, i)
            workers.append(actor_cls.options(**options).remote(
                model=a.model, worker_id=i, kv_cache_tokens=a.kv_cache_tokens,
                gpu_memory_utilization=a.gpu_memory_utilization,
                kv_cache_memory_fraction=a.kv_cache_memory_fraction, block_size=a.block_size,
                dtype=a.dtype, attention=a.attention, num_threads=threads,
                max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                enforce_eager=a.enforce_eager,
            ))
        return workers

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
                             max_model_len=caps[0]["max_model_len"], max_queue_len=queue_len)

    # -- requests ------------------------------------------------------------------------------
    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """Admit one request and stream its tokens: {"token_ids": [...], "finish_reason": ...}."""
        self._ensure_started()
        await self._ready.wait()
        if self._start_error:
            yield {"error": {"status": 503, "message": f"the model is not available: {self._start_error}",
                             "code": "service_unavailable"}}
            return
        rid = request.get("request_id") or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        try:
            req = self._submit(rid, request)
        except SchedulingError as exc:
            self.metrics.on_reject(exc.code)
            yield {"error": {"status": exc.status, "message": str(exc), "code": exc.code,
                             "retry_after_s": getattr(exc, "retry_after_s", None)}}
            return
        self.streams[rid] = queue
        self._wakeups[req.worker].set()
        finished = False
        try:
            yield {"request_id": rid, "prompt_tokens": req.prompt_len}
            last_sent: float | None = None  # the first token goes out at once (TTFT)
            while not finished:
                out = await next_message(queue, last_sent, self.args.stream_interval_s)
                finished = out["finish_reason"] is not None
                yield out
                last_sent = time.monotonic()
        finally:
            self.streams.pop(rid, None)
            if not finished:
                self._cancel(rid)

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

    def _cancel(self, rid: str) -> None:
        req = self.core.cancel(rid, time.monotonic()) if self.core else None
        if req is not None:
            self.metrics.on_cancel(req)
            self._update_gauges()
            self._wakeups[req.worker].set()

    # -- the dispatch loop, one per model actor ---------------------------------------------------
    async def _dispatch(self, w: int) -> None:
        while True:
            try:
                plan = self.core.plan(w, time.monotonic())
                if plan is None:
                    await self._idle(w)
                    continue
                started = time.monotonic()
                result = await self._execute(w, plan)
                if result is None:
                    continue
                events = self.core.commit(plan, result, time.monotonic())
                self._deliver(events)
                self._record(w, plan, result, events, time.monotonic() - started)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Never leave a plan half-applied: its requests re-prefill from what they have.
                logger.exception("dispatch loop of model actor %d failed; continuing", w)
                self.core.reset_worker(w, time.monotonic())
                await asyncio.sleep(0.1)

    async def _idle(self, w: int) -> None:
        wake = self.core.next_wake(w)
        timeout = None if wake is None else max(0.0, wake - time.monotonic())
        event = self._wakeups[w]
        event.clear()
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _execute(self, w: int, plan: Plan):
        try:
            return await self.workers[w].execute.remote(plan)
        except TaskCancelledError:
            self.core.reset_worker(w, time.monotonic())
            return None
        except (RayActorError, RayTaskError) as exc:
            if isinstance(exc, RayTaskError) and not isinstance(exc.cause, RayActorError):
                # The model raised (a bug or a bad plan): fail these requests, keep serving.
                logger.error("model actor %d failed a step: %s", w, exc)
                self._fail(plan, f"model error: {exc.cause!r}")
                return None
            await self._recover(w)
            return None

    async def _recover(self, w: int) -> None:
        """The model actor died: its KV is gone. Re-queue its requests and wait for Ray's restart."""
        affected = self.core.reset_worker(w, time.monotonic())
        logger.warning("model actor %d died; %d requests will re-prefill", w, len(affected))
        self.metrics.set_worker_up(w, False)
        # Ray restarts the actor (max_restarts=-1) and it reloads the model; calls made meanwhile
        # fail or wait, so probe until one answers.
        while True:
            try:
                await asyncio.wait_for(self.workers[w].health.remote(), timeout=RESTART_PROBE_TIMEOUT_S)
                break
            except (RayActorError, asyncio.TimeoutError):
                await asyncio.sleep(0.5)
        logger.warning("model actor %d is back", w)
        self.metrics.set_worker_up(w, True)

    def _fail(self, plan: Plan, message: str) -> None:
        for chunk in plan.chunks:
            queue = self.streams.get(chunk.request_id)
            self.core.cancel(chunk.request_id, time.monotonic())
            if queue is not None:
                queue.put_nowait({"error": message})

    def _deliver(self, events: list[TokenEvent]) -> None:
        for ev in events:
            queue = self.streams.get(ev.request.request_id)
            if queue is not None:
                queue.put_nowait(ev)

    def _record(self, w: int, plan: Plan, result, events: list[TokenEvent], wall_s: float) -> None:
        m = self.metrics
        m.on_iteration(w, result.step_time_s, plan.num_new_tokens, len(plan.chunks))
        if plan.evicted:
            m.on_evictions(len(plan.evicted))
        if events:
            m.on_batch_tokens([ev.request for ev in events], time.monotonic())
            for ev in events:
                if ev.finish_reason:
                    m.on_finish(ev.request)
        self._update_gauges()
        self._learn_cost(plan, wall_s)

    def _update_gauges(self) -> None:
        counts = self.core.counts()
        self.metrics.set_queue_state(counts["running"], counts["waiting"], counts["paused"])
        for q in self.core.workers:
            self.metrics.set_kv(q.worker, q.pool.num_used_blocks * q.pool.block_size, q.pool.capacity_tokens)

    def _learn_cost(self, plan: Plan, wall_s: float) -> None:
        """Fit the iteration-time model online, so thresholds follow the real engine. The wall
        time of the whole round (dispatch, model, commit) is what an iteration costs a request."""
        model = self._cost_fit.observe(plan.num_new_tokens, plan.num_attended_kv, wall_s)
        if model is not None and hasattr(self.core.policy, "set_cost"):
            self.core.policy.set_cost(model)

    # -- what the ingress asks -----------------------------------------------------------------------
    async def info(self) -> dict:
        self._ensure_started()
        await self._ready.wait()
        if self._start_error:
            raise RuntimeError(self._start_error)
        return {**self.capacity, "model_name": self.model_name, "policy": self.core.policy.describe(),
                "num_model_actors": len(self.workers)}

    async def health(self) -> dict:
        self._ensure_started()
        if not self._ready.is_set():
            return {"ready": False, "reason": "starting"}
        if self._start_error:
            return {"ready": False, "reason": self._start_error}
        return {"ready": True, **self.core.counts()}

    async def metrics_text(self) -> bytes:
        self._ensure_started()
        if self.core is not None:
            self._update_gauges()
            self._set_policy_gauges()
        return self.metrics.render()

    def _set_policy_gauges(self) -> None:
        policy = self.core.policy
        q = self.core.workers[0]
        entries = policy.entry_counts(q) if hasattr(policy, "entry_counts") else [q.num_waiting]
        thresholds = list(getattr(policy, "thresholds", [0.0] * len(entries)))
        rate = policy.rates.rate(time.monotonic()) if hasattr(policy, "rates") else 0.0
        fluid = self._fluid_numbers(policy, rate)
        self.metrics.set_policy_state(entries, thresholds[: len(entries)], rate, *fluid)

    def _fluid_numbers(self, policy, rate: float) -> tuple[float, float, float]:
        """(Throughput*, M*, load) of the estimated live load, when a cost model is known."""
        if getattr(policy, "cost", None) is None or rate <= 0 or not policy.lengths.count:
            return 0.0, 0.0, 0.0
        summary = policy.fluid_solution(rate / max(1, len(self.workers)))
        sol = summary.solution
        workers = len(self.workers)
        memory = sol.memory_tokens if sol.stable else float(sol.kv_capacity_tokens)
        return sol.throughput_tok_s * workers, memory, sol.load

    async def debug_state(self) -> dict:
        """Counts for tests: KV blocks in use per model actor, queue lengths."""
        self._ensure_started()
        await self._ready.wait()
        return {
            "used_blocks": [q.pool.num_used_blocks for q in self.core.workers],
            "requests": len(self.core.requests),
            "streams": len(self.streams),
            "iterations": self.core.iterations,
            "evictions": self.core.num_evictions,
            "busy": [q.busy for q in self.core.workers],
            "next_wake_in_s": [None if (t := self.core.next_wake(i)) is None else t - time.monotonic()
                               for i in range(len(self.core.workers))],
            # A few requests' progress, to tell a stall from slow progress.
            "sample": {r.request_id[:8]: (r.state.value, r.worker, r.num_computed_tokens, r.prefill_target,
                                          r.num_generated) for r in list(self.core.requests.values())[:8]},
            **self.core.counts(),
        }


async def next_message(queue: asyncio.Queue, last_sent: float | None, interval_s: float) -> dict:
    """A stream's next message: everything queued for it, held back until `interval_s` after
    the previous message (the first token, `last_sent` None, and the last one go at once)."""
    items = [await queue.get()]
    if last_sent is not None and not _final(items[-1]):
        wait = last_sent + interval_s - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
    while not queue.empty():
        items.append(queue.get_nowait())
    return _merge(items)


def _final(item) -> bool:
    """A queued item that ends its stream (the last token, or a failed step)."""
    return isinstance(item, dict) or item.finish_reason is not None


def _merge(items: list) -> dict:
    """Everything queued for one stream since it last yielded, as one message."""
    token_ids, logprobs, reason = [], [], None
    for ev in items:
        if isinstance(ev, dict):  # a failed step
            return {"token_ids": token_ids, "finish_reason": "error", "logprobs": logprobs,
                    "error": ev["error"]}
        token_ids.append(ev.token_id)
        logprobs.append(ev.logprob)
        reason = ev.finish_reason or reason
    return {"token_ids": token_ids, "finish_reason": reason, "logprobs": logprobs}


async def _kill_stale(name: str, timeout_s: float = STALE_ACTOR_TIMEOUT_S) -> None:
    """A model actor left by a previous scheduler replica holds the name: kill it, then wait
    until the GCS releases the name (ray.kill is asynchronous; creating the new actor before
    that fails with "name already taken")."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            stale = ray.get_actor(name, namespace=RAY_NAMESPACE)
        except ValueError:
            return  # the name is free
        if time.monotonic() > deadline:
            raise RuntimeError(f"the stale model actor {name!r} did not go away in {timeout_s:.0f} s")
        logger.warning("killing the stale model actor %s left by a previous scheduler", name)
        ray.kill(stale, no_restart=True)
        await asyncio.sleep(0.2)
