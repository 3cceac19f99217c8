"""SimModelActor: a model actor whose forward pass is a cost model (`model: sim:<preset|cost.json>`).

The capacity-planning twin of a real deployment: the same Serve app, scheduler, plans and HTTP
path, with only the forward pass simulated. Each plan is checked and applied exactly as a real
model actor does (`actors.request_state.RequestStates`), then the step takes the cost model's
time for it, `d0 + d_tok * new tokens + d_kv * attended KV`, waiting on a deadline (sleeping, not
burning CPU), and returns tokens: ids of the default model's vocabulary, deterministic per
request and position. A request ends by `max_tokens`, or, with `output_lengths` (a trace CSV, or
"lmsys" for the shipped sample), by an EOS at a length drawn from that distribution by its id.

numpy only: no torch, so sixteen of these start in seconds and cost a few MB each.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from actors.request_state import RequestStates
from scheduler.cost import CostModel, preset
from scheduler.plan import DiffPlan, StepResult, int_array

SIM_PREFIX = "sim:"
# The default model's (SmolLM2-135M) vocabulary, so the ingress's tokenizer reads the tokens.
VOCAB_SIZE = 49152
EOS_TOKEN_ID = 2
TOKEN_RANGE = (1000, 30000)  # ordinary tokens, clear of the special ones
DEFAULT_MAX_MODEL_LEN = 4096  # Llama-2's context


def is_sim_model(model: str) -> bool:
    return model.startswith(SIM_PREFIX)


def sim_cost(model: str) -> tuple[CostModel, int]:
    """(cost model, max_model_len) of `sim:<preset>` or `sim:<cost.json>` (a JSON may set
    `max_model_len`)."""
    spec = model.removeprefix(SIM_PREFIX)
    if spec.endswith(".json"):
        import json

        path = Path(spec).expanduser()
        cost = CostModel.load(path)
        return cost, int(json.loads(path.read_text()).get("max_model_len", DEFAULT_MAX_MODEL_LEN))
    return preset(spec), DEFAULT_MAX_MODEL_LEN


def output_length_sample(spec: str | None) -> np.ndarray | None:
    """Output lengths to draw EOS from: a trace CSV's, or the shipped LMSYS sample's."""
    if not spec:
        return None
    from scheduler.workload import DEFAULT_TRACE, read_trace

    path = DEFAULT_TRACE if spec == "lmsys" else Path(spec).expanduser()
    return np.array([row.output_len for row in read_trace(path)], dtype=np.int64)


class SimModelActor:
    def __init__(self, model: str = "sim:a100-llama2-7b", worker_id: int = 0,
                 output_lengths: str | None = None, sleep: bool = True, **_ignored: Any) -> None:
        self.model_name, self.worker_id = model, worker_id
        self.cost, self.max_model_len = sim_cost(model)
        self.num_blocks = self.cost.kv_capacity_tokens // self.cost.block_size
        self.states = RequestStates(self.num_blocks, self.cost.block_size, self.max_model_len, VOCAB_SIZE)
        self.lengths = output_length_sample(output_lengths)
        self.sleep = sleep  # False: return at once (tests), reporting the modelled time
        self.steps = 0
        self.last_step_time_s = 0.0

    def execute(self, plan: DiffPlan) -> StepResult:
        started_at = time.monotonic()
        rows = self.states.apply(plan, materialize=False)
        seconds = self.cost.iteration_time(rows.num_new_tokens, rows.num_attended_kv)
        took = rows.slots[rows.sample]
        positions = rows.context_lens[rows.sample]
        tokens = sim_tokens(self.states.seed[took], positions)
        stops = self._stops(rows, took, positions)
        tokens[stops] = EOS_TOKEN_ID
        if self.sleep:  # a deadline, not a busy loop: the box's cores stay free
            delay = started_at + seconds - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        self.states.advance(rows, tokens)
        self.steps += 1
        self.last_step_time_s = seconds
        return StepResult(plan.worker, plan.iteration, int_array(tokens.tolist()),
                          int_array(np.flatnonzero(stops).tolist()), seconds, None, plan.epoch,
                          started_at, time.monotonic())

    def _stops(self, rows, took: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """EOS where a request reaches its drawn output length (never with ignore_eos)."""
        if self.lengths is None or not len(took):
            return np.zeros(len(took), dtype=bool)
        drawn = self.lengths[(self.states.seed[took] % len(self.lengths)).astype(np.int64)]
        generated = positions - self.states.prompt_len[took] + 1  # this token included
        ignore = np.array([rows.sampling[i].ignore_eos for i in np.flatnonzero(rows.sample)], dtype=bool)
        return (generated >= drawn) & ~ignore

    # -- what the scheduler and the deploy layer ask --------------------------------------
    def capacity(self) -> dict[str, Any]:
        c = self.cost
        return {
            "num_blocks": self.num_blocks, "block_size": c.block_size,
            "kv_capacity_tokens": self.num_blocks * c.block_size,
            "max_model_len": self.max_model_len, "vocab_size": VOCAB_SIZE,
            "eos_token_ids": [EOS_TOKEN_ID], "model": self.model_name, "device": "sim",
            "dtype": "sim", "attention": "sim", "cost": {"d0": c.d0, "d_tok": c.d_tok, "d_kv": c.d_kv},
        }

    def health(self) -> dict[str, Any]:
        return {"ok": True, "worker_id": self.worker_id, "steps": self.steps,
                "last_step_time_s": self.last_step_time_s, "device": "sim", "num_threads": 0}

    def pid(self) -> int:
        return os.getpid()


def sim_tokens(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """A token per (request seed, position): splitmix64 of both, into TOKEN_RANGE."""
    with np.errstate(over="ignore"):
        x = seeds.astype(np.uint64) + positions.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    low, high = TOKEN_RANGE
    return (x % np.uint64(high - low)).astype(np.int64) + low
