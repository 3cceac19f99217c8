"""The Serve app on a 2-node Ray cluster, model actors on the second node; run by
tests/test_multinode.py in its own process (a pytest process holds one Ray connection: the
session's cluster). Prints one JSON object: where things ran, the streams, and how many objects
each node's object store created during the load.

    python tests/multinode_app.py GCS_ADDRESS HTTP_PORT DASHBOARD_URL
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["Once upon a time", "The three primary colors are", "def fibonacci(n):", "Dear diary,",
           "The capital of France is", "List three prime numbers:"]
MAX_TOKENS = 40
APP = {"model": "default", "num_model_actors": 1, "kv_cache_tokens": 4096,
       # num_cpus 0: the second node has no CPUs, so only what asks for model_node goes there.
       "model_actor_resources": {"num_cpus": 0, "num_gpus": 0, "model_node": 1},
       "stream_interval_s": 0.0}


def object_store_created() -> dict[str, int]:
    """Objects each node's object store has created so far (plasma; inline values excluded)."""
    import ray
    from ray._private.internal_api import node_stats

    out = {}
    for node in ray.nodes():
        if node["Alive"]:
            reply = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"], include_memory_info=False)
            out[node["NodeID"]] = int(reply.store_stats.cumulative_created_objects)
    return out


def stream(url: str, prompt: str, out: dict) -> None:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
    text, finish, usage = [], None, None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as resp:
        out["status"] = resp.status_code
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["error"] = chunk["error"]
                continue
            text.append(chunk["choices"][0]["text"])
            finish = chunk["choices"][0]["finish_reason"] or finish
            usage = chunk.get("usage") or usage
    out.update(text="".join(text), finish=finish, tokens=(usage or {}).get("completion_tokens"))


def main(gcs: str, port: int, dashboard: str) -> dict:
    import ray
    from ray import serve
    from ray.util.state import list_actors

    from deploy.app import APP_NAME, build_app
    from deploy.local import wait_ready

    ray.init(address=gcs, namespace="serve", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(APP), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, timeout_s=600)
    model_node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("model_node"))
    alive = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
    placed = {a.name: a.node_id for a in alive
              if a.name and (a.name.startswith("fluidserve-") or "Scheduler" in a.name)}
    # Sequential, one request at a time: the reference text of every prompt.
    reference = {}
    for prompt in PROMPTS:
        reply = httpx.post(f"{url}/v1/completions", timeout=300, json={
            "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}).json()
        reference[prompt] = reply["choices"][0]["text"]
    scheduler = serve.get_deployment_handle("Scheduler", app_name=APP_NAME)
    iterations_before = sum(scheduler.debug_state.remote().result()["iterations"])
    created_before = object_store_created()
    outs = [{} for _ in PROMPTS]
    threads = [threading.Thread(target=stream, args=(url, p, o)) for p, o in zip(PROMPTS * 1, outs)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    created_after = object_store_created()
    iterations = sum(scheduler.debug_state.remote().result()["iterations"]) - iterations_before
    return {
        "model_node": model_node, "placed": placed, "reference": reference,
        "streams": [{"prompt": p, **o} for p, o in zip(PROMPTS, outs)],
        "iterations": iterations, "seconds": time.monotonic() - started,
        "objects_created": {n: created_after.get(n, 0) - created_before.get(n, 0) for n in created_after},
    }


if __name__ == "__main__":
    result = main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    print(json.dumps(result))
