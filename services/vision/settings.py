"""Start-up configuration: validated once at the boundary into one typed object, then passed down.

Every field can be set by a CLI flag of `vision serve` or an environment variable `VISION_<FIELD>`
(flags win). `VISION_MODELS` takes a JSON list of model objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from vision.cpus import available_cpus
from vision.errors import ConfigurationError

# The CPUs this process may use: affinity and the container's cgroup CPU quota, the default thread count.
_CPUS = available_cpus()

Backend = Literal["onnxruntime", "torch", "triton"]
# Every gRPC service `vision serve` can host (vision.server.SERVICES has one entry for each).
SERVICE_NAMES = ("classification", "tagging", "features")
# `weights=random`: serve randomly initialised (seeded) weights on purpose, for tests and load tests.
RANDOM_WEIGHTS = "random"


class ModelConfig(BaseModel):
    """One served model: an architecture from the registry plus its weights, labels and preprocessing."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field(description="Builder name in the model registry, e.g. efficientnet_lite0, resnet50.")
    name: str | None = Field(None, description="Name clients select the model by; defaults to arch.")
    version: str = Field("1", min_length=1, description="Version reported in every response.")
    weights: Literal["random"] | Path | None = Field(
        None,
        description="State dict or registry checkpoint; default: the weights bundled for arch. An architecture "
        "without bundled weights needs a file, or 'random' to serve seeded random weights on purpose.",
    )
    backend: Backend | None = Field(None, description="Inference engine for this model; default: --backend.")
    labels: str | None = Field(
        None,
        description="'imagenet', a label file (index<TAB>name per line, ML-Images hierarchy, NUS-WIDE JSON), or "
        "'none' for a pure feature extractor (no classifier head).",
    )
    preset: str | None = Field(None, description="Preprocessing preset; default: the architecture's.")
    triton_model: str | None = Field(None, description="Model name in Triton's repository; default: name.")
    onnx: Path | None = Field(
        None, description="Pre-exported ONNX file for the onnxruntime backend; default: export (and cache) at start-up."
    )
    num_classes: int | None = Field(None, ge=1, description="Head width; default: from labels or the arch.")
    task: Literal["classification", "multilabel"] | None = Field(None, description="Head type.")
    hierarchy: str | None = Field(
        None,
        description="Tagging: label hierarchy; 'wordnet' (bundled, over ImageNet-1k), 'none', or an ML-Images "
        "hierarchy file whose labels 0..N-1 are the N outputs; default: the label file's own hierarchy, or "
        "wordnet for ImageNet labels.",
    )
    thresholds: Path | None = Field(
        None, description="Tagging: per-label thresholds (calibration JSON, see docs/tagging.md); default 0.5."
    )
    whitenings: Path | None = Field(
        None, description="Features: a folder of descriptor whitenings (<name>.npz, from `vision fit-whitening`)."
    )

    @property
    def served_name(self) -> str:
        return self.name or self.arch

    @classmethod
    def parse_spec(cls, spec: str) -> "ModelConfig":
        """`efficientnet_lite0` or `arch=resnet50,weights=/w.pt,version=2,labels=/l.txt,name=r50`."""
        if "=" not in spec:
            return cls(arch=spec.strip())
        fields: dict[str, str] = {}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ConfigurationError(f"model spec {spec!r}: expected key=value pairs separated by commas")
            fields[key.strip()] = value.strip()
        return cls.model_validate(fields)


