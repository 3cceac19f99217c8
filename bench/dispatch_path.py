"""The scheduler's whole per-iteration path in one process: what one scheduler core spends per step.

The real `SchedulerActor` (core, policy, stream delivery, metrics, online cost fit) and `batch`
streams of one ingress replica, submitted and followed through one `subscribe` stream as the
ingress does, against a simulated model actor with the A100 preset's timing. Two ways:

* `measure_steps`: the path step by step on a virtual clock that advances by the modelled step
  time, each phase timed with perf_counter (plan, pickling the plan, unpickling the result,
  commit, delivery, records, the subscriber building its batch); the actor's own work is not counted. This is
  the intrinsic cost, free of the event loop's idle wakeups and of the neighbours' cache
  pollution on a shared box.
* `measure`: the real dispatch loop (`actors.dispatch.Dispatcher`) in real time, the actor in a
  worker thread behind a link that pickles every plan and result as Ray does; the event loop
  thread's CPU time per iteration, everything included (on a busy 2-core box every wakeup of an
  idle loop costs ~100 us of CPU: caches are cold), plus the actor's busy fraction and gaps.

What Ray's own call machinery costs per call is measured apart (`ray_call_cpu_us`).
"""
from __future__ import annotations

import asyncio
import cProfile
import io
import pickle
import pstats
import statistics
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from actors.dispatch import Dispatcher
from actors.placement import EngineArgs
from actors.scheduler_actor import SchedulerActor
from actors.sim_actor import SimModelActor
from actors.streams import StreamHub
from scheduler.cost import OnlineCostFit
from scheduler.plan import DiffPlan, StepResult

PROMPT_LEN = 128  # 256 of them plus their outputs stay well inside the A100 preset's KV
MAX_TOKENS = 4096 - PROMPT_LEN  # Llama-2's context: every stream outlasts the measurement


class PicklingThreadLink:
    """A model actor in a worker thread; plans and results cross as pickled bytes, as through
    Ray (the pickling on the scheduler's side runs on the event loop thread, as in Ray)."""

    def __init__(self, actor) -> None:
        self.actor = actor
        self.pool = ThreadPoolExecutor(1)

    def _run(self, data: bytes) -> bytes:
        return pickle.dumps(self.actor.execute(pickle.loads(data)), protocol=5)

    def submit(self, plan: DiffPlan) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        out = loop.create_future()
        done = loop.run_in_executor(self.pool, self._run, pickle.dumps(plan, protocol=5))
        done.add_done_callback(lambda f: out.done() or out.set_result(pickle.loads(f.result())))
        return out

    @staticmethod
    def classify(exc: BaseException) -> str:
        return "failed"

    async def wait_until_back(self) -> None:
        return None


def in_process_scheduler(args: EngineArgs, actor) -> SchedulerActor:
    """A SchedulerActor wired to an in-process actor (no Ray), ready to serve `submit` and `subscribe`."""
    sched = SchedulerActor(args)
    cap = actor.capacity()
    sched.capacity = cap
    sched.core = sched._build_core([cap])
    sched._cost_fit = OnlineCostFit(kv_capacity_tokens=cap["kv_capacity_tokens"], block_size=cap["block_size"])
    sched.dispatchers = [Dispatcher(sched.core, 0, PicklingThreadLink(actor), sched, args.dispatch_depth)]
    sched._start_task = asyncio.get_running_loop().create_future()  # started: no Ray actors to create
    sched._ready.set()
    return sched


