"""ModelActor: one per GPU (or per CPU box); holds the model and its KV cache, executes plans.

The same class runs in-process (tests, benchmarks) and as a Ray actor: the deploy layer wraps it
with `ray.remote(num_gpus=..., num_cpus=...)` and names it `actor_name(i)` in namespace
`fluidserve`. It keeps no scheduling state, only what its resident requests are
(`actors.request_state`): a diff plan says what changed and what to compute; the actor checks it
against that state, runs one forward pass, samples, and reports the tokens as compact arrays
with the time the step took. A self-contained `Plan` (tests, benchmarks, calibration, replay)
runs statelessly.

On a GPU, construction follows vLLM: load the weights, run one worst-case step
(`max_num_batched_tokens` over `max_num_seqs` sequences) to measure the peak memory, give the
KV cache what `gpu_memory_utilization` of the device's total memory leaves, then capture CUDA
graphs of decode steps (not with `enforce_eager`, and only with the `triton` attention backend).
Importing this module needs no Ray (the GPU check runs the engine without it).
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Any

import numpy as np
import torch

from actors.model.attention import make_backend
from actors.model.batch import HostStaging, StepBatch, build_batch, rows_from_plan
from actors.model.cuda_graphs import DecodeGraphRunner
from actors.model.llama import LlamaModel
from actors.model.loader import load_model, resolve_device
from actors.model.profiling import peak_step_plan, run_peak_step
from actors.model.sampler import Sampler, SampleRow
from actors.naming import RAY_NAMESPACE, actor_name
from actors.request_state import RequestStates, StepRows
from kv.cache import KVCache, KVShape, PlanError
from kv.memory import MemorySnapshot
from scheduler.plan import DiffPlan, Plan, StepResult, TokenResult, int_array

__all__ = ["RAY_NAMESPACE", "ModelActor", "actor_name", "step_result"]
MAX_GRAPH_BATCH = 512  # vLLM's default largest CUDA-graph batch
# Fault injection for tests only: with FLUIDSERVE_FAULT_INJECTION=1 in the model actor's
# environment, every forward pass that includes a request whose prompt starts with the token ids
# FAULT_PROMPT raises (a model error pinned on that request; HTTP clients can send it as a
# token-id prompt). Off by default; never set it in production.
FAULT_INJECTION = os.environ.get("FLUIDSERVE_FAULT_INJECTION") == "1"
FAULT_PROMPT = np.array([2, 0, 2, 0, 2, 0, 2, 0], dtype=np.int64)
log = logging.getLogger(__name__)


def _utilization(gpu_memory_utilization: float, kv_cache_memory_fraction: float | None) -> float:
    """`kv_cache_memory_fraction` is the deprecated name (it meant a fraction of the memory
    free after loading); it now sets `gpu_memory_utilization`, vLLM's fraction of the total."""
    if kv_cache_memory_fraction is None:
        return gpu_memory_utilization
    message = ("kv_cache_memory_fraction is deprecated: use gpu_memory_utilization (the fraction "
               "of the GPU's total memory this model actor may use, as in vLLM); "
               f"taking {kv_cache_memory_fraction} as gpu_memory_utilization")
    warnings.warn(message, DeprecationWarning, stacklevel=3)
    log.warning(message)
    return kv_cache_memory_fraction


