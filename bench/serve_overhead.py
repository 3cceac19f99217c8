"""What Ray Serve costs: the same workload in-process (LocalEngine) and through the full stack.

    python -m bench.serve_overhead [--requests 16] [--prompt 64] [--output 32] [--threads 1]
                                   [--interval 0.5] [--stream-interval 0.05] [--json]

Both sides run the default model with the same policy and torch threads (default 1, as
deploy/configs/local.yaml gives its model actor one CPU and leaves the other core to the proxy,
ingress and scheduler, the way a GPU deployment leaves the CPUs to the serving stack). Two runs:

  burst   all requests sent at once, streamed over HTTP (the OpenAI API) as the in-process side
          submits them: output tok/s both ways gives the throughput cost (target < 10%);
  paced   one request every --interval seconds, the same schedule on both sides: the median
          TTFT added by the Serve path (target < 50 ms). In a burst the Serve side also
          receives the requests spread over tens of ms (each crosses the proxy and the
          ingress), so the first ones start an iteration the rest must wait out; the burst's
          TTFT difference is reported too, but it measures that, not the path.

The two sides alternate over --rounds rounds in one process (this box's speed drifts); the
figures are medians over rounds. Prints a table and, last, one JSON line (also written to bench/results/serve_overhead.json).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

from scheduler.request import SamplingParams

POLICY = "vllm"  # the same on both sides: this measures Ray Serve, not the policy
RESULTS = Path(__file__).resolve().parent / "results"
NO_EOS = SamplingParams(ignore_eos=True)


def workload(n: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 20000) for _ in range(prompt_len)] for _ in range(n)]


class InProcess:
    """The engine in this process: LocalEngine with the same policy, cache and threads."""

    def __init__(self, model: str, threads: int) -> None:
        from actors.local_engine import LocalEngine

        self.engine = LocalEngine(model, policy=POLICY, kv_cache_tokens=16384, num_threads=threads)
        self.engine.generate([[1000] * 8], 4)  # warm-up

    def burst(self, prompts: list[list[int]], output: int) -> dict:
        start = time.monotonic()
        done = self.engine.generate(prompts, output, NO_EOS)
        elapsed = time.monotonic() - start
        return {"output_tok_s": sum(len(c.token_ids) for c in done) / elapsed,
                "ttft_p50_s": statistics.median(c.first_token - c.arrival for c in done)}

    def paced(self, prompts: list[list[int]], output: int, interval: float) -> float:
        done = self.engine.generate(prompts, output, NO_EOS, offsets=_offsets(prompts, interval))
        return statistics.median(c.first_token - c.arrival for c in done)


class ThroughServe:
    """The same engine as a local Serve app, driven over HTTP with the OpenAI API."""

    def __init__(self, model: str, threads: int, port: int, stream_interval_s: float = 0.05) -> None:
        from deploy.local import start

        url = start({"model": model, "policy": POLICY, "num_model_actors": 1,
                     "model_actor_resources": {"num_cpus": threads, "num_gpus": 0},
                     "kv_cache_tokens": 16384, "stream_interval_s": stream_interval_s},
                    port=port, num_cpus=threads + 1)
        self.url = f"{url}/v1/completions"
        asyncio.run(self._gather([[1000] * 8], 4, 0.0))  # warm-up

    def burst(self, prompts: list[list[int]], output: int) -> dict:
        from bench.live_calibration import reset_steps, step_samples

        reset_steps()
        start = time.monotonic()
        results = asyncio.run(self._gather(prompts, output, 0.0))
        elapsed = time.monotonic() - start
        # The model actor's steps in the burst: the requests cross the proxy and the ingress one
        # by one, so the first often reaches the scheduler alone and gets a prefill of its own.
        steps = step_samples()
        return {"output_tok_s": sum(t for _, t in results) / elapsed,
                "ttft_p50_s": statistics.median(t for t, _ in results),
                "steps": len(steps), "first_step_tokens": steps[0][0] if steps else 0}

    def paced(self, prompts: list[list[int]], output: int, interval: float) -> float:
        return statistics.median(t for t, _ in asyncio.run(self._gather(prompts, output, interval)))

    async def _gather(self, prompts, output: int, interval: float) -> list[tuple[float, int]]:
        import httpx

        async with httpx.AsyncClient(timeout=600) as client:
            return await asyncio.gather(*(_stream_one(client, self.url, p, output, delay)
                                          for p, delay in zip(prompts, _offsets(prompts, interval))))

    @staticmethod
    def close() -> None:
        from deploy.local import stop

        stop()


async def _stream_one(client, url: str, prompt: list[int], output: int, delay: float = 0.0) -> tuple[float, int]:
    """Send one streaming request after `delay` s; (its TTFT, completion tokens)."""
    await asyncio.sleep(delay)
    sent, first, tokens = time.monotonic(), None, 0
    body = {"prompt": prompt, "max_tokens": output, "stream": True, "ignore_eos": True, "temperature": 0}
    async with client.stream("POST", url, json=body) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                first = first or time.monotonic()
                chunk = json.loads(line[6:])
                if chunk["choices"][0].get("finish_reason"):
                    tokens = chunk["usage"]["completion_tokens"]
    return first - sent, tokens


def _offsets(prompts: list, interval: float) -> list[float]:
    return [i * interval for i in range(len(prompts))]


def measure(args) -> dict:
    """Rounds alternate in-process and Serve runs, so both see the same machine speed."""
    prompts = workload(args.requests, args.prompt)
    local = InProcess(args.model, args.threads)
    served = ThroughServe(args.model, args.threads, args.port, args.stream_interval)
    rounds = []
    try:
        for _ in range(args.rounds):
            lb, sb = local.burst(prompts, args.output), served.burst(prompts, args.output)
            lp = local.paced(prompts, args.output, args.interval)
            sp = served.paced(prompts, args.output, args.interval)
            rounds.append({"in_process_output_tok_s": lb["output_tok_s"], "serve_output_tok_s": sb["output_tok_s"],
                           "burst_in_process_ttft_p50_s": lb["ttft_p50_s"], "burst_serve_ttft_p50_s": sb["ttft_p50_s"],
                           "in_process_ttft_p50_s": lp, "serve_ttft_p50_s": sp,
                           "serve_steps_per_burst": sb["steps"], "serve_first_step_tokens": sb["first_step_tokens"]})
    finally:
        served.close()
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    costs = [1 - r["serve_output_tok_s"] / r["in_process_output_tok_s"] for r in rounds]
    return {
        "requests": args.requests, "prompt_tokens": args.prompt, "output_tokens": args.output,
        "threads": args.threads, "interval_s": args.interval, "rounds": args.rounds,
        "stream_interval_s": args.stream_interval,
        **{k: round(v, 4) for k, v in med.items()},
        "throughput_cost": round(statistics.median(costs), 4),
        "throughput_cost_per_round": [round(c, 4) for c in costs],  # the box's noise, in plain sight
        "ttft_added_s": round(statistics.median(r["serve_ttft_p50_s"] - r["in_process_ttft_p50_s"]
                                                for r in rounds), 4),
        "burst_ttft_added_s": round(statistics.median(r["burst_serve_ttft_p50_s"] - r["burst_in_process_ttft_p50_s"]
                                                      for r in rounds), 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--output", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the model, both sides")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between paced requests")
    p.add_argument("--rounds", type=int, default=5, help="alternating in-process / Serve rounds")
    p.add_argument("--stream-interval", type=float, default=0.05,
                   help="the app's stream_interval_s (tokens of a request per SSE chunk at most this often)")
    p.add_argument("--model", default="default")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--out", default=str(RESULTS / "serve_overhead.json"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    out = measure(args)
    print(f"{'':14}{'burst tok/s':>13}{'burst TTFT p50':>16}{'paced TTFT p50':>16}")
    for name, key in (("in-process", "in_process"), ("Ray Serve", "serve")):
        print(f"{name:14}{out[key + '_output_tok_s']:>13.1f}{out['burst_' + key + '_ttft_p50_s']:>15.3f}s"
              f"{out[key + '_ttft_p50_s']:>15.3f}s")
    print(f"Serve's model actor took {out['serve_steps_per_burst']:.0f} steps per burst (median), the first "
          f"of {out['serve_first_step_tokens']:.0f} prompt tokens: {args.requests} prompts in one prefill "
          f"would take {args.output}")
    rounds = ", ".join(f"{c:.1%}" for c in out["throughput_cost_per_round"])
    print(f"throughput cost {out['throughput_cost']:.1%} (target < 10%; rounds: {rounds}), paced TTFT added "
          f"{out['ttft_added_s'] * 1e3:.0f} ms (target < 50 ms), burst TTFT added "
          f"{out['burst_ttft_added_s'] * 1e3:.0f} ms")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
