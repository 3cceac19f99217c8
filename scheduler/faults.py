"""What the core does when things go wrong (a mixin of `SchedulerCore`, split out by concept):
a model actor that lost its state (`reset_worker`), one that stays dead (`set_worker_down`:
its requests move to the healthy actors), rows that failed on the actor (`_fail_requests`), and
requests not admitted in time (`expire_waiting`). Pure Python, like the rest of `scheduler/`.
"""
from __future__ import annotations

from scheduler.errors import NoWorker
from scheduler.queues import WorkerQueues
from scheduler.request import Request, TokenEvent


class FaultHandling:
    def _fail_requests(self, q: WorkerQueues, request_ids: set[str], now: float) -> list[TokenEvent]:
        """Requests whose rows failed on the model actor end with finish_reason "error"."""
        out = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is not None and req.worker == q.worker:
                self._finish(q, req, "error", now)
                out.append(TokenEvent(req, -1, "error"))
        return out

    def expire_waiting(self, max_wait_s: float, now: float) -> list[Request]:
        """End the requests not admitted within `max_wait_s` of their arrival (finish reason
        "timeout"); returns them. The admission queues are in arrival order: each scan stops at
        the first request still in time."""
        expired = []
        for q in self.workers:
            for group in q.groups:
                for req in group.waiting.values():
                    if now - req.arrival_time <= max_wait_s:
                        break
                    expired.append(req)
        for req in expired:
            self._end(req.request_id, "timeout", now)
        return expired

    def reset_worker(self, worker: int, now: float) -> list[Request]:
        """A model actor lost its state (it died, or a step failed): every batch in flight is
        void. Every resident request re-prefills from its prompt plus the tokens it already
        generated (placeholders dropped), so streams continue where they were."""
        q = self.workers[worker]
        q.in_flight = 0
        q.idle_since = now
        q.epoch += 1
        affected = list(q.parked.values()) + list(q.resident.values())  # oldest first
        for req in affected:
            self._release(q, req)
            self._drop_placeholders(req)
            self._requeue(q, req)
        q.parked.clear()
        q.slots.reset()
        self._last_batch[worker] = []
        return affected

    def set_worker_down(self, worker: int, now: float) -> tuple[list[Request], list[Request]]:
        """The model actor stays dead: nothing is routed to it, and its requests move to the
        healthy actors that can hold them (re-prefilling prompt plus the tokens already
        generated, so streams continue). Returns (moved, stranded): stranded requests fit
        nowhere and are still queued here; the caller fails them."""
        self.reset_worker(worker, now)
        q = self.workers[worker]
        q.healthy = False
        moved, stranded = [], []
        queued = list(q.restart.values()) + [r for g in q.groups for r in g.waiting.values()]
        for req in queued:
            try:
                target = self._route(req, exclude=worker)
            except NoWorker:
                stranded.append(req)
                continue
            q.restart.pop(req.request_id, None)
            q.groups[req.group].waiting.pop(req.request_id, None)
            req.worker = target
            dest = self.workers[target]
            if req.first_scheduled_time is None:
                dest.groups[req.group].waiting[req.request_id] = req
            else:
                dest.restart[req.request_id] = req
            moved.append(req)
        return moved, stranded

    def set_worker_up(self, worker: int) -> None:
        self.workers[worker].healthy = True

