"""BlockPool: no block is handed out twice, usage is block-exact, freed blocks are reusable."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kv.blocks import BlockPool, BlockPoolError

# An operation on one of a few request ids: grow it to n tokens, or free it.
_ops = st.lists(
    st.tuples(st.sampled_from(["grow", "free"]), st.integers(0, 5), st.integers(1, 200)),
    max_size=60,
)


def _check_invariants(pool: BlockPool, tokens: dict[str, int]) -> None:
    held = [b for rid in tokens for b in pool.block_table(rid)]
    assert len(held) == len(set(held)), "a block is held by two requests (or twice by one)"
    assert all(0 <= b < pool.num_blocks for b in held)
    assert set(held).isdisjoint(pool._free), "a held block is also on the free list"
    assert pool.num_used_blocks == len(held)
    assert pool.num_used_blocks == sum(pool.blocks_for(n) for n in tokens.values())
    assert pool.num_used_blocks + pool.num_free_blocks == pool.num_blocks
    assert pool.used_tokens() == sum(tokens.values())


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(1, 40), block_size=st.sampled_from([1, 4, 16]), ops=_ops)
def test_pool_never_double_allocates_and_counts_exactly(num_blocks, block_size, ops):
    pool = BlockPool(num_blocks, block_size)
    tokens: dict[str, int] = {}
    for op, rid_i, n in ops:
        rid = f"r{rid_i}"
        if op == "free":
            pool.free(rid)
            tokens.pop(rid, None)
        else:
            target = max(n, tokens.get(rid, 0))  # tables only grow
            extra = pool.extra_blocks(rid, target)
            if pool.can_fit(extra):
                assert pool.reserve(rid, target) == extra
                tokens[rid] = target
            else:
                before = pool.num_free_blocks
                with pytest.raises(BlockPoolError):
                    pool.reserve(rid, target)
                assert pool.num_free_blocks == before, "a failed reserve leaked blocks"
        _check_invariants(pool, tokens)


def test_append_takes_a_new_block_only_at_a_boundary():
    pool = BlockPool(8, block_size=4)
    assert pool.reserve("a", 3) == 1
    assert pool.reserve("a", 4) == 0  # fills the first block
    assert pool.reserve("a", 5) == 1  # crosses the boundary
    assert pool.num_used_blocks == 2


def test_freed_blocks_are_reusable_at_once():
    pool = BlockPool(4, block_size=16)
    pool.reserve("a", 64)  # the whole pool
    assert not pool.can_fit(1)
    with pytest.raises(BlockPoolError):
        pool.reserve("b", 1)
    assert pool.free("a") == 4
    assert pool.num_free_blocks == 4
    assert pool.reserve("b", 64) == 4
    assert sorted(pool.block_table("b")) == [0, 1, 2, 3]


def test_slot_mapping_follows_the_block_table():
    pool = BlockPool(8, block_size=4)
    pool.reserve("x", 1)
    pool.reserve("y", 1)
    pool.reserve("x", 6)
    table = pool.block_table("x")
    assert pool.slot_mapping("x", 0, 6) == [table[p // 4] * 4 + p % 4 for p in range(6)]
    with pytest.raises(BlockPoolError):
        pool.slot_mapping("x", 0, 9)  # beyond its two blocks


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError):
        BlockPool(0)
    with pytest.raises(ValueError):
        BlockPool(4, block_size=0)
