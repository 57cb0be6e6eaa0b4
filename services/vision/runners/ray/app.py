"""The Ray Serve application, from `ServeSettings`: the builder Serve imports, and the Serve config YAML.

    serve run serve-vision.yaml        # the file `vision serve --runner ray --ray-config-out` writes
    serve deploy serve-vision.yaml     # to a running cluster (needs its dashboard); KubeRay: serveConfigV2

The config's application is built by `build_app(args)` with `args = {"settings": {...}}`: the non-default
`vision serve` settings (any `VISION_*` variables in the replicas' environment apply on top, as for `vision
serve`). Deployment options come from the same settings through `deployment_options`, so a Python
`serve.run(build_app(...))` and the YAML deploy the same thing; edit the YAML's `deployments` to change
replicas, resources or batching (`user_config`: max_batch_size, max_wait_ms; applied without a restart).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from vision.config.settings import ModelConfig, ServeSettings
from vision.runners.ray.grpc_services import servicer_functions

APP_NAME = "vision"
INGRESS = "VisionIngress"
BUILDER = "vision.runners.ray.app:build_app"
# Settings that only the driver uses; not passed to replicas.
_DRIVER_ONLY = {"ray_config_out", "ray_config_only", "runner", "ray_address", "ray_network", "ray_num_cpus", "ray_object_store_mb"}


def settings_args(settings: ServeSettings) -> dict[str, Any]:
    """The settings as the application's `args`: only what differs from the defaults, JSON-friendly."""
    return settings.model_dump(mode="json", exclude_defaults=True, exclude=_DRIVER_ONLY)


def inference_name(model: ModelConfig) -> str:
    return "VisionInference-" + re.sub(r"[^A-Za-z0-9_-]", "_", f"{model.served_name}-{model.version}")


def engine_models(settings: ServeSettings) -> list[ModelConfig]:
    """Models whose engine runs in Ray (everything but Triton-hosted ones)."""
    return [m for m in settings.models if (m.backend or settings.backend) != "triton"]


def _scaling(low: int, high: int, target: float) -> dict[str, Any]:
    if low == high:
        return {"num_replicas": high}
    return {"autoscaling_config": {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": target}}


def deployment_options(settings: ServeSettings) -> dict[str, dict[str, Any]]:
    """Deployment name → its options, in the Serve config's names (also valid for `Deployment.options`)."""
    fused = settings.ray_topology == "fused"
    common: dict[str, Any] = {
        "max_ongoing_requests": settings.ray_max_ongoing_requests,
        # Graceful shutdown: a stopping replica gets this long to finish the requests it holds.
        "graceful_shutdown_timeout_s": settings.grace_seconds,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 5.0,
        # Loading a model (or exporting it to ONNX on a cold cache) takes a while.
        "health_check_timeout_s": 60.0,
        "user_config": {"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms},
    }
    options = {
        INGRESS: {
            **common,
            **_scaling(settings.ray_min_replicas, settings.ray_max_replicas, settings.ray_target_ongoing_requests),
            "ray_actor_options": {
                "num_cpus": settings.ray_num_cpus_per_replica,
                "num_gpus": settings.ray_num_gpus if fused else 0.0,
            },
        }
    }
    if not fused:
        for model in engine_models(settings):
            options[inference_name(model)] = {
                **common,
                **_scaling(
                    settings.ray_inference_min_replicas, settings.ray_inference_max_replicas, settings.ray_target_ongoing_requests
                ),
                "ray_actor_options": {"num_cpus": settings.ray_inference_num_cpus, "num_gpus": settings.ray_num_gpus},
            }
    return options


def build_app(args: dict[str, Any]):  # noqa: ANN201 - ray.serve.Application
    """The application builder named in the Serve config (`import_path: vision.runners.ray.app:build_app`)."""
    from ray import serve

    from vision.runners.ray.deployments import VisionInference, VisionIngress, model_key

    values = dict(args.get("settings", {}))
    settings = ServeSettings(**values)
    options = deployment_options(settings)
    inference = {}
    if settings.ray_topology == "split":
        for model in engine_models(settings):
            name = inference_name(model)
            inference[model_key(model)] = serve.deployment(VisionInference).options(name=name, **options[name]).bind(
                values, model_key(model)
            )
    ingress = serve.deployment(VisionIngress).options(name=INGRESS, **options[INGRESS])
    return ingress.bind(values, inference or None)


def serve_config(settings: ServeSettings, *, grpc_port: int, http_host: str, http_port: int) -> dict[str, Any]:
    """A Serve config (ray.serve.schema.ServeDeploySchema) for `serve run` / `serve deploy` / KubeRay."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": http_host, "port": http_port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": servicer_functions(list(settings.services))},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": BUILDER,
                "args": {"settings": settings_args(settings)},
                # Deep copies: shared dicts would come out of YAML as &anchors/*aliases, which read poorly.
                "deployments": [copy.deepcopy({"name": name, **opts}) for name, opts in deployment_options(settings).items()],
            }
        ],
    }


def write_config(settings: ServeSettings, path: Path, *, grpc_port: int | None = None) -> Path:
    import yaml

    config = serve_config(
        settings, grpc_port=grpc_port or settings.port, http_host=settings.host, http_port=settings.ray_http_port
    )
    header = (
        "# Ray Serve config written by `vision serve --runner ray` (docs/ray.md).\n"
        "# Run it: serve run THIS.yaml   Deploy it: serve deploy THIS.yaml   KubeRay: RayService.spec.serveConfigV2\n"
        "# Ray 2.60's gRPC proxy listens on all interfaces at grpc_options.port; keep the node off untrusted networks.\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path
