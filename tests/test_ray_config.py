"""Ray mode without a cluster: the Serve config, the proxy's service aliases, merged metrics, settings."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from vision.runners.ray.app import INGRESS, deployment_options, inference_name, serve_config  # noqa: E402
from vision.runners.ray.grpc_services import AliasedHandler, captured_methods, ray_method_name, rpc_methods, servicer_functions  # noqa: E402
from vision.runners.ray.metrics import merge_expositions  # noqa: E402
from vision.config.settings import ServeSettings  # noqa: E402
from vision.v1 import tagging_pb2_grpc  # noqa: E402


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method


def test_every_rpc_gets_an_unambiguous_deployment_method():
    names = [ray_method_name(s, m) for s, m in rpc_methods()]
    assert len(names) == len(set(names))
    assert {"ClassificationListModels", "TaggingListModels", "FeaturesExtract", "DelfExtract", "HealthCheck"} <= set(names)


def test_aliased_handler_routes_real_paths_to_alias_keys():
    methods = captured_methods(tagging_pb2_grpc.add_TaggingServicer_to_server, type("S", (), {"Tag": 1, "ListModels": 2})())
    handler = AliasedHandler("vision.v1.Tagging", methods["vision.v1.Tagging"])
    # What Ray's proxy reads (keys: it names the replica method after the last segment) and rewrites (values).
    assert set(handler._method_handlers) == {"/vision.v1.Tagging/TaggingTag", "/vision.v1.Tagging/TaggingListModels"}
    handler._method_handlers = {k: f"routed {k}" for k in handler._method_handlers}
    assert handler.service(_Details("/vision.v1.Tagging/ListModels")) == "routed /vision.v1.Tagging/TaggingListModels"
    assert handler.service(_Details("/vision.v1.Classification/ListModels")) is None
    assert handler.service(_Details("/vision.v1.Tagging/TaggingListModels")) is None  # aliases are not wire paths


def test_servicer_functions_import():
    from ray._common.utils import import_attr

    for path in servicer_functions(["classification", "tagging", "features", "delf"]):
        assert callable(import_attr(path))


def test_deployment_options_follow_settings():
    fixed = deployment_options(ServeSettings())
    assert list(fixed) == [INGRESS] and fixed[INGRESS]["num_replicas"] == 1
    assert fixed[INGRESS]["max_ongoing_requests"] == 32 and fixed[INGRESS]["graceful_shutdown_timeout_s"] == 10.0
    settings = ServeSettings(
        ray_topology="split", ray_min_replicas=1, ray_max_replicas=4, ray_target_ongoing_requests=6,
        ray_num_gpus=0.5, max_batch_size=8, max_wait_ms=2,
    )
    options = deployment_options(settings)
    ingress = options[INGRESS]
    assert ingress["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 6}
    assert ingress["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}  # split: the engine is elsewhere
    inference = options[inference_name(settings.models[0])]
    assert inference["ray_actor_options"]["num_gpus"] == 0.5 and inference["num_replicas"] == 1
    assert inference["user_config"] == {"max_batch_size": 8, "max_wait_ms": 2.0}


def test_config_validates_as_a_serve_deploy_schema():
    from ray.serve.schema import ServeDeploySchema

    settings = ServeSettings(services=["classification"], models=[{"arch": "efficientnet_lite0", "weights": "random"}])
    config = serve_config(settings, grpc_port=50051, http_host="127.0.0.1", http_port=8000)
    schema = ServeDeploySchema.model_validate(config)
    assert schema.grpc_options.grpc_servicer_functions == [
        "vision.runners.ray.grpc_services.add_classification", "vision.runners.ray.grpc_services.add_health"
    ]
    args = config["applications"][0]["args"]["settings"]
    args.pop("onnx_cache", None)  # conftest sets VISION_ONNX_CACHE: a non-default setting, passed on
    assert args == {"models": [{"arch": "efficientnet_lite0", "weights": "random"}], "services": ["classification"]}
    assert ServeSettings(**args).models[0].weights == "random"  # what build_app reads back


def test_ray_settings_are_validated():
    with pytest.raises(ValueError, match="ray_min_replicas"):
        ServeSettings(ray_min_replicas=3, ray_max_replicas=2)
    with pytest.raises(ValueError, match="ray_config_out"):
        ServeSettings(ray_config_only=True)


def test_merged_metrics_label_each_replica():
    from prometheus_client.parser import text_string_to_metric_families

    one = '# HELP vision_requests_total RPCs.\n# TYPE vision_requests_total counter\nvision_requests_total{code="OK"} 3.0\n'
    two = one.replace("3.0", "5.0") + "# HELP x_seconds X.\n# TYPE x_seconds histogram\n" + "".join(
        f'x_seconds_bucket{{le="{le}"}} {n}\n' for le, n in (("0.1", 1), ("+Inf", 2))
    ) + "x_seconds_count 2.0\nx_seconds_sum 0.3\n"
    merged = merge_expositions({"a": one, "b": two}).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    samples = {(s.name, s.labels.get("replica"), s.labels.get("le")): s.value for f in families.values() for s in f.samples}
    assert samples[("vision_requests_total", "a", None)] == 3 and samples[("vision_requests_total", "b", None)] == 5
    assert samples[("x_seconds_bucket", "b", "+Inf")] == 2 and families["x_seconds"].type == "histogram"
    assert merged.count("# TYPE vision_requests_total counter") == 1