class Consumers:
    """`batch` streams of one ingress replica: one subscription to the scheduler carries all of
    their messages (as `deploy.scheduler_stream.Subscription` does); counts: tokens, per-request
    messages, batches (Serve messages)."""

    def __init__(self, sched: SchedulerActor, batch: int, max_tokens: int) -> None:
        self.sched, self.batch, self.max_tokens = sched, batch, max_tokens
        self.counts = [0, 0, 0]
        self.task: asyncio.Task | None = None
        self.subscription = None

    async def start(self) -> None:
        self.subscription = self.sched.subscribe("bench")
        await self.subscription.__anext__()  # acknowledged: submit may name it
        self.task = asyncio.create_task(self._read(self.subscription))
        for i in range(self.batch):
            body = {"prompt_token_ids": [1000 + i] * PROMPT_LEN, "max_tokens": self.max_tokens,
                    "ignore_eos": True}
            first = await self.sched.submit(body, "bench")
            if "error" in first:
                raise RuntimeError(f"request rejected: {first['error']}")

    async def _read(self, subscription) -> None:
        async for batch in subscription:
            self.counts[2] += 1
            for message in batch.values():
                self.counts[0] += len(message["token_ids"])
                self.counts[1] += 1

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.subscription.aclose()  # the scheduler unsubscribes and cancels the streams


async def _measure(batch: int, iterations: int, policy: str, interval_s: float, depth: int,
                   sleep: bool, profile: bool) -> dict:
    args = EngineArgs(model="sim:a100-llama2-7b", policy=policy, max_num_seqs=batch,
                      stream_interval_s=interval_s, dispatch_depth=depth, max_queue_len=10 * batch)
    sched = in_process_scheduler(args, SimModelActor(sleep=sleep))
    dispatcher = sched.dispatchers[0]
    consumers = Consumers(sched, batch, MAX_TOKENS)
    counts = consumers.counts
    await consumers.start()
    loop_task = asyncio.create_task(dispatcher.run())
    q = sched.core.workers[0]
    while q.num_waiting or q.prefilling or len(q.resident) < batch:
        await asyncio.sleep(0.01)  # until every request decodes
    for _ in range(20):
        await asyncio.sleep(0)
    start_iter, tokens0 = sched.core.iterations[0], counts[0]
    dispatcher.stats.reset()
    profiler = cProfile.Profile() if profile else None
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    if profiler:
        profiler.enable()
    while sched.core.iterations[0] - start_iter < iterations:
        await asyncio.sleep(0.1)  # rarely: this thread's CPU is what is measured
    if profiler:
        profiler.disable()
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    done = sched.core.iterations[0] - start_iter
    stats = dispatcher.stats.summary()
    loop_task.cancel()
    await asyncio.gather(loop_task, return_exceptions=True)
    await consumers.stop()
    out = {
        "policy": policy, "batch": batch, "depth": depth, "stream_interval_s": interval_s,
        "iterations": done, "scheduler_cpu_us_per_iteration": cpu * 1e6 / done,
        "cpu_us_per_request": cpu * 1e6 / done / batch, "wall_s": wall,
        "streamed_tokens_per_iteration": (counts[0] - tokens0) / done,
        "actor_busy_fraction": stats["busy_fraction"], "gap_p50_ms": stats["gap_p50_ms"],
        "gap_p99_ms": stats["gap_p99_ms"],
    }
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
        out["profile"] = text.getvalue()
    return out


class VirtualClock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


