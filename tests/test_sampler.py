"""The batched sampler: rules, distributions, seeds independent of the batch, bad rows, logprobs.

Every behaviour is checked on both paths: the CPU C kernel and the torch path other devices use
(`sample_torch`, run here on CPU tensors).
"""
from __future__ import annotations

import math

import pytest
import torch

from actors.model import cpu_kernels
from actors.model.sampler import (
    MAX_TOP_LOGPROBS,
    MIN_LOGPROB,
    Sampler,
    SampleRow,
    first_uniform,
    generator_seed,
    splitmix64,
)
from scheduler.request import SamplingParams as SP


class TorchSampler(Sampler):
    """The same sampler forced onto its torch path."""

    def __call__(self, logits, rows):
        real = cpu_kernels.sample_available
        cpu_kernels.sample_available = lambda: False
        try:
            return super().__call__(logits, rows)
        finally:
            cpu_kernels.sample_available = real


PATHS = [pytest.param(Sampler, id="c-kernel"), pytest.param(TorchSampler, id="torch")]


@pytest.fixture(autouse=True)
def need_kernel(request):
    if "c-kernel" in request.node.name and not cpu_kernels.sample_available():
        pytest.skip("the C sampling kernel did not build here (no C compiler?)")


def logits_of(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def nucleus(logits: torch.Tensor, s: SP) -> torch.Tensor:
    """The exact distribution a row must be drawn from (sort-based reference, float64)."""
    p = torch.softmax(logits.double() / s.temperature, -1)
    order = p.argsort(descending=True)
    sp = p[order]
    if s.top_k:
        sp[s.top_k:] = 0
    sp = sp / sp.sum()
    keep = sp.cumsum(0) - sp < s.top_p
    keep[0] = True
    sp = torch.where(keep, sp, 0.0)
    out = torch.zeros_like(p)
    out[order] = sp / sp.sum()
    return out


def draws(sampler: Sampler, logits: torch.Tensor, s: SP, n: int) -> torch.Tensor:
    """n tokens from the same logits row, each with its own seed, in one batch."""
    rows = [SampleRow(f"r{i}", SP(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                  seed=i), 7) for i in range(n)]
    out = sampler(logits.expand(n, -1).contiguous(), rows)
    return torch.tensor([t.token_id for t in out])


@pytest.mark.parametrize("make", PATHS)
@pytest.mark.parametrize("params", [SP(temperature=1.0), SP(temperature=0.7, top_p=0.8),
                                    SP(temperature=1.0, top_k=5), SP(temperature=1.5, top_k=12, top_p=0.9)],
                         ids=["t1", "t0.7-p0.8", "k5", "t1.5-k12-p0.9"])
def test_draws_follow_the_nucleus_distribution(make, params: SP) -> None:
    logits = logits_of(1, 40, seed=3, scale=1.5)[0]
    want = nucleus(logits, params)
    n = 25_000
    got = torch.bincount(draws(make((2,)), logits, params, n), minlength=40).double() / n
    assert got[want == 0].sum() == 0, "drew a token outside the top-k / top-p set"
    assert 0.5 * float((got - want).abs().sum()) < 0.025  # total variation (noise ~0.01)


@pytest.mark.parametrize("make", PATHS)
def test_greedy_rules(make) -> None:
    logits = logits_of(5, 1000, seed=1)
    rows = [SampleRow("a", SP(), 3), SampleRow("b", SP(temperature=1e-39), 3),
            SampleRow("c", SP(temperature=9e-6, top_p=0.5), 3),
            SampleRow("d", SP(temperature=2.0, top_k=1), 3), SampleRow("e", SP(temperature=0.0), 3)]
    tokens = [t.token_id for t in make((2,))(logits, rows)]
    assert tokens == logits.argmax(1).tolist()


@pytest.mark.parametrize("make", PATHS)
def test_seeded_row_does_not_depend_on_its_batch(make) -> None:
    sampler = make((2,))
    hot = SP(temperature=0.9, top_p=0.95, seed=1234)
    logits = logits_of(16, 5000, seed=2, scale=2.0)
    alone = [sampler(logits[i : i + 1], [SampleRow("s", hot, 10 + i)])[0].token_id
             for i in range(16)]
    for trial in range(3):  # other rows: unseeded, greedy, other parameters, other orders
        rows, mine = [], []
        for i in range(16):
            others = [SampleRow(f"o{trial}{j}", SP(temperature=1.3, top_k=50 * j), 5)
                      for j in range(trial + 1)]
            rows.append(([SampleRow("s", hot, 10 + i)] + others) if trial % 2 else
                        (others + [SampleRow("s", hot, 10 + i)]))
        for i, batch in enumerate(rows):
            where = next(j for j, r in enumerate(batch) if r.request_id == "s")
            block = torch.cat([logits_of(len(batch), 5000, seed=100 + i, scale=2.0)])
            block[where] = logits[i]
            mine.append(sampler(block, batch)[where].token_id)
        assert mine == alone
    # Stateless: a new sampler, or a re-run, draws the same tokens.
    assert [make((2,))(logits[i : i + 1], [SampleRow("s", hot, 10 + i)])[0].token_id
            for i in range(16)] == alone
    positions = {sampler(logits[:1], [SampleRow("s", hot, p)])[0].token_id for p in range(40)}
    assert len(positions) > 1  # each position draws afresh


@pytest.mark.parametrize("make", PATHS)
def test_bad_rows_fail_alone(make) -> None:
    sampler = make((2,))
    logits = logits_of(6, 300, seed=4)
    good = [SampleRow("g1", SP(temperature=1.0, seed=1), 2), SampleRow("g2", SP(), 2)]
    expected = [t.token_id for t in sampler(logits[[0, 5]], good)]
    bad = logits.clone()
    bad[1, 17] = float("nan")
    bad[2] = float("-inf")
    bad[3, 42] = float("inf")
    bad[4, 5] = float("nan")
    rows = [good[0], SampleRow("nan", SP(temperature=1.0), 2), SampleRow("ninf", SP(), 2),
            SampleRow("pinf", SP(temperature=1.0, logprobs=True), 2),
            SampleRow("nan-greedy", SP(), 2), good[1]]
    out = sampler(bad, rows)
    assert [t.token_id for t in (out[0], out[5])] == expected
    assert [(t.token_id, t.finish_reason) for t in out[1:3]] == [(-1, "error"), (-1, "error")]
    assert out[4].token_id == -1 and out[4].finish_reason == "error"
    assert out[3].token_id == 42 and out[3].finish_reason is None
    weird = [SampleRow("nan-t", SP(temperature=float("nan")), 1),
             SampleRow("neg-t", SP(temperature=-1.0), 1),
             SampleRow("huge-t", SP(temperature=1e38, seed=3), 1),
             SampleRow("inf-t", SP(temperature=float("inf"), seed=3), 1)]
    out = sampler(logits[:4], weird)
    assert [t.finish_reason for t in out[:2]] == ["error", "error"]
    assert all(0 <= t.token_id < 300 for t in out[2:])  # ~uniform, but a token


@pytest.mark.parametrize("make", PATHS)
def test_logprobs_and_top_alternatives(make) -> None:
    logits = logits_of(4, 2000, seed=5)
    logits[3, :1990] = float("-inf")  # only 10 finite: the other alternatives clamp at -9999
    rows = [SampleRow("a", SP(logprobs=True), 1),
            SampleRow("b", SP(temperature=0.8, top_p=0.9, seed=2, logprobs=True, top_logprobs=5), 1),
            SampleRow("c", SP(logprobs=True, top_logprobs=99), 1),
            SampleRow("d", SP(temperature=1.0, seed=2, logprobs=True, top_logprobs=12), 1)]
    out = make((2,))(logits, rows)
    ref = torch.log_softmax(logits, -1)
    for t, r in zip(out, ref):
        assert t.logprob == pytest.approx(float(r[t.token_id]), abs=1e-5)
    assert out[0].top_logprobs is None
    assert [i for i, _ in out[1].top_logprobs] == ref[1].topk(5).indices.tolist()
    assert [lp for _, lp in out[1].top_logprobs] == pytest.approx(ref[1].topk(5).values.tolist(), abs=1e-5)
    assert len(out[2].top_logprobs) == MAX_TOP_LOGPROBS
    assert [lp for _, lp in out[3].top_logprobs][10:] == [MIN_LOGPROB, MIN_LOGPROB]
    assert 1990 <= out[3].token_id < 2000


def test_c_kernel_and_torch_path_agree() -> None:
    """Same uniforms: without top-k/top-p both paths draw by the same inverse CDF."""
    if not cpu_kernels.sample_available():
        pytest.skip("the C sampling kernel did not build here")
    logits = logits_of(300, 3000, seed=6, scale=1.0)
    rows = [SampleRow(f"r{i}", SP(temperature=1.0, seed=i, logprobs=True), i) for i in range(300)]
    c, t = Sampler((2,))(logits, rows), TorchSampler((2,))(logits, rows)
    same = sum(a.token_id == b.token_id for a, b in zip(c, t))
    assert same >= 297  # the rest: float sums differing at a bucket edge
    assert max(abs(a.logprob - b.logprob) for a, b in zip(c, t)) < 1e-4


def test_stops_and_python_mirror_of_the_stream() -> None:
    logits = logits_of(2, 100, seed=7)
    eos = int(logits[0].argmax())
    out = Sampler((eos,))(logits, [SampleRow("a", SP(), 0),
                                   SampleRow("b", SP(stop_token_ids=(int(logits[1].argmax()),)), 0)])
    assert [t.finish_reason for t in out] == ["stop", "stop"]
    assert Sampler((eos,))(logits[:1], [SampleRow("a", SP(ignore_eos=True), 0)])[0].finish_reason is None
    # splitmix64's published first output for state 0.
    assert splitmix64(0)[0] == 0xE220A8397B1DCDAF
    assert 0.0 <= first_uniform(generator_seed(5, 9)) < 1.0


def test_kernel_exp_is_within_an_ulp() -> None:
    if not cpu_kernels.sample_available():
        pytest.skip("the C sampling kernel did not build here")
    xs = torch.linspace(-87, 88, 20001).tolist()
    worst = max(abs(cpu_kernels.exp(x) - math.exp(x)) / math.exp(x) for x in xs)
    assert worst < 2.5e-7
    assert cpu_kernels.exp(float("-inf")) == 0.0 and cpu_kernels.exp(-100.0) == 0.0
