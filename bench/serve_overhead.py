"""What Ray Serve costs: the same workload in-process (LocalEngine) and through the full stack.

    python -m bench.serve_overhead [--requests 16] [--prompt 64] [--output 32] [--json]

Both sides run the default model with the same policy and threads; the Serve side streams over
HTTP (the OpenAI API) with every request sent at once, as the in-process side submits them.
Prints a table and, last, one JSON line: output tok/s both ways, the throughput cost (target
< 10%), and the median TTFT added (target < 50 ms).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time

THREADS = 2
POLICY = "vllm"  # the same on both sides: this measures Ray Serve, not the policy


def workload(n: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 20000) for _ in range(prompt_len)] for _ in range(n)]


def in_process(prompts: list[list[int]], output: int, model: str) -> dict:
    from actors.local_engine import LocalEngine
    from scheduler.request import SamplingParams

    engine = LocalEngine(model, policy=POLICY, kv_cache_tokens=16384, num_threads=THREADS)
    engine.generate(prompts[:2], 4)  # warm-up
    start = time.monotonic()
    done = engine.generate(prompts, output, SamplingParams(ignore_eos=True))
    elapsed = time.monotonic() - start
    return {"output_tok_s": sum(len(c.token_ids) for c in done) / elapsed,
            "ttft_p50_s": statistics.median(c.first_token - start for c in done)}


async def _stream_one(client, url: str, prompt: list[int], output: int, t0: float) -> tuple[float, int]:
    first, tokens = None, 0
    body = {"prompt": prompt, "max_tokens": output, "stream": True, "ignore_eos": True, "temperature": 0}
    async with client.stream("POST", url, json=body) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                first = first or time.monotonic()
                chunk = json.loads(line[6:])
                if chunk["choices"][0].get("finish_reason"):
                    tokens = chunk["usage"]["completion_tokens"]
    return first - t0, tokens


async def _serve_run(url: str, prompts: list[list[int]], output: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        await _stream_one(client, url, prompts[0], 4, time.monotonic())  # warm-up
        start = time.monotonic()
        results = await asyncio.gather(*(_stream_one(client, url, p, output, start) for p in prompts))
        elapsed = time.monotonic() - start
    return {"output_tok_s": sum(t for _, t in results) / elapsed,
            "ttft_p50_s": statistics.median(t for t, _ in results)}


def through_serve(prompts: list[list[int]], output: int, model: str, port: int) -> dict:
    from deploy.local import start, stop

    url = start({"model": model, "policy": POLICY, "num_model_actors": 1,
                 "model_actor_resources": {"num_cpus": THREADS, "num_gpus": 0},
                 "kv_cache_tokens": 16384}, port=port, num_cpus=THREADS + 1)
    try:
        return asyncio.run(_serve_run(f"{url}/v1/completions", prompts, output))
    finally:
        stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--output", type=int, default=32)
    p.add_argument("--model", default="default")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    prompts = workload(args.requests, args.prompt)
    local = in_process(prompts, args.output, args.model)
    served = through_serve(prompts, args.output, args.model, args.port)
    out = {
        "requests": args.requests, "prompt_tokens": args.prompt, "output_tokens": args.output,
        "in_process_output_tok_s": round(local["output_tok_s"], 2),
        "serve_output_tok_s": round(served["output_tok_s"], 2),
        "throughput_cost": round(1 - served["output_tok_s"] / local["output_tok_s"], 4),
        "in_process_ttft_p50_s": round(local["ttft_p50_s"], 4),
        "serve_ttft_p50_s": round(served["ttft_p50_s"], 4),
        "ttft_added_s": round(served["ttft_p50_s"] - local["ttft_p50_s"], 4),
    }
    print(f"{'':14}{'output tok/s':>14}{'TTFT p50 (s)':>14}")
    print(f"{'in-process':14}{out['in_process_output_tok_s']:>14.1f}{out['in_process_ttft_p50_s']:>14.3f}")
    print(f"{'Ray Serve':14}{out['serve_output_tok_s']:>14.1f}{out['serve_ttft_p50_s']:>14.3f}")
    print(f"throughput cost {out['throughput_cost']:.1%}, TTFT added {out['ttft_added_s'] * 1e3:.0f} ms")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
