"""The dispatch loop shared by the scheduler replica and LocalEngine: overlap changes no token,
and a failed step fails only its own requests while the others continue where they were."""
from __future__ import annotations

import asyncio

import pytest
from test_async_core import expected_tokens

from actors.dispatch import Dispatcher
from actors.local_engine import LocalEngine, ThreadLink
from actors.sim_actor import SimModelActor
from kv.tables import PlanError
from scheduler.core import SchedulerCore
from scheduler.policies import PolicyConfig, make_policy
from scheduler.request import Request, SamplingParams


@pytest.fixture(scope="module")
def engine() -> LocalEngine:
    return LocalEngine("random:tiny", kv_cache_tokens=40 * 16, num_threads=1, policy="sarathi")


def test_planning_ahead_changes_no_token(engine: LocalEngine) -> None:
    prompts = [[(7 * i + j) % 900 + 5 for j in range(10 + 9 * i)] for i in range(8)]
    greedy = SamplingParams(ignore_eos=True)
    engine.dispatch_depth = 1
    one = engine.generate(prompts, 24, greedy)
    engine.dispatch_depth = 3
    three = engine.generate(prompts, 24, greedy, offsets=[0.01 * i for i in range(8)])
    assert [c.token_ids for c in one] == [c.token_ids for c in three]
    assert all(len(c.token_ids) == 24 and c.finish_reason == "length" for c in three)
    assert engine.core.workers[0].pool.num_used_blocks == 0


class FailOnce:
    """The simulated actor, whose `fail_at`-th step raises as a model error would."""

    def __init__(self, fail_at: int) -> None:
        self.actor = SimModelActor(sleep=False)
        self.fail_at, self.steps = fail_at, 0

    def execute(self, plan):
        self.steps += 1
        if self.steps == self.fail_at:
            raise PlanError("injected model error")
        return self.actor.execute(plan)


class Collect:
    """A sink that keeps finished requests and failed ones."""

    def __init__(self, core: SchedulerCore) -> None:
        self.core = core
        self.finished: list[Request] = []
        self.failed: dict[str, str] = {}

    def deliver(self, events) -> None:
        self.finished += [e.request for e in events if e.finish_reason]

    def record(self, *args) -> None:
        pass

    def fail(self, requests, message: str) -> None:
        for req in requests:
            self.failed[req.request_id] = message
            self.core.cancel(req.request_id, 0.0)

    def actor_up(self, worker: int, up: bool) -> None:
        pass


def run_until_done(actor, core: SchedulerCore, sink: Collect, reqs: list[Request]) -> None:
    async def main() -> None:
        dispatcher = Dispatcher(core, 0, ThreadLink(actor), sink, depth=2)
        task = asyncio.create_task(dispatcher.run())
        for r in reqs:
            core.submit(r, 0.0)
        dispatcher.poke()
        while len(sink.finished) + len(sink.failed) < len(reqs):
            await asyncio.sleep(0.01)
        dispatcher.stop()
        await task

    asyncio.run(main())


def test_a_step_that_raises_once_is_retried_and_no_request_fails() -> None:
    """A step that raised on the actor (outside the forward pass, which the actor contains
    itself): the actor is reset, the step's requests re-prefill once, and nobody fails."""
    actor = FailOnce(fail_at=6)
    core = SchedulerCore(make_policy("sarathi", PolicyConfig(max_num_seqs=3)), 200, 16)
    sink = Collect(core)
    reqs = [Request(f"r{i}", 20 + i, 30, 0.0, prompt_token_ids=[100 + i] * (20 + i)) for i in range(6)]
    run_until_done(actor, core, sink, reqs)
    assert not sink.failed
    assert {r.request_id for r in sink.finished} == {r.request_id for r in reqs}
    for r in reqs:  # re-prefilled after the reset: the text is unchanged
        assert r.output_token_ids == expected_tokens(r, 30)
    assert core.workers[0].pool.num_used_blocks == 0 and core.workers[0].epoch == 1


class FailAlways(FailOnce):
    """Every step raises: a request in two failed steps fails (retried once, no endless loop)."""

    def execute(self, plan):
        raise PlanError("injected model error")


def test_a_request_in_two_failed_steps_fails_with_a_typed_error() -> None:
    core = SchedulerCore(make_policy("sarathi", PolicyConfig(max_num_seqs=3)), 200, 16)
    sink = Collect(core)
    reqs = [Request(f"r{i}", 20, 5, 0.0, prompt_token_ids=[100 + i] * 20) for i in range(3)]
    run_until_done(FailAlways(0), core, sink, reqs)
    assert set(sink.failed) == {r.request_id for r in reqs}
    assert all("injected" in m for m in sink.failed.values())
    assert all(r.num_failed_steps == 2 for r in reqs)
    assert core.workers[0].pool.num_used_blocks == 0 and not core.requests


def test_a_pipelined_actor_runs_plans_in_the_order_sent_whatever_order_they_arrive() -> None:
    """Ray may start an async actor's calls out of order: the plans' own order is restored."""
    import random

    from actors.pipelined import pipelined

    core = SchedulerCore(make_policy("sarathi", PolicyConfig(max_num_seqs=4)), 200, 16)
    for i in range(6):
        core.submit(Request(f"r{i}", 10 + 5 * i, 12, 0.0, prompt_token_ids=[200 + i] * (10 + 5 * i)), 0.0)
    plans = []
    while (step := core.plan(0, 0.0)) is not None and len(plans) < 8:
        plans.append(step.wire)  # planned ahead, nothing committed: each names its predecessor
    assert [p.prev_iteration for p in plans] == [-1] + [p.iteration for p in plans[:-1]]
    in_order = SimModelActor(sleep=False)
    expected = [list(in_order.execute(p).token_ids) for p in plans]
    actor = pipelined(SimModelActor)(sleep=False)

    async def main() -> list[list[int]]:
        shuffled = list(range(len(plans)))
        random.Random(3).shuffle(shuffled)
        tasks = {}
        for i in shuffled:  # calls start in a scrambled order
            tasks[i] = asyncio.create_task(actor.execute(plans[i]))
            await asyncio.sleep(0)
        return [list((await tasks[i]).token_ids) for i in range(len(plans))]

    assert asyncio.run(main()) == expected


