"""Rotary position embeddings, Hugging Face Llama convention (rotate-half, not interleaved).

cos/sin are tabulated once for every position up to max_model_len; a step gathers the rows of
its positions. Scaling: `linear` (positions divided by a factor) and `llama3` (Llama 3.1's
frequency-dependent interpolation of the inverse frequencies).
"""
from __future__ import annotations

import math
from typing import Any

import torch


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    # float32 like transformers: the angles pos * inv_freq must match it bit for bit at long
    # positions, where a float64 table would drift by ~1e-4 rad.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3(inv_freq, scaling)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    # Long wavelengths (low frequencies) are stretched by `factor`, short ones kept, and the
    # band between low_freq_wavelen and high_freq_wavelen is interpolated smoothly.
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding:
    def __init__(self, head_dim: int, max_len: int, theta: float, scaling: dict[str, Any],
                 device: torch.device, dtype: torch.dtype) -> None:
        inv_freq = inverse_frequencies(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        # Kept in the model dtype like HF does (cos/sin are cast before they multiply q/k).
        self.cos = freqs.cos().to(device=device, dtype=dtype)  # [max_len, D/2]
        self.sin = freqs.sin().to(device=device, dtype=dtype)
        self.max_len = max_len

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows of `positions` shaped `[T, 1, D/2]` (broadcast over heads)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `[T, heads, D]` by the per-token angles; returns a new contiguous tensor."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # x * cos + rotate_half(x) * sin, written half by half to avoid the cat.
    torch.addcmul(x1 * cos, x2, sin, value=-1.0, out=out[..., :half])
    torch.addcmul(x2 * cos, x1, sin, out=out[..., half:])
    return out
