"""build_app: the fluidserve Serve application (import path `deploy.app:build_app`).

Two deployments: `Scheduler` (exactly one replica: the central Nested WAIT scheduler, which
creates the model actors) and `Ingress` (FastAPI, OpenAI API; scale it freely). Both are light:
fractional CPUs, so that on a small box the model actors get the cores.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from ray import serve

from actors.scheduler_actor import EngineArgs, SchedulerActor
from actors.sim_actor import is_sim_model, output_length_sample, sim_cost
from deploy.ingress import DEFAULT_MAX_BODY_BYTES, Ingress
from deploy.tokenizer import served_model_name
from scheduler.policies import POLICY_NAMES

APP_NAME = "fluidserve"
# The scheduler multiplexes every request in flight; Serve must never queue in front of it.
SCHEDULER_MAX_ONGOING = 100_000


@dataclasses.dataclass
class AppArgs(EngineArgs):
    """The `args:` of a serve config (deploy/configs/*.yaml) or of build_app: the engine's
    arguments plus what only the deployment layer uses."""

    api_key_env: str | None = "FLUIDSERVE_API_KEY"
    metrics_api_key_env: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.1
    scheduler_num_cpus: float = 0.1
    # How long a replaced scheduler replica (a redeploy) keeps serving its streams before Serve
    # stops it; the ingress then resumes them on the new replica from their tokens so far. Each
    # ingress keeps one subscription open, so the old replica never drains by itself, and until
    # it stops it holds its model actors' GPUs, which the new replica's actors are waiting for.
    scheduler_graceful_shutdown_s: float = 5.0

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> AppArgs:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown fluidserve app args: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        out = cls(**args)
        if out.policy not in POLICY_NAMES:
            raise ValueError(f"unknown policy {out.policy!r}; choose one of: {', '.join(POLICY_NAMES)}")
        if out.num_model_actors < 1:
            raise ValueError("num_model_actors must be at least 1")
        for name in ("stream_interval_s", "scheduler_graceful_shutdown_s", "metrics_refresh_s"):
            if not getattr(out, name) >= 0:  # `not >=`: NaN fails too
                raise ValueError(f"{name} must be >= 0, got {getattr(out, name)}")
        if out.dispatch_depth < 1:
            raise ValueError(f"dispatch_depth must be at least 1, got {out.dispatch_depth}")
        if not out.max_queue_wait_s >= 0:
            raise ValueError(f"max_queue_wait_s must be >= 0 (0: no bound), got {out.max_queue_wait_s}")
        if out.max_queued_tokens < 0:
            raise ValueError(f"max_queued_tokens must be >= 0 (0: no bound), got {out.max_queued_tokens}")
        if is_sim_model(out.model):
            sim_cost(out.model)  # an unknown preset or a missing cost file fails here, clearly
            output_length_sample(out.sim_output_lengths)
        return out

    def engine_args(self) -> EngineArgs:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(EngineArgs)}
        values["model_name"] = self.model_name or served_model_name(self.model)
        return EngineArgs(**values)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The Serve application; `args` are the config's `args:` (see AppArgs)."""
    a = AppArgs.from_dict(dict(args or {}))
    secrets = _forwarded_secrets(a)
    scheduler = serve.deployment(
        SchedulerActor,
        name="Scheduler",
        num_replicas=1,
        max_ongoing_requests=SCHEDULER_MAX_ONGOING,
        ray_actor_options={"num_cpus": a.scheduler_num_cpus},
        health_check_period_s=5,
        graceful_shutdown_timeout_s=a.scheduler_graceful_shutdown_s,
    ).bind(a.engine_args())
    ingress = serve.deployment(
        Ingress,
        name="Ingress",
        num_replicas=a.ingress_replicas,
        max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": a.ingress_num_cpus,
                           **({"runtime_env": {"env_vars": secrets}} if secrets else {})},
    ).bind(scheduler, a.model, a.model_name or served_model_name(a.model), a.api_key_env,
           a.metrics_api_key_env, a.max_body_bytes)
    return ingress


def _forwarded_secrets(a: AppArgs) -> dict[str, str]:
    """The API-key variables named by the config, copied from the environment of the process
    that builds the app (a K8s secret on the head pod, or the shell running `serve run`) to the
    Ingress replicas, which may run on nodes without them. The config names variables only:
    secret values never appear in it. Unset variables are not forwarded (the replica's own
    environment then decides)."""
    names = [n for n in (a.api_key_env, a.metrics_api_key_env) if n]
    return {n: os.environ[n] for n in names if os.environ.get(n)}
