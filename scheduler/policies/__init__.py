"""Batching policies behind one interface, by name."""
from __future__ import annotations

from scheduler.cost import CostModel
from scheduler.policies.base import Policy, PolicyConfig, WorkloadHint

POLICY_NAMES = ("nested-wait", "wait", "vllm", "vllm-v1", "sarathi")


def make_policy(
    name: str,
    config: PolicyConfig | None = None,
    cost: CostModel | None = None,
    hint: WorkloadHint | None = None,
    **params,
) -> Policy:
    """Build a policy by name; `params` are the policy's own (budget, num_segments, chunk_size...)."""
    from scheduler.policies.nested_wait import NestedWaitPolicy
    from scheduler.policies.sarathi import SarathiPolicy
    from scheduler.policies.vllm import VLLMPolicy
    from scheduler.policies.vllm_v1 import VLLMV1Policy
    from scheduler.policies.wait import WaitPolicy

    config = config or PolicyConfig()
    builders = {
        "nested-wait": lambda: NestedWaitPolicy(config, cost=cost, hint=hint, **params),
        "wait": lambda: WaitPolicy(config, cost=cost, hint=hint, **params),
        "vllm": lambda: VLLMPolicy(config, **params),
        "vllm-v1": lambda: VLLMV1Policy(config, **params),
        "sarathi": lambda: SarathiPolicy(config, **params),
    }
    if name not in builders:
        raise ValueError(f"unknown policy {name!r}; choose one of: {', '.join(POLICY_NAMES)}")
    try:
        return builders[name]()
    except TypeError as exc:  # an unknown keyword in policy_args
        raise ValueError(f"bad arguments for policy {name!r}: {exc}") from None


__all__ = ["POLICY_NAMES", "Policy", "PolicyConfig", "WorkloadHint", "make_policy"]
