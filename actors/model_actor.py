"""ModelActor: one per GPU (or per CPU box); holds the model and its KV cache, executes plans.

The same class runs in-process (tests, benchmarks) and as a Ray actor: the deploy layer wraps it
with `ray.remote(num_gpus=..., num_cpus=...)` and names it `actor_name(i)` in namespace
`fluidserve`. It keeps no scheduling state: a plan says what to compute and where to put the
KV; the actor validates it, runs one forward pass, samples, and reports the time it took.
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch

from actors.model.attention import make_backend
from actors.model.batch import build_batch
from actors.model.llama import LlamaModel
from actors.model.loader import load_model
from actors.model.sampler import Sampler, SampleRow
from kv.cache import KVCache, KVShape, PlanError
from scheduler.plan import Plan, StepResult

RAY_NAMESPACE = "fluidserve"


def actor_name(i: int) -> str:
    """Name of the i-th live model actor in the Ray namespace `fluidserve`."""
    return f"fluidserve-model-{i}"


class ModelActor:
    def __init__(self, model: str = "default", worker_id: int = 0, kv_cache_tokens: int = 16384,
                 kv_cache_memory_fraction: float = 0.9, block_size: int = 16,
                 device: str = "auto", dtype: str = "auto", attention: str = "auto",
                 num_threads: int | None = None) -> None:
        if num_threads is None:  # in-process default: every core this process may use
            num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
                else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, num_threads))
        self.model_name, self.worker_id = model, worker_id
        loaded, self.tokenizer = load_model(model, device, dtype)
        self.config = loaded.config
        self.device = loaded.device
        self.model = LlamaModel(loaded)
        c = self.config
        shape = KVShape(c.num_layers, c.num_kv_heads, c.head_dim)
        self.cache = KVCache.from_budget(shape, block_size, self.device, loaded.dtype,
                                         kv_cache_tokens, kv_cache_memory_fraction)
        self.backend = make_backend(attention, self.device, block_size)
        self.sampler = Sampler(c.eos_token_ids)
        self.steps = 0
        self.last_step_time_s = 0.0

    # -- the one hot call -------------------------------------------------------------------
    def execute(self, plan: Plan) -> StepResult:
        """Run one iteration: write KV where the plan says, return the sampled tokens."""
        start = time.perf_counter()
        self._validate(plan)
        tokens = []
        if plan.chunks:
            batch = build_batch(plan, self.device)
            meta = self.backend.prepare(batch, self.cache)
            logits = self.model.forward(batch, self.cache, self.backend, meta)
            rows = [SampleRow(plan.chunks[i].request_id, plan.chunks[i].sampling,
                              plan.chunks[i].context_len) for i in batch.sample_chunks]
            tokens = self.sampler(logits, rows)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.steps += 1
        self.last_step_time_s = time.perf_counter() - start
        return StepResult(plan.worker, plan.iteration, tokens, self.last_step_time_s)

    def _validate(self, plan: Plan) -> None:
        self.cache.validate(plan)
        c = self.config
        for chunk in plan.chunks:
            if chunk.context_len > c.max_model_len:
                raise PlanError(f"{chunk.request_id}: context {chunk.context_len} exceeds the "
                                f"model's {c.max_model_len} positions")
            if chunk.token_ids and not (0 <= min(chunk.token_ids)
                                        and max(chunk.token_ids) < c.vocab_size):
                raise PlanError(f"{chunk.request_id}: token ids outside the vocabulary "
                                f"of {c.vocab_size}")

    # -- what the scheduler and the deploy layer ask --------------------------------------
    def capacity(self) -> dict[str, Any]:
        c = self.config
        return {
            "num_blocks": self.cache.num_blocks,
            "block_size": self.cache.block_size,
            "kv_capacity_tokens": self.cache.capacity_tokens,
            "max_model_len": c.max_model_len,
            "vocab_size": c.vocab_size,
            "eos_token_ids": list(c.eos_token_ids),
            "model": self.model_name,
            "device": str(self.device),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "attention": self.backend.name,
        }

    def health(self) -> dict[str, Any]:
        return {"ok": True, "worker_id": self.worker_id, "steps": self.steps,
                "last_step_time_s": self.last_step_time_s, "device": str(self.device),
                "num_threads": torch.get_num_threads()}

    def pid(self) -> int:
        """The actor's process id: fault-injection tests SIGKILL it mid-iteration."""
        return os.getpid()

    def get_tokenizer(self) -> Any:
        return self.tokenizer
