"""`fluidserve simulate` / `fluid` as users run them: JSON output and one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


SIM = ("simulate", "--policy", "nested-wait", "--types", "512:20", "--rate", "20",
       "--num-requests", "300", "--json")


def test_simulate_json_has_the_documented_keys_and_is_deterministic():
    first, second = cli(*SIM), cli(*SIM)
    assert first.returncode == 0, first.stderr
    a = json.loads(first.stdout.splitlines()[-1])
    b = json.loads(second.stdout.splitlines()[-1])
    keys = {"policy", "submitted", "completed", "rejected", "evictions", "throughput_tok_s",
            "fluid_throughput_tok_s", "latency_mean_s", "latency_p50_s", "latency_p90_s",
            "latency_p99_s", "ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s",
            "tpot_mean_s", "tpot_p50_s", "tpot_p99_s", "goodput_rps", "goodput_chat_rps",
            "peak_kv_tokens", "kv_capacity_tokens", "sim_wall_s"}
    assert keys <= a.keys()
    assert a["completed"] == a["submitted"] == 300
    a.pop("sim_wall_s"), b.pop("sim_wall_s")
    assert a == b


def test_simulate_vllm_v1_with_a_smaller_cache():
    out = cli("simulate", "--policy", "vllm-v1", "--types", "512:200", "--rate", "7",
              "--num-requests", "200", "--kv-capacity", "30000", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.splitlines()[-1])
    assert data["kv_capacity_tokens"] == 30000 and data["completed"] == 200
    assert data["peak_kv_tokens"] <= 30000
    assert 0 < data["goodput_rps"] <= 7 * 1.5


def test_fluid_reports_both_limits_for_a_trace():
    out = cli("fluid", "--trace", "scheduler/data/lmsys_sample.csv", "--rate", "40",
              "--kv-capacity", "30000", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.splitlines()[-1])
    # LMSYS at C = 30k: memory binds first (M* = C near 38 req/s, load = 1 near 51 req/s).
    assert 30 < data["memory_limit_rps"] < data["load_limit_rps"] < 60
    assert data["fits"] is False and "M* <= C up to" in data["message"]
    table = cli("fluid", "--trace", "scheduler/data/lmsys_sample.csv", "--rate", "40")
    assert "in all over" in table.stdout  # hundreds of types summed, not listed


def test_fluid_json():
    out = cli("fluid", "--types", "512:20", "--rate", "15", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.splitlines()[-1])
    assert data["stable"] is True
    assert data["throughput_tok_s"] == pytest.approx(15 * 20)
    for key in ("load", "iteration_time_s", "per_stage", "memory_tokens", "kv_capacity_tokens"):
        assert key in data


@pytest.fixture
def bad_trace(tmp_path: Path) -> Path:
    path = tmp_path / "bad.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens\n10,20\n10,abc\n")
    return path


BAD = {
    "missing file": ("simulate", "--trace", "/nonexistent/trace.csv", "--rate", "5"),
    "malformed row": ("simulate", "--trace", "{bad_trace}", "--rate", "5"),
    "unknown policy": ("simulate", "--policy", "fifo", "--types", "512:20", "--rate", "5"),
    "shares": ("simulate", "--types", "512:20:0.5,512:50:0.3", "--rate", "5"),
    "negative rate": ("simulate", "--types", "512:20", "--rate", "-3"),
    "fluid negative rate": ("fluid", "--types", "512:20", "--rate", "-3"),
    "fluid bad types": ("fluid", "--types", "512", "--rate", "3"),
    "bad policy args": ("simulate", "--types", "512:20", "--rate", "5", "--policy-args", "{nope"),
    "unknown policy arg": ("simulate", "--types", "512:20", "--rate", "5", "--policy-args",
                           '{"bugdet": 3}'),
    "unknown preset": ("simulate", "--types", "512:20", "--rate", "5", "--preset", "h100"),
    "tiny cache": ("simulate", "--types", "512:20", "--rate", "5", "--kv-capacity", "8"),
    "fluid both sources": ("fluid", "--types", "512:20", "--trace", "x.csv", "--rate", "3"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_nonzero_with_one_line(case, bad_trace):
    args = [a.replace("{bad_trace}", str(bad_trace)) for a in BAD[case]]
    out = cli(*args)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    # argparse prints its usage line before the one-line error; the error is the last line.
    assert lines and "error" in lines[-1], out.stderr
    if not case.startswith(("unknown policy", "negative rate", "fluid negative", "fluid both")):
        assert len(lines) == 1, out.stderr
