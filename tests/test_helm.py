"""The Helm chart in helm/fluidserve, rendered and linted by the real Helm engine (helm-python-sdk).

Each rendered RayService is checked against KubeRay's CRD schema (tests/data, KubeRay 1.7) and its
serveConfigV2 against Ray Serve's own ServeDeploySchema.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml

REPO = Path(__file__).parents[1]
CHART = REPO / "helm" / "fluidserve"
# The RayService v1 openAPIV3Schema of KubeRay 1.7 (the file says where it comes from).
CRD_SCHEMA = REPO / "tests" / "data" / "kuberay-1.7_rayservice_v1_openapi.yaml"
VALUES_FILES = sorted(CHART.glob("values-*.yaml"))
CASES = ["default"] + [p.name for p in VALUES_FILES]

# The serve config contract shared with deploy/configs/*.yaml and deploy/app.py.
APP_KEYS = {"name", "route_prefix", "import_path", "runtime_env", "args"}
ARGS_KEYS = {
    "model",
    "policy",
    "policy_args",
    "num_model_actors",
    "model_actor_resources",
    "gpu_memory_utilization",
    "enforce_eager",
    "kv_cache_tokens",
    "block_size",
    "max_num_seqs",
    "max_queue_len",
    "max_queue_wait_s",
    "max_queued_tokens",
    "stream_interval_s",
    "scheduler_graceful_shutdown_s",
    "dtype",
    "api_key_env",
    "ingress_replicas",
}
SECRET_ENV = {"HF_TOKEN", "FLUIDSERVE_API_KEY"}
MONITORING_COPIES = {
    "grafana/fluidserve.json": REPO / "monitoring" / "grafana" / "fluidserve.json",
    "prometheus/alerts.yml": REPO / "monitoring" / "prometheus" / "alerts.yml",
}
# Ray's own pydantic-v1-style Field arguments warn on import; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

ALL_MONITORING = {
    "monitoring": {
        "serviceMonitor": {"enabled": True},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
    }
}


def case_values(case: str) -> dict[str, Any] | None:
    """The user values of a test case: None for the chart defaults, else a values-*.yaml."""
    return None if case == "default" else yaml.safe_load((CHART / case).read_text())


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Render the chart offline as release 'demo' and return its Kubernetes objects."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name="demo", namespace="llm")
    return [
        doc
        for path, text in manifests.items()
        if path.endswith((".yaml", ".yml"))
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_templates(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]
    ]


def serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def closed(schema: Any) -> Any:
    """The schema with unknown fields rejected, as `kubectl apply --validate=strict` does.

    The API server would silently prune them, hiding a typo in the chart.
    """
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Draft7Validator:
    schema = yaml.safe_load(CRD_SCHEMA.read_text())
    return jsonschema.Draft7Validator(closed(schema))


@pytest.mark.parametrize("case", CASES)
def test_chart_lints_without_errors_or_warnings(case: str) -> None:
    report = helm.lint(CHART, case_values(case), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [] and report["errors"] == [], report


@pytest.mark.parametrize("case", CASES)
def test_rayservice_is_valid_against_the_kuberay_crd(
    case: str, crd_validator: jsonschema.Draft7Validator
) -> None:
    rayservice = one(render(case_values(case)), "RayService")
    assert rayservice["apiVersion"] == "ray.io/v1"
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in crd_validator.iter_errors(rayservice)
    ]
    assert errors == []


@pytest.mark.parametrize("case", CASES)
def test_serve_config_is_valid_for_ray_serve(case: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    config = serve_config(one(render(case_values(case)), "RayService"))
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert set(app) == APP_KEYS
    assert set(app["args"]) == ARGS_KEYS
    assert app["name"] == "fluidserve"
    assert app["import_path"] == "deploy.app:build_app"
    assert config["http_options"]["port"] == 8000


def test_serve_config_has_the_keys_of_deploy_configs() -> None:
    configs = sorted((REPO / "deploy" / "configs").glob("*.yaml"))
    if not configs:
        pytest.skip("no deploy/configs/*.yaml written yet to compare with")
    rendered = serve_config(one(render(), "RayService"))
    (app,) = rendered["applications"]
    for path in configs:
        theirs = yaml.safe_load(path.read_text())
        assert set(theirs) == set(rendered), path.name
        for their_app in theirs["applications"]:
            assert set(their_app) - {"deployments"} == APP_KEYS, path.name
            assert set(their_app["args"]) == set(app["args"]), path.name


def test_import_path_imports() -> None:
    if not (REPO / "deploy" / "app.py").is_file():
        pytest.skip("deploy/app.py (the Serve app builder, issue 4) is not written yet")
    module_name, attr = serve_config(one(render(), "RayService"))["applications"][0][
        "import_path"
    ].split(":")
    assert callable(getattr(importlib.import_module(module_name), attr))


def test_gpu_workers_get_one_model_actor_per_gpu() -> None:
    values = case_values("values-a100.yaml")
    rayservice = one(render(values), "RayService")
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    args = serve_config(rayservice)["applications"][0]["args"]
    assert args["num_model_actors"] == 4
    assert args["model_actor_resources"]["num_gpus"] == 1
    assert args["model"] == "meta-llama/Llama-2-7b-chat-hf"  # ships a chat template
    assert args["gpu_memory_utilization"] == 0.9 and args["enforce_eager"] is False


def test_cpu_trial_requests_no_gpu() -> None:
    rayservice = one(render(case_values("values-cpu.yaml")), "RayService")
    for template in pod_templates(rayservice):
        for container in template["spec"]["containers"]:
            for kind in ("requests", "limits"):
                assert "nvidia.com/gpu" not in container["resources"][kind]
        assert "tolerations" not in template["spec"]
    args = serve_config(rayservice)["applications"][0]["args"]
    assert args["num_model_actors"] == 1
    assert args["model_actor_resources"] == {"num_gpus": 0, "num_cpus": 2}
    assert args["model"] == "default"


@pytest.mark.parametrize("case", CASES)
def test_security_defaults(case: str) -> None:
    objects = render(case_values(case))
    assert all(o["kind"] != "Secret" for o in objects), "the chart must not carry secrets"
    rayservice = one(objects, "RayService")
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False
    for template in pod_templates(rayservice):
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), kind
            for env in container.get("env", []):
                if env["name"] in SECRET_ENV:
                    assert set(env) == {"name", "valueFrom"}
                    assert "secretKeyRef" in env["valueFrom"]
    service = one(objects, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    for port in service["spec"]["ports"]:
        assert port["port"] != 8265 and port["targetPort"] != "dashboard"


def test_secrets_come_from_secret_references() -> None:
    rayservice = one(render(case_values("values-a100.yaml")), "RayService")
    for template in pod_templates(rayservice):
        (container,) = template["spec"]["containers"]
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in container["env"]
            if e["name"] in SECRET_ENV
        }
        assert refs == {
            "HF_TOKEN": {"name": "hf-token", "key": "HF_TOKEN"},
            "FLUIDSERVE_API_KEY": {"name": "fluidserve-api-key", "key": "api-key"},
        }


def test_hub_token_reaches_every_replica_by_reference() -> None:
    """The A100 values pass HF_TOKEN to the app's runtime_env as "${HF_TOKEN}", which Ray
    expands from each pod's env (the Secret): ingress, scheduler and, by inheritance, the
    model actors get it, and the token never enters the Serve config."""
    rayservice = one(render(case_values("values-a100.yaml")), "RayService")
    (app,) = serve_config(rayservice)["applications"]
    assert app["runtime_env"] == {"env_vars": {"HF_TOKEN": "${HF_TOKEN}"}}
    (default_app,) = serve_config(one(render(), "RayService"))["applications"]
    assert default_app["runtime_env"] == {}  # no hub token secret: nothing to pass


def test_deploy_configs_build_app_args_and_pass_the_hub_token() -> None:
    from deploy.app import AppArgs

    for path in sorted((REPO / "deploy" / "configs").glob("*.yaml")):
        (app,) = yaml.safe_load(path.read_text())["applications"]
        args = AppArgs.from_dict(app["args"])
        assert 0 < args.gpu_memory_utilization <= 1 and args.kv_cache_memory_fraction is None
    (a100,) = yaml.safe_load((REPO / "deploy" / "configs" / "llama2-7b-4xa100.yaml")
                             .read_text())["applications"]
    assert a100["runtime_env"]["env_vars"] == {"HF_TOKEN": "${HF_TOKEN}"}
    assert a100["args"]["model"] == "meta-llama/Llama-2-7b-chat-hf"
    # The old name is still accepted (the model actor warns and uses it as the new one).
    assert AppArgs.from_dict({"kv_cache_memory_fraction": 0.8}).kv_cache_memory_fraction == 0.8


def test_service_reaches_the_serve_proxies() -> None:
    objects = render()
    service = one(objects, "Service")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["http"]["port"] == 8000 and ports["http"]["targetPort"] == "serve"
    selector = dict(service["spec"]["selector"])
    assert selector.pop("ray.io/serve") == "true"  # KubeRay marks pods with a healthy proxy
    for template in pod_templates(one(objects, "RayService")):
        assert selector.items() <= template["metadata"]["labels"].items()
        (container,) = template["spec"]["containers"]
        assert {"name": "serve", "containerPort": 8000} in container["ports"]


BAD_VALUES = [
    ({"workers": {"replicas": -1}}, "at '/workers/replicas': minimum: got -1, want 1"),
    (
        {"policy": {"name": "fifo"}},
        "at '/policy/name': value must be one of 'nested-wait', 'wait', 'vllm', 'vllm-v1', 'sarathi'",
    ),
    ({"workers": {"gpus": -2}}, "/workers/gpus"),
    ({"kvCache": {"gpuMemoryUtilization": 1.5}}, "/kvCache/gpuMemoryUtilization"),
    ({"model": {"id": "x", "enforceEager": "yes"}}, "/model/enforceEager"),
    ({"workers": {"replicaz": 2}}, "replicaz"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES, ids=[str(v) for v, _ in BAD_VALUES])
def test_values_schema_rejects_wrong_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as raised:
        render(values)
    assert message in str(raised.value)
    report = helm.lint(CHART, values)
    assert any(message in e for e in report["errors"]), report


def test_ingress_autoscaling_overrides_the_ingress_deployment() -> None:
    from ray.serve.schema import ServeDeploySchema

    values = {"ingress": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6}}}
    config = serve_config(one(render(values), "RayService"))
    ServeDeploySchema.model_validate(config)
    (deployment,) = config["applications"][0]["deployments"]
    assert deployment["num_replicas"] == "auto"
    assert deployment["autoscaling_config"]["min_replicas"] == 2
    assert deployment["autoscaling_config"]["max_replicas"] == 6


@pytest.mark.parametrize("copy", sorted(MONITORING_COPIES))
def test_monitoring_copies_match_the_originals(copy: str) -> None:
    original = MONITORING_COPIES[copy]
    if not original.is_file():
        pytest.skip(f"{original.relative_to(REPO)} is not written yet (issue 5)")
    assert (CHART / "files" / copy).read_bytes() == original.read_bytes(), (
        f"helm/fluidserve/files/{copy} differs from {original.relative_to(REPO)}: "
        "run helm/sync-monitoring.sh"
    )


def test_monitoring_objects_carry_the_dashboard_and_alert_rules() -> None:
    objects = render(ALL_MONITORING)
    files = CHART / "files"
    rule = one(objects, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((files / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"]
    dashboard = one(objects, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["fluidserve.json"]) == json.loads(
        (files / "grafana" / "fluidserve.json").read_text()
    )
    monitor = one(objects, "ServiceMonitor")
    assert {"port": "http", "path": "/metrics"}.items() <= monitor["spec"]["endpoints"][0].items()
    assert (
        monitor["spec"]["selector"]["matchLabels"].items()
        <= one(objects, "Service")["metadata"]["labels"].items()
    )
    pod_monitor = one(objects, "PodMonitor")
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "serve"


def test_monitoring_objects_are_off_by_default_except_the_dashboard() -> None:
    kinds = {o["kind"] for o in render()}
    assert kinds == {"RayService", "Service", "ConfigMap"}
