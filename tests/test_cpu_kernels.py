"""The CPU C kernels against the torch ops they replace (csrc/, actors/model/cpu_kernels.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from actors.model import cpu_kernels
from actors.model.rotary import RotaryEmbedding, apply_rotary


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


needs_bf16 = pytest.mark.skipif(not cpu_kernels.linear_bf16_available(),
                                reason="no AVX512-BF16 CPU (or no C compiler) here")
needs_elementwise = pytest.mark.skipif(not cpu_kernels.elementwise_available(),
                                       reason="the elementwise kernels did not build (no C compiler?)")


@needs_bf16
@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 13, 64])
@pytest.mark.parametrize("n,k", [(48, 64), (80, 34), (960, 576)])
def test_linear_bf16_matches_torch_on_rounded_inputs(m: int, n: int, k: int) -> None:
    x, w = randn(m, k, seed=1), randn(n, k, seed=2, scale=0.05)
    packed = cpu_kernels.pack_bf16(w)
    want = x.bfloat16().double() @ w.bfloat16().double().T
    got = cpu_kernels.linear_bf16(x, packed)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max()) + 1e-6


@needs_bf16
def test_linear_bf16_rows_do_not_depend_on_the_batch() -> None:
    x, w = randn(37, 576, seed=3), randn(1536, 576, seed=4, scale=0.05)
    packed = cpu_kernels.pack_bf16(w)
    whole = cpu_kernels.linear_bf16(x, packed)
    for r in (0, 5, 36):
        assert torch.equal(cpu_kernels.linear_bf16(x[r : r + 1], packed)[0], whole[r])
    ids = torch.tensor([0, 15, 16, 1535, 700])
    assert torch.equal(packed.rows(ids), w.bfloat16()[ids])  # the tied-embedding lookup


@needs_elementwise
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_torch(out_dtype: torch.dtype) -> None:
    h, delta, w = randn(9, 576, seed=5), randn(9, 576, seed=6), 1 + randn(576, seed=7, scale=0.1)
    want_h = h + delta
    want = F.rms_norm(want_h, (576,), w, 1e-5)
    got = cpu_kernels.add_rms_norm(h, delta, w, 1e-5, out_dtype)
    assert torch.allclose(h, want_h, rtol=0, atol=1e-6)  # added in place
    assert got.dtype == out_dtype
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    assert torch.allclose(got.float(), want, rtol=tol, atol=tol)
    assert cpu_kernels.add_rms_norm(h, delta, None, 1e-5, out_dtype) is None  # the add alone
    assert torch.allclose(h, want_h + delta, atol=1e-5)


@needs_elementwise
def test_silu_mul_matches_torch() -> None:
    gate_up = randn(7, 2 * 1536, seed=8, scale=4.0)
    want = F.silu(gate_up[:, :1536]) * gate_up[:, 1536:]
    assert torch.allclose(cpu_kernels.silu_mul(gate_up, torch.float32), want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(cpu_kernels.silu_mul(gate_up, torch.bfloat16).float(), want, rtol=8e-3, atol=1e-6)


@needs_elementwise
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_rope_store_matches_apply_rotary_and_cache_write(kv_dtype: torch.dtype) -> None:
    heads, kv_heads, d, t = 9, 3, 64, 6
    rope = RotaryEmbedding(d, 512, 10000.0, {}, torch.device("cpu"), torch.float32)
    qkv = randn(t, (heads + 2 * kv_heads) * d, seed=9)
    positions = torch.tensor([0, 1, 2, 100, 300, 511])
    slots = torch.tensor([40, 3, 17, 0, 63, 22])
    k_cache, v_cache = torch.zeros(64, kv_heads, d, dtype=kv_dtype), torch.zeros(64, kv_heads, d, dtype=kv_dtype)
    q, k, v = cpu_kernels.rope_store(qkv, rope.cos, rope.sin, positions, slots, k_cache, v_cache,
                                     heads, kv_heads, d)
    cos, sin = rope.tables(positions)
    want_q = apply_rotary(qkv[:, : heads * d].view(t, heads, d), cos, sin)
    want_k = apply_rotary(qkv[:, heads * d : (heads + kv_heads) * d].view(t, kv_heads, d), cos, sin)
    want_v = qkv[:, (heads + kv_heads) * d :].view(t, kv_heads, d)
    assert torch.allclose(q, want_q, atol=1e-5)
    tol = 1e-5 if kv_dtype == torch.float32 else 1e-2
    assert torch.allclose(k.float(), want_k, atol=tol) and torch.equal(v, want_v.to(kv_dtype))
    assert torch.equal(k_cache[slots], k) and torch.equal(v_cache[slots], v)
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()
    # A negative slot (a CUDA-graph padding row) is rotated but never stored.
    before = k_cache.clone(), v_cache.clone()
    q2, k2, _ = cpu_kernels.rope_store(qkv[:2], rope.cos, rope.sin, positions[:2],
                                       torch.tensor([-1, -1]), k_cache, v_cache, heads, kv_heads, d)
    assert torch.equal(k2, k[:2]) and torch.equal(q2, q[:2])
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


@pytest.mark.skipif(not cpu_kernels.available(), reason="the decode kernel did not build here")
def test_paged_decode_bf16_reads_the_pages_like_sdpa() -> None:
    bs, heads, kv_heads, d = 16, 8, 2, 32
    k_pages = randn(20, bs, kv_heads, d, seed=10).bfloat16()
    v_pages = randn(20, bs, kv_heads, d, seed=11).bfloat16()
    tables = torch.tensor([[3, 7, 1, 0], [9, 2, 0, 0], [19, 11, 4, 6]])
    lens = torch.tensor([40, 17, 64])
    q = randn(3, heads, d, seed=12)
    got = cpu_kernels.paged_decode(q, k_pages, v_pages, tables, lens, d ** -0.5)
    for b in range(3):
        n = int(lens[b])
        k = k_pages[tables[b]].flatten(0, 1)[:n].float().transpose(0, 1)
        v = v_pages[tables[b]].flatten(0, 1)[:n].float().transpose(0, 1)
        want = F.scaled_dot_product_attention(q[b][:, None], k.repeat_interleave(4, 0),
                                              v.repeat_interleave(4, 0))[:, 0]
        assert torch.allclose(got[b], want, atol=1e-5)


@pytest.mark.skipif(not cpu_kernels.available(), reason="the decode kernel did not build here")
def test_paged_decode_portable_loops_match_the_avx512_ones(monkeypatch, tmp_path) -> None:
    """The same source built without AVX-512 (the plain loops other CPUs run)."""
    k_pages = randn(12, 16, 2, 64, seed=13).bfloat16()
    v_pages = randn(12, 16, 2, 64, seed=14).bfloat16()
    tables, lens, q = torch.tensor([[4, 1, 7], [0, 11, 2]]), torch.tensor([37, 48]), randn(2, 6, 64)
    native = cpu_kernels.paged_decode(q, k_pages, v_pages, tables, lens, 0.125)
    monkeypatch.setenv("FLUIDSERVE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_FLAGS", [*cpu_kernels._FLAGS, "-mno-avx512f"])
    monkeypatch.setattr(cpu_kernels, "_libs", {})
    portable = cpu_kernels.paged_decode(q, k_pages, v_pages, tables, lens, 0.125)
    assert torch.allclose(native, portable, atol=1e-5)
