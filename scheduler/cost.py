"""Iteration-time models: the paper's d0 + d1*sum(l+s) and ours d0 + d_tok*new + d_kv*attended.

Ours: `tau = d0 + d_tok * new_tokens + d_kv * attended_kv` where new_tokens counts prefill tokens
plus one per decode, and attended_kv counts the KV tokens read by decodes. The paper's model is
the special case d_tok = d_kv = d1 (then the two sums add up to sum over the batch of l + s).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class CostModel:
    d0: float  # seconds per iteration, fixed (weights read once)
    d_tok: float  # seconds per new token computed
    d_kv: float  # seconds per KV token attended by a decode
    kv_capacity_tokens: int = 137_000
    block_size: int = 16
    name: str = "custom"

    def iteration_time(self, new_tokens: int, attended_kv: int) -> float:
        return self.d0 + self.d_tok * new_tokens + self.d_kv * attended_kv

    @classmethod
    def paper(cls, d0: float, d1: float, **kw) -> CostModel:
        """The paper's single-slope model d0 + d1 * sum(l + s)."""
        return cls(d0=d0, d_tok=d1, d_kv=d1, **kw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"cost file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"cost file {path} is not JSON: {exc}") from None
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        missing = {"d0", "d_tok", "d_kv"} - known.keys()
        if missing:
            raise ValueError(f"cost file {path} lacks {sorted(missing)}")
        return cls(**known)


PRESETS: dict[str, CostModel] = {
    # Llama-2-7B fp16 on an A100-80GB from first principles (scheduler/SCHEDULING.md §1).
    "a100-llama2-7b": CostModel(
        d0=8e-3, d_tok=7e-5, d_kv=3e-7, kv_capacity_tokens=137_000, block_size=16,
        name="a100-llama2-7b",
    ),
}


def preset(name: str) -> CostModel:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class Fit:
    model: CostModel
    r2: float
    num_samples: int


def fit(samples: list[tuple[int, int, float]], **kw) -> Fit:
    """Least-squares fit of (d0, d_tok, d_kv) to measured (new_tokens, attended_kv, seconds).

    Coefficients are constrained to be non-negative (a negative cost is a fitting artefact of
    noisy timings): a coefficient that comes out negative is dropped and the rest refitted.
    """
    import numpy as np

    if len(samples) < 3:
        raise ValueError(f"need at least 3 measured iterations to fit, got {len(samples)}")
    data = np.asarray(samples, dtype=float)
    x = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]])
    y = data[:, 2]
    active = [0, 1, 2]
    while True:
        coef, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (coef >= 0).all() or len(active) == 1:
            break
        active.pop(int(np.argmin(coef)))
    full = np.zeros(3)
    full[active] = np.clip(coef, 0, None)
    pred = x @ full
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1e-30
    model = CostModel(d0=float(full[0]), d_tok=float(full[1]), d_kv=float(full[2]), **kw)
    return Fit(model=model, r2=1.0 - ss_res / ss_tot, num_samples=len(data))


class OnlineCostFit:
    """Refits the cost model from measured iterations as they come (the live engine's timing
    drifts with batch shapes, threads and neighbours); `observe` returns a new model when one is
    ready and plausible, else None."""

    def __init__(self, every: int = 64, window: int = 2048, min_r2: float = 0.5, **model_kw) -> None:
        self.every, self.window, self.min_r2 = every, window, min_r2
        self.model_kw = model_kw
        self.samples: list[tuple[int, int, float]] = []
        self.latest: Fit | None = None

    def observe(self, new_tokens: int, attended_kv: int, seconds: float) -> CostModel | None:
        self.samples.append((new_tokens, attended_kv, seconds))
        if len(self.samples) < self.every or len(self.samples) % self.every:
            return None
        self.samples = self.samples[-self.window:]
        result = fit(self.samples, name="online", **self.model_kw)
        if result.r2 < self.min_r2 or result.model.d0 <= 0:
            return None
        self.latest = result
        return result.model
