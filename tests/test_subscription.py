"""The ingress's one subscription to the scheduler (deploy.scheduler_stream), driven against the
real scheduler replica of the test app: requests ride one feed, and a request whose reader goes
away, however early, stops at the scheduler at once instead of running on to max_tokens."""
from __future__ import annotations

import asyncio
import gc
import time

import pytest

from deploy.scheduler_stream import SchedulerStream, Subscription

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

# Long enough that finishing would take a minute on CPU: only a cancellation ends it in time.
LONG = {"prompt_token_ids": [1, 2, 3, 4, 5, 6, 7, 8], "max_tokens": 1000, "temperature": 0.0,
        "top_p": 1.0, "top_k": -1, "seed": None, "stop_token_ids": [], "ignore_eos": True,
        "logprobs": False, "top_logprobs": 0}


async def running(scheduler) -> int:
    state = await scheduler.debug_state.remote()
    return state["requests"] + sum(state["used_blocks"])


async def until_idle(scheduler, timeout_s: float) -> float:
    """Seconds until the scheduler holds no request and no KV (raises past `timeout_s`)."""
    start = time.monotonic()
    while await running(scheduler):
        assert time.monotonic() - start < timeout_s, "the request is still running at the scheduler"
        await asyncio.sleep(0.1)
    return time.monotonic() - start


def test_streams_share_one_feed_and_finish(app):
    app.wait_idle()
    scheduler = app.scheduler()

    async def main():
        subscription = Subscription(scheduler)
        streams = [SchedulerStream(subscription, {**LONG, "max_tokens": 6}) for _ in range(4)]
        firsts = await asyncio.gather(*(s.open() for s in streams))
        assert all("error" not in f for f in firsts), firsts
        assert len({s._feed.id for s in streams}) == 1  # one feed for every request
        counts = []
        for s in streams:
            counts.append(sum([len(m["token_ids"]) async for m in s.messages()]))
            s.close()
        subscription.close()
        return counts

    assert asyncio.run(main()) == [6, 6, 6, 6]


def test_a_stream_dropped_before_its_first_read_stops_at_once(app):
    """The client left while its response was being set up: the response generator never ran,
    so no `finally` closes the stream; dropping it must still cancel the request."""
    app.wait_idle()
    scheduler = app.scheduler()

    async def main():
        subscription = Subscription(scheduler)
        stream = SchedulerStream(subscription, LONG)
        assert "error" not in await stream.open()
        assert await running(scheduler)
        del stream
        gc.collect()
        waited = await until_idle(scheduler, timeout_s=10)
        subscription.close()  # only now: closing the feed would cancel the request too
        return waited

    assert asyncio.run(main()) < 10


def test_closing_the_subscription_cancels_its_requests(app):
    """The ingress replica shuts down (Ingress.__del__): the scheduler stops its requests."""
    app.wait_idle()
    scheduler = app.scheduler()

    async def main():
        subscription = Subscription(scheduler)
        streams = [SchedulerStream(subscription, LONG) for _ in range(2)]
        for s in streams:
            assert "error" not in await s.open()
        subscription.close()
        return await until_idle(scheduler, timeout_s=10)

    assert asyncio.run(main()) < 10
