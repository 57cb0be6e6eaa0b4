"""charts/vision-platform with the real Helm: lint, render per values file, Kubernetes schema validation of
every rendered object (kubernetes-validate; the Prometheus Operator CRDs against their own openAPIV3Schema),
and the properties that matter checked on the rendered YAML."""

from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path

import jsonschema
import yaml
import pytest
from chart_tools import (
    CHART,
    NAMESPACE,
    RELEASE,
    ROOT,
    VALUES,
    dashboard,
    dashboard_exprs,
    helm,
    of_kind,
    render,
)

WORKLOADS = ("Deployment", "StatefulSet")
CRD_SCHEMAS = ROOT / "charts" / "crd-schemas"
# Kubernetes versions validated against: the chart's minimum (Chart.yaml kubeVersion) and
# kubernetes-validate's newest.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")

# Triton's documented Prometheus metrics (server docs, user_guide/metrics.md, 24.x / 2.4x-2.5x): the names
# the chart's alerts and dashboard may use besides our own. The CPU-side ones were also seen on the real
# tritonserver 2.51 here (tests/test_prometheus_triton.py); GPU ones need a GPU.
TRITON_METRICS = {
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
    "nv_inference_pending_request_count",
    "nv_gpu_utilization",
    "nv_gpu_memory_total_bytes",
    "nv_gpu_memory_used_bytes",
    "nv_gpu_power_usage",
    "nv_gpu_power_limit",
    "nv_energy_consumption",
    "nv_cpu_utilization",
    "nv_cpu_memory_total_bytes",
    "nv_cpu_memory_used_bytes",
    "nv_pinned_memory_pool_total_bytes",
    "nv_pinned_memory_pool_used_bytes",
}
# Flower 2.x's metrics (flower/events.py), used by the job alerts and panels until the workers export
# their own.
FLOWER_METRICS = {
    "flower_events_total",
    "flower_task_runtime_seconds",
    "flower_task_prefetch_time_seconds",
    "flower_worker_prefetched_tasks",
    "flower_worker_online",
    "flower_worker_number_of_currently_executing_tasks",
}
# Set by Prometheus itself for every target.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj)
    return [*spec.get("initContainers", []), *spec["containers"]]


def component(obj: dict) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------------------------------------- helm itself


@pytest.mark.parametrize("values", VALUES)
def test_helm_lint_strict(values):
    result = helm("lint", str(CHART), "--strict", "--namespace", NAMESPACE, *VALUES[values])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", VALUES)
def test_helm_template_renders(values):
    kinds = {d["kind"] for d in render(values)}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount"} <= kinds


def test_values_schema_rejects_typos_and_incomplete_services():
    typo = helm("template", RELEASE, str(CHART), "--set", "settings.maxBatchSze=8")
    assert typo.returncode != 0 and "maxBatchSze" in typo.stderr
    no_switch = helm("template", RELEASE, str(CHART), "--set", "services.ocr.grpcService=vision.v1.Ocr")
    assert no_switch.returncode != 0 and "enabled" in no_switch.stderr
    bad_name = helm("template", RELEASE, str(CHART), "--set", "services.tagging.grpcService=tagging")
    assert bad_name.returncode != 0 and "grpcService" in bad_name.stderr


# ------------------------------------------------------------------------------------ schema validation


def _strict(schema: dict) -> dict:
    """A CRD's structural schema made strict: unknown fields rejected (the API server's strict field
    validation), except where the schema preserves unknown fields."""
    schema = copy.deepcopy(schema)

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def _crd_validator(schema: dict) -> jsonschema.protocols.Validator:
    # No metaschema check: CRD patterns are Go regular expressions (e.g. a mid-pattern "(?i)"), which
    # Python's re rejects as schema "format"; the patterns of fields the chart sets compile in both.
    return jsonschema.Draft7Validator(_strict(schema))


def _crd_schema(kind: str, api_version: str) -> dict | None:
    if "/" not in api_version:
        return None
    group, version = api_version.split("/")
    path = CRD_SCHEMAS / f"{kind.lower()}-{group.split('.')[0]}-{version}.json"
    return json.loads(path.read_text()) if path.is_file() else None


