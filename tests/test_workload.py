"""Workload specs, traces and arrival processes."""
from __future__ import annotations

import itertools
import random
import statistics
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.workload import (
    AZURE_TRACE,
    DEFAULT_TRACE,
    LMSYS_TRACE,
    Arrival,
    TraceRow,
    TypeSpec,
    WorkloadError,
    job_types,
    parse_types,
    poisson_arrivals,
    read_trace,
    synthetic_workload,
    trace_workload,
)

# --- type specs ---------------------------------------------------------------------------------


def test_parse_types_good_specs():
    assert parse_types("512:20") == [TypeSpec(512, 20, 1.0)]
    assert parse_types("512:20:0.7, 512:50:0.3") == [TypeSpec(512, 20, 0.7), TypeSpec(512, 50, 0.3)]
    assert parse_types("10:10,10:20") == [TypeSpec(10, 10, 0.5), TypeSpec(10, 20, 0.5)]
    assert parse_types("20:100:0.5,20:200:0.3333333,20:300:0.1666667")[2].share == 0.1666667


@pytest.mark.parametrize("spec", [
    "", " ", "512", "512:", ":20", "512:20:0.5:1", "512.0:20", "512:2e1", "0:20", "512:0",
    "-512:20", "512:20:0.7,512:50:0.2", "512:20:0.7,512:50", "512:20:-0.5,512:50:1.5",
    "512:20:abc", "512:20,,512:50", "512:20:nan", "5_12:20",
])
def test_parse_types_rejects_malformed(spec):
    with pytest.raises(WorkloadError) as info:
        parse_types(spec)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)


@given(st.lists(st.tuples(st.integers(1, 100_000), st.integers(1, 100_000)), min_size=1,
                max_size=8))
def test_parse_types_roundtrip_equal_shares(pairs):
    types = parse_types(",".join(f"{p}:{o}" for p, o in pairs))
    assert [(t.prompt_len, t.output_len) for t in types] == pairs
    assert sum(t.share for t in types) == pytest.approx(1.0)


@given(st.lists(st.integers(1, 1000), min_size=1, max_size=6))
def test_parse_types_shares_that_sum_to_one_parse(weights):
    shares = [w / sum(weights) for w in weights]
    spec = ",".join(f"100:{i + 1}:{s!r}" for i, s in enumerate(shares))
    assert [t.share for t in parse_types(spec)] == shares


@given(st.text(max_size=30))
def test_parse_types_never_fails_other_than_workload_error(spec):
    try:
        types = parse_types(spec)
    except WorkloadError:
        return
    assert types and all(t.prompt_len > 0 and t.output_len > 0 for t in types)


# --- traces -------------------------------------------------------------------------------------


def test_reads_lmsys_trace():
    rows = read_trace(LMSYS_TRACE)
    assert len(rows) == 20_000
    assert all(r.arrived_at is None for r in rows)
    assert min(r.prompt_len for r in rows) == 1 and min(r.output_len for r in rows) == 1  # 0 -> 1
    assert statistics.mean(r.output_len for r in rows) == pytest.approx(147, abs=1)
    assert statistics.mean(r.prompt_len for r in rows) == pytest.approx(35, abs=1)


def test_reads_azure_trace_with_arrivals():
    rows = read_trace(AZURE_TRACE)  # column order differs: time first
    assert len(rows) == 5_000
    assert rows[0] == TraceRow(374, 44, 0.0)
    times = [r.arrived_at for r in rows]
    assert times == sorted(times) and times[-1] == pytest.approx(1023.3, abs=0.1)  # a real window
    assert statistics.mean(r.prompt_len for r in rows) == pytest.approx(1161, abs=1)


def test_shipped_sample_trace_is_the_documented_draw():
    rows = read_trace(DEFAULT_TRACE)
    assert len(rows) == 2000 and DEFAULT_TRACE.parent == LMSYS_TRACE.parent
    full = read_trace(LMSYS_TRACE)
    picked = sorted(random.Random(2025).sample(range(20_000), 2_000))  # as data/README.md says
    assert rows == [full[i] for i in picked]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize("body, line, what", [
    ("num_prefill_tokens,num_decode_tokens\n10,5\n12,x\n", 3, "not an integer"),
    ("num_prefill_tokens,num_decode_tokens\n10,5\n\n1.5,5\n", 4, "not an integer"),
    ("num_prefill_tokens,num_decode_tokens\n-1,5\n", 2, "negative"),
    ("num_prefill_tokens,num_decode_tokens\n10,-5\n", 2, "negative"),
    ("num_prefill_tokens,num_decode_tokens\n10,5,7\n", 2, "fields"),
    ("arrived_at,num_prefill_tokens,num_decode_tokens\n0.5,10,5\nsoon,10,5\n", 3, "arrived_at"),
    ("arrived_at,num_prefill_tokens,num_decode_tokens\n-1,10,5\n", 2, "arrived_at"),
    ("num_prefill_tokens,output\n10,5\n", 1, "num_decode_tokens"),
    ("", 1, "empty"),
])
def test_malformed_trace_names_file_and_line(tmp_path, body, line, what):
    path = _write(tmp_path, body)
    with pytest.raises(WorkloadError, match=what) as info:
        read_trace(path)
    assert f"{path}:{line}" in str(info.value) and "\n" not in str(info.value)


