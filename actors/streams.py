"""Stream delivery: a request's tokens from the commits of the dispatch loops to its generator.

A commit appends tokens to `Request.output_token_ids`; delivery only decides when a stream's
generator (the `generate` call of that request, one coroutine) wakes up to send what it has not
sent yet. The first token and the last go at once (TTFT, end of stream); in between a stream
sends at most every `interval_s` (Ray Serve LLM batches streams the same way), several tokens per
message when iterations are faster. So per request per iteration delivery is a dict lookup and a
comparison: a generator wakes once per message, not once per token, and one timer task (the
flusher) wakes the streams whose interval has passed.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterable

from scheduler.core import TokenEvent
from scheduler.request import Request


class Stream:
    """One request's stream: what its generator has sent, and the future it waits on."""

    __slots__ = ("done", "error", "error_info", "last_sent", "logprobs", "queued", "request", "sent", "tops",
                 "waiter")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.sent = 0  # output tokens already sent
        self.last_sent: float | None = None  # None: nothing sent yet (the first token goes at once)
        self.waiter: asyncio.Future | None = None
        self.error: str | None = None
        self.error_info: dict = {}  # with an error: its HTTP status, code, Retry-After seconds
        self.queued = False  # waiting in the flusher's heap
        self.logprobs: list[float | None] | None = [] if request.sampling.logprobs else None
        # Per token, the top-N alternatives (OpenAI's top_logprobs), when asked for.
        self.tops: list | None = [] if request.sampling.logprobs and request.sampling.top_logprobs > 0 else None
        self.done = False

    def final(self) -> bool:
        return self.error is not None or self.request.finish_reason is not None

    def ready(self, now: float, interval_s: float) -> bool:
        """Is there something to send now?"""
        if self.final():
            return True
        if len(self.request.output_token_ids) <= self.sent:
            return False
        return self.last_sent is None or now - self.last_sent >= interval_s

    def take(self, now: float) -> dict:
        """Everything not sent yet, as one message."""
        tokens = self.request.output_token_ids
        out = tokens[self.sent :]
        logprobs = self.logprobs[self.sent : self.sent + len(out)] if self.logprobs is not None else []
        message = {"token_ids": out, "finish_reason": None, "logprobs": logprobs}
        if self.tops is not None:
            message["top_logprobs"] = self.tops[self.sent : self.sent + len(out)]
        self.sent += len(out)
        self.last_sent = now
        reason = self.request.finish_reason
        if self.error is None and reason == "error":
            self.error = "model error: this request's step failed on the model actor"
        if self.error is not None:
            self.done = True
            message.update(finish_reason="error", error=self.error, **self.error_info)
            return message
        self.done = reason is not None and self.sent >= len(tokens)
        message["finish_reason"] = reason if self.done else None
        return message

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class StreamHub:
    """`clock` and `timer` are seams for benchmarks: with timer=False no flusher task runs and
    the caller calls `flush_due` itself."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic,
                 timer: bool = True) -> None:
        self.interval_s = interval_s
        self.clock, self.timer = clock, timer
        self.streams: dict[str, Stream] = {}
        self._due: list[tuple[float, int, Stream]] = []  # (when, tie-breaker, stream)
        self._order = itertools.count()
        self._flusher: asyncio.Task | None = None
        self._flusher_wake: asyncio.Future | None = None

    def __len__(self) -> int:
        return len(self.streams)

    def open(self, request: Request) -> Stream:
        stream = self.streams[request.request_id] = Stream(request)
        return stream

    def close(self, request_id: str) -> None:
        self.streams.pop(request_id, None)

    # -- from the dispatch loops ---------------------------------------------------------------
    def deliver(self, events: Iterable[TokenEvent]) -> None:
        """After a commit: wake the streams that may send now, queue the others."""
        now = self.clock()
        streams, interval = self.streams, self.interval_s
        for ev in events:
            stream = streams.get(ev.request.request_id)
            if stream is None:
                continue
            if stream.logprobs is not None and ev.token_id >= 0:
                stream.logprobs.append(ev.logprob)
                if stream.tops is not None:
                    stream.tops.append(ev.top_logprobs)
            if stream.waiter is None:
                continue  # busy sending: it looks again when it is done
            last = stream.last_sent
            if ev.finish_reason or last is None or now - last >= interval:
                stream.wake()
            elif not stream.queued:
                self._queue(stream, last + interval)

    def wake(self, request_id: str) -> None:
        stream = self.streams.get(request_id)
        if stream is not None:
            stream.wake()

    def fail(self, request_id: str, message: str, **info) -> None:
        """End the stream with an error; `info`: status (HTTP, default 500), code, retry_after_s."""
        stream = self.streams.get(request_id)
        if stream is not None:
            stream.error, stream.error_info = message, info
            stream.wake()

    def _queue(self, stream: Stream, when: float) -> None:
        stream.queued = True
        first = not self._due or when < self._due[0][0]
        heapq.heappush(self._due, (when, next(self._order), stream))
        if not self.timer:
            return
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        elif first and self._flusher_wake is not None and not self._flusher_wake.done():
            self._flusher_wake.set_result(None)  # an earlier deadline: re-arm the timer

    def flush_due(self, now: float) -> None:
        """Wake every queued stream whose interval has passed."""
        due = self._due
        while due and due[0][0] <= now:
            _, _, stream = heapq.heappop(due)
            stream.queued = False
            stream.wake()

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._due:
            now = self.clock()
            self.flush_due(now)
            if not self._due:
                return
            self._flusher_wake = loop.create_future()
            try:
                await asyncio.wait_for(self._flusher_wake, self._due[0][0] - now)
            except asyncio.TimeoutError:
                pass

    # -- from a request's generator ------------------------------------------------------------
    async def messages(self, stream: Stream) -> AsyncIterator[dict]:
        """The stream's messages until its last one (finish or error)."""
        loop = asyncio.get_running_loop()
        while not stream.done:
            now = self.clock()
            if not stream.ready(now, self.interval_s):
                stream.waiter = loop.create_future()
                try:
                    if stream.sent < len(stream.request.output_token_ids) and not stream.queued:
                        self._queue(stream, stream.last_sent + self.interval_s)
                    await stream.waiter
                finally:
                    stream.waiter = None
                continue
            yield stream.take(now)
