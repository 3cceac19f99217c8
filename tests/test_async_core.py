"""Overlapped planning against SchedulerCore, no Ray: plans made while earlier ones still "run".

Like vLLM's async-scheduler tests, a fake model stands in for the engine: here the simulated model
actor, which checks every diff plan exactly as a real model actor does and samples tokens that
depend only on (request, position). So the text a request gets is known in advance, whatever was
planned ahead, evicted, cancelled or reset on the way.
"""
from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_core import check_kv, workloads

from actors.request_state import request_seed
from actors.sim_actor import EOS_TOKEN_ID, SimModelActor, sim_tokens
from scheduler.core import SchedulerCore
from scheduler.cost import CostModel
from scheduler.experiment import workload_hint
from scheduler.plan import StepResult, int_array
from scheduler.policies import POLICY_NAMES, PolicyConfig, make_policy
from scheduler.request import Request, RequestState

BLOCK = 16


def expected_tokens(req: Request, n: int) -> list[int]:
    positions = np.arange(req.prompt_len, req.prompt_len + n)
    return sim_tokens(np.full(n, request_seed(req.request_id), dtype=np.uint64), positions).tolist()


class Harness:
    """A core and a simulated model actor of the same KV size, driven with `depth` plans in
    flight; `on_result(step, result)` may edit a result before it is committed."""

    def __init__(self, policy: str, num_blocks: int, depth: int = 2, max_num_seqs: int = 256,
                 on_result=None, hint=None, **params) -> None:
        cost = CostModel(d0=8e-3, d_tok=7e-5, d_kv=3e-7, kv_capacity_tokens=num_blocks * BLOCK,
                         block_size=BLOCK)
        if policy in ("nested-wait", "wait"):
            params.setdefault("kv_capacity_tokens", cost.kv_capacity_tokens)
        self.core = SchedulerCore(make_policy(policy, PolicyConfig(max_num_seqs=max_num_seqs),
                                              cost=cost, hint=hint, **params), num_blocks, BLOCK)
        self.actor = SimModelActor(sleep=False)
        self.actor.cost = cost  # the same cache size as the core (its table grows as needed)
        self.depth, self.on_result = depth, on_result
        self.in_flight: deque = deque()
        self.now = 0.0
        self.finished: list[Request] = []
        self.scheduled_tokens = 0
        self.parked_seen = 0

    def submit(self, rid: str, prompt_len: int, max_tokens: int, **kw) -> Request:
        req = Request(rid, prompt_len, max_tokens, self.now,
                      prompt_token_ids=[100 + i % 50 for i in range(prompt_len)], **kw)
        self.core.submit(req, self.now)
        return req

    def fill(self) -> None:
        while len(self.in_flight) < self.depth:
            step = self.core.plan(0, self.now)
            if step is None:
                return
            check_kv(self.core)
            self.scheduled_tokens += step.num_new_tokens
            self.parked_seen += bool(self.core.workers[0].parked)
            self.in_flight.append(step)

    def step(self) -> bool:
        """Run the oldest plan in flight and commit it; False when nothing is in flight."""
        self.fill()
        if not self.in_flight:
            return False
        step = self.in_flight.popleft()
        result = self.actor.execute(step.wire)
        if self.on_result:
            self.on_result(step, result)
        self.now += result.step_time_s
        events = self.core.commit(step, result, self.now)
        self.finished += [e.request for e in events if e.finish_reason]
        self.check_actor_view()
        return True

    def check_actor_view(self) -> None:
        """Once nothing is in flight, the actor holds exactly the residents, with their blocks."""
        if self.in_flight:
            return
        q = self.core.workers[0]
        states = self.actor.states
        if states.epoch != q.epoch:
            return  # the next plan resets it
        held = {states.request_ids[s]: s for s in np.flatnonzero(states.live).tolist()}
        freed = set(q.slots.freed) | set(q.slots.evicted)
        held = {rid: s for rid, s in held.items() if s not in freed}
        assert held.keys() == q.resident.keys()
        for rid, s in held.items():
            n = states.blocks.lengths[s]
            assert states.blocks.tables[s, :n].tolist() == q.pool.block_table(rid)

    def run(self, max_steps: int = 50_000) -> None:
        """Run until every submitted request is done."""
        for _ in range(max_steps):
            if self.step():
                continue
            if not self.core.has_work():
                return
            self.now = max(self.now + 1e-3, self.core.next_wake(0) or 0.0)
        raise AssertionError(f"not done after {max_steps} steps: {self.core.counts()}")


