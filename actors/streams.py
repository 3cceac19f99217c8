"""Stream delivery: requests' tokens from the dispatch loops' commits to their subscribers.

A subscriber is one multiplexed stream out of the scheduler replica: an ingress replica follows
all of its requests through one `subscribe` stream, and `generate` (one request, one stream) is
a subscriber with a single request. A commit appends tokens to `Request.output_token_ids`;
delivery only marks the request's stream dirty in its subscriber. A subscriber sends one message,
{request_id: message} for every dirty stream, at most every `interval_s` (Ray Serve LLM batches
streams the same way); a stream's first token, finish or error goes at once (TTFT, end of
stream), in a message of the streams that have one, without flushing the others. So per request per iteration delivery is a dict lookup and a dict
store; a subscriber's generator wakes once per message whatever the number of its requests, and
Serve carries one message per interval per ingress replica instead of one per request.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable

from scheduler.core import TokenEvent
from scheduler.request import Request


class Stream:
    """One request's stream: how much of it was sent, and how it ended."""

    __slots__ = ("done", "error", "error_info", "logprobs", "request", "sent", "subscriber", "tops")

    def __init__(self, request: Request, subscriber: Subscriber) -> None:
        self.request, self.subscriber = request, subscriber
        self.sent = 0  # output tokens already sent
        self.error: str | None = None
        self.error_info: dict = {}  # with an error: its HTTP status, code, Retry-After seconds
        self.logprobs: list[float | None] | None = [] if request.sampling.logprobs else None
        # Per token, the top-N alternatives (OpenAI's top_logprobs), when asked for.
        self.tops: list | None = [] if request.sampling.logprobs and request.sampling.top_logprobs > 0 else None
        self.done = False

    def take(self) -> dict | None:
        """Everything not sent yet, as one message; None when there is nothing to say."""
        tokens = self.request.output_token_ids
        reason = self.request.finish_reason
        if self.error is None and reason == "error":
            self.error = "model error: this request's step failed on the model actor"
        out = tokens[self.sent :]
        if not out and self.error is None and reason is None:
            return None
        logprobs = self.logprobs[self.sent : self.sent + len(out)] if self.logprobs is not None else []
        message = {"token_ids": out, "finish_reason": None, "logprobs": logprobs}
        if self.tops is not None:
            message["top_logprobs"] = self.tops[self.sent : self.sent + len(out)]
        self.sent += len(out)
        if self.error is not None:
            self.done = True
            message.update(finish_reason="error", error=self.error, **self.error_info)
            return message
        self.done = reason is not None
        message["finish_reason"] = reason
        return message


class Subscriber:
    """One multiplexed stream: its requests' streams, the dirty ones, and the waiting generator."""

    def __init__(self, subscriber_id: str) -> None:
        self.id = subscriber_id
        self.streams: dict[str, Stream] = {}
        self.dirty: dict[str, Stream] = {}  # something to send (insertion-ordered set)
        self.urgent: dict[str, Stream] = {}  # a first token, a finish or an error: send now
        self.last_sent = float("-inf")
        self.waiter: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False

    def interval_over(self, now: float, interval_s: float) -> bool:
        return bool(self.dirty) and now - self.last_sent >= interval_s

    def due(self, now: float, interval_s: float) -> bool:
        return bool(self.urgent) or self.interval_over(now, interval_s)

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def arm(self, delay_s: float) -> None:
        """Wake the generator in `delay_s` (its interval ends), unless a timer is already set."""
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(delay_s, self._ring)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _ring(self) -> None:
        self.timer = None
        self.wake()


