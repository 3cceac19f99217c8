"""The paper's experiments (scheduler/SCHEDULING.md §7) in the simulator: sweeps over lambda per policy.

    python -m bench.paper [--quick] [--out bench/results]      (also: fluidserve bench paper)

Writes paper.csv, one PNG per experiment (mean latency and TTFT vs lambda, the two fluid limits
as dashed lines: load < 1 and M* <= C) and paper.md (the tables) to --out. Preset
a100-llama2-7b throughout. Nested WAIT runs in both modes: production (the default) and the
paper's rule (`nested-wait-paper`); on LMSYS the paper's rule uses the per-lambda setting found
by bench/tune_nested.py (results/nested_tuned.json) when present, as the paper tunes B and L per
lambda.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from scheduler import fluid
from scheduler.cost import CostModel, preset
from scheduler.experiment import run_policy
from scheduler.workload import (LMSYS_TRACE, Arrival, job_types, parse_types, read_trace,
                                synthetic_workload, trace_workload)

RESULTS = Path(__file__).resolve().parent / "results"
COST = preset("a100-llama2-7b")
ALL = ("wait", "nested-wait", "nested-wait-paper", "sarathi", "vllm")
# A column label -> (policy name, its args); labels not listed are policy names.
VARIANTS = {"nested-wait-paper": ("nested-wait", {"mode": "paper"})}


@dataclass
class Experiment:
    name: str
    title: str
    rates: list[float]
    quick_rates: list[float]
    types: str | None = None  # synthetic spec; None: the LMSYS trace
    policies: tuple[str, ...] = ALL
    num_requests: int = 2000
    nested: dict = field(default_factory=dict)  # Nested WAIT parameters


def experiments() -> list[Experiment]:
    return [
        Experiment("p512d20", "p512d20", [14, 16, 18, 19, 20, 21, 22, 23, 24, 25], [18, 22, 23],
                   "512:20"),
        Experiment("mix20_50", "0.7 p512d20 + 0.3 p512d50 (Nested WAIT segments [20, 50])",
                   [14, 16, 18, 19, 20, 21, 22, 23, 24], [18, 22, 23], "512:20:0.7,512:50:0.3",
                   nested={"bounds": [20, 50]}),
        Experiment("p512d1000", "p512d1000", [4.5], [4.5], "512:1000", num_requests=400),
        Experiment("lmsys", "LMSYS-Chat-1M (in < 200, out < 500)", [10, 20, 30, 40, 45, 48],
                   [20, 40], None, policies=("nested-wait", "nested-wait-paper", "sarathi", "vllm"),
                   num_requests=3000),
        Experiment("two_types", "l = (10, 10), o = (10, 20), equal rates",
                   [200, 300, 400, 450, 500], [300, 450], "10:10:0.5,10:20:0.5"),
        Experiment("three_types", "l = 20, o = (100, 200, 300), rates 6:4:2",
                   [30, 40, 45, 50, 55], [40, 50], "20:100:0.5,20:200:0.3333333333333333,"
                   "20:300:0.16666666666666669"),
        Experiment("nested4", "Nested WAIT, o = (20, 40, 80, 160), rates 20:40:80:160, l = 20",
                   [40, 60, 70, 80, 90], [60, 80],
                   "20:20:0.06666666666666667,20:40:0.13333333333333333,"
                   "20:80:0.26666666666666666,20:160:0.5333333333333333",
                   nested={"bounds": [20, 40, 80, 160]}),
    ]


# --- workloads ------------------------------------------------------------------------------

_TRACE_ROWS = None


def lmsys_arrivals(rate: float, n: int, seed: int = 0) -> list[Arrival]:
    """The paper's LMSYS trace (20,000 rows shipped in scheduler/data), Poisson at rate."""
    global _TRACE_ROWS
    if _TRACE_ROWS is None:
        _TRACE_ROWS = read_trace(LMSYS_TRACE)
    return trace_workload(_TRACE_ROWS, n, seed, rate=rate)


def arrivals_for(exp: Experiment, rate: float, n: int, seed: int = 0) -> list[Arrival]:
    if exp.types is None:
        return lmsys_arrivals(rate, n, seed)
    return synthetic_workload(parse_types(exp.types), rate, n, seed)


def fluid_types(exp: Experiment, rate: float) -> list[fluid.JobType]:
    if exp.types is None:
        return job_types(lmsys_arrivals(rate, 5000), rate)
    return [fluid.JobType(t.prompt_len, t.output_len, rate * t.share) for t in parse_types(exp.types)]


def limits(exp: Experiment, cost: CostModel = COST) -> fluid.RateLimits:
    """The rates where the fluid load reaches 1 and where M* reaches C (both linear in rate)."""
    return fluid.rate_limits(fluid_types(exp, 1.0), cost)


def nested_params(exp: Experiment, label: str, rate: float, tuned: dict) -> tuple[dict, str]:
    """Nested WAIT's parameters at this rate and a note on where they come from."""
    params = dict(exp.nested)
    if label == "nested-wait-paper" and exp.types is None and tuned:
        nearest = min(tuned, key=lambda r: abs(float(r) - rate))
        return {**tuned[nearest], **params}, f"paper's rule tuned on the grid at lambda = {float(nearest):g}"
    if exp.types is not None:
        return params, "segments at the known lengths"
    return params, "10 quantile segments of the observed lengths"


