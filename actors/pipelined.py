"""Model actors for Ray whose steps run back to back on their own thread.

A plain (synchronous) Ray actor takes its next call only after the previous one has returned:
the result is serialized and sent, then the next plan is received and deserialized, and the
accelerator waits through all of it. `pipelined(ModelActor)` makes `execute` a coroutine that
hands the plan to one worker thread and awaits the result: Ray's event loop receives step t+1
and sends step t's result while the worker runs, and steps start in the order they were sent
(Ray starts an async actor's calls in submission order; the thread takes them FIFO). Other
methods (capacity, health, pid) are answered on the event loop, also while a step runs.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

# Calls an actor serves at once: the plans in flight plus health probes and the like.
MAX_CONCURRENCY = 32


def pipelined(actor_class: type) -> type:
    """A subclass of `actor_class` (same name, so Ray's process title stays) whose `execute`
    runs on a single step thread."""

    async def execute(self, plan):
        steps = self.__dict__.get("_step_thread")
        if steps is None:
            steps = self._step_thread = ThreadPoolExecutor(1, thread_name_prefix="steps")
        return await asyncio.get_running_loop().run_in_executor(steps, actor_class.execute, self, plan)

    return type(actor_class.__name__, (actor_class,), {"execute": execute, "__doc__": actor_class.__doc__})
