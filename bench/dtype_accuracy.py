"""How far the CPU engine's dtypes move the default model's logits from transformers' fp32.

    python -m bench.dtype_accuracy [--tokens 120] [--json]

Four texts, each extended by `--tokens` greedy tokens of transformers in fp32, then scored
teacher-forced in one prefill: fluidserve fp32, fluidserve bf16 (bf16 weights and KV, fp32
activations) and, for scale, transformers itself in bf16. Per variant: the largest logit error
relative to the largest logit, the fraction of positions whose argmax agrees with fp32
transformers, and the mean KL(fp32 transformers || variant).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/engine.py

import argparse
import json
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from actors.model.attention import make_backend
from actors.model.batch import build_batch
from actors.model.llama import LlamaModel
from actors.model.loader import load_model
from kv.cache import KVCache, KVShape
from scheduler.plan import Plan, ScheduledChunk

TEXTS = [
    "The history of the Roman Empire spans more than a thousand years, beginning with",
    "def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n    pivot = arr[len(arr) // 2]\n",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to",
    ("Once upon a time, in a small village at the edge of a great forest, there lived an old "
     "woodcutter who"),
]
BS = 16
Scorer = Callable[[list[int]], torch.Tensor]


def fluidserve_scorer(dtype: str) -> Scorer:
    """Logits at every position of a sequence, from one prefill through our engine."""
    loaded, _ = load_model("default", "cpu", dtype)
    model, c = LlamaModel(loaded), loaded.config
    cache = KVCache(KVShape(c.num_layers, c.num_kv_heads, c.head_dim), 64, BS, loaded.device,
                    loaded.dtype)
    backend = make_backend("sdpa", loaded.device, BS)

    def score(tokens: list[int]) -> torch.Tensor:
        n = len(tokens)
        slots = list(range(n))  # blocks 0, 1, ... in order
        chunk = ScheduledChunk("a", tokens, 0, n, list(range(-(-n // BS))), slots, True)
        batch = build_batch(Plan(0, 0, [chunk], BS), loaded.device)
        batch.sample_rows = torch.arange(n)
        return model.forward(batch, cache, backend, backend.prepare(batch, cache))

    return score


def transformers_scorer(dtype: torch.dtype) -> Scorer:
    from transformers import LlamaForCausalLM

    loaded, _ = load_model("default", "cpu", "float32")
    hf = LlamaForCausalLM(loaded.hf_config).eval()  # the same weights as ours
    hf.load_state_dict(loaded.weights, strict=False)
    hf = hf.to(dtype)
    return lambda tokens: hf(torch.tensor([tokens])).logits[0].float()


@torch.inference_mode()
def measure(extra_tokens: int) -> dict[str, dict[str, float]]:
    _, tokenizer = load_model("default", "cpu", "float32")
    reference = transformers_scorer(torch.float32)
    variants = {"fluidserve float32": fluidserve_scorer("float32"),
                "fluidserve bfloat16": fluidserve_scorer("bfloat16"),
                "transformers bfloat16": transformers_scorer(torch.bfloat16)}
    rows: dict[str, list[tuple[float, float, float, int]]] = {name: [] for name in variants}
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        for _ in range(extra_tokens):
            ids.append(int(reference(ids)[-1].argmax()))
        ref = reference(ids)
        for name, score in variants.items():
            logits = score(ids)
            kl = F.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(ref, -1),
                          log_target=True, reduction="batchmean")
            rows[name].append((float((logits - ref).abs().max() / ref.abs().max()),
                               float((logits.argmax(-1) == ref.argmax(-1)).float().sum()),
                               float(kl), len(ids)))
    return {name: {"max_rel_err": max(r[0] for r in rs),
                   "top1_agreement": sum(r[1] for r in rs) / sum(r[3] for r in rs),
                   "mean_kl": sum(r[2] for r in rs) / len(rs), "positions": sum(r[3] for r in rs)}
            for name, rs in rows.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dtype_accuracy",
                                description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=120)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    result = measure(args.tokens)
    print(f"{'against transformers fp32':<24}{'max rel err':>12}{'top-1 agree':>13}{'mean KL':>11}")
    for name, r in result.items():
        print(f"{name:<24}{r['max_rel_err']:>12.2e}{r['top1_agreement']:>13.4f}{r['mean_kl']:>11.2e}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