def test_a_stop_string_finish_is_a_finish_with_exact_tokens() -> None:
    """The ingress found a stop string after 3 tokens while more were in flight: the request
    finishes with "stop" and 3 tokens, its KV is freed, and Nested WAIT's length estimate sees 3."""
    policy = make_policy("nested-wait", PolicyConfig(max_num_seqs=4), kv_capacity_tokens=200 * 16)
    core = SchedulerCore(policy, 200, 16)
    actor = SimModelActor(sleep=False)
    req = Request("s", 20, 50, 0.0, prompt_token_ids=[7] * 20)
    core.submit(req, 0.0)
    steps = []
    while len(req.output_token_ids) < 5:
        step = core.plan(0, 0.0)
        if step is not None:
            steps.append(step)
        if len(steps) == 2 or step is None:  # up to two plans in flight, as the dispatch loop keeps
            done = steps.pop(0)
            core.commit(done, actor.execute(done.wire), 0.0)
    seen = policy.lengths.count
    assert core.finish("s", 3, 1.0) is req and core.finish("s", 3, 1.0) is None
    assert req.finish_reason == "stop" and len(req.output_token_ids) == 3 and req.num_generated == 3
    assert core.workers[0].pool.num_used_blocks == 0 and not core.requests
    assert policy.lengths.count == seen + 1 and policy.lengths._lengths[-1] == 3
    assert not core.commit(steps[0], actor.execute(steps[0].wire), 1.0)  # the token in flight is void


class HangOnce(ThreadLink):
    """The in-process actor whose `hang_at`-th step never returns (a hung actor): the step's
    deadline passes, the link is told to restart the actor, and its requests re-prefill."""

    def __init__(self, actor, hang_at: int) -> None:
        super().__init__(actor)
        self.hang_at, self.sent, self.restarts = hang_at, 0, 0

    def submit(self, plan):
        self.sent += 1
        if self.sent == self.hang_at:
            return asyncio.get_running_loop().create_future()  # never resolves
        return super().submit(plan)

    def restart(self) -> None:
        self.restarts += 1
        self.actor.states.clear()  # a restarted actor holds nothing


def test_a_step_past_its_deadline_restarts_the_actor_and_nothing_is_lost() -> None:
    core = SchedulerCore(make_policy("sarathi", PolicyConfig(max_num_seqs=3)), 200, 16)
    sink = Collect(core)
    link = HangOnce(SimModelActor(sleep=False), hang_at=5)
    reqs = [Request(f"r{i}", 20 + i, 30, 0.0, prompt_token_ids=[100 + i] * (20 + i)) for i in range(5)]

    async def main() -> None:
        dispatcher = Dispatcher(core, 0, link, sink, depth=2, deadline_floor_s=0.3)
        task = asyncio.create_task(dispatcher.run())
        for r in reqs:
            core.submit(r, 0.0)
        dispatcher.poke()
        while len(sink.finished) < len(reqs):
            await asyncio.sleep(0.01)
        dispatcher.stop()
        await task

    asyncio.run(main())
    assert link.restarts == 1 and core.workers[0].epoch == 1 and not sink.failed
    for r in reqs:
        assert r.output_token_ids == expected_tokens(r, 30)


class DeadForGood(ThreadLink):
    """An actor that died and does not come back."""

    def submit(self, plan):
        future = asyncio.get_running_loop().create_future()
        future.set_exception(ConnectionError("actor died"))
        return future

    @staticmethod
    def classify(exc: BaseException) -> str:
        return "died"

    async def wait_until_back(self, give_up_s: float | None = None) -> bool:
        if give_up_s is None:
            await asyncio.Event().wait()  # never
        await asyncio.sleep(give_up_s)
        return False


def test_requests_of_an_actor_that_stays_dead_move_to_a_healthy_one() -> None:
    core = SchedulerCore(make_policy("sarathi", PolicyConfig(max_num_seqs=4)), [200, 200], 16)
    sink = Collect(core)
    reqs = [Request(f"r{i}", 20 + i, 30, 0.0, prompt_token_ids=[100 + i] * (20 + i)) for i in range(6)]

    async def main() -> None:
        dead = Dispatcher(core, 0, DeadForGood(None), sink, depth=2, restart_wait_s=0.2)
        alive = Dispatcher(core, 1, ThreadLink(SimModelActor(sleep=False)), sink, depth=2)
        sink.rerouted = lambda moved, stranded: alive.poke()
        tasks = [asyncio.create_task(d.run()) for d in (dead, alive)]
        for r in reqs:
            core.submit(r, 0.0)
        dead.poke()
        alive.poke()
        while len(sink.finished) < len(reqs):
            await asyncio.sleep(0.01)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    assert not sink.failed and core.workers[0].healthy is False
    assert all(r.worker == 1 for r in reqs)
    for r in reqs:
        assert r.output_token_ids == expected_tokens(r, 30)
    with pytest.raises(Exception, match="no model actor"):  # nothing routed to the dead one
        core.workers[1].healthy = False
        core.submit(Request("late", 10, 5, 0.0, prompt_token_ids=[3] * 10), 0.0)
