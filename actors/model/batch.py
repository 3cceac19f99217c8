"""StepBatch: one plan turned into the flat tensors of one forward pass.

The plan's chunks are reordered internally: multi-token chunks (prefills) first, then
single-token chunks (decodes, and 1-token prefill tails, which are the same computation) sorted
by context length. Decodes then form contiguous row ranges that the attention backend can batch
into a few calls; `sample_chunks` maps sampled rows back to plan order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scheduler.plan import Plan, ScheduledChunk


@dataclass
class SeqSpan:
    """One chunk in the flattened batch: its rows, where its new tokens sit, its blocks."""

    row_start: int
    num_tokens: int
    start_pos: int
    block_table: list[int]

    @property
    def context_len(self) -> int:
        return self.start_pos + self.num_tokens


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    slot_mapping: torch.Tensor  # [T] long
    prefills: list[SeqSpan]  # multi-token chunks, rows 0 .. num_prefill_rows - 1
    decodes: list[SeqSpan]  # single-token chunks, ascending context length, rows after those
    sample_rows: torch.Tensor  # [S] rows whose logits are computed
    sample_chunks: list[int]  # plan chunk index of each sampled row
    block_size: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_prefill_rows(self) -> int:
        return sum(s.num_tokens for s in self.prefills)


def build_batch(plan: Plan, device: torch.device) -> StepBatch:
    """Flatten a validated plan into input tensors on `device`."""
    chunks = plan.chunks
    multi = [i for i, c in enumerate(chunks) if c.num_tokens > 1]
    single = sorted((i for i, c in enumerate(chunks) if c.num_tokens == 1),
                    key=lambda i: chunks[i].context_len)
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    prefills: list[SeqSpan] = []
    decodes: list[SeqSpan] = []
    sample_rows: list[int] = []
    sample_chunks: list[int] = []
    for i in multi + single:
        c: ScheduledChunk = chunks[i]
        span = SeqSpan(len(ids), c.num_tokens, c.start_pos, c.block_table)
        (prefills if c.num_tokens > 1 else decodes).append(span)
        ids.extend(c.token_ids)
        pos.extend(range(c.start_pos, c.start_pos + c.num_tokens))
        slots.extend(c.slot_mapping)
        if c.sample:
            sample_rows.append(len(ids) - 1)
            sample_chunks.append(i)
    # Sampled rows in plan order: the results list must follow the plan.
    order = sorted(range(len(sample_chunks)), key=lambda k: sample_chunks[k])
    sample_rows = [sample_rows[k] for k in order]
    sample_chunks = [sample_chunks[k] for k in order]

    def t(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return StepBatch(t(ids), t(pos), t(slots), prefills, decodes, t(sample_rows), sample_chunks,
                     plan.block_size)


def padded_block_table(spans: list[SeqSpan], device: torch.device) -> torch.Tensor:
    """`[len(spans), max_blocks]` int32 block tables (flash-attn's paged-KV argument)."""
    width = max(len(s.block_table) for s in spans)
    table = torch.zeros(len(spans), width, dtype=torch.int32)
    for r, s in enumerate(spans):
        table[r, : len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int32)
    return table.to(device)
