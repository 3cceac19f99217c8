"""SchedulerCore under every policy: KV never over-committed, nothing lost, cancel and reset.

The driver below is the simulator's loop with invariant checks after every plan; workloads are
random (hypothesis) with KV caches small enough to force evictions.
"""
from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.core import SchedulerCore
from scheduler.cost import CostModel
from scheduler.errors import RequestTooLong
from scheduler.experiment import workload_hint
from scheduler.plan import Plan, PlanExpander, StepResult
from scheduler.policies import POLICY_NAMES, PolicyConfig, make_policy
from scheduler.request import Request, RequestState
from scheduler.workload import Arrival

BLOCK = 16
TOKEN = 7  # what the fake model actor samples, always


def make_request(rid: str, a: Arrival, arrival: float | None = None) -> Request:
    """A request of `a`'s lengths with real token ids (the diff plans carry them)."""
    return Request(rid, a.prompt_len, a.output_len, a.time if arrival is None else arrival,
                   prompt_token_ids=[1] * a.prompt_len, output_len=a.output_len)


def small_cost(num_blocks: int) -> CostModel:
    return CostModel(d0=8e-3, d_tok=7e-5, d_kv=3e-7, kv_capacity_tokens=num_blocks * BLOCK,
                     block_size=BLOCK)


def make_core(policy_name: str, arrivals: list[Arrival], num_blocks: int, **params) -> SchedulerCore:
    cost = small_cost(num_blocks)
    config = PolicyConfig(max_num_seqs=params.pop("max_num_seqs", 256),
                          max_num_batched_tokens=params.pop("max_num_batched_tokens", 2048))
    policy = make_policy(policy_name, config, cost=cost, hint=workload_hint(arrivals), **params)
    return SchedulerCore(policy, num_blocks=num_blocks, block_size=BLOCK)


def check_kv(core: SchedulerCore) -> None:
    """The pool holds exactly the residents' block-rounded KV, every block at most once."""
    for q in core.workers:
        pool = q.pool
        assert pool.num_used_blocks <= pool.num_blocks
        assert pool.used_tokens() <= pool.capacity_tokens
        tables = [pool.block_table(rid) for rid in q.resident]
        held = [b for t in tables for b in t]
        assert len(held) == len(set(held)), "a block is held twice"
        assert len(held) == pool.num_used_blocks, "blocks leaked or held by a non-resident"
        assert pool.num_used_blocks == sum(pool.blocks_for(pool.num_tokens(r)) for r in q.resident)


def check_actor_view(core: SchedulerCore, expander: PlanExpander, full: Plan) -> None:
    """What the diff plans tell the actor matches the scheduler: the same residents, each with
    exactly its blocks, and no KV slot written twice."""
    q = core.workers[0]
    held = {h.request_id: h for h in expander.held.values()}
    assert held.keys() == q.resident.keys()
    for rid, h in held.items():
        assert h.blocks == q.pool.block_table(rid)
    slots = [s for c in full.chunks for s in c.slot_mapping]
    assert len(slots) == len(set(slots)), "two new tokens were given the same KV slot"


def step(core: SchedulerCore, now: float, cost: CostModel) -> tuple[float, list[Request]] | None:
    """Plan and commit one iteration at `now`; None when the core runs nothing now."""
    plan = core.plan(0, now)
    if plan is None:
        return None
    check_kv(core)
    expander = core.__dict__.setdefault("test_expander", PlanExpander())
    check_actor_view(core, expander, expander.expand(plan.wire))
    now += cost.iteration_time(plan.num_new_tokens, plan.num_attended_kv)
    result = StepResult(0, plan.iteration, [TOKEN] * plan.num_sampled)
    expander.observe(plan.wire, result)
    done = [e.request for e in core.commit(plan, result, now) if e.finish_reason]
    check_kv(core)
    return now, done


