"""`fluidserve bench live`: the policies on the live engine, and the simulator's prediction of it.

    fluidserve bench live --policies nested-wait,vllm,sarathi [--trace FILE | --types SPEC]
        (--rates R1,R2,... | --loads 0.5,0.7,0.9) [--num-requests N] [--model random:tiny|default]
        [--max-prompt P] [--max-output O] [--out-dir bench/results] [--json]

At each rate the policies run side by side (the box's speed drifts over minutes), the Serve app
(re)deployed for each on one CPU model actor in one Ray cluster. The cost
model is fitted to the live system itself (or read from --cost-file; a fit is only valid on the
box and at the background load it was taken on; it is saved to the out dir): lone prefills
and lockstep decode batches sent through the API under a work-conserving policy, timed at the
client, so d0 and d_tok include what the live loop adds to every iteration (the Ray round trip,
plan and commit, streaming every token through the ingress on the same CPU cores as the model).
An in-process calibration (`actors.calibrate`) misses all of that and underpredicts latency by
2-3x on a 2-core box. A load x is x times the calibrated fluid capacity: the fluid load is linear
in the rate, so the rate is x / (load at 1 request/s). At every rate one `Arrival` list (same
seed) goes both to the load generator and to the simulator, which runs the same policy with the
same cost model (also given to the live app's policy) and the live KV capacity, and without a
workload hint (the live scheduler has none either).

The parts: bench.live_config (what to run, the arrivals of a rate), bench.live_calibration (the
live cost fit), bench.live_report (live.json, live.md, the plot); this module runs them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from actors.calibrate import robust_fit
from bench import serve as loadgen
from bench.cli_lists import choices, positive
from bench.live_calibration import (
    Calibration,
    calibrate_live,
    calibration_report,
    play,
    reset_steps,
    slowdown,
    step_samples,
)
from bench.live_config import (
    PROBE_REPEATS,
    RESULTS_DIR,
    SPEED_CHECK_REQUESTS,
    LiveConfig,
    arrivals_at,
    load_per_rate,
    log,
    model_slug,
)
from bench.live_report import markdown, write_results
from scheduler.cost import CostModel
from scheduler.experiment import run_policy
from scheduler.policies import POLICY_NAMES, WorkloadHint
from scheduler.simulate import LATENCY_KEYS
from scheduler.workload import DEFAULT_TRACE, Arrival

THRESHOLD_POLICIES = ("nested-wait", "wait")
COMPARED_KEYS = ("throughput_tok_s", *LATENCY_KEYS, "completed", "submitted")

# deploy(app_args) -> base URL of the running app (deploy.local.start, or a test fixture).
Deployer = Callable[[dict], str]


# --- loads ---------------------------------------------------------------------------------------


def rate_plan(config: LiveConfig, cost: CostModel) -> list[tuple[float, float]]:
    """(rate, load) pairs, from --rates or from --loads of the calibrated capacity."""
    per_rate = load_per_rate(arrivals_at(config, 1.0), cost)
    if config.rates:
        return [(r, r * per_rate) for r in config.rates]
    return [(x / per_rate, x) for x in config.loads]


# --- one policy ----------------------------------------------------------------------------------


def app_args(config: LiveConfig, policy: str, cost_file: Path | None) -> dict:
    """The app of one policy; only threshold policies read a cost model."""
    return {
        "model": config.model,
        "policy": policy,
        "num_model_actors": 1,
        "model_actor_resources": {"num_cpus": 1, "num_gpus": 0},
        "kv_cache_tokens": config.kv_cache_tokens,
        "cost_file": str(cost_file) if cost_file and policy in THRESHOLD_POLICIES else None,
        # The policy keeps the calibrated model the simulator runs with (no online refit).
        "online_cost_fit": False,
    }


def simulate(policy: str, arrivals: list[Arrival], cost: CostModel, clock: CostModel | None = None) -> dict:
    out = run_policy(policy, arrivals, cost, hint=WorkloadHint(), clock=clock)
    return {k: out[k] for k in (*COMPARED_KEYS, "evictions", "guard_fires")}


def relative(sim: float, live: float) -> float:
    return abs(sim - live) / live if live > 0 and math.isfinite(live) else math.inf


def sim_error(live: dict, sim: dict) -> float:
    """The larger relative error of the simulated mean latency and throughput against live."""
    return max(relative(sim["latency_mean_s"], live["latency_mean_s"]),
               relative(sim["throughput_tok_s"], live["throughput_tok_s"]))


def speed_check(config: LiveConfig, url: str, cost: CostModel, rate: float) -> float | None:
    """The run's own deployment, just before the run: a slice of the workload (another seed) at
    the run's own rate, and how much slower (+) or faster (-) its steps are than the calibration
    says. The calibration ran in another deployment minutes earlier and at a lower load; on a
    2-core box the serving processes' CPU grows with the load and slows the model's steps, and
    at load 0.7 queueing turns a few percent of step time into two or three times as much
    latency."""
    if config.speed_check_requests <= 0:
        return None
    probe = replace(config, seed=config.seed + 2000, num_requests=config.speed_check_requests)
    reset_steps()
    play(url, arrivals_at(probe, rate), 200_000, "speed-check")
    return slowdown(step_samples(), cost)


def scaled(cost: CostModel, speed: float) -> CostModel:
    """The cost model with every step `speed` (a fraction) slower."""
    f = 1.0 + speed
    return replace(cost, d0=cost.d0 * f, d_tok=cost.d_tok * f, d_kv=cost.d_kv * f)


def run_one(config: LiveConfig, policy: str, url: str, cost: CostModel, rate: float, load: float,
            spread: float = 0.0) -> dict:
    """One policy at one rate: the load generator against the app, and the simulator twice:
    with the calibrated cost model (the prediction), and replayed with a cost model fitted to
    the run's own steps (the policy still plans with the calibrated one, as the live one did).
    The replay checks the twin's scheduling; their gap is the box's drift."""
    arrivals = arrivals_at(config, rate)
    speed = speed_check(config, url, cost, rate)
    check = "" if speed is None else f"; speed check: steps {speed:+.1%} vs calibration"
    log(config, f"{policy}: rate {rate:.3g} req/s (load {load:.2f}), {len(arrivals)} requests{check}")
    reset_steps()
    live = loadgen.report(loadgen.run_sync(url, arrivals, progress=config.progress))
    samples = step_samples()
    run_fit = robust_fit(samples, kv_capacity_tokens=cost.kv_capacity_tokens, block_size=cost.block_size,
                         name=f"{config.model}@run", mean_preserving=True)
    # The prediction: the policy plans with the calibration (as the live one does), steps take
    # the calibration's time corrected by the speed check, both known before the run starts.
    clock = cost if speed is None else scaled(cost, speed)
    sim = simulate(policy, arrivals, cost, clock=clock)
    # The range: the same, with the box 2 standard deviations of its measured speed moves
    # faster and slower (queueing amplifies a few percent of step time at high load).
    low, high = (simulate(policy, arrivals, cost, clock=scaled(clock, f * 2 * spread))["latency_mean_s"]
                 for f in (-1, 1))
    replay = simulate(policy, arrivals, cost, clock=run_fit.model)
    run = {"policy": policy, "rate": rate, "load": load, "live": live, "sim": sim, "replay": replay,
           "sim_error": sim_error(live, sim), "replay_error": sim_error(live, replay),
           "predicted_range_s": [low, high],
           "in_range": low <= live["latency_mean_s"] <= high,
           "speed_check": speed, "drift": slowdown(samples, cost),
           "host_load_avg": os.getloadavg()[0], "cost": asdict(cost), "run_cost": asdict(run_fit.model)}
    log(config, f"  live mean {live['latency_mean_s']:.2f}s {live['throughput_tok_s']:.1f} tok/s | "
                 f"sim mean {sim['latency_mean_s']:.2f}s {sim['throughput_tok_s']:.1f} tok/s | "
                 f"error {run['sim_error']:.0%} (range {low:.2f}-{high:.2f}s) | steps {run['drift']:+.0%} vs calibration | "
                 f"replay mean {replay['latency_mean_s']:.2f}s error {run['replay_error']:.0%}")
    return run


# --- the whole comparison ------------------------------------------------------------------------


def local_deployer(port: int) -> Deployer:
    """deploy.local.start on `port`, redeploying only when the app args change."""
    from deploy.local import start

    current: dict = {}

    def deploy(args: dict) -> str:
        if current.get("args") != args:
            current["url"], current["args"] = start(args, port=port), args
        return current["url"]

    return deploy


def run(config: LiveConfig, deploy: Deployer | None = None) -> dict:
    """Every policy at every rate, live and simulated. `deploy` (re)deploys the app."""
    deploy = deploy or local_deployer(config.port)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    # The cost in use is always written here (the live app's threshold policies read it too).
    cost_file = config.out_dir / f"cost-{model_slug(config.model)}-live.json"
    cost = CostModel.load(config.cost_file) if config.cost_file else None
    if cost is not None:
        cost.save(cost_file)
    fits: list[Calibration] = []

    def calibrate() -> CostModel:
        # Under a work-conserving policy: a calibration must not see a threshold policy idle.
        calibration = calibrate_live(deploy(app_args(config, "vllm", None)), config)
        calibration.fit.model.save(cost_file)
        fits.append(calibration)
        return calibration.fit.model

    cost = cost or calibrate()
    plan = rate_plan(config, cost)  # from the first calibration: every policy, the same arrivals
    runs = []
    for k, (rate, load) in enumerate(plan):
        if config.calibrate_each and k > 0:
            cost = calibrate()
        # The policies side by side at each rate: this box's speed drifts over minutes, and
        # the comparison must not depend on which policy ran when.
        for policy in config.policies:
            spread = fits[-1].speed_spread if fits else 0.0
            run = run_one(config, policy, deploy(app_args(config, policy, cost_file)), cost, rate, load, spread)
            if fits:
                run["calibration"] = calibration_report(fits[-1])
            runs.append(run)
    runs.sort(key=lambda r: (config.policies.index(r["policy"]), r["rate"]))
    return {"model": config.model, "cost": asdict(cost), "cost_r2": fits[-1].fit.r2 if fits else None,
            "calibration": calibration_report(fits[-1]) if fits else None, "cost_file": str(cost_file),
            "num_requests": config.num_requests, "max_prompt": config.max_prompt,
            "max_output": config.max_output, "runs": runs}


# --- CLI -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fluidserve bench live", description=__doc__.splitlines()[0])
    p.add_argument("--policies", type=choices(POLICY_NAMES, "policies"), default=["nested-wait", "vllm", "sarathi"])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", help=f"CSV trace (default: {DEFAULT_TRACE.name})")
    src.add_argument("--types", help="synthetic prompt:output[:share],...")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rates", type=positive(float), help="requests/s, e.g. 0.5,1,2")
    how.add_argument("--loads", type=positive(float), help="fractions of the calibrated fluid capacity")
    p.add_argument("--num-requests", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="default", help="default | random:tiny | ...")
    p.add_argument("--max-prompt", type=int, default=loadgen.DEFAULT_MAX_PROMPT)
    p.add_argument("--max-output", type=int, default=loadgen.DEFAULT_MAX_OUTPUT)
    p.add_argument("--kv-cache-tokens", type=int, default=16384)
    p.add_argument("--cost-file", help="reuse this live calibration (e.g. a cost-*-live.json an "
                   "earlier run wrote to --out-dir) instead of calibrating; only on the same box")
    p.add_argument("--calibration-repeats", type=int, default=PROBE_REPEATS,
                   help="rounds of calibration probes (more: a tighter fit, a longer calibration)")
    p.add_argument("--speed-check-requests", type=int, default=SPEED_CHECK_REQUESTS,
                   help="requests of the workload at the run's rate on each run's deployment before "
                        "it, to correct the calibration for the box's speed then (default 0: none)")
    p.add_argument("--calibrate-each", action="store_true",
                   help="re-fit the cost model before every rate (a shared, drifting box)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--json", action="store_true", help="print {\"runs\": [...]} as the last line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = LiveConfig(
        policies=args.policies, rates=args.rates or [], loads=args.loads or [], trace=args.trace,
        types=args.types, num_requests=args.num_requests, seed=args.seed, model=args.model,
        max_prompt=args.max_prompt, max_output=args.max_output, kv_cache_tokens=args.kv_cache_tokens,
        cost_file=args.cost_file, calibrate_each=args.calibrate_each,
        calibration_repeats=args.calibration_repeats, speed_check_requests=args.speed_check_requests,
        out_dir=args.out_dir, port=args.port,
        progress=sys.stderr.isatty(),
    )
    started = time.monotonic()
    try:
        out = run(config)
    finally:
        _stop_local()
    out["wall_s"] = time.monotonic() - started
    write_results(out, config.out_dir)
    if args.json:
        print(json.dumps(out))
    else:
        print(markdown(out))
    return 0


def _stop_local() -> None:
    from deploy.local import stop

    stop()


if __name__ == "__main__":
    sys.exit(main())
