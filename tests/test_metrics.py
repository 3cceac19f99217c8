"""ServingMetrics records what operators read off the dashboard: exact values, right labels."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitoring.metrics import ServingMetrics
from scheduler.request import Request

MODEL = "test-model"


def value(m: ServingMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value("fluidserve:" + name, {"model_name": MODEL, **labels})


def served_request(rid: str = "r1", prompt_len: int = 12) -> Request:
    """A request with known timestamps: arrives 10.0, scheduled 10.25, first token 10.75."""
    req = Request(request_id=rid, prompt_len=prompt_len, max_tokens=16, arrival_time=10.0)
    req.first_scheduled_time = 10.25
    req.first_token_time = 10.75
    return req


def stream(m: ServingMetrics, req: Request, times: list[float]) -> None:
    """Stream one token at each time, as the scheduler's commit would."""
    for t in times:
        req.num_generated += 1
        req.last_token_time = t
        m.on_tokens(req, t)


def test_ttft_and_queue_time_come_from_request_timestamps() -> None:
    m = ServingMetrics(MODEL)
    req = served_request()
    stream(m, req, [10.75])
    assert value(m, "time_to_first_token_seconds_sum") == pytest.approx(0.75)
    assert value(m, "time_to_first_token_seconds_count") == 1
    assert value(m, "request_queue_time_seconds_sum") == pytest.approx(0.25)
    # 0.75 s falls in vLLM's 0.75 bucket, not the 0.5 one.
    assert value(m, "time_to_first_token_seconds_bucket", le="0.5") == 0
    assert value(m, "time_to_first_token_seconds_bucket", le="0.75") == 1


def test_later_tokens_record_inter_token_latency_not_ttft() -> None:
    m = ServingMetrics(MODEL)
    req = served_request()
    stream(m, req, [10.75, 10.80, 10.90])
    assert value(m, "time_to_first_token_seconds_count") == 1
    assert value(m, "inter_token_latency_seconds_count") == 2
    assert value(m, "inter_token_latency_seconds_sum") == pytest.approx(0.15)


def test_finish_records_latency_breakdown_lengths_and_reason() -> None:
    m = ServingMetrics(MODEL)
    req = served_request(prompt_len=12)
    stream(m, req, [10.75, 10.80, 10.90])
    req.finish_time, req.finish_reason = 11.0, "length"
    m.on_finish(req)
    assert value(m, "e2e_request_latency_seconds_sum") == pytest.approx(1.0)
    assert value(m, "request_prefill_time_seconds_sum") == pytest.approx(0.5)
    assert value(m, "request_decode_time_seconds_sum") == pytest.approx(0.25)
    assert value(m, "request_prompt_tokens_sum") == 12
    assert value(m, "request_generation_tokens_sum") == 3
    assert value(m, "request_success_total", finished_reason="length") == 1
    assert value(m, "request_success_total", finished_reason="stop") == 0


