"""End to end: the real Serve app on a local Ray cluster, the real default model, the real
`openai` client. What users rely on: both endpoints, streaming or not, concurrency, Python
handles, identical greedy output to the in-process engine, KV freed on cancellation."""
from __future__ import annotations

import concurrent.futures as cf

import httpx
import openai
import pytest

pytestmark = [pytest.mark.serve, pytest.mark.slow]

CHAT = [{"role": "user", "content": "Name a color."}]


@pytest.fixture
def client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.base_url, api_key="unused", max_retries=0, timeout=120)


def model_id(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_completions_and_chat_through_openai_client(client):
    model = model_id(client)
    out = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                    temperature=0)
    assert out.choices[0].text and out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens >= 1 and out.usage.prompt_tokens > 0
    chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens


def test_streaming_equals_non_streaming(client):
    model = model_id(client)
    full = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=12,
                                                 temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    pieces = list(client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=6,
                                            temperature=0, stream=True))
    whole = client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=6, temperature=0)
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text


def test_32_concurrent_requests_complete_on_both_model_actors(client, app):
    model = model_id(client)
    before = app.debug_state()["iterations"]

    def one(i: int) -> int:
        out = client.completions.create(model=model, prompt=f"Count to {i}:", max_tokens=8,
                                        temperature=0)
        return out.usage.completion_tokens

    with cf.ThreadPoolExecutor(32) as pool:
        counts = list(pool.map(one, range(32)))
    assert len(counts) == 32 and all(c >= 1 for c in counts)
    state = app.debug_state()
    after = state["iterations"]
    assert all(a > b for a, b in zip(after, before)), f"every model actor ran: {before} -> {after}"
    # The ingress replica followed all 32 through one multiplexed stream from the scheduler.
    assert state["subscribers"] == 1 and state["streams"] == 0


def test_greedy_output_equals_in_process_engine(client, app):
    from actors.local_engine import LocalEngine
    from deploy.tokenizer import load_tokenizer

    prompts = ["Once upon a time", "def fibonacci(n):", "The three primary colors are"]
    tok = load_tokenizer("default")
    engine = LocalEngine("default", kv_cache_tokens=4096, num_threads=1)
    local = engine.generate([tok(p)["input_ids"] for p in prompts], max_tokens=16)
    model = model_id(client)
    for prompt, expected in zip(prompts, local):
        served = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
        assert served.choices[0].text == tok.decode(expected.token_ids, skip_special_tokens=True)


def test_python_handle_returns_the_http_objects(app):
    handle = app.handle()
    body = {"messages": CHAT, "max_tokens": 6, "temperature": 0}
    reply = handle.chat.remote(body).result()
    assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] >= 1
    http = httpx.post(f"{app.base_url}/chat/completions", json=body, timeout=120).json()
    assert http["choices"][0]["message"]["content"] == reply["choices"][0]["message"]["content"]
    chunks = list(app.handle().options(stream=True).completions.remote(
        {"prompt": "Hello", "max_tokens": 5, "temperature": 0, "stream": True}))
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["object"] == "text_completion" for c in chunks)
    bad = handle.completions.remote({"prompt": "x", "max_tokens": -1}).result()
    assert "error" in bad and "max_tokens" in bad["error"]["message"]


def test_client_disconnect_frees_kv_at_once(app):
    app.wait_idle()
    body = {"prompt": "Write a long story about a dragon.", "max_tokens": 2000, "stream": True,
            "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", f"{app.base_url}/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: "):
                got += 1
            if got >= 3:
                break
        assert sum(app.debug_state()["used_blocks"]) > 0
    state = app.wait_idle(20)
    assert sum(state["used_blocks"]) == 0 and state["requests"] == 0


def test_cancelled_handle_call_frees_kv(app):
    app.wait_idle()
    gen = app.handle().options(stream=True).completions.remote(
        {"prompt": "Tell me everything.", "max_tokens": 2000, "stream": True, "ignore_eos": True})
    next(iter(gen))
    gen.cancel()
    state = app.wait_idle(20)
    assert sum(state["used_blocks"]) == 0 and state["requests"] == 0


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    (b"\xff\xfe\x00", 400),
    (b"", 400),
    (b'{"prompt": "hi", "max_tokens": "many"}', 400),
    (b'{"prompt": "hi", "temperature": -1}', 400),
    (b'{"prompt": "hi", "top_p": 0}', 400),
    (b'{"prompt": "hi", "model": "gpt-9"}', 404),
    (b'{"max_tokens": 5}', 400),
    (b'{"prompt": "hi", "max_tokens": 100000000}', 400),
])
def test_bad_input_gets_openai_error(app, body, status):
    resp = httpx.post(f"{app.base_url}/completions", content=body, timeout=60,
                      headers={"Content-Type": "application/json"})
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"] and err["type"]
    ok = httpx.post(f"{app.base_url}/completions", json={"prompt": "ok", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200
