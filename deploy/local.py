"""`fluidserve serve`: a local Ray, the Serve app from a config, Ctrl-C to stop cleanly."""
from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

LOCAL_CONFIG = Path(__file__).resolve().parent / "configs" / "local.yaml"


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """The serve config (deploy/configs/local.yaml by default) as a dict."""
    path = Path(path) if path else LOCAL_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"serve config not found: {path}")
    return yaml.safe_load(path.read_text())


def app_args(config: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The fluidserve application's args from a serve config, with non-None overrides."""
    apps = [a for a in config.get("applications", []) if a.get("name") == "fluidserve"]
    if not apps:
        raise ValueError("the serve config has no application named 'fluidserve'")
    args = dict(apps[0].get("args") or {})
    args.update({k: v for k, v in overrides.items() if v is not None})
    return args


def start(args: dict[str, Any], port: int = 8000, num_cpus: int | None = None) -> str:
    """Start (or join) a local Ray, deploy the app, wait until it serves; returns the base URL."""
    import ray
    from ray import serve

    from deploy.app import APP_NAME, build_app

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    return url


def wait_ready(url: str, timeout_s: float = 600.0, alive: Callable[[], bool] | None = None) -> None:
    """Block until /health says ready (the model actors have loaded); `alive` returning False
    (e.g. the serving process exited) stops the wait early."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"{url}: the serving process exited before it became ready")
        try:
            if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become ready within {timeout_s:.0f} s")


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_forever(port: int = 8000, config: str | None = None, model: str | None = None,
                  policy: str | None = None) -> int:
    args = app_args(load_config(config), model=model, policy=policy)
    print(f"starting fluidserve: model {args.get('model', 'default')}, policy {args.get('policy', 'nested-wait')} ...",
          flush=True)
    url = start(args, port=port)
    print(f"""
fluidserve is serving at {url}  (OpenAI API under {url}/v1, metrics at {url}/metrics)

  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 32}}'

  python -c "import openai; c = openai.OpenAI(base_url='{url}/v1', api_key='-'); \\
print(c.chat.completions.create(model='{args.get('model_name') or _served(args)}', \\
messages=[{{'role': 'user', 'content': 'Hello!'}}], max_tokens=32).choices[0].message.content)"

Ctrl-C stops Serve and Ray.""", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        while not stopped.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    print("\nshutting down ...", flush=True)
    stop()
    return 0


def _served(args: dict[str, Any]) -> str:
    from deploy.tokenizer import served_model_name

    return served_model_name(args.get("model", "default"))


if __name__ == "__main__":
    sys.exit(serve_forever())
