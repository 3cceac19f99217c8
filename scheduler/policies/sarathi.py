"""Sarathi-Serve: decode-first, stall-free batching with chunked prefill.

Every iteration first takes every resident decode (up to `max_num_seqs`), then fills the rest of
a fixed token budget (the chunk, default 512) with prefill: unfinished prefills first, then new
admissions FCFS, each admitted only if its whole prompt's KV fits.
"""
from __future__ import annotations

from scheduler.policies.base import Batch, Policy, PolicyConfig, take_decodes
from scheduler.queues import WorkerQueues


class SarathiPolicy(Policy):
    name = "sarathi"

    def __init__(self, config: PolicyConfig | None = None, chunk_size: int = 512) -> None:
        super().__init__(config)
        self.chunk_size = chunk_size

    def select(self, q: WorkerQueues, now: float) -> Batch:
        batch = take_decodes(q, self.config.max_num_seqs)
        budget = self.chunk_size - len(batch)
        seats = self.config.max_num_seqs - len(batch)
        for req in q.prefilling.values():
            if budget <= 0 or seats <= 0:
                return batch
            n = min(budget, req.prefill_target - req.num_computed_tokens)
            batch.append((req, n))
            budget -= n
            seats -= 1
        free_blocks = q.pool.num_free_blocks
        seats = min(seats, self.config.max_num_seqs - q.num_resident)
        for req in q.waiting_in_order():
            blocks = q.pool.blocks_for(req.prefill_target)
            if budget <= 0 or seats <= 0 or blocks > free_blocks:
                break
            n = min(budget, req.prefill_target)
            batch.append((req, n))
            budget -= n
            free_blocks -= blocks
            seats -= 1
        return batch

    def describe(self) -> dict:
        return {"policy": self.name, "chunk_size": self.chunk_size}
