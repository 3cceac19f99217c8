"""`make demo`: the main job end to end on this machine.

A local Ray, the Serve app with the embedded default model on CPU, one chat answer through the
real `openai` client and one through a Python Serve handle, a few serving figures, clean stop.
"""
from __future__ import annotations

import sys
import time

from prometheus_client.parser import text_string_to_metric_families

from deploy.local import LOCAL_CONFIG, app_args, load_config, start, stop

QUESTION = "In one sentence, what does a KV cache store in a transformer?"


def main() -> int:
    t0 = time.perf_counter()
    args = app_args(load_config(LOCAL_CONFIG))
    print("[1/4] starting local Ray + Serve with the default model (first run converts the GGUF) ...",
          flush=True)
    url = start(args, port=8000)
    print(f"      serving at {url} after {time.perf_counter() - t0:.0f} s", flush=True)
    try:
        _ask_openai(url)
        _ask_handle()
        _show_metrics(url)
    finally:
        print("[4/4] shutting down Serve and Ray", flush=True)
        stop()
    return 0


def _ask_openai(url: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed")
    model = client.models.list().data[0].id
    print(f"[2/4] openai client -> {model}: {QUESTION}", flush=True)
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=48,
        temperature=0, stream=True,
    )
    print("      ", end="", flush=True)
    first = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            print(chunk.choices[0].delta.content, end="", flush=True)
    print(f"\n      (first token after {(first or start) - start:.2f} s)", flush=True)


def _ask_handle() -> None:
    from ray import serve

    handle = serve.get_app_handle("fluidserve")
    print("[3/4] Python Serve handle -> chat(...)", flush=True)
    reply = handle.chat.remote({
        "messages": [{"role": "user", "content": "Name three prime numbers."}],
        "max_tokens": 32, "temperature": 0,
    }).result()
    print(f"      {reply['choices'][0]['message']['content']!r}  usage={reply['usage']}", flush=True)


def _show_metrics(url: str) -> None:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
               if not s.labels.get("le")}
    ttft_sum = samples.get("fluidserve:time_to_first_token_seconds_sum", 0.0)
    ttft_n = samples.get("fluidserve:time_to_first_token_seconds_count", 0.0) or 1
    tokens = samples.get("fluidserve:generation_tokens_total", 0.0)
    busy = samples.get("fluidserve:iteration_duration_seconds_sum", 0.0) or 1e-9
    print(f"      metrics: {int(samples.get('fluidserve:request_success_total', 0) or ttft_n)} requests, "
          f"mean TTFT {ttft_sum / ttft_n:.3f} s, {tokens:.0f} tokens generated, "
          f"{tokens / busy:.1f} tok/s while busy", flush=True)


if __name__ == "__main__":
    sys.exit(main())