class ServeSettings(BaseSettings):
    """Everything `vision serve` needs."""

    model_config = SettingsConfigDict(env_prefix="VISION_", extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind gRPC and metrics on.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(9464, ge=0, le=65535, description="Prometheus /metrics port; 0 picks a free one.")
    services: Annotated[list[Literal["classification", "tagging", "features"]], NoDecode] = Field(
        default_factory=lambda: list(SERVICE_NAMES),
        description="gRPC services to host, comma-separated (one per Deployment in Kubernetes); default: all.",
    )
    backend: Backend = Field(
        "onnxruntime",
        description="Default inference engine of the models (onnxruntime: fastest on CPU; torch: eager; triton: "
        "remote); a model spec's backend= overrides it.",
    )
    triton_url: str = Field("127.0.0.1:8001", description="Triton gRPC address for --backend triton.")
    triton_timeout_s: float = Field(10.0, gt=0, description="Per-attempt timeout of a Triton inference call.")
    triton_retries: int = Field(3, ge=0, le=10, description="Retries of an UNAVAILABLE Triton call (with backoff).")
    triton_shm_mb: int = Field(
        0, ge=0, le=1024,
        description="Send tensors to a Triton on the same host through system shared memory: MiB per region "
        "(16 regions); 0 = inside the gRPC message.",
    )
    onnx_cache: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "vision-serving" / "onnx",
        description="Where start-up ONNX exports are cached, keyed by architecture, weights digest and versions.",
    )
    device: str = Field("cpu", description="torch device for the torch backend: cpu, cuda, cuda:1...")
    threads: int = Field(_CPUS, ge=1, description="Intra-op threads of the inference engine.")
    spin_wait: bool = Field(
        False,
        description="Let ONNX Runtime's idle threads busy-wait (lower latency on a dedicated host; steals CPU "
        "from decoding and gRPC on a small one).",
    )
    models: list[ModelConfig] = Field(
        default_factory=lambda: [ModelConfig(arch="efficientnet_lite0")],
        description="Served models; the first of each task is the default.",
    )
    features_max_shorter: int = Field(
        512, ge=32, le=4096,
        description="Features: full-resolution views are downscaled so the shorter side is at most this.",
    )
    max_batch_size: int = Field(16, ge=1, le=1024, description="Largest forward pass.")
    max_wait_ms: float = Field(0.0, ge=0, le=1000, description="Extra wait for a non-full batch.")
    max_queue_images: int = Field(1024, ge=1, description="Queued images per model before RESOURCE_EXHAUSTED.")
    max_images_per_request: int = Field(64, ge=1, description="Images in one RPC.")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Encoded size limit per image.")
    max_image_pixels: int = Field(40_000_000, ge=64, description="Width*height limit per image.")
    max_request_bytes: int = Field(
        64 * 1024 * 1024, ge=1024,
        description="Whole request size; larger requests are refused by gRPC with RESOURCE_EXHAUSTED before "
        "they are buffered (bounds memory per RPC).",
    )
    max_concurrent_rpcs: int = Field(
        64, ge=1,
        description="RPCs handled at once; more are refused with RESOURCE_EXHAUSTED. Worst-case request memory is "
        "this times max_request_bytes (4 GiB with the defaults).",
    )
    decode_workers: int = Field(_CPUS, ge=1, description="Threads decoding and preprocessing images.")
    grace_seconds: float = Field(10.0, ge=0, description="On SIGTERM, how long in-flight RPCs may finish.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("services", mode="before")
    @classmethod
    def _split_services(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and not value:
            raise ValueError(f"host at least one service; known: {', '.join(SERVICE_NAMES)}")
        if isinstance(value, list) and len(set(value)) != len(value):
            raise ValueError("a service is listed twice")
        return value

    @field_validator("models")
    @classmethod
    def _at_least_one(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        if not models:
            raise ValueError("at least one model must be served")
        return models

    @model_validator(mode="after")
    def _unique_versions(self) -> "ServeSettings":
        seen: set[tuple[str, str]] = set()
        for m in self.models:
            key = (m.served_name, m.version)
            if key in seen:
                raise ValueError(f"model {key[0]!r} version {key[1]!r} is configured twice")
            seen.add(key)
        return self

    @model_validator(mode="after")
    def _request_fits_one_image(self) -> "ServeSettings":
        if self.max_request_bytes < self.max_image_bytes:
            raise ValueError("max_request_bytes must be at least max_image_bytes")
        if self.max_queue_images < self.max_images_per_request:
            # Otherwise a full-size request could never be queued and would get "retry" forever.
            raise ValueError("max_queue_images must be at least max_images_per_request")
        return self
