"""OpenAI protocol details through the real `openai` client against the real Serve app: usage
chunks, logprob shapes, stop_token_ids, sampling edge cases, and per-request cost bounds."""
from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import openai
import pytest

pytestmark = [pytest.mark.serve, pytest.mark.slow]

CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture
def client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    from deploy.tokenizer import load_tokenizer

    return load_tokenizer("default")


def model_id(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def rejected_total(app) -> float:
    text = httpx.get(f"{app.url}/metrics", timeout=60).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("fluidserve:request_rejected_total"))


def test_include_usage_ends_with_a_usage_only_chunk(client):
    model = model_id(client)
    whole = client.chat.completions.create(model=model, messages=CHAT, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    *content, last = chunks
    assert last.choices == [] and last.usage == whole.usage
    assert all(c.usage is None and len(c.choices) == 1 for c in content)
    assert "".join(c.choices[0].delta.content or "" for c in content) == whole.choices[0].message.content
    assert content[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    pieces = list(client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert pieces[-1].choices == [] and pieces[-1].usage.completion_tokens == 6
    assert all(p.usage is None for p in pieces[:-1])
    # Asked not to: no usage anywhere.
    quiet = list(client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=6, temperature=0,
                                           stream=True, stream_options={"include_usage": False}))
    assert all(p.usage is None and p.choices for p in quiet)


def test_chat_logprobs_shape(client):
    out = client.chat.completions.create(model=model_id(client), messages=CHAT, max_tokens=8,
                                         temperature=0, logprobs=True, top_logprobs=3)
    choice = out.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == out.usage.completion_tokens
    for e in entries:
        assert e.logprob <= 0 and isinstance(e.token, str) and bytes(e.bytes).decode("utf-8", "replace") == e.token
        assert len(e.top_logprobs) <= 3  # empty until the scheduler sends the alternatives
        for alt in e.top_logprobs:
            assert alt.logprob <= 0 and isinstance(alt.token, str)
    if choice.finish_reason == "length":  # no stop token: the tokens spell the content exactly
        assert b"".join(bytes(e.bytes) for e in entries).decode() == choice.message.content
    plain = client.chat.completions.create(model=model_id(client), messages=CHAT, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == choice.message.content


def test_completion_logprobs_zero_returns_the_sampled_tokens(client):
    model = model_id(client)
    out = client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=6, temperature=0, logprobs=0)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and top[token] == logprob
    # Streamed, the offsets run on across chunks and the pieces add up to the same.
    chunks = list(client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=6, temperature=0,
                                            logprobs=2, stream=True))
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset


def test_stop_token_ids_text_never_appears(client, tokenizer):
    model = model_id(client)
    full = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0,
                                     logprobs=0)
    assert full.choices[0].text.startswith(" 5,"), full.choices[0].text
    through_comma = full.choices[0].logprobs.tokens.index(",") + 1
    comma = tokenizer.encode(",", add_special_tokens=False)[0]
    out = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0,
                                    extra_body={"stop_token_ids": [comma]})
    assert out.choices[0].text == " 5" and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == through_comma  # the stop token is generated and counted
    chunks = list(client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0,
                                            stream=True, extra_body={"stop_token_ids": [comma]}))
    assert "".join(c.choices[0].text for c in chunks) == " 5"


def test_tiny_temperature_is_greedy_and_harms_no_one(client):
    """temperature 1e-39 used to overflow the sampler and fail its whole batch: it is greedy now."""
    model = model_id(client)
    greedy = [client.completions.create(model=model, prompt=f"Count to {i}:", max_tokens=8, temperature=0)
              .choices[0].text for i in range(4)]

    def one(i: int) -> str:
        temperature = 1e-39 if i % 2 else 0
        return client.completions.create(model=model, prompt=f"Count to {i % 4}:", max_tokens=8,
                                         temperature=temperature, seed=i).choices[0].text

    with cf.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    assert texts == greedy + greedy


@pytest.mark.parametrize("fields, param", [
    ({"temperature": 1e9}, "temperature"),
    ({"stop": ["x" * 300]}, "stop"),
    ({"stop_token_ids": [10**6]}, "stop_token_ids"),  # outside the vocabulary
    ({"seed": 2**63}, "seed"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"frequency_penalty": 0.2}, "frequency_penalty"),
])
def test_sampling_violations_are_400s_naming_the_param(client, fields, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_id(client), prompt="hi", max_tokens=2, extra_body=fields)
    assert info.value.body["param"] == param and info.value.body["type"] == "invalid_request_error"


def test_huge_token_id_prompt_is_rejected_before_the_scheduler(app):
    before = rejected_total(app)
    body = json.dumps({"prompt": [1] * 2_000_000, "max_tokens": 1}, separators=(",", ":")).encode()
    assert len(body) < 4 * 1024 * 1024  # under the body limit: the length check must catch it
    resp = httpx.post(f"{app.base_url}/completions", content=body, timeout=120,
                      headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    assert "2000000 tokens" in resp.json()["error"]["message"]
    huge_text = {"prompt": "word " * (800 * 1024), "max_tokens": 1}  # 4 MB of text
    resp = httpx.post(f"{app.base_url}/completions", json=huge_text, timeout=120)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    assert rejected_total(app) == before, "the scheduler never saw them"
