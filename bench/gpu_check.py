"""The engine on one GPU in one prepared run: logits against transformers, decode throughput
against the memory-bandwidth roofline.

    python -m bench.gpu_check            # one H100 / H200 / A100-80GB, a few minutes (< 8)
    python -m bench.gpu_check --tiny     # CPU smoke run (CI): random:tiny, SDPA + Triton interpreter

Needs only torch, triton, numpy and transformers: no Ray (the engine imports without it), no
downloads (`random:llama-2-7b`: seeded weights generated on the device). Writes JSON (`--out`,
default bench/results/gpu_check.json, or gpu_check_tiny.json) and prints tables.

1. Logits: four steps through `ModelActor.logits` (the forward `execute` samples from, CUDA
   graphs included) — a mixed prefill batch (one prompt chunked), a chunk continuing its cached
   prefix beside three decodes, two pure-decode steps — against transformers'
   LlamaForCausalLM built from the same weights in the same dtype. Per step: the largest
   |ours - reference| / max |reference| over the sampled rows, and top-1 agreement.
2. Decode throughput through `ModelActor.execute` (validation, host work, forward, sampling,
   sync) at each batch x context, greedy and sampled (temperature 1.0, top-p 0.95), and greedy
   with CUDA graphs off. The KV of the contexts is reserved, not prefilled (step time does not
   depend on its values). Roofline: the step's bytes (matmul weights + the KV the batch reads)
   at the copy bandwidth measured on the device; `fraction` = measured / roofline tokens/s.
Exit status 1 when a logits check is outside its tolerance.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


@dataclass
class Setup:
    model: str
    device: str
    dtype: str
    backends: list[str]
    prompt_lens: list[int]  # of the logits check; the first is prefilled in two chunks
    batches: list[int]
    contexts: list[int]
    steps: int
    warmup: int
    tolerance: float  # max |ours - reference| / max |reference| per sampled row
    eager_contexts: list[int] = field(default_factory=list)  # greedy with CUDA graphs off


GPU = Setup("random:llama-2-7b", "cuda", "bfloat16", ["auto"], [300, 57, 1000, 16],
            [1, 16, 64, 256], [256, 1024, 2048], steps=20, warmup=3, tolerance=5e-2,
            eager_contexts=[1024])
TINY = Setup("random:tiny", "cpu", "float32", ["sdpa", "triton"], [40, 9, 70, 16],
             [1, 4], [32], steps=2, warmup=1, tolerance=1e-4)


# -- logits ---------------------------------------------------------------------------------


def check_steps(lens: list[int]) -> list[tuple[str, list[tuple[int, int, int]]]]:
    """(kind, [(sequence, start, end)]) of the four steps; every chunk is sampled."""
    cut = lens[0] * 3 // 5
    rest = range(1, len(lens))
    return [
        ("mixed prefill", [(0, 0, cut)] + [(i, 0, lens[i]) for i in rest]),
        ("chunk + decodes", [(0, cut, lens[0])] + [(i, lens[i], lens[i] + 1) for i in rest]),
        ("decode", [(i, n + (i > 0), n + 1 + (i > 0)) for i, n in enumerate(lens)]),
        ("decode", [(i, n + 1 + (i > 0), n + 2 + (i > 0)) for i, n in enumerate(lens)]),
    ]


def reference_logits(setup: Setup) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Random token sequences (each prompt + 3 decoded tokens) and transformers' logits at
    every position of each (fp32, on the CPU), from the same seeded weights as the actor's."""
    from transformers import LlamaForCausalLM

    from actors.model.loader import load_model

    loaded, _ = load_model(setup.model, setup.device, setup.dtype)
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, loaded.config.vocab_size, (n + 3,), generator=gen).tolist()
            for n in setup.prompt_lens]
    default = torch.get_default_dtype()
    torch.set_default_dtype(loaded.dtype)  # build the 7B model once, in its dtype, on the device
    try:
        with torch.device(loaded.device):
            hf = LlamaForCausalLM(loaded.hf_config).eval()
    finally:
        torch.set_default_dtype(default)
    hf.load_state_dict(loaded.weights, strict=False, assign=True)  # share, do not copy
    hf.tie_weights()  # tied heads: lm_head follows the assigned embedding
    with torch.no_grad():
        out = [hf(torch.tensor([s], device=loaded.device)).logits[0].float().cpu() for s in seqs]
    del hf, loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return seqs, out


