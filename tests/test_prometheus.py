"""A real Prometheus scrapes fluidserve's metrics; every dashboard and alert expression must work.

Needs Debian's `prometheus` package (/usr/bin/prometheus, /usr/bin/promtool). The metrics
endpoint is the `metrics_target` fixture: today a tiny HTTP server returning
`ServingMetrics.render()` exactly as the Serve ingress does, over metrics that a background thread
feeds like a small serving system; swap it for the Serve app (`http://127.0.0.1:8000/metrics`
plus a load generator) without touching the tests.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from monitoring.metrics import CONTENT_TYPE, ServingMetrics
from scheduler.request import Request
from tests.conftest import free_port, stop_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
DASHBOARD = MONITORING / "grafana" / "fluidserve.json"
PROMETHEUS_YML = MONITORING / "prometheus" / "prometheus.yml"
ALERTS_YML = MONITORING / "prometheus" / "alerts.yml"
# A model name with a regex metacharacter, so the dashboard's regex matching is exercised.
MODEL = "SmolLM2-135M.test"
RATE_INTERVAL = "15s"  # what Grafana's $__rate_interval becomes at a 1 s scrape interval
MIN_SCRAPES = 8


def tool(name: str) -> str:
    """Path of a Prometheus binary; CI must have it, a laptop may skip."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} not found: apt-get install -y prometheus"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def http_json(url: str, timeout: float = 5.0) -> dict:
    """GET a Prometheus API URL; API errors (HTTP 4xx with a JSON body) are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as err:
        return json.load(err)


# -- the metrics endpoint ----------------------------------------------------------------------


@dataclass
class MetricsTarget:
    host_port: str  # what Prometheus scrapes, e.g. "127.0.0.1:8000"
    metrics_path: str
    model_name: str
    kind: str = "synthetic"


def feed(metrics: ServingMetrics, stop: threading.Event, seed: int = 0) -> None:
    """Drive `metrics` like a two-worker server at ~25 req/s with 20 ms iterations.

    Requests arrive, prefill, decode to 20 or 50 tokens (two Nested WAIT segments), and now and
    then are rejected, evicted (and re-queued) or cancelled. Timestamps use one clock.
    """
    rng = random.Random(seed)
    capacity = 20_000
    waiting: list[Request] = []
    running: list[Request] = []
    next_id = 0
    tick = 0
    for worker in (0, 1):
        metrics.set_worker_up(worker, True)
    while not stop.is_set():
        start = time.monotonic()
        if rng.random() < 0.5:
            if rng.random() < 0.05:
                metrics.on_reject("prompt_too_long")
            else:
                req = Request(f"r{next_id}", prompt_len=rng.randint(20, 500),
                              max_tokens=rng.choice((20, 50)), arrival_time=start)
                req.worker = next_id % 2
                next_id += 1
                metrics.on_submit(req)
                waiting.append(req)
        admitted, waiting = waiting[:8], waiting[8:]
        for req in admitted:
            if req.first_scheduled_time is None:
                req.first_scheduled_time = start
        stop.wait(0.02)  # the model runs the iteration
        now = time.monotonic()
        batch = running + admitted
        for req in batch:
            req.num_generated += 1
            req.first_token_time = req.first_token_time or now
            req.last_token_time = now
        metrics.on_batch_tokens(batch, now)
        running = []
        for req in batch:
            if req.num_generated >= req.max_tokens:
                req.finish_time, req.finish_reason = now, rng.choice(("stop", "length"))
                metrics.on_finish(req)
            else:
                running.append(req)
        if running and rng.random() < 0.03:  # LIFO eviction: restarts from prefill
            waiting.insert(0, running.pop())
            metrics.on_evictions(1)
        if running and rng.random() < 0.01:
            metrics.on_cancel(running.pop(0))
        metrics.on_iteration(tick % 2, now - start,
                             num_tokens=sum(r.prompt_len for r in admitted) + len(running),
                             batch_size=len(batch))
        for worker in (0, 1):
            used = sum(r.total_len for r in running if r.worker == worker)
            metrics.set_kv(worker, used, capacity)
        metrics.set_queue_state(running=len(batch), waiting=len(waiting), paused=0)
        metrics.set_policy_state(
            segment_queues=[len(waiting), sum(1 for r in running if r.num_generated == 20)],
            segment_thresholds=[4.0, 2.0],
            arrival_rate=25.0,
            fluid_throughput=25 * 0.95 * 35.0,
            fluid_memory=9_000.0,
            fluid_load=0.7,
        )
        tick += 1


def serve_metrics(metrics: ServingMetrics) -> ThreadingHTTPServer:
    """`GET /metrics` -> `render()`, as the ingress answers (not prometheus_client's own server,
    which negotiates OpenMetrics and mangles colons in names: see monitoring.metrics)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = metrics.render()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass  # one line per scrape is noise

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module", params=["serve", "synthetic"])
def metrics_target(request) -> Iterator[MetricsTarget]:
    """A live /metrics endpoint under load: the real Serve app driven by real requests, and a
    synthetic feed that also exercises what a short CPU run rarely shows (evictions, rejections
    at a steady rate, two workers' worth of segments)."""
    if request.param == "serve":
        yield from _serve_target(request.getfixturevalue("deploy_app"))
        return
    metrics = ServingMetrics(MODEL)
    server = serve_metrics(metrics)
    port = server.server_address[1]
    stop = threading.Event()
    feeder = threading.Thread(target=feed, args=(metrics, stop), daemon=True)
    feeder.start()
    try:
        yield MetricsTarget(f"127.0.0.1:{port}", "/metrics", MODEL)
    finally:
        stop.set()
        feeder.join(timeout=5)
        server.shutdown()
        server.server_close()


