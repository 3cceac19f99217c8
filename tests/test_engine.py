"""The paged engine against transformers' own forward on the same weights (CPU, fp32)."""
from __future__ import annotations

import random

import pytest
import torch

from actors.model import cpu_kernels
from actors.model.attention import SdpaBackend, flash_attn_available, make_backend
from actors.model.batch import build_batch
from actors.model.llama import LlamaModel
from actors.model.loader import load_model
from actors.model_actor import ModelActor, actor_name
from kv.blocks import BlockPool
from kv.cache import KVCache, KVShape, PlanError
from scheduler.plan import Plan, ScheduledChunk
from scheduler.request import SamplingParams

TOL = 1e-4
BS = 16


class Harness:
    """Our model + a paged cache + transformers' LlamaForCausalLM on the same weights."""

    def __init__(self, model: str, num_blocks: int = 96, device: str = "cpu",
                 dtype: str = "float32", backend: str = "sdpa") -> None:
        from transformers import LlamaForCausalLM

        loaded, self.tokenizer = load_model(model, device, dtype)
        # CPU: the reference runs in fp32 on the same (possibly bf16-rounded) weights.
        ref_dtype = torch.float32 if loaded.device.type == "cpu" else loaded.dtype
        self.hf = LlamaForCausalLM(loaded.hf_config).to(loaded.device, ref_dtype).eval()
        self.hf.load_state_dict(loaded.weights, strict=False)  # tied heads: lm_head absent
        self.model = LlamaModel(loaded)
        c = self.model.config
        self.cache = KVCache(KVShape(c.num_layers, c.num_kv_heads, c.head_dim), num_blocks, BS,
                             loaded.device, loaded.dtype)
        self.backend = make_backend(backend, loaded.device, BS)
        self.vocab = c.vocab_size

    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        plan = Plan(0, 0, chunks, BS)
        self.cache.validate(plan)
        batch = build_batch(plan, self.cache.k.device)
        return self.model.forward(batch, self.cache, self.backend,
                                  self.backend.prepare(batch, self.cache))

    @torch.no_grad()
    def reference(self, tokens: list[int]) -> torch.Tensor:
        """transformers' logits at every position of `tokens`, fp32."""
        ids = torch.tensor([tokens], device=self.cache.k.device)
        return self.hf(ids).logits[0].float()


