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
# Refusals by the authorization interceptor (vision.api.security), by reason: no_credentials, invalid_token
# (UNAUTHENTICATED), not_allowed (PERMISSION_DENIED). A rise in invalid_token is a client left on a rotated-out token.
AUTH_REFUSALS = Counter(
    "vision_auth_refusals_total", "RPCs refused by authorization, by reason.", ["service", "method", "reason"]
)
IMAGES = Counter("vision_images_total", "Images answered successfully.", ["service", "model", "version"])
STAGE_LATENCY = Histogram(
    "vision_stage_duration_seconds",
    "Time per stage: decode and preprocess per image; queue (waiting for a batch) and inference per batch; "
    "delf_match (nearest neighbours and RANSAC) per DELF Match.",
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

# DELF (vision.api.servicers.delf): what extraction and matching produce. A model or threshold that starts
# returning no keypoints, or matches that stop verifying, show here before clients notice.
DELF_KEYPOINTS = Histogram(
    "vision_delf_keypoints_per_image",
    "DELF keypoints returned per image (Extract, and the image sides of Match); 0 for images too small.",
    ["model", "version"],
    # 999 | 1000 splits off the images that hit the default cap of 1000 keypoints; 0 counts empty answers.
    buckets=(0, 1, 10, 50, 100, 250, 500, 750, 999, 1000, 2500, 10000),
)
DELF_INLIERS = Histogram(
    "vision_delf_inliers_per_match",
    "RANSAC inliers per DELF Match (the match score).",
    ["model", "version"],
    buckets=(0, 3, 5, 10, 20, 30, 50, 100, 200, 500, 1000, 10000),
)


# Prometheus "info" convention: a gauge named *_info, value 1, facts in the labels; one series per model.
MODEL_INFO = Gauge(
    "vision_model_info",
    "1 for each served model; labels describe it.",
    ["model", "version", "architecture", "backend", "weights_sha256"],
)


def record_model(name: str, version: str, *, architecture: str, backend: str, weights_sha256: str) -> None:
    """`weights_sha256`: the weights' digest (its first 16 hex digits are shown), or "random"."""
    MODEL_INFO.labels(
        model=name, version=version, architecture=architecture, backend=backend, weights_sha256=weights_sha256[:16]
    ).set(1)


# Model registry (vision.registry.publisher): one series per followed model, never per version moved through.
REGISTRY_SWITCHES = Counter(
    "vision_registry_switches_total",
    "Alias moves acted on: outcome=served (the new version answers) or refused (the old one keeps serving).",
    ["model", "outcome"],
)
REGISTRY_REFUSALS = Counter(
    "vision_registry_refusals_total",
    "Versions refused, by the check that refused them: sha256 (artifact corrupted), gate (golden outputs "
    "differ), load (cannot be loaded or published), download (registry or artifact store unreachable).",
    ["model", "check"],
)
REGISTRY_SWITCH_SECONDS = Histogram(
    "vision_registry_switch_duration_seconds",
    "From seeing the alias move to the new version answering: download, sha256, load, gate, switch.",
    ["model"],
    buckets=(0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
REGISTRY_ALIAS_VERSION = Gauge(
    "vision_registry_alias_version", "The version the followed alias points to (last check).", ["model", "alias"]
)
REGISTRY_SERVING_VERSION = Gauge(
    "vision_registry_serving_version", "The registry version answering requests that name no version.", ["model"]
)
REGISTRY_POLL_ERRORS = Counter(
    "vision_registry_poll_errors_total", "Failed looks at the registry (store unreachable, alias deleted).", ["model"]
)


# Jobs (vision.jobs): exported by `vision worker` (prometheus_client multiprocess mode over its Celery pool
# processes). Gauges say how the values of the pool processes combine.
JOBS_FINISHED = Counter("vision_jobs_finished_total", "Jobs ended, by kind and final state.", ["kind", "state"])
JOB_DURATION = Histogram(
    "vision_job_duration_seconds",
    "Run time of one job attempt, by kind and final state.",
    ["kind", "state"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400),
)
JOBS_RUNNING = Gauge("vision_jobs_running", "Jobs running now.", ["kind"], multiprocess_mode="livesum")
JOB_PROGRESS = Gauge(
    "vision_job_progress_ratio", "Progress of the job a pool process runs (0 when idle).", ["kind"],
    multiprocess_mode="liveall",
)
DOWNLOAD_URLS = Counter(
    "vision_download_urls_total", "URLs handled by download jobs, by outcome (ok, duplicate, invalid reason).",
    ["outcome"],
)
DOWNLOAD_BYTES = Counter("vision_download_bytes_total", "Image bytes fetched by download jobs.")
TRAIN_IMAGES = Counter("vision_train_images_total", "Images trained on by fine-tune jobs, by task.", ["task"])
TRAIN_EPOCH_SECONDS = Histogram(
    "vision_train_epoch_duration_seconds", "Time of one fine-tune epoch (training and validation), by task.",
    ["task"], buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200),
)


# Every metric with `model` and `version` labels: a retired version's series are removed from all of them.
_PER_MODEL = (IMAGES, STAGE_LATENCY, BATCH_SIZE, QUEUE_DEPTH, BACKEND_ERRORS, MODEL_INFO, DELF_KEYPOINTS, DELF_INLIERS)


def forget_model(name: str, version: str) -> None:
    """Remove every series of a retired model version, so dashboards don't show it as idle forever."""
    for metric in _PER_MODEL:
        metric.remove_by_labels({"model": name, "version": version})


def serve_metrics(host: str, port: int) -> tuple[object, int]:
    """Start the /metrics HTTP endpoint in a daemon thread; returns (server, bound port)."""
    httpd, _thread = start_http_server(port, addr=host)
    return httpd, int(httpd.server_address[1])
