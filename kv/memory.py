"""How much GPU memory the KV cache gets: vLLM's `gpu_memory_utilization`, measured like vLLM.

`gpu_memory_utilization` (default 0.9) is the fraction of the device's TOTAL memory that one
model actor may use in all: its weights, the activations of its largest step, the memory it
caused outside torch's allocator (CUDA context, cuBLAS workspaces, Triton, NCCL) and the KV
cache, which gets whatever is left. Same meaning as vLLM's: two actors sharing a GPU can take
0.45 each. The cache never takes more than is free when it is allocated (another process may
hold part of the fraction); what that leaves is logged.

    before = MemorySnapshot.take(device)                 # before the weights are loaded
    ... load the weights ...
    peak, after = profile_peak(device, run_peak_step)    # one step at max_num_batched_tokens
    budget = KVBudget.measure(before, after, peak, 0.9)  # budget.kv_bytes for the cache
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

GIB = 1024**3


@dataclass(frozen=True)
class MemorySnapshot:
    total: int
    free: int
    torch_reserved: int  # held by torch's caching allocator

    @property
    def non_torch(self) -> int:
        """Device memory in use outside torch's allocator (this process's and others')."""
        return self.total - self.free - self.torch_reserved

    @classmethod
    def take(cls, device: torch.device) -> MemorySnapshot:
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        return cls(total, free, torch.cuda.memory_reserved(device))


def profile_peak(device: torch.device, step: Callable[[], int] | None) -> tuple[int, MemorySnapshot]:
    """Run `step` (a worst-case forward pass) from a clean allocator and return the peak of
    torch's allocated memory (weights included) and a snapshot after it. `step` returns the
    bytes it allocated that serving will not hold (its scratch KV cache): not counted."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    scratch = step() if step is not None else 0
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - scratch
    torch.cuda.empty_cache()
    return peak, MemorySnapshot.take(device)


@dataclass(frozen=True)
class KVBudget:
    total: int
    utilization: float
    torch_peak: int  # weights + the profiled step's activations
    non_torch: int  # what this actor added outside torch's allocator since `before`
    free: int  # free on the device once profiling is done
    kv_bytes: int

    @classmethod
    def measure(cls, before: MemorySnapshot, after: MemorySnapshot, torch_peak: int,
                utilization: float) -> KVBudget:
        non_torch = max(0, after.non_torch - before.non_torch)
        return cls(after.total, utilization, torch_peak, non_torch, after.free,
                   kv_cache_bytes(after.total, utilization, torch_peak, non_torch, after.free))

    def describe(self) -> str:
        return (f"gpu_memory_utilization {self.utilization} of {self.total / GIB:.1f} GiB: weights "
                f"+ peak step {self.torch_peak / GIB:.2f} GiB, other {self.non_torch / GIB:.2f} "
                f"GiB, free {self.free / GIB:.2f} GiB -> KV cache {self.kv_bytes / GIB:.2f} GiB")


def kv_cache_bytes(total: int, utilization: float, torch_peak: int, non_torch: int,
                   free: int) -> int:
    """The KV cache's share of `utilization * total`, never more than is free now."""
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    return max(0, min(int(total * utilization) - torch_peak - non_torch, free))
