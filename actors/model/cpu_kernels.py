"""Small C kernels for the CPU hot spots torch has no fast op for (sources in csrc/).

- `paged_decode` (csrc/paged_decode.c): attention reading the paged KV cache in place, fp32 or
  bf16 KV, one query row per task with its own context length (decodes, and prefill rows as
  the decode of their token would be computed). torch can only attend over KV it sees as one
  strided tensor, so the SDPA path first copies every sequence's blocks out of the cache; this
  reads each K/V row once (GQA: query head h reads KV head h // g).
- `linear_bf16` (csrc/linear_bf16.c): y = x @ W^T with W packed once in bf16 for AVX512-BF16's
  vdpbf16ps, fp32 accumulation and output. At one row it streams the weights at the memory's
  speed (half the bytes of fp32); at many it runs 2x oneDNN's fp32 GEMM. Each output row is
  computed the same way whatever the batch (batch-invariant). Built only where the CPU has
  AVX512-BF16.
- `sample` (csrc/sample.c): the sampler's CPU path, every row with its own parameters in one
  call; torch needs a sort of the vocabulary for top-p (~200 ms at 64 x 49k here).

Each source is compiled once per machine with the system C compiler (`cc -march=native`, about
a second, no torch headers) into ~/.cache/fluidserve/kernels and loaded with ctypes. OpenMP
binds to the libgomp torch already loaded (same soname): the kernels share torch's thread pool
and `torch.set_num_threads`. Anything missing (no compiler, no AVX512-BF16, not CPU) -> the
kernel's `*_available()` is False and the torch path runs instead. `FLUIDSERVE_CPU_KERNELS=0`
turns all of them off.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("csrc")
# No -ffast-math: linking with it sets flush-to-zero for the whole process (crtfastmath), which
# silently changes every other float computation in it (torch's, the tests', the user's).
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
          "-fno-signed-zeros", "-freciprocal-math", "-fopenmp", "-fPIC", "-shared"]
_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES: dict[str, dict[str, tuple[object, list]]] = {
    "paged_decode": {name: (None, [_P] * 6 + [_I] * 6 + [ctypes.c_float])
                     for name in ("paged_decode_f32", "paged_decode_bf16")},
    "linear_bf16": {"linear_bf16": (None, [_P] * 3 + [_I] * 3)},
    "sample": {"fs_sample": (None, [_P, _I, _I] + [_P] * 5 + [_I] + [_P] * 5),
               "fs_exp_export": (ctypes.c_float, [ctypes.c_float])},
    "elementwise": {
        "add_rms_norm": (None, [_P] * 4 + [ctypes.c_int, _I, _I, ctypes.c_float]),
        "silu_mul": (None, [_P, _P, ctypes.c_int, _I, _I]),
        "rope_store": (None, [_P] * 10 + [ctypes.c_int] + [_I] * 4)},
}
_libs: dict[str, ctypes.CDLL | None] = {}


def _cache_dir() -> Path:
    base = os.environ.get("FLUIDSERVE_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fluidserve", "kernels")
    return Path(base)


def _build(name: str) -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    src = _SRC / f"{name}.c"
    text = src.read_text() + "".join(h.read_text() for h in sorted(_SRC.glob("*.h")))
    digest = hashlib.sha256((text + " ".join(_FLAGS) + cc).encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib_path = out_dir / f"{name}_{digest}.so"
    if not lib_path.exists():
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            tmp_lib = Path(tmp) / lib_path.name
            done = subprocess.run([cc, *_FLAGS, f"-I{_SRC}", str(src), "-o", str(tmp_lib), "-lm"],
                                  capture_output=True, text=True, timeout=120, check=False)
            if done.returncode != 0:
                raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr else "cc failed")
            os.replace(tmp_lib, lib_path)  # atomic: concurrent builders never see half a file
    lib = ctypes.CDLL(str(lib_path))
    for fn_name, (restype, argtypes) in _SIGNATURES[name].items():
        fn = getattr(lib, fn_name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _lib(name: str) -> ctypes.CDLL | None:
    """The compiled library `name` (built on first call, then cached), or None."""
    if name not in _libs:
        _libs[name] = None
        if os.environ.get("FLUIDSERVE_CPU_KERNELS", "1") != "0":
            try:
                _libs[name] = _build(name)
            except Exception as exc:  # noqa: BLE001 (no compiler, no AVX512-BF16...: torch runs)
                level = logging.INFO if name == "linear_bf16" else logging.WARNING
                log.log(level, "fluidserve CPU kernel %s unavailable, using torch: %s", name, exc)
    return _libs[name]


# -- decode attention on the paged cache ---------------------------------------------------
def available() -> bool:
    """Whether the paged-decode kernel could be loaded."""
    return _lib("paged_decode") is not None


def supports(q: torch.Tensor, k_pages: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype == torch.float32
            and k_pages.dtype in (torch.float32, torch.bfloat16)
            and q.shape[1] <= 1024 and available())


def paged_decode(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                 tables: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention on the paged cache. q `[B, H, D]` fp32; k/v pages `[N, BS, Hkv, D]`
    contiguous, fp32 or bf16; tables `[B, W]` int64 (block ids, padding unused); lens `[B]`
    int64 -> `[B, H, D]` fp32."""
    lib = _lib("paged_decode")
    assert lib is not None
    q = q.contiguous()
    b, h, d = q.shape
    _, bs, hkv, _ = k_pages.shape
    assert k_pages.is_contiguous() and v_pages.is_contiguous() and k_pages.dtype == v_pages.dtype
    assert tables.dtype == torch.int64 and tables.is_contiguous() and lens.dtype == torch.int64
    fn = lib.paged_decode_bf16 if k_pages.dtype == torch.bfloat16 else lib.paged_decode_f32
    out = torch.empty_like(q)
    fn(q.data_ptr(), k_pages.data_ptr(), v_pages.data_ptr(), tables.data_ptr(), lens.data_ptr(),
       out.data_ptr(), b, h, hkv, d, bs, tables.shape[1], scale)
    return out


