"""Where model actors live in Ray: their namespace and names (no torch: the scheduler and the
simulated model actor import this)."""
from __future__ import annotations

RAY_NAMESPACE = "fluidserve"


def actor_name(i: int) -> str:
    """Name of the i-th live model actor in the Ray namespace `fluidserve`."""
    return f"fluidserve-model-{i}"
