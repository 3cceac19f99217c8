"""LocalEngine: the scheduler core and one model actor in one process, no Ray.

The same plan -> execute -> commit loop as the live scheduler actor, synchronously: for tests
(greedy output must equal the full Serve stack's), benchmarks (in-process vs through Serve) and
calibration.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from actors.model_actor import ModelActor
from scheduler.core import SchedulerCore
from scheduler.cost import OnlineCostFit
from scheduler.policies import PolicyConfig, make_policy
from scheduler.request import Request, SamplingParams


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str
    arrival: float
    first_token: float
    finish: float


class LocalEngine:
    def __init__(self, model: str = "default", policy: str = "vllm", kv_cache_tokens: int = 16384,
                 block_size: int = 16, max_num_seqs: int = 256, num_threads: int | None = None,
                 actor: ModelActor | None = None, **policy_args) -> None:
        self.actor = actor or ModelActor(model=model, kv_cache_tokens=kv_cache_tokens,
                                         block_size=block_size, num_threads=num_threads)
        cap = self.actor.capacity()
        policy_obj = make_policy(policy, PolicyConfig(max_num_seqs=max_num_seqs), **policy_args)
        self.core = SchedulerCore(policy_obj, cap["num_blocks"], cap["block_size"],
                                  max_model_len=cap["max_model_len"])
        self._next_id = 0
        self.cost_fit = OnlineCostFit(kv_capacity_tokens=cap["kv_capacity_tokens"], block_size=cap["block_size"])

    def generate(self, prompts: list[list[int]], max_tokens: int,
                 sampling: SamplingParams | None = None,
                 offsets: list[float] | None = None) -> list[Completion]:
        """Run every prompt to completion; results in prompt order. Prompt i arrives
        offsets[i] seconds after the start (default: all at once)."""
        sampling = sampling or SamplingParams()
        offsets = offsets or [0.0] * len(prompts)
        start = time.monotonic()
        pending = sorted(range(len(prompts)), key=lambda i: offsets[i], reverse=True)
        ids = [f"local-{self._next_id + i}" for i in range(len(prompts))]
        self._next_id += len(prompts)
        done: dict[str, Completion] = {}
        while len(done) < len(ids):
            now = time.monotonic()
            while pending and start + offsets[pending[-1]] <= now:
                # Arrived on schedule, though seen only now (after the iteration in flight):
                # TTFT counts that wait, as it would for a request reaching a busy server.
                i = pending.pop()
                self.core.submit(Request(ids[i], len(prompts[i]), max_tokens, start + offsets[i],
                                         prompt_token_ids=list(prompts[i]), sampling=sampling), now)
            plan = self.core.plan(0, now)
            if plan is None:
                wake = self.core.next_wake(0) or now + 1e-3
                if pending:
                    wake = min(wake, start + offsets[pending[-1]])
                time.sleep(max(0.0, wake - now))
                continue
            self._step(plan, done)
        return [done[rid] for rid in ids]

    def _step(self, plan, done: dict[str, Completion]) -> None:
        """Execute one plan, learn its cost, commit it and record finished requests."""
        result = self.actor.execute(plan.wire)
        model = self.cost_fit.observe(plan.num_new_tokens, plan.num_attended_kv, result.step_time_s)
        if model is not None and hasattr(self.core.policy, "set_cost"):
            self.core.policy.set_cost(model)
        for ev in self.core.commit(plan, result, time.monotonic()):
            if ev.finish_reason:
                r = ev.request
                done[r.request_id] = Completion(list(r.output_token_ids), ev.finish_reason,
                                                r.arrival_time, r.first_token_time, r.finish_time)
