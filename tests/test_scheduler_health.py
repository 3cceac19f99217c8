"""The scheduler replica's Serve health check (`check_health`) on a real local Ray cluster with
simulated model actors (no torch, no weights): healthy while starting and running; unhealthy
when start-up failed after its retries, or when a dispatch loop has ended (Serve then replaces
the replica)."""
from __future__ import annotations

import asyncio

import pytest

from actors import scheduler_actor
from actors.placement import EngineArgs
from actors.scheduler_actor import SchedulerActor

pytestmark = [pytest.mark.serve]


def _kill_actors(sched: SchedulerActor) -> None:
    import ray

    for handle in sched.actors:
        ray.kill(handle, no_restart=True)


def test_check_health_follows_the_dispatch_loops(ray_cluster) -> None:
    sched = SchedulerActor(EngineArgs(model="sim:a100-llama2-7b", num_model_actors=1,
                                      model_actor_resources={"num_cpus": 0.1, "num_gpus": 0}))

    async def main() -> None:
        await sched.check_health()  # starting: healthy
        await asyncio.wait_for(sched._ready.wait(), 300)
        await sched.check_health()
        assert (await sched.health())["ready"]
        sched._loops[0].cancel()
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="dispatch loop ended"):
            await sched.check_health()
        for task in sched._loops:
            task.cancel()

    try:
        asyncio.run(main())
    finally:
        _kill_actors(sched)


def test_check_health_fails_after_start_up_retries(ray_cluster, monkeypatch) -> None:
    monkeypatch.setattr(scheduler_actor, "START_BACKOFF_S", 0.01)
    monkeypatch.setattr(scheduler_actor, "CAPACITY_TIMEOUT_S", 60.0)
    sched = SchedulerActor(EngineArgs(model="sim:/nonexistent/cost.json", num_model_actors=1,
                                      model_actor_resources={"num_cpus": 0.1, "num_gpus": 0}))

    async def main() -> None:
        await sched.check_health()  # starts it
        await asyncio.wait_for(sched._ready.wait(), 300)
        with pytest.raises(RuntimeError, match="start-up failed"):
            await sched.check_health()
        messages = [m async for m in sched.generate({"prompt_token_ids": [1, 2], "max_tokens": 2})]
        assert messages[0]["error"]["status"] == 503

    try:
        asyncio.run(main())
    finally:
        _kill_actors(sched)