# --- the sweep ------------------------------------------------------------------------------

FIELDS = ("experiment", "policy", "rate", "latency_mean_s", "latency_p99_s", "ttft_mean_s",
          "throughput_tok_s", "fluid_throughput_tok_s", "completed", "submitted", "evictions",
          "peak_kv_tokens", "params", "sim_wall_s")


def run_experiment(exp: Experiment, quick: bool, tuned: dict) -> list[dict]:
    rows = []
    n = max(200, exp.num_requests // 4) if quick else exp.num_requests
    for rate in (exp.quick_rates if quick else exp.rates):
        arrivals = arrivals_for(exp, rate, n)
        for policy in exp.policies:
            name, args = VARIANTS.get(policy, (policy, {}))
            params, note = ({}, "")
            if name == "nested-wait":
                params, note = nested_params(exp, policy, rate, tuned)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # thresholds past the stability limit warn
                out = run_policy(name, arrivals, COST, {**args, **params})
            row = {k: out.get(k) for k in FIELDS}
            row.update(experiment=exp.name, policy=policy, rate=rate,
                       params=json.dumps(params) if params else note)
            rows.append(row)
            print(f"{exp.name:12s} {policy:12s} lambda={rate:<6g} latency {out['latency_mean_s']:8.3f} s"
                  f"  ttft {out['ttft_mean_s']:7.3f} s  ({out['sim_wall_s']:.1f} s)", flush=True)
    return rows


def plot(exp: Experiment, rows: list[dict], limit: fluid.RateLimits, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    for ax, key, label in ((axes[0], "latency_mean_s", "mean latency (s)"),
                           (axes[1], "ttft_mean_s", "mean TTFT (s)")):
        for policy in exp.policies:
            pts = sorted((r["rate"], r[key]) for r in rows if r["policy"] == policy)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=policy)
        ax.axvline(limit.load, color="grey", ls="--", lw=1, label=f"load = 1 at {limit.load:.1f}/s")
        ax.axvline(limit.memory, color="tab:red", ls=":", lw=1,
                   label=f"M* = C at {limit.memory:.1f}/s")
        ax.set_yscale("log")
        ax.set_xlabel("arrival rate lambda (req/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(exp.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{exp.name}.png")
    plt.close(fig)


def markdown(exps: list[Experiment], rows: list[dict], limits: dict[str, fluid.RateLimits]) -> str:
    lines = ["# Paper reproduction (simulated, preset a100-llama2-7b)", "",
             "Mean latency / mean TTFT in seconds per policy; `python -m bench.paper` regenerates "
             "this file, paper.csv and the plots. `nested-wait` is production Nested WAIT (the "
             "default), `nested-wait-paper` the paper's rule with its conditions enforced; on "
             "LMSYS the paper's rule is tuned per lambda on a grid (bench/tune_nested.py), as the "
             "paper does; elsewhere both use the known lengths as segments.", ""]
    for exp in exps:
        mine = [r for r in rows if r["experiment"] == exp.name]
        if not mine:
            continue
        lim = limits[exp.name]
        lines += [f"## {exp.title}", "", f"Fluid limits: load < 1 below lambda = {lim.load:.2f} req/s, "
                  f"M* <= C up to {lim.memory:.2f} req/s ({mine[0]['submitted']} requests per run). "
                  f"![{exp.name}]({exp.name}.png)", ""]
        lines.append("| lambda | " + " | ".join(exp.policies) + " | fluid tok/s |")
        lines.append("|---" * (len(exp.policies) + 2) + "|")
        for rate in sorted({r["rate"] for r in mine}):
            cells = []
            for policy in exp.policies:
                r = next(x for x in mine if x["rate"] == rate and x["policy"] == policy)
                cells.append(f"{r['latency_mean_s']:.2f} / {r['ttft_mean_s']:.2f}")
            fluid_tp = next(
                x["fluid_throughput_tok_s"] for x in mine if x["rate"] == rate)
            lines.append(f"| {rate:g} | " + " | ".join(cells) + f" | {fluid_tp:,.0f} |")
        notes = {f"{r['policy']}: {r['params']}" for r in mine
                 if r["policy"].startswith("nested-wait") and r["params"]}
        if notes:
            lines += ["", "Nested WAIT settings: " + "; ".join(sorted(notes))]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fluidserve bench paper", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rates and requests (< 1 minute)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--only", help="comma-separated experiment names")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tuned_path = RESULTS / "nested_tuned.json"
    tuned = json.loads(tuned_path.read_text()) if tuned_path.is_file() else {}
    exps = experiments()
    if args.only:
        wanted = set(args.only.split(","))
        exps = [e for e in exps if e.name in wanted]
    t0 = time.perf_counter()
    rows: list[dict] = []
    limit: dict[str, fluid.RateLimits] = {}
    for exp in exps:
        limit[exp.name] = limits(exp)
        mine = run_experiment(exp, args.quick, tuned)
        rows += mine
        plot(exp, mine, limit[exp.name], out)
    with (out / "paper.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
                             for k, v in r.items()})
    (out / "paper.md").write_text(markdown(exps, rows, limit))
    print(json.dumps({"runs": len(rows), "wall_s": round(time.perf_counter() - t0, 1), "out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
