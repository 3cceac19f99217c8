"""Current vLLM's scheduler (V1), as modelled here.

Source: vllm/v1/core/sched/scheduler.py (`Scheduler.schedule`) and the serving defaults in
vllm/engine/arg_utils.py (`get_batch_defaults`: on an A100, 2048 batched tokens and 256 sequences
for the OpenAI server). One token budget per step; running requests first (decodes, and the
rest of a chunked prefill), in the order they were admitted; then waiting requests FCFS, each
prefill chunked to what is left of the budget, admitted while the blocks of the chunk scheduled
now are free (V1 allocates KV as tokens are scheduled, not the whole prompt up front). When a
running request cannot get a block, the newest running request is preempted and recomputed
later (the core's LIFO eviction). Not modelled: prefix caching, speculative decoding,
`long_prefill_token_threshold` (off by default).
"""
from __future__ import annotations

from scheduler.policies.base import Batch, FreeBlocks, Policy, decode_first
from scheduler.queues import WorkerQueues


class VLLMV1Policy(Policy):
    name = "vllm-v1"

    def select(self, q: WorkerQueues, now: float) -> Batch:
        return decode_first(q, self.config, self.config.max_num_batched_tokens, FreeBlocks(q, whole=False))

    def describe(self) -> dict:
        return {"policy": self.name, "max_num_batched_tokens": self.config.max_num_batched_tokens,
                "max_num_seqs": self.config.max_num_seqs}
