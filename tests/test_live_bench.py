"""Short live benchmarks on the session's shared Serve app: the load generator and bench.live.

Sanity only (keys, counts, finite positive numbers); timings on a shared 2-core box say nothing.
"""
from __future__ import annotations

import json
import math

import pytest

from bench import live
from bench import serve as loadgen
from scheduler.simulate import LATENCY_KEYS
from scheduler.workload import parse_types, synthetic_workload

pytestmark = [pytest.mark.serve, pytest.mark.slow]


def tiny_config(out_dir) -> live.LiveConfig:
    return live.LiveConfig(policies=["vllm"], rates=[2.0], num_requests=15, model="random:tiny",
                           max_prompt=64, max_output=16, kv_cache_tokens=4096, out_dir=out_dir,
                           progress=False, calibration_repeats=1, speed_check_requests=5)


# The app bench.live deploys for vllm: the load generator tests use it too (no redeploy between).
TINY = live.app_args(tiny_config(None), "vllm", None)
SIM_KEYS = ("throughput_tok_s", *LATENCY_KEYS, "completed", "submitted")


def assert_sane(figures: dict) -> None:
    for key in SIM_KEYS:
        assert key in figures, key
    assert figures["completed"] == figures["submitted"] > 0
    for key in ("throughput_tok_s", *LATENCY_KEYS):
        assert math.isfinite(figures[key]) and figures[key] > 0, (key, figures[key])
    assert figures["latency_mean_s"] >= figures["ttft_mean_s"]


def test_load_generator_streams_every_request(deploy_app):
    app = deploy_app(**TINY)
    arrivals = synthetic_workload(parse_types("24:12,48:6"), rate=8.0, n=20, seed=1)
    outcomes = loadgen.run_sync(app.url, arrivals)
    out = loadgen.report(outcomes)
    assert_sane(out)
    assert out["errors"] == 0 and out["short_outputs"] == 0
    assert out["total_output_tokens"] == sum(a.output_len for a in arrivals)
    assert out["total_input_tokens"] == sum(a.prompt_len for a in arrivals)
    assert math.isfinite(out["itl_mean_s"]) and out["request_throughput"] > 0


def test_load_generator_cli_prints_json_last(deploy_app, capsys):
    app = deploy_app(**TINY)
    rc = loadgen.main(["--base-url", app.url, "--types", "16:8", "--rate", "10",
                       "--num-requests", "6", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0
    assert_sane(out)


def test_bench_live_one_policy_one_rate(deploy_app, tmp_path):
    out = live.run(tiny_config(tmp_path), lambda args: deploy_app(**args).url)
    live.write_results(out, tmp_path)
    assert len(out["runs"]) == 1
    run = out["runs"][0]
    assert run["policy"] == "vllm" and run["rate"] == 2.0 and math.isfinite(run["load"])
    assert_sane(run["live"])
    assert_sane(run["sim"])
    assert math.isfinite(run["sim_error"]) and run["sim_error"] >= 0
    assert -0.9 < run["speed_check"] < 10  # the run's deployment against the calibration, before it
    assert out["cost"]["kv_capacity_tokens"] > 0 and out["cost"]["d0"] > 0
    cal = out["calibration"]  # fitted to the scheduler's own steps, with its uncertainty
    assert cal["steps"] >= 20 and 0 <= cal["rel_uncertainty"] < 1 and set(cal["std"]) == {"d0", "d_tok", "d_kv"}
    # The prediction's range: the box's speed moving 2 standard deviations between probe rounds.
    low, high = run["predicted_range_s"]
    assert cal["speed_spread"] >= 0 and low <= run["sim"]["latency_mean_s"] <= high
    assert run["in_range"] == (low <= run["live"]["latency_mean_s"] <= high)
    for name in ("live.json", "live.md", "live_latency.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "live.json").read_text())["runs"][0]["policy"] == "vllm"
