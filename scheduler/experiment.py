"""One simulated run from user-level inputs: a workload, a policy name, a cost model.

Shared by the CLI, the paper's sweeps and the live benchmark, so all three build workloads and
policies the same way.
"""
from __future__ import annotations

import math

from scheduler.cost import CostModel
from scheduler.policies import PolicyConfig, WorkloadHint, make_policy
from scheduler.simulate import simulate
from scheduler.workload import (
    Arrival,
    WorkloadError,
    parse_types,
    read_trace,
    synthetic_workload,
    trace_workload,
)


def build_workload(
    types: str | None, trace: str | None, rate: float | None, n: int, seed: int, replay: bool = False
) -> list[Arrival]:
    if types:
        if rate is None:
            raise WorkloadError("--rate is required with --types")
        return synthetic_workload(parse_types(types), rate, n, seed)
    if not trace:
        raise WorkloadError("give --types or --trace")
    return trace_workload(read_trace(trace), n, seed, rate=None if replay else rate, replay=replay)


def workload_hint(arrivals: list[Arrival]) -> WorkloadHint:
    """What the paper assumes known in advance: the arrival rate and the length distribution."""
    if len(arrivals) < 2:
        return WorkloadHint()
    span = arrivals[-1].time - arrivals[0].time
    rate = (len(arrivals) - 1) / span if span > 0 else None
    if rate is not None and not math.isfinite(rate):
        rate = None  # all arrivals at (nearly) one instant: no rate to speak of
    counts: dict[int, int] = {}
    for a in arrivals:
        counts[a.output_len] = counts.get(a.output_len, 0) + 1
    lens = tuple(sorted(counts))
    weights = tuple(counts[o] / len(arrivals) for o in lens)
    prompt = sum(a.prompt_len for a in arrivals) / len(arrivals)
    return WorkloadHint(rate=rate, output_lens=lens, output_weights=weights, prompt_len=prompt)


def run_policy(
    name: str,
    arrivals: list[Arrival],
    cost: CostModel,
    params: dict | None = None,
    max_num_seqs: int = 256,
    progress: bool = False,
    hint: WorkloadHint | None = None,
    log_iterations: bool = False,
    clock: CostModel | None = None,
) -> dict:
    """Simulate `name` on `arrivals`; thresholds see the workload's rate and lengths (the hint).
    The policy plans with `cost`; steps take `clock`'s time (default: the same model), so a
    replay can time a run by what its steps really cost while the policy keeps what it knew."""
    params = dict(params or {})
    config = PolicyConfig(max_num_seqs=params.pop("max_num_seqs", max_num_seqs))
    if "max_num_batched_tokens" in params:
        config.max_num_batched_tokens = params.pop("max_num_batched_tokens")
    hint = hint or workload_hint(arrivals)
    policy = make_policy(name, config, cost=cost, hint=hint, **params)
    out = simulate(arrivals, policy, clock or cost, progress=progress, log_iterations=log_iterations)
    out["fluid_throughput_tok_s"] = fluid_throughput(arrivals)
    out["params"] = policy.describe()
    return out


def fluid_throughput(arrivals: list[Arrival]) -> float:
    """Throughput* = sum_j lambda_j o_j: the offered output tokens per second."""
    if len(arrivals) < 2:
        return 0.0
    span = arrivals[-1].time - arrivals[0].time
    mean_out = sum(a.output_len for a in arrivals) / len(arrivals)
    return (len(arrivals) - 1) / span * mean_out if span > 0 else 0.0