def check_logits(actor: Any, setup: Setup, seqs: list[list[int]],
                 ref: list[torch.Tensor]) -> list[dict[str, Any]]:
    from kv.blocks import BlockPool
    from scheduler.plan import Plan, ScheduledChunk

    pool = BlockPool(actor.cache.num_blocks, actor.cache.block_size)
    for i, s in enumerate(seqs):
        pool.reserve(f"s{i}", len(s))
    rows = []
    for step, (kind, chunks) in enumerate(check_steps(setup.prompt_lens)):
        plan = Plan(0, step, [ScheduledChunk(f"s{i}", seqs[i][a:b], a, b - a, pool.block_table(f"s{i}"),
                                             pool.slot_mapping(f"s{i}", a, b), True,
                                             is_prefill=b - a > 1) for i, a, b in chunks],
                    actor.cache.block_size)
        ours = actor.logits(plan).float().cpu()
        want = torch.stack([ref[i][b - 1] for i, _, b in chunks])
        err = ((ours - want).abs().amax(dim=1) / want.abs().amax(dim=1)).max().item()
        top1 = (ours.argmax(1) == want.argmax(1)).float().mean().item()
        rows.append({"step": step + 1, "kind": kind, "rows": len(chunks),
                     "max_rel_err": err, "top1_agree": top1, "ok": err <= setup.tolerance})
    return rows


# -- decode throughput ----------------------------------------------------------------------
def decode_tok_s(actor: Any, batch: int, context: int, steps: int, warmup: int,
                 sampled: bool) -> float | None:
    """Median decode tokens/s of `batch` sequences at `context`; None if the KV cannot hold it."""
    from kv.blocks import BlockPool
    from scheduler.plan import Plan, ScheduledChunk
    from scheduler.request import SamplingParams

    if batch * (context + warmup + steps) > actor.cache.capacity_tokens:
        return None
    # Sampled as OpenAI clients ask by default: temperature 1, no seed.
    sampling = SamplingParams(temperature=1.0, top_p=0.95, ignore_eos=True) if sampled \
        else SamplingParams(ignore_eos=True)
    pool = BlockPool(actor.cache.num_blocks, actor.cache.block_size)
    times = []
    for step in range(warmup + steps):
        ctx = context + step
        chunks = []
        for i in range(batch):
            pool.reserve(f"r{i}", ctx)
            chunks.append(ScheduledChunk(f"r{i}", [100], ctx - 1, 1, pool.block_table(f"r{i}"),
                                         pool.slot_mapping(f"r{i}", ctx - 1, ctx), True, sampling,
                                         is_prefill=False))
        start = time.perf_counter()
        actor.execute(Plan(0, step, chunks, pool.block_size))
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        dst.copy_(src)
    sync()
    return 2 * n * reps / (time.perf_counter() - start)


def step_bytes(actor: Any, batch: int, context: int) -> float:
    """Weights every decode step streams (all matmuls and the LM head) + the KV it reads."""
    c, elem = actor.config, actor.cache.k.element_size()
    weights = (c.num_layers * c.layer_params + c.hidden_size * c.vocab_size) * elem
    kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * elem
    return weights + batch * context * kv_per_token


def throughput(actor: Any, setup: Setup, bandwidth: float, deadline: float) -> list[dict[str, Any]]:
    rows = []
    modes = [("greedy", setup.contexts, False), ("sampled", setup.contexts, True)]
    if actor.graphs is not None and setup.eager_contexts:
        modes.append(("greedy-eager", setup.eager_contexts, False))
    for mode, contexts, sampled in modes:
        graphs = actor.graphs
        if mode.endswith("eager"):
            actor.graphs = None  # the same actor without its CUDA graphs
        for context in contexts:
            for batch in setup.batches:
                row: dict[str, Any] = {"mode": mode, "batch": batch, "context": context}
                if time.monotonic() > deadline:
                    row["skipped"] = "time budget"
                else:
                    tok_s = decode_tok_s(actor, batch, context, setup.steps, setup.warmup, sampled)
                    if tok_s is None:
                        row["skipped"] = f"KV cache holds {actor.cache.capacity_tokens} tokens"
                    else:
                        mid = context + setup.warmup + setup.steps // 2
                        roof = batch * bandwidth / step_bytes(actor, batch, mid)
                        row.update(tok_s=round(tok_s, 1), step_ms=round(1e3 * batch / tok_s, 2),
                                   roofline_tok_s=round(roof, 1),
                                   roofline_fraction=round(tok_s / roof, 3))
                rows.append(row)
        actor.graphs = graphs
    return rows


