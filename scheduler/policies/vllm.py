"""vLLM's classic scheduler (the paper's baseline, as Vidur models it).

Prefill-first and FCFS: whenever waiting requests can be admitted, the iteration is prefills
only (up to `max_num_batched_tokens` tokens and `max_num_seqs` sequences, each admitted only if
its whole prompt's KV fits); otherwise every resident request decodes. Prefill and decode never
mix in one iteration. Memory shortage on decode evicts the newest (the core's LIFO eviction).
"""
from __future__ import annotations

from scheduler.policies.base import Batch, Policy, take_decodes
from scheduler.queues import WorkerQueues


class VLLMPolicy(Policy):
    name = "vllm"

    def select(self, q: WorkerQueues, now: float) -> Batch:
        prefills = self._admit(q)
        return prefills or take_decodes(q, self.config.max_num_seqs)

    def _admit(self, q: WorkerQueues) -> Batch:
        budget = self.config.max_num_batched_tokens
        free_blocks = q.pool.num_free_blocks
        # vLLM keeps a small watermark of free blocks (1%) so running decodes can grow; with
        # nothing resident there is nothing to grow, and a watermark would block a request
        # that fills a small cache forever.
        watermark = q.pool.num_blocks // 100 if q.resident else 0
        seats = self.config.max_num_seqs - q.num_resident
        batch: Batch = []
        for req in q.waiting_in_order():
            tokens = req.prefill_target
            blocks = q.pool.blocks_for(tokens)
            # A prompt longer than the token budget still runs, alone, so it cannot starve.
            too_big = tokens > budget and batch
            if seats <= 0 or too_big or blocks > free_blocks - watermark:
                break
            batch.append((req, tokens))
            budget -= tokens
            free_blocks -= blocks
            seats -= 1
        return batch