class StreamHub:
    """`clock` and `timer` are seams for benchmarks: with timer=False no interval timer is set and
    the caller calls `flush_due` itself."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic,
                 timer: bool = True) -> None:
        self.interval_s = interval_s
        self.clock, self.timer = clock, timer
        self.streams: dict[str, Stream] = {}
        self.subscribers: dict[str, Subscriber] = {}

    def __len__(self) -> int:
        return len(self.streams)

    def subscribe(self, subscriber_id: str) -> Subscriber:
        sub = self.subscribers[subscriber_id] = Subscriber(subscriber_id)
        return sub

    def unsubscribe(self, sub: Subscriber) -> list[str]:
        """Close `sub`; returns the ids of its unfinished requests (the caller cancels them)."""
        sub.closed = True
        sub.disarm()
        sub.wake()  # a generator still waiting ends
        self.subscribers.pop(sub.id, None)
        for rid in sub.streams:
            self.streams.pop(rid, None)
        return [rid for rid, s in sub.streams.items() if not s.done]

    def open(self, request: Request, sub: Subscriber) -> Stream:
        stream = self.streams[request.request_id] = sub.streams[request.request_id] = Stream(request, sub)
        return stream

    def close(self, request_id: str) -> None:
        stream = self.streams.pop(request_id, None)
        if stream is not None:
            sub = stream.subscriber
            for place in (sub.streams, sub.dirty, sub.urgent):
                place.pop(request_id, None)

    # -- from the dispatch loops ---------------------------------------------------------------
    def deliver(self, events: Iterable[TokenEvent]) -> None:
        """After a commit: mark the streams dirty, wake the subscribers that may send now."""
        streams = self.streams
        touched: set[Subscriber] = set()
        for ev in events:
            stream = streams.get(ev.request.request_id)
            if stream is None:
                continue
            if stream.logprobs is not None and ev.token_id >= 0:
                stream.logprobs.append(ev.logprob)
                if stream.tops is not None:
                    stream.tops.append(ev.top_logprobs)
            sub = stream.subscriber
            sub.dirty[ev.request.request_id] = stream
            if ev.finish_reason or stream.sent == 0:
                sub.urgent[ev.request.request_id] = stream
            touched.add(sub)
        now = self.clock()
        for sub in touched:
            self._poke(sub, now)

    def wake(self, request_id: str) -> None:
        """Something final happened to this request off the dispatch loops (a finish)."""
        stream = self.streams.get(request_id)
        if stream is not None:
            self._mark_urgent(stream)

    def fail(self, request_id: str, message: str, **info) -> None:
        """End the stream with an error; `info`: status (HTTP, default 500), code, retry_after_s."""
        stream = self.streams.get(request_id)
        if stream is not None:
            stream.error, stream.error_info = message, info
            self._mark_urgent(stream)

    def _mark_urgent(self, stream: Stream) -> None:
        sub = stream.subscriber
        sub.dirty[stream.request.request_id] = sub.urgent[stream.request.request_id] = stream
        sub.wake()

    def _poke(self, sub: Subscriber, now: float) -> None:
        if sub.waiter is None:
            return  # busy sending: it looks again when it is done
        if sub.due(now, self.interval_s):
            sub.wake()
        elif self.timer:
            sub.arm(sub.last_sent + self.interval_s - now)

    def flush_due(self, now: float) -> None:
        """Wake every subscriber whose interval has passed (for timer=False)."""
        for sub in self.subscribers.values():
            if sub.due(now, self.interval_s):
                sub.wake()

    # -- from a subscriber's generator -----------------------------------------------------------
    def take(self, sub: Subscriber, now: float) -> dict[str, dict]:
        """The messages of `sub`'s dirty streams once its interval is over, else of its urgent
        ones only (the others keep their interval); finished streams are closed."""
        if sub.interval_over(now, self.interval_s):
            streams, sub.dirty, sub.last_sent = sub.dirty, {}, now
        else:
            streams = sub.urgent
            for rid in streams:
                sub.dirty.pop(rid, None)
        sub.urgent = {}
        batch = {}
        for rid, stream in streams.items():
            message = stream.take()
            if message is None:
                continue
            batch[rid] = message
            if stream.done:
                self.close(rid)  # `streams` is detached from sub.dirty / sub.urgent by now
        return batch

    async def messages(self, sub: Subscriber) -> AsyncIterator[dict[str, dict]]:
        """The subscriber's batches, {request_id: message}, until it is unsubscribed."""
        loop = asyncio.get_running_loop()
        while not sub.closed:
            now = self.clock()
            if sub.due(now, self.interval_s):
                batch = self.take(sub, now)
                if batch:
                    yield batch
                continue
            sub.waiter = loop.create_future()
            if sub.dirty and self.timer:
                sub.arm(sub.last_sent + self.interval_s - now)
            try:
                await sub.waiter
            finally:
                sub.waiter = None
                sub.disarm()
