"""EngineArgs, and the model actors the scheduler creates from them: one per GPU (or per CPU box),
named `fluidserve-<app>-<replica>-model-<i>` (`actors.naming`), placed by Ray.

`model_actor_resources` are the Ray resources of each model actor: `num_gpus`, `num_cpus`, and any
custom resource (e.g. `{"model_node": 1}` to put model actors on the nodes started with that
resource). With GPUs, one placement-group bundle per actor reserves whole devices up front.
`model: sim:<preset|cost.json>` creates simulated model actors (`actors.sim_actor`): no torch,
no weights, the cost model's time per step.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.naming import RAY_NAMESPACE, actor_name
from actors.pipelined import MAX_CONCURRENCY, pipelined
from actors.sim_actor import is_sim_model

logger = logging.getLogger("fluidserve.scheduler")
STALE_ACTOR_TIMEOUT_S = 60.0  # how long a dead scheduler's model actor may take to go away
STANDARD_RESOURCES = ("num_cpus", "num_gpus", "memory")
FORWARDED_ENV = ("FLUIDSERVE_FAULT_INJECTION",)


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
    # A request not admitted (first scheduled) within this many seconds of its arrival gets 503
    # with Retry-After (an SSE error event when streaming); 0: no bound. Nested WAIT may hold
    # arrivals back while KV is projected full: this bounds that wait.
    max_queue_wait_s: float = 60.0
    # Prompt tokens of requests waiting for admission; a request past it gets 429. 0: no bound.
    max_queued_tokens: int = 0
    # Liveness: a model call may take 10x the cost model's prediction plus this floor (past it
    # the actor is deemed hung and restarted); an actor not back this long after a crash has its
    # requests moved to the other actors (503 when none is left).
    step_deadline_floor_s: float = 30.0
    actor_restart_wait_s: float = 30.0
    dtype: str = "auto"
    attention: str = "auto"
    cost_file: str | None = None
    model_name: str | None = None  # the name clients pass as `model` (default: model)
    # After a stream's first token, send its tokens at most this often (like Ray Serve LLM's
    # stream batching): at GPU speed every iteration would otherwise be one message per request
    # through Serve. 0 sends every iteration's token at once.
    stream_interval_s: float = 0.05
    # Plans in flight per model actor: 2 sends step t+1 while step t runs (overlapped
    # scheduling); 1 plans only after each step's result is back.
    dispatch_depth: int = 2
    # GET /metrics renders at most this often (off the dispatch loops, in a thread).
    metrics_refresh_s: float = 2.0
    # Refit the cost model from the live iterations (threshold policies follow the engine);
    # off, a given cost_file stays (benchmarks that simulate with that very model).
    online_cost_fit: bool = True
    # Simulated models (`sim:`): EOS at an output length drawn from this trace CSV ("lmsys": the
    # shipped sample); None: requests end by max_tokens only.
    sim_output_lengths: str | None = None


async def create_model_actors(a: EngineArgs, owner: str) -> list[Any]:
    """Start the model actors of `owner` (`actors.naming.owner_scope`); returns their handles in
    index order. Names held already (an earlier start-up attempt of this same owner) are freed."""
    res = dict(a.model_actor_resources)
    num_gpus, num_cpus = float(res.get("num_gpus", 0)), float(res.get("num_cpus", 1))
    custom = {k: float(v) for k, v in res.items() if k not in STANDARD_RESOURCES}
    sim = is_sim_model(a.model)
    if sim:
        from actors.sim_actor import SimModelActor as actor_class
    else:
        from actors.model_actor import ModelActor as actor_class
    actor_cls = ray.remote(pipelined(actor_class))
    strategy = None
    if num_gpus > 0:
        # One bundle per actor, each a whole device; PACK keeps them on as few nodes as fit.
        bundle = {"GPU": num_gpus, "CPU": num_cpus, **custom}
        pg = placement_group([bundle] * a.num_model_actors, strategy="PACK")
        await asyncio.wait_for(pg.ready(), timeout=600)
        strategy = pg
    actors = []
    for i in range(a.num_model_actors):
        await kill_stale(actor_name(i, owner))
        options: dict[str, Any] = {
            "name": actor_name(i, owner), "namespace": RAY_NAMESPACE, "num_cpus": num_cpus, "num_gpus": num_gpus,
            "max_restarts": -1, "max_task_retries": 0, "max_concurrency": MAX_CONCURRENCY,
            # Idle OpenMP threads spin and steal the cores other actors need.
            "runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", **_forwarded_env()}},
        }
        if custom:
            options["resources"] = custom
        if strategy is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(strategy, i)
        kwargs: dict[str, Any] = {"model": a.model, "worker_id": i}
        if sim:
            kwargs["output_lengths"] = a.sim_output_lengths
        else:
            kwargs.update(kv_cache_tokens=a.kv_cache_tokens, gpu_memory_utilization=a.gpu_memory_utilization,
                          kv_cache_memory_fraction=a.kv_cache_memory_fraction, block_size=a.block_size,
                          dtype=a.dtype, attention=a.attention, num_threads=max(1, int(num_cpus)),
                          max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                          enforce_eager=a.enforce_eager)
        actors.append(actor_cls.options(**options).remote(**kwargs))
    return actors


def _forwarded_env() -> dict[str, str]:
    """Test-only switches the model actors must see too (see ModelActor's fault injection)."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


async def kill_stale(name: str, timeout_s: float = STALE_ACTOR_TIMEOUT_S) -> None:
    """A model actor of an earlier start-up attempt of this owner holds the name: kill it, then
    wait until the GCS releases the name (ray.kill is asynchronous; creating the new actor
    before that fails with "name already taken"). Names are per owner: never another's actor."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            stale = ray.get_actor(name, namespace=RAY_NAMESPACE)
        except ValueError:
            return  # the name is free
        if time.monotonic() > deadline:
            raise RuntimeError(f"the stale model actor {name!r} did not go away in {timeout_s:.0f} s")
        logger.warning("killing the model actor %s left by an earlier start-up attempt", name)
        ray.kill(stale, no_restart=True)
        await asyncio.sleep(0.2)
