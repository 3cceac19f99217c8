"""Each policy's own batching rule, checked on every plan of random workloads."""
from __future__ import annotations

import math
from bisect import bisect_right

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_core import check_all_done, make_core, small_cost, workloads

from scheduler.plan import StepResult
from scheduler.request import Request
from scheduler.workload import Arrival


def run_checked(core, arrivals, check) -> list[Request]:
    """The simulator loop, calling check(core, plan) on every plan before it commits."""
    cost = small_cost(core.workers[0].pool.num_blocks)
    finished: list[Request] = []
    now, i = 0.0, 0
    for _ in range(20_000):
        while i < len(arrivals) and arrivals[i].time <= now:
            a = arrivals[i]
            core.submit(Request(str(i), a.prompt_len, a.output_len, a.time, output_len=a.output_len), now)
            i += 1
        plan = core.plan(0, now)
        if plan is None:
            wake = core.next_wake(0)
            nxt = arrivals[i].time if i < len(arrivals) else math.inf
            if wake is not None and now < wake < nxt:
                now = wake
            elif nxt < math.inf:
                now = nxt
            elif core.has_work():
                now = max(now, wake or now) + 1e-3
            else:
                return finished
            continue
        check(core, plan)
        now += cost.iteration_time(plan.num_new_tokens, plan.num_attended_kv)
        result = StepResult(0, plan.iteration, [-1] * plan.num_sampled)
        finished += [e.request for e in core.commit(plan, result, now) if e.finish_reason]
    raise AssertionError("did not finish")


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(w=workloads())
def test_vllm_never_mixes_prefill_and_decode(w):
    arrivals, blocks = w

    def check(core, plan):
        kinds = {c.is_prefill for c in plan.chunks}
        assert len(kinds) == 1
        assert len(plan.chunks) <= core.policy.config.max_num_seqs

    check_all_done(arrivals, run_checked(make_core("vllm", arrivals, blocks), arrivals, check))


@SETTINGS
@given(w=workloads())
def test_sarathi_stays_within_its_token_budget(w):
    arrivals, blocks = w

    def check(core, plan):
        decodes = sum(1 for c in plan.chunks if not c.is_prefill)
        assert plan.num_new_tokens <= max(512, decodes)
        # Decode-first: no prefill chunk while a resident decoder is left out.
        # (The plan's effects are applied already: rows of this plan are excluded.)
        if plan.num_prefill_tokens:
            q = core.workers[0]
            planned = {c.request_id for c in plan.chunks}
            left_out = [r for r in q.resident.values() if not r.in_prefill and r.request_id not in planned]
            assert not left_out or decodes >= core.policy.config.max_num_seqs

    check_all_done(arrivals, run_checked(make_core("sarathi", arrivals, blocks), arrivals, check))


def recording(core, **fields):
    """Wrap the policy's select so a check can see the queues as the policy saw them."""
    pol, seen = core.policy, {}
    select = pol.select

    def wrapped(q, now):
        for name, read in fields.items():
            seen[name] = read(q)
        return select(q, now)

    pol.select = wrapped
    return seen


@SETTINGS
@given(w=workloads())
def test_nested_wait_paper_respects_gates_and_per_stage_caps(w):
    """The paper's rule: segment k runs only if every entry 1..k holds at least its (real-valued)
    threshold and at least one request; at most ceil(n_k) requests per stage, ceil(n_1) prefills."""
    arrivals, blocks = w
    core = make_core("nested-wait", arrivals, blocks, mode="paper", budget=60.0, num_segments=3)
    pol = core.policy
    seen = recording(core, entries=pol.entry_counts)

    def check(core, plan):
        entries = seen.pop("entries", None)
        if entries is None or core.num_guard_fires:
            return  # the starvation guard's work-conserving batch follows no gate
        per_stage: dict[int, int] = {}
        new = 0
        last = len(pol.bounds) - 1
        deepest = -1
        for c in plan.chunks:
            req = core.requests[c.request_id]
            if c.is_prefill:
                new += c.start_pos == 0 and not req.num_evictions
            else:  # its stage when selected (the plan already counts the token it schedules)
                stage = req.stage - 1
                per_stage[stage] = per_stage.get(stage, 0) + 1
                deepest = max(deepest, min(bisect_right(pol.bounds, stage), last))
        assert new <= pol.caps[0]
        for stage, count in per_stage.items():
            assert count <= pol.caps[min(bisect_right(pol.bounds, stage), last)]
        for k in range(deepest + 1):  # every segment up to the deepest served was open
            assert entries[k] >= max(pol.thresholds[k], 1)

    check_all_done(arrivals, run_checked(core, arrivals, check))


@SETTINGS
@given(w=workloads())
def test_nested_wait_production_advances_every_resident(w):
    """No resident pauses in production mode (LIFO eviction aside): every decoder advances, up
    to max_num_seqs, and the iteration stays within the token budget."""
    arrivals, blocks = w
    core = make_core("nested-wait", arrivals, blocks)
    seen = recording(core, decoders=lambda q: sum(len(b) for b in q.groups[0].stages.values()))

    def check(core, plan):
        decoders = seen.pop("decoders")
        decodes = sum(not c.is_prefill for c in plan.chunks)
        if not plan.evicted:
            assert decodes == min(decoders, core.policy.config.max_num_seqs)
        assert plan.num_new_tokens <= core.policy.config.max_num_batched_tokens

    check_all_done(arrivals, run_checked(core, arrivals, check))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=workloads(), output=st.integers(1, 60))
def test_nested_wait_production_never_evicts_when_lengths_are_certain(w, output):
    """With one output length (the forecast is then exact), admission never over-commits the
    KV the residents will grow into: no eviction, however bursty the arrivals."""
    arrivals, blocks = w
    arrivals = [Arrival(a.time, a.prompt_len, output) for a in arrivals]
    blocks = max(blocks, max(-(-(a.prompt_len + output) // 16) for a in arrivals))
    core = make_core("nested-wait", arrivals, blocks)
    check_all_done(arrivals, run_checked(core, arrivals, lambda core, plan: None))
    assert core.num_evictions == 0


TOKEN_BUDGET = 64


@pytest.mark.parametrize("policy", ["nested-wait", "nested-wait-paper", "wait", "vllm-v1", "sarathi"])
@SETTINGS
@given(w=workloads())
def test_every_policy_honours_the_token_budget(policy, w):
    """Prompts longer than what is left of the budget are chunked over iterations."""
    arrivals, blocks = w
    name, args = ("nested-wait", {"mode": "paper"}) if policy == "nested-wait-paper" else (policy, {})
    if policy == "sarathi":
        args["chunk_size"] = TOKEN_BUDGET
    core = make_core(name, arrivals, blocks, max_num_batched_tokens=TOKEN_BUDGET, **args)

    def check(core, plan):
        decodes = sum(not c.is_prefill for c in plan.chunks)
        assert plan.num_new_tokens <= max(TOKEN_BUDGET, decodes)

    check_all_done(arrivals, run_checked(core, arrivals, check))


@SETTINGS
@given(w=workloads())
def test_wait_respects_per_type_caps(w):
    arrivals, blocks = w

    def check(core, plan):
        counts: dict[tuple[int, int], int] = {}
        for c in plan.chunks:
            req = core.requests[c.request_id]
            key = (req.group, -1 if c.is_prefill else req.stage)
            counts[key] = counts.get(key, 0) + 1
        for (group, _), n in counts.items():
            assert n <= core.policy.caps[group]

    core = make_core("wait", arrivals, blocks)
    check_all_done(arrivals, run_checked(core, arrivals, check))
