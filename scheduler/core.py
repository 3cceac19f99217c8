"""SchedulerCore: requests by stage, a policy's batch turned into a KV-checked plan, and commit.

The same core runs in the live scheduler actor and in the simulator:

    core.submit(request, now)                 # or raises a SchedulingError
    batch = core.plan(worker, now)            # None: nothing to run now (see next_wake)
    events = core.commit(batch, result, now)  # tokens appended, finished requests freed

KV is accounted per model actor with a `BlockPool`. When a batch would not fit, the newest
admissions are dropped from it and then resident requests are evicted, the policy's `victim`
first (LIFO unless the policy says otherwise; their KV is freed and they re-prefill prompt +
generated tokens later): the pool is never over-committed.

Planning may run ahead of execution (vLLM v1's async scheduling): `plan` applies a batch's
effects at once, as if it had run: `num_computed_tokens` advances, and every row that samples
adds an output placeholder (`num_pending`) that `num_generated`, the request's stage and
`total_len` already count. So the next `plan`, made while this batch still runs, sees every
request as it will be after it; a request whose last token (by `max_tokens`, its known output
length or the context) is in flight is in no stage and is not scheduled again. `commit`
reconciles: it fills the placeholders with the sampled tokens, finishes requests that hit EOS or
a stop token (dropping their placeholders: tokens sampled for them in later batches are
discarded), and returns requests evicted with tokens in flight (`parked`) to the restart queue
once those are back. The simulator plans and commits in turn, which is the same code.
"""
from __future__ import annotations

from kv.blocks import BlockPool
from scheduler.errors import DuplicateRequest, NoWorker, QueueFull, RequestTooLong, SchedulingError
from scheduler.faults import FaultHandling
from scheduler.plan import ScheduledBatch, StepResult
from scheduler.policies.base import Batch, Policy
from scheduler.queues import GroupQueues, WorkerQueues
from scheduler.request import Request, RequestState, TokenEvent
from scheduler.rows import _RUNNING, RowScheduling

_FINISHED, _CANCELLED = RequestState.FINISHED, RequestState.CANCELLED  # `is` tests: no enum hashing


