"""Calibrate the simulator's cost model against the real engine.

    fluidserve calibrate [--model M] [--out FILE] [--quick]

Runs a sweep of batch shapes (prefill chunks of several sizes, decode batches of several sizes
and context lengths, and mixes of both) through `ModelActor.execute`, times each, and fits
`tau = d0 + d_tok * new_tokens + d_kv * attended_kv` with `scheduler.cost.fit`. The KV content
is whatever the cache holds: timing does not depend on it, so decodes of any context length
are planned directly, without running their prefills first.
"""
from __future__ import annotations

import os

# Before torch loads libgomp: idle OpenMP threads sleep instead of spinning. On a shared box a
# spinning team waiting for a descheduled thread makes 2 threads 2-4x slower than 1.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys
from dataclasses import dataclass, field, replace
from itertools import count

from kv.blocks import BlockPool
from scheduler.cost import CostModel, Fit, fit
from scheduler.plan import Plan, ScheduledChunk

PREFILL_SIZES = [16, 64, 128, 256, 512, 1024]
DECODE_BATCHES = [1, 4, 16, 32, 64, 128]
DECODE_CONTEXTS = [32, 128, 512, 1024]
QUICK_PREFILL_SIZES = [32, 128, 512]
QUICK_DECODE_BATCHES = [1, 16, 64]
QUICK_DECODE_CONTEXTS = [64, 512]


def batch_shapes(quick: bool) -> list[tuple[list[int], list[int]]]:
    """(prefill chunk sizes, decode context lengths) of each planned step."""
    prefills = QUICK_PREFILL_SIZES if quick else PREFILL_SIZES
    batches = QUICK_DECODE_BATCHES if quick else DECODE_BATCHES
    contexts = QUICK_DECODE_CONTEXTS if quick else DECODE_CONTEXTS
    shapes: list[tuple[list[int], list[int]]] = [([n], []) for n in prefills]
    shapes += [([], [ctx] * b) for b in batches for ctx in contexts]
    # Mixed steps (the common case under chunked prefill), with spread-out contexts.
    for n in prefills[1::2]:
        for b in batches[1:]:
            shapes.append(([n], [contexts[i % len(contexts)] for i in range(b)]))
    return shapes


def _plan(pool: BlockPool, prefills: list[int], decodes: list[int], ids: count) -> Plan | None:
    """A plan with fresh requests of the given shape, or None if the cache cannot hold it."""
    need = sum(pool.blocks_for(n) for n in prefills) + sum(pool.blocks_for(c) for c in decodes)
    if need > pool.num_free_blocks:
        return None
    chunks = []
    for n in prefills:
        rid = f"p{next(ids)}"
        pool.reserve(rid, n)
        chunks.append(ScheduledChunk(rid, [100] * n, 0, n, pool.block_table(rid),
                                     pool.slot_mapping(rid, 0, n), True))
    for ctx in decodes:
        rid = f"d{next(ids)}"
        pool.reserve(rid, ctx)
        chunks.append(ScheduledChunk(rid, [100], ctx - 1, 1, pool.block_table(rid),
                                     pool.slot_mapping(rid, ctx - 1, ctx), True,
                                     is_prefill=False))
    return Plan(0, 0, chunks, pool.block_size)


def calibrate(actor, quick: bool = False, repeats: int | None = None,
              verbose: bool = False) -> Fit:
    """Time the engine on a sweep of shapes and fit the cost model (seconds per iteration)."""
    cap = actor.capacity()
    pool = BlockPool(cap["num_blocks"], cap["block_size"])
    repeats = repeats or (2 if quick else 3)
    ids = count()
    samples: list[tuple[int, int, float]] = []
    for prefills, decodes in batch_shapes(quick):
        plan = _plan(pool, prefills, decodes, ids)
        if plan is None:
            continue
        actor.execute(plan)  # warm-up: first touch of these blocks, allocator growth
        times = [actor.execute(plan).step_time_s for _ in range(repeats)]
        # The fastest run, not the median: on a shared box other work only ever adds time, and
        # one slowed big prefill drags the least-squares line down to a zero or negative d0.
        seconds = min(times)
        samples.append((plan.num_new_tokens, plan.num_attended_kv, seconds))
        if verbose:
            print(f"  prefill {prefills or '-'} decodes {len(decodes)} "
                  f"new={plan.num_new_tokens} kv={plan.num_attended_kv}: {seconds * 1e3:.1f} ms")
        for c in plan.chunks:
            pool.free(c.request_id)
    return fit(samples, kv_capacity_tokens=cap["kv_capacity_tokens"],
               block_size=cap["block_size"], name=f"{cap['model']}@{cap['device']}")


