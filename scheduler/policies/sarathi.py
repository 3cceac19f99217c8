"""Sarathi-Serve: decode-first, stall-free batching with chunked prefill (Agrawal et al., OSDI 2024).

Every iteration first takes every resident decode (up to `max_num_seqs`), then fills the rest of
a fixed token budget (the chunk: 512 in the paper's runs; 1024 and 2048 are common) with
prefill: unfinished prefills first, then new admissions FCFS, each admitted only if its whole
prompt's KV fits in the blocks free now. Benchmarks report it at its best chunk per workload.
"""
from __future__ import annotations

from scheduler.policies.base import Batch, FreeBlocks, Policy, PolicyConfig, decode_first
from scheduler.queues import WorkerQueues


class SarathiPolicy(Policy):
    name = "sarathi"

    def __init__(self, config: PolicyConfig | None = None, chunk_size: int = 512) -> None:
        super().__init__(config)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size

    def select(self, q: WorkerQueues, now: float) -> Batch:
        return decode_first(q, self.config, self.chunk_size, FreeBlocks(q, whole=True))

    def describe(self) -> dict:
        return {"policy": self.name, "chunk_size": self.chunk_size}