def drive(core: SchedulerCore, arrivals: list[Arrival], max_steps: int = 20_000) -> list[Request]:
    """Submit `arrivals` on time and run until the core is empty; returns finished requests."""
    cost = small_cost(core.workers[0].pool.num_blocks)
    finished: list[Request] = []
    now, i = 0.0, 0
    for _ in range(max_steps):
        while i < len(arrivals) and arrivals[i].time <= now:
            a = arrivals[i]
            core.submit(make_request(str(i), a), now)
            i += 1
        out = step(core, now, cost)
        if out is not None:
            now, done = out
            finished += done
            continue
        wake = core.next_wake(0)
        nxt = arrivals[i].time if i < len(arrivals) else math.inf
        if wake is not None and now < wake < nxt:
            now = wake
        elif nxt < math.inf:
            now = max(now, nxt)
        elif core.has_work():
            now = max(now, wake or now) + 1e-3
        else:
            return finished
    raise AssertionError(f"not done after {max_steps} steps: {core.counts()}")


def check_all_done(arrivals: list[Arrival], finished: list[Request]) -> None:
    ids = [r.request_id for r in finished]
    assert len(ids) == len(set(ids)), "a request finished twice"
    assert sorted(ids, key=int) == [str(i) for i in range(len(arrivals))], "a request was lost"
    for r in finished:
        assert r.state is RequestState.FINISHED
        assert r.num_generated == r.output_len
        assert r.arrival_time <= r.first_token_time <= r.finish_time


@st.composite
def workloads(draw, max_requests: int = 30):
    """Random arrivals (bursty or sparse) with random lengths, and a small KV cache."""
    n = draw(st.integers(2, max_requests))  # WAIT needs two to know the types
    gaps = draw(st.lists(st.floats(0.0, 0.5), min_size=n, max_size=n))
    prompts = draw(st.lists(st.integers(1, 120), min_size=n, max_size=n))
    outputs = draw(st.lists(st.integers(1, 60), min_size=n, max_size=n))
    t, arrivals = 0.0, []
    for g, p, o in zip(gaps, prompts, outputs):
        t += g
        arrivals.append(Arrival(t, p, o))
    longest = max(math.ceil((a.prompt_len + a.output_len) / BLOCK) for a in arrivals)
    num_blocks = draw(st.integers(longest, longest + 30))
    return arrivals, num_blocks


@pytest.mark.parametrize("policy", POLICY_NAMES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=workloads())
def test_every_request_completes_and_kv_fits(policy, w):
    arrivals, num_blocks = w
    core = make_core(policy, arrivals, num_blocks)
    finished = drive(core, arrivals)
    check_all_done(arrivals, finished)
    assert core.workers[0].pool.num_used_blocks == 0


