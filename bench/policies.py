"""Every policy against every baseline at its best, where memory binds and where it does not.

    python -m bench.policies [--quick] [--seeds 3] [--jobs 1] [--kv-capacity 137000,30000]
                             [--workloads p512d200,lmsys] [--out bench/results] [--json]
    python -m bench.policies --ablation     # production Nested WAIT with each rule changed
    (also: fluidserve bench policies ...)

For each workload and KV capacity C, the arrival rate is set to 0.5, 0.8, 0.9 and 0.95 of the
tighter fluid limit (load < 1 and M* <= C, scheduler/fluid.py `rate_limits`), with `--seeds`
seeds each. Policies: production and paper Nested WAIT, WAIT (where lengths are known),
Sarathi-Serve at chunks 512 / 1024 / 2048, the paper's vLLM and current vLLM (vllm-v1). The
cost model is the a100-llama2-7b preset with C overridden. Sarathi is reported at its best chunk
per workload and C (lowest mean latency averaged over the loads); the best baseline of a cell is
the lowest mean latency among Sarathi-best, vLLM and vLLM-v1. Memory binds in a cell when the
best baseline's peak KV reaches 90% of C.

Writes policies.json (every run and the per-cell summary), policies.md (tables and the targets'
verdicts) and one PNG per workload to --out. `--ablation` instead runs production Nested WAIT
with one rule changed at a time (ablation.json, ablation.md): what each rule is worth.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from scheduler import fluid
from scheduler.cost import preset
from scheduler.experiment import run_policy
from scheduler.workload import (
    Arrival,
    TraceRow,
    parse_types,
    read_trace,
    synthetic_workload,
    trace_workload,
)

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[1] / "scheduler" / "data"
LOADS = (0.5, 0.8, 0.9, 0.95)
CAPACITIES = (137_000, 30_000)
SARATHI_CHUNKS = (512, 1024, 2048)
METRICS = ("latency_mean_s", "latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s",
           "tpot_p50_s", "tpot_p99_s", "throughput_tok_s", "fluid_throughput_tok_s", "evictions",
           "goodput_rps", "goodput_chat_rps", "peak_kv_tokens", "mean_kv_tokens", "sim_wall_s")
# Decode steps simulated per run, roughly: request counts follow so every workload costs alike.
WORK_PER_RUN = 200_000


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    types: str | None = None  # synthetic "prompt:output[:share],..."
    trace: str | None = None  # a CSV under scheduler/data/

    @property
    def known_lengths(self) -> bool:
        """WAIT needs a handful of known types; a trace has hundreds of lengths."""
        return self.types is not None


WORKLOADS = (
    Workload("p512d20", "512 prompt, 20 output tokens", types="512:20"),
    Workload("mix20_50", "0.7 p512d20 + 0.3 p512d50", types="512:20:0.7,512:50:0.3"),
    Workload("p512d200", "512 prompt, 200 output tokens", types="512:200"),
    Workload("p1024d500", "1024 prompt, 500 output tokens", types="1024:500"),
    Workload("mix50_200_500", "512 prompt, 50 / 200 / 500 output tokens (equal shares)",
             types="512:50,512:200,512:500"),
    Workload("lmsys", "LMSYS-Chat-1M lengths (20,000 rows)", trace="lmsys_chat_1m_in200_out500.csv"),
    Workload("azure", "Azure conversation trace 2023 (5,000 rows), Poisson arrivals",
             trace="azure_conv_sample.csv"),
)


def policies(w: Workload) -> list[tuple[str, str, dict]]:
    """(label, policy name, policy args) of every policy run on `w`."""
    out = [("nested-wait", "nested-wait", {}), ("nested-wait-paper", "nested-wait", {"mode": "paper"})]
    if w.known_lengths:
        out.append(("wait", "wait", {}))
    out += [(f"sarathi-{c}", "sarathi", {"chunk_size": c}) for c in SARATHI_CHUNKS]
    out += [("vllm", "vllm", {}), ("vllm-v1", "vllm-v1", {})]
    return out


BASELINES = ("sarathi", "vllm", "vllm-v1")  # "sarathi" stands for its best chunk

# Production Nested WAIT with one rule changed (scheduler/SCHEDULING.md §5).
ABLATIONS: dict[str, dict] = {
    "production": {},
    "no KV forecast": {"kv_admission": False},
    "no low-load bypass": {"low_load_bypass": False},
    "admission cap n_1": {"admission_cap": True},
    "pause on overflow": {"eviction": "pause"},
    "z = 0.5": {"z": 0.5},
    "z = 3": {"z": 3.0},
    "token budget 8192": {"max_num_batched_tokens": 8192},
}


def ablation_policies(w: Workload) -> list[tuple[str, str, dict]]:
    return [(label, "nested-wait", args) for label, args in ABLATIONS.items()]


# --- workloads ------------------------------------------------------------------------------

_ROWS: dict[str, list[TraceRow]] = {}


def _rows(w: Workload) -> list[TraceRow]:
    if w.trace not in _ROWS:
        _ROWS[w.trace] = read_trace(DATA / w.trace)
    return _ROWS[w.trace]


def mix(w: Workload) -> list[fluid.JobType]:
    """The workload's lengths as job types at a total rate of 1 req/s (shares only)."""
    if w.types:
        return [fluid.JobType(t.prompt_len, t.output_len, t.share) for t in parse_types(w.types)]
    rows = _rows(w)
    counts: dict[tuple[int, int], int] = {}
    for r in rows:
        counts[(r.prompt_len, r.output_len)] = counts.get((r.prompt_len, r.output_len), 0) + 1
    return [fluid.JobType(p, o, c / len(rows)) for (p, o), c in counts.items()]


