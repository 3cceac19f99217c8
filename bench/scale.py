"""`fluidserve bench scale`: how many model actors one scheduler keeps busy at A100 speed.

    fluidserve bench scale [--actors 1,2,4,8,16] [--workloads lmsys,p512d200]
        [--modes replica,handle,http] [--load 0.9] [--duration 30] [--warmup 12]
        [--stream-interval 0.05] [--out-dir bench/results] [--json]

For each N the Serve app runs N `sim:a100-llama2-7b` model actors (the A100 cost model's time per
step, plans checked as a real actor checks them), offered `load` x N x the workload's fluid
capacity (Poisson arrivals; LMSYS: the shipped sample's lengths; p512d200: 512-token prompts,
200 output tokens), driven three ways:

* `replica`: a load generator inside the scheduler replica (`SchedulerActor.load_test`): the real
  dispatch loops, Ray calls and streams, without a Serve call per request or message: the
  scheduler's own ceiling;
* `handle`: the scheduler's Serve handle as the ingress uses it: one subscription stream for all
  requests' messages, one `submit` call per request;
* `http`: `fluidserve bench serve` against the HTTP proxy (proxy, ingress, tokenizer, handle).

After `warmup` seconds the window opens: per model actor the busy fraction (step time / wall
time, on the actor's clock) and the gaps between consecutive steps (`dispatch_stats`), tokens
sampled per second against N x Throughput* (the fluid bound: output tokens per second at the
fluid capacity, the tighter of load < 1 and M* <= C; at load 0.9 the offered work is 0.9 of it,
the most any scheduler can deliver in steady state), and the CPU seconds per
second of the scheduler replica, the ingress, the proxy, the model actors and this driver
(psutil, by Ray's process titles). TTFT and TPOT come from the driver's requests. With `--json`
the last line of stdout is {"runs": [...]}; bench/results/scale.{json,md,png} are written.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import serve as loadgen
from bench.cli_lists import choices, positive
from deploy.scheduler_stream import SchedulerStream, Subscription
from scheduler import fluid
from scheduler.cost import preset
from scheduler.experiment import build_workload, run_policy
from scheduler.simulate import percentile
from scheduler.workload import DEFAULT_TRACE, Arrival

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL = "sim:a100-llama2-7b"
MODES = ("replica", "handle", "http")
WORKLOADS = {"lmsys": (None, str(DEFAULT_TRACE)), "p512d200": ("512:200", None)}
PROCESS_TITLES = {"ingress": "ServeReplica:fluidserve:Ingress", "proxy": "ProxyActor",
                  "model_actors": "SimModelActor"}
DRAIN_S = 60.0  # after the last arrival, how long requests may take to finish


@dataclass
class ScaleConfig:
    actors: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    workloads: list[str] = field(default_factory=lambda: ["lmsys", "p512d200"])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    load: float = 0.9
    duration: float = 30.0
    warmup: float = 12.0
    stream_interval: float = 0.05
    policy: str = "nested-wait"
    seed: int = 0
    port: int = 8000
    out_dir: Path = RESULTS_DIR


@functools.cache  # pure: one fluid solve per workload, not one per run
def capacity(workload: str) -> tuple[float, float]:
    """(requests/s, output tokens/s) of one A100 actor at its fluid capacity on this workload:
    the tighter of its two limits, load < 1 and M* <= C (on both workloads here the KV cache
    binds first, 7-8% below the load limit)."""
    types, trace = WORKLOADS[workload]
    sample = build_workload(types, trace, 1.0, 2000, 0)
    prompt = sum(a.prompt_len for a in sample) / len(sample)
    outputs = [a.output_len for a in sample]
    rate = fluid.rate_limits(fluid.types_from_sample(outputs, 1.0, prompt), preset("a100-llama2-7b")).tighter
    return rate, rate * sum(outputs) / len(outputs)


def simulated_window_tok_s(config: ScaleConfig, workload: str, actors: int) -> float:
    """Tokens per second the simulator's actor samples in the same window at the same per-actor
    rate, times N: the reference for a short run. The window opens `warmup` seconds after an
    empty start, while resident batches are still growing (a long LMSYS answer takes tens of
    seconds), so even a perfect scheduler delivers less than the offered work in it."""
    return actors * _simulated_window_per_actor(workload, config.policy, config.load, config.duration,
                                                config.warmup, config.seed)


@functools.cache  # the same for every N and mode of a sweep
def _simulated_window_per_actor(workload: str, policy: str, load: float, duration: float, warmup: float,
                                seed: int) -> float:
    rate = load * capacity(workload)[0]
    types, trace = WORKLOADS[workload]
    arrivals = build_workload(types, trace, rate, max(1, int(rate * duration)), seed)
    log = run_policy(policy, arrivals, preset("a100-llama2-7b"), log_iterations=True)["iterations"]
    end = arrivals[-1].time
    # A row samples a token unless it is a prefill chunk that does not end its prompt: with the
    # 2,048-token budget nearly every prompt here is one chunk, so rows count the tokens.
    rows = sum(it.batch_size for it in log if warmup <= it.start + it.duration <= end)
    return rows / (end - warmup) if end > warmup else 0.0


def app_args(config: ScaleConfig, actors: int) -> dict:
    return {"model": MODEL, "policy": config.policy, "num_model_actors": actors,
            "model_actor_resources": {"num_cpus": 0.01, "num_gpus": 0},
            "stream_interval_s": config.stream_interval, "max_queue_len": 100_000}


# -- drivers ---------------------------------------------------------------------------------------
def _outcome(i: int, a: Arrival, sent: float, first: float | None, end: float | None, tokens: int) -> loadgen.Outcome:
    out = loadgen.Outcome(i, a.prompt_len, a.output_len, sent=sent, first_token=first, end=end, tokens=tokens)
    if end is None:
        out.error = "did not finish"
    return out


async def drive_replica(scheduler, arrivals: list[Arrival]) -> list[loadgen.Outcome]:
    rows = await scheduler.load_test.remote([(a.time, a.prompt_len, a.output_len) for a in arrivals])
    return [_outcome(i, a, *row) for i, (a, row) in enumerate(zip(arrivals, rows))]


async def drive_handle(scheduler, arrivals: list[Arrival]) -> list[loadgen.Outcome]:
    """What an ingress replica does: one subscription carries every request's messages, one
    `submit` call per request (deploy.scheduler_stream)."""
    subscription = Subscription(scheduler)
    start = time.monotonic()

    async def one(i: int, a: Arrival) -> loadgen.Outcome:
        await asyncio.sleep(max(0.0, start + a.time - time.monotonic()))
        sent, first, tokens = time.monotonic() - start, None, 0
        stream = SchedulerStream(subscription, {"prompt_token_ids": loadgen.prompt_ids(a.prompt_len, i),
                                                "max_tokens": a.output_len, "ignore_eos": True})
        try:
            if "error" in await stream.open():
                return _outcome(i, a, sent, None, None, 0)
            async for message in stream.messages():
                if message.get("error"):
                    return _outcome(i, a, sent, first, None, tokens)
                if message.get("token_ids"):
                    first = first if first is not None else time.monotonic() - start
                    tokens += len(message["token_ids"])
        finally:
            stream.close()
        return _outcome(i, a, sent, first, time.monotonic() - start, tokens)

    try:
        return list(await asyncio.gather(*(one(i, a) for i, a in enumerate(arrivals))))
    finally:
        subscription.close()


async def drive_http(url: str, arrivals: list[Arrival]) -> list[loadgen.Outcome]:
    return await loadgen.run_load(url, arrivals, progress=False)


# -- CPU of the processes involved ------------------------------------------------------------------
def cpu_seconds(scheduler_pid: int) -> dict[str, float]:
    """User + system CPU seconds so far of each part of the deployment (and of this driver)."""
    import psutil

    totals = dict.fromkeys(("scheduler", *PROCESS_TITLES, "driver"), 0.0)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            title = " ".join(proc.info["cmdline"] or ())
            part = ("scheduler" if proc.info["pid"] == scheduler_pid else "driver" if proc.info["pid"] == os.getpid()
                    else next((k for k, t in PROCESS_TITLES.items() if t in title), None))
            if part:
                times = proc.cpu_times()
                totals[part] += times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return totals


# -- one run --------------------------------------------------------------------------------------
async def measure(config: ScaleConfig, url: str, actors: int, workload: str, mode: str) -> dict:
    from ray import serve

    scheduler = serve.get_deployment_handle("Scheduler", app_name="fluidserve")
    rate_1, tok_1 = capacity(workload)
    rate = config.load * actors * rate_1
    types, trace = WORKLOADS[workload]
    arrivals = build_workload(types, trace, rate, max(1, int(rate * config.duration)), config.seed)
    drivers = {"replica": lambda: drive_replica(scheduler, arrivals),
               "handle": lambda: drive_handle(scheduler, arrivals),
               "http": lambda: drive_http(url, arrivals)}
    load = asyncio.ensure_future(drivers[mode]())
    await asyncio.sleep(config.warmup)
    before = await scheduler.dispatch_stats.remote(reset=True)
    cpu0, t0 = cpu_seconds(before["pid"]), time.monotonic()
    await asyncio.sleep(max(0.0, arrivals[-1].time - config.warmup))
    after = await scheduler.dispatch_stats.remote()
    cpu1, wall = cpu_seconds(before["pid"]), time.monotonic() - t0
    try:
        outcomes = await asyncio.wait_for(load, DRAIN_S)
    except asyncio.TimeoutError:
        outcomes = []
    out = summarize_run(actors, mode, workload, rate, tok_1, arrivals, outcomes, after, cpu0, cpu1, wall)
    out["sim_window_tok_s"] = simulated_window_tok_s(config, workload, actors)
    return out


def summarize_run(actors, mode, workload, rate, tok_1, arrivals, outcomes, after, cpu0, cpu1, wall) -> dict:
    per_actor = after["actors"]
    iterations = sum(a["iterations"] for a in per_actor)
    done = [o for o in outcomes if o.ok]
    ttft = [o.first_token - o.sent for o in done]
    tpot = [(o.end - o.first_token) / (o.tokens - 1) for o in done if o.tokens > 1]
    cpu = {k: (cpu1[k] - cpu0[k]) / wall for k in cpu1}
    return {
        "actors": actors, "mode": mode, "workload": workload,
        "busy_fraction": sum(a["busy_fraction"] for a in per_actor) / len(per_actor),
        "busy_fraction_min": min(a["busy_fraction"] for a in per_actor),
        "gap_p50_ms": sum(a["gap_p50_ms"] for a in per_actor) / len(per_actor),  # mean over actors
        "gap_p99_ms": max(a["gap_p99_ms"] for a in per_actor),  # the worst actor's
        "throughput_tok_s": sum(a["tokens"] for a in per_actor) / wall,
        "fluid_throughput_tok_s": actors * tok_1,
        "offered_tok_s": sum(a.output_len for a in arrivals) / arrivals[-1].time if arrivals[-1].time > 0 else 0.0,
        "scheduler_cpu_ms_per_iteration": cpu["scheduler"] * wall * 1e3 / max(1, iterations),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
        "rate": rate, "submitted": len(arrivals), "completed": len(done),
        "iterations_per_s": iterations / wall, "window_s": wall,
        # The host's 1-minute load average at the end of the window: on a shared box, what else ran.
        "host_load_avg": os.getloadavg()[0], "host_cpus": os.cpu_count(),
        "cpu_s_per_s": cpu,
    }


# -- the sweep ------------------------------------------------------------------------------------
def run(config: ScaleConfig) -> dict:
    """Every (N, workload, mode). A run that breaks the app (on a box too small for it, the
    scheduler replica starved past Serve's health check) is recorded as failed, with why, and
    the app redeployed for the next."""
    from ray import serve

    from deploy.app import APP_NAME
    from deploy.local import start

    runs = []
    for actors in config.actors:
        url = start(app_args(config, actors), port=config.port)
        for workload in config.workloads:
            for mode in config.modes:
                _log(f"N={actors} {workload} {mode}: ...")
                try:
                    out = asyncio.run(measure(config, url, actors, workload, mode))
                except Exception as exc:  # noqa: BLE001 - one failed run must not lose the sweep
                    _log(f"N={actors} {workload} {mode}: FAILED {type(exc).__name__}: {exc}")
                    runs.append({"actors": actors, "mode": mode, "workload": workload,
                                 "failed": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"})
                    serve.delete(APP_NAME)
                    url = start(app_args(config, actors), port=config.port)
                    continue
                _log(f"N={actors} {workload} {mode}: busy {out['busy_fraction']:.3f}, gaps p50 "
                     f"{out['gap_p50_ms']:.2f} / p99 {out['gap_p99_ms']:.2f} ms, "
                     f"{out['throughput_tok_s']:,.0f} / {out['fluid_throughput_tok_s']:,.0f} tok/s, "
                     f"scheduler {out['cpu_s_per_s']['scheduler']:.2f} CPU s/s, "
                     f"{out['completed']}/{out['submitted']} done")
                runs.append(out)
    return {"model": MODEL, "load": config.load, "stream_interval_s": config.stream_interval,
            "duration_s": config.duration, "warmup_s": config.warmup, "runs": runs}


def markdown(out: dict) -> str:
    lines = [(f"`{out['model']}` actors at {out['load']} x N x the fluid capacity, stream interval "
              f"{out['stream_interval_s']} s; busy fraction = step time / wall time per actor (mean "
              "over actors), gaps p50 mean over actors / p99 of the worst; vs simulator = throughput "
              "over the simulator's in the same window; CPU in seconds per second."),
             "",
             ("| N | workload | mode | busy | gap p50 / p99 (ms) | tok/s / fluid bound | vs simulator "
              "| sched CPU ms/iter | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) "
              "| CPU s/s: sched / ingress / proxy / actors / driver | done |"),
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in out["runs"]:
        if "failed" in r:
            lines.append(f"| {r['actors']} | {r['workload']} | {r['mode']} | failed: {r['failed']} |"
                         + " |" * 8)
            continue
        c = r["cpu_s_per_s"]
        lines.append(
            f"| {r['actors']} | {r['workload']} | {r['mode']} | {r['busy_fraction']:.3f} | "
            f"{r['gap_p50_ms']:.2f} / {r['gap_p99_ms']:.1f} | {r['throughput_tok_s']:,.0f} / "
            f"{r['fluid_throughput_tok_s']:,.0f} ({r['throughput_tok_s'] / r['fluid_throughput_tok_s']:.2f}) | "
            f"{r['throughput_tok_s'] / r['sim_window_tok_s']:.2f} | "
            f"{r['scheduler_cpu_ms_per_iteration']:.2f} | {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | "
            f"{r['tpot_p50_s'] * 1e3:.0f} / {r['tpot_p99_s'] * 1e3:.0f} | {c['scheduler']:.2f} / "
            f"{c['ingress']:.2f} / {c['proxy']:.2f} / {c['model_actors']:.2f} / {c['driver']:.2f} | "
            f"{r['completed']}/{r['submitted']} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    runs = [r for r in runs if "failed" not in r]
    keys = sorted({(r["workload"], r["mode"]) for r in runs})
    for i, (workload, mode) in enumerate(keys):
        mine = sorted((r for r in runs if (r["workload"], r["mode"]) == (workload, mode)), key=lambda r: r["actors"])
        n = [r["actors"] for r in mine]
        style = {"replica": "o-", "handle": "s--", "http": "^:"}[mode]
        axes[0].plot(n, [r["busy_fraction"] for r in mine], style, color=f"C{i}", label=f"{workload} {mode}")
        axes[1].plot(n, [r["throughput_tok_s"] / r["fluid_throughput_tok_s"] for r in mine], style,
                     color=f"C{i}", label=f"{workload} {mode}")
    for ax, label in ((axes[0], "actor busy fraction"), (axes[1], "throughput / (N x fluid bound)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("model actors N (sim:a100-llama2-7b)")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.05)
        ax.axhline(0.9, color="grey", lw=0.5)
    axes[0].legend(fontsize=7)
    fig.suptitle("fluidserve: one scheduler, N simulated A100 actors")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fluidserve bench scale", description=__doc__.splitlines()[0])
    p.add_argument("--actors", type=positive(int, "N1,N2"), default=[1, 2, 4, 8, 16])
    p.add_argument("--workloads", type=choices(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--modes", type=choices(MODES), default=list(MODES))
    p.add_argument("--load", type=float, default=0.9)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per run")
    p.add_argument("--warmup", type=float, default=12.0, help="seconds before the window opens")
    p.add_argument("--stream-interval", type=float, default=0.05)
    p.add_argument("--policy", default="nested-wait")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not 0 < args.warmup < args.duration:
        p.error("--warmup must be positive and below --duration")
    config = ScaleConfig(actors=args.actors, workloads=args.workloads, modes=args.modes, load=args.load,
                         duration=args.duration, warmup=args.warmup, stream_interval=args.stream_interval,
                         policy=args.policy, port=args.port, out_dir=args.out_dir)
    try:
        out = run(config)
    finally:
        from deploy.local import stop

        stop()
    config.out_dir.mkdir(parents=True, exist_ok=True)
    (config.out_dir / "scale.json").write_text(json.dumps(out, indent=1) + "\n")
    (config.out_dir / "scale.md").write_text(markdown(out))
    plot(out["runs"], config.out_dir / "scale.png")
    print(markdown(out))
    if args.json:
        print(json.dumps({"runs": out["runs"]}))
    return 0


def _log(message: str) -> None:
    print(f"[bench scale] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
