"""Admission limits in the core (no Ray): max_queued_tokens (429 past it) and max_queue_wait_s
(requests never admitted in time end with "timeout"; admitted ones are never expired)."""
from __future__ import annotations

import pytest

from scheduler.core import SchedulerCore
from scheduler.errors import QueueFull
from scheduler.policies import PolicyConfig, make_policy
from scheduler.request import Request


def core(**kw) -> SchedulerCore:
    return SchedulerCore(make_policy("sarathi", PolicyConfig(max_num_seqs=2)), 20, 16, **kw)


def req(i: int, prompt: int = 100, at: float = 0.0) -> Request:
    return Request(f"r{i}", prompt, 8, at, prompt_token_ids=[5] * prompt)


def test_queued_tokens_cap_rejects_with_429_and_frees_on_admission_and_cancel() -> None:
    c = core(max_queued_tokens=300)
    for i in range(3):
        c.submit(req(i), 0.0)
    with pytest.raises(QueueFull) as info:
        c.submit(req(3), 0.0)
    assert info.value.status == 429 and "max_queued_tokens" in str(info.value)
    c.cancel("r0", 0.0)
    c.submit(req(3), 0.0)  # room again
    assert c.queued_tokens == 300
    c.plan(0, 0.0)  # admissions leave the queue
    assert c.queued_tokens < 300
    for rid in list(c.requests):
        c.cancel(rid, 0.0)
    assert c.queued_tokens == 0


def test_requests_not_admitted_in_time_expire_and_admitted_ones_never() -> None:
    c = core()
    for i in range(6):
        c.submit(req(i, at=0.1 * i), 0.1 * i)
    step = c.plan(0, 0.0)
    admitted = {r.request_id for r in step.requests}
    assert admitted and len(admitted) < 6
    assert c.expire_waiting(10.0, 1.0) == []
    expired = c.expire_waiting(0.3, 0.75)  # arrived before 0.45 and still waiting
    assert {r.request_id for r in expired} == {f"r{i}" for i in range(5) if f"r{i}" not in admitted}
    assert all(r.finish_reason == "timeout" and r.request_id not in c.requests for r in expired)
    assert admitted <= set(c.requests) and "r5" in c.requests
    assert c.queued_tokens == 100  # r5's prompt only


def test_no_request_is_admitted_after_its_max_queue_wait() -> None:
    c = core(max_queue_wait_s=0.5)
    for i in range(6):
        c.submit(req(i, at=0.0), 0.0)
    first = {r.request_id for r in c.plan(0, 0.1).requests}
    step = c.plan(0, 0.6)  # the others waited 0.6 s > 0.5 s: expired before planning
    assert step is None or {r.request_id for r in step.requests} <= first
    assert {r.request_id for r in c.expired} == {f"r{i}" for i in range(6)} - first
    assert all(r.finish_reason == "timeout" for r in c.expired)
