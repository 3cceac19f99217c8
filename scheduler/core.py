"""SchedulerCore: requests by stage, a policy's batch turned into a KV-checked plan, and commit.

The same core runs in the live scheduler actor and in the simulator:

    core.submit(request, now)                 # or raises a SchedulingError
    plan = core.plan(worker, now)             # None: nothing to run now (see next_wake)
    events = core.commit(plan, result, now)   # tokens appended, finished requests freed

KV is accounted per model actor with a `BlockPool`. When a batch would not fit, the newest
admissions are dropped from it and then resident requests are evicted, the policy's `victim`
first (LIFO unless the policy says otherwise; their KV is freed and they re-prefill prompt +
generated tokens later): the pool is never over-committed.
"""
from __future__ import annotations

from dataclasses import dataclass

from kv.blocks import BlockPool
from scheduler.errors import DuplicateRequest, QueueFull, RequestTooLong, SchedulingError
from scheduler.plan import Plan, ScheduledChunk, StepResult
from scheduler.policies.base import Batch, Policy
from scheduler.queues import GroupQueues, WorkerQueues
from scheduler.request import Request, RequestState


_NONE: list[int] = []  # shared empty list for unmaterialized chunks (never mutated)


@dataclass(slots=True)
class TokenEvent:
    """One sampled token of one request, as the streams and metrics see it."""

    request: Request
    token_id: int
    finish_reason: str | None
    logprob: float | None = None