# -- bf16 projections ----------------------------------------------------------------------
@dataclass(frozen=True)
class PackedWeight:
    """A `[out_features, in_features]` weight in linear_bf16's panel layout
    `[out/16, in/2, 16, 2]` bf16."""
    data: torch.Tensor
    out_features: int
    in_features: int

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the unpacked weight (a tied embedding lookup) -> `[len(ids), in]` bf16."""
        return self.data[ids // 16, :, ids % 16, :].reshape(-1, self.in_features)


def linear_bf16_available() -> bool:
    return _lib("linear_bf16") is not None


def can_pack(weight: torch.Tensor) -> bool:
    n, k = weight.shape
    return weight.device.type == "cpu" and n % 16 == 0 and k % 2 == 0 and linear_bf16_available()


def pack_bf16(weight: torch.Tensor) -> PackedWeight:
    n, k = weight.shape
    data = weight.to(torch.bfloat16).view(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    return PackedWeight(data, n, k)


def linear_bf16(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """`x @ W^T` for fp32 (or bf16) x `[M, in]`: x is rounded to bf16, the sum kept in fp32."""
    lib = _lib("linear_bf16")
    assert lib is not None and x.shape[-1] == w.in_features and x.device.type == "cpu"
    xb = x.to(torch.bfloat16).contiguous()
    y = torch.empty(xb.shape[0], w.out_features, dtype=torch.float32)
    lib.linear_bf16(xb.data_ptr(), w.data.data_ptr(), y.data_ptr(), xb.shape[0], w.out_features,
                    w.in_features)
    return y


# -- sampling ------------------------------------------------------------------------------
def sample_available() -> bool:
    return _lib("sample") is not None


@dataclass
class SampleOut:
    tokens: torch.Tensor  # [B] int64, -1 where status != 0
    logprobs: torch.Tensor  # [B] fp32
    top_ids: torch.Tensor  # [B, max_top] int64
    top_logprobs: torch.Tensor  # [B, max_top] fp32
    status: torch.Tensor  # [B] int32: 0 ok, 1 bad logits (NaN / nothing finite), 2 bad params


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           top_k: torch.Tensor, seeds: torch.Tensor, num_logprobs: torch.Tensor,
           max_top: int) -> SampleOut:
    """One token per row of fp32 CPU `logits [B, V]`; per-row fp32 temperature / top_p, int64
    top_k / seeds (the splitmix64 state, any 64 bits) / num_logprobs (-1: none)."""
    lib = _lib("sample")
    assert lib is not None and logits.dtype == torch.float32 and 0 <= max_top <= 32
    logits = logits.contiguous()
    b, v = logits.shape
    out = SampleOut(torch.empty(b, dtype=torch.int64), torch.zeros(b),
                    torch.empty(b, max_top, dtype=torch.int64), torch.empty(b, max_top),
                    torch.empty(b, dtype=torch.int32))
    lib.fs_sample(logits.data_ptr(), b, v, temperature.data_ptr(), top_p.data_ptr(),
                  top_k.data_ptr(), seeds.data_ptr(), num_logprobs.data_ptr(), max_top,
                  out.tokens.data_ptr(), out.logprobs.data_ptr(), out.top_ids.data_ptr(),
                  out.top_logprobs.data_ptr(), out.status.data_ptr())
    return out


def exp(x: float) -> float:
    """The kernels' exp (csrc/fastmath.h; tests check it against math.exp)."""
    lib = _lib("sample")
    assert lib is not None
    return float(lib.fs_exp_export(x))


