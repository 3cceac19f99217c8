"""Requests' token messages from the scheduler, as the ingress follows them.

    subscription = Subscription(scheduler_handle)    # one per ingress replica
    stream = SchedulerStream(subscription, body)
    first = await stream.open()          # admission: {"request_id", "prompt_tokens"} or {"error"}
    async for msg in stream.messages():  # {"token_ids", "finish_reason", ...} up to the last one
        ...
    await stream.finish(num_tokens)      # a stop string found here: a finish, not a cancellation
    stream.close()                       # frees the request's KV at once if it is still running

All of an ingress replica's requests share one stream from the scheduler (`Subscription`): the
scheduler sends one batch {request_id: message} per stream interval, not one Serve message per
request, and the subscription hands each message to its request's queue.

Streams survive a scheduler restart: when the scheduler replica dies mid-stream (Serve restarts
it, and its model actors end with it), the request is submitted again to the new replica with the
tokens already streamed appended to its prompt, the remaining max_tokens and the same sampling
parameters and seed. The model continues from exactly that context (greedy output is the same;
seeded sampling draws per position, so it is the same too), and the client sees one uninterrupted
stream. Only if no scheduler answers within `resume_timeout_s` does the stream end with 503.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

logger = logging.getLogger("fluidserve.ingress")
RESUME_TIMEOUT_S = 600.0  # a new scheduler replica starts its model actors (loading weights)
RESUME_BACKOFF_S = 0.5
# Submits that may each find the scheduler restarted since the feed opened (a restart loop, or a
# redeploy racing a restart): each one opens a fresh feed.
RESUBSCRIBE_ATTEMPTS = 3


class SchedulerLost(Exception):
    """The scheduler died and no new one took the request back in time."""


class SubscriptionEnded(Exception):
    """The scheduler's stream of this ingress's messages ended (the scheduler replica died)."""


class _Feed:
    """One subscription to the scheduler: its id, its reader task, the requests it feeds."""

    def __init__(self, subscriber_id: str) -> None:
        self.id = subscriber_id
        self.queues: dict[str, asyncio.Queue] = {}
        self.reader: asyncio.Task | None = None
        self.opened: asyncio.Future = asyncio.get_running_loop().create_future()  # acknowledged
        self.opened.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved


class Subscription:
    """The ingress replica's one stream of messages from the scheduler, demultiplexed into one
    queue per request. Opened on first use; a new one replaces it when it ends."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self._feed: _Feed | None = None
        self._lock = asyncio.Lock()

    async def submit(self, body: dict) -> tuple[dict, _Feed, asyncio.Queue]:
        """Admit `body` (which names its request_id): the scheduler's first message, the feed and
        the queue its messages will arrive on. Raises when the scheduler cannot be reached."""
        for _ in range(RESUBSCRIBE_ATTEMPTS):
            first, feed, queue = await self._submit_once(body)
            if first.get("error", {}).get("code") != "resubscribe":
                break
            # The scheduler restarted and no longer knows this feed: its other requests resume
            # on a new one, as this one does.
            self._end(feed, SubscriptionEnded("the scheduler restarted"))
        return first, feed, queue

    async def _submit_once(self, body: dict) -> tuple[dict, _Feed, asyncio.Queue]:
        rid = body["request_id"]
        feed = await self._open()
        queue = feed.queues[rid] = asyncio.Queue()  # registered first: tokens may come early
        try:
            first = await self.scheduler.submit.remote(body, feed.id)
        except BaseException:
            feed.queues.pop(rid, None)
            self.cancel(rid)  # the caller went away mid-call: the request may have been admitted
            raise
        if "error" in first:
            feed.queues.pop(rid, None)
        return first, feed, queue

    async def _open(self) -> _Feed:
        async with self._lock:
            feed = self._feed
            if feed is not None and not feed.reader.done():
                return feed
            feed = self._feed = _Feed(uuid.uuid4().hex)
            # A fresh context: Ray Serve cancels calls made in a request's context when that
            # request ends, and the subscription outlives every request.
            feed.reader = asyncio.get_running_loop().create_task(self._read(feed),
                                                                 context=contextvars.Context())
            await asyncio.shield(feed.opened)  # a caller that goes away must not fail the feed
            return feed

    async def _read(self, feed: _Feed) -> None:
        stream = None
        try:
            stream = self.scheduler.options(stream=True).subscribe.remote(feed.id)
            await stream.__anext__()  # the acknowledgement: submit may name this feed now
            if not feed.opened.done():  # else already retired (close())
                feed.opened.set_result(None)
            async for batch in stream:
                queues = feed.queues
                for rid, message in batch.items():
                    queue = queues.get(rid)
                    if queue is not None:
                        queue.put_nowait(message)
            error: BaseException = SubscriptionEnded("the scheduler ended its stream")
        except Exception as exc:  # noqa: BLE001 - the scheduler replica died (or never answered)
            error = exc
        finally:
            if stream is not None:
                stream.cancel()  # the scheduler cancels what is left of this feed's requests
        self._end(feed, error)

    def close(self) -> None:
        """The ingress replica shuts down: end the feed (the scheduler cancels its requests)."""
        if self._feed is not None:
            self._end(self._feed, SubscriptionEnded("the ingress replica is shutting down"))

    def _end(self, feed: _Feed, error: BaseException) -> None:
        """Retire `feed` (its reader ended, the scheduler no longer knows it, or the ingress
        closes): every request on it hears `error`, and resumes on a new feed."""
        if self._feed is feed:
            self._feed = None
        if not feed.opened.done():
            feed.opened.set_exception(error)
        if feed.reader is not None and feed.reader is not asyncio.current_task():
            feed.reader.cancel()  # no-op when it has ended
        queues, feed.queues = feed.queues, {}
        for queue in queues.values():
            queue.put_nowait(error)

    def cancel(self, request_id: str) -> None:
        """Cancel at the scheduler, fire-and-forget, outside the ending request's context."""
        contextvars.Context().run(self.scheduler.cancel.remote, request_id)


