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
                 sampling: SamplingParams | None = None) -> list[Completion]:
        """Run every prompt to completion (all submitted at once); results in prompt order."""
        sampling = sampling or SamplingParams()
        start = time.monotonic()
        ids = []
        for prompt in prompts:
            rid = f"local-{self._next_id}"
            self._next_id += 1
            self.core.submit(Request(rid, len(prompt), max_tokens, start, prompt_token_ids=list(prompt),
                                     sampling=sampling), start)
            ids.append(rid)
        done: dict[str, Completion] = {}
        while len(done) < len(ids):
            now = time.monotonic()
            plan = self.core.plan(0, now)
            if plan is None:
                wake = self.core.next_wake(0)
                time.sleep(max(0.0, (wake or now + 1e-3) - now))
                continue
            result = self.actor.execute(plan)
            model = self.cost_fit.observe(plan.num_new_tokens, plan.num_attended_kv, result.step_time_s)
            if model is not None and hasattr(self.core.policy, "set_cost"):
                self.core.policy.set_cost(model)
            for ev in self.core.commit(plan, result, time.monotonic()):
                if ev.finish_reason:
                    r = ev.request
                    done[r.request_id] = Completion(list(r.output_token_ids), ev.finish_reason,
                                                    r.arrival_time, r.first_token_time, r.finish_time)
        return [done[rid] for rid in ids]
