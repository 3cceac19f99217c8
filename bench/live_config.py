"""`bench live`'s configuration and workload: what to run, and the one arrival list of each rate
that the load generator and the simulator share."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench import serve as loadgen
from scheduler import fluid
from scheduler.cost import CostModel
from scheduler.experiment import build_workload
from scheduler.workload import DEFAULT_TRACE, Arrival

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROBE_REPEATS = 4  # rounds of the calibration's probes (bench.live_calibration)
# The speed check (bench.live.speed_check) is off by default: on three runs with the calibration it moved
# the prediction's error from 6/13/5% to 23/9/3% (40 requests measure a box that drifts +-5%
# no better than the calibration does).
SPEED_CHECK_REQUESTS = 0


@dataclass
class LiveConfig:
    policies: list[str]
    rates: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    trace: str | None = None
    types: str | None = None
    num_requests: int = 40
    seed: int = 0
    model: str = "default"
    max_prompt: int = loadgen.DEFAULT_MAX_PROMPT
    max_output: int = loadgen.DEFAULT_MAX_OUTPUT
    kv_cache_tokens: int = 16384
    cost_file: str | None = None  # a live calibration to reuse (default: calibrate now)
    # Re-fit before every rate: on a shared box the speed drifts (the loads stay the first
    # calibration's, so all policies see the same arrivals; the policies of one rate share a fit).
    calibrate_each: bool = False
    calibration_repeats: int = PROBE_REPEATS
    # Before each run, this many requests of the workload at the run's rate on the run's own
    # deployment measure its speed against the calibration (0: none: the calibration as it is).
    speed_check_requests: int = SPEED_CHECK_REQUESTS
    out_dir: Path = RESULTS_DIR
    port: int = 8000
    progress: bool = True


def arrivals_at(config: LiveConfig, rate: float) -> list[Arrival]:
    """The one arrival list of a rate, for the load generator and the simulator alike."""
    trace = None if config.types else (config.trace or str(DEFAULT_TRACE))
    arrivals = build_workload(config.types, trace, rate, config.num_requests, config.seed)
    return loadgen.clip(arrivals, config.max_prompt, config.max_output)


def load_per_rate(arrivals: list[Arrival], cost: CostModel) -> float:
    """The fluid load of 1 request/s with these requests' lengths (load is linear in the rate)."""
    prompt = sum(a.prompt_len for a in arrivals) / len(arrivals)
    types = fluid.types_from_sample([a.output_len for a in arrivals], 1.0, prompt)
    return fluid.solve(types, cost).load


def model_slug(model: str) -> str:
    return model.replace(":", "-").replace("/", "_")


def log(config: LiveConfig, message: str) -> None:
    print(f"[bench live] {message}", file=sys.stderr, flush=True)