@pytest.mark.parametrize("values", VALUES)
def test_every_rendered_object_validates_against_its_schema(values):
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    unvalidated = []
    for doc in render(values):
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        crd = _crd_schema(doc["kind"], doc["apiVersion"])
        if crd is not None:
            try:
                _crd_validator(crd).validate(doc)
            except jsonschema.ValidationError as exc:
                pytest.fail(
                    f"{name} does not validate against its CRD schema: {exc.json_path}: {exc.message}"
                )
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except SchemaNotFoundError:
                unvalidated.append(name)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(
                    f"{name} is invalid for Kubernetes {version}: "
                    f"{'.'.join(map(str, exc.path))}: {exc.message}"
                )
    # Every kind the chart renders has a schema: none is skipped.
    assert not unvalidated, f"no schema for {sorted(set(unvalidated))}"


def test_crd_validation_catches_a_misspelt_field():
    (monitor, *_) = of_kind(render("all-on"), "ServiceMonitor")
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["honourLabels"] = True
    validator = _crd_validator(_crd_schema("ServiceMonitor", broken["apiVersion"]))
    validator.validate(monitor)
    with pytest.raises(jsonschema.ValidationError, match="honourLabels"):
        validator.validate(broken)


# -------------------------------------------------------------------------------------------- GPUs


@pytest.mark.parametrize("values", VALUES)
def test_gpu_limits_only_on_triton_and_train_workers(values):
    with_gpu = set()
    for obj in render(values):
        if obj["kind"] not in WORKLOADS:
            continue
        for c in containers(obj):
            res = c.get("resources", {})
            if any("nvidia.com/gpu" in res.get(k, {}) for k in ("limits", "requests")):
                assert int(res["limits"]["nvidia.com/gpu"]) >= 1
                with_gpu.add(component(obj))
    assert with_gpu <= {"triton", "worker-train"}, with_gpu
    expected = {
        "defaults": set(),
        "dev-cpu": set(),
        "production-gpu": {"triton"},
        "all-on": {"triton", "worker-train"},
    }
    assert with_gpu == expected[values]


def test_gpu_pods_are_scheduled_on_gpu_nodes():
    for obj in of_kind(render("all-on"), "Deployment"):
        if component(obj) in ("triton", "worker-train"):
            spec = pod_spec(obj)
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])


# ------------------------------------------------------------------------------- services and probes


def service_deployments(docs):
    return [
        d
        for d in of_kind(docs, "Deployment")
        if d["metadata"]["labels"].get("vision-platform/role") == "service"
    ]


