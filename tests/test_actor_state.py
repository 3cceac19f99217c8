"""The actor side of diff plans: request state, plan checks, batch building, the real engine."""
from __future__ import annotations

import copy
import pickle
from collections import deque

import numpy as np
import pytest
import torch

from actors.model.batch import build_batch
from actors.model_actor import ModelActor
from actors.request_state import RequestStates
from kv.tables import PlanError
from scheduler.core import SchedulerCore
from scheduler.plan import DiffPlan, NewRequestData, PlanExpander, int_array
from scheduler.policies import PolicyConfig, make_policy
from scheduler.request import Request, SamplingParams

BS = 4
CPU = torch.device("cpu")


def states_with(*requests: tuple[int, list[int], list[int]]) -> RequestStates:
    """A state holding requests (slot, tokens, blocks), nothing computed yet."""
    st = RequestStates(num_blocks=16, block_size=BS, max_model_len=64, vocab_size=1000)
    news = [NewRequestData(s, f"r{s}", int_array(t), int_array(b), SamplingParams(), len(t))
            for s, t, b in requests]
    st.apply(DiffPlan(0, 0, 1, BS, new_requests=news))
    return st


def rows_plan(iteration: int = 1, **kw) -> DiffPlan:
    return DiffPlan(0, iteration, 1, BS, **{k: v if k == "new_requests" else int_array(v)
                                             for k, v in kw.items()})


def snapshot(st: RequestStates) -> tuple:
    return (st.live.copy(), st.computed.copy(), st.known.copy(), st.blocks.owner.copy(),
            st.blocks.lengths.copy(), st.blocks.tables.copy(), list(st.request_ids))


BAD_PLANS = [
    (rows_plan(slots=[0], num_tokens=[3], start_pos=[1]), "start_pos 1, but 0"),
    (rows_plan(slots=[0], num_tokens=[9], start_pos=[0]), "cannot hold"),
    (rows_plan(slots=[0, 0], num_tokens=[1, 1], start_pos=[0, 0]), "twice"),
    (rows_plan(slots=[5], num_tokens=[1], start_pos=[0]), "holds no request"),
    (rows_plan(slots=[0], num_tokens=[7], start_pos=[0], grow_slots=[0], grow_blocks=[3]),
     "belongs to another request"),
    (rows_plan(grow_slots=[0], grow_blocks=[99]), "outside the cache"),
    (rows_plan(grow_slots=[0, 1, 0], grow_blocks=[4, 5, 6]), "not contiguous"),
    (rows_plan(slots=[0], num_tokens=[0], start_pos=[0]), "at least one token"),
    (rows_plan(slots=[1], num_tokens=[3], start_pos=[0], freed_slots=[1]), "holds no request"),
    (rows_plan(new_requests=[NewRequestData(0, "x", int_array([1]), int_array([7]), SamplingParams())]),
     "holds a live request"),
    (rows_plan(new_requests=[NewRequestData(2, "x", int_array([1]), int_array([3]), SamplingParams())]),
     "belongs to another request"),
    (rows_plan(new_requests=[NewRequestData(2, "x", int_array([1, 5000]), int_array([7]), SamplingParams())]),
     "vocabulary"),
    (rows_plan(slots=[9999], num_tokens=[1], start_pos=[0]), "outside"),
    (DiffPlan(0, 1, 1, 16), "block_size"),
]


@pytest.mark.parametrize("plan, message", BAD_PLANS)
def test_a_bad_plan_is_refused_whole_and_changes_nothing(plan: DiffPlan, message: str) -> None:
    st = states_with((0, [1, 2, 3, 4, 5, 6, 7], [0, 1]), (1, [8, 9, 10], [2, 3]))
    before = snapshot(st)
    with pytest.raises(PlanError, match=message):
        st.apply(plan)
    after = snapshot(st)
    for a, b in zip(before, after):
        assert a == b if isinstance(a, list) else np.array_equal(a, b)


def test_freed_blocks_may_go_to_a_new_request_in_the_same_plan() -> None:
    st = states_with((0, [1, 2, 3, 4, 5], [0, 1]), (1, [8, 9], [2]))
    new = NewRequestData(0, "again", int_array([4, 4, 4, 4, 4, 4]), int_array([2, 0]), SamplingParams())
    rows = st.apply(rows_plan(freed_slots=[0, 1], new_requests=[new], slots=[0], num_tokens=[6],
                              start_pos=[0]))
    assert rows.slot_mapping.tolist() == [8, 9, 10, 11, 0, 1]
    assert st.blocks.owner[[0, 1, 2]].tolist() == [0, -1, 0] and not st.live[1]


