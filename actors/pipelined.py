"""Model actors for Ray whose steps run back to back on their own thread.

A plain (synchronous) Ray actor takes its next call only after the previous one has returned:
the result is serialized and sent, then the next plan is received and deserialized, and the
accelerator waits through all of it. `pipelined(ModelActor)` makes `execute` a coroutine that
hands the plan to one worker thread and awaits the result: Ray's event loop receives step t+1
and sends step t's result while the worker runs.

An async Ray actor may start calls out of order, and diff plans must run in order: each plan
names the one sent before it (`DiffPlan.prev_iteration`, within its epoch), and `PlanOrder`
holds a plan back until that one has gone to the step thread. Other methods (capacity, health,
pid) are answered on the event loop, also while a step runs.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

# Calls an actor serves at once: the plans in flight plus health probes and the like.
MAX_CONCURRENCY = 32
# A plan whose predecessor never comes (lost with a crash) runs after this anyway; its checks
# then refuse it if it does not fit the state, and the scheduler resets the actor.
ORDER_TIMEOUT_S = 10.0


class PlanOrder:
    """Starts diff plans in the order the scheduler sent them."""

    def __init__(self) -> None:
        self.last: tuple[int, int] | None = None  # (epoch, iteration) of the last plan started
        self.waiting: dict[tuple[int, int], asyncio.Future] = {}

    async def turn(self, plan) -> None:
        """Return when `plan` may start: its predecessor has started (or it has none)."""
        prev = getattr(plan, "prev_iteration", -1)
        if prev < 0 or self.last == (plan.epoch, prev):
            return
        if self.last is not None and (plan.epoch, plan.iteration) <= self.last:
            return  # older than what already ran: a stale plan (its checks refuse it)
        future = self.waiting.setdefault((plan.epoch, prev), asyncio.get_running_loop().create_future())
        try:
            await asyncio.wait_for(asyncio.shield(future), ORDER_TIMEOUT_S)
        except asyncio.TimeoutError:
            pass
        finally:
            self.waiting.pop((plan.epoch, prev), None)

    def started(self, plan) -> None:
        if not hasattr(plan, "epoch"):
            return  # a self-contained plan: no order to keep
        self.last = (plan.epoch, plan.iteration)
        future = self.waiting.get(self.last)
        if future is not None and not future.done():
            future.set_result(None)


def pipelined(actor_class: type) -> type:
    """A subclass of `actor_class` (same name, so Ray's process title stays) whose `execute`
    runs on a single step thread, in the order the plans were sent."""

    async def execute(self, plan):
        state = self.__dict__
        if "_step_thread" not in state:
            state["_step_thread"] = ThreadPoolExecutor(1, thread_name_prefix="steps")
            state["_plan_order"] = PlanOrder()
        order: PlanOrder = state["_plan_order"]
        await order.turn(plan)
        step = asyncio.get_running_loop().run_in_executor(state["_step_thread"], actor_class.execute, self, plan)
        order.started(plan)
        return await step

    return type(actor_class.__name__, (actor_class,), {"execute": execute, "__doc__": actor_class.__doc__})