class SchedulerStream:
    def __init__(self, subscription: Subscription, body: dict,
                 resume_timeout_s: float = RESUME_TIMEOUT_S) -> None:
        self.subscription, self.body = subscription, body
        self.resume_timeout_s = resume_timeout_s
        self.generated: list[int] = []  # every token received so far
        self.request_id: str | None = None
        self.resumed_after = 0  # output tokens before the last resume (part of its prompt)
        self.finished = False
        self._queue: asyncio.Queue | None = None  # this submission's messages (a new one per resume)
        self._feed: _Feed | None = None
        self._closed = False
        self._loop = asyncio.get_running_loop()

    def __del__(self) -> None:
        # A response generator dropped before its first step (the client left while the
        # response was being set up) never runs its `finally`: without this its request would
        # run on to max_tokens. GC may run on any thread, so close() goes to the loop.
        if not self._closed and self.request_id is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.close)

    async def open(self) -> dict:
        """Submit; returns the scheduler's first message (raises if it cannot be reached)."""
        return await self._submit(self.body)

    async def _submit(self, body: dict) -> dict:
        rid = uuid.uuid4().hex
        first, self._feed, self._queue = await self.subscription.submit({**body, "request_id": rid})
        if "error" not in first:
            self.request_id = rid
        return first

    async def messages(self) -> AsyncIterator[dict]:
        while True:
            msg = await self._queue.get()
            if isinstance(msg, BaseException):  # the scheduler replica died mid-stream
                done = await self._resume(msg)
                if done is not None:
                    self.finished = True
                    yield done
                    return
                continue
            self.generated += msg["token_ids"]
            if msg.get("finish_reason"):
                self.finished = True
            yield msg
            if self.finished:
                return

    async def finish(self, num_tokens: int) -> None:
        """A stop string ends the request after `num_tokens` output tokens (counted across
        resumes; the scheduler's request holds those after the last resume)."""
        if self.request_id is None:
            return
        try:
            self.finished = bool(await self.subscription.scheduler.finish.remote(
                self.request_id, num_tokens - self.resumed_after))
        except Exception as exc:  # noqa: BLE001 - the stream still ends; close() cancels instead
            logger.warning("could not report the stop-string finish of %s: %r", self.request_id, exc)

    def close(self) -> None:
        self._closed = True
        if self._feed is not None and self.request_id is not None:
            self._feed.queues.pop(self.request_id, None)
            if not self.finished:
                self.subscription.cancel(self.request_id)  # frees its KV at once

    async def _resume(self, exc: BaseException) -> dict | None:
        """Submit the rest of the request to the scheduler that replaces the lost one. Returns a
        final message when nothing is left to generate (the lost one was the finish)."""
        logger.warning("scheduler lost mid-stream (%s: %s); resuming after %d tokens",
                       type(exc).__name__, exc, len(self.generated))
        max_tokens = self.body.get("max_tokens")
        remaining = None if max_tokens is None else max_tokens - len(self.generated)
        if remaining is not None and remaining <= 0:
            return {"token_ids": [], "finish_reason": "length", "logprobs": []}
        body = {**self.body, "prompt_token_ids": list(self.body["prompt_token_ids"]) + self.generated,
                "max_tokens": remaining}
        if self.request_id is not None:
            self.subscription.cancel(self.request_id)  # if the scheduler lives on, it stops there
        self.request_id = None
        self.resumed_after = len(self.generated)
        deadline = time.monotonic() + self.resume_timeout_s
        while time.monotonic() < deadline:
            try:
                first = await self._submit(body)
            except Exception as again:  # noqa: BLE001 - not back yet
                logger.info("scheduler not back yet: %s", type(again).__name__)
                await asyncio.sleep(RESUME_BACKOFF_S)
                continue
            if "error" in first and first["error"]["status"] == 503:
                await asyncio.sleep(RESUME_BACKOFF_S)  # starting, or a model actor is down
                continue
            if "error" in first:
                raise SchedulerLost(first["error"]["message"])
            return None
        raise SchedulerLost(f"the scheduler restarted and did not take the request back within "
                            f"{self.resume_timeout_s:.0f} s")
