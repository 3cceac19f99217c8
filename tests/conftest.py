"""Shared fixtures: one local Ray cluster per test session, and the real Serve app on it.

Starting Ray and loading a model take many seconds on 2 cores, so every Serve test shares one
cluster; `serve_app(**args)` redeploys only when a test asks for different app args.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Idle OpenMP threads spin; on 2 cores that starves the Ray actors these tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The model actors' test-only fault hook (a prompt starting with actors.model_actor.FAULT_PROMPT
# makes its forward passes raise): reliability tests inject model errors through it.
os.environ["FLUIDSERVE_FAULT_INJECTION"] = "1"

# The app most Serve tests use: the real default model, two CPU model actors.
DEFAULT_TEST_APP: dict[str, Any] = {
    "model": "default",
    "num_model_actors": 2,
    "model_actor_resources": {"num_cpus": 1, "num_gpus": 0},
    "kv_cache_tokens": 8192,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM a server a test started; SIGKILL it if it has not exited within timeout_s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


def stop_ray_processes(temp: Path) -> None:
    """Stop the Ray processes started with `temp` as their temp dir, and everything they
    spawned. (`ray stop` has no --address: it would stop the session's shared cluster and the
    other engineers' too.)"""
    import psutil

    roots = [p for p in psutil.process_iter(["cmdline"]) if str(temp) in " ".join(p.info["cmdline"] or ())]
    procs = {}
    for root in roots:
        try:
            for p in (root, *root.children(recursive=True)):
                procs[p.pid] = p
        except psutil.NoSuchProcess:
            continue
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs.values(), timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@dataclass
class ServeApp:
    url: str  # http://127.0.0.1:<port>
    args: dict[str, Any]

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def handle(self):
        from ray import serve

        return serve.get_app_handle("fluidserve")

    def scheduler(self):
        from ray import serve

        return serve.get_deployment_handle("Scheduler", app_name="fluidserve")

    def debug_state(self) -> dict:
        return self.scheduler().debug_state.remote().result()

    def wait_idle(self, timeout_s: float = 60.0) -> dict:
        """Wait until no request holds KV or is queued (earlier tests may still be finishing)."""
        deadline = time.monotonic() + timeout_s
        state = self.debug_state()
        while time.monotonic() < deadline and (sum(state["used_blocks"]) or state["requests"]):
            time.sleep(0.2)
            state = self.debug_state()
        return state


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray with Serve on a free port. Logical CPUs exceed the 2 real cores on purpose:
    the light deployments need fractions and two model actors take one logical CPU each."""
    ray = pytest.importorskip("ray")
    from ray import serve

    # address="local": always a new cluster of our own, never one a `ray start` left running
    # (ray.init() with no address would join it through /tmp/ray/ray_current_cluster).
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             namespace="serve",
             runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "FLUIDSERVE_FAULT_INJECTION": "1"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


_current: dict[str, Any] = {}


@pytest.fixture(scope="session")
def deploy_app(ray_cluster):
    """deploy_app(**overrides) -> ServeApp; redeploys only when the args change."""
    from ray import serve

    from deploy.app import APP_NAME, build_app
    from deploy.local import wait_ready

    url = f"http://127.0.0.1:{ray_cluster}"

    def deploy(**overrides: Any) -> ServeApp:
        args = {**DEFAULT_TEST_APP, **overrides}
        if _current.get("args") != args:
            serve.run(build_app(args), name=APP_NAME, route_prefix="/")
            wait_ready(url, timeout_s=600)
            _current["args"] = args
        return ServeApp(url, args)

    return deploy


@pytest.fixture
def app(deploy_app) -> ServeApp:
    """The default test app (real default model, two model actors)."""
    return deploy_app()
