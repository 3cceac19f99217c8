"""Each policy's own batching rule, checked on every plan of random workloads."""
from __future__ import annotations

import math
from bisect import bisect_right

from hypothesis import HealthCheck, given, settings
from test_core import check_all_done, make_core, small_cost, workloads

from scheduler.plan import StepResult
from scheduler.request import Request


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


@SETTINGS
@given(w=workloads())
def test_nested_wait_respects_per_stage_caps(w):
    arrivals, blocks = w

    def check(core, plan):
        pol = core.policy
        per_stage: dict[int, int] = {}
        prefills = 0
        for c in plan.chunks:
            req = core.requests[c.request_id]
            if c.is_prefill:
                prefills += 1
            else:  # its stage when selected (the plan already counts the token it schedules)
                per_stage[req.stage - 1] = per_stage.get(req.stage - 1, 0) + 1
        assert prefills <= pol.caps[0]
        last = len(pol.bounds) - 1
        for stage, count in per_stage.items():
            assert count <= pol.caps[min(bisect_right(pol.bounds, stage), last)]

    core = make_core("nested-wait", arrivals, blocks, budget=60.0, num_segments=3, relax_below_kv_usage=0.0)
    check_all_done(arrivals, run_checked(core, arrivals, check))


@SETTINGS
@given(w=workloads())
def test_nested_wait_relaxed_while_kv_is_mostly_free(w):
    """Below the usage bound no resident pauses: every decoder advances (up to max_num_seqs)
    and at most n_1 prefills are admitted per iteration."""
    arrivals, blocks = w
    core = make_core("nested-wait", arrivals, blocks, budget=60.0, num_segments=3, relax_below_kv_usage=0.5)
    pol, seen = core.policy, {}
    select = pol.select

    def recording_select(q, now):
        seen["relaxed"] = pol.relaxed(q)
        seen["decoders"] = sum(len(bucket) for bucket in q.groups[0].stages.values())
        return select(q, now)

    def check(core, plan):
        if not seen.pop("relaxed", False):
            return
        prefills = sum(c.is_prefill for c in plan.chunks)
        assert prefills <= pol.caps[0]
        assert len(plan.chunks) - prefills == min(seen["decoders"], pol.config.max_num_seqs)

    pol.select = recording_select
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

    core = make_core("wait", arrivals, blocks, relax_below_kv_usage=0.0)
    check_all_done(arrivals, run_checked(core, arrivals, check))
