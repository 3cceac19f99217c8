"""`model: sim:a100-llama2-7b`: the capacity-planning twin through the real Serve app and HTTP path."""
from __future__ import annotations

import time

import httpx
import pytest

from actors.sim_actor import TOKEN_RANGE, sim_cost

pytestmark = pytest.mark.serve

SIM_APP = {"model": "sim:a100-llama2-7b", "num_model_actors": 2,
           "model_actor_resources": {"num_cpus": 0.1, "num_gpus": 0}, "sim_output_lengths": "lmsys"}


@pytest.fixture
def sim_app(deploy_app):
    return deploy_app(**SIM_APP)


def complete(app, body: dict) -> dict:
    resp = httpx.post(f"{app.base_url}/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_the_twin_serves_the_openai_api_at_the_cost_models_pace(sim_app):
    import openai

    client = openai.OpenAI(base_url=sim_app.base_url, api_key="-")
    started = time.monotonic()
    reply = client.completions.create(model="sim:a100-llama2-7b", prompt="Hello there", max_tokens=60,
                                      extra_body={"ignore_eos": True})
    elapsed = time.monotonic() - started
    assert reply.usage.completion_tokens == 60 and reply.choices[0].finish_reason == "length"
    assert reply.choices[0].text  # the default tokenizer decodes the simulated ids
    cost, _ = sim_cost("sim:a100-llama2-7b")
    assert elapsed >= 60 * cost.d0  # every step waits its modelled time
    chunks = list(client.completions.create(model="sim:a100-llama2-7b", prompt="Hello there",
                                            max_tokens=60, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len("".join(c.choices[0].text for c in chunks)) > 0


def test_tokens_come_from_the_vocabulary_and_eos_from_the_length_distribution(sim_app):
    ids = list(range(1000, 1040))
    outs = [complete(sim_app, {"prompt": ids, "max_tokens": 2000, "logprobs": None}) for _ in range(4)]
    # EOS at lengths drawn from the LMSYS sample (most answers there are under 500 tokens).
    assert any(o["choices"][0]["finish_reason"] == "stop" for o in outs)
    assert all(o["usage"]["completion_tokens"] <= 2000 for o in outs)
    forced = complete(sim_app, {"prompt": ids, "max_tokens": 700, "ignore_eos": True})
    assert forced["choices"][0]["finish_reason"] == "length"
    assert forced["usage"]["completion_tokens"] == 700
    stream = sim_app.scheduler().options(stream=True).generate.remote(
        {"prompt_token_ids": ids, "max_tokens": 30, "ignore_eos": True})
    tokens = [t for msg in stream for t in msg.get("token_ids", ())]
    assert len(tokens) == 30 and all(TOKEN_RANGE[0] <= t < TOKEN_RANGE[1] for t in tokens)
    state = sim_app.wait_idle()
    assert sum(state["used_blocks"]) == 0 and state["requests"] == 0


def test_a_bad_sim_spec_is_refused_when_the_app_is_built():
    from deploy.app import AppArgs

    with pytest.raises(ValueError, match="unknown preset"):
        AppArgs.from_dict({"model": "sim:h100-unknown"})
    with pytest.raises(ValueError, match="not found"):
        AppArgs.from_dict({"model": "sim:/no/such/cost.json"})


@pytest.mark.slow
def test_bench_scale_measures_a_run_through_the_scheduler(deploy_app):
    """`fluidserve bench scale`'s measurement on the twin: every request done, the figures the
    README's table reads present and in range (their values on a shared box say nothing)."""
    import asyncio

    from bench import scale

    config = scale.ScaleConfig(actors=[1], workloads=["p512d200"], modes=["replica", "handle"],
                               duration=4.0, warmup=1.5)
    app = deploy_app(**scale.app_args(config, 1))
    for mode in config.modes:
        run = asyncio.run(scale.measure(config, app.url, 1, "p512d200", mode))
        assert run["completed"] == run["submitted"] > 0, run
        assert 0 < run["busy_fraction"] <= 1 and run["gap_p99_ms"] >= run["gap_p50_ms"] >= 0
        assert run["throughput_tok_s"] > 0 and run["sim_window_tok_s"] > 0
        assert run["fluid_throughput_tok_s"] > run["offered_tok_s"] * 0.5
        assert run["scheduler_cpu_ms_per_iteration"] > 0 and run["ttft_p99_s"] >= run["ttft_p50_s"]
        assert "| 1 | p512d200 |" in scale.markdown({"model": scale.MODEL, "load": 0.9,
                                                     "stream_interval_s": 0.05, "runs": [run]})