class SchedulerCore(RowScheduling, FaultHandling):
    def __init__(
        self,
        policy: Policy,
        num_blocks: int | list[int],
        block_size: int = 16,
        max_model_len: int | None = None,
        max_queue_len: int = 0,
        materialize: bool = True,
        max_queued_tokens: int = 0,
        max_queue_wait_s: float = 0.0,
    ) -> None:
        blocks = num_blocks if isinstance(num_blocks, list) else [num_blocks]
        self.policy = policy
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_queue_len = max_queue_len  # 0: unbounded
        # Prompt tokens of the requests not admitted yet (never scheduled): past this, 429.
        self.max_queued_tokens = max_queued_tokens  # 0: unbounded
        self.queued_tokens = 0
        # A request not admitted within this many seconds of its arrival is never admitted: it
        # ends with "timeout" (checked before every plan, so no admission waits longer) and waits
        # in `expired` for the caller to tell its client. 0: no bound.
        self.max_queue_wait_s = max_queue_wait_s
        self.expired: list[Request] = []
        # The simulator sends no plans: skipping the wire form (token ids, blocks) keeps it fast.
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
        self._last_batch: list[list[Request]] = [[] for _ in blocks]

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
        if self.max_queued_tokens and self.queued_tokens + req.prompt_len > self.max_queued_tokens:
            raise QueueFull(f"the admission queue is full ({self.queued_tokens} prompt tokens wait; "
                            f"max_queued_tokens is {self.max_queued_tokens})")
        req.worker = self._route(req)
        self.queued_tokens += req.prompt_len
        req.group = self.policy.group_of(req)
        req.state = RequestState.WAITING
        req.waiting_since = now
        self.requests[req.request_id] = req
        self.workers[req.worker].groups[req.group].waiting[req.request_id] = req
        self.policy.on_arrival(req, now)

    def _route(self, req: Request, exclude: int = -1) -> int:
        """The healthy model actor with the least outstanding work (fills thresholds evenly)
        whose KV pool can hold the whole request."""
        need = req.prompt_len + req.max_tokens
        fits = [w for w in self.workers if w.healthy and w.worker != exclude and w.pool.capacity_tokens >= need]
        if not fits:
            raise NoWorker("no model actor is available for this request (every one that could "
                           "hold it is down); retry later")
        return min(fits, key=lambda w: w.num_waiting + w.num_resident).worker

    # -- planning --------------------------------------------------------------------------
    def plan(self, worker: int, now: float) -> ScheduledBatch | None:
        """The next batch of `worker`, planned as if every batch in flight had run."""
        if self.max_queue_wait_s:
            self.expired += self.expire_waiting(self.max_queue_wait_s, now)
        q = self.workers[worker]
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
        iteration = self._iterations[worker] + 1
        step = ScheduledBatch(worker, iteration, q.epoch, evicted, self._wire(q, iteration))
        for req, n in batch:
            if req.slot >= 0 and req.num_computed_tokens >= req.prefill_target:
                self._decode(q, req, step)
            else:
                self._schedule(q, req, n, now, step)
        if not step.requests:  # every row was a request whose last token is in flight
            self._unwire(q, step.wire)
            return None
        self._mark_paused(worker, step)
        if step.wire is not None:
            step.wire.set_rows([r.slot for r in step.requests], step.num_tokens, step.start_pos)
        self._iterations[worker] = iteration
        q.last_sent = (q.epoch, iteration)
        q.in_flight += 1
        return step

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
        self._release(q, req, evicted=True)
        req.num_evictions += 1
        self.num_evictions += 1
        if req.num_pending:
            # Tokens of batches in flight are still to come (they ran on its KV before this
            # eviction reaches the actor): it re-prefills once they are back.
            req.num_computed_tokens = 0
            req.state = RequestState.WAITING
            q.parked[req.request_id] = req
        else:
            self._requeue(q, req)

    def _requeue(self, q: WorkerQueues, req: Request) -> None:
        """Back to the restart queue: re-prefill the prompt plus every generated token."""
        req.num_computed_tokens = 0
        req.prefill_target = req.total_len
        req.state = RequestState.WAITING
        q.restart[req.request_id] = req

    def _release(self, q: WorkerQueues, req: Request, evicted: bool = False) -> None:
        """Drop a request from every resident index of its worker and free its KV and slot."""
        q.pool.free(req.request_id)
        q.resident.pop(req.request_id, None)
        q.prefilling.pop(req.request_id, None)
        q.groups[req.group].remove_decoder(req)
        if req.slot >= 0:
            q.slots.release(req.slot, evicted)
            req.slot = -1

    def _mark_paused(self, worker: int, step: ScheduledBatch) -> None:
        """Residents of the previous batch left out of this one are paused."""
        iteration, since = step.iteration, self.workers[worker].idle_since
        for req in self._last_batch[worker]:
            if req.planned_iteration != iteration and req.state is _RUNNING:
                req.state = RequestState.PAUSED
                req.waiting_since = since
        self._last_batch[worker] = step.requests

    # -- commit ----------------------------------------------------------------------------
    def commit(self, step: ScheduledBatch, result: StepResult, now: float) -> list[TokenEvent]:
        """Apply one executed batch: fill its placeholders with tokens, finish and free."""
        q = self.workers[step.worker]
        if q.in_flight:
            q.in_flight -= 1
        q.idle_since = now
        if step.epoch != q.epoch:
            return []  # the actor's state was reset since: these tokens are void
        token_ids = result.token_ids
        stops = set(result.stop_rows) if len(result.stop_rows) else None
        logprobs, tops = result.logprobs, result.top_logprobs
        # Failed rows end their requests first; the loop below then skips them as finished.
        events = self._fail_requests(q, set(result.failed), now) if result.failed else []
        append = events.append
        for i, req in enumerate(step.sampled):
            # Finished (EOS in an earlier batch) or cancelled since: the token is void.
            state = req.state
            if state is _FINISHED or state is _CANCELLED:
                continue
            token = token_ids[i]
            pending = req.num_pending - 1
            req.num_pending = pending
            if token >= 0:
                req.output_token_ids.append(token)
            if req.first_token_time is None:
                req.first_token_time = now
            req.last_token_time = now
            reason = "stop" if stops and i in stops else None
            if reason or req.num_generated - pending >= req.gen_limit or req.slot < 0:
                reason = self._settle(q, req, reason, now)
            event = TokenEvent(req, token, reason)
            if logprobs is not None:
                event.logprob = logprobs[i]
                if tops is not None:
                    event.top_logprobs = tops[i]
            append(event)
        return events

    def _settle(self, q: WorkerQueues, req: Request, reason: str | None, now: float) -> str | None:
        """A committed token that ends the request, or the last one an evicted request waited
        for; returns the finish reason."""
        if reason is None and req.num_generated - req.num_pending >= req.gen_limit:
            # A known output length is a simulated EOS; max_tokens or the context: "length".
            n = req.num_generated - req.num_pending
            reason = "stop" if req.output_len is not None and n >= req.output_len else "length"
        if reason:
            self._finish(q, req, reason, now)
        elif req.slot < 0 and not req.num_pending:  # evicted while this token was in flight
            del q.parked[req.request_id]
            self._requeue(q, req)
        return reason

    def _finish(self, q: WorkerQueues, req: Request, reason: str, now: float) -> None:
        if req.first_scheduled_time is None:  # it never left the admission queue
            self.queued_tokens -= req.prompt_len
        self._release(q, req)
        q.parked.pop(req.request_id, None)
        self._drop_placeholders(req)
        req.state = RequestState.CANCELLED if reason == "cancelled" else RequestState.FINISHED
        req.finish_reason = reason
        req.finish_time = now
        del self.requests[req.request_id]
        if reason == "stop" or reason == "length":  # only real output lengths teach the policy
            self.policy.on_finish(req, now)

    @staticmethod
    def _drop_placeholders(req: Request) -> None:
        """Tokens scheduled but never to be committed no longer count as generated."""
        req.num_generated -= req.num_pending
        req.num_pending = 0

    # -- ending requests early (faults: scheduler.faults) ------------------------------------
    def cancel(self, request_id: str, now: float) -> Request | None:
        """Stop a request and free its KV at once; None if it is unknown or already done."""
        return self._end(request_id, "cancelled", now)

    def _end(self, request_id: str, reason: str, now: float, num_tokens: int | None = None) -> Request | None:
        """Finish a request wherever it is (queued or resident); keep `num_tokens` outputs."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        q = self.workers[req.worker]
        q.restart.pop(request_id, None)
        q.groups[req.group].waiting.pop(request_id, None)
        if num_tokens is not None:
            n = max(0, min(num_tokens, len(req.output_token_ids)))
            del req.output_token_ids[n:]
            req.num_generated = n + req.num_pending  # the placeholders are dropped by _finish
        self._finish(q, req, reason, now)
        return req

    def finish(self, request_id: str, num_tokens: int, now: float) -> Request | None:
        """The client side found the end (a stop string) at output token `num_tokens`: the
        request finishes with "stop" after that many tokens (those past it are dropped and never
        counted), its KV is freed, and the policy learns its true output length."""
        return self._end(request_id, "stop", now, num_tokens)

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