# -- per-layer elementwise work ------------------------------------------------------------
def elementwise_available() -> bool:
    return _lib("elementwise") is not None


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor | None,
                 eps: float, out_dtype: torch.dtype) -> torch.Tensor | None:
    """h += delta in place (fp32 `[T, H]`), then RMSNorm(h) * weight in `out_dtype` (fp32 or
    bf16); None when `weight` is None (the add only)."""
    lib = _lib("elementwise")
    assert lib is not None and h.dtype == torch.float32 and h.is_contiguous()
    t, hidden = h.shape
    if delta is not None:
        delta = delta.contiguous()
    out = torch.empty(t, hidden, dtype=out_dtype) if weight is not None else None
    lib.add_rms_norm(h.data_ptr(), delta.data_ptr() if delta is not None else None,
                     weight.data_ptr() if weight is not None else None,
                     out.data_ptr() if out is not None else None,
                     int(out_dtype == torch.bfloat16), t, hidden, eps)
    return out


def silu_mul(gate_up: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """`[T, 2I]` fp32 (gate, up) -> silu(gate) * up `[T, I]` in `out_dtype` (fp32 or bf16)."""
    lib = _lib("elementwise")
    assert lib is not None and gate_up.dtype == torch.float32 and gate_up.is_contiguous()
    t, two_i = gate_up.shape
    out = torch.empty(t, two_i // 2, dtype=out_dtype)
    lib.silu_mul(gate_up.data_ptr(), out.data_ptr(), int(out_dtype == torch.bfloat16), t,
                 two_i // 2)
    return out


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int,
               kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k from the fused fp32 `qkv [T, (H + 2 Hkv) D]` (cos/sin
    tables `[max_len, D/2]` fp32, int64 positions), k and v stored at `slots` of one layer's
    contiguous cache `[slots, Hkv, D]` (fp32 or bf16). Returns q `[T, H, D]` fp32 and the new
    k, v `[T, Hkv, D]` as stored."""
    lib = _lib("elementwise")
    assert lib is not None and qkv.dtype == torch.float32 and qkv.is_contiguous()
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == v_cache.dtype
    assert k_cache.dtype in (torch.float32, torch.bfloat16)
    assert positions.dtype == torch.int64 and slots.dtype == torch.int64
    t = qkv.shape[0]
    q = torch.empty(t, heads, head_dim)
    k = torch.empty(t, kv_heads, head_dim, dtype=k_cache.dtype)
    v = torch.empty_like(k)
    lib.rope_store(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), positions.data_ptr(),
                   slots.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), k_cache.data_ptr(),
                   v_cache.data_ptr(), int(k_cache.dtype == torch.bfloat16), t, heads, kv_heads,
                   head_dim)
    return q, k, v
