"""Stream batching in the scheduler actor: tokens of fast iterations travel together."""
from __future__ import annotations

import asyncio
import time
from itertools import pairwise

from actors.scheduler_actor import next_message
from scheduler.core import TokenEvent
from scheduler.request import Request


async def produce(queue: asyncio.Queue, n: int, every_s: float) -> None:
    req = Request("r", 4, n, 0.0)
    for i in range(n):
        await asyncio.sleep(every_s)
        queue.put_nowait(TokenEvent(req, i, "length" if i == n - 1 else None))


async def consume(n: int, every_s: float, interval_s: float) -> list[tuple[float, dict]]:
    queue: asyncio.Queue = asyncio.Queue()
    producer = asyncio.create_task(produce(queue, n, every_s))
    messages, last = [], None
    while not messages or messages[-1][1]["finish_reason"] is None:
        msg = await next_message(queue, last, interval_s)
        last = time.monotonic()
        messages.append((last, msg))
    await producer
    return messages


def test_fast_tokens_are_batched_first_and_last_go_at_once():
    start = time.monotonic()
    messages = asyncio.run(consume(n=40, every_s=0.005, interval_s=0.05))
    tokens = [t for _, m in messages for t in m["token_ids"]]
    assert tokens == list(range(40))  # every token, in order, none twice
    assert messages[0][1]["token_ids"] == [0]  # the first token is not held (TTFT)
    assert messages[0][0] - start < 0.04
    assert len(messages) <= 8  # ~0.2 s of tokens at 50 ms per message, not 40 messages
    assert messages[-1][1]["finish_reason"] == "length"
    gaps = [b - a for (a, _), (b, _) in pairwise(messages[:-1])]
    assert all(g >= 0.045 for g in gaps)


def test_slow_tokens_are_not_delayed():
    messages = asyncio.run(consume(n=5, every_s=0.08, interval_s=0.05))
    assert [m["token_ids"] for _, m in messages] == [[0], [1], [2], [3], [4]]


def test_interval_zero_sends_whatever_is_queued():
    messages = asyncio.run(consume(n=10, every_s=0.002, interval_s=0.0))
    assert [t for _, m in messages for t in m["token_ids"]] == list(range(10))
