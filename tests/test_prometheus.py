"""The chart's monitoring against a real Prometheus (Debian's 2.42 binary) and promtool.

- `promtool check rules` on the rules the chart renders, and `promtool test rules` unit tests of the
  error-ratio, latency and version-mismatch alerts (charts/vision-platform/ci/promtool/alerts-test.yaml).
- A Prometheus started here scrapes the session's running `vision serve` and evaluates the chart's rules;
  every recording rule and every dashboard query then returns series, and every rule evaluates cleanly.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator

import grpc
import pytest
import yaml
from chart_tools import (
    CHART,
    VALUES,
    Prometheus,
    dashboard,
    dashboard_exprs,
    of_kind,
    render,
    rules_file,
    tool,
)
from conftest import ServerProcess, classify_request
from vision.v1 import common_pb2, tagging_pb2, tagging_pb2_grpc

PROMTOOL_TESTS = CHART / "ci" / "promtool" / "alerts-test.yaml"
# Queries whose metrics a lone `vision serve` cannot have: Triton's (tests/test_prometheus_triton.py scrapes
# a real Triton), Flower's (jobs), and backend errors (a counter with no series until a forward pass fails).
NOT_FROM_A_LONE_SERVER = ("nv_", "triton:", "flower_", "celery:", "vision_backend_errors_total")


@pytest.mark.parametrize("values", [v for v in VALUES if v in ("production-gpu", "all-on")])
def test_promtool_check_rules(values, tmp_path):
    rules = rules_file(render(values), tmp_path / "rules.yaml")
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_of_the_alerts(tmp_path):
    rules_file(render("all-on"), tmp_path / "rules.yaml")
    shutil.copy(PROMTOOL_TESTS, tmp_path / PROMTOOL_TESTS.name)
    result = subprocess.run(
        [tool("promtool"), "test", "rules", PROMTOOL_TESTS.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Grafana sends it: variables substituted (all namespaces, a 1 m rate window)."""
    return expr.replace("$__rate_interval", "1m").replace("$namespace", ".*")


def send_traffic(address: str, photos: dict[str, bytes]) -> None:
    """Real RPCs of both services, including a client error (a counter series of another code)."""
    from vision.v1 import classification_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        classifier = classification_pb2_grpc.ClassificationStub(channel)
        tagger = tagging_pb2_grpc.TaggingStub(channel)
        for _ in range(3):
            classifier.Classify(classify_request(photos["coffee.jpg"], photos["chelsea.png"]), timeout=30)
            tagger.Tag(
                tagging_pb2.TagRequest(images=[common_pb2.Image(id="c", content=photos["chelsea.jpg"])]),
                timeout=30,
            )
        with pytest.raises(grpc.RpcError):
            classifier.Classify(classify_request(b"not an image"), timeout=30)


@pytest.fixture(scope="module")
def prometheus(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    root = tmp_path_factory.mktemp("prometheus")
    metrics = urllib.parse.urlparse(server.metrics_url)
    prom = Prometheus(root, {"vision": metrics.netloc}, rules_file(render("all-on"), root / "rules.yaml"))
    yield prom
    prom.stop()


def test_prometheus_scrapes_vision_serve_and_the_charts_queries_return_series(prometheus, server, photos):
    up = prometheus.wait_for('up{job="vision"} == 1')
    assert up[0]["value"][1] == "1"
    # Traffic, a scrape that sees its series, more traffic: rates see an increase (a series' first sample
    # is not one), then two more scrapes and rule evaluations.
    send_traffic(server.address, photos)
    prometheus.wait_for('vision_requests_total{code="INVALID_ARGUMENT"}')
    send_traffic(server.address, photos)
    prometheus.wait_for('sum(rate(vision_requests_total{code="INVALID_ARGUMENT"}[1m])) > 0')
    time.sleep(2.5)

    (rule,) = of_kind(render("all-on"), "PrometheusRule")
    recorded = [r["record"] for g in rule["spec"]["groups"] for r in g["rules"] if "record" in r]
    for name in recorded:
        if name.startswith(NOT_FROM_A_LONE_SERVER):
            continue
        result = prometheus.wait_for(name, timeout=20)
        if name == "vision:request_errors:ratio_rate5m":
            ratios = {r["metric"]["service"]: float(r["value"][1]) for r in result}
            # Client errors don't count. (Services the session's other tests called earlier, but nothing
            # called in the last 5 minutes, have 0/0 = NaN: no alert, as for an idle service.)
            assert ratios["vision.v1.Classification"] == ratios["vision.v1.Tagging"] == 0.0, ratios
        if name == "vision:model_version:replicas":
            assert {(r["metric"]["model"], r["value"][1]) for r in result} == {("efficientnet_lite0", "1")}

    empty = []
    for title, expr in dashboard_exprs(dashboard(render("all-on"))):
        if any(marker in expr for marker in NOT_FROM_A_LONE_SERVER):
            continue
        if not prometheus.query(grafana_to_promql(expr)):
            empty.append((title, expr))
    assert not empty, f"dashboard queries without series: {empty}"

    # Every rule (alerts included) evaluated without error against the real data.
    groups = prometheus.api("rules")["groups"]
    assert {g["name"] for g in groups} >= {
        "vision-platform.services.rules",
        "vision-platform.services.alerts",
    }
    for group in groups:
        for r in group["rules"]:
            assert r["health"] == "ok", (r["name"], r.get("lastError"))
    firing = [
        a for a in prometheus.api("alerts")["alerts"] if a["labels"]["alertname"] != "VisionWorkerAbsent"
    ]
    assert not firing, firing  # a healthy server raises no alert (no worker runs here, so that one may pend)


def test_memory_per_replica_matches_the_documented_figure(prometheus, server):
    """The chart's memory requests/limits rest on the measured RSS: check it on the scraped server."""
    (rss,) = prometheus.wait_for('process_resident_memory_bytes{job="vision"}')
    gib = float(rss["value"][1]) / 2**30
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    limit = values["serviceDefaults"]["resources"]["limits"]["memory"]
    assert limit.endswith("Gi") and gib < float(limit[:-2]), f"RSS {gib:.2f} GiB over the {limit} limit"
