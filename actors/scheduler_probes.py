"""What tests and benchmarks ask the scheduler replica, apart from serving: its state, its
dispatch statistics, and a load generator inside it (`bench scale`'s `replica` mode).

A mixin of `actors.scheduler_actor.SchedulerActor`: these read its core, hub and dispatchers.
"""
from __future__ import annotations

import asyncio
import os
import time
import uuid

from actors.naming import actor_name


class SchedulerProbes:
    async def debug_state(self) -> dict:
        """Counts for tests: KV blocks in use per model actor, queue lengths."""
        await self._started()
        return {
            "used_blocks": [q.pool.num_used_blocks for q in self.core.workers],
            "requests": len(self.core.requests),
            "streams": len(self.hub),
            "subscribers": len(self.hub.subscribers),  # one per ingress replica (+ open `generate`s)
            "iterations": self.core.iterations,
            "evictions": self.core.num_evictions,
            "epochs": [q.epoch for q in self.core.workers],  # resets of each model actor
            "actor_names": [actor_name(i, self.owner) for i in range(len(self.actors))],
            "healthy": [q.healthy for q in self.core.workers],
            "busy": [q.busy for q in self.core.workers],
            "next_wake_in_s": [None if (t := self.core.next_wake(i)) is None else t - time.monotonic()
                               for i in range(len(self.core.workers))],
            # A few requests' progress, to tell a stall from slow progress.
            "sample": {r.request_id[:8]: (r.state.value, r.worker, r.num_computed_tokens, r.prefill_target,
                                          r.num_generated) for r in list(self.core.requests.values())[:8]},
            **self.core.counts(),
        }

    async def load_test(self, arrivals: list[tuple[float, int, int]]) -> list[tuple]:
        """A load generator inside this replica, for `bench scale`: each (offset s, prompt
        tokens, output tokens) is submitted at its time and followed through one subscriber, as
        an ingress replica's requests are, but with no Serve call per request or message, so the
        dispatch path's own ceiling shows. Returns per request (sent, first token, end, tokens)
        in seconds after the start (None where it failed)."""
        await self._started()
        start = time.monotonic()
        sub = self.hub.subscribe(f"load-test-{uuid.uuid4().hex}")
        results: list[list] = [[None, None, None, 0] for _ in arrivals]  # sent, first, end, tokens
        rows: dict[str, list] = {}  # request id -> its entry of results
        pending = len(arrivals)
        all_done = asyncio.get_running_loop().create_future()

        def ended() -> None:
            nonlocal pending
            pending -= 1
            if pending == 0 and not all_done.done():
                all_done.set_result(None)

        async def send(i: int, offset: float, prompt_len: int, output_len: int) -> None:
            await asyncio.sleep(max(0.0, start + offset - time.monotonic()))
            row = results[i]
            row[0] = time.monotonic() - start
            body = {"prompt_token_ids": [1000 + (prompt_len + k) % 20000 for k in range(prompt_len)],
                    "max_tokens": output_len, "ignore_eos": True}
            first = self._admit(body, sub)
            if "error" in first:
                ended()
            else:
                rows[first["request_id"]] = row

        async def read() -> None:
            async for batch in self.hub.messages(sub):
                now = time.monotonic() - start
                for rid, message in batch.items():
                    row = rows[rid]
                    if message["token_ids"]:
                        row[1] = now if row[1] is None else row[1]
                        row[3] += len(message["token_ids"])
                    if message["finish_reason"] is not None:
                        row[2] = None if message.get("error") else now
                        ended()

        reader = asyncio.create_task(read())
        try:
            await asyncio.gather(*(send(i, *a) for i, a in enumerate(arrivals)))
            if pending:  # until every request ended, or the reader failed (then it raises here)
                await asyncio.wait({reader, all_done}, return_when=asyncio.FIRST_COMPLETED)
                if reader.done():
                    reader.result()
        finally:
            reader.cancel()
            self._unsubscribe(sub)
        return [tuple(row) for row in results]

    async def dispatch_stats(self, reset: bool = False, samples: bool = False) -> dict:
        """Per model actor: busy fraction, gaps between steps; the replica's CPU time and pid
        (benchmarks read these; `reset` starts a new measurement window). `samples`: the latest
        steps' (new tokens, attended KV, period s), what a cost model is fitted to."""
        await self._started()
        out = {"actors": [d.stats.summary() for d in self.dispatchers], "pid": os.getpid(),
               "process_cpu_s": time.process_time(), "monotonic": time.monotonic()}
        if samples:
            out["samples"] = [s for d in self.dispatchers for s in d.stats.samples]
        if reset:
            for d in self.dispatchers:
                d.stats.reset()
        return out
