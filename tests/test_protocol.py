"""The ingress's own pieces without Ray: request validation, prompt preparation, the scheduler's
messages turned into text and logprobs, and the OpenAI response shapes (the real tokenizer)."""
from __future__ import annotations

import asyncio
import math

import pytest

from deploy.detokenize import TokenTexts
from deploy.outputs import OutputAssembler
from deploy.prepare import INLINE_CHARS, ModelLimits, PromptBuilder, check_ids
from deploy.protocol import MAX_STOP_CHARS, APIError, ChatRequest, CompletionRequest, parse
from deploy.responses import ChatFormat, CompletionFormat, SampledToken
from deploy.tokenizer import load_tokenizer

CHAT = [{"role": "user", "content": "Name a color."}]
LIMITS = ModelLimits(max_model_len=8192, vocab_size=49152)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("default")


def completion(**fields) -> CompletionRequest:
    return parse(CompletionRequest, {"prompt": "hi", **fields})


def rejected(model=CompletionRequest, **fields) -> APIError:
    base = {"prompt": "hi"} if model is CompletionRequest else {"messages": CHAT}
    with pytest.raises(APIError) as info:
        parse(model, {**base, **fields})
    assert info.value.status == 400 and info.value.body()["error"]["type"] == "invalid_request_error"
    return info.value


# -- sampling parameters -----------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", 2.01), ("temperature", math.nan), ("temperature", math.inf),
    ("top_p", 0), ("top_p", 1.0001), ("top_p", -1), ("top_p", math.nan),
    ("top_k", -2), ("top_k", 2**40), ("top_k", 1.5),
    ("seed", 2**63), ("seed", -(2**63) - 1), ("seed", 1.0),
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", True),
    ("presence_penalty", 2.5), ("presence_penalty", 0.5), ("frequency_penalty", -3),
    ("frequency_penalty", 1.0), ("logprobs", 21), ("logprobs", -1),
    ("stop", ["a"] * 5), ("stop", ""), ("stop", "x" * (MAX_STOP_CHARS + 1)),
    ("stop_token_ids", [-1]), ("stop_token_ids", list(range(65))),
    ("stream_options", {"include_usage": True}),  # only with stream: true
])
def test_out_of_range_sampling_fields_are_400s_naming_the_field(field, value):
    assert rejected(**{field: value}).param == field


@pytest.mark.parametrize("fields, param", [
    ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options"),
    ({"stream": True, "stream_options": {"bogus": True}}, "stream_options"),
])
def test_chat_fields(fields, param):
    assert rejected(ChatRequest, **fields).param == param


