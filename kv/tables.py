"""BlockTables: a model actor's copy of its resident requests' block tables, and who owns what.

The scheduler's `kv.blocks.BlockPool` decides which blocks a request gets; diff plans tell the
actor only the changes (a new request's blocks, blocks appended). This class keeps the result
per slot (the row the scheduler assigned the request) and, per block, the slot that owns it.
Every change is checked before anything is applied: a block is handed out only if it lies in the
cache and nobody else holds it, so a request's table only ever holds its own blocks, and KV is
written only at slots computed from that table (`slot_mapping`): a plan can never write another
request's KV. Checks are numpy operations on the changed blocks, not loops over tokens.

numpy only (no torch): the simulated model actor validates plans with the very same code.
"""
from __future__ import annotations

import numpy as np


class PlanError(ValueError):
    """A plan that cannot be executed as given (blocks outside the cache, inconsistent slots)."""


class BlockTables:
    def __init__(self, num_blocks: int, block_size: int, max_blocks_per_seq: int,
                 capacity: int = 64) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.width = max_blocks_per_seq
        self.owner = np.full(num_blocks, -1, dtype=np.int32)  # slot holding each block, -1: free
        self.tables = np.zeros((capacity, max_blocks_per_seq), dtype=np.int32)
        self.lengths = np.zeros(capacity, dtype=np.int32)  # blocks held per slot

    @property
    def capacity(self) -> int:
        return len(self.lengths)

    def ensure_capacity(self, slots: int) -> None:
        """Room for slot ids below `slots` (grows by doubling; rows of new slots are empty)."""
        if slots <= self.capacity:
            return
        size = max(slots, 2 * self.capacity)
        tables = np.zeros((size, self.width), dtype=np.int32)
        tables[: self.capacity] = self.tables
        lengths = np.zeros(size, dtype=np.int32)
        lengths[: self.capacity] = self.lengths
        self.tables, self.lengths = tables, lengths

    # -- checks (nothing changes) --------------------------------------------------------------
    def check_handout(self, blocks: np.ndarray, freed: np.ndarray, where: str) -> None:
        """Raise PlanError unless `blocks` are distinct, inside the cache, and free once the
        slots in `freed` have released theirs."""
        if not len(blocks):
            return
        if blocks.min() < 0 or blocks.max() >= self.num_blocks:
            bad = blocks[(blocks < 0) | (blocks >= self.num_blocks)]
            raise PlanError(f"{where}: block ids {bad[:4].tolist()} outside the cache's "
                            f"{self.num_blocks} blocks")
        if len(np.unique(blocks)) != len(blocks):
            raise PlanError(f"{where}: a block is handed out twice")
        holders = self.owner[blocks]
        taken = (holders >= 0) & ~np.isin(holders, freed)
        if taken.any():
            raise PlanError(f"{where}: block {int(blocks[taken][0])} belongs to another request "
                            f"(slot {int(holders[taken][0])})")

    @staticmethod
    def check_runs(slots: np.ndarray, where: str) -> None:
        """Appended blocks of one slot must be contiguous (their order is their position)."""
        if len(slots) > 1:
            runs = 1 + int((slots[1:] != slots[:-1]).sum())
            if runs != len(np.unique(slots)):
                raise PlanError(f"{where}: the appended blocks of a request are not contiguous")

    def check_fits(self, lengths: np.ndarray, where: str) -> None:
        if len(lengths) and lengths.max() > self.width:
            raise PlanError(f"{where}: {int(lengths.max())} blocks exceed the "
                            f"{self.width} a sequence may hold")

    # -- changes (after the checks) ------------------------------------------------------------
    def release(self, slots: np.ndarray) -> None:
        for slot in slots.tolist():
            n = self.lengths[slot]
            if n:
                self.owner[self.tables[slot, :n]] = -1
                self.lengths[slot] = 0

    def assign(self, slot: int, blocks: np.ndarray) -> None:
        """A new request's whole table."""
        self.tables[slot, : len(blocks)] = blocks
        self.lengths[slot] = len(blocks)
        self.owner[blocks] = slot

    def append(self, slots: np.ndarray, blocks: np.ndarray) -> None:
        """Blocks appended in order; the blocks of one slot are contiguous in `slots`."""
        if not len(slots):
            return
        columns = self.lengths[slots] + (np.arange(len(slots)) - first_of_run(slots))
        self.tables[slots, columns] = blocks
        np.add.at(self.lengths, slots, 1)
        self.owner[blocks] = slots

    def clear(self) -> None:
        self.owner.fill(-1)
        self.lengths.fill(0)

    # -- reads -----------------------------------------------------------------------------------
    def slot_mapping(self, row_slots: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """KV slot of each token: its request's block at position // block_size (callers have
        checked that every position lies inside its request's blocks)."""
        bs = self.block_size
        return self.tables[row_slots, positions // bs].astype(np.int64) * bs + positions % bs

    def rows(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tables `[len(slots), max blocks]`, blocks per row) of these slots."""
        lengths = self.lengths[slots]
        width = int(lengths.max()) if len(lengths) else 0
        return self.tables[slots, :width], lengths


def first_of_run(values: np.ndarray) -> np.ndarray:
    """For each entry, the index of the first entry with the same value (runs contiguous)."""
    starts = np.r_[True, values[1:] != values[:-1]]
    return np.maximum.accumulate(np.where(starts, np.arange(len(values)), 0))
