"""Engine throughput on one CPU box: fluidserve's engine vs transformers' continuous batching.

    python -m bench.engine [--model default] [--requests 64] [--json]

Workload: N requests, prompts of 32-256 random tokens (fixed seed), 64 output tokens each,
EOS ignored. fluidserve runs them through `ModelActor.execute` driven by a small
continuous-batching loop (every running request decodes each step; waiting prompts fill the
rest of a token budget in chunks), in its default dtype (bf16 weights and KV on AVX512-BF16
CPUs), greedy and sampled (temperature 1.0, top_p 0.95) in alternation, `--repeats` times each
(best kept: other load on a shared box only slows a run down), then greedy in fp32.
transformers runs the same prompts greedy through `model.generate_batch` (its paged-cache
continuous batching) in fp32, its CPU default. All in this process, same threads. Last, one
greedy stream on one thread (bench/single_stream.py): fluidserve's default dtype, fp32 and
llama.cpp on the same GGUF.

roofline_fraction = useful FLOPs of the tokens fluidserve processed (layer matmuls, attention,
LM head of sampled rows) / its wall time / the rate of its own GEMM (fp32 oneDNN, or the bf16
kernel) on 2048 x 2048 measured here, same threads.
"""
from __future__ import annotations

import os

# Before torch loads libgomp: idle OpenMP threads sleep instead of spinning. On a shared box a
# spinning team waiting for a descheduled thread makes 2 threads 2-4x slower than 1.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from actors.model.llama import Projections
from actors.model_actor import ModelActor
from bench import single_stream
from kv.blocks import BlockPool
from scheduler.plan import Plan, ScheduledChunk
from scheduler.request import SamplingParams

GREEDY_NO_EOS = SamplingParams(temperature=0.0, ignore_eos=True)
SAMPLED_NO_EOS = SamplingParams(temperature=1.0, top_p=0.95, ignore_eos=True)


@dataclass
class BenchRequest:
    rid: str
    prompt: list[int]
    max_tokens: int
    computed: int = 0  # tokens whose KV is in the cache
    output: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


def make_prompts(n: int, vocab: int, seed: int, lo: int = 32, hi: int = 256) -> list[list[int]]:
    rng = random.Random(seed)
    # Ids from the lower vocab: ordinary tokens, no special ones.
    return [[rng.randrange(100, min(vocab, 40000)) for _ in range(rng.randint(lo, hi))]
            for _ in range(n)]


def run_fluidserve(actor: ModelActor, prompts: list[list[int]], output_len: int,
                   token_budget: int, sampling: SamplingParams = GREEDY_NO_EOS) -> dict:
    """Continuous batching: decodes first, then chunked prefills up to `token_budget` tokens."""
    cfg = actor.config
    pool = BlockPool(actor.cache.num_blocks, actor.cache.block_size)
    waiting = deque(BenchRequest(f"r{i}", p, output_len) for i, p in enumerate(prompts))
    running: list[BenchRequest] = []
    processed = flops = 0.0
    steps = 0
    start = time.perf_counter()
    while waiting or running:
        chunks, owners = [], []
        for r in running:  # one decode each
            chunks.append(_chunk(pool, r, r.computed, 1, True, sampling))
            owners.append(r)
        budget = token_budget - len(chunks)
        for r in list(waiting):
            if budget <= 0:
                break
            n = min(budget, len(r.prompt) - r.computed)
            if pool.extra_blocks(r.rid, r.computed + n) > pool.num_free_blocks:
                break
            chunks.append(_chunk(pool, r, r.computed, n, r.computed + n == len(r.prompt), sampling))
            owners.append(r)
            budget -= n
        result = actor.execute(Plan(0, steps, chunks, pool.block_size))
        steps += 1
        sampled = iter(result.tokens)
        for c, r in zip(chunks, owners):
            processed += c.num_tokens
            flops += _chunk_flops(cfg, c)
            r.computed += c.num_tokens
            if c.sample:
                r.output.append(next(sampled).token_id)
            if r in waiting and c.sample:
                waiting.remove(r)
                running.append(r)
        for r in [r for r in running if len(r.output) >= r.max_tokens]:
            running.remove(r)
            pool.free(r.rid)
    wall = time.perf_counter() - start
    out_tokens = len(prompts) * output_len
    return {"wall_s": wall, "output_tokens": out_tokens, "processed_tokens": processed,
            "flops": flops, "steps": steps}


