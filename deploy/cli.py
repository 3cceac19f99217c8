"""The `fluidserve` command: serve, simulate, fluid, calibrate, bench.

Every user error exits non-zero with one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

from scheduler.cost import PRESETS, CostModel, preset
from scheduler.errors import SchedulingError
from scheduler.policies import POLICY_NAMES
from scheduler.workload import WorkloadError


class CLIError(Exception):
    """A user mistake on the command line; printed as one line."""


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _add_workload_args(p: argparse.ArgumentParser, rate_required: bool = True) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--types", help="prompt:output[:share],... e.g. 512:20:0.7,512:50:0.3")
    src.add_argument("--trace", help="CSV: num_prefill_tokens,num_decode_tokens[,arrived_at]")
    p.add_argument("--rate", type=_positive(float), required=False, help="total requests/s (Poisson)")
    p.add_argument("--replay", action="store_true", help="use the trace's own arrived_at times")
    p.add_argument("--num-requests", type=_positive(int), default=2000)
    p.add_argument("--seed", type=int, default=0)


def _add_cost_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="a100-llama2-7b", help=f"cost preset: {', '.join(PRESETS)}")
    p.add_argument("--cost-file", help="a fitted cost model (fluidserve calibrate --out)")
    p.add_argument("--kv-capacity", type=_positive(int), metavar="TOKENS",
                   help="override the KV capacity C of the preset or cost file")


def _cost(args) -> CostModel:
    cost = CostModel.load(args.cost_file) if args.cost_file else preset(args.preset)
    if args.kv_capacity:
        if args.kv_capacity < cost.block_size:
            raise CLIError(f"--kv-capacity must hold at least one block ({cost.block_size} tokens)")
        cost = dataclasses.replace(cost, kv_capacity_tokens=args.kv_capacity)
    return cost


def _json_or_table(args, out: dict, table) -> None:
    if args.json:
        print(json.dumps(out))
    else:
        table(out)


def cmd_simulate(args) -> int:
    from scheduler.experiment import build_workload, run_policy

    if not args.replay and args.rate is None:
        raise CLIError("--rate is required (or --replay with a trace that has arrived_at)")
    arrivals = build_workload(args.types, args.trace, args.rate, args.num_requests, args.seed, args.replay)
    try:
        params = json.loads(args.policy_args) if args.policy_args else {}
    except json.JSONDecodeError as exc:
        raise CLIError(f"--policy-args is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise CLIError("--policy-args must be a JSON object, e.g. '{\"budget\": 120}'")
    out = run_policy(args.policy, arrivals, _cost(args), params, progress=not args.json and sys.stderr.isatty())
    _json_or_table(args, out, _print_kv)
    return 0


def _fluid_types(args) -> list:
    """The workload as fluid job types at --rate: --types, or one type per distinct
    (prompt, output) pair of a --trace, at its share of the rows."""
    from scheduler import fluid
    from scheduler.workload import parse_types, read_trace

    if args.types:
        return [fluid.JobType(t.prompt_len, t.output_len, args.rate * t.share)
                for t in parse_types(args.types)]
    rows = read_trace(args.trace)
    counts: dict[tuple[int, int], int] = {}
    for r in rows:
        counts[(r.prompt_len, r.output_len)] = counts.get((r.prompt_len, r.output_len), 0) + 1
    return [fluid.JobType(p, o, args.rate * c / len(rows)) for (p, o), c in sorted(counts.items())]


def cmd_fluid(args) -> int:
    from scheduler import fluid

    cost = _cost(args)
    types = _fluid_types(args)
    sol = fluid.solve(types, cost)
    limits = fluid.rate_limits(types, cost)
    out = {
        "stable": sol.stable,
        "load": sol.load,
        "iteration_time_s": sol.iteration_time_s if sol.stable else None,
        "per_stage": sol.per_stage if sol.stable else None,
        "memory_tokens": sol.memory_tokens if sol.stable else None,
        "throughput_tok_s": sol.throughput_tok_s,
        "kv_capacity_tokens": sol.kv_capacity_tokens,
        "fits": sol.fits,
        "load_limit_rps": limits.load,
        "memory_limit_rps": limits.memory,
        "message": f"{sol.message()}; limits: load < 1 below {limits.load:.3g} req/s, "
                   f"M* <= C up to {limits.memory:.3g} req/s",
    }
    if not args.json and out["per_stage"] and len(out["per_stage"]) > 8:
        out["per_stage"] = f"{sum(out['per_stage']):.4g} in all over {len(types)} types"
    _json_or_table(args, out, _print_kv)
    return 0


def _print_kv(out: dict) -> None:
    width = max(len(k) for k in out)
    for key, value in out.items():
        if isinstance(value, float):
            value = f"{value:,.4g}"
        elif isinstance(value, list):
            value = ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in value)
        print(f"{key:<{width}}  {value}")


def cmd_serve(args) -> int:
    from deploy.local import serve_forever

    return serve_forever(port=args.port, config=args.config, model=args.model, policy=args.policy)


def cmd_calibrate(args) -> int:
    from actors.calibrate import main as calibrate_main

    return calibrate_main(args.rest)


def cmd_bench(args) -> int:
    import importlib

    modules = {"paper": "bench.paper", "serve": "bench.serve", "live": "bench.live",
               "engine": "bench.engine", "policies": "bench.policies", "scale": "bench.scale"}
    module = importlib.import_module(modules[args.which])
    return module.main(args.rest) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluidserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="simulate one policy on a workload")
    p.add_argument("--policy", choices=POLICY_NAMES, default="nested-wait")
    p.add_argument("--policy-args", help='JSON, e.g. {"budget": 120, "num_segments": 10}')
    _add_workload_args(p)
    _add_cost_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("fluid", help="the fluid benchmark of a workload")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--types", help="prompt:output[:share],... e.g. 512:20:0.7,512:50:0.3")
    src.add_argument("--trace", help="CSV: the length distribution of its rows")
    p.add_argument("--rate", type=_positive(float), required=True)
    _add_cost_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fluid)

    p = sub.add_parser("serve", help="local Ray + the Serve app with the default model")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--config", help="a serve config YAML (default: deploy/configs/local.yaml)")
    p.add_argument("--model", help="override the config's model")
    p.add_argument("--policy", choices=POLICY_NAMES, help="override the config's policy")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("calibrate", help="fit the cost model on the real engine", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("bench", help="benchmarks: paper, policies, serve, live, engine, scale")
    p.add_argument("which", choices=["paper", "policies", "serve", "live", "engine", "scale"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, WorkloadError, SchedulingError, ValueError, FileNotFoundError) as exc:
        print(f"fluidserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
