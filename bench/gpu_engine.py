"""Decode throughput on one GPU: `random:llama-2-7b`, batch 64 and 256, flash_attn vs sdpa.

    python -m bench.gpu_engine [--model random:llama-2-7b] [--batches 64 256] [--context 256]
                               [--steps 20] [--json]

Each batch size: B requests whose KV already spans `--context` tokens (timing does not depend
on the KV content, so no prefill is run), then `--steps` pure-decode iterations through
`ModelActor.execute`. Reports decode tokens/s per backend. Exits 2 with a message without CUDA.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from kv.blocks import BlockPool
from scheduler.plan import Plan, ScheduledChunk
from scheduler.request import SamplingParams


def decode_tok_s(actor, batch: int, context: int, steps: int) -> float:
    pool = BlockPool(actor.cache.num_blocks, actor.cache.block_size)
    sampling = SamplingParams(ignore_eos=True)
    ctx = [context] * batch
    times = []
    for step in range(steps + 2):  # two warm-up steps
        chunks = []
        for i in range(batch):
            rid = f"r{i}"
            pool.reserve(rid, ctx[i])
            chunks.append(ScheduledChunk(rid, [100], ctx[i] - 1, 1, pool.block_table(rid),
                                         pool.slot_mapping(rid, ctx[i] - 1, ctx[i]), True,
                                         sampling, is_prefill=False))
            ctx[i] += 1
        seconds = actor.execute(Plan(0, step, chunks, pool.block_size)).step_time_s
        if step >= 2:
            times.append(seconds)
    return batch / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_engine", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:llama-2-7b")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--context", type=int, default=256)  # batch 256 x 7B KV fits 80 GB
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--backends", nargs="+", default=["flash_attn", "sdpa"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu_engine needs a CUDA GPU; none is visible here", file=sys.stderr)
        return 2

    from actors.model.attention import flash_attn_available
    from actors.model_actor import ModelActor

    results: dict[str, dict[str, float | None]] = {}
    for backend in args.backends:
        if backend == "flash_attn" and not flash_attn_available(torch.device("cuda")):
            print("flash_attn: package not importable, skipped", file=sys.stderr)
            results[backend] = {str(b): None for b in args.batches}
            continue
        actor = ModelActor(args.model, attention=backend, device="cuda")
        need = max(args.batches) * (args.context + args.steps + 2)
        if need > actor.cache.capacity_tokens:
            print(f"warning: KV cache holds {actor.cache.capacity_tokens} tokens < {need}",
                  file=sys.stderr)
        results[backend] = {str(b): round(decode_tok_s(actor, b, args.context, args.steps), 1)
                            for b in args.batches}
        del actor
        torch.cuda.empty_cache()
    print(f"{'backend':<12}" + "".join(f"{'batch ' + str(b):>14}" for b in args.batches))
    for backend, row in results.items():
        print(f"{backend:<12}" + "".join(f"{row[str(b)] or '-':>14}" for b in args.batches))
    if args.json:
        print(json.dumps({"model": args.model, "context": args.context,
                          "gpu": torch.cuda.get_device_name(), "decode_tok_s": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
