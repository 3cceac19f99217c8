"""StepBatch: one step's rows turned into the flat tensors of one forward pass.

Rows come from a diff plan applied to the actor's state (`actors.request_state.StepRows`) or
from a self-contained `Plan` (`rows_from_plan`). They are reordered internally: multi-token rows
(prefills) first, then single-token rows (decodes, and 1-token prefill tails, which are the same
computation) sorted by context length. Decodes then form contiguous row ranges that an attention
backend can batch into a few calls; `sample_chunks` maps sampled rows back to plan order.

All metadata (input ids, positions, KV slots, sampled rows, block tables, sequence lengths,
query start offsets) is built with numpy into one host buffer and moved in one copy: pinned and
non-blocking on CUDA, a zero-copy view on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from actors.request_state import StepRows
from scheduler.plan import Plan

_I64 = np.int64


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
    # The same sequences as tensors, in batch order (prefills, then decodes):
    block_tables: torch.Tensor | None = None  # [N, max blocks] int32, zero padded
    seq_lens: torch.Tensor | None = None  # [N] int32 context lengths
    query_start_loc: torch.Tensor | None = None  # [N + 1] int32 row offsets

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_prefill_rows(self) -> int:
        return sum(s.num_tokens for s in self.prefills)


def rows_from_plan(plan: Plan) -> StepRows:
    """The rows of a self-contained plan (validated by `KVCache.validate`)."""
    chunks = plan.chunks
    n = np.array([c.num_tokens for c in chunks], dtype=_I64)
    start = np.array([c.start_pos for c in chunks], dtype=_I64)
    width = max((len(c.block_table) for c in chunks), default=0)
    tables = np.zeros((len(chunks), width), dtype=np.int32)
    for i, c in enumerate(chunks):
        tables[i, : len(c.block_table)] = c.block_table
    ids = [t for c in chunks for t in c.token_ids]
    slots = [s for c in chunks for s in c.slot_mapping]
    positions = np.arange(int(n.sum()), dtype=_I64) + np.repeat(start - (np.cumsum(n) - n), n)
    return StepRows(
        slots=np.arange(len(chunks), dtype=_I64), num_tokens=n, start_pos=start,
        sample=np.array([c.sample for c in chunks], dtype=bool),
        request_ids=[c.request_id for c in chunks], sampling=[c.sampling for c in chunks],
        input_ids=np.array(ids, dtype=_I64), positions=positions,
        slot_mapping=np.array(slots, dtype=_I64), tables=tables,
        table_lens=np.array([len(c.block_table) for c in chunks], dtype=np.int32),
    )


class HostStaging:
    """A reusable host buffer for one step's metadata (pinned when the device is CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._buffer: torch.Tensor | None = None

    def take(self, nbytes: int) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() < nbytes:
            size = max(nbytes, 2 * (0 if self._buffer is None else self._buffer.numel()), 1 << 16)
            self._buffer = torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)
        return self._buffer[:nbytes]


def build_batch(plan: Plan | StepRows, device: torch.device, block_size: int | None = None,
                staging: HostStaging | None = None) -> StepBatch:
    """Flatten validated rows (or a validated self-contained plan) into tensors on `device`."""
    if isinstance(plan, Plan):
        rows, block_size = rows_from_plan(plan), plan.block_size
    else:
        rows = plan
    n = rows.num_tokens
    context = rows.start_pos + n
    multi = np.flatnonzero(n > 1)
    single = np.flatnonzero(n == 1)
    single = single[np.argsort(context[single], kind="stable")]
    order = np.concatenate([multi, single])
    n_o = n[order]
    new_offsets = np.cumsum(n_o) - n_o
    gather = np.arange(int(n.sum()), dtype=_I64) + np.repeat((np.cumsum(n) - n)[order] - new_offsets, n_o)
    sampled = rows.sample[order]
    sample_rows = (new_offsets + n_o - 1)[sampled]
    sample_chunks = order[sampled]
    back = np.argsort(sample_chunks, kind="stable")  # results follow the plan's order
    sample_rows, sample_chunks = sample_rows[back], sample_chunks[back]
    tables = rows.tables[order]
    longs = [rows.input_ids[gather], rows.positions[gather], rows.slot_mapping[gather], sample_rows]
    ints = [tables.ravel(), context[order], np.r_[0, np.cumsum(n_o)]]
    out = _to_device(longs, ints, device, staging)
    ids, positions, slot_mapping, sample_t, tables_t, seq_lens, query_start = out
    lens = rows.table_lens[order].tolist()
    starts, rows_at = rows.start_pos[order].tolist(), new_offsets.tolist()
    spans = [SeqSpan(r, k, s, tables[i, : lens[i]].tolist())
             for i, (r, k, s) in enumerate(zip(rows_at, n_o.tolist(), starts))]
    num_multi = len(multi)
    return StepBatch(ids, positions, slot_mapping, spans[:num_multi], spans[num_multi:], sample_t,
                     sample_chunks.tolist(), block_size or 0,
                     block_tables=tables_t.view(len(order), tables.shape[1]), seq_lens=seq_lens,
                     query_start_loc=query_start)


def _to_device(longs: list[np.ndarray], ints: list[np.ndarray], device: torch.device,
               staging: HostStaging | None) -> list[torch.Tensor]:
    """Pack int64 then int32 arrays into one byte buffer, move it once, return typed views."""
    sizes = [a.size * 8 for a in longs] + [a.size * 4 for a in ints]
    total = sum(sizes)
    host = staging.take(total) if staging is not None else torch.empty(total, dtype=torch.uint8)
    raw = host.numpy()
    at = 0
    for a, nbytes, dtype in zip(longs + ints, sizes, [_I64] * len(longs) + [np.int32] * len(ints)):
        raw[at : at + nbytes].view(dtype)[:] = a
        at += nbytes
    moved = host if device.type == "cpu" else host.to(device, non_blocking=True)
    out, at = [], 0
    for nbytes, dtype in zip(sizes, [torch.int64] * len(longs) + [torch.int32] * len(ints)):
        out.append(moved[at : at + nbytes].view(dtype))
        at += nbytes
    return out


def padded_block_table(spans: list[SeqSpan], device: torch.device) -> torch.Tensor:
    """`[len(spans), max_blocks]` int32 block tables (flash-attn's paged-KV argument)."""
    width = max(len(s.block_table) for s in spans)
    table = torch.zeros(len(spans), width, dtype=torch.int32)
    for r, s in enumerate(spans):
        table[r, : len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int32)
    return table.to(device)
