"""BlockPool: the paged KV cache's bookkeeping, in pure Python.

A fixed pool of `num_blocks` blocks of `block_size` tokens. Each resident request owns a block
table (its blocks in position order); token position p of a request lives in slot
`table[p // block_size] * block_size + p % block_size`. The scheduler and the simulator account
KV with this class; a model actor's `kv.cache.KVCache` has exactly the same number of blocks.
"""
from __future__ import annotations

from dataclasses import dataclass


class BlockPoolError(RuntimeError):
    """A bookkeeping mistake by the caller (double allocation, over-commit, unknown request)."""


@dataclass
class _Entry:
    blocks: list[int]
    num_tokens: int  # tokens the blocks must hold (reserved capacity), <= len(blocks) * block_size


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int = 16) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: the most recently freed block is reused first (warm in caches).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._ref_counts = [0] * num_blocks
        self._entries: dict[str, _Entry] = {}

    # -- queries ---------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return self.num_used_blocks / self.num_blocks

    def extra_blocks(self, request_id: str, num_tokens: int) -> int:
        """New blocks `request_id` would need to hold num_tokens tokens in total."""
        entry = self._entries.get(request_id)
        need = -(-num_tokens // self.block_size) - (len(entry.blocks) if entry else 0)
        return need if need > 0 else 0

    def can_fit(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def has(self, request_id: str) -> bool:
        return request_id in self._entries

    def num_tokens(self, request_id: str) -> int:
        entry = self._entries.get(request_id)
        return entry.num_tokens if entry else 0

    def block_table(self, request_id: str) -> list[int]:
        return self._entries[request_id].blocks

    def slot_mapping(self, request_id: str, start: int, end: int) -> list[int]:
        """KV slots of token positions [start, end) of a request."""
        blocks, size = self._entries[request_id].blocks, self.block_size
        if end > len(blocks) * size:
            raise BlockPoolError(f"{request_id}: positions up to {end} exceed its {len(blocks)} blocks")
        return [blocks[p // size] * size + p % size for p in range(start, end)]

    # -- changes ---------------------------------------------------------------------------
    def reserve(self, request_id: str, num_tokens: int) -> int:
        """Grow a request's table so it holds num_tokens tokens; returns the blocks added."""
        entry = self._entries.get(request_id)
        if entry is None:
            entry = self._entries[request_id] = _Entry([], 0)
        needed = -(-num_tokens // self.block_size) - len(entry.blocks)
        if needed <= 0:  # the common decode step: room left in the last block
            if num_tokens > entry.num_tokens:
                entry.num_tokens = num_tokens
            return 0
        if needed > len(self._free):
            if not entry.blocks:
                del self._entries[request_id]
            raise BlockPoolError(
                f"{request_id}: needs {needed} more blocks, only {len(self._free)} free"
            )
        for _ in range(max(0, needed)):
            block = self._free.pop()
            self._ref_counts[block] += 1
            entry.blocks.append(block)
        entry.num_tokens = max(entry.num_tokens, num_tokens)
        return max(0, needed)

    def free(self, request_id: str) -> int:
        """Release all of a request's blocks (no-op if it holds none); returns blocks freed."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return 0
        for block in reversed(entry.blocks):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free.append(block)
        return len(entry.blocks)

    def used_tokens(self) -> int:
        """Tokens reserved by all resident requests (not block-rounded)."""
        return sum(e.num_tokens for e in self._entries.values())