class ModelActor:
    def __init__(self, model: str = "default", worker_id: int = 0, kv_cache_tokens: int = 16384,
                 gpu_memory_utilization: float = 0.9, block_size: int = 16,
                 device: str = "auto", dtype: str = "auto", attention: str = "auto",
                 num_threads: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 4096, enforce_eager: bool = False,
                 kv_cache_memory_fraction: float | None = None) -> None:
        if num_threads is None:  # in-process default: every core this process may use
            num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
                else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, num_threads))
        gpu_memory_utilization = _utilization(gpu_memory_utilization, kv_cache_memory_fraction)
        self.model_name, self.worker_id = model, worker_id
        dev = resolve_device(device)
        before = MemorySnapshot.take(dev) if dev.type == "cuda" else None  # before the weights
        loaded, self.tokenizer = load_model(model, dev, dtype)
        self.config = loaded.config
        self.device = loaded.device
        self.model = LlamaModel(loaded)
        self.backend = make_backend(attention, self.device, block_size, loaded.dtype)
        c = self.config
        shape = KVShape(c.num_layers, c.num_kv_heads, c.head_dim)
        peak_plan = peak_step_plan(max_num_batched_tokens, max_num_seqs, block_size,
                                   c.max_model_len)
        self.cache = KVCache.from_budget(
            shape, block_size, self.device, loaded.dtype, kv_cache_tokens, gpu_memory_utilization,
            before, lambda: run_peak_step(self.model, self.backend, peak_plan))
        self.sampler = Sampler(c.eos_token_ids)
        self.states = RequestStates(self.cache.num_blocks, block_size, c.max_model_len, c.vocab_size)
        self.staging = HostStaging(self.device)
        self.graphs = self._capture_graphs(max_num_seqs, enforce_eager)
        self.steps = 0
        self.last_step_time_s = 0.0
        self.faults = 0  # steps that raised (then retried, or run row by row)
        self.failed_rows = 0  # rows pinned as the cause of a failed step (their requests fail)

    def _capture_graphs(self, max_num_seqs: int, enforce_eager: bool) -> DecodeGraphRunner | None:
        """CUDA graphs of decode steps up to min(max_num_seqs, 512) rows, unless eager."""
        if enforce_eager or not DecodeGraphRunner.supported(self.backend, self.cache):
            return None
        max_blocks = -(-self.config.max_model_len // self.cache.block_size)
        runner = DecodeGraphRunner(self.model, self.cache, self.backend,
                                   min(max_num_seqs, MAX_GRAPH_BATCH), max_blocks)
        runner.capture()
        return runner

    def _forward(self, batch: StepBatch, meta: Any) -> torch.Tensor:
        """One forward pass: a captured graph where one fits the step, else eager."""
        if self.graphs is not None:
            return self.graphs.run(batch, meta)
        return self.model.forward(batch, self.cache, self.backend, meta)

    # -- the one hot call -------------------------------------------------------------------
    def execute(self, plan: DiffPlan | Plan) -> StepResult:
        """Run one iteration: write KV where the plan says, return the sampled tokens."""
        started_at, start = time.monotonic(), time.perf_counter()
        if isinstance(plan, DiffPlan):
            rows, epoch = self.states.apply(plan), plan.epoch
            skip = self.states.failed_rows(rows)
        else:
            self._validate(plan)
            rows, epoch = rows_from_plan(plan), 0
            skip = np.zeros(len(rows.slots), dtype=bool)
        tokens, failed = self._run_contained(rows, skip) if len(rows.slots) else ([], skip.copy())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if isinstance(plan, DiffPlan):
            sampled = np.array([t.token_id for t in tokens], dtype=np.int64)
            failed[np.flatnonzero(rows.sample)[sampled < 0]] = True  # the sampler refused the row
            self.states.advance(rows, sampled, failed)
        self.steps += 1
        self.last_step_time_s = time.perf_counter() - start
        unsampled = [rows.request_ids[i] for i in np.flatnonzero(failed & ~rows.sample).tolist()]
        result = step_result(plan.worker, plan.iteration, epoch, tokens, self.last_step_time_s, started_at,
                             unsampled)
        if isinstance(plan, Plan):
            result.request_ids = [t.request_id for t in tokens]
        return result

    def _run_contained(self, rows: StepRows, skip: np.ndarray) -> tuple[list[TokenResult], np.ndarray]:
        """(tokens of the sampled rows in plan order, failed rows). A failure stays with the
        request that caused it: a step that raises is run once more (a transient fault), then
        row by row, and only the rows that raise alone fail (token -1, "error"); rows of a request
        that failed before (`skip`) are not computed. The other requests' KV is written as if
        nothing happened (the same positions, the same values): nothing is reset."""
        if not skip.any():
            try:
                return self._step(rows), skip.copy()
            except PlanError:
                raise
            except Exception:  # contained below
                log.exception("model actor %d: a step failed; running it once more", self.worker_id)
                self.faults += 1
        return self._run_parts(rows, skip)

    def _run_parts(self, rows: StepRows, skip: np.ndarray) -> tuple[list[TokenResult], np.ndarray]:
        failed = skip.copy()
        keep = np.flatnonzero(~skip)
        by_row: dict[int, TokenResult] = {}
        try:
            by_row.update(zip(keep[rows.sample[keep]].tolist(), self._step(rows.subset(keep))))
        except PlanError:
            raise
        except Exception:  # pinned on its rows below
            log.exception("model actor %d: the step failed again; running its rows alone", self.worker_id)
            for i in keep.tolist():
                try:
                    by_row.update(zip([i] if rows.sample[i] else [], self._step(rows.subset([i]))))
                except Exception as exc:  # noqa: BLE001 - this row's request fails alone
                    log.error("model actor %d: request %s fails its step: %r", self.worker_id,
                              rows.request_ids[i], exc)
                    failed[i] = True
                    self.failed_rows += 1
        sampled = np.flatnonzero(rows.sample).tolist()
        tokens = [by_row.get(i) or TokenResult(rows.request_ids[i], -1, "error") for i in sampled]
        return tokens, failed

    def _step(self, rows: StepRows) -> list[TokenResult]:
        """One forward pass over `rows` and the sampling of its sampled rows."""
        if not len(rows.slots):
            return []
        if FAULT_INJECTION and self._injected_fault(rows):
            raise RuntimeError("injected model fault (FLUIDSERVE_FAULT_INJECTION)")
        batch = build_batch(rows, self.device, self.cache.block_size, self.staging)
        meta = self.backend.prepare(batch, self.cache)
        logits = self._forward(batch, meta)
        context = rows.context_lens
        sample_rows = [SampleRow(rows.request_ids[i], rows.sampling[i], int(context[i]))
                       for i in batch.sample_chunks]
        return self.sampler(logits, sample_rows)

    def _injected_fault(self, rows: StepRows) -> bool:
        n = len(FAULT_PROMPT)
        for slot in rows.slots.tolist():
            tokens = self.states.tokens[slot] if slot < len(self.states.tokens) else None
            if tokens is not None and len(tokens) >= n and np.array_equal(tokens[:n], FAULT_PROMPT):
                return True
        return False

    def logits(self, plan: Plan) -> torch.Tensor:
        """fp32 logits of the plan's sampled rows, in plan order, without sampling: what
        `execute` samples from (bench/gpu_check.py compares them with transformers)."""
        self._validate(plan)
        batch = build_batch(plan, self.device)
        return self._forward(batch, self.backend.prepare(batch, self.cache))

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
        return {"ok": True, "worker_id": self.worker_id, "steps": self.steps, "faults": self.faults,
                "failed_rows": self.failed_rows, "resident": self.states.num_live,
                "last_step_time_s": self.last_step_time_s, "device": str(self.device),
                "num_threads": torch.get_num_threads()}

    def pid(self) -> int:
        """The actor's process id: fault-injection tests SIGKILL it mid-iteration."""
        return os.getpid()

    def get_tokenizer(self) -> Any:
        return self.tokenizer


def step_result(worker: int, iteration: int, epoch: int, tokens: list, step_time_s: float,
                started_at: float, failed: list[str] = ()) -> StepResult:
    """The compact result of a step from the sampler's per-row tokens; `failed`: requests whose
    rows that sample nothing failed (a failed sampled row is a token with reason "error")."""
    stops = int_array(i for i, t in enumerate(tokens) if t.finish_reason == "stop")
    logprobs = [t.logprob for t in tokens] if any(t.logprob is not None for t in tokens) else None
    tops = [t.top_logprobs for t in tokens] if any(t.top_logprobs is not None for t in tokens) else None
    failed = [t.request_id for t in tokens if t.finish_reason == "error"] + list(failed)
    return StepResult(worker, iteration, int_array(t.token_id for t in tokens), stops,
                      step_time_s, logprobs, epoch, started_at, time.monotonic(),
                      top_logprobs=tops, failed=failed or None)
