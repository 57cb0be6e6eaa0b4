"""Every Prometheus metric of the serving process, defined once.

Names follow `vision_<thing>_<unit>`; labels are `service`, `method`, `code`, `model`, `version`, `stage`.
Metrics live in the process-wide default registry so that `prometheus_client`'s process and platform
collectors (RSS, CPU, open fds) are exported beside them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# Latency buckets from 1 ms to 30 s: batch-1 CPU inference is ~5-50 ms, large batches and Triton retries longer.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)

REQUESTS = Counter(
    "vision_requests_total", "RPCs finished, by gRPC status code.", ["service", "method", "code"]
)
REQUEST_LATENCY = Histogram(
    "vision_request_duration_seconds",
    "Wall time of an RPC inside the server, from handler start to response.",
    ["service", "method"],
    buckets=_LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge("vision_requests_in_flight", "RPCs being handled now.", ["service", "method"])
IMAGES = Counter("vision_images_total", "Images answered successfully.", ["service", "model", "version"])
STAGE_LATENCY = Histogram(
    "vision_stage_duration_seconds",
    "Time per stage: decode and preprocess per image; queue (waiting for a batch) and inference per batch.",
    ["stage", "model", "version"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "vision_inference_batch_size",
    "Images per forward pass actually run by a backend (cross-request batching makes this > 1).",
    ["model", "version"],
    buckets=_BATCH_BUCKETS,
)
QUEUE_DEPTH = Gauge("vision_inference_queue_images", "Images waiting for a forward pass.", ["model", "version"])
BACKEND_ERRORS = Counter(
    "vision_backend_errors_total", "Failed forward passes, by backend.", ["model", "version", "backend"]
)


# Prometheus "info" convention: a gauge named *_info, value 1, facts in the labels; one series per model.
MODEL_INFO = Gauge(
    "vision_model_info",
    "1 for each served model; labels describe it.",
    ["model", "version", "architecture", "backend", "weights_sha256"],
)


def record_model(name: str, version: str, architecture: str, backend: str, weights_sha256: str) -> None:
    MODEL_INFO.labels(
        model=name, version=version, architecture=architecture, backend=backend, weights_sha256=weights_sha256[:16]
    ).set(1)


def serve_metrics(host: str, port: int) -> tuple[object, int]:
    """Start the /metrics HTTP endpoint in a daemon thread; returns (server, bound port)."""
    httpd, _thread = start_http_server(port, addr=host)
    return httpd, int(httpd.server_address[1])