@pytest.mark.parametrize("values", VALUES)
def test_each_service_deployment_serves_and_probes_its_own_service(values):
    docs = render(values)
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    deployments = service_deployments(docs)
    assert {component(d) for d in deployments} >= {"classification", "tagging"}
    for dep in deployments:
        name = component(dep)
        (container,) = pod_spec(dep)["containers"]
        args = container["args"]
        assert args[:1] == ["serve"]
        assert args[args.index("--services") + 1] == name, args
        svc = services[dep["metadata"]["name"]]
        grpc_name = svc["metadata"]["annotations"]["vision-platform/grpc-service"]
        assert grpc_name.startswith("vision.v1.") and grpc_name.lower().endswith(name)
        grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if "VISION_TLS_CERT" in env:
            # kubelet's gRPC probes cannot present certificates: they ask the plaintext health-only port.
            probe_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "health")
            assert env["VISION_HEALTH_PORT"] == str(probe_port) and probe_port != grpc_port
        else:
            probe_port = grpc_port
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["grpc"] == {"port": probe_port, "service": grpc_name}, (name, probe)
        # Liveness: the process, not its models (vision.runners.hosting.LIVENESS).
        assert container["livenessProbe"]["grpc"] == {"port": probe_port, "service": "vision.liveness"}
        (svc_port,) = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
        assert svc_port["targetPort"] == "grpc" and svc_port["appProtocol"] == "grpc"
        assert matches(svc["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])


def test_adding_a_service_is_one_values_entry():
    docs = render(
        "defaults", "--set", "services.ocr.enabled=true", "--set", "services.ocr.grpcService=vision.v1.Ocr"
    )
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"):
        assert (kind, f"{RELEASE}-vision-platform-ocr") in names
    (dep,) = [d for d in service_deployments(docs) if component(d) == "ocr"]
    container = pod_spec(dep)["containers"][0]
    assert container["args"] == ["serve", "--services", "ocr"]
    assert container["readinessProbe"]["grpc"]["service"] == "vision.v1.Ocr"


def test_services_get_settings_that_vision_serve_accepts(monkeypatch):
    """The rendered env and args parse as ServeSettings (the real validation `vision serve` runs)."""
    from vision.config.settings import SERVICE_NAMES, ServeSettings

    # Keys the chart sets for parts whose settings arrive with the jobs issue.
    pending = {"VISION_REDIS_URL"}
    for values in VALUES:
        docs = render(values)
        (settings,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-settings")]
        env = {k: v for k, v in settings["data"].items() if k.startswith("VISION_") and k not in pending}
        for key in env:
            assert key[len("VISION_") :].lower() in ServeSettings.model_fields, (
                f"{values}: {key} is no vision serve setting"
            )
        for dep in service_deployments(docs):
            services = pod_spec(dep)["containers"][0]["args"][2]
            if services not in SERVICE_NAMES:
                continue  # a service this checkout cannot host yet (e.g. jobs)
            with monkeypatch.context() as m:
                for key in [k for k in os.environ if k.startswith("VISION_")]:
                    m.delenv(key)
                for key, value in env.items():
                    m.setenv(key, value)
                parsed = ServeSettings(services=services)
            assert parsed.host == "0.0.0.0" and parsed.port == 50051 and parsed.services == [services]


def test_values_schema_settings_are_vision_serve_settings():
    """Every setting values.schema.json accepts is a real `vision serve` setting. (The schema rejects unknown
    keys, so a misspelt setting fails `helm install`; a new setting is one schema line, or extraEnv.)"""
    from vision.config.settings import ServeSettings

    schema = json.loads((CHART / "values.schema.json").read_text())
    in_schema = {re.sub(r"(?<!^)([A-Z])", r"_\1", k).lower() for k in schema["properties"]["settings"]["properties"]}
    fields = set(ServeSettings.model_fields)
    assert in_schema <= fields, f"values.schema.json names settings vision serve lacks: {in_schema - fields}"
    assert {"backend", "max_batch_size", "max_queue_images", "threads", "decode_workers", "triton_timeout_s"} <= in_schema


@pytest.mark.parametrize(
    "limit, expected", [("2", 2), ("1500m", 2), ("500m", 1), ("4", 4), ("250m", 1), (None, "node")]
)
def test_threads_annotation_matches_the_servers_cgroup_rule(limit, expected):
    """The chart documents the thread count of a replica; vision.core.cpus derives it from the same quota."""
    from vision.core.cpus import _clamp

    flags = (
        ["--set", f"serviceDefaults.resources.limits.cpu={limit}"]
        if limit
        else ["--set", "serviceDefaults.resources.limits.cpu=null"]
    )
    (dep, *_) = service_deployments(render("defaults", *flags))
    annotated = dep["spec"]["template"]["metadata"]["annotations"]["vision-platform/threads"]
    if limit is None:
        assert annotated == "node"
        return
    cpus = float(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)
    assert int(annotated) == _clamp(affinity=64, limit=cpus) == expected == max(1, math.ceil(cpus))


# ------------------------------------------------------------------------------------------- security


@pytest.mark.parametrize("values", VALUES)
def test_no_container_runs_as_root(values):
    for obj in render(values):
        if obj["kind"] not in WORKLOADS:
            continue
        pod = pod_spec(obj).get("securityContext", {})
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", obj["metadata"]["name"]
        for c in containers(obj):
            sc = {**pod, **c.get("securityContext", {})}
            where = f"{obj['metadata']['name']}/{c['name']}"
            assert sc.get("runAsNonRoot") is True, where
            assert sc.get("runAsUser", 0) != 0 and sc.get("runAsGroup", 0) != 0, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("privileged"), where
        assert pod_spec(obj).get("automountServiceAccountToken") is False


@pytest.mark.parametrize("values", VALUES)
def test_every_workload_has_resources(values):
    for obj in render(values):
        if obj["kind"] in WORKLOADS:
            for c in containers(obj):
                assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"][
                    "limits"
                ], c["name"]


# --------------------------------------------------------------------------------- wiring and selectors


@pytest.mark.parametrize("values", VALUES)
def test_ports_are_named_and_selectors_match_pod_labels(values):
    docs = render(values)
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    pod_labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in workloads}
    for obj in workloads:
        assert matches(obj["spec"]["selector"]["matchLabels"], pod_labels[obj["metadata"]["name"]])
        for c in containers(obj):
            for port in c.get("ports", []):
                assert port.get("name"), f"{obj['metadata']['name']}/{c['name']} has an unnamed port"
    for svc in of_kind(docs, "Service"):
        selected = [
            w for w in workloads if matches(svc["spec"]["selector"], pod_labels[w["metadata"]["name"]])
        ]
        assert len(selected) == 1, f"Service {svc['metadata']['name']} selects {len(selected)} workloads"
        port_names = {p["name"] for c in pod_spec(selected[0])["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port.get("name") and port.get("appProtocol"), svc["metadata"]["name"]
            assert port["targetPort"] in port_names, (
                f"{svc['metadata']['name']}: targetPort {port['targetPort']}"
            )
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for obj in of_kind(docs, kind):
            selector = obj["spec"]["selector" if kind == "PodDisruptionBudget" else "podSelector"][
                "matchLabels"
            ]
            assert any(matches(selector, labels) for labels in pod_labels.values()), obj["metadata"]["name"]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        assert ("Deployment", hpa["spec"]["scaleTargetRef"]["name"]) in names
        assert (
            "replicas"
            not in next(
                d for d in workloads if d["metadata"]["name"] == hpa["spec"]["scaleTargetRef"]["name"]
            )["spec"]
        )
    for monitor in of_kind(docs, "ServiceMonitor"):
        targets = [
            s
            for s in of_kind(docs, "Service")
            if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert targets, monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["endpoints"]:
            assert all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in targets)
    for monitor in of_kind(docs, "PodMonitor"):
        pods = [
            w
            for w in workloads
            if matches(monitor["spec"]["selector"]["matchLabels"], pod_labels[w["metadata"]["name"]])
        ]
        assert pods, monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert all(
                endpoint["port"] in {p["name"] for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
                for w in pods
            )


def test_triton_runs_in_explicit_model_control_mode_on_the_model_store():
    docs = render("production-gpu")
    (triton,) = [d for d in of_kind(docs, "Deployment") if component(d) == "triton"]
    server = next(c for c in pod_spec(triton)["containers"] if c["name"] == "tritonserver")
    assert (
        "--model-control-mode=explicit" in server["args"] and "--model-repository=/models" in server["args"]
    )
    assert {"name": "model-store", "mountPath": "/models", "readOnly": True} in server["volumeMounts"]
    (settings,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-settings")]
    assert settings["data"]["VISION_BACKEND"] == "triton"
    assert settings["data"]["VISION_TRITON_URL"] == f"{RELEASE}-vision-platform-triton:8001"
    for dep in service_deployments(docs):
        assert pod_spec(dep)["containers"][0]["image"].endswith(
            "-slim"
        )  # no torch where Triton runs the model


def test_flower_listens_where_the_workers_send_events():
    """Flower in the stock image, configured with the workers' key prefix and event exchange (vision.jobs.app):
    a plain `celery --broker=URL flower` would see no worker and no job."""
    import runpy

    from vision.config.jobs import JobsConfig

    docs = render("all-on")
    (flower,) = [d for d in of_kind(docs, "Deployment") if component(d) == "flower"]
    container = pod_spec(flower)["containers"][0]
    assert "--config=vision_flower" in container["args"]
    assert {"name": "PYTHONPATH", "value": "/etc/vision-flower"} in container["env"]
    (config,) = [c for c in of_kind(docs, "ConfigMap") if "vision_flower.py" in c.get("data", {})]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/vision-flower")
    volume = next(v for v in pod_spec(flower)["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == config["metadata"]["name"]
    module = Path(os.environ.get("TMPDIR", "/tmp")) / f"vision_flower_{os.getpid()}.py"
    module.write_text(config["data"]["vision_flower.py"])
    try:
        celery_conf = runpy.run_path(str(module))
    finally:
        module.unlink()
    jobs = JobsConfig()  # the chart sets no VISION_JOBS_NAMESPACE: the workers use the default namespace
    assert celery_conf["broker_transport_options"] == {"global_keyprefix": jobs.key_prefix}
    assert celery_conf["event_exchange"] == f"{jobs.namespace}.celeryev"
    assert celery_conf["control_exchange"] == f"{jobs.namespace}.celery"


def test_dev_cpu_runs_onnxruntime_without_triton_or_autoscaling():
    docs = render("dev-cpu")
    assert not [d for d in of_kind(docs, "Deployment") if component(d) == "triton"]
    assert not of_kind(docs, "HorizontalPodAutoscaler") and not of_kind(docs, "PodDisruptionBudget")
    (settings,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-settings")]
    assert settings["data"]["VISION_BACKEND"] == "onnxruntime" and "VISION_TRITON_URL" not in settings["data"]


# ------------------------------------------------------------------------------------------- metrics


PROMQL_WORDS = {
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (strings, label matchers, ranges, grouping lists removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group()
        if word.lower() in PROMQL_WORDS or re.match(r"\s*\(", text[m.end() :]):
            continue
        if text[m.start() - 1 : m.start()].isdigit() or text[m.start() - 1 : m.start()] == ".":
            continue  # exponent or unit of a number, e.g. 1e3
        names.add(word)
    return names


def exported_metric_names() -> set[str]:
    """Every sample name the serving process exports: vision.core.metrics plus prometheus_client's collectors."""
    import prometheus_client
    import vision.core.metrics  # noqa: F401 - registers the metrics in the default registry

    names = set()
    for family in prometheus_client.REGISTRY.collect():
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count"],
            "summary": ["_sum", "_count", ""],
            "gauge": [""],
            "info": ["_info"],
        }.get(family.type, [""])
        names.update(family.name + s for s in suffixes)
    return names


def test_metric_name_extraction():
    assert metric_names(
        'histogram_quantile(0.99, sum by (le, service) (rate(a_bucket{x="y"}[5m]))) > 1e3'
    ) == {"a_bucket"}
    assert metric_names("x:y:z < on (namespace, model) group_left () b") == {"x:y:z", "b"}
    assert metric_names('absent(up{job="a"} == 1)') == {"up"}


def test_every_metric_in_alerts_and_dashboards_exists():
    docs = render("all-on")
    (rule,) = of_kind(docs, "PrometheusRule")
    rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    recorded = {r["record"] for r in rules if "record" in r}
    known = exported_metric_names() | TRITON_METRICS | FLOWER_METRICS | PROMETHEUS_SYNTHETIC | recorded
    used = {}
    for r in rules:
        for name in metric_names(r["expr"]):
            used.setdefault(name, []).append(r.get("alert") or r.get("record"))
    for title, expr in dashboard_exprs(dashboard(docs)):
        for name in metric_names(expr):
            used.setdefault(name, []).append(f"panel {title!r}")
    unknown = {name: where for name, where in used.items() if name not in known}
    assert not unknown, f"metrics that neither vision.core.metrics nor Triton/Flower export: {unknown}"
    # The dashboard covers what the issue asks for.
    assert {
        "vision_requests_total",
        "vision_request_duration_seconds_bucket",
        "vision_inference_batch_size_bucket",
        "vision_stage_duration_seconds_sum",
        "vision_model_info",
        "nv_gpu_utilization",
        "flower_events_total",
    } <= set(used)


def test_alerts_cover_the_issue_list():
    (rule,) = of_kind(render("all-on"), "PrometheusRule")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {
        "VisionHighErrorRatio",
        "VisionHighLatencyP99",
        "VisionInferenceQueueSaturated",
        "TritonQueueTimeHigh",
        "VisionJobFailures",
        "VisionWorkerAbsent",
        "VisionModelVersionMismatch",
    }
    (defaults_rule,) = of_kind(render("production-gpu"), "PrometheusRule")
    assert all("flower" not in r["expr"] for g in defaults_rule["spec"]["groups"] for r in g["rules"])


def test_monitoring_resources_only_behind_the_switch():
    for values in ("defaults", "dev-cpu"):
        kinds = {d["kind"] for d in render(values)}
        assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
        assert not [
            d for d in of_kind(render(values), "ConfigMap") if "vision-platform.json" in d.get("data", {})
        ]


def test_memory_and_threads_are_documented_in_the_chart():
    values = (CHART / "values.yaml").read_text()
    assert "services/vision/core/cpus.py" in values and "RSS" in values and "limits.cpu" in values
    notes = Path(CHART / "templates" / "NOTES.txt").read_text()
    assert "threads per replica" in notes


def test_the_ray_service_mode_renders_only_when_switched_on():
    """ray.enabled: a KubeRay RayService whose Serve application hosts the listed services, non-root."""
    assert not of_kind(render("defaults"), "RayService")
    (ray,) = of_kind(render("defaults", "--set", "ray.enabled=true", "--set", "ray.services={classification,features}"), "RayService")
    config = yaml.safe_load(ray["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == "vision.runners.ray.app:build_app"
    assert app["args"]["settings"]["services"] == ["classification", "features"]
    groups = [ray["spec"]["rayClusterConfig"]["headGroupSpec"], *ray["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            assert container["securityContext"]["runAsNonRoot"] is True


# --------------------------------------------------------------------------------------
# Security: TLS, tokens, the allow-list, network policies
# --------------------------------------------------------------------------------------


def _container(docs: tuple[dict, ...], name: str) -> dict:
    (dep,) = [d for d in service_deployments(docs) if component(d) == name]
    (container,) = pod_spec(dep)["containers"]
    return container


def test_tls_and_authorization_render_as_settings_vision_serve_accepts(monkeypatch):
    """The security env of the Jobs pod (all-on: cert-manager TLS, mutual, tokens, allow-list) parses as
    ServeSettings, names files inside the mounted Secrets, and the Certificate covers every Service."""
    from vision.config.settings import ServeSettings

    docs = render("all-on")
    jobs = _container(docs, "jobs")
    env = {e["name"]: e["value"] for e in jobs["env"] if e["name"].startswith("VISION_")}
    mounts = {m["name"]: m["mountPath"] for m in jobs["volumeMounts"]}
    for key in ("VISION_TLS_CERT", "VISION_TLS_KEY", "VISION_TLS_CLIENT_CA"):
        assert env[key].startswith(mounts["tls"] + "/")
    assert env["VISION_AUTH_TOKENS"] == mounts["tokens"] and env["VISION_AUTH_ALLOW"] == "ci-submitter"
    with monkeypatch.context() as m:
        for key in [k for k in os.environ if k.startswith("VISION_")]:
            m.delenv(key)
        for key, value in env.items():
            m.setenv(key, value)
        parsed = ServeSettings(services=["jobs"], host="0.0.0.0")
    assert parsed.auth_allow == ["ci-submitter"] and parsed.health_port == 50052
    assert str(parsed.tls_client_ca) == "/etc/vision/tls/ca.crt"
    (cert,) = of_kind(docs, "Certificate")
    volumes = {v["name"]: v for v in pod_spec([d for d in service_deployments(docs) if component(d) == "jobs"][0])["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == cert["spec"]["secretName"]
    assert "subPath" not in str(jobs["volumeMounts"]), "kubelet never updates subPath mounts: rotation would stall"
    names = set(cert["spec"]["dnsNames"])
    for svc in of_kind(docs, "Service"):
        if svc["metadata"].get("labels", {}).get("vision-platform/role") == "service":
            assert f"{svc['metadata']['name']}.{NAMESPACE}.svc" in names


def test_a_jobs_service_nobody_may_drive_does_not_render():
    result = helm("template", RELEASE, str(CHART), "-f", str(CHART / "ci" / "all-on-values.yaml"),
                  "--set", "security.auth.tokensSecret=", "--set", "security.auth.allow=null")
    assert result.returncode != 0 and "services.jobs changes state" in result.stderr
    result = helm("template", RELEASE, str(CHART), "--set", "security.tls.enabled=true")
    assert result.returncode != 0 and "security.tls.secretName" in result.stderr


@pytest.mark.parametrize("values", VALUES)
def test_no_network_policy_rule_admits_everyone(values):
    """An ingress rule without `from` admits every source: each rule names its peers, and Redis and MLflow
    admit only the release's pods that use them."""
    docs = render(values)
    for policy in of_kind(docs, "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule with no peers admits everyone"
    by_name = {p["metadata"]["name"].removeprefix(f"{RELEASE}-vision-platform-"): p for p in of_kind(docs, "NetworkPolicy")}
    if "redis" in by_name:
        (peer,) = by_name["redis"]["spec"]["ingress"][0]["from"]
        (expr,) = peer["podSelector"]["matchExpressions"]
        assert expr["key"] == "app.kubernetes.io/component" and "jobs" in expr["values"]
        assert not {"classification", "tagging", "mlflow"} & set(expr["values"])


def test_tracing_reaches_every_role_as_the_standard_variables_and_triton_continues_the_traces():
    """Off by default; with an endpoint, the settings ConfigMap (read by every service and worker container) carries OTEL_* values that vision's own check accepts, and Triton runs in its OpenTelemetry
    mode against the collector's HTTP receiver."""
    from vision.core import tracing

    def settings_of(docs: tuple[dict, ...]) -> dict:
        (settings,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-settings")]
        return settings["data"]

    assert not any(k.startswith("OTEL_") for k in settings_of(render("production-gpu")))
    docs = render("all-on")
    env = {k: v for k, v in settings_of(docs).items() if k.startswith("OTEL_")}
    config = tracing.config_from_env(env, "vision-worker")
    assert config is not None and config.endpoint == "http://otel-collector.monitoring:4317"
    assert (config.protocol, config.sampler, config.sampler_arg) == ("grpc", "parentbased_traceidratio", 0.05)
    roles = [d for d in of_kind(docs, "Deployment") if d["metadata"]["labels"].get("vision-platform/role") in ("service", "worker")]
    assert {d["metadata"]["labels"]["vision-platform/role"] for d in roles} == {"service", "worker"}
    for workload in roles:
        for c in pod_spec(workload)["containers"]:
            assert any(ref.get("configMapRef", {}).get("name", "").endswith("-settings") for ref in c.get("envFrom", [])), c["name"]
    (triton,) = [d for d in of_kind(docs, "Deployment") if component(d) == "triton"]
    server = next(c for c in pod_spec(triton)["containers"] if c["name"] == "tritonserver")
    assert "--trace-config=mode=opentelemetry" in server["args"] and "--trace-config=rate=0" in server["args"]
    assert "--trace-config=opentelemetry,url=http://otel-collector.monitoring:4318/v1/traces" in server["args"]
    # Triton speaks OTLP/HTTP only: an endpoint without its URL is refused at render time, with the reason.
    failed = helm("template", RELEASE, str(CHART), *VALUES["all-on"], "--set", "tracing.triton.url=")
    assert failed.returncode != 0 and "Triton exports OTLP/HTTP only" in failed.stderr
    failed = helm("template", RELEASE, str(CHART), *VALUES["all-on"], "--set", "tracing.sampler=sometimes")
    assert failed.returncode != 0 and "/tracing/sampler" in failed.stderr
