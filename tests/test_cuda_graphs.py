"""CUDA-graph decode steps: the bucket choice, padding and buffer filling on CPU (the static
batch run eagerly must equal the plain step, padding writing nothing), capture and replay on a
GPU where one is present; the model actor's start-up options (KV sizing, enforce_eager)."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first import of a Triton kernel module
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="the triton package is a test dependency")

from actors.model.batch import build_batch
from actors.model.cuda_graphs import DecodeBuffers, DecodeGraphRunner, bucket_for, capture_sizes
from actors.model.llama import LlamaModel
from actors.model.loader import load_model
from actors.model.triton_attention import TritonAttnBackend
from actors.model_actor import ModelActor
from kv.cache import KVCache, KVShape
from scheduler.plan import Plan, ScheduledChunk

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BS = 16


def test_buckets_follow_nano_vllm() -> None:
    sizes = capture_sizes(256)
    assert sizes[:6] == [1, 2, 4, 8, 16, 32] and sizes[-1] == 256 and len(sizes) == 20
    assert capture_sizes(5) == [1, 2, 4, 8]  # the largest batch always has a bucket
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 32]
    assert [bucket_for(n, sizes) for n in (1, 3, 8, 9, 17, 255, 256, 257)] == \
        [1, 4, 8, 16, 32, 256, 256, None]


def chunk(rid: str, tokens: list[int], start: int, table: list[int]) -> ScheduledChunk:
    slots = [table[p // BS] * BS + p % BS for p in range(start, start + len(tokens))]
    return ScheduledChunk(rid, tokens, start, len(tokens), table, slots, True,
                          is_prefill=len(tokens) > 1)


class Engine:
    """The tiny model with the Triton backend (the only one graphs capture) and its cache."""

    def __init__(self, model: LlamaModel) -> None:
        c = model.config
        self.model = model
        self.cache = KVCache(KVShape(c.num_layers, c.num_kv_heads, c.head_dim), 32, BS, DEV,
                             model.dtype, triton_store=True)
        self.backend = TritonAttnBackend(DEV)

    def step(self, chunks: list[ScheduledChunk]):
        batch = build_batch(Plan(0, 0, chunks, BS), DEV)
        return batch, self.backend.prepare(batch, self.cache)


@pytest.fixture(scope="module")
def engines() -> tuple[Engine, Engine]:
    loaded, _ = load_model("random:tiny", DEV, "float32")
    model = LlamaModel(loaded)
    pair = (Engine(model), Engine(model))
    prompts = {"a": (list(range(1, 30)), [3, 7]), "b": (list(range(40, 45)), [12]),
               "c": (list(range(50, 67)), [20, 21])}
    for e in pair:  # the same cached prefixes in both caches
        batch, meta = e.step([chunk(r, p, 0, t) for r, (p, t) in prompts.items()])
        model.forward(batch, e.cache, e.backend, meta)
    return pair


def test_padded_static_step_equals_the_eager_step(engines: tuple[Engine, Engine]) -> None:
    eager, graphed = engines
    decodes = [chunk("b", [9], 5, [12]), chunk("c", [8], 17, [20, 21]), chunk("a", [7], 29, [3, 7])]
    batch, meta = eager.step(decodes)
    want = eager.model.forward(batch, eager.cache, eager.backend, meta)

    batch, meta = graphed.step(decodes)
    runner = DecodeGraphRunner(graphed.model, graphed.cache, graphed.backend, max_batch=8,
                               max_blocks=8)
    bucket = bucket_for(batch.num_tokens, runner.sizes)
    assert bucket == 4
    runner.buffers.fill(batch, meta, bucket)
    static_batch, static_meta = runner.buffers.step(bucket, BS)
    # What replay computes: the bucket's forward over the buffers, padding row included.
    logits = graphed.model.forward(static_batch, graphed.cache, graphed.backend, static_meta)
    got = logits.index_select(0, batch.sample_rows)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    # The padding row wrote no KV: both caches hold exactly the same values.
    assert torch.equal(eager.cache.k, graphed.cache.k) and torch.equal(eager.cache.v, graphed.cache.v)


def test_buffers_pad_rows_after_a_larger_step(engines: tuple[Engine, Engine]) -> None:
    e = engines[0]
    buffers = DecodeBuffers.allocate(8, 4, DEV)
    seven = [chunk(f"r{i}", [100 + i], 20 + i, [i, 8 + i]) for i in range(7)]
    three = [chunk(f"r{i}", [200 + i], 5, [30 - i]) for i in range(3)]
    buffers.fill(*e.step(seven), 8)
    buffers.fill(*e.step(three), 4)
    assert buffers.input_ids[:4].tolist() == [200, 201, 202, 0]
    assert buffers.positions[:4].tolist() == [5, 5, 5, 0]
    assert buffers.slot_mapping[:4].tolist() == [30 * BS + 5, 29 * BS + 5, 28 * BS + 5, -1]
    assert buffers.seq_lens[:4].tolist() == [6, 6, 6, 1]  # rows past the bucket: unread
    assert buffers.block_table[:4, 0].tolist() == [30, 29, 28, 0]
    batch, meta = buffers.step(4, BS)
    assert batch.num_tokens == 4 and meta.cu_q.tolist() == [0, 1, 2, 3, 4] and meta.decode_only


def test_runner_runs_eagerly_without_graphs(engines: tuple[Engine, Engine]) -> None:
    e = engines[0]
    runner = DecodeGraphRunner(e.model, e.cache, e.backend, max_batch=4, max_blocks=8)
    assert DecodeGraphRunner.supported(e.backend, e.cache) == (DEV.type == "cuda")
    batch, meta = e.step([chunk("b", [1], 6, [12])])
    assert runner.bucket(batch) is None  # nothing captured: eager
    assert runner.run(batch, meta).shape == (1, e.model.config.vocab_size)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_graph_replay_equals_eager_on_gpu() -> None:
    kw = {"attention": "triton", "device": "cuda", "dtype": "float32", "max_num_seqs": 8,
          "gpu_memory_utilization": 0.2}
    graphed = ModelActor("random:tiny", **kw)
    eager = ModelActor("random:tiny", enforce_eager=True, **kw)
    assert graphed.graphs is not None and eager.graphs is None
    prompt = [chunk("a", list(range(1, 20)), 0, [0, 1]), chunk("b", list(range(5, 9)), 0, [2])]
    decode = [chunk("a", [3], 19, [0, 1]), chunk("b", [4], 4, [2])]
    for actor in (graphed, eager):
        actor.out = [actor.execute(Plan(0, i, plan, BS)).tokens for i, plan in
                     enumerate([prompt, decode, decode])]
    assert [[t.token_id for t in s] for s in graphed.out] == \
        [[t.token_id for t in s] for s in eager.out]


def test_actor_on_cpu_sizes_kv_in_tokens_and_never_captures() -> None:
    actor = ModelActor("random:tiny", device="cpu", kv_cache_tokens=40 * BS, num_threads=1)
    assert actor.graphs is None and actor.cache.num_blocks == 40
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ModelActor("random:tiny", device="cpu", kv_cache_tokens=4 * BS, num_threads=1,
                   kv_cache_memory_fraction=0.8)
    assert any(issubclass(w.category, DeprecationWarning)
               and "gpu_memory_utilization" in str(w.message) for w in caught)
