"""How long one huge prompt stalls the ingress's event loop (every other request's stream waits
that long), before and after preparation moved off the loop; side by side in one process.

"before" tokenizes (and templates) on the event loop, as the ingress used to; "after" is
deploy.prepare.PromptBuilder: a length bound that rejects what cannot fit the context without
tokenizing it, and a thread pool for the rest. A heartbeat task ticks every 1 ms; the table shows
its longest gap while one prompt is prepared, and the ratio before / after.

    python -m bench.ingress_stall [--out bench/results/ingress_stall.json]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from deploy.prepare import ModelLimits, PromptBuilder
from deploy.protocol import APIError, ChatRequest, CompletionRequest, parse
from deploy.tokenizer import load_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
LIMITS = ModelLimits(max_model_len=8192, vocab_size=49152)  # the default model's
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "数据", "and",
         "émigrés", "watch", "🙂"]


def text_of(chars: int) -> str:
    out, n, i = [], 0, 0
    while n < chars:
        w = WORDS[i % len(WORDS)] + " "
        out.append(w)
        n, i = n + len(w), i + 1
    return "".join(out)[:chars]


async def longest_gap(work) -> tuple[float, float]:
    """(longest heartbeat gap, wall time of `work`) in seconds."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def heartbeat() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.02)
    start = time.perf_counter()
    with contextlib.suppress(APIError):  # a rejection is an outcome here, not a failure
        await work()
    wall = time.perf_counter() - start
    done.set()
    await beat
    return max(gaps), wall


def cases(tokenizer: Any) -> dict[str, tuple[Any, Any]]:
    builder = PromptBuilder(tokenizer)

    def completion(chars: int):
        req = parse(CompletionRequest, {"prompt": text_of(chars)})

        async def before() -> None:
            tokenizer(req.prompt)["input_ids"]

        return before, lambda: builder.completion(req, LIMITS)

    def chat(chars: int):
        req = parse(ChatRequest, {"messages": [{"role": "user", "content": text_of(chars)}]})

        async def before() -> None:
            text = tokenizer.apply_chat_template([{"role": "user", "content": req.messages[0].text()}],
                                                 add_generation_prompt=True, tokenize=False)
            tokenizer(text, add_special_tokens=False)["input_ids"]

        return before, lambda: builder.chat(req, LIMITS)

    return {"completion, 4 MiB text": completion(4 * 1024 * 1024),
            "completion, 600k chars (under the bound)": completion(600_000),
            "chat, 600k chars": chat(600_000),
            "completion, 2k chars (typical)": completion(2_000)}


async def run(tokenizer: Any) -> list[dict]:
    rows = []
    for name, (before, after) in cases(tokenizer).items():
        gap_b, wall_b = await longest_gap(before)
        gap_a, wall_a = await longest_gap(after)
        rows.append({"case": name, "before_stall_ms": gap_b * 1e3, "after_stall_ms": gap_a * 1e3,
                     "stall_ratio": gap_b / gap_a, "before_wall_ms": wall_b * 1e3, "after_wall_ms": wall_a * 1e3})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS / "ingress_stall.json"))
    args = ap.parse_args()
    tokenizer = load_tokenizer("default")
    tokenizer("warm up")
    rows = asyncio.run(run(tokenizer))
    print(f"{'case':44} {'stall before':>13} {'stall after':>12} {'ratio':>7} {'wall before':>12} {'wall after':>11}")
    for r in rows:
        print(f"{r['case']:44} {r['before_stall_ms']:10.1f} ms {r['after_stall_ms']:9.1f} ms "
              f"{r['stall_ratio']:6.1f}x {r['before_wall_ms']:9.1f} ms {r['after_wall_ms']:8.1f} ms")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "limits": LIMITS.__dict__}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
