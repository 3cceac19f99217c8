"""Soak: minutes of open-loop load at twice the stable rate against the real Serve app.

    .venv/bin/python -m bench.soak --minutes 10            # the full run (issue 7)
    .venv/bin/python -m bench.soak --minutes 2 --json-out bench/results/soak.json

It starts its own local Ray cluster (free port), deploys the default model on CPU, measures the
stable load (completed requests per second of a closed loop that keeps the model actors busy),
then sends Poisson arrivals at `--load-factor` (2) times that rate. What it checks, the way a
user would see it:

  * overload becomes 429s (a full queue) and 503s with Retry-After (not admitted within
    `max_queue_wait_s`), not growth: the admission queue stays bounded;
  * the wait for admission is bounded: p99 of the scheduler's queue time (its histogram
    `fluidserve:request_queue_time_seconds`, bucket upper bound, over the soak) <= max_queue_wait_s;
  * resident memory (RSS of this cluster's Ray worker processes) stays flat within 10%;
  * no admitted request is lost (error, timeout) or duplicated/truncated (every 200 carries
    exactly max_tokens completion tokens, ignore_eos is on).

Prints a table and one JSON object (also written to --json-out).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx
import psutil

RSS_SAMPLE_S = 5.0
RSS_TOLERANCE = 0.10


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    rejected_429: int = 0
    queue_timeout_503: int = 0  # not admitted within max_queue_wait_s: told to retry, not lost
    other_4xx: int = 0
    errors_5xx: int = 0
    exceptions: int = 0
    wrong_length: int = 0  # 200 with completion_tokens != max_tokens: missing or duplicated tokens
    duplicate_ids: int = 0
    latencies_s: list[float] = field(default_factory=list)


def ray_worker_rss_bytes() -> int:
    """RSS of the Ray worker processes of the cluster this process started (its descendants):
    other Ray clusters on the same machine are not counted."""
    total = 0
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if proc.cmdline()[:1] and proc.cmdline()[0].startswith("ray::"):
                total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def start_app(args: argparse.Namespace) -> str:
    import ray
    from ray import serve

    from deploy.app import APP_NAME, build_app
    from deploy.local import wait_ready
    from tests.conftest import free_port

    # address="local": a cluster of its own, never one another process started on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="serve",
             runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_args = {"model": "default", "num_model_actors": args.num_model_actors,
                "model_actor_resources": {"num_cpus": 1, "num_gpus": 0},
                "kv_cache_tokens": args.kv_cache_tokens, "max_queue_len": args.max_queue_len,
                "max_queue_wait_s": args.max_queue_wait_s, "max_queued_tokens": args.max_queued_tokens}
    serve.run(build_app(app_args), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, timeout_s=600)
    return url


def queue_time_buckets(url: str) -> dict[float, float]:
    """Cumulative counts of the scheduler's admission-wait histogram, by upper bound."""
    text = httpx.get(f"{url}/metrics", timeout=60).text
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("fluidserve:request_queue_time_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(le)] = out.get(float(le), 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def histogram_p99(before: dict[float, float], after: dict[float, float]) -> float:
    """The smallest bucket bound holding 99% of the observations made between the two reads."""
    delta = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = delta[-1][1] if delta else 0.0
    for le, count in delta:
        if total and count >= 0.99 * total:
            return le
    return 0.0


def body(i: int, max_tokens: int) -> dict:
    return {"prompt": f"Request {i}: write a short note about the number {i}.", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}


async def one(client: httpx.AsyncClient, url: str, i: int, args: argparse.Namespace, tally: Tally,
              ids: set[str]) -> None:
    tally.sent += 1
    start = time.monotonic()
    try:
        resp = await client.post(f"{url}/v1/completions", json=body(i, args.max_tokens))
    except httpx.HTTPError:
        tally.exceptions += 1
        return
    if resp.status_code == 429:
        tally.rejected_429 += 1
    elif resp.status_code == 503 and resp.json().get("error", {}).get("code") == "queue_timeout":
        tally.queue_timeout_503 += 1
    elif resp.status_code >= 500:
        tally.errors_5xx += 1
    elif resp.status_code != 200:
        tally.other_4xx += 1
    else:
        out = resp.json()
        tally.ok += 1
        tally.latencies_s.append(time.monotonic() - start)
        tally.wrong_length += out["usage"]["completion_tokens"] != args.max_tokens
        tally.duplicate_ids += out["id"] in ids
        ids.add(out["id"])


async def calibrate(url: str, args: argparse.Namespace) -> float:
    """Stable load: requests/s a closed loop of `--concurrency` clients completes."""
    tally, ids = Tally(), set()
    deadline = time.monotonic() + args.calibrate_s
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker(k: int) -> None:
            i = k * 1_000_000
            while time.monotonic() < deadline:
                await one(client, url, i, args, tally, ids)
                i += 1

        start = time.monotonic()
        await asyncio.gather(*(worker(k) for k in range(args.concurrency)))
        elapsed = time.monotonic() - start
    return tally.ok / elapsed


async def soak(url: str, rate: float, args: argparse.Namespace) -> tuple[Tally, list[tuple[float, int, int]]]:
    """Poisson arrivals at `rate` for --minutes; samples (t, worker RSS, waiting) meanwhile."""
    import ray  # noqa: F401  (the cluster is up; the handle below needs it)
    from ray import serve

    scheduler = serve.get_deployment_handle("Scheduler", app_name="fluidserve")
    tally, ids, samples = Tally(), set(), []
    rng = random.Random(0)
    end = time.monotonic() + args.minutes * 60
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)

    async def sampler() -> None:
        while time.monotonic() < end:
            state = await scheduler.debug_state.remote()
            samples.append((time.monotonic(), ray_worker_rss_bytes(), state["waiting"]))
            await asyncio.sleep(RSS_SAMPLE_S)

    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        tasks, i = [asyncio.create_task(sampler())], 0
        while time.monotonic() < end:
            tasks.append(asyncio.create_task(one(client, url, i, args, tally, ids)))
            i += 1
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)  # admitted requests finish: none may be lost
    return tally, samples


