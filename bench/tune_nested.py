"""Grid search of Nested WAIT's settings on the LMSYS trace, per arrival rate (scheduler/SCHEDULING.md §7).

The paper tunes the total budget B and the number of segments L per lambda for its rule
(`mode: paper`); we also try the fluid thresholds with a slack. Production Nested WAIT needs no
tuning: it decides admission from the forecast, not from B. Writes bench/results/nested_tuned.json ({rate: best params}) and nested_grid.jsonl,
which bench/paper.py uses, and prints the grid.

    python -m bench.tune_nested [--quick] [--rates 20,30,40,45] [--num-requests 2000]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from scheduler.cost import preset
from scheduler.experiment import run_policy
from bench.paper import lmsys_arrivals

RESULTS = Path(__file__).resolve().parent / "results"


def grid(quick: bool) -> list[dict]:
    segments = (1, 3, 10) if quick else (1, 2, 3, 5, 10, 20)
    budgets = (400, 1000) if quick else (200, 400, 700, 1000, 1500)
    out = [{"budget": float(b), "num_segments": L} for L in segments for b in budgets]
    out += [{"slack": s, "num_segments": L} for L in segments for s in ((0.1,) if quick else (0.1, 0.5))]
    return out


def tune(rate: float, n: int, quick: bool, seed: int = 0) -> tuple[dict, list[dict]]:
    """Every grid point at one rate; the best by mean latency (all requests must complete)."""
    cost = preset("a100-llama2-7b")
    arrivals = lmsys_arrivals(rate, n, seed)
    rows = []
    for params in grid(quick):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = run_policy("nested-wait", arrivals, cost, {"mode": "paper", **params})
        rows.append({"rate": rate, **params, "latency_mean_s": out["latency_mean_s"],
                     "ttft_mean_s": out["ttft_mean_s"], "throughput_tok_s": out["throughput_tok_s"],
                     "completed": out["completed"]})
        print(json.dumps(rows[-1]), flush=True)
    done = [r for r in rows if r["completed"] == n]
    best = min(done, key=lambda r: r["latency_mean_s"])
    keys = ("budget", "num_segments", "slack")
    return {k: best[k] for k in keys if k in best}, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rates", default="20,30,40,45")
    ap.add_argument("--num-requests", type=int, default=2000)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    best, all_rows = {}, []
    for rate in (float(r) for r in args.rates.split(",")):
        best[str(rate)], rows = tune(rate, args.num_requests, args.quick)
        all_rows += rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nested_tuned.json").write_text(json.dumps(best, indent=1) + "\n")
    (out / "nested_grid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in all_rows))
    print(json.dumps({"best": best, "wall_s": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
