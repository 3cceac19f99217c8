"""How a policy's batch becomes the rows of one plan: admissions, prefill chunks, decode rows.

Part of `SchedulerCore` (a mixin, so the core reads as one class in two files): each row's
effects are applied at once (see the core's docstring: output placeholders, stages as they will
be), and the diff plan the model actor gets is filled as the rows are made: a new or resumed
request's tokens and blocks once, blocks appended to residents, the slots freed since the last
plan.
"""
from __future__ import annotations

from scheduler.plan import DiffPlan, NewRequestData, ScheduledBatch, int_array
from scheduler.queues import WorkerQueues
from scheduler.request import Request, RequestState

_RUNNING = RequestState.RUNNING


class RowScheduling:
    block_size: int
    materialize: bool
    max_model_len: int | None
    _admissions: int

    def _wire(self, q: WorkerQueues, iteration: int) -> DiffPlan | None:
        """An empty diff plan carrying the slots freed since the last one."""
        slots = q.slots
        if not self.materialize:
            slots.freed.clear()
            slots.evicted.clear()
            return None
        epoch, last = q.last_sent
        wire = DiffPlan(q.worker, iteration, q.epoch, self.block_size,
                        prev_iteration=last if epoch == q.epoch else -1,
                        freed_slots=int_array(slots.freed), evicted_slots=int_array(slots.evicted))
        slots.freed.clear()
        slots.evicted.clear()
        return wire

    @staticmethod
    def _unwire(q: WorkerQueues, wire: DiffPlan | None) -> None:
        """A plan not sent after all: its announcements go with the next one."""
        if wire is not None:
            q.slots.freed[:0] = wire.freed_slots
            q.slots.evicted[:0] = wire.evicted_slots

    def _decode(self, q: WorkerQueues, req: Request, step: ScheduledBatch) -> None:
        """One decode row of a resident request: the hot path (most rows of most batches)."""
        generated = req.num_generated
        if generated >= req.gen_limit:
            return  # its last token is in flight: nothing left to schedule
        rid = req.request_id
        stages = q.groups[req.group].stages
        bucket = stages.get(generated)  # leave this stage (GroupQueues.remove_decoder, inline)
        if bucket is not None and bucket.pop(rid, None) is not None and not bucket:
            del stages[generated]
        start = req.num_computed_tokens
        added = q.pool.reserve(rid, start + 1)
        req.num_computed_tokens = start + 1
        req.state = _RUNNING
        req.planned_iteration = step.iteration
        generated += 1
        req.num_generated = generated
        req.num_pending += 1
        if generated < req.gen_limit:  # the next stage (GroupQueues.add_decoder, inline)
            bucket = stages.get(generated)
            if bucket is None:
                bucket = stages[generated] = {}
            bucket[rid] = req
        step.requests.append(req)  # ScheduledBatch.add_row, inline
        step.num_tokens.append(1)
        step.start_pos.append(start)
        step.is_prefill.append(False)
        step.sampled.append(req)
        step.num_new_tokens += 1
        step.num_attended_kv += start + 1
        if added and step.wire is not None:
            step.wire.grow_slots.extend([req.slot] * added)
            step.wire.grow_blocks.extend(q.pool.block_table(rid)[-added:])

    def _schedule(self, q: WorkerQueues, req: Request, n: int, now: float, step: ScheduledBatch) -> None:
        rid = req.request_id
        new = req.slot < 0
        if new:
            self._admit(q, req, now)
        start = req.num_computed_tokens
        target = req.prefill_target
        if start >= target:  # not a prefill after all (a resident decoder): the decode path
            self._decode(q, req, step)
            return
        n = min(n, target - start)
        sample = start + n >= target
        if sample:
            q.prefilling.pop(rid, None)
        else:
            q.prefilling[rid] = req
        added = q.pool.reserve(rid, start + n)
        req.num_computed_tokens = start + n
        req.state = _RUNNING
        req.planned_iteration = step.iteration
        if sample:  # the prefill's last chunk samples the first (or next) token
            req.num_generated += 1
            req.num_pending += 1
            if req.num_generated < req.gen_limit:
                q.groups[req.group].add_decoder(req)
        step.add_row(req, n, start, True, sample)
        wire = step.wire
        if wire is None:
            return
        slot = req.slot
        if new:
            wire.new_requests.append(NewRequestData(
                slot, rid, int_array(req.token_ids(0, target)),
                int_array(q.pool.block_table(rid)), req.sampling, req.prompt_len))
        elif added:
            wire.grow_slots.extend([slot] * added)
            wire.grow_blocks.extend(q.pool.block_table(rid)[-added:])

    def _admit(self, q: WorkerQueues, req: Request, now: float) -> None:
        """A waiting request gets KV (a slot now, blocks as its rows reserve them)."""
        rid = req.request_id
        q.restart.pop(rid, None)
        q.groups[req.group].waiting.pop(rid, None)
        q.resident[rid] = req
        self._admissions += 1
        req.admitted_seq = self._admissions
        req.slot = q.slots.take()
        limit = req.max_tokens if req.output_len is None else min(req.max_tokens, req.output_len)
        if self.max_model_len is not None:
            limit = min(limit, self.max_model_len - req.prompt_len)
        req.gen_limit = limit
        if req.first_scheduled_time is None:
            req.first_scheduled_time = now
            self.queued_tokens -= req.prompt_len
