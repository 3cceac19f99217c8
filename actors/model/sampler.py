"""Pick the next token of every sampled row at once: greedy, temperature, top-k, top-p, seeds,
log-probabilities (of the sampled token and the top-N alternatives, OpenAI's `top_logprobs`).

The rows' parameters become per-row arrays; the whole batch is sampled by one call:
  - CPU: the C kernel (cpu_kernels.sample, csrc/sample.c), rows in parallel, each row's passes
    over the vocabulary staying in cache. torch's sort over a 49k vocabulary costs ~200 ms at
    batch 64 on CPU, so the top-p nucleus is found by rejection instead (see sample.c).
  - other devices (and CPU without a compiler): `sample_torch`, the same rules as whole-batch
    tensor ops (one sort when some row cuts with top-k/top-p), with one host-to-device copy of
    the parameters and one device-to-host copy of everything the results need.
Both draw from the same distribution, not the same token (the CPU kernel's rejection draws and
the sort-based inverse CDF use the uniforms differently).

Rules (vLLM's): temperature < 1e-5 (or top_k == 1) is greedy, the first argmax; top-k keeps
logits >= the k-th largest, then top-p keeps the smallest most-likely set whose mass reaches
top_p. Randomness is stateless: a row with a seed draws from a splitmix64 stream started at
(seed, position), so its text does not depend on what else shares the batch, on re-runs or on
a re-prefill after eviction; rows without one get a fresh 64-bit start from the sampler's RNG.
A row whose logits hold NaN (or nothing finite), or whose parameters are NaN / negative, gets
token -1 and finish_reason "error"; the other rows of the batch are sampled normally.
Log-probabilities are of the model's raw distribution (log_softmax of the logits), >= -9999.
Stopping on EOS / stop tokens is reported per token; max_tokens is the scheduler's business.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from actors.model import cpu_kernels
from scheduler.plan import TokenResult
from scheduler.request import SamplingParams

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) pairs apart
_MASK64 = (1 << 64) - 1
GREEDY_BELOW = 1e-5
MAX_TOP_LOGPROBS = 20
MIN_LOGPROB = -9999.0
STATUS_ERRORS = {1: "logits are NaN or have no finite value", 2: "invalid sampling parameters"}


@dataclass
class SampleRow:
    request_id: str
    sampling: SamplingParams
    position: int  # position of the token being sampled (seeds its draw)


def generator_seed(seed: int, position: int) -> int:
    return (seed * _SEED_MIX + position) % (2**63 - 1)


def splitmix64(state: int) -> tuple[int, int]:
    """(next 64-bit value, next state): the stream csrc/sample.c draws its uniforms from."""
    state = (state + _SEED_MIX) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31), state


def first_uniform(state: int) -> float:
    """The first uniform in [0, 1) of a row's stream (53 bits, as sample.c)."""
    return (splitmix64(state)[0] >> 11) * 2.0**-53


@dataclass
class BatchParams:
    """Per-row parameters as host tensors (one element per row)."""
    temperature: torch.Tensor  # fp32
    top_p: torch.Tensor  # fp32
    top_k: torch.Tensor  # int64, 0 = no cut
    seeds: torch.Tensor  # int64: the row's 64-bit stream state (two's complement)
    num_logprobs: torch.Tensor  # int64: -1 none, else the sampled token's + that many top ones
    max_top: int  # the largest num_logprobs
    any_random: bool
    any_cut: bool  # some random row with top-k or top-p
    any_logprobs: bool


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], seed: int | None = None) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)
        self._rng = random.Random(seed)  # streams of rows without a seed

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> list[TokenResult]:
        """`logits` `[len(rows), vocab]` -> one TokenResult per row, same order."""
        if not rows:
            return []
        p = self.params(rows)
        if logits.device.type == "cpu" and cpu_kernels.sample_available():
            out = cpu_kernels.sample(logits.float(), p.temperature, p.top_p, p.top_k, p.seeds,
                                     p.num_logprobs, p.max_top)
            tokens, lps, status = out.tokens.tolist(), out.logprobs.tolist(), out.status.tolist()
            top_ids, top_lps = out.top_ids.tolist(), out.top_logprobs.tolist()
        else:
            packed = sample_torch(logits, p).tolist()  # the step's one device-to-host copy
            tokens = [int(r[0]) for r in packed]
            lps, status = [r[1] for r in packed], [int(r[2]) for r in packed]
            top_ids = [[int(i) for i in r[3 : 3 + p.max_top]] for r in packed]
            top_lps = [r[3 + p.max_top :] for r in packed]
        return [self._result(row, tokens[r], lps[r], status[r], top_ids[r], top_lps[r])
                for r, row in enumerate(rows)]

    def params(self, rows: list[SampleRow]) -> BatchParams:
        temps, top_ps, top_ks, seeds, nlps = [], [], [], [], []
        for row in rows:
            s = row.sampling
            temps.append(s.temperature)
            top_ps.append(s.top_p)
            top_ks.append(s.top_k)
            state = (generator_seed(s.seed, row.position) if s.seed is not None
                     else self._rng.getrandbits(64))
            seeds.append(state - (1 << 64) if state >= 1 << 63 else state)
            nlps.append(min(max(s.top_logprobs, 0), MAX_TOP_LOGPROBS) if s.logprobs else -1)
        temperature = torch.tensor(temps, dtype=torch.float32)
        top_p, top_k = torch.tensor(top_ps, dtype=torch.float32), torch.tensor(top_ks)
        random_rows = (temperature >= GREEDY_BELOW) & (top_k != 1)
        return BatchParams(
            temperature, top_p, top_k, torch.tensor(seeds, dtype=torch.int64),
            torch.tensor(nlps, dtype=torch.int64), max(max(nlps), 0),
            any_random=bool(random_rows.any()),
            any_cut=bool((random_rows & ((top_k > 0) | (top_p < 1.0))).any()),
            any_logprobs=max(nlps) >= 0)

    def _result(self, row: SampleRow, token: int, logprob: float, status: int,
                top_ids: list[int], top_lps: list[float]) -> TokenResult:
        s = row.sampling
        if status != 0:  # this row only: the rest of the batch is unaffected
            return TokenResult(row.request_id, -1, "error")
        stop = token in s.stop_token_ids or (not s.ignore_eos and token in self.eos_token_ids)
        n = min(max(s.top_logprobs, 0), MAX_TOP_LOGPROBS) if s.logprobs else 0
        return TokenResult(row.request_id, token, "stop" if stop else None,
                           logprob if s.logprobs else None,
                           list(zip(top_ids[:n], top_lps[:n])) if n > 0 else None)