def mean_output(w: Workload) -> float:
    types = mix(w)
    return sum(t.rate * t.output_len for t in types) / sum(t.rate for t in types)


def arrivals(w: Workload, rate: float, n: int, seed: int) -> list[Arrival]:
    if w.types:
        return synthetic_workload(parse_types(w.types), rate, n, seed)
    rows = _rows(w)
    start = (seed * n) % len(rows)  # each seed its own stretch of the trace
    return trace_workload(rows[start:] + rows[:start], n, seed, rate=rate)


def num_requests(w: Workload, quick: bool) -> int:
    n = int(WORK_PER_RUN / mean_output(w))
    n = max(400, min(3000, n))
    return max(200, n // 4) if quick else n


# --- running --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    workload: str
    capacity: int
    load: float
    rate: float
    seed: int
    label: str
    policy: str
    args: tuple  # sorted (key, value) pairs of the policy's args
    n: int


def plan_runs(workloads, capacities, loads, seeds, quick, variants=policies) -> list[Run]:
    runs = []
    for w in workloads:
        n = num_requests(w, quick)
        for c in capacities:
            limit = fluid.rate_limits(mix(w), replace(preset("a100-llama2-7b"), kv_capacity_tokens=c))
            for load in loads:
                for seed in range(seeds):
                    for label, name, args in variants(w):
                        runs.append(Run(w.name, c, load, load * limit.tighter, seed, label, name,
                                        tuple(sorted(args.items())), n))
    return runs


def execute(run: Run) -> dict:
    w = next(x for x in WORKLOADS if x.name == run.workload)
    cost = replace(preset("a100-llama2-7b"), kv_capacity_tokens=run.capacity)
    cpu0 = time.process_time()  # CPU time, not wall: the box may be shared while this runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # thresholds near the limits warn; the verdict is kept
        out = run_policy(run.policy, arrivals(w, run.rate, run.n, run.seed), cost, dict(run.args))
    row = {k: out[k] for k in METRICS}
    row.update(workload=run.workload, capacity=run.capacity, load=run.load, rate=run.rate,
               seed=run.seed, policy=run.label, requests=run.n, cpu_s=time.process_time() - cpu0)
    return row


def run_all(runs: list[Run], jobs: int, progress: bool) -> list[dict]:
    rows: list[dict] = []
    t0 = time.perf_counter()

    def note(row: dict) -> None:
        rows.append(row)
        if progress:
            print(f"[{len(rows)}/{len(runs)} {time.perf_counter() - t0:6.0f} s] {row['workload']} "
                  f"C={row['capacity']} load={row['load']} seed={row['seed']} {row['policy']}: "
                  f"latency {row['latency_mean_s']:.3f} s", file=sys.stderr, flush=True)

    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            for row in pool.map(execute, runs, chunksize=4):
                note(row)
    else:
        for run in runs:
            note(execute(run))
    return rows


# --- summarising ----------------------------------------------------------------------------


def cells(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(workload, capacity, load) -> policy label -> metrics averaged over seeds."""
    grouped: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        grouped.setdefault((r["workload"], r["capacity"], r["load"]), {}).setdefault(r["policy"], []).append(r)
    return {key: {p: {m: statistics.fmean(x[m] for x in rs) for m in METRICS}
                  | {"seeds": len(rs), "rate": rs[0]["rate"]}
                  for p, rs in by_policy.items()}
            for key, by_policy in grouped.items()}


def best_chunks(table: dict) -> dict[tuple, str]:
    """(workload, capacity) -> the Sarathi label with the lowest mean latency over the loads."""
    out = {}
    for w, c in {(k[0], k[1]) for k in table}:
        loads = [table[k] for k in table if k[:2] == (w, c)]
        out[(w, c)] = min((f"sarathi-{s}" for s in SARATHI_CHUNKS),
                          key=lambda label: statistics.fmean(t[label]["latency_mean_s"] for t in loads))
    return out


def summary(table: dict) -> list[dict]:
    """One verdict per cell: production Nested WAIT against the best baseline."""
    chunks = best_chunks(table)
    out = []
    for (w, c, load), by in sorted(table.items()):
        candidates = {chunks[(w, c)]: by[chunks[(w, c)]], "vllm": by["vllm"], "vllm-v1": by["vllm-v1"]}
        best_label = min(candidates, key=lambda p: candidates[p]["latency_mean_s"])
        best, nw = candidates[best_label], by["nested-wait"]
        out.append({
            "workload": w, "capacity": c, "load": load, "best_baseline": best_label,
            "memory_binds": best["peak_kv_tokens"] >= 0.9 * c,
            "latency_ratio": nw["latency_mean_s"] / best["latency_mean_s"],
            "ttft_p99_ratio": nw["ttft_p99_s"] / best["ttft_p99_s"] if best["ttft_p99_s"] > 0 else math.nan,
            "throughput_ratio": nw["throughput_tok_s"] / best["throughput_tok_s"],
            "goodput_ratio": (nw["goodput_rps"] / best["goodput_rps"]) if best["goodput_rps"] > 0 else math.nan,
        })
    return out


def verdicts(cells_summary: list[dict]) -> list[str]:
    """The issue's targets, checked against the summary; one line each."""
    lines = []
    binding = [s for s in cells_summary if s["memory_binds"] and s["load"] >= 0.8]
    bad = [s for s in binding if s["latency_ratio"] > 1.0 or s["ttft_p99_ratio"] > 1.0
           or s["throughput_ratio"] < 0.99]
    lines.append(f"Where memory binds (load >= 0.8, best baseline's peak KV >= 90% of C): {len(binding)} "
                 f"cells; Nested WAIT worse than the best baseline on mean latency, p99 TTFT or "
                 f"throughput (> 1% lower) in {len(bad)}: "
                 + (", ".join(_cell(s) for s in bad) or "none"))
    workloads = sorted({(s["workload"], s["capacity"]) for s in binding})
    wins = [wc for wc in workloads
            if any(s["latency_ratio"] <= 0.8 for s in binding if (s["workload"], s["capacity"]) == wc)]
    lines.append(f"Memory-bound workloads (workload, C) with mean latency <= 0.8x the best baseline at "
                 f"some load: {len(wins)} of {len(workloads)} "
                 f"({', '.join(f'{w} C={c:,}' for w, c in wins) or 'none'})")
    over = [s for s in cells_summary if s["latency_ratio"] > 1.05]
    lines.append(f"Cells where mean latency exceeds 1.05x the best baseline: {len(over)} of "
                 f"{len(cells_summary)}: " + (", ".join(_cell(s) for s in over) or "none"))
    return lines


def _cell(s: dict) -> str:
    return (f"{s['workload']} C={s['capacity']:,} load {s['load']} (latency x{s['latency_ratio']:.2f}, "
            f"p99 TTFT x{s['ttft_p99_ratio']:.2f}, throughput x{s['throughput_ratio']:.3f})")


# --- reporting ------------------------------------------------------------------------------

SHOWN = ("nested-wait", "nested-wait-paper", "wait", "sarathi", "vllm", "vllm-v1")


def markdown(table: dict, cells_summary: list[dict], meta: dict) -> str:
    chunks = best_chunks(table)
    lines = ["# Policies against the best baselines (simulated, a100-llama2-7b cost model)", "",
             (f"`python -m bench.policies` ({meta['seeds']} seeds, {meta['runs']} runs, "
             f"{meta['wall_s']:.0f} s wall on {meta['jobs']} processes, {meta['cpu_s']:.0f} s of "
             "CPU). Rates are fractions of the tighter fluid limit (load < 1, "
             "M* <= C). Mean latency (s) per policy; **bold** is the lowest; \"sarathi\" is the best "
             "chunk for that workload and C. `mem` marks cells where memory binds (the best "
             "baseline's peak KV >= 90% of C). Ratios are production Nested WAIT over the best "
             "baseline."), "", "## Verdicts", ""]
    lines += [f"- {v}" for v in verdicts(cells_summary)]
    for w in WORKLOADS:
        for c in sorted({k[1] for k in table if k[0] == w.name}, reverse=True):
            keys = sorted(k for k in table if k[:2] == (w.name, c))
            if not keys:
                continue
            shown = [p for p in SHOWN if p in table[keys[0]] or p == "sarathi"]
            lines += ["", f"## {w.title}, C = {c:,} (Sarathi chunk {chunks[(w.name, c)].split('-')[1]})",
                      "", f"![{w.name}](policies_{w.name}.png)", "",
                      "| load | rate | " + " | ".join(shown) + " | latency | p99 TTFT | thr. | goodput | mem |",
                      "|---" * (len(shown) + 7) + "|"]
            for k in keys:
                by = dict(table[k])
                by["sarathi"] = by[chunks[(w.name, c)]]
                lat = {p: by[p]["latency_mean_s"] for p in shown}
                low = min(lat.values())
                s = next(x for x in cells_summary if (x["workload"], x["capacity"], x["load"]) == k)
                cells_ = [(f"**{v:.2f}**" if v == low else f"{v:.2f}") for v in lat.values()]
                rate = by["vllm"]["rate"]
                lines.append(f"| {k[2]} | {rate:.2f} | " + " | ".join(cells_)
                             + f" | x{s['latency_ratio']:.2f} | x{s['ttft_p99_ratio']:.2f} "
                             f"| x{s['throughput_ratio']:.3f} | x{s['goodput_ratio']:.2f} "
                             f"| {'mem' if s['memory_binds'] else ''} |")
    return "\n".join(lines) + "\n"


def plot(table: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunks = best_chunks(table)
    for w in WORKLOADS:
        caps = sorted({k[1] for k in table if k[0] == w.name}, reverse=True)
        if not caps:
            continue
        fig, axes = plt.subplots(1, len(caps), figsize=(4.6 * len(caps), 3.4), dpi=80, squeeze=False)
        for ax, c in zip(axes[0], caps):
            keys = sorted(k for k in table if k[:2] == (w.name, c))
            loads = [k[2] for k in keys]
            for p in SHOWN:
                label = chunks[(w.name, c)] if p == "sarathi" else p
                if label not in table[keys[0]]:
                    continue
                ax.plot(loads, [table[k][label]["latency_mean_s"] for k in keys], marker="o", ms=3,
                        label=label)
            ax.set_yscale("log")
            ax.set_xlabel("load (fraction of the tighter fluid limit)")
            ax.set_ylabel("mean latency (s)")
            ax.set_title(f"C = {c:,}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(w.title, fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"policies_{w.name}.png")
        plt.close(fig)


def ablation_markdown(table: dict, meta: dict) -> str:
    """Each variant's mean latency, p99 TTFT and evictions relative to production."""
    labels = list(ABLATIONS)
    lines = ["# Production Nested WAIT, one rule changed at a time (simulated)", "",
             (f"`python -m bench.policies --ablation` ({meta['seeds']} seeds, {meta['runs']} runs, "
             f"{meta['wall_s']:.0f} s). Per cell: mean latency / p99 TTFT as a ratio to production "
             "(below 1: the variant is better), evictions per run, simulator seconds per run."), "",
             "| workload | C | load | " + " | ".join(labels) + " |", "|---" * (len(labels) + 3) + "|"]
    for (w, c, load), by in sorted(table.items()):
        base = by["production"]
        cells_ = [(f"{base['latency_mean_s']:.2f} s / {base['ttft_p99_s']:.2f} s, "
                  f"{base['evictions']:.0f} ev, {base['sim_wall_s']:.1f} s")]
        for label in labels[1:]:
            x = by[label]
            cells_.append(f"x{x['latency_mean_s'] / base['latency_mean_s']:.2f} / "
                          f"x{x['ttft_p99_s'] / max(base['ttft_p99_s'], 1e-9):.2f}, "
                          f"{x['evictions']:.0f} ev, {x['sim_wall_s']:.1f} s")
        lines.append(f"| {w} | {c:,} | {load} | " + " | ".join(cells_) + " |")
    return "\n".join(lines) + "\n"


def time_sample(runs: list[Run], k: int) -> int:
    """The suite's one-core CPU time, from k runs drawn at random (the 15-minute target checked
    without running it all); prints one JSON line."""
    import random

    picked = random.Random(0).sample(runs, min(k, len(runs)))
    cpu = sum(execute(r)["cpu_s"] for r in picked)
    print(json.dumps({"sampled_runs": len(picked), "runs": len(runs), "sample_cpu_s": round(cpu, 1),
                      "estimated_cpu_s": round(cpu / len(picked) * len(runs))}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fluidserve bench policies", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a quarter of the requests per run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (the target is 1 core)")
    ap.add_argument("--kv-capacity", default=",".join(map(str, CAPACITIES)),
                    help="comma-separated KV capacities C in tokens")
    ap.add_argument("--workloads", help="comma-separated names: " + ", ".join(w.name for w in WORKLOADS))
    ap.add_argument("--loads", default=",".join(map(str, LOADS)))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON line last")
    ap.add_argument("--ablation", action="store_true",
                    help="production Nested WAIT with one rule changed at a time")
    ap.add_argument("--time-sample", type=int, metavar="K",
                    help="only time K random runs of the plan and extrapolate its CPU time (no results)")
    args = ap.parse_args(argv)
    workloads = [w for w in WORKLOADS if not args.workloads or w.name in args.workloads.split(",")]
    capacities = [int(c) for c in args.kv_capacity.split(",")]
    loads = [float(x) for x in args.loads.split(",")]
    variants = ablation_policies if args.ablation else policies
    runs = plan_runs(workloads, capacities, loads, args.seeds, args.quick, variants)
    if args.time_sample:
        return time_sample(runs, args.time_sample)
    t0 = time.perf_counter()
    rows = run_all(runs, args.jobs, progress=True)
    wall = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"seeds": args.seeds, "runs": len(rows), "wall_s": wall, "jobs": args.jobs,
            "cpu_s": sum(r["cpu_s"] for r in rows)}  # one core's worth: the 15-minute target
    if args.ablation:
        (out / "ablation.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1) + "\n")
        (out / "ablation.md").write_text(ablation_markdown(cells(rows), meta))
        print(f"{len(rows)} runs in {wall:.0f} s; ablation.md written")
        return 0
    table = cells(rows)
    result = summary(table)
    (out / "policies.json").write_text(json.dumps({"meta": meta, "runs": rows, "cells": result},
                                                  indent=1) + "\n")
    (out / "policies.md").write_text(markdown(table, result, meta))
    plot(table, out)
    for line in verdicts(result):
        print(line)
    if args.json:
        print(json.dumps({"meta": meta, "cells": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
