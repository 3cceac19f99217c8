"""The dispatch loop of one model actor: plans sent ahead, results committed, tokens delivered.

    dispatcher = Dispatcher(core, worker, link, sink, depth=2)
    task = loop.create_task(dispatcher.run())
    dispatcher.poke()     # new work arrived (a submit, a cancel)

Up to `depth` plans are in flight: while the actor runs step t, step t+1 already waits in its
queue, so it starts the moment t ends; the loop commits t, delivers its tokens and plans t+2
while t+1 runs (the core plans as if the steps in flight had run, see `scheduler.core`). `link`
reaches the actor (a Ray handle in the scheduler replica, a thread in `LocalEngine`); `sink`
takes what the loop produces (token events, per-step records, failed steps). A step that fails
voids everything in flight: its requests fail (a model error) or, when the actor died, every
resident re-prefills once it is back; the loop never leaves a batch half-applied.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable
from typing import Protocol

from scheduler.core import SchedulerCore, TokenEvent
from scheduler.plan import DiffPlan, ScheduledBatch, StepResult
from scheduler.request import Request
from scheduler.simulate import percentile

logger = logging.getLogger("fluidserve.dispatch")
MAX_GAPS = 100_000  # gaps kept for statistics
# A step's deadline: this many times the cost model's prediction plus the floor (generous: a
# step past it means a hung actor, which is restarted). Steps queued behind it wait their turn.
DEADLINE_FACTOR = 10.0
DEADLINE_FLOOR_S = 30.0
# An actor not back this long after a crash stays dead for now: its requests move to the others.
ACTOR_RESTART_WAIT_S = 30.0
MAX_FAILED_STEPS = 2  # a request in this many steps that raised fails (retried once)
MAX_SAMPLES = 8192  # (new tokens, attended KV, period) of the latest steps, for calibration


class ActorLink(Protocol):
    def submit(self, plan: DiffPlan) -> Awaitable[StepResult]:
        """Send a plan; the actor runs plans in the order they were sent."""

    def classify(self, exc: BaseException) -> str:
        """What a failed step means: "died" (state lost, wait for the actor), "failed" (the
        step raised: its requests fail), "cancelled"."""

    async def wait_until_back(self, give_up_s: float | None = None) -> bool:
        """True once the actor answers again (after a crash and restart); False if it has not
        within `give_up_s` (None: wait for as long as it takes)."""

    def restart(self) -> None:
        """A hung actor (a step past its deadline): kill it so that it is restarted."""


class Sink(Protocol):
    def deliver(self, events: list[TokenEvent]) -> None: ...

    def record(self, worker: int, step: ScheduledBatch, result: StepResult,
               events: list[TokenEvent], period_s: float) -> None: ...

    def fail(self, requests: list[Request], message: str) -> None: ...

    def actor_up(self, worker: int, up: bool) -> None: ...

    def rerouted(self, moved: list[Request], stranded: list[Request]) -> None:
        """An actor stays dead: `moved` now wait on other actors, `stranded` fit nowhere."""


class StepTimeout(Exception):
    """A step did not return before its deadline."""


class DispatchStats:
    """How busy the actor is kept: its step times and the gaps between consecutive steps (on the
    actor's clock)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.iterations = 0
        self.tokens = 0  # sampled tokens (a row voided by a finish in flight counts too)
        self.busy_s = 0.0
        self.first_start: float | None = None
        self.last_end: float | None = None
        self.gaps: deque[float] = deque(maxlen=MAX_GAPS)
        self.samples: deque[tuple[int, int, float]] = deque(maxlen=MAX_SAMPLES)
        self._prev: tuple[int, float] | None = None  # (epoch, end of the previous step)

    def observe(self, step: ScheduledBatch, result: StepResult, pipelined: bool) -> float:
        """Record a step; returns its period: its time on the actor, plus the gap before it when
        it was sent before the previous step ended (else that gap is the actor idling for want
        of work, not a cost of the iteration)."""
        if not result.finished_at:
            return result.step_time_s
        batch, duration = step, result.finished_at - result.started_at
        self.iterations += 1
        self.tokens += len(result.token_ids)
        self.busy_s += duration
        if self.first_start is None:
            self.first_start = result.started_at
        gap = 0.0
        if self._prev is not None and self._prev[0] == result.epoch:
            gap = result.started_at - self._prev[1]
            self.gaps.append(gap)
        self._prev = (result.epoch, result.finished_at)
        self.last_end = result.finished_at
        period = duration + (max(gap, 0.0) if pipelined else 0.0)
        self.samples.append((batch.num_new_tokens, batch.num_attended_kv, period))
        return period

    def summary(self) -> dict:
        wall = (self.last_end - self.first_start) if self.first_start is not None else 0.0
        gaps = list(self.gaps)
        return {
            "iterations": self.iterations, "tokens": self.tokens, "busy_s": self.busy_s, "wall_s": wall,
            "busy_fraction": self.busy_s / wall if wall > 0 else 0.0,
            "gap_p50_ms": percentile(gaps, 50) * 1e3, "gap_p99_ms": percentile(gaps, 99) * 1e3,
            "gap_max_ms": max(gaps, default=float("nan")) * 1e3,
        }


class Dispatcher:
    def __init__(self, core: SchedulerCore, worker: int, link: ActorLink, sink: Sink,
                 depth: int = 2, deadline_floor_s: float = DEADLINE_FLOOR_S,
                 restart_wait_s: float = ACTOR_RESTART_WAIT_S) -> None:
        self.core, self.worker, self.link, self.sink = core, worker, link, sink
        self.depth = max(1, depth)
        self.deadline_floor_s, self.restart_wait_s = deadline_floor_s, restart_wait_s
        # (plan, its result to come, whether it was sent while another step was in flight,
        # the time by which its result must be back)
        self.in_flight: deque[tuple[ScheduledBatch, asyncio.Future, bool, float]] = deque()
        self.stats = DispatchStats()
        self.stopping = False  # stop(): plan nothing more, commit what is in flight, return
        self._poked: asyncio.Future | None = None

    def poke(self) -> None:
        """New work (or freed KV): plan now if the loop is waiting with room in flight."""
        if self._poked is not None and not self._poked.done():
            self._poked.set_result(None)

    def stop(self) -> None:
        self.stopping = True
        self.poke()

    async def run(self) -> None:
        while not (self.stopping and not self.in_flight):
            try:
                await self._cycle()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("dispatch loop of model actor %d failed; continuing", self.worker)
                self._void()
                self.core.reset_worker(self.worker, time.monotonic())
                await asyncio.sleep(0.1)

    async def _cycle(self) -> None:
        self._fill()
        if not self.in_flight:
            if not self.stopping:
                await self._wait(None, self._idle_timeout())
            return
        step, future, pipelined, deadline = self.in_flight[0]
        if len(self.in_flight) < self.depth and not future.done():
            await self._wait(future, max(0.0, deadline - time.monotonic()))  # a result, or new work
            if not future.done():
                if time.monotonic() >= deadline:
                    await self._failed(step, StepTimeout(f"step {step.iteration} passed its deadline"))
                return
        if not future.done():
            # asyncio.wait neither cancels the step on a timeout nor when this loop is cancelled.
            await asyncio.wait((future,), timeout=max(0.0, deadline - time.monotonic()))
            if not future.done():
                await self._failed(step, StepTimeout(f"step {step.iteration} passed its deadline"))
                return
        if future.cancelled():
            await self._failed(step, asyncio.CancelledError())
            return
        error = future.exception()
        if error is not None:  # classified by the link
            await self._failed(step, error)
            return
        result = future.result()
        self.in_flight.popleft()
        self._commit(step, result, pipelined)

    def _fill(self) -> None:
        while len(self.in_flight) < self.depth and not self.stopping:
            step = self.core.plan(self.worker, time.monotonic())
            if step is None:
                return
            now = time.monotonic()
            start = max(now, self.in_flight[-1][3]) if self.in_flight else now
            self.in_flight.append((step, self.link.submit(step.wire), bool(self.in_flight),
                                   start + self._budget(step)))

    def _commit(self, step: ScheduledBatch, result: StepResult, pipelined: bool) -> None:
        events = self.core.commit(step, result, time.monotonic())
        self.sink.deliver(events)
        self._fill()  # the next plan goes out before the bookkeeping below
        period = self.stats.observe(step, result, pipelined)
        self.sink.record(self.worker, step, result, events, period)

    def _budget(self, step: ScheduledBatch) -> float:
        """How long a step may take: generous, from the cost model when there is one."""
        cost = getattr(self.core.policy, "cost", None)
        predicted = cost.iteration_time(step.num_new_tokens, step.num_attended_kv) if cost is not None else 0.0
        return DEADLINE_FACTOR * predicted + self.deadline_floor_s

    def _idle_timeout(self) -> float | None:
        wake = self.core.next_wake(self.worker)
        return None if wake is None else max(0.0, wake - time.monotonic())

    async def _wait(self, future: asyncio.Future | None, timeout: float | None) -> None:
        self._poked = asyncio.get_running_loop().create_future()
        try:
            waits = {self._poked} if future is None else {self._poked, future}
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._poked = None

    async def _failed(self, step: ScheduledBatch, exc: BaseException) -> None:
        """The step did not run: void everything in flight, then recover."""
        kind = "hung" if isinstance(exc, StepTimeout) else self.link.classify(exc)
        self._void()
        if kind == "failed":
            # The actor contains errors of the forward pass and sampling itself (the rows that
            # cause them fail alone, see ModelActor.execute); a step that still raises failed
            # outside that (a plan the actor refused): the actor is reset and the step's requests
            # re-prefill once; one in a second failed step fails.
            logger.error("model actor %d failed a step: %s", self.worker, exc)
            for req in step.requests:
                req.num_failed_steps += 1
            doomed = [r for r in step.requests if r.num_failed_steps >= MAX_FAILED_STEPS]
            if doomed:
                self.sink.fail(doomed, f"model error: {_cause(exc)!r}")
        if kind == "hung":
            logger.error("model actor %d: %s; restarting it", self.worker, exc)
            self.link.restart()
        affected = self.core.reset_worker(self.worker, time.monotonic())
        if kind in ("died", "hung"):
            logger.warning("model actor %d died; %d requests will re-prefill", self.worker, len(affected))
            self.sink.actor_up(self.worker, False)
            if not await self.link.wait_until_back(self.restart_wait_s):
                await self._stays_dead()
            logger.warning("model actor %d is back", self.worker)
            self.sink.actor_up(self.worker, True)

    async def _stays_dead(self) -> None:
        """Move this actor's requests to the healthy ones (or fail them when none can hold
        them), route nothing here, and wait for it to come back after all."""
        moved, stranded = self.core.set_worker_down(self.worker, time.monotonic())
        logger.error("model actor %d is still down after %.0f s: %d requests move to other actors, "
                     "%d fit nowhere", self.worker, self.restart_wait_s, len(moved), len(stranded))
        self.sink.rerouted(moved, stranded)
        await self.link.wait_until_back(None)
        self.core.set_worker_up(self.worker)

    def _void(self) -> None:
        for _, future, _, _ in self.in_flight:
            future.add_done_callback(_retrieve)  # their late outcomes mean nothing now
        self.in_flight.clear()


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _cause(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc
