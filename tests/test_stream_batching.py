"""Stream delivery in the scheduler actor: tokens of fast iterations travel together, a
subscriber's generator wakes once per message, not once per token, and one subscriber carries
many requests' messages in one batch."""
from __future__ import annotations

import asyncio
import time
from itertools import pairwise

from actors.streams import StreamHub
from scheduler.core import TokenEvent
from scheduler.request import Request


async def produce(hub: StreamHub, reqs: list[Request], n: int, every_s: float) -> None:
    """What the dispatch loop does: each iteration appends a token to every request, then
    delivers the iteration's events."""
    for i in range(n):
        await asyncio.sleep(every_s)
        events = []
        for req in reqs:
            req.output_token_ids.append(i)
            if i == n - 1:
                req.finish_reason = "length"
            events.append(TokenEvent(req, i, req.finish_reason))
        hub.deliver(events)


async def consume(hub: StreamHub, req: Request, wakeups: list) -> list[tuple[float, dict]]:
    """One request on a subscriber of its own (as the scheduler's `generate`)."""
    sub = hub.subscribe(req.request_id)
    hub.open(req, sub)
    messages = []
    async for batch in hub.messages(sub):
        msg = batch[req.request_id]
        messages.append((time.monotonic(), msg))
        if msg["finish_reason"]:
            break
    hub.unsubscribe(sub)
    wakeups.append(len(messages))
    return messages


def run(n: int, every_s: float, interval_s: float, streams: int = 1) -> list[list[tuple[float, dict]]]:
    async def main():
        hub = StreamHub(interval_s)
        reqs = [Request(f"r{k}", 4, n, 0.0) for k in range(streams)]
        wakeups: list = []
        consumers = [asyncio.create_task(consume(hub, r, wakeups)) for r in reqs]
        await produce(hub, reqs, n, every_s)
        return await asyncio.gather(*consumers)

    return asyncio.run(main())


def test_fast_tokens_are_batched_first_and_last_go_at_once():
    start = time.monotonic()
    [messages] = run(n=40, every_s=0.005, interval_s=0.05)
    tokens = [t for _, m in messages for t in m["token_ids"]]
    assert tokens == list(range(40))  # every token, in order, none twice
    assert messages[0][1]["token_ids"] == [0]  # the first token is not held (TTFT)
    assert messages[0][0] - start < 0.04
    assert len(messages) <= 8  # ~0.2 s of tokens at 50 ms per message, not 40 messages
    assert messages[-1][1]["finish_reason"] == "length"
    assert all(m["finish_reason"] is None for _, m in messages[:-1])
    gaps = [b - a for (a, _), (b, _) in pairwise(messages[:-1])]
    assert all(g >= 0.045 for g in gaps)


def test_the_last_token_is_not_held_back():
    [messages] = run(n=12, every_s=0.01, interval_s=1.0)
    assert len(messages) == 2  # the first token, then everything else with the finish at once
    assert messages[-1][1]["token_ids"] == list(range(1, 12))


def test_slow_tokens_are_not_delayed():
    [messages] = run(n=5, every_s=0.08, interval_s=0.05)
    assert [m["token_ids"] for _, m in messages] == [[0], [1], [2], [3], [4]]


def test_interval_zero_sends_whatever_is_there():
    [messages] = run(n=10, every_s=0.002, interval_s=0.0)
    assert [t for _, m in messages for t in m["token_ids"]] == list(range(10))


def test_many_streams_wake_once_per_message():
    """200 streams, 60 fast iterations: a few messages each (not a wakeup per token)."""
    out = run(n=60, every_s=0.004, interval_s=0.05, streams=200)
    for messages in out:
        assert [t for _, m in messages for t in m["token_ids"]] == list(range(60))
        assert len(messages) <= 10


def test_one_subscriber_carries_many_streams_in_one_batch_per_interval():
    """An ingress replica's 200 requests on one subscriber: every token of every request, in
    order, in a few batches (one Serve message each), not one message per request."""
    async def main():
        hub = StreamHub(0.05)
        sub = hub.subscribe("ingress")
        reqs = [Request(f"r{k}", 4, 60, 0.0) for k in range(200)]
        for req in reqs:
            hub.open(req, sub)
        received: dict[str, list[int]] = {r.request_id: [] for r in reqs}
        batches = 0

        async def read():
            nonlocal batches
            finished = 0
            async for batch in hub.messages(sub):
                batches += 1
                for rid, msg in batch.items():
                    received[rid] += msg["token_ids"]
                    finished += msg["finish_reason"] is not None
                if finished == len(reqs):
                    return

        reader = asyncio.create_task(read())
        await produce(hub, reqs, 60, every_s=0.004)
        await asyncio.wait_for(reader, 5)
        assert hub.unsubscribe(sub) == []  # nothing left running
        return received, batches

    received, batches = asyncio.run(main())
    assert all(tokens == list(range(60)) for tokens in received.values())
    assert batches <= 10


def test_a_first_token_goes_at_once_without_flushing_the_others():
    """A new request's first token is sent at once, alone; a decoding neighbour on the same
    subscriber keeps its interval (steady arrivals must not turn batching off)."""
    hub = StreamHub(1.0, clock=lambda: 10.0, timer=False)
    sub = hub.subscribe("ingress")
    old, new = Request("old", 4, 50, 0.0), Request("new", 4, 50, 0.0)
    for req in (old, new):
        hub.open(req, sub)
    old.output_token_ids.append(1)
    hub.deliver([TokenEvent(old, 1, None)])
    assert set(hub.take(sub, 10.0)) == {"old"}  # its first token, and the interval starts
    old.output_token_ids.append(2)
    new.output_token_ids.append(7)
    hub.deliver([TokenEvent(old, 2, None), TokenEvent(new, 7, None)])
    assert sub.due(10.1, 1.0)
    assert hub.take(sub, 10.1) == {"new": {"token_ids": [7], "finish_reason": None, "logprobs": []}}
    assert not sub.due(10.2, 1.0) and sub.due(11.0, 1.0)  # "old" waits for its interval
    assert hub.take(sub, 11.0)["old"]["token_ids"] == [2]


def test_unsubscribing_names_the_unfinished_requests():
    hub = StreamHub(0.05)
    sub = hub.subscribe("ingress")
    done, running = Request("a", 4, 1, 0.0), Request("b", 4, 10, 0.0)
    for req in (done, running):
        hub.open(req, sub)
    done.output_token_ids.append(1)
    done.finish_reason = "length"
    hub.deliver([TokenEvent(done, 1, "length")])
    assert set(hub.take(sub, 0.0)) == {"a"}
    assert hub.unsubscribe(sub) == ["b"]
    assert len(hub) == 0


def test_a_failed_step_ends_the_stream_with_its_error():
    async def main():
        hub = StreamHub(0.05)
        req = Request("r", 4, 10, 0.0)
        sub = hub.subscribe("r")
        hub.open(req, sub)
        task = asyncio.create_task(_collect(hub, sub))
        await asyncio.sleep(0.01)
        req.output_token_ids.append(5)
        hub.deliver([TokenEvent(req, 5, None)])
        await asyncio.sleep(0.01)
        hub.fail("r", "model error: boom")
        return await task

    messages = asyncio.run(main())
    assert messages[0]["token_ids"] == [5]
    assert messages[-1]["finish_reason"] == "error" and "boom" in messages[-1]["error"]


async def _collect(hub: StreamHub, sub) -> list[dict]:
    out = []
    async for batch in hub.messages(sub):
        out += batch.values()
        if out[-1]["finish_reason"]:
            return out
    return out
