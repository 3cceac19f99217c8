"""`fluidserve bench serve`: replay a trace (or synthetic types) against a running server.

    fluidserve bench serve [--base-url http://127.0.0.1:8000] [--trace FILE | --types SPEC]
        [--rate R | --replay] [--num-requests N] [--max-prompt P] [--max-output O] [--json]

Like `vllm bench serve`: every request is a streamed `/v1/completions` call whose prompt is a
list of exactly the recorded number of token ids and whose `max_tokens` is the recorded output
length with `ignore_eos`, so the server does the trace's work. Arrivals are Poisson at `--rate`
(or the trace's own `arrived_at` with `--replay`), built by `scheduler.workload` exactly as the
simulator builds them: the same seed gives the same arrivals in both. The report uses the
simulator's own `summarize`, so `--json` carries the keys of `fluidserve simulate --json`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace

import httpx

from scheduler.experiment import build_workload
from scheduler.request import Request
from scheduler.simulate import percentile, summarize
from scheduler.workload import DEFAULT_TRACE, Arrival

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# The default model on 2 CPU cores does ~50-150 tokens/s: clip the trace to what it can serve.
DEFAULT_MAX_PROMPT = 256
DEFAULT_MAX_OUTPUT = 64
# Prompt token ids are drawn from this range: ordinary tokens of the default vocabulary (49,152),
# clear of the special tokens at its start.
TOKEN_ID_RANGE = (1000, 30000)


@dataclass
class Outcome:
    """What one streamed request did; times are seconds after the run started."""

    index: int
    prompt_len: int
    output_len: int
    sent: float = math.nan
    first_token: float | None = None
    end: float | None = None
    tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None and self.first_token is not None


def clip(arrivals: list[Arrival], max_prompt: int | None, max_output: int | None) -> list[Arrival]:
    """Arrivals with prompt and output lengths capped (None: no cap)."""
    big = sys.maxsize
    return [replace(a, prompt_len=min(a.prompt_len, max_prompt or big),
                    output_len=min(a.output_len, max_output or big)) for a in arrivals]


def prompt_ids(n: int, index: int) -> list[int]:
    """A deterministic prompt of exactly n token ids (different per request: no shared prefix)."""
    rng = random.Random(index)
    return [rng.randrange(*TOKEN_ID_RANGE) for _ in range(n)]


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def served_model(client, base_url: str, headers: dict[str, str]) -> str:
    resp = await client.get(f"{base_url}/v1/models", headers=headers)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def _stream_one(client, base_url: str, model: str, a: Arrival, out: Outcome,
                      t0: float, headers: dict[str, str]) -> None:
    payload = {"model": model, "prompt": prompt_ids(a.prompt_len, out.index), "stream": True,
               "max_tokens": a.output_len, "ignore_eos": True, "temperature": 0.0}
    out.sent = time.monotonic() - t0
    async with client.stream("POST", f"{base_url}/v1/completions", json=payload, headers=headers) as resp:
        if resp.status_code != 200:
            out.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data.strip() == "[DONE]":
                break
            now = time.monotonic() - t0
            chunk = json.loads(data)
            if "error" in chunk:
                out.error = str(chunk["error"].get("message", chunk["error"]))[:200]
                return
            out.chunk_times.append(now)
            if out.first_token is None:
                out.first_token = now
            choice = chunk["choices"][0]
            if choice.get("finish_reason"):
                out.end = now
                out.tokens = (chunk.get("usage") or {}).get("completion_tokens", a.output_len)
    if out.end is None and out.error is None:
        out.error = "stream ended without a finish_reason"


async def _request(client, base_url: str, model: str, a: Arrival, index: int, t0: float,
                   headers: dict[str, str], bar) -> Outcome:
    await asyncio.sleep(max(0.0, t0 + a.time - time.monotonic()))
    out = Outcome(index, a.prompt_len, a.output_len)
    try:
        await _stream_one(client, base_url, model, a, out, t0, headers)
    except (httpx.HTTPError, OSError, ValueError, KeyError, IndexError) as exc:
        # A failed request is a reported error, not a crashed benchmark.
        out.error = f"{type(exc).__name__}: {exc}"[:200]
    if bar is not None:
        bar.update(1)
    return out


async def run_load(base_url: str, arrivals: list[Arrival], api_key: str | None = None,
                   progress: bool = True, timeout_s: float = 1800.0, index_base: int = 0) -> list[Outcome]:
    """Send every arrival at its time (seconds after the start) and stream it to the end.
    `index_base` offsets the request indices (and so the prompts' token ids)."""
    headers = auth_headers(api_key if api_key is not None else os.environ.get("FLUIDSERVE_API_KEY"))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(timeout_s, connect=60.0)
    bar = _progress(len(arrivals)) if progress else None
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = await served_model(client, base_url, headers)
        t0 = time.monotonic()
        outcomes = await asyncio.gather(*(_request(client, base_url, model, a, index_base + i, t0,
                                                   headers, bar) for i, a in enumerate(arrivals)))
    if bar is not None:
        bar.close()
    return list(outcomes)


def _as_request(o: Outcome) -> Request:
    req = Request(str(o.index), o.prompt_len, max(1, o.output_len), o.sent, output_len=o.output_len)
    req.first_token_time, req.finish_time, req.num_generated = o.first_token, o.end, o.tokens
    return req


def report(outcomes: list[Outcome]) -> dict:
    """The simulator's figures (same keys, same `summarize`) plus request-level extras."""
    done = [o for o in outcomes if o.ok]
    first = min((o.sent for o in outcomes if math.isfinite(o.sent)), default=0.0)
    last = max((o.end for o in done), default=first)
    elapsed = last - first
    gaps = [b - a for o in done for a, b in zip(o.chunk_times, o.chunk_times[1:])]
    out = {
        "submitted": len(outcomes),
        "completed": len(done),
        "errors": len(outcomes) - len(done),
        "duration_s": elapsed,
        "request_throughput": len(done) / elapsed if elapsed > 0 else 0.0,
        **summarize([_as_request(o) for o in done], elapsed),
        "itl_mean_s": sum(gaps) / len(gaps) if gaps else math.nan,
        **{f"itl_p{q}_s": percentile(gaps, q) for q in (50, 90, 99)},
        "total_input_tokens": sum(o.prompt_len for o in done),
        "total_output_tokens": sum(o.tokens for o in done),
        "short_outputs": sum(o.tokens < o.output_len for o in done),
    }
    errors = sorted({o.error for o in outcomes if o.error})
    if errors:
        out["error_samples"] = errors[:3]
    return out


def run_sync(base_url: str, arrivals: list[Arrival], api_key: str | None = None,
             progress: bool = False, index_base: int = 0) -> list[Outcome]:
    """run_load, blocking (for callers outside an event loop)."""
    return asyncio.run(run_load(base_url.rstrip("/"), arrivals, api_key, progress, index_base=index_base))


def benchmark(base_url: str, arrivals: list[Arrival], api_key: str | None = None,
              progress: bool = True) -> dict:
    """Run the load and report it."""
    return report(run_sync(base_url, arrivals, api_key, progress))


def print_table(out: dict) -> None:
    print(f"{'=' * 18} Serving Benchmark Result {'=' * 18}")
    rows = [
        ("Successful requests", out["completed"]), ("Failed requests", out["errors"]),
        ("Benchmark duration (s)", out["duration_s"]),
        ("Total input tokens", out["total_input_tokens"]),
        ("Total generated tokens", out["total_output_tokens"]),
        ("Request throughput (req/s)", out["request_throughput"]),
        ("Output token throughput (tok/s)", out["throughput_tok_s"]),
    ]
    for name, label in (("ttft", "Time to First Token"), ("latency", "End-to-end Latency"),
                        ("itl", "Inter-token Latency")):
        rows.append((f"--- {label} (ms) ---", None))
        rows.append((f"Mean {name.upper()} (ms)", out[f"{name}_mean_s"] * 1e3))
        rows += [(f"P{q} {name.upper()} (ms)", out[f"{name}_p{q}_s"] * 1e3) for q in (50, 90, 99)]
    rows.append(("Mean TPOT (ms)", out["tpot_mean_s"] * 1e3))
    for name, value in rows:
        if value is None:
            print(name)
        else:
            print(f"{name:<40}{value:>14.2f}" if isinstance(value, float) else f"{name:<40}{value:>14}")
    for err in out.get("error_samples", []):
        print(f"error: {err}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fluidserve bench serve", description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default=DEFAULT_BASE_URL)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", help=f"CSV trace (default: {DEFAULT_TRACE.name})")
    src.add_argument("--types", help="synthetic prompt:output[:share],... e.g. 128:32:0.5,64:64:0.5")
    p.add_argument("--rate", type=float, help="requests/s (Poisson)")
    p.add_argument("--replay", action="store_true", help="the trace's own arrived_at times")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt", type=int, default=DEFAULT_MAX_PROMPT, help="clip prompts (0: no clip)")
    p.add_argument("--max-output", type=int, default=DEFAULT_MAX_OUTPUT, help="clip outputs (0: no clip)")
    p.add_argument("--api-key", default=os.environ.get("FLUIDSERVE_API_KEY"))
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p


def workload(args: argparse.Namespace) -> list[Arrival]:
    if not args.replay and not (args.rate and args.rate > 0):
        raise ValueError("give --rate R > 0 or --replay")
    trace = None if args.types else (args.trace or str(DEFAULT_TRACE))
    arrivals = build_workload(args.types, trace, None if args.replay else args.rate,
                              args.num_requests, args.seed, args.replay)
    return clip(arrivals, args.max_prompt, args.max_output)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        arrivals = workload(args)
    except ValueError as exc:
        print(f"fluidserve bench serve: error: {exc}", file=sys.stderr)
        return 2
    out = benchmark(args.base_url.rstrip("/"), arrivals, args.api_key,
                    progress=sys.stderr.isatty() or not args.json)
    out["rate"] = args.rate
    if args.json:
        print(json.dumps(out))
    else:
        print_table(out)
    return 0 if out["completed"] == out["submitted"] else 1


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="req", desc="requests", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
