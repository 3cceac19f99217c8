"""Discrete-event simulator: the live SchedulerCore and policy, timed by a cost model.

Each iteration the core plans a batch exactly as the live scheduler actor does; instead of a
model actor, the cost model says how long it took and the request's known output length says
when it ends (a simulated EOS).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from scheduler.core import SchedulerCore
from scheduler.cost import CostModel
from scheduler.errors import SchedulingError
from scheduler.plan import StepResult
from scheduler.policies.base import Policy
from scheduler.request import Request
from scheduler.workload import Arrival

LATENCY_KEYS = (
    "latency_mean_s", "latency_p50_s", "latency_p90_s", "latency_p99_s",
    "ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_mean_s",
    "tpot_p50_s", "tpot_p99_s",
)
# Service-level objectives for goodput, as `vllm bench serve --goodput ttft:MS tpot:MS` counts
# them: a request counts if it meets both (TPOT is 0 for a one-token answer).
GOODPUT_SLO = {"ttft_s": 2.0, "tpot_s": 0.2}  # `goodput_rps`
CHAT_SLO = {"ttft_s": 0.5, "tpot_s": 0.05}  # `goodput_chat_rps`: an interactive chat


@dataclass
class IterationLog:
    """Per-iteration record, for calibration checks and plots."""

    start: float
    duration: float
    new_tokens: int
    attended_kv: int
    batch_size: int


_SIM_TOKENS = [-1] * 1024  # simulated tokens: no ids, no EOS (output_len ends a request)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; nan for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _tpot(r: Request) -> float:
    """Time per output token after the first (0 for a one-token answer)."""
    return (r.finish_time - r.first_token_time) / (r.num_generated - 1) if r.num_generated > 1 else 0.0


def goodput(finished: list[Request], elapsed_s: float, slo: dict) -> float:
    """Requests per second that met both the TTFT and the TPOT objective of `slo`."""
    good = sum(1 for r in finished
               if r.first_token_time - r.arrival_time <= slo["ttft_s"] and _tpot(r) <= slo["tpot_s"])
    return good / elapsed_s if elapsed_s > 0 else 0.0


def summarize(finished: list[Request], elapsed_s: float) -> dict:
    """Throughput, latency and goodput figures shared by the simulator and the load generator."""
    latencies = [r.finish_time - r.arrival_time for r in finished]
    ttfts = [r.first_token_time - r.arrival_time for r in finished]
    tpots = [_tpot(r) for r in finished if r.num_generated > 1]
    tokens = sum(r.num_generated for r in finished)
    out = {"throughput_tok_s": tokens / elapsed_s if elapsed_s > 0 else 0.0}
    for name, xs in (("latency", latencies), ("ttft", ttfts)):
        out[f"{name}_mean_s"] = sum(xs) / len(xs) if xs else math.nan
        for q in (50, 90, 99):
            out[f"{name}_p{q}_s"] = percentile(xs, q)
    out["tpot_mean_s"] = sum(tpots) / len(tpots) if tpots else math.nan
    out["tpot_p50_s"] = percentile(tpots, 50)
    out["tpot_p99_s"] = percentile(tpots, 99)
    out["goodput_rps"] = goodput(finished, elapsed_s, GOODPUT_SLO)
    out["goodput_chat_rps"] = goodput(finished, elapsed_s, CHAT_SLO)
    return out


def simulate(
    arrivals: list[Arrival],
    policy: Policy,
    cost: CostModel,
    max_model_len: int | None = None,
    progress: bool = False,
    log_iterations: bool = False,
    max_tokens: int | None = None,
) -> dict:
    """Run a workload to completion; returns the `fluidserve simulate --json` keys.

    Every request's `max_tokens` is `max_tokens` (default: the workload's longest output, as a
    client sets one cap for all), never its own output length: that is its EOS, which no policy
    may see (only WAIT, which assumes known lengths, reads `output_len`).
    """
    wall0 = time.perf_counter()
    core = SchedulerCore(
        policy,
        num_blocks=cost.kv_capacity_tokens // cost.block_size,
        block_size=cost.block_size,
        max_model_len=max_model_len,
        materialize=False,
    )
    arrivals = sorted(arrivals, key=lambda a: a.time)
    cap = max_tokens or max((a.output_len for a in arrivals), default=1)
    finished: list[Request] = []
    iterations: list[IterationLog] = []
    rejected = peak_blocks = 0
    kv_time = 0.0  # integral of used KV tokens over time, for the mean usage
    now, i, n = 0.0, 0, len(arrivals)
    bar = _progress(n) if progress else None
    while True:
        while i < n and arrivals[i].time <= now:
            rejected += _submit(core, arrivals[i], i, now, cap)
            i += 1
        plan = core.plan(0, now)
        if plan is None:
            wake = core.next_wake(0)
            next_arrival = arrivals[i].time if i < n else math.inf
            if wake is not None and now < wake < next_arrival:
                now = wake
            elif next_arrival < math.inf:
                now = max(now, next_arrival)
            elif core.has_work():
                now = max(now, wake or now) + 1e-3  # guard pending: step past its deadline
            else:
                break
            continue
        duration = cost.iteration_time(plan.num_new_tokens, plan.num_attended_kv)
        used = core.workers[0].pool.num_used_blocks  # what this iteration holds
        peak_blocks = max(peak_blocks, used)
        kv_time += used * duration
        if log_iterations:
            iterations.append(IterationLog(now, duration, plan.num_new_tokens, plan.num_attended_kv, len(plan)))
        now += duration
        while len(_SIM_TOKENS) < plan.num_sampled:
            _SIM_TOKENS.extend(_SIM_TOKENS)
        result = StepResult(0, plan.iteration, _SIM_TOKENS)  # the core reads only what it sampled
        for event in core.commit(plan, result, now):
            if event.finish_reason:
                finished.append(event.request)
                if bar:
                    bar.update(1)
    if bar:
        bar.close()
    first = arrivals[0].time if arrivals else 0.0
    out = {
        "policy": policy.name,
        "submitted": n,
        "completed": len(finished),
        "rejected": rejected,
        "evictions": core.num_evictions,
        **summarize(finished, now - first),
        "peak_kv_tokens": peak_blocks * cost.block_size,
        "mean_kv_tokens": kv_time * cost.block_size / (now - first) if now > first else 0.0,
        "kv_capacity_tokens": core.workers[0].pool.capacity_tokens,
        "guard_fires": core.num_guard_fires,
        "sim_wall_s": time.perf_counter() - wall0,
    }
    if log_iterations:
        out["iterations"] = iterations
    return out


def _submit(core: SchedulerCore, a: Arrival, index: int, now: float, max_tokens: int) -> int:
    """Submit one arrival; returns 1 if the core rejected it."""
    req = Request(
        request_id=str(index),
        prompt_len=a.prompt_len,
        max_tokens=max(1, a.output_len, max_tokens),
        arrival_time=a.time,
        output_len=max(1, a.output_len),
    )
    try:
        core.submit(req, now)
    except SchedulingError:
        return 1
    return 0


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="req", desc="simulating", leave=False)