@pytest.mark.parametrize("policy", ["wait", "nested-wait"])
@pytest.mark.parametrize("budget", [None, 2000.0])
def test_threshold_policies_with_budget_complete_under_pressure(policy, budget):
    # Large thresholds against a tiny cache: the core must evict, never over-commit.
    arrivals = [Arrival(0.001 * i, 100 + 7 * (i % 5), 10 + 13 * (i % 4)) for i in range(120)]
    params = {"budget": budget} if budget else {"slack": 5.0}
    core = make_core(policy, arrivals, num_blocks=40, **params)
    finished = drive(core, arrivals)
    check_all_done(arrivals, finished)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_no_starvation_at_very_low_load(policy):
    # One request every 100 s: thresholds never fill, the guard must still serve each one.
    arrivals = [Arrival(100.0 * (i + 1), 50, 5 + i) for i in range(6)]
    core = make_core(policy, arrivals, num_blocks=64)
    finished = drive(core, arrivals)
    check_all_done(arrivals, finished)
    for r in finished:
        assert r.finish_time - r.arrival_time < 2.0, f"request {r.request_id} waited too long"


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_cancel_frees_blocks_at_once(policy):
    arrivals = [Arrival(0.0, 64, 50) for _ in range(4)]
    core = make_core(policy, arrivals, num_blocks=64)
    cost = small_cost(64)
    for i, a in enumerate(arrivals):
        core.submit(make_request(str(i), a, 0.0), 0.0)
    now = 0.0
    for _ in range(20):
        out = step(core, now, cost)
        now = out[0] if out else now + 0.05
    q = core.workers[0]
    victim = next(iter(q.resident))
    held = len(q.pool.block_table(victim))
    free_before = q.pool.num_free_blocks
    req = core.cancel(victim, now)
    assert req is not None and req.state is RequestState.CANCELLED
    assert not q.pool.has(victim)
    assert q.pool.num_free_blocks == free_before + held
    assert core.cancel(victim, now) is None  # already gone
    check_kv(core)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_reset_worker_requeues_residents_and_they_finish(policy):
    arrivals = [Arrival(0.01 * i, 40 + i, 30 + 3 * i) for i in range(10)]
    core = make_core(policy, arrivals, num_blocks=128)
    cost = small_cost(128)
    for i, a in enumerate(arrivals):
        core.submit(make_request(str(i), a), a.time)
    now, finished = 0.1, []
    for _ in range(15):
        out = step(core, now, cost)
        if out:
            now, done = out
            finished += done
        else:
            now += 0.05
    q = core.workers[0]
    residents = list(q.resident.values())
    assert residents, "the test needs residents at the crash"
    progress = {r.request_id: r.num_generated for r in residents}
    affected = core.reset_worker(0, now)
    assert {r.request_id for r in affected} == set(progress)
    assert q.pool.num_used_blocks == 0 and not q.resident
    for r in affected:
        assert r.state is RequestState.WAITING
        assert r.num_generated == progress[r.request_id]  # the stream continues, not restarts
        assert r.prefill_target == r.prompt_len + r.num_generated
    finished += drive(core, [])
    check_all_done(arrivals, finished)


def test_requests_that_never_fit_are_rejected_at_submit():
    core = make_core("nested-wait", [Arrival(0.0, 10, 10)], num_blocks=4)
    with pytest.raises(RequestTooLong):
        core.submit(Request("big", 60, 10, 0.0, output_len=10), 0.0)
    assert core.num_waiting == 0


class _CountingDict(dict):
    """A queue that counts how many of its requests a planner looks at."""

    looked = 0

    def values(self):
        for v in super().values():
            _CountingDict.looked += 1
            yield v


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_planning_does_not_scan_the_waiting_queue(policy):
    """plan() touches O(batch + stages) requests: the same with 1k and 10k waiting."""
    looked = {}
    for waiting in (1_000, 10_000):
        arrivals = [Arrival(0.0, 64, 20 + i % 3) for i in range(waiting)]
        core = make_core(policy, arrivals, num_blocks=10_000, max_num_seqs=64)
        for i, a in enumerate(arrivals):
            core.submit(make_request(str(i), a, 0.0), 0.0)
        q = core.workers[0]
        for g in q.groups:
            g.waiting = _CountingDict(g.waiting)
        _CountingDict.looked = 0
        plan = core.plan(0, 1.0)  # arrivals long past: thresholds and guard both allow a batch
        assert plan is not None and 0 < len(plan.chunks) <= 64
        looked[waiting] = _CountingDict.looked
        # Threshold policies take up to their threshold before the max_num_seqs cut, so the
        # bound is a batch's worth, far below the queue length.
        assert looked[waiting] <= 4 * 64, "plan() scanned the queue"
    assert looked[1_000] == looked[10_000]


NESTED_VARIANTS = [{"mode": "paper"}, {"eviction": "pause"}, {"admission_cap": True},
                   {"kv_admission": False}, {"low_load_bypass": False}, {"z": 0.0}]


@pytest.mark.parametrize("variant", NESTED_VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=workloads())
def test_every_nested_wait_variant_completes_and_kv_fits(variant, w):
    arrivals, num_blocks = w
    core = make_core("nested-wait", arrivals, num_blocks, **variant)
    check_all_done(arrivals, drive(core, arrivals))
    assert core.workers[0].pool.num_used_blocks == 0