def summarize(rate: float, tally: Tally, samples: list, args: argparse.Namespace,
              wait_p99_s: float) -> dict:
    n = len(samples)
    head = [s[1] for s in samples[: max(1, n // 5)]]
    tail = [s[1] for s in samples[-max(1, n // 5):]]
    rss_start, rss_end = statistics.median(head), statistics.median(tail)
    growth = (rss_end - rss_start) / rss_start if rss_start else 0.0
    lost = tally.errors_5xx + tally.exceptions + tally.other_4xx
    lat = sorted(tally.latencies_s) or [0.0]
    return {
        "minutes": args.minutes, "stable_rate_rps": round(rate / args.load_factor, 3),
        "offered_rate_rps": round(rate, 3), "load_factor": args.load_factor, "max_tokens": args.max_tokens,
        "num_model_actors": args.num_model_actors, "max_queue_len": args.max_queue_len or "auto",
        "max_queue_wait_s": args.max_queue_wait_s,
        "sent": tally.sent, "ok": tally.ok, "rejected_429": tally.rejected_429,
        "queue_timeout_503": tally.queue_timeout_503, "admission_wait_p99_s": wait_p99_s,
        "lost": lost, "wrong_length": tally.wrong_length, "duplicate_ids": tally.duplicate_ids,
        "max_waiting": max((s[2] for s in samples), default=0),
        "rss_start_mib": round(rss_start / 2**20, 1), "rss_end_mib": round(rss_end / 2**20, 1),
        "rss_max_mib": round(max(s[1] for s in samples) / 2**20, 1), "rss_growth_pct": round(100 * growth, 2),
        "latency_p50_s": round(lat[len(lat) // 2], 2), "latency_p99_s": round(lat[int(len(lat) * 0.99)], 2),
        "pass": {"429s_or_503s_instead_of_growth": tally.rejected_429 + tally.queue_timeout_503 > 0,
                 "admission_wait_p99_within_bound": not args.max_queue_wait_s or wait_p99_s <= args.max_queue_wait_s,
                 "rss_flat_within_10pct": abs(growth) <= RSS_TOLERANCE,
                 "no_lost_or_duplicated": lost == 0 and tally.wrong_length == 0 and tally.duplicate_ids == 0},
    }


def print_table(result: dict) -> None:
    rows = [(k, v) for k, v in result.items() if k != "pass"] + \
           [(f"PASS {k}", v) for k, v in result["pass"].items()]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--load-factor", type=float, default=2.0, help="offered load / stable load")
    p.add_argument("--calibrate-s", type=float, default=60.0)
    # Enough clients to saturate the batch: throughput grows with the batch size, so a small
    # closed loop would understate the stable load.
    p.add_argument("--concurrency", type=int, default=64, help="closed-loop clients while calibrating")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--num-model-actors", type=int, default=1)
    p.add_argument("--kv-cache-tokens", type=int, default=16384)
    p.add_argument("--max-queue-len", type=int, default=0, help="0: the app's default (from the KV size)")
    p.add_argument("--max-queue-wait-s", type=float, default=10.0,
                   help="the app's max_queue_wait_s (a bucket bound of the queue-time histogram)")
    p.add_argument("--max-queued-tokens", type=int, default=0)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)

    url = start_app(args)
    try:
        stable = asyncio.run(calibrate(url, args))
        rate = stable * args.load_factor
        print(f"stable load {stable:.2f} req/s; soaking {args.minutes:g} min at {rate:.2f} req/s", flush=True)
        before = queue_time_buckets(url)
        tally, samples = asyncio.run(soak(url, rate, args))
        wait_p99 = histogram_p99(before, queue_time_buckets(url))
    finally:
        from deploy.local import stop

        stop()
    result = summarize(rate, tally, samples, args, wait_p99)
    print_table(result)
    print(json.dumps(result))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if all(result["pass"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