class SchedulerCore:
    def __init__(
        self,
        policy: Policy,
        num_blocks: int | list[int],
        block_size: int = 16,
        max_model_len: int | None = None,
        max_queue_len: int = 0,
        materialize: bool = True,
    ) -> None:
        blocks = num_blocks if isinstance(num_blocks, list) else [num_blocks]
        self.policy = policy
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_queue_len = max_queue_len  # 0: unbounded
        # The simulator needs no token ids, block tables or slots: skipping them keeps it fast.
        self.materialize = materialize
        self.workers = [
            WorkerQueues(i, BlockPool(n, block_size), [GroupQueues() for _ in range(policy.num_groups)])
            for i, n in enumerate(blocks)
        ]
        self.requests: dict[str, Request] = {}
        self.num_evictions = 0
        self.num_guard_fires = 0
        self._admissions = 0
        self._iterations = [0] * len(blocks)
        self._last_batch: list[set[str]] = [set() for _ in blocks]

    # -- submission ------------------------------------------------------------------------
    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Raise a SchedulingError if a request of these lengths can never be served."""
        if prompt_len < 1:
            raise SchedulingError("the prompt must contain at least one token")
        if max_tokens < 1:
            raise SchedulingError(f"max_tokens must be at least 1, got {max_tokens}")
        total = prompt_len + max_tokens
        if self.max_model_len is not None and total > self.max_model_len:
            raise RequestTooLong(
                f"this model's maximum context length is {self.max_model_len} tokens; the request "
                f"has {prompt_len} prompt tokens and max_tokens {max_tokens} ({total} in all)"
            )
        capacity = max(w.pool.capacity_tokens for w in self.workers)
        if total > capacity:
            raise RequestTooLong(
                f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) needs {total} KV "
                f"tokens, more than a model actor's KV cache holds ({capacity} tokens)"
            )

    def submit(self, req: Request, now: float) -> None:
        if req.request_id in self.requests:
            raise DuplicateRequest(f"request id {req.request_id!r} is already in flight")
        self.check(req.prompt_len, req.max_tokens)
        if self.max_queue_len and self.num_waiting >= self.max_queue_len:
            raise QueueFull(f"the admission queue is full ({self.max_queue_len} waiting requests)")
        req.worker = self._route(req)
        req.group = self.policy.group_of(req)
        req.state = RequestState.WAITING
        req.waiting_since = now
        self.requests[req.request_id] = req
        self.workers[req.worker].groups[req.group].waiting[req.request_id] = req
        self.policy.on_arrival(req, now)

    def _route(self, req: Request) -> int:
        """The model actor with the least outstanding work (fills thresholds evenly)."""
        return min(self.workers, key=lambda w: w.num_waiting + w.num_resident).worker

    # -- planning --------------------------------------------------------------------------
    def plan(self, worker: int, now: float) -> Plan | None:
        q = self.workers[worker]
        if q.busy:
            raise RuntimeError(f"worker {worker} already has a plan in flight")
        if not q.has_work():
            return None
        batch, evicted = self._fit(q, self.policy.select(q, now))
        # The guard also fires when the policy's batch does not fit at all: a threshold policy
        # may pick only prefills while paused residents of other types/segments hold the KV,
        # and without the work-conserving fallback (which advances those residents) that
        # state never changes.
        if not batch and self.policy.may_idle and now >= self.policy.wake_time(q):
            batch, more = self._fit(q, self.policy.fallback(q, now))
            evicted += more
            self.num_guard_fires += bool(batch)
        if not batch:
            return None
        self._mark_paused(worker, {req.request_id for req, _ in batch})
        chunks = [self._schedule(q, req, n, now) for req, n in batch]
        q.busy = True
        self._iterations[worker] += 1
        return Plan(worker, self._iterations[worker], chunks, self.block_size, evicted)

    def next_wake(self, worker: int) -> float | None:
        """When the starvation guard would run work that the policy holds back now."""
        q = self.workers[worker]
        if not q.has_work() or not self.policy.may_idle:
            return None
        return self.policy.wake_time(q)

    def _fit(self, q: WorkerQueues, batch: Batch) -> tuple[Batch, list[str]]:
        """Shrink the batch, then evict, until its new KV fits in the free blocks: new
        admissions are left out first (newest first); a policy that pauses on overflow then
        leaves out the residents that need a new block (they keep their KV and wait for a
        completion to free one), as long as something still runs; the policy's victims are
        evicted last."""
        free, size = q.pool.num_free_blocks, q.pool.block_size
        # Cheap upper bound first: n new tokens never need more than n // size + 1 new blocks.
        if sum(n // size + 1 for _, n in batch) <= free:
            return batch, []
        needs = [q.pool.extra_blocks(r.request_id, r.num_computed_tokens + n) for r, n in batch]
        total = sum(needs)
        if total <= q.pool.num_free_blocks:
            return batch, []
        in_batch = {r.request_id: i for i, (r, _) in enumerate(batch)}
        dropped: set[int] = set()
        # New admissions are newer than every resident: leave them out first, newest first.
        for i in range(len(batch) - 1, -1, -1):
            if total <= q.pool.num_free_blocks:
                break
            if not q.pool.has(batch[i][0].request_id):
                dropped.add(i)
                total -= needs[i]
        if total > q.pool.num_free_blocks and self.policy.pause_on_overflow:
            growing = {i for i, need in enumerate(needs) if need and i not in dropped}
            if len(growing) + len(dropped) < len(batch):  # the rest still runs: pause, not evict
                dropped |= growing
                total -= sum(needs[i] for i in growing)
        evicted: list[str] = []
        while total > q.pool.num_free_blocks and q.resident:
            victim = self.policy.victim(q)
            i = in_batch.get(victim.request_id)
            if i is not None and i not in dropped:
                dropped.add(i)
                total -= needs[i]
            self._evict(q, victim)
            evicted.append(victim.request_id)
        return [b for i, b in enumerate(batch) if i not in dropped], evicted

    def _evict(self, q: WorkerQueues, req: Request) -> None:
        self._release(q, req)
        req.num_computed_tokens = 0
        req.prefill_target = req.total_len
        req.num_evictions += 1
        req.state = RequestState.WAITING
        q.restart[req.request_id] = req
        self.num_evictions += 1

    def _release(self, q: WorkerQueues, req: Request) -> None:
        """Drop a request from every resident index of its worker and free its KV."""
        q.pool.free(req.request_id)
        q.resident.pop(req.request_id, None)
        q.prefilling.pop(req.request_id, None)
        q.groups[req.group].remove_decoder(req)

    def _mark_paused(self, worker: int, batch_ids: set[str]) -> None:
        for rid in self._last_batch[worker] - batch_ids:
            req = self.requests.get(rid)
            if req is not None and req.state is RequestState.RUNNING:
                req.state = RequestState.PAUSED
                req.waiting_since = self.workers[worker].idle_since
        self._last_batch[worker] = batch_ids

    def _schedule(self, q: WorkerQueues, req: Request, n: int, now: float) -> ScheduledChunk:
        rid = req.request_id
        if not q.pool.has(rid):
            q.restart.pop(rid, None)
            q.groups[req.group].waiting.pop(rid, None)
            q.resident[rid] = req
            self._admissions += 1
            req.admitted_seq = self._admissions
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
        start = req.num_computed_tokens
        is_prefill = req.in_prefill
        n = min(n, req.prefill_target - start) if is_prefill else 1
        q.pool.reserve(rid, start + n)
        sample = not is_prefill or start + n >= req.prefill_target
        if is_prefill and not sample:
            q.prefilling[rid] = req
        req.state = RequestState.RUNNING
        if not self.materialize:
            return ScheduledChunk(rid, _NONE, start, n, _NONE, _NONE, sample, req.sampling, is_prefill)
        return ScheduledChunk(
            request_id=rid,
            token_ids=req.token_ids(start, start + n),
            start_pos=start,
            num_tokens=n,
            block_table=list(q.pool.block_table(rid)),
            slot_mapping=q.pool.slot_mapping(rid, start, start + n),
            sample=sample,
            sampling=req.sampling,
            is_prefill=is_prefill,
        )

    # -- commit ----------------------------------------------------------------------------
    def commit(self, plan: Plan, result: StepResult, now: float) -> list[TokenEvent]:
        """Apply one executed iteration: advance stages, append tokens, finish and free."""
        q = self.workers[plan.worker]
        q.busy = False
        q.idle_since = now
        sampled = iter(result.tokens)
        events: list[TokenEvent] = []
        requests, has_kv, groups = self.requests, q.pool.has, q.groups
        for chunk in plan.chunks:
            token = next(sampled) if chunk.sample else None
            req = requests.get(chunk.request_id)
            # Finished, cancelled and evicted requests hold no KV: this one skip covers a
            # request cancelled while the iteration ran.
            if req is None or not has_kv(chunk.request_id):
                continue
            if not chunk.is_prefill:
                groups[req.group].remove_decoder(req)
            req.num_computed_tokens += chunk.num_tokens
            if token is None:
                continue
            if chunk.is_prefill:
                q.prefilling.pop(req.request_id, None)
            event = self._append_token(q, req, token.token_id, token.finish_reason, now)
            event.logprob = token.logprob
            events.append(event)
        return events

    def _append_token(
        self, q: WorkerQueues, req: Request, token_id: int, reason: str | None, now: float
    ) -> TokenEvent:
        if token_id >= 0:
            req.output_token_ids.append(token_id)
        req.num_generated += 1
        if req.first_token_time is None:
            req.first_token_time = now
        req.last_token_time = now
        if reason is None:  # the length limits (inline: this runs once per token)
            n = req.num_generated
            if req.output_len is not None and n >= req.output_len:
                reason = "stop"  # simulated EOS at the request's true output length
            elif n >= req.max_tokens or (self.max_model_len is not None and req.total_len >= self.max_model_len):
                reason = "length"
        if reason:
            self._finish(q, req, reason, now)
        else:
            q.groups[req.group].add_decoder(req)
        return TokenEvent(req, token_id, reason)

    def _finish(self, q: WorkerQueues, req: Request, reason: str, now: float) -> None:
        self._release(q, req)
        req.state = RequestState.CANCELLED if reason == "cancelled" else RequestState.FINISHED
        req.finish_reason = reason
        req.finish_time = now
        del self.requests[req.request_id]
        if reason != "cancelled":
            self.policy.on_finish(req, now)

    # -- cancellation and faults -----------------------------------------------------------
    def cancel(self, request_id: str, now: float) -> Request | None:
        """Stop a request and free its KV at once; None if it is unknown or already done."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        q = self.workers[req.worker]
        q.restart.pop(request_id, None)
        q.groups[req.group].waiting.pop(request_id, None)
        self._finish(q, req, "cancelled", now)
        return req

    def reset_worker(self, worker: int, now: float) -> list[Request]:
        """A model actor died: its KV is gone. Every resident request re-prefills from its
        prompt plus the tokens it already generated, so streams continue where they were."""
        q = self.workers[worker]
        q.busy = False
        q.idle_since = now
        affected = list(q.resident.values())  # admission order: oldest re-prefills first
        for req in affected:
            self._evict(q, req)
        self.num_evictions -= len(affected)  # a crash is not a memory eviction
        self._last_batch[worker] = set()
        return affected

    # -- state for metrics and tests -------------------------------------------------------
    @property
    def iterations(self) -> list[int]:
        """Iterations planned so far, per model actor."""
        return list(self._iterations)

    @property
    def num_waiting(self) -> int:
        return sum(w.num_waiting for w in self.workers)

    def counts(self) -> dict[str, int]:
        running = sum(len(b) for b in self._last_batch)
        resident = sum(w.num_resident for w in self.workers)
        return {
            "running": min(running, resident),
            "paused": max(0, resident - running),
            "waiting": self.num_waiting,
        }

    def has_work(self) -> bool:
        return any(w.has_work() for w in self.workers)
