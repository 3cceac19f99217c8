"""Where model actors live in Ray: their namespace and names (no torch: the scheduler and the
simulated model actor import this).

Names are scoped to the Serve application and to the scheduler replica that owns the actors:
`fluidserve-<app>-<replica>-model-<i>`. Two fluidserve apps on one cluster, or a redeployed
scheduler beside a draining one, never share a name, so no scheduler ever touches another's
actors. The actors are owned by the replica that created them (not detached): when it dies, Ray
ends them with it, and its successor creates its own under its own names.
"""
from __future__ import annotations

import re
import uuid

RAY_NAMESPACE = "fluidserve"


def actor_name(i: int, owner: str = "local") -> str:
    """Name of the i-th model actor of `owner` (see `owner_scope`) in the namespace `fluidserve`."""
    return f"fluidserve-{owner}-model-{i}"


def owner_scope() -> str:
    """`<app>-<replica id>` inside a Serve replica; `local-<random>` elsewhere."""
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        app, replica = ctx.app_name, ctx.replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a Serve replica (tests, benchmarks, scripts)
        app, replica = "local", uuid.uuid4().hex[:8]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{app}-{replica}")
