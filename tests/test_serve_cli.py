"""`serve run` and `serve deploy` bring the app up from deploy/configs/local.yaml, as users do.

A separate Ray head (its own ports) so the session's shared cluster is untouched; the config is
the shipped one with only the port and the model (random:tiny, for speed) changed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from deploy.local import wait_ready
from tests.conftest import free_port, stop_process, stop_ray_processes

pytestmark = [pytest.mark.serve, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _config(tmp_path: Path, port: int) -> Path:
    config = yaml.safe_load((ROOT / "deploy" / "configs" / "local.yaml").read_text())
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args.update(model="random:tiny", kv_cache_tokens=2048,
                model_actor_resources={"num_cpus": 0.5, "num_gpus": 0})
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _complete(url: str) -> str:
    resp = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head` on free ports; yields (gcs address, dashboard URL)."""
    gcs, dash = free_port(), free_port()
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
    temp = tmp_path_factory.mktemp("ray")
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=2",
                    f"--dashboard-port={dash}", "--include-dashboard=true", "--disable-usage-stats",
                    f"--temp-dir={temp}"], check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
    finally:
        stop_ray_processes(temp)


def test_serve_deploy_then_serve_run(ray_head, tmp_path):
    gcs, dashboard = ray_head
    env = {**os.environ, "RAY_ADDRESS": gcs, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    port = free_port()
    config = _config(tmp_path, port)
    url = f"http://127.0.0.1:{port}"

    deploy = subprocess.run([str(BIN / "serve"), "deploy", str(config), f"--address={dashboard}"],
                            env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    wait_ready(url, timeout_s=300)
    assert _complete(url)
    subprocess.run([str(BIN / "serve"), "shutdown", "-y", f"--address={dashboard}"], env=env,
                   capture_output=True, timeout=300, cwd=ROOT)

    port = free_port()
    config = _config(tmp_path, port)
    url = f"http://127.0.0.1:{port}"
    run = subprocess.Popen([str(BIN / "serve"), "run", str(config), f"--address={gcs}"], env=env,
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, timeout_s=300, alive=lambda: run.poll() is None)
        assert _complete(url)
    finally:
        stop_process(run, timeout_s=60)
