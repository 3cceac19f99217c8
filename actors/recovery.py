"""How the scheduler reaches one model actor through Ray, and what it does when that fails.

`RayActorLink` sends plans (`execute.remote`) and classifies failures for the dispatch loop: a
dead actor ("died": its KV is gone; Ray restarts it, `max_restarts=-1`, and it reloads the
model) or a step that raised ("failed": a bug or a bad plan). After a death the loop voids what
was in flight, every resident request re-prefills its prompt plus the tokens already streamed,
and `wait_until_back` probes the restarting actor until it answers, so streams just continue.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError

from scheduler.plan import DiffPlan

RESTART_PROBE_TIMEOUT_S = 60.0  # one health probe of a restarting model actor (it reloads the model)


class RayActorLink:
    def __init__(self, handle: Any, probe_timeout_s: float = RESTART_PROBE_TIMEOUT_S) -> None:
        self.handle = handle
        self.probe_timeout_s = probe_timeout_s

    def submit(self, plan: DiffPlan) -> asyncio.Future:
        return self.handle.execute.remote(plan).as_future()

    @staticmethod
    def classify(exc: BaseException) -> str:
        if isinstance(exc, (TaskCancelledError, asyncio.CancelledError)):
            return "cancelled"
        if isinstance(exc, RayActorError):
            return "died"
        if isinstance(exc, RayTaskError) and isinstance(exc.cause, RayActorError):
            return "died"
        return "failed"

    async def wait_until_back(self, give_up_s: float | None = None) -> bool:
        # Calls made while the actor restarts fail or wait: probe until one answers.
        deadline = None if give_up_s is None else time.monotonic() + give_up_s
        while deadline is None or time.monotonic() < deadline:
            timeout = self.probe_timeout_s if deadline is None else max(0.1, min(self.probe_timeout_s,
                                                                                   deadline - time.monotonic()))
            try:
                await asyncio.wait_for(self.handle.health.remote(), timeout=timeout)
                return True
            except (RayActorError, asyncio.TimeoutError):
                await asyncio.sleep(0.5)
        return False

    def restart(self) -> None:
        ray.kill(self.handle, no_restart=False)
