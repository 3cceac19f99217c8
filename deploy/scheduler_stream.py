"""One request's token messages from the scheduler, as the ingress follows them.

    stream = SchedulerStream(scheduler_handle, body)
    first = await stream.open()          # admission: {"request_id", "prompt_tokens"} or {"error"}
    async for msg in stream.messages():  # {"token_ids", "finish_reason", ...} up to the last one
        ...
    await stream.finish(num_tokens)      # a stop string found here: a finish, not a cancellation
    stream.close()                       # frees the request's KV at once if it is still running

Streams survive a scheduler restart: when the scheduler replica dies mid-stream (Serve restarts
it, and its model actors end with it), the request is submitted again to the new replica with the
tokens already streamed appended to its prompt, the remaining max_tokens and the same sampling
parameters and seed. The model continues from exactly that context (greedy output is the same;
seeded sampling draws per position, so it is the same too), and the client sees one uninterrupted
stream. Only if no scheduler answers within `resume_timeout_s` does the stream end with 503.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

logger = logging.getLogger("fluidserve.ingress")
RESUME_TIMEOUT_S = 600.0  # a new scheduler replica starts its model actors (loading weights)
RESUME_BACKOFF_S = 0.5


class SchedulerLost(Exception):
    """The scheduler died and no new one took the request back in time."""


class SchedulerStream:
    def __init__(self, scheduler: Any, body: dict, resume_timeout_s: float = RESUME_TIMEOUT_S) -> None:
        self.scheduler, self.body = scheduler, body
        self.resume_timeout_s = resume_timeout_s
        self.generated: list[int] = []  # every token received so far
        self.request_id: str | None = None
        self.resumes = 0
        self._stream: Any = None

    async def open(self) -> dict:
        """Submit; returns the scheduler's first message (raises if it cannot be reached)."""
        self._stream = self.scheduler.options(stream=True).generate.remote(self.body)
        first = await self._stream.__anext__()
        self.request_id = first.get("request_id")
        return first

    async def messages(self) -> AsyncIterator[dict]:
        while True:
            try:
                msg = await self._stream.__anext__()
            except StopAsyncIteration:
                return
            except Exception as exc:  # noqa: BLE001 - the scheduler replica died mid-stream
                done = await self._resume(exc)
                if done is not None:
                    yield done
                    return
                continue
            self.generated += msg["token_ids"]
            yield msg
            if msg.get("finish_reason"):
                return

    async def finish(self, num_tokens: int) -> None:
        if self.request_id is None:
            return
        try:
            await self.scheduler.finish.remote(self.request_id, num_tokens)
        except Exception as exc:  # noqa: BLE001 - the stream still ends; only the record is lost
            logger.warning("could not report the stop-string finish of %s: %r", self.request_id, exc)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.cancel()  # no-op when finished

    async def _resume(self, exc: Exception) -> dict | None:
        """Submit the rest of the request to the scheduler that replaces the lost one. Returns a
        final message when nothing is left to generate (the lost one was the finish)."""
        logger.warning("scheduler lost mid-stream (%s: %s); resuming after %d tokens",
                       type(exc).__name__, exc, len(self.generated))
        self._stream.cancel()
        max_tokens = self.body.get("max_tokens")
        remaining = None if max_tokens is None else max_tokens - len(self.generated)
        if remaining is not None and remaining <= 0:
            return {"token_ids": [], "finish_reason": "length", "logprobs": []}
        body = {**self.body, "prompt_token_ids": list(self.body["prompt_token_ids"]) + self.generated,
                "max_tokens": remaining}
        deadline = time.monotonic() + self.resume_timeout_s
        while time.monotonic() < deadline:
            self._stream = self.scheduler.options(stream=True).generate.remote(body)
            try:
                first = await self._stream.__anext__()
            except Exception as again:  # noqa: BLE001 - not back yet
                logger.info("scheduler not back yet: %s", type(again).__name__)
                await asyncio.sleep(RESUME_BACKOFF_S)
                continue
            if "error" in first and first["error"]["status"] == 503:
                await asyncio.sleep(RESUME_BACKOFF_S)  # starting, or a model actor is down
                continue
            if "error" in first:
                raise SchedulerLost(first["error"]["message"])
            self.request_id = first.get("request_id")
            self.resumes += 1
            return None
        raise SchedulerLost(f"the scheduler restarted and did not take the request back within "
                            f"{self.resume_timeout_s:.0f} s")
