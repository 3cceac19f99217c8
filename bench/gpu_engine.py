"""Decode throughput on one GPU by attention backend: `random:llama-2-7b`, triton vs flash_attn
vs sdpa (each with CUDA graphs where it supports them).

    python -m bench.gpu_engine [--model random:llama-2-7b] [--batches 64 256] [--context 256]
                               [--steps 20] [--backends triton flash_attn sdpa] [--json]

Each batch size: B requests whose KV already spans `--context` tokens, then `--steps` greedy
pure-decode iterations through `ModelActor.execute` (bench/gpu_check.py's `decode_tok_s`).
Reports decode tokens/s per backend. Exits 2 with a message without CUDA. The correctness and
roofline check of the default configuration is bench/gpu_check.py.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from bench.gpu_check import decode_tok_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_engine", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:llama-2-7b")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--context", type=int, default=256)  # batch 256 x 7B KV fits 80 GB
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--backends", nargs="+", default=["triton", "flash_attn", "sdpa"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu_engine needs a CUDA GPU; none is visible here", file=sys.stderr)
        return 2

    from actors.model_actor import ModelActor

    results: dict[str, dict[str, float | None]] = {}
    for backend in args.backends:
        try:
            actor = ModelActor(args.model, attention=backend, device="cuda",
                               max_num_seqs=max(args.batches))
        except ValueError as exc:  # e.g. flash-attn not installed
            print(f"{backend}: {exc}; skipped", file=sys.stderr)
            results[backend] = {str(b): None for b in args.batches}
            continue
        results[backend] = {}
        for b in args.batches:
            tok_s = decode_tok_s(actor, b, args.context, args.steps, warmup=2, sampled=False)
            results[backend][str(b)] = round(tok_s, 1) if tok_s else None
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