# -- the run --------------------------------------------------------------------------------
def run_backend(setup: Setup, backend: str, seqs: list[list[int]], ref: list[torch.Tensor],
                bandwidth: float, deadline: float) -> dict[str, Any]:
    from actors.model_actor import ModelActor

    start = time.monotonic()
    actor = ModelActor(setup.model, device=setup.device, dtype=setup.dtype, attention=backend,
                       max_num_seqs=max(setup.batches), kv_cache_tokens=32768, num_threads=None)
    result: dict[str, Any] = {
        "attention": actor.backend.name, "cuda_graphs": actor.graphs is not None,
        "kv_capacity_tokens": actor.cache.capacity_tokens,
        "startup_s": round(time.monotonic() - start, 1),
    }
    result["logits"] = check_logits(actor, setup, seqs, ref)
    result["logits_ok"] = all(r["ok"] for r in result["logits"])
    result["decode"] = throughput(actor, setup, bandwidth, deadline)
    del actor
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def print_tables(report: dict[str, Any]) -> None:
    print(f"{report['model']} {report['dtype']} on {report['device_name']}: copy bandwidth "
          f"{report['copy_bandwidth_gb_s']} GB/s, {report['elapsed_s']} s")
    for name, r in report["backends"].items():
        print(f"\n[{name}] attention={r['attention']} cuda_graphs={r['cuda_graphs']} "
              f"kv_capacity={r['kv_capacity_tokens']} tokens startup={r['startup_s']} s")
        print(f"{'step':>4} {'kind':<16} {'rows':>4} {'max rel err':>12} {'top-1':>6} ok")
        for x in r["logits"]:
            print(f"{x['step']:>4} {x['kind']:<16} {x['rows']:>4} {x['max_rel_err']:>12.2e} "
                  f"{x['top1_agree']:>6.2f} {'yes' if x['ok'] else 'NO'}")
        print(f"{'mode':<13} {'batch':>5} {'context':>7} {'tok/s':>9} {'step ms':>8} "
              f"{'roofline':>9} {'fraction':>8}")
        for x in r["decode"]:
            if "skipped" in x:
                print(f"{x['mode']:<13} {x['batch']:>5} {x['context']:>7}  skipped: {x['skipped']}")
                continue
            print(f"{x['mode']:<13} {x['batch']:>5} {x['context']:>7} {x['tok_s']:>9} "
                  f"{x['step_ms']:>8} {x['roofline_tok_s']:>9} {x['roofline_fraction']:>8}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run with random:tiny")
    p.add_argument("--backends", nargs="+", help="attention backends (default: auto on GPU)")
    p.add_argument("--time-budget-s", type=float, default=420.0,
                   help="skip the remaining throughput points past this (default 7 minutes)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    setup = TINY if args.tiny else GPU
    if setup.device == "cuda" and not torch.cuda.is_available():
        print("bench.gpu_check needs a CUDA GPU (none visible); --tiny runs on CPU", file=sys.stderr)
        return 2
    if setup.device == "cpu":  # Triton kernels on CPU tensors: its interpreter, set before import
        os.environ.setdefault("TRITON_INTERPRET", "1")
    backends = args.backends or setup.backends
    start = time.monotonic()
    deadline = start + args.time_budget_s
    seqs, ref = reference_logits(setup)
    device = torch.device(setup.device)
    bandwidth = copy_bandwidth(device)
    report: dict[str, Any] = {
        "model": setup.model, "dtype": setup.dtype,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "tolerance": setup.tolerance, "backends": {},
    }
    for backend in backends:
        report["backends"][backend] = run_backend(setup, backend, seqs, ref, bandwidth, deadline)
    report["ray_imported"] = "ray" in sys.modules
    report["elapsed_s"] = round(time.monotonic() - start, 1)
    print_tables(report)
    out = args.out or RESULTS / ("gpu_check_tiny.json" if args.tiny else "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0 if all(b["logits_ok"] for b in report["backends"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