def test_decodes_feed_the_token_sampled_last_and_blocks_grow() -> None:
    st = states_with((3, [1, 2, 3, 4], [5]))
    rows = st.apply(rows_plan(slots=[3], num_tokens=[4], start_pos=[0]))
    assert rows.sample.tolist() == [True] and rows.input_ids.tolist() == [1, 2, 3, 4]
    st.advance(rows, np.array([42]))
    rows = st.apply(rows_plan(2, slots=[3], num_tokens=[1], start_pos=[4], grow_slots=[3], grow_blocks=[9]))
    assert rows.input_ids.tolist() == [42] and rows.positions.tolist() == [4]
    assert rows.slot_mapping.tolist() == [9 * BS] and rows.tables.tolist() == [[5, 9]]


def test_a_new_epoch_drops_everything_first() -> None:
    st = states_with((0, [1, 2], [0]))
    st.apply(DiffPlan(0, 5, 2, BS))
    assert st.num_live == 0 and (st.blocks.owner == -1).all()


def test_steady_decode_plan_is_small_on_the_wire() -> None:
    """At batch 256, a decode step's diff plan pickles to a few KB (the full form re-sends every
    block table: ~130 KiB at 2k context, over Ray's inline limit)."""
    policy = make_policy("vllm", PolicyConfig(max_num_seqs=256))
    core = SchedulerCore(policy, 40_000, 16)
    expander = PlanExpander()
    for i in range(256):
        core.submit(Request(f"{i:032x}", 2000, 100, 0.0, prompt_token_ids=[5] * 2000), 0.0)
    sizes = []
    while len(sizes) < 40:
        step = core.plan(0, 0.0)
        expander.expand(step.wire)
        result = dummy_result(step)
        expander.observe(step.wire, result)
        core.commit(step, result, 0.0)
        if len(step) == 256 and not step.wire.new_requests:
            sizes.append((len(pickle.dumps(step.wire)), len(pickle.dumps(expander.expand(step.wire)))))
    diff, full = sizes[-1]
    assert diff < 4096, diff
    assert full > 100 * 1024


def dummy_result(step, token: int = 7):
    from scheduler.plan import StepResult

    return StepResult(step.worker, step.iteration, [token] * step.num_sampled)


# -- the real engine ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def actors():
    torch.set_num_threads(1)
    return (ModelActor("random:tiny", kv_cache_tokens=24 * 16, num_threads=1),
            ModelActor("random:tiny", kv_cache_tokens=24 * 16, num_threads=1))


def test_diff_plans_run_ahead_and_give_the_tokens_of_self_contained_plans(actors) -> None:
    """The core plans two steps ahead (depth 2, evictions forced by a small cache); one actor runs
    the diff plans, the other the same plans expanded to the self-contained form: the batches
    and the sampled tokens are identical."""
    diff_actor, full_actor = actors
    cap = diff_actor.capacity()
    core = SchedulerCore(make_policy("sarathi", PolicyConfig(max_num_seqs=8), chunk_size=48),
                         cap["num_blocks"], cap["block_size"], max_model_len=cap["max_model_len"])
    rng = np.random.default_rng(0)
    greedy = SamplingParams(ignore_eos=True)
    for i in range(10):
        n = int(rng.integers(5, 100))
        core.submit(Request(f"q{i}", n, int(rng.integers(10, 80)), 0.0,
                            prompt_token_ids=rng.integers(0, cap["vocab_size"], n).tolist(),
                            sampling=greedy), 0.0)
    expander, in_flight, steps = PlanExpander(), deque(), 0
    while core.has_work() or in_flight:
        while len(in_flight) < 2 and (step := core.plan(0, 1.0)) is not None:
            in_flight.append(step)
        step = in_flight.popleft()
        full = expander.expand(step.wire)
        rows = copy.deepcopy(diff_actor.states).apply(copy.deepcopy(step.wire))
        ours, theirs = build_batch(rows, CPU, 16), build_batch(full, CPU)
        for name in ("input_ids", "positions", "slot_mapping", "sample_rows"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
        assert ours.sample_chunks == theirs.sample_chunks
        assert [(s.row_start, s.start_pos, s.block_table) for s in ours.prefills + ours.decodes] == \
            [(s.row_start, s.start_pos, s.block_table) for s in theirs.prefills + theirs.decodes]
        a, b = diff_actor.execute(step.wire), full_actor.execute(full)
        assert list(a.token_ids) == list(b.token_ids)
        expander.observe(step.wire, a)
        core.commit(step, a, 1.0)
        steps += 1
    assert core.num_evictions > 0, "the cache was meant to force evictions"
    assert not core.requests
