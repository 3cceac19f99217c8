"""KVCache: sizing, paged write/gather, and plan validation (nothing written outside)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kv.blocks import BlockPool
from kv.cache import KVCache, KVShape, PlanError
from scheduler.plan import Plan, ScheduledChunk

SHAPE = KVShape(num_layers=2, num_kv_heads=2, head_dim=4)
CPU = torch.device("cpu")


def cache(num_blocks: int = 8, block_size: int = 4) -> KVCache:
    return KVCache(SHAPE, num_blocks, block_size, CPU, torch.float32)


def chunk(rid: str, start: int, n: int, table: list[int], bs: int = 4,
          slots: list[int] | None = None) -> ScheduledChunk:
    if slots is None:
        slots = [table[p // bs] * bs + p % bs for p in range(start, start + n)]
    return ScheduledChunk(rid, [1] * n, start, n, table, slots, True)


def test_cpu_budget_sets_num_blocks_and_matches_block_pool() -> None:
    kv = KVCache.from_budget(SHAPE, 16, CPU, torch.float32, cpu_tokens=1000)
    assert kv.num_blocks == 62 and kv.capacity_tokens == 62 * 16
    assert BlockPool(kv.num_blocks, kv.block_size).capacity_tokens == kv.capacity_tokens
    assert kv.k.shape == (2, 62, 16, 2, 4)
    assert SHAPE.bytes_per_block(16, torch.float16) == 2 * 2 * 16 * 2 * 4 * 2


def test_write_then_gather_round_trips() -> None:
    kv = cache()
    slots = torch.tensor([5, 17, 30])
    k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    kv.write(1, k, v, slots)
    gk, gv = kv.gather(1, slots.view(1, 3))
    assert torch.equal(gk[0], k) and torch.equal(gv[0], v)
    assert kv.k[0].abs().sum() == 0  # other layers untouched
    pk, _ = kv.paged(1)
    assert torch.equal(pk[17 // 4, 17 % 4], k[1])


@pytest.mark.parametrize("bad, message", [
    (chunk("a", 0, 3, [8]), "outside the cache"),
    (chunk("a", 0, 3, [-1]), "outside the cache"),
    (chunk("a", 0, 6, [1], slots=[4, 5, 6, 7, 8, 9]), "cannot hold"),
    (chunk("a", 0, 2, [1], slots=[4, 9]), "not in its block table"),
    (chunk("a", 2, 2, [1, 2], slots=[4, 5]), "not in its block table"),
    (chunk("a", 0, 5, [3, 3]), "repeats a block"),
    (ScheduledChunk("a", [1, 2], 0, 3, [1], [4, 5, 6], True), "must agree"),
    (chunk("a", -1, 1, [1]), "negative start_pos"),
])
def test_invalid_chunks_raise_plan_error(bad: ScheduledChunk, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        cache().validate(Plan(0, 0, [bad], 4))


def test_plan_level_checks() -> None:
    kv = cache()
    with pytest.raises(PlanError, match="block_size"):
        kv.validate(Plan(0, 0, [chunk("a", 0, 1, [0])], 16))
    with pytest.raises(PlanError, match="twice"):
        kv.validate(Plan(0, 0, [chunk("a", 0, 1, [0]), chunk("a", 1, 1, [0])], 4))
    with pytest.raises(PlanError, match="another request"):
        kv.validate(Plan(0, 0, [chunk("a", 0, 2, [0]), chunk("b", 1, 1, [0])], 4))
    kv.validate(Plan(0, 0, [chunk("a", 0, 4, [2]), chunk("b", 5, 2, [6, 7])], 4))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(0, 6)), min_size=1, max_size=5),
       st.randoms(use_true_random=False))
def test_block_pool_plans_validate_and_write_only_their_slots(reqs, rnd) -> None:
    kv = cache(num_blocks=40)
    pool = BlockPool(40, 4)
    # Fragment the free list so tables are non-contiguous.
    for i in range(10):
        pool.reserve(f"junk{i}", 4)
    for i in range(0, 10, 2):
        pool.free(f"junk{i}")
    chunks = []
    for i, (total, done_back) in enumerate(reqs):
        start = max(0, total - 1 - done_back)
        pool.reserve(f"r{i}", total)
        chunks.append(ScheduledChunk(f"r{i}", [1] * (total - start), start, total - start,
                                     pool.block_table(f"r{i}"),
                                     pool.slot_mapping(f"r{i}", start, total), True))
    rnd.shuffle(chunks)
    kv.validate(Plan(0, 0, chunks, 4))
    slots = torch.tensor([s for c in chunks for s in c.slot_mapping])
    kv.write(0, torch.ones(len(slots), 2, 4), torch.ones(len(slots), 2, 4), slots)
    written = kv.k[0].reshape(-1, 2, 4).abs().sum(dim=(1, 2)).nonzero().flatten()
    assert sorted(written.tolist()) == sorted(slots.tolist())


GIB = 1024**3


def test_gpu_budget_is_a_fraction_of_total_memory_like_vllm() -> None:
    from kv.memory import KVBudget, MemorySnapshot, kv_cache_bytes

    # 80 GiB card, 0.9: 72 GiB for this actor; 14 GiB weights + peak step, 1 GiB outside torch.
    assert kv_cache_bytes(80 * GIB, 0.9, 14 * GIB, 1 * GIB, free=64 * GIB) == 57 * GIB
    # Another process holds memory: never more than is free.
    assert kv_cache_bytes(80 * GIB, 0.9, 14 * GIB, 1 * GIB, free=30 * GIB) == 30 * GIB
    assert kv_cache_bytes(80 * GIB, 0.1, 14 * GIB, 0, free=60 * GIB) == 0
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        kv_cache_bytes(80 * GIB, 1.5, 0, 0, free=80 * GIB)
    # Only what this actor added outside torch since the first snapshot counts.
    before = MemorySnapshot(total=80 * GIB, free=79 * GIB, torch_reserved=0)  # 1 GiB: others
    after = MemorySnapshot(total=80 * GIB, free=63 * GIB, torch_reserved=15 * GIB)
    budget = KVBudget.measure(before, after, torch_peak=14 * GIB, utilization=0.9)
    assert budget.non_torch == 1 * GIB and budget.kv_bytes == 57 * GIB
    assert "KV cache 57.00 GiB" in budget.describe()


def test_peak_step_plan_fills_the_token_budget() -> None:
    from actors.model.profiling import peak_step_plan

    plan = peak_step_plan(max_tokens=4096, max_seqs=256, block_size=16, max_model_len=4096)
    assert len(plan.chunks) == 256 and plan.num_new_tokens == 4096
    assert all(c.sample and c.start_pos == 0 and c.block_table == [0] for c in plan.chunks)
    long = peak_step_plan(max_tokens=10_000, max_seqs=1, block_size=16, max_model_len=4096)
    assert [c.num_tokens for c in long.chunks] == [3334, 3333, 3333]  # no chunk past the model
    c = long.chunks[0]
    assert c.slot_mapping == list(range(3334)) and len(c.block_table) == 209


def test_peak_step_runs_on_a_scratch_cache() -> None:
    from actors.model.attention import SdpaBackend
    from actors.model.llama import LlamaModel
    from actors.model.loader import load_model
    from actors.model.profiling import peak_step_plan, run_peak_step

    loaded, _ = load_model("random:tiny", "cpu", "float32")
    model = LlamaModel(loaded)
    plan = peak_step_plan(max_tokens=64, max_seqs=4, block_size=16, max_model_len=2048)
    scratch = run_peak_step(model, SdpaBackend(), plan)
    c = model.config
    assert scratch == KVShape(c.num_layers, c.num_kv_heads, c.head_dim).bytes_per_block(
        16, torch.float32)  # 4 sequences of 16 tokens share one block
