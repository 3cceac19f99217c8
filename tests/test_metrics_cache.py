"""/metrics off the dispatch loop: cached renders in a worker thread, and batched histograms."""
from __future__ import annotations

import asyncio
import random
import threading

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from monitoring.metrics import INTER_TOKEN_BUCKETS, MetricsCache, ServingMetrics, observe_many
from scheduler.request import Request


def test_scrapes_share_one_render_in_a_worker_thread_until_it_is_stale():
    metrics = ServingMetrics("m")
    threads: list[int] = []
    render = metrics.render

    def recording_render() -> bytes:
        threads.append(threading.get_ident())
        return render()

    metrics.render = recording_render
    cache = MetricsCache(metrics, max_age_s=0.3)
    refreshed: list[int] = []

    async def main() -> tuple[list[bytes], bytes]:
        loop_thread = threading.get_ident()
        first = await asyncio.gather(*(cache.text(lambda: refreshed.append(1)) for _ in range(20)))
        assert threads and all(t != loop_thread for t in threads)  # never on the event loop
        metrics.on_submit(Request("r", 1, 1, 0.0))
        cached = await cache.text()
        await asyncio.sleep(0.35)
        return first, cached, await cache.text()

    first, cached, fresh = asyncio.run(main())
    assert len(set(first)) == 1 and cached == first[0]
    assert len(threads) == 2 and len(refreshed) == 1  # 21 scrapes, two renders
    assert b"fluidserve:request_arrivals_total" in fresh and fresh != cached


def test_batched_histogram_updates_equal_one_by_one():
    values = [random.Random(i).choice([0.0, 0.01, 0.025, 0.3, 5.0, 1e3]) for i in range(300)]
    values += [random.Random(7).random() for _ in range(300)]
    registries = [CollectorRegistry(), CollectorRegistry()]
    a, b = (Histogram("itl", "x", buckets=INTER_TOKEN_BUCKETS, registry=r) for r in registries)
    for v in values:
        a.observe(v)
    observe_many(b, values)
    text_a, text_b = (generate_latest(r).decode().splitlines() for r in registries)
    buckets_a = [line for line in text_a if "_bucket" in line or "_count" in line]
    assert buckets_a == [line for line in text_b if "_bucket" in line or "_count" in line]
    sum_a = float(next(line for line in text_a if line.startswith("itl_sum")).split()[1])
    sum_b = float(next(line for line in text_b if line.startswith("itl_sum")).split()[1])
    assert abs(sum_a - sum_b) < 1e-9 * max(1.0, sum_a)
