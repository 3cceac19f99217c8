"""A small C kernel for the CPU hot spot torch has no op for: decode attention on the paged cache.

torch can only attend over KV it can see as one strided tensor, so a paged decode batch first
copies every sequence's blocks out of the cache (index_select) and then runs SDPA over the copy:
the KV is read twice and written once per layer, and SDPA's CPU flash kernel is tuned for many
query rows, not the 1 token x g heads of a GQA decode. `paged_decode` instead reads each K/V row
once, straight from the blocks, one sequence per task: scores of every query head against each
K row (GQA: query head h reads KV head h // g), an exact softmax over a per-thread score buffer,
then the weighted sum of V rows. fp32 throughout, like SDPA's CPU math.

The C source is compiled once per machine with the system C compiler (`cc`, about a second, no
torch headers) into ~/.cache/fluidserve/kernels and loaded with ctypes. It uses OpenMP and binds
to the libgomp torch already loaded (same soname), so it shares torch's thread pool and its
`torch.set_num_threads`. Anything missing (no compiler, not fp32, not CPU) -> `available()` is
False and the torch path runs instead. `FLUIDSERVE_CPU_KERNELS=0` turns the kernel off.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <float.h>

/* q, out: [B, H, D]; k, v: [num_blocks, BS, HKV, D] (one layer); tables: [B, W] int64 block ids;
   lens: [B] int64 context lengths (the new token included, its KV already in the cache).
   One task per sequence: a block's K (then V) rows of all KV heads are one contiguous run of
   BS * HKV * D floats, read front to back while the next block is prefetched. */
void paged_decode_f32(const float *q, const float *k, const float *v, const int64_t *tables,
                      const int64_t *lens, float *out, int64_t B, int64_t H, int64_t HKV,
                      int64_t D, int64_t BS, int64_t W, float scale)
{
    const int64_t G = H / HKV;
    const int64_t row = HKV * D; /* floats between consecutive tokens of a block */
    const int64_t blk = BS * row; /* floats per block */
    #pragma omp parallel
    {
        float *scores = NULL;
        int64_t cap = 0;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < B; ++b) {
            const int64_t L = lens[b], nblk = (L + BS - 1) / BS;
            if (H * L > cap) {
                free(scores);
                cap = H * L;
                scores = (float *)malloc((size_t)cap * sizeof(float));
            }
            const float *qb = q + b * H * D;
            const int64_t *tab = tables + b * W;
            for (int64_t i = 0; i < nblk; ++i) {
                const float *kb = k + tab[i] * blk;
                const float *next = i + 1 < nblk ? k + tab[i + 1] * blk : v + tab[0] * blk;
                const int64_t t0 = i * BS, n = L - t0 < BS ? L - t0 : BS;
                for (int64_t j = 0; j < n; ++j) {
                    for (int64_t c = 0; c < row; c += 16) __builtin_prefetch(next + j * row + c);
                    const float *kp = kb + j * row;
                    for (int64_t h = 0; h < H; ++h) {
                        const float *qh = qb + h * D, *kh = kp + (h / G) * D;
                        float s = 0.f;
                        #pragma omp simd reduction(+:s)
                        for (int64_t d = 0; d < D; ++d) s += qh[d] * kh[d];
                        scores[h * L + t0 + j] = s * scale;
                    }
                }
            }
            float inv[1024]; /* H <= 1024 is checked by the caller */
            for (int64_t h = 0; h < H; ++h) {
                float *sh = scores + h * L, m = -FLT_MAX, sum = 0.f;
                for (int64_t t = 0; t < L; ++t) m = sh[t] > m ? sh[t] : m;
                for (int64_t t = 0; t < L; ++t) { sh[t] = expf(sh[t] - m); sum += sh[t]; }
                inv[h] = 1.f / sum;
            }
            float *ob = out + b * H * D;
            for (int64_t i = 0; i < H * D; ++i) ob[i] = 0.f;
            for (int64_t i = 0; i < nblk; ++i) {
                const float *vb = v + tab[i] * blk;
                const float *next = i + 1 < nblk ? v + tab[i + 1] * blk : vb;
                const int64_t t0 = i * BS, n = L - t0 < BS ? L - t0 : BS;
                for (int64_t j = 0; j < n; ++j) {
                    for (int64_t c = 0; c < row; c += 16) __builtin_prefetch(next + j * row + c);
                    const float *vp = vb + j * row;
                    for (int64_t h = 0; h < H; ++h) {
                        const float p = scores[h * L + t0 + j];
                        const float *vh = vp + (h / G) * D;
                        float *oh = ob + h * D;
                        #pragma omp simd
                        for (int64_t d = 0; d < D; ++d) oh[d] += p * vh[d];
                    }
                }
            }
            for (int64_t h = 0; h < H; ++h)
                for (int64_t d = 0; d < D; ++d) ob[h * D + d] *= inv[h];
        }
        free(scores);
    }
}
"""

# No -ffast-math: linking with it sets flush-to-zero for the whole process (crtfastmath), which
# silently changes every other float computation in it (torch's, the tests', the user's).
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
          "-fno-signed-zeros", "-freciprocal-math", "-fopenmp", "-fPIC", "-shared"]
_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    base = os.environ.get("FLUIDSERVE_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fluidserve", "kernels")
    return Path(base)


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    digest = hashlib.sha256((_SOURCE + " ".join(_FLAGS) + cc).encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib_path = out_dir / f"paged_decode_{digest}.so"
    if not lib_path.exists():
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            src = Path(tmp) / "paged_decode.c"
            src.write_text(_SOURCE)
            tmp_lib = Path(tmp) / lib_path.name
            subprocess.run([cc, *_FLAGS, str(src), "-o", str(tmp_lib), "-lm"], check=True,
                           capture_output=True, timeout=120)
            os.replace(tmp_lib, lib_path)  # atomic: concurrent builders never see half a file
    lib = ctypes.CDLL(str(lib_path))
    f = lib.paged_decode_f32
    f.restype = None
    f.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_float]
    return lib


def available() -> bool:
    """Whether the compiled kernel could be loaded (built on first call, then cached)."""
    global _lib, _tried
    if not _tried:
        _tried = True
        if os.environ.get("FLUIDSERVE_CPU_KERNELS", "1") != "0":
            try:
                _lib = _build()
            except Exception as exc:  # no compiler, sandboxed FS...: the torch path still works
                log.warning("fluidserve CPU decode kernel unavailable, using torch SDPA: %s", exc)
                _lib = None
    return _lib is not None


def supports(q: torch.Tensor, k_pages: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype == torch.float32 and k_pages.dtype == torch.float32
            and q.shape[1] <= 1024 and available())


def paged_decode(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                 tables: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention on the paged cache. q `[B, H, D]` fp32; k/v pages `[N, BS, Hkv, D]`
    contiguous; tables `[B, W]` int64 (block ids, padding unused); lens `[B]` int64 -> `[B, H, D]`."""
    assert _lib is not None
    q = q.contiguous()
    b, h, d = q.shape
    _, bs, hkv, _ = k_pages.shape
    assert k_pages.is_contiguous() and v_pages.is_contiguous()
    assert tables.dtype == torch.int64 and tables.is_contiguous() and lens.dtype == torch.int64
    out = torch.empty_like(q)
    _lib.paged_decode_f32(q.data_ptr(), k_pages.data_ptr(), v_pages.data_ptr(),
                          tables.data_ptr(), lens.data_ptr(), out.data_ptr(),
                          b, h, hkv, d, bs, tables.shape[1], scale)
    return out
