"""Simulator speed: 20,000 LMSYS requests at lambda = 40 with Nested WAIT (target < 10 s, one core).

    python -m bench.sim_speed [--num-requests 20000] [--rate 40]

Nested WAIT and, side by side in the same process, Sarathi (the cheapest policy to plan: the
ratio says what Nested WAIT's forecast and gates cost). Times are this process's CPU time (the
box may be shared) and wall time. Prints a line per policy and, last, one JSON object (also
written to bench/results/sim_speed.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from bench.paper import RESULTS, lmsys_arrivals
from scheduler.cost import preset
from scheduler.experiment import run_policy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=40.0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    arrivals = lmsys_arrivals(args.rate, args.num_requests)
    result = {"requests": args.num_requests, "rate": args.rate, "target_s": 10.0}
    for policy in ("nested-wait", "sarathi"):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = run_policy(policy, arrivals, preset("a100-llama2-7b"))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        key = policy.replace("-", "_")
        result |= {f"{key}_cpu_s": round(cpu, 2), f"{key}_wall_s": round(wall, 2),
                   f"{key}_completed": out["completed"]}
        print(f"{policy}: simulated {args.num_requests:,} requests in {cpu:.2f} s CPU ({wall:.2f} s wall)")
    result["nested_wait_vs_sarathi"] = round(result["nested_wait_cpu_s"] / result["sarathi_cpu_s"], 2)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "sim_speed.json").write_text(json.dumps(result) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
