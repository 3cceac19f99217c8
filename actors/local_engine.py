"""LocalEngine: the scheduler core and one model actor in one process, no Ray.

The live scheduler's dispatch loop (`actors.dispatch.Dispatcher`, plans sent ahead of the step
that runs), with the model actor in a worker thread instead of behind a Ray handle: for tests
(greedy output must equal the full Serve stack's), benchmarks (in-process vs through Serve) and
calibration.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from actors.dispatch import Dispatcher
from actors.model_actor import ModelActor
from scheduler.core import SchedulerCore, TokenEvent
from scheduler.cost import OnlineCostFit
from scheduler.plan import DiffPlan, ScheduledBatch, StepResult
from scheduler.policies import PolicyConfig, make_policy
from scheduler.request import Request, SamplingParams


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str
    arrival: float
    first_token: float | None
    finish: float


class ThreadLink:
    """An in-process model actor, run in one worker thread (so steps run in the order sent,
    and the loop plans the next step while one runs)."""

    def __init__(self, actor) -> None:
        self.actor = actor
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="model-actor")

    def submit(self, plan: DiffPlan) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self.pool, self.actor.execute, plan)

    @staticmethod
    def classify(exc: BaseException) -> str:
        return "failed"  # in-process, a step that raises never kills the actor

    async def wait_until_back(self, give_up_s: float | None = None) -> bool:
        return True

    def restart(self) -> None:
        return None


class LocalEngine:
    def __init__(self, model: str = "default", policy: str = "vllm", kv_cache_tokens: int = 16384,
                 block_size: int = 16, max_num_seqs: int = 256, num_threads: int | None = None,
                 actor: ModelActor | None = None, dispatch_depth: int = 2, **policy_args) -> None:
        self.actor = actor or ModelActor(model=model, kv_cache_tokens=kv_cache_tokens,
                                         block_size=block_size, num_threads=num_threads)
        cap = self.actor.capacity()
        policy_obj = make_policy(policy, PolicyConfig(max_num_seqs=max_num_seqs), **policy_args)
        self.core = SchedulerCore(policy_obj, cap["num_blocks"], cap["block_size"],
                                  max_model_len=cap["max_model_len"])
        self.link = ThreadLink(self.actor)
        self.dispatch_depth = dispatch_depth
        self._next_id = 0
        self.cost_fit = OnlineCostFit(kv_capacity_tokens=cap["kv_capacity_tokens"], block_size=cap["block_size"])
        self._done: dict[str, Completion] = {}

    def generate(self, prompts: list[list[int]], max_tokens: int,
                 sampling: SamplingParams | list[SamplingParams] | None = None,
                 offsets: list[float] | None = None) -> list[Completion]:
        """Run every prompt to completion; results in prompt order. Prompt i arrives
        offsets[i] seconds after the start (default: all at once) and samples with sampling[i]
        (one SamplingParams: the same for all)."""
        if not isinstance(sampling, list):
            sampling = [sampling or SamplingParams()] * len(prompts)
        return asyncio.run(self._generate(prompts, max_tokens, sampling, offsets or [0.0] * len(prompts)))

    async def _generate(self, prompts: list[list[int]], max_tokens: int, sampling: list[SamplingParams],
                        offsets: list[float]) -> list[Completion]:
        ids = [f"local-{self._next_id + i}" for i in range(len(prompts))]
        self._next_id += len(prompts)
        dispatcher = Dispatcher(self.core, 0, self.link, self, self.dispatch_depth)
        task = asyncio.get_running_loop().create_task(dispatcher.run())
        start = time.monotonic()
        for i in sorted(range(len(prompts)), key=lambda i: offsets[i]):
            await asyncio.sleep(max(0.0, start + offsets[i] - time.monotonic()))
            # TTFT counts from the scheduled arrival, as for a request reaching a busy server.
            self.core.submit(Request(ids[i], len(prompts[i]), max_tokens, start + offsets[i],
                                     prompt_token_ids=list(prompts[i]), sampling=sampling[i]),
                             time.monotonic())
            dispatcher.poke()
        while not all(rid in self._done for rid in ids):
            await asyncio.sleep(0.002)
            if task.done():
                task.result()  # the loop never ends on its own: surface what stopped it
        dispatcher.stop()
        await task
        return [self._done.pop(rid) for rid in ids]

    # -- the dispatch loop's sink ----------------------------------------------------------------
    def deliver(self, events: list[TokenEvent]) -> None:
        for ev in events:
            if ev.finish_reason:
                r = ev.request
                self._done[r.request_id] = Completion(list(r.output_token_ids), ev.finish_reason,
                                                      r.arrival_time, r.first_token_time, r.finish_time)

    def record(self, worker: int, step: ScheduledBatch, result: StepResult,
               events: list[TokenEvent], period_s: float) -> None:
        model = self.cost_fit.observe(step.num_new_tokens, step.num_attended_kv, period_s)
        if model is not None and hasattr(self.core.policy, "set_cost"):
            self.core.policy.set_cost(model)

    def fail(self, requests: list[Request], message: str) -> None:
        now = time.monotonic()
        for req in requests:
            if self.core.cancel(req.request_id, now) is not None:
                self._done[req.request_id] = Completion(list(req.output_token_ids), "error",
                                                        req.arrival_time, req.first_token_time, now)

    def actor_up(self, worker: int, up: bool) -> None:
        return None
