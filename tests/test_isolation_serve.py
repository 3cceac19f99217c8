"""Failure isolation and finishes through the real Serve app, the real model and the `openai`
client: a poisoned request fails alone among normal ones (a typed 500, or an SSE error event then
[DONE]), the others' text is what they get alone and their KV survives; a stop string is a finish.

The model error is a real exception in the model actor's forward pass, raised through its
documented test hook: the test cluster sets FLUIDSERVE_FAULT_INJECTION=1 (tests/conftest.py) and
a prompt starting with the token ids `FAULT_PROMPT` makes every step that includes it raise.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import openai
import pytest
from test_reliability import metric, metric_at_least, read_sse

from actors.model_actor import FAULT_PROMPT

pytestmark = [pytest.mark.serve, pytest.mark.slow]
FAULT = FAULT_PROMPT.tolist() + [330, 331, 332]


@pytest.fixture
def client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.base_url, api_key="unused", max_retries=0, timeout=120)


def stop_finishes(app) -> float:
    text = httpx.get(f"{app.url}/metrics", timeout=60).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("fluidserve:request_success_total{") and 'finished_reason="stop"' in line)


def model_id(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _scheduler_nan_request(app) -> list[dict]:
    """A NaN temperature straight to the scheduler (past the ingress's validation, as a buggy
    in-cluster caller could): the batched sampler refuses that row only."""
    gen = app.scheduler().options(stream=True).generate.remote(
        {"prompt_token_ids": [5, 6, 7, 8], "max_tokens": 8, "temperature": float("nan"), "ignore_eos": True})
    return list(gen)


def test_poisoned_requests_fail_alone_among_eight(app, client):
    model = model_id(client)
    prompts = [f"Count to {i}:" for i in range(8)]
    alone = [client.completions.create(model=model, prompt=p, max_tokens=8, temperature=0).choices[0].text
             for p in prompts]
    app.wait_idle()
    before = app.debug_state()
    failures = metric(app, "fluidserve:request_failure_total")

    def normal(p: str) -> str:
        return client.completions.create(model=model, prompt=p, max_tokens=8, temperature=0).choices[0].text

    def poisoned_json() -> httpx.Response:
        return httpx.post(f"{app.base_url}/completions", timeout=120,
                          json={"prompt": FAULT, "max_tokens": 8, "temperature": 0})

    def poisoned_stream() -> list[dict]:
        with httpx.stream("POST", f"{app.base_url}/completions", timeout=120,
                          json={"prompt": FAULT, "max_tokens": 8, "stream": True}) as resp:
            assert resp.status_code == 200
            lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        return [json.loads(line[6:]) for line in lines[:-1]]

    with cf.ThreadPoolExecutor(11) as pool:
        texts = [pool.submit(normal, p) for p in prompts]
        bad_json, bad_stream = pool.submit(poisoned_json), pool.submit(poisoned_stream)
        nan = pool.submit(_scheduler_nan_request, app)
        assert [t.result() for t in texts] == alone
        resp = bad_json.result()
        events, messages = bad_stream.result(), nan.result()
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "model_error", resp.text
    assert "model error" in resp.json()["error"]["message"]
    assert "error" in events[-1] and "model error" in events[-1]["error"]["message"]
    assert messages[-1]["finish_reason"] == "error" and "model error" in messages[-1]["error"]
    assert all(t >= 0 for m in messages for t in m.get("token_ids", ()))  # no -1 ever leaks
    # No model actor was reset (its requests' KV survived) and nothing was recomputed.
    after = app.wait_idle()
    assert after["epochs"] == before["epochs"] and after["evictions"] == before["evictions"]
    assert metric_at_least(app, "fluidserve:request_failure_total", failures + 3) == failures + 3


def test_stop_string_is_a_finish_with_exact_usage(app, client):
    model = model_id(client)
    full = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0, logprobs=0)
    tokens = full.choices[0].logprobs.tokens  # " 5", ",", " 6", ...
    stops = stop_finishes(app)
    cancelled = metric(app, "fluidserve:request_cancelled_total")
    latencies = metric(app, "fluidserve:e2e_request_latency_seconds_count")
    for stream in (False, True):
        out = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0,
                                        stop=[" 6"], stream=stream,
                                        **({"stream_options": {"include_usage": True}} if stream else {}))
        if stream:
            chunks = list(out)
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            usage = chunks[-1].usage
        else:
            text, finish, usage = out.choices[0].text, out.choices[0].finish_reason, out.usage
        assert finish == "stop" and text == "".join(tokens)[: "".join(tokens).index(" 6")]
        assert usage.completion_tokens == next(i + 1 for i in range(len(tokens))
                                               if " 6" in "".join(tokens[: i + 1]))
    deadline = time.monotonic() + 15
    while stop_finishes(app) < stops + 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert stop_finishes(app) == stops + 2
    assert metric_at_least(app, "fluidserve:e2e_request_latency_seconds_count", latencies + 2) >= latencies + 2
    assert metric(app, "fluidserve:request_cancelled_total") == cancelled


def test_top_logprobs_come_from_the_sampler(client):
    out = client.chat.completions.create(model=model_id(client), messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    for e in out.choices[0].logprobs.content:
        alts = e.top_logprobs
        assert len(alts) == 3 and alts[0].token == e.token  # greedy: the sampled token is the top one
        assert abs(alts[0].logprob - e.logprob) < 1e-4
        assert alts[0].logprob >= alts[1].logprob >= alts[2].logprob
    chunks = list(client.completions.create(model=model_id(client), prompt="1, 2, 3,", max_tokens=4,
                                            temperature=0, logprobs=2, stream=True))
    tops = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.top_logprobs]
    assert len(tops) == 4 and all(len(t) >= 2 for t in tops)


LIMITS_APP = {"num_model_actors": 1, "kv_cache_tokens": 1024, "max_queue_len": 1000,
              "max_queue_wait_s": 1.5, "max_queued_tokens": 1500}


def test_queue_timeout_and_token_cap_under_a_burst(deploy_app):
    """A burst far over capacity: past max_queued_tokens a request gets 429 at once; one not
    admitted within max_queue_wait_s gets 503 with Retry-After (an SSE error event then [DONE]
    when streaming); everything admitted finishes in full."""
    app = deploy_app(**LIMITS_APP)
    app.wait_idle()
    prompt = " ".join(["word"] * 90)  # ~90 tokens: 16 of them fill the token cap

    def one(i: int) -> tuple[int, dict, dict]:
        body = {"prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": True, "stream": i % 4 == 0}
        with httpx.stream("POST", f"{app.base_url}/completions", json=body, timeout=300) as resp:
            if resp.status_code != 200 or not body["stream"]:
                resp.read()
                return resp.status_code, dict(resp.headers), resp.json()
            events = read_sse(resp)
            return 200, dict(resp.headers), {"events": events}

    with cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    by_status: dict[int, list] = {}
    for status, headers, body in results:
        by_status.setdefault(status, []).append((headers, body))
    assert set(by_status) <= {200, 429, 503}, {s: b[0][1] for s, b in by_status.items()}
    assert by_status.get(429), "32 x ~90 prompt tokens against a cap of 1500 must see 429s"
    for headers, body in by_status.get(429, []):
        assert body["error"]["type"] == "rate_limit_error" and "max_queued_tokens" in body["error"]["message"]
    timed_out = [b for _, b in by_status.get(503, [])]
    streamed_timeouts = [b["events"][-1] for _, b in by_status.get(200, [])
                         if "events" in b and "error" in b["events"][-1]]
    assert timed_out or streamed_timeouts, "a KV cache of 1024 tokens cannot admit the burst in 1.5 s"
    for headers, body in by_status.get(503, []):
        assert body["error"]["code"] == "queue_timeout" and int(headers["retry-after"]) >= 1
    for event in streamed_timeouts:
        assert event["error"]["code"] == "queue_timeout"
    for _, body in by_status.get(200, []):
        if "events" in body and "error" in body["events"][-1]:
            continue
        if "events" in body:
            assert body["events"][-1]["choices"][0]["finish_reason"] == "length"
        else:
            assert body["usage"]["completion_tokens"] == 48
    state = app.wait_idle()
    assert state["requests"] == 0 and sum(state["used_blocks"]) == 0