def _chunk(pool: BlockPool, r: BenchRequest, start: int, n: int, sample: bool,
           sampling: SamplingParams) -> ScheduledChunk:
    pool.reserve(r.rid, start + n)
    return ScheduledChunk(r.rid, r.tokens[start : start + n], start, n, pool.block_table(r.rid),
                          pool.slot_mapping(r.rid, start, start + n), sample, sampling,
                          is_prefill=start < len(r.prompt))


def _chunk_flops(cfg, c: ScheduledChunk) -> float:
    s, n = c.start_pos, c.num_tokens
    attended = n * s + n * (n + 1) // 2  # sum of context lengths of the chunk's tokens
    dense = n * cfg.flops_per_token(0)
    attention = cfg.num_layers * 4 * cfg.q_size * attended
    return dense + attention + (cfg.lm_head_flops if c.sample else 0)


def run_transformers(model_name: str, prompts: list[list[int]], output_len: int) -> dict:
    from transformers import GenerationConfig, LlamaForCausalLM

    from actors.model.loader import load_model

    loaded, _ = load_model(model_name, "cpu", "float32")
    hf = LlamaForCausalLM(loaded.hf_config).eval()
    hf.load_state_dict(loaded.weights, strict=False)
    gen = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate_batch(prompts, generation_config=gen, progress_bar=False)
    wall = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return {"wall_s": wall, "output_tokens": tokens}


def matmul_rate(proj: Projections, seconds: float = 1.0, n: int = 2048) -> float:
    """Measured GEMM FLOP/s of the engine's own projections (fp32: oneDNN; bf16: the packed
    AVX512-BF16 kernel) with the current torch threads, best of a few runs."""
    x, w = torch.randn(n, n), proj.prepare(torch.randn(n, n))
    proj.apply(x, w)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        proj.apply(x, w)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def best_runs(actor: ModelActor, prompts: list[list[int]], args: argparse.Namespace,
              modes: dict[str, SamplingParams]) -> dict[str, dict]:
    """Each mode `args.repeats` times, interleaved; the fastest run of each."""
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, sampling in modes.items():
            r = run_fluidserve(actor, prompts, args.output_len, args.token_budget, sampling)
            if name not in best or r["wall_s"] < best[name]["wall_s"]:
                best[name] = r
    return best


