"""Streaming detokenization: the deltas add up to the full decode, stop strings never leak."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deploy.detokenize import TextStream
from deploy.tokenizer import load_tokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: café, naïve, 東京タワー, emoji 🚀🔥 and a ☃ snowman.",
    "def f(x):\n    return x ** 2  # squares\n\n\ttabs\tand   spaces",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("default")


def stream(tokenizer, ids: list[int], sizes: list[int], stop: list[str]) -> tuple[str, TextStream]:
    text, out, i = TextStream(tokenizer, stop), [], 0
    for n in sizes:
        if i >= len(ids) or text.stopped:
            break
        out.append(text.add(ids[i:i + n]))
        i += n
    if i < len(ids) and not text.stopped:
        out.append(text.add(ids[i:]))
    out.append(text.flush())
    return "".join(out), text


@settings(max_examples=40, deadline=None)
@given(which=st.sampled_from(range(len(TEXTS))), sizes=st.lists(st.integers(1, 4), max_size=60))
def test_deltas_add_up_to_the_full_decode(tokenizer, which, sizes):
    ids = tokenizer.encode(TEXTS[which], add_special_tokens=False)
    joined, _ = stream(tokenizer, ids, sizes, [])
    assert joined == tokenizer.decode(ids, skip_special_tokens=True)


def test_byte_tokens_of_one_character_are_held_back_until_complete(tokenizer):
    ids = tokenizer.encode("🚀🔥☃", add_special_tokens=False)
    text = TextStream(tokenizer, [])
    deltas = [text.add([i]) for i in ids] + [text.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "🚀🔥☃"


@pytest.mark.parametrize("stop", [["fox"], [" over the"], ["lazy", "quick"], ["!"]])
def test_stop_string_cuts_the_text_and_never_leaks(tokenizer, stop):
    ids = tokenizer.encode(TEXTS[0], add_special_tokens=False)
    joined, text = stream(tokenizer, ids, [1] * len(ids), stop)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    cut = min(full.find(s) for s in stop if s in full)
    assert text.stopped
    assert joined == full[:cut]


def test_long_stream_decodes_only_a_window_per_step(tokenizer):
    calls: list[int] = []

    class Counting:
        def decode(self, ids, **kw):
            calls.append(len(ids))
            return tokenizer.decode(ids, **kw)

    ids = tokenizer.encode(" word" * 2000, add_special_tokens=False)
    text = TextStream(Counting(), [])
    joined = "".join(text.add([i]) for i in ids) + text.flush()
    assert joined == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(calls) <= 16