def sample_torch(logits: torch.Tensor, p: BatchParams) -> torch.Tensor:
    """Whole-batch sampling in torch ops on the logits' device. Returns a host float64 tensor
    `[B, 3 + 2 * max_top]`: token, logprob, status, top ids, top logprobs."""
    dev = logits.device
    uniforms = [min(first_uniform(s & _MASK64), 1.0 - 2.0**-24) for s in p.seeds.tolist()]
    host = torch.stack([p.temperature.double(), p.top_p.double(), p.top_k.double(),
                        torch.tensor(uniforms, dtype=torch.float64), p.num_logprobs.double()], 1)
    temp, top_p, top_k, u, _ = host.to(dev, non_blocking=True).float().unbind(1)
    logits = logits.float()
    v = logits.shape[1]
    bad_logits = torch.isnan(logits).any(1) | (logits.amax(1) == float("-inf"))
    status = torch.where(bad_logits, 1, torch.where(temp.isnan() | (temp < 0) | top_p.isnan(), 2, 0))
    ok = status == 0
    lg = torch.where(ok[:, None], logits, 0.0)  # sanitized: a bad row cannot poison the others
    m = lg.amax(1, keepdim=True)
    tokens = lg.argmax(1)
    k = torch.where((top_k <= 0) | (top_k > v), v, top_k).long()
    greedy = (temp < GREEDY_BELOW) | (k == 1) | (m[:, 0] == float("inf"))
    if p.any_random:
        t = torch.where(greedy, 1.0, temp).clamp(max=1e30)
        probs = torch.exp((lg - m) / t[:, None])  # unnormalized, <= 1
        if p.any_cut:
            probs, order = probs.sort(1, descending=True)
            probs = torch.where(torch.arange(v, device=dev)[None] < k[:, None], probs, 0.0)
            cum = probs.cumsum(1)
            keep = cum - probs < top_p.clamp(max=1.0)[:, None] * cum[:, -1:]
            keep[:, 0] = True
            probs = torch.where(keep, probs, 0.0)
        cum = probs.cumsum(1)
        drawn = torch.searchsorted(cum, u[:, None] * cum[:, -1:], right=True).clamp(max=v - 1)
        drawn = order.gather(1, drawn) if p.any_cut else drawn
        tokens = torch.where(greedy, tokens, drawn[:, 0])
    tokens = torch.where(ok, tokens, -1)
    cols = [tokens.double(), torch.zeros_like(temp, dtype=torch.float64), status.double()]
    if p.any_logprobs:
        lsm = torch.log_softmax(lg, 1).clamp(min=MIN_LOGPROB)
        cols[1] = lsm.gather(1, tokens.clamp(min=0)[:, None])[:, 0].double()
        if p.max_top:
            top_v, top_i = lsm.topk(p.max_top, 1)
            return torch.cat([torch.stack(cols, 1), top_i.double(), top_v.double()], 1).cpu()
    return torch.stack(cols, 1).cpu()
