"""A failure stays with the request that caused it, on a real model actor (random:tiny, no Ray).

Two kinds of fault: a sampler row the batched sampler refuses (a NaN temperature, sent past the
ingress's validation as a buggy client library could), and a forward pass that raises whenever a
given request is in the batch. The second uses the model actor's documented test hook
(`FLUIDSERVE_FAULT_INJECTION=1` in its environment, here set on the module in-process): a step
with a request whose prompt starts with `FAULT_PROMPT` raises. In both cases the poisoned request ends
with finish_reason "error" while the other requests finish with the text they get alone, and the
actor is never reset (epoch 0, no eviction): their KV survives, nothing is recomputed.
"""
from __future__ import annotations

import pytest
from test_dispatch import Collect, run_until_done

from actors import model_actor
from actors.model_actor import FAULT_PROMPT, ModelActor
from scheduler.core import SchedulerCore
from scheduler.policies import PolicyConfig, make_policy
from scheduler.request import Request, SamplingParams

GREEDY = SamplingParams(ignore_eos=True)


@pytest.fixture(scope="module")
def actor() -> ModelActor:
    return ModelActor("random:tiny", kv_cache_tokens=64 * 16, num_threads=1)


def run(actor: ModelActor, reqs: list[Request]) -> SchedulerCore:
    cap = actor.capacity()
    actor.states.clear()  # a new core: the actor starts from nothing, as after a restart
    actor.states.epoch = None
    core = SchedulerCore(make_policy("sarathi", PolicyConfig(max_num_seqs=16)), cap["num_blocks"],
                         cap["block_size"], max_model_len=cap["max_model_len"])
    run_until_done(actor, core, Collect(core), reqs)
    return core


def normal(i: int, tag: str) -> Request:
    prompt = [(11 * i + j) % 500 + 3 for j in range(12 + 3 * i)]
    return Request(f"{tag}-{i}", len(prompt), 12, 0.0, prompt_token_ids=prompt, sampling=GREEDY)


def alone(actor: ModelActor, i: int) -> list[int]:
    req = normal(i, "alone")
    run(actor, [req])
    return req.output_token_ids


@pytest.mark.parametrize("fault", ["sampler", "forward"])
def test_a_poisoned_request_fails_alone_and_the_others_keep_their_kv(actor, fault, monkeypatch) -> None:
    expected = [alone(actor, i) for i in range(8)]
    faults_before = actor.faults
    if fault == "sampler":
        bad = SamplingParams(temperature=float("nan"), ignore_eos=True)
        poison = Request("poison", 20, 12, 0.0, prompt_token_ids=[42] * 20, sampling=bad)
    else:
        monkeypatch.setattr(model_actor, "FAULT_INJECTION", True)
        prompt = FAULT_PROMPT.tolist() + [42] * 12
        poison = Request("poison", 20, 12, 0.0, prompt_token_ids=prompt, sampling=GREEDY)
    others = [normal(i, "batch") for i in range(8)]
    core = run(actor, others[:4] + [poison] + others[4:])
    assert poison.finish_reason == "error" and not poison.output_token_ids
    assert [r.output_token_ids for r in others] == expected
    assert all(r.finish_reason == "length" for r in others)
    # No reset and no eviction: the other requests' KV survived the fault, nothing recomputed.
    assert core.workers[0].epoch == 0 and core.num_evictions == 0
    assert core.workers[0].pool.num_used_blocks == 0 and not core.requests
    if fault == "forward":
        assert actor.faults > faults_before and actor.failed_rows >= 1
    else:
        assert actor.faults == faults_before  # the sampler refuses the row; the step never raises