def chunk(rid: str, tokens: list[int], start: int, table: list[int], sample: bool = True,
          **kw) -> ScheduledChunk:
    slots = [table[p // BS] * BS + p % BS for p in range(start, start + len(tokens))]
    return ScheduledChunk(rid, list(tokens), start, len(tokens), table, slots, sample,
                          is_prefill=kw.pop("is_prefill", True), **kw)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def prompt(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core box an OpenMP team
    waiting for a descheduled thread turns microseconds into milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> Harness:
    return Harness("random:tiny")


def shuffled_tables(lengths: list[int], num_blocks: int, seed: int = 0) -> list[list[int]]:
    """Disjoint, non-contiguous, shuffled block tables holding `lengths` tokens each."""
    ids = list(range(num_blocks))
    random.Random(seed).shuffle(ids)
    tables = []
    for n in lengths:
        k = -(-n // BS)
        tables.append(ids[:k])
        ids = ids[k:]
    return tables


def test_single_prompt_matches_transformers(tiny: Harness) -> None:
    tokens = prompt(tiny.vocab, 40, seed=1)
    logits = tiny.run([chunk("a", tokens, 0, [0, 1, 2])])
    assert rel_err(logits[0], tiny.reference(tokens)[-1]) < TOL


def test_mixed_batch_with_shuffled_tables(tiny: Harness) -> None:
    lengths = [1, 5, 16, 17, 63, 100]
    tables = shuffled_tables(lengths, 96, seed=3)
    prompts = [prompt(tiny.vocab, n, seed=10 + i) for i, n in enumerate(lengths)]
    logits = tiny.run([chunk(str(i), p, 0, t) for i, (p, t) in enumerate(zip(prompts, tables))])
    for i, p in enumerate(prompts):
        assert rel_err(logits[i], tiny.reference(p)[-1]) < TOL, f"prompt of {len(p)}"


def test_chunked_prefill_across_iterations(tiny: Harness) -> None:
    tokens = prompt(tiny.vocab, 90, seed=4)
    other = prompt(tiny.vocab, 30, seed=5)
    table, other_table = shuffled_tables([90, 30], 96, seed=7)
    ref, other_ref = tiny.reference(tokens), tiny.reference(other)
    start = 0
    for i, size in enumerate([16, 7, 1, 30, 36]):
        chunks = [chunk("a", tokens[start : start + size], start, table)]
        if i == 0:  # a second request's whole prefill in the same step
            chunks.append(chunk("b", other, 0, other_table))
        logits = tiny.run(chunks)
        assert rel_err(logits[0], ref[start + size - 1]) < TOL, f"chunk {i}"
        if i == 0:
            assert rel_err(logits[1], other_ref[-1]) < TOL
        start += size


def test_hundred_decode_steps_with_mixed_lengths(tiny: Harness) -> None:
    lengths = [3, 20, 47]
    tables = shuffled_tables([n + 100 for n in lengths], 96, seed=11)
    seqs = [prompt(tiny.vocab, n, seed=20 + i) for i, n in enumerate(lengths)]
    logits = tiny.run([chunk(str(i), s, 0, t) for i, (s, t) in enumerate(zip(seqs, tables))])
    for step in range(100):
        for i, s in enumerate(seqs):
            s.append(int(logits[i].argmax()))
        chunks = [chunk(str(i), s[-1:], len(s) - 1, t, is_prefill=False)
                  for i, (s, t) in enumerate(zip(seqs, tables))]
        random.Random(step).shuffle(chunks)  # plan order is arbitrary; results follow it
        logits = tiny.run(chunks)
        by_id = {c.request_id: logits[j] for j, c in enumerate(chunks)}
        if step % 9 == 0 or step == 99:  # the reference costs a full forward each time
            for i, s in enumerate(seqs):
                assert rel_err(by_id[str(i)], tiny.reference(s)[-1]) < TOL, f"step {step}"
        logits = torch.stack([by_id[str(i)] for i in range(len(seqs))])


@pytest.mark.parametrize("paged_kernel", [False, True], ids=["torch-groups", "c-kernel"])
def test_decode_grouping_covers_every_length(paged_kernel: bool) -> None:
    """Widely spread contexts split into several padded groups (torch path) or go through the
    C paged-decode kernel in one call; none is lost or reordered."""
    if paged_kernel and not cpu_kernels.available():
        pytest.skip("the C decode kernel did not build here (no C compiler?)")
    h = Harness("random:tiny", num_blocks=200)
    h.backend = SdpaBackend(max_group_padding=0.0, paged_kernel=paged_kernel)
    lengths = [2, 15, 16, 17, 33, 80, 81, 200, 513]
    tables = shuffled_tables(lengths, 200, seed=5)
    seqs = [prompt(h.vocab, n, seed=40 + i) for i, n in enumerate(lengths)]
    h.run([chunk(str(i), s[:-1], 0, t, sample=False) for i, (s, t) in enumerate(zip(seqs, tables))])
    logits = h.run([chunk(str(i), s[-1:], len(s) - 1, t, is_prefill=False)
                    for i, (s, t) in enumerate(zip(seqs, tables))])
    for i, s in enumerate(seqs):
        assert rel_err(logits[i], h.reference(s)[-1]) < TOL, f"context {len(s)}"


def test_llama3_rope_and_untied_head_match_transformers() -> None:
    h = Harness("random:tiny-llama3", num_blocks=40)
    tokens = prompt(h.vocab, 400, seed=6)  # past original_max_position_embeddings (256)
    table = shuffled_tables([400], 40, seed=2)[0]
    logits = h.run([chunk("a", tokens[:300], 0, table)])
    ref = h.reference(tokens)
    assert rel_err(logits[0], ref[299]) < TOL
    logits = h.run([chunk("a", tokens[300:], 300, table)])
    assert rel_err(logits[0], ref[-1]) < TOL


def test_bad_block_table_raises_and_writes_nothing(tiny: Harness) -> None:
    before = tiny.cache.k.clone()
    tokens = prompt(tiny.vocab, 20, seed=8)
    good = chunk("ok", tokens, 0, [5, 6])
    bad = chunk("bad", tokens, 0, [7, 96])  # block 96 is past the 96-block cache
    with pytest.raises(PlanError, match="outside the cache"):
        tiny.run([good, bad])
    assert torch.equal(before, tiny.cache.k)


@pytest.fixture(scope="module")
def actor():
    actor = ModelActor("random:tiny", kv_cache_tokens=64 * BS, num_threads=1)
    yield actor


def test_actor_capacity_health_and_name(actor: ModelActor) -> None:
    cap = actor.capacity()
    assert cap["num_blocks"] == 64 and cap["block_size"] == BS
    assert cap["vocab_size"] == 49152 and cap["eos_token_ids"] == [2]
    assert actor.health()["ok"] is True
    assert actor_name(3, "app-x1") == "fluidserve-app-x1-model-3"
    assert actor.execute(Plan(0, 0, [], BS)).tokens == []


def test_actor_rejects_tokens_outside_vocab(actor: ModelActor) -> None:
    with pytest.raises(PlanError, match="vocabulary"):
        actor.execute(Plan(0, 1, [chunk("a", [1, 10**6], 0, [0])], BS))


def test_actor_results_follow_plan_order_and_skip_unsampled(actor: ModelActor) -> None:
    pool = BlockPool(64, BS)
    chunks = []
    for i, n in enumerate([30, 1, 12]):
        rid = f"r{i}"
        pool.reserve(rid, n)
        chunks.append(ScheduledChunk(rid, prompt(49152, n, i), 0, n, pool.block_table(rid),
                                     pool.slot_mapping(rid, 0, n), sample=i != 2))
    result = actor.execute(Plan(0, 7, chunks, BS))
    assert [t.request_id for t in result.tokens] == ["r0", "r1"]
    assert result.iteration == 7 and result.step_time_s > 0


@pytest.mark.slow
def test_greedy_default_model_equals_transformers_generate() -> None:
    from transformers import LlamaForCausalLM

    actor = ModelActor("default", kv_cache_tokens=64 * BS, num_threads=1, dtype="float32")
    tok = actor.tokenizer
    loaded, _ = load_model("default", "cpu", "float32")
    hf = LlamaForCausalLM(loaded.hf_config).eval()
    hf.load_state_dict(loaded.weights, strict=False)
    questions = ["What is the capital of France?", "Write a haiku about the sea.",
                 "List three prime numbers."]
    pool = BlockPool(64, BS)
    for q_i, question in enumerate(questions):
        ids = tok.apply_chat_template([{"role": "user", "content": question}],
                                      add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        expected = out[0, len(ids):].tolist()
        rid = f"q{q_i}"
        seq, got = list(ids), []
        while len(got) < len(expected):
            start = 0 if not got else len(seq) - 1
            pool.reserve(rid, len(seq))
            c = ScheduledChunk(rid, seq[start:], start, len(seq) - start, pool.block_table(rid),
                               pool.slot_mapping(rid, start, len(seq)), True,
                               is_prefill=not got)
            t = actor.execute(Plan(0, len(got), [c], BS)).tokens[0]
            got.append(t.token_id)
            seq.append(t.token_id)
            if t.finish_reason == "stop":
                break
        pool.free(rid)
        assert got == expected, question


def _no_flash_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (none here)"
    if not flash_attn_available(torch.device("cuda")):
        return "needs the flash-attn package (not importable)"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_no_flash_reason() is not None, reason=str(_no_flash_reason()))
def test_flash_attn_matches_sdpa_in_bf16() -> None:
    flash = Harness("random:tiny", device="cuda", dtype="bfloat16", backend="flash_attn")
    sdpa = Harness("random:tiny", device="cuda", dtype="bfloat16", backend="sdpa")
    lengths = [5, 40, 130]
    tables = shuffled_tables([n + 8 for n in lengths], 96, seed=1)
    seqs = [prompt(flash.vocab, n, seed=i) for i, n in enumerate(lengths)]
    for h in (flash, sdpa):
        h.out = [h.run([chunk(str(i), s[:20], 0, t) for i, (s, t) in enumerate(zip(seqs, tables))]),
                 h.run([chunk(str(i), s[20:], 20, t) for i, (s, t) in enumerate(zip(seqs, tables))
                        if len(s) > 20])]
        decode = [chunk(str(i), [7], len(s), t, is_prefill=False)
                  for i, (s, t) in enumerate(zip(seqs, tables))]
        h.out.append(h.run(decode))
    for a, b in zip(flash.out, sdpa.out):
        assert rel_err(a, b) < 3e-2


def test_local_engine_replays_arrival_offsets():
    """Timed arrivals (the in-process side of bench.serve_overhead): same tokens as a burst,
    arrivals on schedule, TTFT counted from the scheduled arrival."""
    from actors.local_engine import LocalEngine

    engine = LocalEngine("random:tiny", kv_cache_tokens=2048, num_threads=1)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    greedy = SamplingParams(ignore_eos=True)
    burst = engine.generate(prompts, 4, greedy)
    paced = engine.generate(prompts, 4, greedy, offsets=[0.1, 0.0, 0.05])
    assert [c.token_ids for c in paced] == [c.token_ids for c in burst]
    arrivals = [c.arrival - paced[1].arrival for c in paced]
    assert arrivals == pytest.approx([0.1, 0.0, 0.05], abs=1e-6)
    assert all(c.first_token >= c.arrival for c in paced)


# -- CPU bf16: weights and KV in bf16, activations in fp32 --------------------------------------
BF16_TOL = 3e-2  # max |logit error| / max |logit| against fp32 on the same rounded weights


@pytest.fixture(scope="module")
def tiny_bf16() -> Harness:
    return Harness("random:tiny", dtype="bfloat16")


def test_bf16_mixed_and_chunked_batches_stay_close_to_fp32(tiny_bf16: Harness) -> None:
    h = tiny_bf16
    assert h.cache.k.dtype == torch.bfloat16 and h.model.act_dtype == torch.float32
    lengths = [1, 17, 63, 100]
    tables = shuffled_tables([n + 40 for n in lengths], 96, seed=13)
    seqs = [prompt(h.vocab, n, seed=60 + i) for i, n in enumerate(lengths)]
    first = [min(len(s), 30) for s in seqs]  # the longer prompts continue in a second chunk
    logits = h.run([chunk(str(i), s[:f], 0, t, sample=f == len(s))
                    for i, (s, f, t) in enumerate(zip(seqs, first, tables))])
    rest = [chunk(str(i), s[f:], f, t) for i, (s, f, t) in enumerate(zip(seqs, first, tables))
            if f < len(s)]
    logits = torch.cat([logits, h.run(rest)])
    for row, s in zip(logits, [s for s, f in zip(seqs, first) if f == len(s)]
                      + [s for s, f in zip(seqs, first) if f < len(s)]):
        assert rel_err(row, h.reference(s)[-1]) < BF16_TOL
    for step in range(3):  # decodes through the C kernel on bf16 pages, and the torch path
        for s in seqs:
            s.append(7 + step)
        decode = [chunk(str(i), s[-1:], len(s) - 1, t, is_prefill=False)
                  for i, (s, t) in enumerate(zip(seqs, tables))]
        by_kernel = h.run(decode)
        for i, s in enumerate(seqs):
            assert rel_err(by_kernel[i], h.reference(s)[-1]) < BF16_TOL
    h.backend = SdpaBackend(paged_kernel=False)
    by_torch = h.run([chunk(str(i), s[-1:], len(s) - 1, t, is_prefill=False)
                      for i, (s, t) in enumerate(zip(seqs, tables))])
    h.backend = make_backend("sdpa", torch.device("cpu"), BS)
    assert rel_err(by_torch, by_kernel) < 1e-4  # the same bf16 KV read two ways (same tokens)


def test_bf16_token_bits_do_not_depend_on_chunking_or_batch(tiny_bf16: Harness) -> None:
    """What recompute after an eviction relies on: a token's logits are the same bits whether
    its prompt was prefilled whole or in chunks and whatever else shares the step."""
    h = tiny_bf16
    tokens, other = prompt(h.vocab, 40, seed=70), prompt(h.vocab, 25, seed=71)
    table, other_table = shuffled_tables([40, 25], 96, seed=21)
    whole = h.run([chunk("a", tokens, 0, table)])[0]
    h.run([chunk("a", tokens[:17], 0, table, sample=False), chunk("b", other, 0, other_table)])
    h.run([chunk("a", tokens[17:39], 17, table, sample=False)])
    decoded = h.run([chunk("b", [5], 25, other_table, is_prefill=False),
                     chunk("a", tokens[39:], 39, table, is_prefill=False)])[1]
    assert torch.equal(whole, decoded)


def run_requests(engine, prompts: list[list[int]], sampling: list[SamplingParams],
                 max_tokens: int) -> list[list[int]]:
    """All requests submitted at once, each with its own sampling; tokens in prompt order."""
    return [c.token_ids for c in engine.generate(prompts, max_tokens, sampling)]


def test_seeded_request_same_text_whatever_shares_its_batch() -> None:
    from actors.local_engine import LocalEngine

    engine = LocalEngine("random:tiny", kv_cache_tokens=4096, num_threads=1)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    mine = [11, 12, 13, 14, 15]
    alone = run_requests(engine, [mine], [seeded], 12)[0]
    others = [[20 + i] * (3 + i) for i in range(5)]
    crowds = [SamplingParams(temperature=0.8, top_k=40, ignore_eos=True),  # unseeded
              SamplingParams(ignore_eos=True),
              SamplingParams(temperature=1.0, seed=7, logprobs=True, ignore_eos=True)]
    for n, crowd in enumerate(crowds):
        prompts = others[: n + 2] + [mine] + others[n + 2 :]
        sampling = [crowd] * (n + 2) + [seeded] + [crowd] * (len(others) - n - 2)
        assert run_requests(engine, prompts, sampling, 12)[n + 2] == alone


@pytest.mark.slow
def test_bf16_default_model_tracks_fp32_transformers() -> None:
    """The measured accuracy the README quotes: teacher-forced top-1 agreement with fp32."""
    h = Harness("default", num_blocks=64, dtype="bfloat16")
    ids = h.tokenizer("The history of the Roman Empire spans more than a thousand years, "
                      "beginning with the founding of Rome")["input_ids"]
    with torch.no_grad():
        out = h.hf.generate(torch.tensor([ids]), max_new_tokens=100, do_sample=False,
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0].tolist()
    ref = h.reference(out)
    table = list(range(-(-len(out) // BS)))
    plan_chunk = chunk("a", out, 0, table)
    batch = build_batch(Plan(0, 0, [plan_chunk], BS), torch.device("cpu"))
    batch.sample_rows = torch.arange(len(out))  # logits at every position
    logits = h.model.forward(batch, h.cache, h.backend, h.backend.prepare(batch, h.cache))
    assert rel_err(logits, ref) < BF16_TOL
    assert float((logits.argmax(-1) == ref.argmax(-1)).float().mean()) > 0.97