def tok_s(run: dict | None) -> float | None:
    return run["output_tokens"] / run["wall_s"] if run else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto", help="fluidserve's dtype (auto: bf16 where fast)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--token-budget", type=int, default=1024, help="tokens per engine step")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each fluidserve mode (best)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-transformers", action="store_true", help="fluidserve only (fast)")
    p.add_argument("--skip-fp32", action="store_true", help="no fp32 comparison run")
    p.add_argument("--skip-single-stream", action="store_true")
    p.add_argument("--out", help="also write the JSON result to this file")
    p.add_argument("--json", action="store_true", help="print one JSON line last")
    args = p.parse_args(argv)

    actor = ModelActor(args.model, kv_cache_tokens=32768, num_threads=args.threads,
                       dtype=args.dtype)
    threads = torch.get_num_threads()
    dtype = str(actor.model.dtype).removeprefix("torch.")
    prompts = make_prompts(args.requests, actor.config.vocab_size, args.seed)
    run_fluidserve(actor, prompts[:2], 4, args.token_budget)  # warm-up: allocator, kernels
    peak = matmul_rate(actor.model.proj)
    runs = best_runs(actor, prompts, args, {"greedy": GREEDY_NO_EOS, "sampled": SAMPLED_NO_EOS})
    peak = max(peak, matmul_rate(actor.model.proj))
    fp32 = None
    if not args.skip_fp32 and actor.model.dtype != torch.float32:
        fp32 = ModelActor(args.model, kv_cache_tokens=32768, num_threads=threads, dtype="float32")
        run_fluidserve(fp32, prompts[:2], 4, args.token_budget)
        runs["fp32"] = best_runs(fp32, prompts, args, {"fp32": GREEDY_NO_EOS})["fp32"]
    tf = None if args.skip_transformers else run_transformers(args.model, prompts, args.output_len)
    single = None
    if not args.skip_single_stream and args.model == "default":
        actors = {f"fluidserve_{dtype}": actor} | ({"fluidserve_float32": fp32} if fp32 else {})
        single = single_stream.measure(actors, 96, 3, threads=1)
        torch.set_num_threads(threads)

    fs = runs["greedy"]
    fs_tok_s, tf_tok_s = tok_s(fs), tok_s(tf)
    sampled_tok_s, fp32_tok_s = tok_s(runs["sampled"]), tok_s(runs.get("fp32"))
    achieved = fs["flops"] / fs["wall_s"]
    single_tok_s = single.get(f"fluidserve_{dtype}") if single else None
    result = {
        "model": args.model, "dtype": dtype, "requests": args.requests,
        "output_len": args.output_len, "threads": threads, "steps": fs["steps"],
        "fluidserve_output_tok_s": round(fs_tok_s, 2),
        "transformers_output_tok_s": round(tf_tok_s, 2) if tf_tok_s else None,
        "speedup": ratio(fs_tok_s, tf_tok_s),
        "processed_tok_s": round(fs["processed_tokens"] / fs["wall_s"], 1),
        "achieved_gflops": round(achieved / 1e9, 1),
        "matmul_gflops": round(peak / 1e9, 1),
        "roofline_fraction": round(achieved / peak, 3),
        "fluidserve_sampled_output_tok_s": round(sampled_tok_s, 2),
        "sampled_vs_greedy": ratio(sampled_tok_s, fs_tok_s),
        "fluidserve_fp32_output_tok_s": round(fp32_tok_s, 2) if fp32_tok_s else None,
        "fp32_speedup": ratio(fp32_tok_s, tf_tok_s),
        "single_stream_tok_s": single_tok_s,
        "single_stream_fp32_tok_s": single.get("fluidserve_float32") if single else None,
        "llama_cpp_single_stream_tok_s": single.get("llama_cpp") if single else None,
        "single_stream_vs_llama_cpp": ratio(single_tok_s, single.get("llama_cpp")) if single else None,
        "llama_cpp_skipped": single.get("llama_cpp_skipped") if single else "not run",
    }
    print_table(result, runs, tf)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if args.json:
        print(json.dumps(result))
    return 0


def print_table(result: dict, runs: dict[str, dict], tf: dict | None) -> None:
    print(f"{'engine':<26}{'wall s':>9}{'output tok/s':>14}")
    labels = {"greedy": f"{result['dtype']} greedy", "sampled": f"{result['dtype']} sampled",
              "fp32": "float32 greedy"}
    for name, run in runs.items():
        print(f"{'fluidserve ' + labels[name]:<26}{run['wall_s']:>9.1f}{tok_s(run):>14.1f}")
    if tf:
        print(f"{'transformers float32':<26}{tf['wall_s']:>9.1f}{tok_s(tf):>14.1f}")
    print(f"speedup vs transformers {result['speedup']} (fp32 engine: {result['fp32_speedup']}); "
          f"sampled / greedy {result['sampled_vs_greedy']}")
    print(f"processed {result['processed_tok_s']} tok/s, {result['achieved_gflops']} GFLOP/s of "
          f"{result['matmul_gflops']} measured {result['dtype']} GEMM peak ({result['threads']} threads): "
          f"roofline {result['roofline_fraction']:.2f}")
    if result["single_stream_tok_s"] is not None:
        print(f"single stream, 1 thread: {result['single_stream_tok_s']} tok/s "
              f"(fp32 {result['single_stream_fp32_tok_s']}, llama.cpp "
              f"{result['llama_cpp_single_stream_tok_s'] or result['llama_cpp_skipped']})")


if __name__ == "__main__":
    sys.exit(main())