def test_token_counters_equal_tokens_streamed() -> None:
    m = ServingMetrics(MODEL)
    reqs = [served_request(f"r{i}", prompt_len=100 + i) for i in range(5)]
    streamed = 0
    for step in range(7):
        for req in reqs[: 5 - step // 2]:  # some requests stop early
            stream(m, req, [11.0 + step * 0.02])
            streamed += 1
    m.on_tokens(reqs[0], 11.5, n=3)  # e.g. several tokens in one step
    streamed += 3
    assert value(m, "generation_tokens_total") == streamed
    assert value(m, "prompt_tokens_total") == sum(r.prompt_len for r in reqs)


def test_batch_recording_matches_per_request_recording() -> None:
    one, batch = ServingMetrics(MODEL), ServingMetrics(MODEL)
    reqs = [served_request(f"r{i}") for i in range(4)]
    for t in (10.75, 10.8, 10.9):
        for req in reqs:
            one.on_tokens(req, t)
        batch.on_batch_tokens(reqs, t)
    for name in ("generation_tokens_total", "prompt_tokens_total",
                 "time_to_first_token_seconds_sum", "inter_token_latency_seconds_count",
                 "inter_token_latency_seconds_sum", "request_queue_time_seconds_count"):
        assert value(batch, name) == pytest.approx(value(one, name)), name


def test_kv_usage_returns_to_zero_when_all_requests_end() -> None:
    m = ServingMetrics(MODEL)
    m.set_kv(0, used_tokens=3000, capacity_tokens=4000)
    m.set_kv(1, used_tokens=1000, capacity_tokens=4000)
    assert value(m, "kv_cache_usage_perc", worker="0") == pytest.approx(0.75)
    assert value(m, "kv_cache_capacity_tokens", worker="1") == 4000
    m.set_kv(0, 0, 4000)
    m.set_kv(1, 0, 4000)
    assert value(m, "kv_cache_usage_perc", worker="0") == 0
    assert value(m, "kv_cache_usage_perc", worker="1") == 0


def test_segment_children_follow_the_number_of_segments() -> None:
    m = ServingMetrics(MODEL)
    m.set_policy_state([5, 3, 1], [8.0, 4.0, 2.0], 20.0, 3000.0, 90_000.0, 0.8)
    assert value(m, "segment_threshold", segment="3") == 2.0
    m.set_policy_state([4, 2], [6.0, 3.0], 20.0, 3000.0, 90_000.0, 0.8)
    assert value(m, "segment_queue_length", segment="2") == 2
    assert value(m, "segment_queue_length", segment="3") is None
    assert value(m, "segment_threshold", segment="3") is None
    assert b'segment="3"' not in m.render()
    m.set_policy_state([1, 1, 1, 1], [4.0, 3.0, 2.0, 1.0], 20.0, 3000.0, 90_000.0, 1.2)
    assert value(m, "segment_queue_length", segment="4") == 1
    assert value(m, "fluid_load") == 1.2


def test_cancel_evict_reject_and_worker_up() -> None:
    m = ServingMetrics(MODEL)
    req = served_request()
    stream(m, req, [10.75])
    m.on_cancel(req)
    m.on_evictions(2)
    m.on_evictions(0)
    m.on_reject("prompt_too_long")
    m.set_worker_up(0, True)
    m.set_worker_up(1, False)
    assert value(m, "request_cancelled_total") == 1
    assert value(m, "num_evictions_total") == 2
    assert value(m, "request_rejected_total", reason="prompt_too_long") == 1
    assert value(m, "model_actor_up", worker="0") == 1
    assert value(m, "model_actor_up", worker="1") == 0


def test_failures_are_counted_by_reason_and_leave_no_per_request_state() -> None:
    m = ServingMetrics(MODEL)
    req = served_request()
    stream(m, req, [10.75])
    m.on_failure(req, "model_error")
    m.on_failure(None, "queue_timeout")
    assert value(m, "request_failure_total", reason="model_error") == 1
    assert value(m, "request_failure_total", reason="queue_timeout") == 1
    assert not m._last_token


def test_instances_are_independent_and_render_parses() -> None:
    a, b = ServingMetrics(MODEL), ServingMetrics("other")
    a.on_iteration(0, 0.012, num_tokens=600, batch_size=40)
    a.set_queue_state(running=40, waiting=7, paused=3)
    assert b.registry.get_sample_value("fluidserve:batch_size_count",
                                       {"model_name": "other", "worker": "0"}) is None
    families = {f.name: f for f in text_string_to_metric_families(a.render().decode())}
    expected = {
        "fluidserve:time_to_first_token_seconds": "histogram",
        "fluidserve:iteration_duration_seconds": "histogram",
        "fluidserve:generation_tokens": "counter",
        "fluidserve:num_requests_waiting": "gauge",
        "fluidserve:fluid_load": "gauge",
    }
    for name, kind in expected.items():
        assert families[name].type == kind
    waiting = [s for s in families["fluidserve:num_requests_waiting"].samples]
    assert waiting[0].labels == {"model_name": MODEL} and waiting[0].value == 7


def test_render_keeps_the_colon_in_every_sample_name() -> None:
    """Dashboards query `fluidserve:*`; an encoder that rewrites `:` to `_` would blank them."""
    m = ServingMetrics(MODEL)
    m.set_queue_state(1, 2, 3)
    m.on_iteration(0, 0.01, 10, 2)
    samples = [line for line in m.render().decode().splitlines() if not line.startswith("#")]
    assert samples and all(line.startswith("fluidserve:") for line in samples)