async def _measure_steps(batch: int, iterations: int, policy: str, interval_s: float,
                         depth: int) -> dict:
    clock = VirtualClock()
    args = EngineArgs(model="sim:a100-llama2-7b", policy=policy, max_num_seqs=batch,
                      stream_interval_s=interval_s, dispatch_depth=depth, max_queue_len=10 * batch)
    actor = SimModelActor(sleep=False)
    sched = in_process_scheduler(args, actor)
    sched.hub = StreamHub(interval_s, clock=clock, timer=False)
    core, hub = sched.core, sched.hub
    consumers = Consumers(sched, batch, MAX_TOKENS)
    counts = consumers.counts
    await consumers.start()
    rows: list[list[float]] = []  # per measured iteration: the seconds of each phase
    in_flight: deque = deque()
    q = core.workers[0]
    measuring = False
    while len(rows) < iterations:
        planning = [0.0, 0.0]
        t0 = time.perf_counter()
        while len(in_flight) < depth and (step := core.plan(0, clock())) is not None:
            t1 = time.perf_counter()
            in_flight.append((step, pickle.dumps(step.wire, protocol=5)))
            planning[0] += t1 - t0
            t0 = time.perf_counter()
            planning[1] += t0 - t1
        step, data = in_flight.popleft()
        reply = pickle.dumps(actor.execute(pickle.loads(data)), protocol=5)  # the actor's work
        t0 = time.perf_counter()
        result = pickle.loads(reply)
        t1 = time.perf_counter()
        clock.now += result.step_time_s
        events = core.commit(step, result, clock())
        t2 = time.perf_counter()
        hub.deliver(events)
        hub.flush_due(clock())
        t3 = time.perf_counter()
        sched.record(0, step, result, events, result.step_time_s)
        t4 = time.perf_counter()
        for _ in range(2):
            await asyncio.sleep(0)  # the woken streams build and send their messages
        t5 = time.perf_counter()
        if measuring:
            rows.append([*planning, t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4])
        elif not (q.num_waiting or q.prefilling) and len(q.resident) == batch:
            measuring = True  # every request decodes: the steady state starts
            tokens0, messages0, batches0 = counts
    await consumers.stop()
    # Medians: on a shared box other processes only ever add time (and cold caches after them).
    per_phase = {f"{name}_us": statistics.median(r[k] for r in rows) * 1e6 for k, name in enumerate(PHASES)}
    total = statistics.median(sum(r) for r in rows) * 1e6
    return {"policy": policy, "batch": batch, "depth": depth, "stream_interval_s": interval_s,
            "iterations": len(rows), "scheduler_cpu_us_per_iteration": total,
            "mean_us_per_iteration": statistics.fmean(sum(r) for r in rows) * 1e6,
            "cpu_us_per_request": total / batch, **per_phase,
            "tokens_per_iteration": (counts[0] - tokens0) / len(rows),
            "messages_per_iteration": (counts[1] - messages0) / len(rows),
            "serve_messages_per_iteration": (counts[2] - batches0) / len(rows),
            "modelled_step_ms": result.step_time_s * 1e3}


PHASES = ("plan", "pickle_plan", "unpickle_result", "commit", "deliver", "record", "stream_wakeups")


def measure_steps(batch: int = 256, iterations: int = 300, policy: str = "sarathi",
                  interval_s: float = 0.05, depth: int = 2) -> dict:
    """The intrinsic per-iteration cost, phase by phase (see the module doc)."""
    return asyncio.run(_measure_steps(batch, iterations, policy, interval_s, depth))


def measure(batch: int = 256, iterations: int = 200, policy: str = "sarathi", interval_s: float = 0.05,
            depth: int = 2, sleep: bool = True, profile: bool = False) -> dict:
    """One run of the in-process path at a steady decode batch of `batch`."""
    return asyncio.run(_measure(batch, iterations, policy, interval_s, depth, sleep, profile))


def ray_call_cpu_us(calls: int = 300) -> float:
    """CPU time of this process per `actor.execute.remote(plan)` round trip with a steady-state
    decode plan of 256 rows and its result (Ray's serialization, submission, reply)."""
    import ray

    from scheduler.plan import int_array

    @ray.remote(num_cpus=0)
    class Echo:
        def execute(self, plan: DiffPlan) -> StepResult:
            return StepResult(plan.worker, plan.iteration, int_array(range(plan.num_rows)))

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actor = Echo.remote()
        plan = DiffPlan(0, 1, 0, 16, slots=int_array(range(256)), num_tokens=int_array([1] * 256),
                        start_pos=int_array(range(1000, 1256)))
        for _ in range(20):
            ray.get(actor.execute.remote(plan))
        cpu = time.process_time()
        for _ in range(calls):
            ray.get(actor.execute.remote(plan))
        return (time.process_time() - cpu) * 1e6 / calls
    finally:
        if started:
            ray.shutdown()
