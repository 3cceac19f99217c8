"""Simulator speed: 20,000 LMSYS requests at lambda = 40 with Nested WAIT (target < 10 s, one core).

    python -m bench.sim_speed [--num-requests 20000] [--rate 40]

Prints a line and, last, one JSON object (also written to bench/results/sim_speed.json).
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
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run_policy("nested-wait", arrivals, preset("a100-llama2-7b"))
    wall = time.perf_counter() - t0
    result = {"requests": args.num_requests, "rate": args.rate, "policy": "nested-wait",
              "wall_s": round(wall, 2), "target_s": 10.0, "completed": out["completed"],
              "requests_per_wall_s": round(args.num_requests / wall)}
    print(f"simulated {args.num_requests:,} requests in {wall:.2f} s (target < 10 s)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "sim_speed.json").write_text(json.dumps(result) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
