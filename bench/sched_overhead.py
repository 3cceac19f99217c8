"""Scheduling overhead: SchedulerCore.plan + commit per iteration, as a share of an iteration.

    python -m bench.sched_overhead [--waiting 1000,10000] [--policies ...] [--iterations 300] [--json]

The live dispatch loop does, per model-actor iteration, `core.plan` (policy selection, KV fit,
materialised chunks with token ids, block tables and slot mappings) and `core.commit`. Here the
executor is instant (every sampled token comes back at once), the queue is kept topped up to
1k / 10k waiting requests (LMSYS lengths), and the clock advances by the nominal iteration time,
so the policies see a real-looking arrival stream. Reported: mean and p90 microseconds per
iteration after a warm-up that fills the batch, and the mean's share of a 20 ms CPU iteration, a
10 ms A100 iteration (Llama-2-7B, d0 ~ 8 ms) and, when a calibration is cached, its d0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from itertools import count
from pathlib import Path

from scheduler.core import SchedulerCore
from scheduler.cost import CostModel, preset
from scheduler.experiment import workload_hint
from scheduler.plan import StepResult, TokenResult
from scheduler.policies import POLICY_NAMES, PolicyConfig, make_policy
from scheduler.request import Request
from scheduler.workload import DEFAULT_TRACE, Arrival, read_trace, trace_workload

ITERATION_S = {"cpu_20ms": 0.020, "a100_10ms": 0.010}
TARGET_SHARE = 0.05
CALIBRATION = Path(__file__).resolve().parent / "results" / "cost-default-live.json"


class Bench:
    """One policy's core with a waiting queue kept at `waiting` requests."""

    def __init__(self, policy: str, waiting: int, cost: CostModel, rate: float) -> None:
        rows = read_trace(DEFAULT_TRACE)
        self.lengths: list[Arrival] = trace_workload(rows, len(rows), 0, rate=rate)
        hint = workload_hint(self.lengths)
        params = {"kv_capacity_tokens": cost.kv_capacity_tokens} if policy in ("nested-wait", "wait") else {}
        self.core = SchedulerCore(make_policy(policy, PolicyConfig(), cost=cost, hint=hint, **params),
                                  num_blocks=cost.kv_capacity_tokens // cost.block_size,
                                  block_size=cost.block_size, max_model_len=8192)
        self.waiting = waiting
        self.ids = count()
        self.now = 0.0

    def top_up(self) -> None:
        while self.core.num_waiting < self.waiting:
            i = next(self.ids)
            a = self.lengths[i % len(self.lengths)]
            req = Request(str(i), a.prompt_len, a.output_len, self.now,
                          prompt_token_ids=[100] * a.prompt_len, output_len=a.output_len)
            self.core.submit(req, self.now)

    def step(self, dt: float) -> tuple[float, int] | None:
        """One timed plan + commit; (seconds, batch size), or None if the policy idled."""
        self.top_up()
        start = time.perf_counter()
        plan = self.core.plan(0, self.now)
        if plan is None:
            self.now = max(self.now + dt, self.core.next_wake(0) or 0.0)
            return None
        result = StepResult(0, plan.iteration, [TokenResult(c.request_id, 7) for c in plan.chunks if c.sample])
        self.core.commit(plan, result, self.now + dt)
        elapsed = time.perf_counter() - start
        self.now += dt
        return elapsed, len(plan.chunks)


def measure(policy: str, waiting: int, cost: CostModel, iterations: int, warmup: int) -> dict:
    # Arrivals at roughly the capacity of the A100 preset (~30 req/s of LMSYS lengths).
    bench = Bench(policy, waiting, cost, rate=30.0)
    times, batches = [], []
    dt = ITERATION_S["a100_10ms"]
    steps = 0
    while len(times) < iterations and steps < 50 * (iterations + warmup):
        steps += 1
        out = bench.step(dt)
        if out is None or steps <= warmup:
            continue
        times.append(out[0])
        batches.append(out[1])
    mean = statistics.fmean(times) if times else float("nan")
    return {
        "policy": policy, "waiting": waiting, "iterations": len(times),
        "mean_us": mean * 1e6, "p90_us": _p90(times) * 1e6,
        "mean_batch": statistics.fmean(batches) if batches else 0.0,
    }


def _p90(xs: list[float]) -> float:
    return sorted(xs)[int(0.9 * (len(xs) - 1))] if xs else float("nan")


def shares(row: dict, budgets: dict[str, float]) -> dict:
    return {f"share_{name}": row["mean_us"] * 1e-6 / seconds for name, seconds in budgets.items()}


def budgets() -> dict[str, float]:
    out = dict(ITERATION_S)
    if CALIBRATION.is_file():
        out["calibrated_d0"] = CostModel.load(CALIBRATION).d0
    return out


def print_table(rows: list[dict], budget: dict[str, float]) -> None:
    names = list(budget)
    head = f"{'policy':<12} {'waiting':>8} {'batch':>6} {'mean us':>9} {'p90 us':>9} " + \
        " ".join(f"{'% of ' + n:>18}" for n in names)
    print(head)
    for r in rows:
        print(f"{r['policy']:<12} {r['waiting']:>8} {r['mean_batch']:>6.0f} {r['mean_us']:>9.0f} "
              f"{r['p90_us']:>9.0f} " + " ".join(f"{100 * r['share_' + n]:>17.2f}%" for n in names))
    print("budgets: " + ", ".join(f"{n} = {s * 1e3:.1f} ms" for n, s in budget.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sched_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--waiting", default="1000,10000")
    p.add_argument("--policies", default="nested-wait,wait,vllm,sarathi")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    policies = [x for x in args.policies.split(",") if x]
    bad = [x for x in policies if x not in POLICY_NAMES]
    if bad:
        print(f"unknown policies {bad}", file=sys.stderr)
        return 2
    cost = preset("a100-llama2-7b")
    budget = budgets()
    rows = []
    for policy in policies:
        for waiting in (int(w) for w in args.waiting.split(",")):
            row = measure(policy, waiting, cost, args.iterations, args.warmup)
            rows.append({**row, **shares(row, budget)})
    print_table(rows, budget)
    worst = max(r["share_a100_10ms"] for r in rows)
    out = {"rows": rows, "budgets_s": budget, "max_share_a100_10ms": worst, "target_share": TARGET_SHARE}
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
