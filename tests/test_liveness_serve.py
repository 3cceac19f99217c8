"""Liveness through the real Serve app: a model actor killed for good has its streams finish on
the other one; two fluidserve apps on one cluster never touch each other's model actors."""
from __future__ import annotations

import httpx
import pytest
from test_reliability import check_streams, post, start_streams

pytestmark = [pytest.mark.serve, pytest.mark.slow]

# Two actors; one not back 3 s after a crash counts as down for now (the default is 30 s).
KILL_APP = {"num_model_actors": 2, "kv_cache_tokens": 8192, "actor_restart_wait_s": 3.0}


def test_model_actor_killed_for_good_its_streams_finish_on_the_other(deploy_app):
    import ray

    from actors.naming import RAY_NAMESPACE

    app = deploy_app(**KILL_APP)
    app.wait_idle()
    prompts = ["Once upon a time", "def fibonacci(n):", "The three primary colors are", "Dear diary,"]
    bodies = [{"prompt": p, "max_tokens": 40, "temperature": 0, "ignore_eos": True} for p in prompts]
    expected = [post(app, "/completions", b).json()["choices"][0]["text"] for b in bodies]
    outs, threads = start_streams(app, bodies)
    victim = app.debug_state()["actor_names"][0]
    ray.kill(ray.get_actor(victim, namespace=RAY_NAMESPACE), no_restart=True)
    check_streams(outs, threads, expected, 40)
    state = app.wait_idle()
    assert state["healthy"] == [False, True]
    # New requests are routed to the healthy actor only, and are served.
    ok = post(app, "/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert ok.status_code == 200, ok.text
    health = httpx.get(f"{app.url}/health", timeout=30)
    assert health.status_code == 200  # one actor down: degraded, still serving


def test_two_apps_side_by_side_never_touch_each_others_actors(app):
    from ray import serve

    from deploy.app import build_app
    from deploy.local import wait_ready

    names = app.debug_state()["actor_names"]
    other_args = {"model": "random:tiny", "num_model_actors": 1, "kv_cache_tokens": 1024}
    serve.run(build_app(other_args), name="fluidserve-other", route_prefix="/other")
    try:
        wait_ready(f"{app.url}/other", timeout_s=600)
        other = serve.get_deployment_handle("Scheduler", app_name="fluidserve-other")
        other_names = other.debug_state.remote().result()["actor_names"]
        assert not set(names) & set(other_names) and all("fluidserve-other" in n for n in other_names)
        resp = httpx.post(f"{app.url}/other/v1/completions", timeout=120,
                          json={"prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True})
        assert resp.status_code == 200, resp.text
        assert app.debug_state()["actor_names"] == names  # the first app's actors untouched
    finally:
        serve.delete("fluidserve-other")
    # Deleting the second app ended its actors only: the first app still serves, same actors.
    ok = post(app, "/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert ok.status_code == 200, ok.text
    assert app.debug_state()["actor_names"] == names


def test_scheduler_redeploy_moves_streams_to_the_new_replica(deploy_app):
    """A config change that touches only the scheduler (here its stream interval) replaces the
    scheduler replica while streams run. Each ingress keeps its subscription open, so the old
    replica never drains by itself: after `scheduler_graceful_shutdown_s` Serve stops it, and the
    streams resume on the new replica (whose model actors could only start once the old ones,
    holding this cluster's CPUs as they would hold GPUs, were gone), with the same text."""
    app = deploy_app(**KILL_APP)
    app.wait_idle()
    old_actors = app.debug_state()["actor_names"]
    prompts = ["Once upon a time", "The three primary colors are"]
    bodies = [{"prompt": p, "max_tokens": 120, "temperature": 0, "ignore_eos": True} for p in prompts]
    expected = [post(app, "/completions", b).json()["choices"][0]["text"] for b in bodies]
    outs, threads = start_streams(app, bodies)
    new = deploy_app(**KILL_APP, stream_interval_s=0.04, scheduler_graceful_shutdown_s=2.0)
    check_streams(outs, threads, expected, 120)
    assert not set(new.debug_state()["actor_names"]) & set(old_actors)  # a new scheduler served them
