"""The chart's Triton monitoring against a real tritonserver (2.51, nvidia-pytriton's binary, CPU python
backend) and a real Prometheus: Triton's metric names the chart relies on exist, and the Triton rules and
dashboard queries return series. `vision serve --backend triton` sits in front, as in the production
values."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator

import grpc
import pytest
from chart_tools import Prometheus, dashboard, dashboard_exprs, of_kind, render, rules_file
from conftest import ServerProcess, classify_request, scrape
from test_chart import TRITON_METRICS
from test_prometheus import grafana_to_promql
from vision.v1 import classification_pb2_grpc

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="tritonserver binary is Linux-only"
)

MODEL = "efficientnet_lite0"
# Without a GPU Triton exports no GPU series (--allow-gpu-metrics=false here).
GPU_METRICS = {name for name in TRITON_METRICS if name.startswith(("nv_gpu_", "nv_energy_"))}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from vision.triton import TritonProcess, setup_runtime

    root = tmp_path_factory.mktemp("prometheus-triton")
    repository = root / "model_repository"
    repository.mkdir()
    export = subprocess.run(
        [
            sys.executable,
            "-m",
            "vision.cli",
            "export-triton",
            "--model",
            MODEL,
            "--repository",
            str(repository),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert export.returncode == 0, export.stderr
    triton = TritonProcess(repository, runtime=setup_runtime(), log_path=root / "triton.log").start()
    service = ServerProcess(
        ["--backend", "triton", "--triton-url", triton.grpc_address, "--services", "classification"],
        root / "serve.log",
    ).wait_ready()
    docs = render("production-gpu")
    prometheus = Prometheus(
        root,
        {
            "vision": urllib.parse.urlparse(service.metrics_url).netloc,
            "triton": urllib.parse.urlparse(triton.metrics_url).netloc,
        },
        rules_file(docs, root / "rules.yaml"),
    )
    yield {"triton": triton, "service": service, "prometheus": prometheus, "docs": docs}
    prometheus.stop()
    service.stop()
    triton.stop()


def classify(address: str, image: bytes, n: int) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = classification_pb2_grpc.ClassificationStub(channel)
        for _ in range(n):
            assert stub.Classify(classify_request(image), timeout=30).results[0].predictions


def test_triton_exports_the_documented_metrics_the_chart_uses(stack, photos):
    classify(stack["service"].address, photos["coffee.jpg"], 2)
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in scrape(stack["triton"].metrics_url).splitlines()
        if line and not line.startswith("#")
    }
    missing = TRITON_METRICS - GPU_METRICS - exported
    assert not missing, f"documented Triton metrics this tritonserver does not export: {missing}"


def test_triton_rules_and_panels_return_series(stack, photos):
    prom = stack["prometheus"]
    prom.wait_for('up{job="triton"} == 1')
    prom.wait_for('up{job="vision"} == 1')
    classify(stack["service"].address, photos["coffee.jpg"], 3)
    prom.wait_for(f'nv_inference_request_success{{model="{MODEL}"}}')
    classify(stack["service"].address, photos["chelsea.jpg"], 3)
    prom.wait_for(f'sum(rate(nv_inference_request_success{{model="{MODEL}"}}[1m])) > 0')
    time.sleep(2.5)

    (queue_ms,) = prom.wait_for("triton:queue_duration_ms:mean_rate5m", timeout=20)
    assert queue_ms["metric"]["model"] == MODEL and float(queue_ms["value"][1]) >= 0
    empty = []
    for title, expr in dashboard_exprs(dashboard(stack["docs"])):
        triton_cpu_side = ("nv_" in expr or "triton:" in expr) and not any(gpu in expr for gpu in GPU_METRICS)
        if triton_cpu_side and not prom.query(grafana_to_promql(expr)):
            empty.append((title, expr))
    assert not empty, f"Triton dashboard queries without series: {empty}"
    (rule,) = of_kind(stack["docs"], "PrometheusRule")
    assert "vision-platform.triton.rules" in {g["name"] for g in rule["spec"]["groups"]}
    for group in prom.api("rules")["groups"]:
        for r in group["rules"]:
            assert r["health"] == "ok", (r["name"], r.get("lastError"))
    # The services' model is the one Triton serves: backend label says so.
    (info,) = prom.wait_for('vision_model_info{job="vision"}')
    assert info["metric"]["backend"] == "triton"