@dataclass(frozen=True)
class RobustFit:
    """A cost model fitted with outliers rejected, and how sure the fit is of it."""

    model: CostModel
    r2: float
    num_samples: int
    num_outliers: int
    std: dict[str, float] = field(default_factory=dict)  # bootstrap std of d0, d_tok, d_kv
    # Bootstrap relative std of the predicted time of the samples' average step: how far the
    # cost model itself may be off, which bounds how close any simulation of it can get.
    rel_uncertainty: float = 0.0

    def describe(self) -> str:
        m, s = self.model, self.std
        return (f"d0={m.d0 * 1e3:.1f}±{s.get('d0', 0) * 1e3:.1f} ms d_tok={m.d_tok * 1e6:.0f}"
                f"±{s.get('d_tok', 0) * 1e6:.0f} us d_kv={m.d_kv * 1e9:.0f}±{s.get('d_kv', 0) * 1e9:.0f} ns"
                f" (R^2={self.r2:.3f}, {self.num_samples} steps, {self.num_outliers} outliers dropped,"
                f" ±{self.rel_uncertainty:.1%} on the average step)")


def robust_fit(samples: list[tuple[int, int, float]], cut: float = 4.0, rounds: int = 6,
               resamples: int = 200, seed: int = 0, mean_preserving: bool = False,
               **model_kw) -> RobustFit:
    """`scheduler.cost.fit` with outlier rejection and a bootstrap of its uncertainty.

    Timings on a shared box have a heavy upper tail (a neighbour's burst, a page fault):
    samples whose residual is beyond `cut` robust standard deviations (1.4826 x MAD) of the
    median residual are dropped and the rest refitted, until nothing changes. The bootstrap
    refits `resamples` resamples of the kept samples. With `mean_preserving` d0 takes the
    outliers' average excess back, so that the model predicts the samples' total time (a
    simulator's mean latency depends on the mean step): `bench live` replays and calibrates
    with it. Without it the model is the typical step; on a box shared with bursty neighbours
    that is the better guess of a run to come (their bursts in a calibration once put d0 11 ms,
    50%, above the run's own)."""
    import numpy as np

    data = np.asarray(samples, dtype=float)
    keep = np.ones(len(data), dtype=bool)
    for _ in range(rounds):
        model = fit(data[keep].tolist(), **model_kw).model
        resid = data[:, 2] - _predict(model, data)
        center = np.median(resid[keep])
        scale = 1.4826 * np.median(np.abs(resid[keep] - center)) or 1e-12
        new_keep = np.abs(resid - center) <= cut * scale
        if new_keep.sum() < 3 or (new_keep == keep).all():
            break
        keep = new_keep
    final = fit(data[keep].tolist(), **model_kw)
    model = final.model
    if mean_preserving:
        model = replace(model, d0=model.d0 + float((data[:, 2] - _predict(model, data)).mean()))
    rng = np.random.default_rng(seed)
    kept = data[keep]
    coefs = []
    for _ in range(resamples):
        pick = kept[rng.integers(0, len(kept), len(kept))]
        m = fit(pick.tolist(), **model_kw).model
        coefs.append((m.d0, m.d_tok, m.d_kv))
    coefs_arr = np.asarray(coefs)
    mean_step = kept[:, :2].mean(axis=0)
    times = coefs_arr @ np.array([1.0, mean_step[0], mean_step[1]])
    return RobustFit(model, final.r2, int(keep.sum()), int((~keep).sum()),
                     dict(zip(("d0", "d_tok", "d_kv"), coefs_arr.std(axis=0).tolist())),
                     float(times.std() / times.mean()) if times.mean() > 0 else 0.0)


def _predict(model: CostModel, data):
    return model.d0 + model.d_tok * data[:, 0] + model.d_kv * data[:, 1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fluidserve calibrate",
                                description="fit the cost model to this machine's engine")
    p.add_argument("--model", default="default")
    p.add_argument("--out", default=None, help="CostModel JSON (default: cost-<model>.json)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    p.add_argument("--kv-cache-tokens", type=int, default=65536)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)

    from actors.model.config import ModelLoadError
    from actors.model_actor import ModelActor

    try:
        actor = ModelActor(args.model, kv_cache_tokens=args.kv_cache_tokens,
                           device=args.device, num_threads=args.threads)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = calibrate(actor, quick=args.quick, verbose=args.verbose)
    m = result.model
    out = args.out or f"cost-{args.model.replace(':', '-').replace('/', '_')}.json"
    m.save(out)
    print(f"fit over {result.num_samples} iterations on {actor.capacity()['device']}: "
          f"d0={m.d0 * 1e3:.3f} ms  d_tok={m.d_tok * 1e6:.2f} us/token  "
          f"d_kv={m.d_kv * 1e9:.2f} ns/kv-token  R^2={result.r2:.4f}")
    print(f"wrote {out} (kv_capacity_tokens={m.kv_capacity_tokens}, block_size={m.block_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