def test_trace_errors_missing_file_and_no_rows(tmp_path):
    with pytest.raises(WorkloadError, match="trace not found"):
        read_trace(tmp_path / "absent.csv")
    with pytest.raises(WorkloadError, match="no rows"):
        read_trace(_write(tmp_path, "num_prefill_tokens,num_decode_tokens\n"))


def test_trace_zero_lengths_become_one(tmp_path):
    rows = read_trace(_write(tmp_path, "num_decode_tokens,num_prefill_tokens\n0,7\n3,0\n"))
    assert rows == [TraceRow(7, 1, None), TraceRow(1, 3, None)]


# --- arrivals -----------------------------------------------------------------------------------


def test_poisson_mean_gap_is_one_over_rate():
    times = poisson_arrivals(20.0, 20_000, seed=3)
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    assert statistics.mean(gaps) == pytest.approx(1 / 20, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(1 / 20, rel=0.05)  # exponential: sd = mean
    assert all(g >= 0 for g in gaps)


@pytest.mark.parametrize("rate", [0.0, -1.0, float("inf"), float("nan")])
def test_poisson_rejects_bad_rate(rate):
    with pytest.raises(WorkloadError):
        poisson_arrivals(rate, 10, seed=0)


def test_deterministic_per_seed():
    types = parse_types("512:20:0.7,512:50:0.3")
    assert synthetic_workload(types, 22.0, 500, seed=1) == synthetic_workload(types, 22.0, 500, 1)
    assert synthetic_workload(types, 22.0, 500, seed=1) != synthetic_workload(types, 22.0, 500, 2)
    assert poisson_arrivals(5.0, 100, 7) == poisson_arrivals(5.0, 100, 7)
    rows = read_trace(DEFAULT_TRACE)
    assert trace_workload(rows, 300, 4, rate=10.0) == trace_workload(rows, 300, 4, rate=10.0)


def test_synthetic_mix_follows_shares():
    arrivals = synthetic_workload(parse_types("512:20:0.7,512:50:0.3"), 22.0, 10_000, seed=5)
    share = sum(a.output_len == 20 for a in arrivals) / len(arrivals)
    assert share == pytest.approx(0.7, abs=0.02)
    assert all(a.prompt_len == 512 for a in arrivals)
    assert arrivals[-1].time == pytest.approx(10_000 / 22.0, rel=0.05)


def test_trace_workload_in_order_and_wrapping():
    rows = [TraceRow(10, 1, None), TraceRow(20, 2, None), TraceRow(30, 3, None)]
    arrivals = trace_workload(rows, 7, seed=0, rate=1.0)
    assert [a.prompt_len for a in arrivals] == [10, 20, 30, 10, 20, 30, 10]
    assert all(a.time < b.time for a, b in itertools.pairwise(arrivals))


def test_trace_replay_uses_own_times_and_wraps():
    rows = [TraceRow(10, 1, 0.0), TraceRow(20, 2, 1.0), TraceRow(30, 3, 3.0)]
    arrivals = trace_workload(rows, 5, seed=0, replay=True)
    # The trace spans 3 s over 2 gaps; it restarts one mean gap (1.5 s) after its last arrival.
    assert arrivals == [Arrival(0.0, 10, 1), Arrival(1.0, 20, 2), Arrival(3.0, 30, 3),
                        Arrival(4.5, 10, 1), Arrival(5.5, 20, 2)]
    azure = read_trace(AZURE_TRACE)
    replayed = trace_workload(azure, 100, seed=0, replay=True)
    assert [a.time for a in replayed] == [r.arrived_at for r in azure[:100]]


def test_trace_workload_errors():
    no_times = [TraceRow(10, 1, None)]
    with pytest.raises(WorkloadError, match="arrived_at"):
        trace_workload(no_times, 5, seed=0, replay=True)
    with pytest.raises(WorkloadError, match="not both"):
        trace_workload(no_times, 5, seed=0, rate=1.0, replay=True)
    with pytest.raises(WorkloadError, match="not both"):
        trace_workload(no_times, 5, seed=0)
    with pytest.raises(WorkloadError):
        trace_workload([], 5, seed=0, rate=1.0)


def test_job_types_bin_a_trace():
    arrivals = trace_workload(read_trace(DEFAULT_TRACE), 2000, seed=0, rate=10.0)
    types = job_types(arrivals, 10.0, max_types=10)
    assert len(types) == 10
    assert sum(t.rate for t in types) == pytest.approx(10.0)
    assert [t.output_len for t in types] == sorted(t.output_len for t in types)
    mean_out = statistics.mean(a.output_len for a in arrivals)
    assert sum(t.rate * t.output_len for t in types) == pytest.approx(10.0 * mean_out, rel=0.01)
    one = job_types(synthetic_workload(parse_types("512:20"), 5.0, 100, seed=0), 5.0)
    assert [(t.prompt_len, t.output_len, t.rate) for t in one] == [(512, 20, 5.0)]