def check_outputs(reqs: list[Request]) -> None:
    for r in reqs:
        assert r.state is RequestState.FINISHED, r
        assert r.num_pending == 0
        assert r.num_generated == len(r.output_token_ids)
        want = expected_tokens(r, r.num_generated)
        if r.finish_reason == "stop" and r.output_token_ids[-1] == EOS_TOKEN_ID:
            want[-1] = EOS_TOKEN_ID
        assert r.output_token_ids == want, r.request_id


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_stop_by_max_tokens_schedules_no_token_too_many(max_tokens, depth):
    h = Harness("vllm", num_blocks=64, depth=depth)
    reqs = [h.submit("a", 20, max_tokens), h.submit("b", 33, max_tokens)]
    h.run()
    check_outputs(reqs)
    assert all(r.num_generated == max_tokens and r.finish_reason == "length" for r in reqs)
    # Each token after the first costs one decode row: nothing is planned past the limit.
    assert h.scheduled_tokens == sum(r.prompt_len + max_tokens - 1 for r in reqs)


def test_eos_reconciles_a_token_already_planned():
    """EOS comes back for step t while step t+1 (planned before) holds another decode of the
    request: that token is discarded, the request ends with exactly the tokens up to EOS."""
    stop_at = {"a": 3}

    def eos(step, result):
        for i, req in enumerate(step.sampled):
            if stop_at.get(req.request_id) == req.num_generated - req.num_pending + 1:
                result.token_ids[i] = EOS_TOKEN_ID
                result.stop_rows = int_array([*result.stop_rows, i])

    h = Harness("sarathi", num_blocks=64, depth=2, on_result=eos)
    a, b = h.submit("a", 10, 20), h.submit("b", 12, 6)
    h.run()
    assert a.finish_reason == "stop" and a.output_token_ids[-1] == EOS_TOKEN_ID
    assert a.num_generated == 3 and len(a.output_token_ids) == 3
    check_outputs([a, b])
    assert h.core.workers[0].pool.num_used_blocks == 0


def test_cancel_while_its_rows_are_in_flight():
    h = Harness("sarathi", num_blocks=64, depth=2)
    reqs = [h.submit(str(i), 8 + i, 40) for i in range(4)]
    for _ in range(6):
        h.step()
    assert len(h.in_flight) == 1  # one plan still "runs" when the cancel arrives
    victim = reqs[1]
    assert victim in h.in_flight[0].requests
    h.core.cancel(victim.request_id, h.now)
    assert victim.state is RequestState.CANCELLED and victim.num_pending == 0
    assert not h.core.workers[0].pool.has(victim.request_id)
    h.run()
    check_outputs([r for r in reqs if r is not victim])
    assert victim.request_id not in h.actor.states.request_ids


def test_eviction_with_tokens_in_flight_resumes_with_the_same_text():
    """A small cache forces LIFO evictions of requests whose tokens are still in flight: they
    wait (parked) until those are back, then re-prefill and continue the same text."""
    h = Harness("sarathi", num_blocks=12, depth=2)
    reqs = [h.submit(str(i), 30, 50) for i in range(5)]
    h.run()
    assert h.core.num_evictions > 0 and h.parked_seen > 0
    check_outputs(reqs)


def test_reset_with_plans_in_flight_voids_them_and_streams_continue():
    h = Harness("vllm", num_blocks=64, depth=2)
    reqs = [h.submit(str(i), 15 + i, 30) for i in range(3)]
    for _ in range(8):
        h.step()
    assert h.in_flight
    progress = {r.request_id: len(r.output_token_ids) for r in reqs}
    h.core.reset_worker(0, h.now)  # the actor "died": what is in flight is lost
    stale = list(h.in_flight)
    h.in_flight.clear()
    for step in stale:  # late results of the old epoch change nothing
        assert h.core.commit(step, StepResult(0, step.iteration, [7] * step.num_sampled), h.now) == []
    for r in reqs:
        assert len(r.output_token_ids) == progress[r.request_id] == r.num_generated
    h.run()
    check_outputs(reqs)


@pytest.mark.parametrize("policy", POLICY_NAMES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=workloads(), depth=st.integers(1, 3), cancel_every=st.integers(0, 7))
def test_overlapped_runs_lose_nothing_and_keep_kv_exact(policy, w, depth, cancel_every):
    arrivals, num_blocks = w
    h = Harness(policy, num_blocks, depth=depth, hint=workload_hint(arrivals))
    cancelled = []
    steps = 0
    pending = deque(arrivals)
    while pending or h.core.has_work() or h.in_flight:
        while pending and pending[0].time <= h.now:
            a = pending.popleft()
            h.submit(str(len(arrivals) - len(pending)), a.prompt_len, a.output_len)
        steps += 1
        if cancel_every and steps % cancel_every == 0 and h.core.requests:
            cancelled.append(h.core.cancel(next(iter(h.core.requests)), h.now))
        if not h.step():
            h.now = max(h.now + 1e-3, min([a.time for a in pending] or [h.now + 1e-3]),
                        h.core.next_wake(0) or 0.0)
        assert steps < 20_000
    check_kv(h.core)
    assert h.core.workers[0].pool.num_used_blocks == 0
    done = {r.request_id for r in h.finished}
    assert done.isdisjoint(r.request_id for r in cancelled)
    assert len(done) + len(cancelled) == len(arrivals)
    check_outputs(h.finished)
    for r in h.finished:
        assert r.num_generated == r.max_tokens
