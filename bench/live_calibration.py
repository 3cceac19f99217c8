"""`bench live`'s calibration: the cost model fitted to the live system's own steps (probes sent
through the API while the scheduler records every step), with its uncertainty and how much the
box's speed moved while it was taken."""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from itertools import pairwise

from actors.calibrate import RobustFit, robust_fit
from bench import serve as loadgen
from bench.live_config import LiveConfig, arrivals_at, load_per_rate, log, model_slug
from scheduler.cost import CostModel
from scheduler.workload import Arrival

# Live calibration probes: lone prefills of these prompt lengths, lockstep decode batches of these
# (size, prompt length) with PROBE_OUTPUT tokens each, in config.calibration_repeats rounds. Two contexts, so
# that d_kv is not confounded with the per-request cost of a decode (streaming its token), and a
# batch as large and long as a loaded run's (32 x ~240 attended tokens): fitted on small contexts
# only, d_kv swung 0.6-5.4 us between calibrations, and a loaded run attends thousands of tokens.
PREFILL_PROBES = (16, 64, 256)
DECODE_PROBES = ((1, 32), (8, 32), (32, 32), (8, 160), (32, 224))
PROBE_OUTPUT = 16
# Then requests of the benchmark's own workload (another seed) at this load of the first fit, so
# that the final fit covers the batch shapes the runs will see instead of extrapolating to them.
WORKLOAD_PROBE_LOAD = 0.6
WORKLOAD_PROBE_REQUESTS = 30


def play(url: str, arrivals: list[Arrival], index: int, what: str) -> None:
    """Send `arrivals` (probes: every one must succeed, or the fit would be of something else)."""
    outs = loadgen.run_sync(url, arrivals, index_base=index)
    bad = [o.error for o in outs if not o.ok]
    if bad:
        raise RuntimeError(f"{what} request failed: {bad[0]}")


def _probe(url: str, batch: int, prompt: int, output: int, index: int) -> None:
    """`batch` identical requests at once: they prefill together, then decode in lockstep."""
    play(url, [Arrival(0.0, prompt, output)] * batch, index, "calibration")


@dataclass
class Calibration:
    fit: RobustFit
    # Standard deviation of the box's speed between the calibration's probe rounds (each
    # round's steps against the fit): how much it moves over a minute, which no fit taken
    # before a run can know, and which sets the prediction's range (the bootstrap's +-0.5%
    # says only how well the samples pin the fit).
    speed_spread: float


def calibrate_live(url: str, config: LiveConfig) -> Calibration:
    """Fit the cost model to the live system's own iterations: probes (lone prefills, lockstep
    decode batches of two contexts, then a slice of the benchmark's workload) sent through the
    API while the scheduler records every step's new tokens, attended KV and period on its
    model actor (the step's time plus the gap before it when the next step was already queued:
    what an iteration costs a request). The fit drops outliers from the slopes, charges their
    average excess to d0 (the mean step is what queueing sees) and reports its own uncertainty;
    the samples are saved beside the cost file."""
    cap = live_capacity()
    model_kw = {"kv_capacity_tokens": cap["kv_capacity_tokens"], "block_size": cap["block_size"],
                "name": f"{config.model}@live"}
    reset_steps()
    index = 100_000
    rounds = [0]  # where each probe round's samples start
    samples: list[tuple[int, int, float]] = []
    for _ in range(config.calibration_repeats):
        for prompt in sorted({min(p, config.max_prompt) for p in PREFILL_PROBES}):
            index += 1
            _probe(url, 1, prompt, 2, index)
        for batch, prompt in DECODE_PROBES:
            index += batch
            _probe(url, batch, min(prompt, config.max_prompt), PROBE_OUTPUT, index)
        samples = step_samples()
        rounds.append(len(samples))
    first = robust_fit(samples, **model_kw)
    probe = replace(config, seed=config.seed + 1000, num_requests=WORKLOAD_PROBE_REQUESTS)
    rate = WORKLOAD_PROBE_LOAD / load_per_rate(arrivals_at(probe, 1.0), first.model)
    play(url, arrivals_at(probe, rate), index + 1, "calibration")
    samples = step_samples()
    config.out_dir.mkdir(parents=True, exist_ok=True)
    (config.out_dir / f"cost-{model_slug(config.model)}-live-samples.json").write_text(json.dumps(samples) + "\n")
    # Mean-preserving: the outliers' excess stays in d0. On a box of its own they are the
    # serving stack's own hiccups (GC, Ray's heartbeats, the client), which the run will see too,
    # and a simulator's mean latency depends on the mean step (typical-step fits predicted
    # 12/5/16% off on three quiet runs, mean-preserving ones 9/10/14% on the same samples).
    fitted = robust_fit(samples, mean_preserving=True, **model_kw)
    spread = speed_spread([samples[a:b] for a, b in pairwise(rounds)], fitted.model)
    log(config, f"live calibration of {config.model}: {fitted.describe()}; the box's speed moved "
                 f"±{spread:.1%} between probe rounds; KV {cap['kv_capacity_tokens']} tokens")
    return Calibration(fitted, spread)


def speed_spread(rounds: list[list[tuple[int, int, float]]], cost: CostModel) -> float:
    """Sample standard deviation of the rounds' slowdowns against `cost` (0 with < 2 rounds)."""
    slow = [slowdown(r, cost) for r in rounds if r]
    return statistics.stdev(slow) if len(slow) > 1 else 0.0


def calibration_report(calibration: Calibration) -> dict:
    fitted = calibration.fit
    return {"r2": fitted.r2, "steps": fitted.num_samples, "outliers": fitted.num_outliers,
            "std": fitted.std, "rel_uncertainty": fitted.rel_uncertainty,
            "speed_spread": calibration.speed_spread}


def live_capacity() -> dict:
    """The running app's model actor capacity (KV tokens, block size), via its Serve handle."""
    return _scheduler().info.remote().result()


def _scheduler():
    from ray import serve

    return serve.get_deployment_handle("Scheduler", app_name="fluidserve")


def step_samples() -> list[tuple[int, int, float]]:
    """The live scheduler's record of its model actor's steps: (new tokens, attended KV, period)."""
    return _scheduler().dispatch_stats.remote(samples=True).result()["samples"]


def reset_steps() -> None:
    """Start a new record of steps (only the reset: the old samples are not fetched)."""
    _scheduler().dispatch_stats.remote(reset=True).result()


def slowdown(samples: list[tuple[int, int, float]], calibrated: CostModel) -> float:
    """How much slower (+) or faster (-) these steps were than the calibration predicted them:
    for a run, the box's speed change between calibration and run (its neighbours' load), which
    no calibration taken before the run can know."""
    predicted = sum(calibrated.iteration_time(n, kv) for n, kv, _ in samples)
    return sum(period for _, _, period in samples) / predicted - 1 if predicted else 0.0