def test_tiny_temperatures_are_greedy_and_the_edges_pass():
    assert completion(temperature=1e-39).temperature == 0.0  # would overflow logits / t
    assert completion(temperature=9.9e-6).temperature == 0.0
    assert completion(temperature=1e-5).temperature == 1e-5
    req = completion(temperature=2, top_p=1e-300, top_k=-1, seed=-(2**63), max_tokens=1,
                     presence_penalty=0, frequency_penalty=0.0, logprobs=0, stop=["x" * MAX_STOP_CHARS] * 4)
    assert req.top_k == 0 and req.seed == -(2**63) and req.wants_logprobs and req.num_top_logprobs == 0
    chat = parse(ChatRequest, {"messages": CHAT, "logprobs": True, "top_logprobs": 20, "stream": True,
                               "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert chat.num_top_logprobs == 20 and chat.include_usage and chat.continuous_usage
    assert not completion(stream=True, stream_options={}).include_usage


# -- prompts -----------------------------------------------------------------------------------
def test_prompt_too_long_for_the_context_is_rejected_before_tokenizing(tokenizer):
    builder = PromptBuilder(tokenizer)
    huge = completion(prompt="word " * (800 * 1024))  # 4 MB of text
    with pytest.raises(APIError, match="4096000 characters") as info:  # its length, not its tokens
        asyncio.run(builder.completion(huge, LIMITS))
    assert info.value.body()["error"]["code"] == "context_length_exceeded"
    # Just over the context in tokens (but not in the character bound): tokenized, then rejected.
    with pytest.raises(APIError, match="9000 tokens"):
        asyncio.run(builder.completion(completion(prompt=[7] * 9000), LIMITS))
    small = ModelLimits(max_model_len=64, vocab_size=49152)
    with pytest.raises(APIError, match="context length is 64"):
        asyncio.run(builder.completion(completion(prompt="word " * 100), small))


def test_long_prompts_tokenize_in_the_pool_like_short_ones_inline(tokenizer):
    builder = PromptBuilder(tokenizer)
    text = "The quick brown fox jumps over the lazy dog. " * 200
    assert len(text) > INLINE_CHARS
    ids = asyncio.run(builder.completion(completion(prompt=text), LIMITS))
    assert ids == tokenizer(text)["input_ids"]
    chat = asyncio.run(builder.chat(parse(ChatRequest, {"messages": [{"role": "user", "content": text}]}), LIMITS))
    assert chat[-3:] == tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-3:]


def test_token_id_prompts_are_checked_length_first():
    with pytest.raises(APIError, match="2000000 tokens"):  # not "out of range": the length decides
        check_ids([10**9] * 2_000_000, LIMITS)
    with pytest.raises(APIError, match=r"out of range \[0, 49152\): \[49152, -1\]"):
        check_ids([1, 49152, -1], LIMITS)
    assert check_ids([0, 49151], LIMITS) == [0, 49151]


# -- scheduler messages -> deltas -------------------------------------------------------------
def feed_all(tokenizer, messages: list[dict], stop=(), logprobs=False):
    out = OutputAssembler(tokenizer, list(stop), logprobs)
    deltas = []
    for msg in messages:
        deltas.append(out.feed(msg))
        if deltas[-1].finish_reason:
            break
    return "".join(d.text for d in deltas), deltas


def msg(ids, finish=None, logprobs=None, top=None) -> dict:
    return {"token_ids": ids, "finish_reason": finish, "logprobs": logprobs or [None] * len(ids),
            **({"top_logprobs": top} if top is not None else {})}


def test_stop_token_text_never_appears_but_counts(tokenizer):
    ids = tokenizer.encode("Red, green and blue.\nNext", add_special_tokens=False)
    newline = tokenizer.encode("\n", add_special_tokens=False)[0]
    cut = ids.index(newline) + 1  # the scheduler stops on the stop token id "\n"
    text, deltas = feed_all(tokenizer, [msg(ids[:3]), msg(ids[3:cut], "stop")])
    assert text == "Red, green and blue." and deltas[-1].finish_reason == "stop"
    assert deltas[-1].completion_tokens == cut


def test_stop_string_counts_tokens_up_to_the_one_that_completes_it(tokenizer):
    ids = tokenizer.encode("one two three four five six", add_special_tokens=False)
    text, deltas = feed_all(tokenizer, [msg(ids, None, [-0.5] * len(ids))], stop=[" thr"], logprobs=True)
    assert text == "one two" and deltas[-1].finish_reason == "stop"
    through = len(tokenizer.encode("one two three", add_special_tokens=False))
    assert deltas[-1].completion_tokens == through == len(deltas[-1].tokens)


def test_logprobs_keep_their_tokens_and_alternatives(tokenizer):
    ids = tokenizer.encode("Blue sky", add_special_tokens=False)
    top = [[(ids[0], -0.1), (5, -2.5)], None]
    _, deltas = feed_all(tokenizer, [msg(ids, "length", [-0.1, -0.7], top)], logprobs=True)
    assert deltas[0].tokens == [SampledToken(ids[0], -0.1, ((ids[0], -0.1), (5, -2.5))),
                                SampledToken(ids[1], -0.7, ())]
    _, plain = feed_all(tokenizer, [msg(ids, "length")])
    assert plain[0].tokens == [] and plain[0].completion_tokens == 2


# -- response shapes -------------------------------------------------------------------------
def test_completion_logprobs_shape_and_offsets_run_across_chunks(tokenizer):
    texts = TokenTexts(tokenizer)
    a, b = tokenizer.encode(" Blue sky", add_special_tokens=False)
    fmt = CompletionFormat("cmpl-1", "m", texts, logprobs=True)
    first = fmt.chunk(" Blue", None, [SampledToken(a, -0.25, ((a, -0.25), (b, -3.0)))], True, None, False)
    second = fmt.chunk(" sky", "length", [SampledToken(b, -math.inf)], False, None, False)
    lp1, lp2 = first["choices"][0]["logprobs"], second["choices"][0]["logprobs"]
    assert lp1 == {"tokens": [" Blue"], "token_logprobs": [-0.25],
                   "top_logprobs": [{" Blue": -0.25, " sky": -3.0}], "text_offset": [0]}
    assert lp2 == {"tokens": [" sky"], "token_logprobs": [-9999.0], "top_logprobs": [{" sky": -9999.0}],
                   "text_offset": [5]}
    assert "usage" not in first


def test_chat_logprobs_shape_with_bytes(tokenizer):
    texts = TokenTexts(tokenizer)
    (tid,) = tokenizer.encode("数据", add_special_tokens=False)[:1]
    fmt = ChatFormat("chatcmpl-1", "m", texts, logprobs=True)
    whole = fmt.response("x", "stop", [SampledToken(tid, -1.5, ((tid, -1.5),))], {"prompt_tokens": 1})
    (entry,) = whole["choices"][0]["logprobs"]["content"]
    assert bytes(entry["bytes"]).decode("utf-8", errors="replace") == entry["token"]
    assert entry["logprob"] == -1.5 and entry["top_logprobs"] == [
        {"token": entry["token"], "logprob": -1.5, "bytes": entry["bytes"]}]
    assert whole["object"] == "chat.completion" and whole["usage"] == {"prompt_tokens": 1}
    end = fmt.usage_chunk({"prompt_tokens": 1})
    assert end["choices"] == [] and end["object"] == "chat.completion.chunk"