def _serve_target(deploy_app) -> Iterator[MetricsTarget]:
    """The Serve app (a small random model, tiny KV so that evictions happen) under a steady
    stream of real requests, one of them rejected, for as long as the module's tests run."""
    import httpx

    app = deploy_app(model="random:tiny", model_name=MODEL, num_model_actors=2,
                     kv_cache_tokens=1024, policy="nested-wait")
    stop = threading.Event()
    url = f"{app.base_url}/completions"

    def drive(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as client:
            client.post(url, json={"prompt": [1] * 1100, "max_tokens": 1})  # rejected: > KV
            while not stop.is_set():
                client.post(url, json={"prompt": [rng.randrange(100, 5000) for _ in range(rng.randint(8, 120))],
                                       "max_tokens": rng.randint(4, 60), "ignore_eos": True,
                                       "temperature": 0})

    drivers = [threading.Thread(target=drive, args=(i,), daemon=True) for i in range(6)]
    for d in drivers:
        d.start()
    try:
        yield MetricsTarget(app.url.removeprefix("http://"), "/metrics", MODEL, kind="serve")
    finally:
        stop.set()
        for d in drivers:
            d.join(timeout=60)


# -- a real Prometheus -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(metrics_target: MetricsTarget, tmp_path_factory) -> Iterator[str]:
    """A Prometheus server scraping `metrics_target` every second, with our alert rules loaded.

    Yields its base URL once it has scraped the target MIN_SCRAPES times.
    """
    binary = tool("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS_YML)],
        "scrape_configs": [{
            "job_name": "fluidserve",
            "metrics_path": metrics_target.metrics_path,
            "static_configs": [{"targets": [metrics_target.host_port]}],
        }],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            wait_for_scrapes(url, proc, log_path)
            yield url
        finally:
            stop_process(proc, timeout_s=15)


def wait_for_scrapes(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 90) -> None:
    """Return once Prometheus has scraped the target MIN_SCRAPES times and sees it up."""

    def fail(why: str) -> None:
        log = log_path.read_text(errors="replace")[-3000:]
        pytest.fail(f"{why}\n--- prometheus log ---\n{log}")

    scrapes = 'count_over_time(up{job="fluidserve"}[5m])'
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            fail(f"prometheus exited with {proc.returncode}")
        if time.monotonic() > deadline:
            fail(f"prometheus did not scrape the target {MIN_SCRAPES} times in {timeout:.0f} s")
        try:
            result = query(url, scrapes)["data"]["result"]
            up = query(url, 'up{job="fluidserve"}')["data"]["result"]
            if (result and float(result[0]["value"][1]) >= MIN_SCRAPES
                    and up and up[0]["value"][1] == "1"):
                return
        except (OSError, KeyError, ValueError):
            pass  # not listening yet
        time.sleep(0.5)


def query(base_url: str, expr: str) -> dict:
    """Evaluate one instant PromQL query through Prometheus's HTTP API."""
    return http_json(f"{base_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))


# -- the expressions under test ----------------------------------------------------------------


def grafana_regex_escape(value: str) -> str:
    """Escape a variable value as Grafana does inside a Prometheus =~ matcher."""
    return re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", value)


def expand_grafana(expr: str, model_name: str) -> str:
    """Substitute the dashboard's template variables as Grafana would before querying."""
    values = {"model_name": grafana_regex_escape(model_name),
              "__rate_interval": RATE_INTERVAL, "__interval": RATE_INTERVAL,
              "__range": "5m"}

    def sub(match: re.Match) -> str:
        name = next(g for g in match.groups() if g)
        if name not in values:
            raise AssertionError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\[\[(\w+)\]\]|\$(\w+)", sub, expr)


def dashboard_exprs() -> list[str]:
    """Every PromQL `expr` in the dashboard (rows' nested panels included), plus the metric
    selectors behind `label_values(...)` variable queries."""
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, val in node.items():
                if key == "expr" and isinstance(val, str):
                    found.append(val)
                elif key == "definition" and isinstance(val, str):
                    m = re.fullmatch(r"\s*label_values\((.+),\s*\w+\)\s*", val)
                    if m:
                        found.append(m.group(1))
                else:
                    walk(val)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return found


def alert_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load(ALERTS_YML.read_text())["groups"]
    return [(r["alert"], r["expr"]) for g in groups for r in g["rules"] if "alert" in r]


# -- tests ---------------------------------------------------------------------------------------


def test_promtool_accepts_config_and_rules(tmp_path: Path) -> None:
    promtool = tool("promtool")
    for args in (["check", "config", str(PROMETHEUS_YML)], ["check", "rules", str(ALERTS_YML)]):
        out = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
    # The commented KubeRay job must stay valid too: uncomment it and check again.
    text = PROMETHEUS_YML.read_text()
    block = re.search(r"# BEGIN kuberay\n(.*?)# END kuberay", text, re.DOTALL)
    assert block, "prometheus.yml lost its KubeRay block"
    uncommented = re.sub(r"^# ?", "", block.group(1), flags=re.MULTILINE)
    variant = tmp_path / "prometheus.yml"
    variant.write_text(text.replace(block.group(0), uncommented))
    shutil.copy(ALERTS_YML, tmp_path / "alerts.yml")
    out = subprocess.run([promtool, "check", "config", str(variant)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fluidserve-kuberay" in yaml.safe_load(variant.read_text())["scrape_configs"][-1][
        "job_name"]


def test_every_dashboard_expression_parses_and_returns_data(
    prometheus: str, metrics_target: MetricsTarget
) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 30, "the dashboard should have its panels' queries"
    problems = []
    for raw in exprs:
        expr = expand_grafana(raw, metrics_target.model_name)
        answer = query(prometheus, expr)
        if answer.get("status") != "success":
            problems.append(f"{expr}\n    -> {answer.get('errorType')}: {answer.get('error')}")
        elif not answer["data"]["result"]:
            problems.append(f"{expr}\n    -> no data")
    assert not problems, "dashboard queries that fail:\n" + "\n".join(problems)


def test_every_alert_rule_parses_and_loads(prometheus: str) -> None:
    rules = alert_exprs()
    assert {"FluidserveKVCacheNearCapacity", "FluidserveLoadUnstable", "FluidserveTTFTHigh",
            "FluidserveEvictionsRising", "FluidserveModelActorDown"} <= {name for name, _ in rules}
    for name, expr in rules:
        answer = query(prometheus, expr)
        assert answer.get("status") == "success", f"{name}: {answer.get('error')}"
    # Prometheus itself loaded and evaluated the same file without errors.
    loaded = http_json(f"{prometheus}/api/v1/rules")["data"]["groups"]
    health = {r["name"]: r["health"] for g in loaded for r in g["rules"]}
    assert set(health) == {name for name, _ in rules}
    deadline = time.monotonic() + 15  # rules are evaluated every second
    while any(h == "unknown" for h in health.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
        loaded = http_json(f"{prometheus}/api/v1/rules")["data"]["groups"]
        health = {r["name"]: r["health"] for g in loaded for r in g["rules"]}
    assert all(h == "ok" for h in health.values()), health


def test_healthy_synthetic_load_fires_no_alert(prometheus: str, metrics_target: MetricsTarget) -> None:
    """The feed runs at ρ = 0.7 with free KV and live actors: alert expressions select nothing."""
    if metrics_target.kind == "serve":
        pytest.skip("the Serve target runs a tiny KV cache near capacity on purpose (evictions)")
    for name, expr in alert_exprs():
        if name == "FluidserveEvictionsRising":
            continue  # the feed evicts on purpose, at a rate near the threshold
        result = query(prometheus, expr)["data"]["result"]
        assert result == [], f"{name} would fire: {result}"
