"""Start-up configuration: validated once at the boundary into one typed object, then passed down.

Every field can be set by a CLI flag of `vision serve` or an environment variable `VISION_<FIELD>`
(flags win). `VISION_MODELS` takes a JSON list of model objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from vision.core.cpus import available_cpus
from vision.core.errors import ConfigurationError
from vision.core.wire import MAX_MESSAGE_BYTES

# The CPUs this process may use: affinity and the container's cgroup CPU quota, the default thread count.
_CPUS = available_cpus()

Backend = Literal["onnxruntime", "torch", "triton"]
# Every gRPC service `vision serve` can host (vision.runners.hosting.SERVICES has one entry for each).
ServiceName = Literal["classification", "tagging", "features", "delf", "jobs"]
SERVICE_NAMES: tuple[str, ...] = get_args(ServiceName)
# Hosted when --services is not given: the model services. Jobs needs Redis and is asked for by name
# (`--services jobs`, or the list with jobs in it), so a process without Redis still serves models.
DEFAULT_SERVICES = ("classification", "tagging", "features", "delf")
# `weights=random`: serve randomly initialised (seeded) weights on purpose, for tests and load tests.
RANDOM_WEIGHTS = "random"


class ModelConfig(BaseModel):
    """One served model: an architecture from the registry plus its weights, labels and preprocessing."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field("", description="Builder name in the model registry, e.g. efficientnet_lite0, resnet50.")
    registry: str | None = Field(
        None,
        description="A version from the model registry instead of arch/weights/labels: models:/NAME@ALIAS follows the "
        "alias (the server publishes the version the alias points to, after its checks), models:/NAME/VERSION "
        "pins one. See docs/registry.md.",
    )
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
    delf_layer: str | None = Field(
        None,
        description="DELF: the feature map keypoints come from; default: the map beside the model's attention "
        "output, else its shallowest stride-16 map (ResNet layer3, EfficientNet-Lite0 blocks.4). See docs/delf.md.",
    )
    delf_score_threshold: float | None = Field(
        None,
        description="DELF: keep keypoints scoring at least this; default 100 (the reference's) with trained "
        "attention, 0 when scores are feature L2 norms (no attention output).",
    )
    delf_max_side: int | None = Field(
        None, ge=16, le=8192, description="DELF: cap of the image's longer side before the pyramid; default 1024."
    )
    delf_pca: Path | None = Field(
        None, description="DELF: descriptor PCA from `vision fit-delf-pca`; without one descriptors keep the map's width."
    )

    @property
    def served_name(self) -> str:
        return self.name or self.arch

    @model_validator(mode="after")
    def _arch_or_registry(self) -> "ModelConfig":
        if self.registry is None:
            if not self.arch:
                raise ValueError("a model needs arch= (an architecture) or a registry URI (models:/NAME@ALIAS)")
            return self
        from vision.config.uri import parse_model_uri

        try:
            uri = parse_model_uri(self.registry)
        except ConfigurationError as exc:
            raise ValueError(str(exc)) from None
        fixed = {"arch", "weights", "labels", "preset", "onnx", "num_classes", "task", "hierarchy", "thresholds", "whitenings"}
        given = sorted(k for k in fixed & self.model_fields_set if getattr(self, k))
        if given:
            raise ValueError(f"registry model {self.registry}: {', '.join(given)} come from the registered version")
        if self.name not in (None, uri.name):
            raise ValueError(f"registry model {self.registry}: it is served under its registered name {uri.name!r}")
        object.__setattr__(self, "name", uri.name)
        if uri.version is not None:
            object.__setattr__(self, "version", uri.version)
        return self

    @classmethod
    def parse_spec(cls, spec: str) -> "ModelConfig":
        """`efficientnet_lite0` or `arch=resnet50,weights=/w.pt,version=2,labels=/l.txt,name=r50`, or a
        registry URI `models:/NAME@ALIAS` / `models:/NAME/VERSION` (optionally `registry=URI,backend=...`)."""
        if spec.strip().startswith("models:/"):
            return cls(registry=spec.strip())
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
    services: Annotated[list[ServiceName], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_SERVICES),
        description="gRPC services to host, comma-separated (one per Deployment in Kubernetes); default: every model "
        "service (classification, tagging, features, delf); jobs (needs Redis) only when named.",
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
    triton_tls_ca: Path | None = Field(
        None,
        description="Reach Triton's gRPC over TLS (tritonserver --grpc-use-ssl), trusting this PEM CA bundle.",
    )
    triton_tls_cert: Path | None = Field(
        None, description="Client certificate for a Triton that asks for one (--grpc-use-mutual-auth), with --triton-tls-key."
    )
    triton_tls_key: Path | None = Field(None, description="PEM private key of --triton-tls-cert.")
    triton_tls_server_name: str | None = Field(
        None, description="Check Triton's certificate against this name instead of --triton-url's host."
    )
    triton_repository: Path | None = Field(
        None,
        description="The model repository the Triton at --triton-url serves (a shared volume): registry models on "
        "the triton backend are published into it (<repo>/<name>/<version>/) and loaded through Triton's "
        "repository API.",
    )
    triton_admin_url: str = Field(
        "127.0.0.1:8000", description="Triton HTTP address for its repository API (load/unload), host:port."
    )
    triton_flavour: Literal["cpu-python", "gpu-onnxruntime"] = Field(
        "cpu-python",
        description="Config flavour of a registry model new to --triton-repository: gpu-onnxruntime (Triton's "
        "onnxruntime backend on GPUs) or cpu-python (the python backend running the same ONNX on CPUs).",
    )
    registry_uri: str | None = Field(
        None,
        description="Model registry store (MLflow): sqlite:///PATH.db, postgresql://USER@HOST:PORT/DB or an MLflow "
        "tracking server http(s)://HOST:PORT (artifacts through its proxy); default: a "
        "SQLite file under the user's data directory ($XDG_DATA_HOME/vision-serving/registry).",
    )
    registry_artifact_root: str | None = Field(
        None,
        description="Where the registry stores new versions' files (a path or any MLflow artifact URI); default: "
        "artifacts/ beside the SQLite file.",
    )
    registry_poll_s: float = Field(
        10.0, gt=0, le=3600, description="How often a models:/NAME@ALIAS model checks whether its alias moved."
    )
    registry_cache: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "vision-serving" / "registry",
        description="Where downloaded registry versions are kept (checked against their sha256 on every use).",
    )
    registry_drain_timeout_s: float = Field(
        60.0, ge=0,
        description="After an alias moved, how long requests still holding the old version may take before it "
        "is closed anyway.",
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
        MAX_MESSAGE_BYTES, ge=1024,
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
    # --- Transport security and authorization (vision.api.security; README "Securing the platform"). ---
    tls_cert: Path | None = Field(
        None,
        description="Serve gRPC over TLS with this PEM certificate chain (with --tls-key); re-read when the file "
        "changes (cert-manager rotates it in place), no restart. Default: plaintext.",
    )
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert.")
    tls_client_ca: Path | None = Field(
        None,
        description="Mutual TLS: refuse, in the handshake, clients without a certificate signed by this PEM CA bundle.",
    )
    health_port: int | None = Field(
        None, ge=0, le=65535,
        description="Also serve gRPC health, and nothing else, in plaintext on this port: kubelet's gRPC probes "
        "cannot present certificates to a TLS port. Default: none.",
    )
    auth_tokens: Path | None = Field(
        None,
        description="Bearer tokens allowed to call the RPCs that change state (Jobs submit and cancel): a file with "
        "one 'NAME TOKEN' (or 'TOKEN') per line, or a folder of one file per token, named by who holds it (a "
        "mounted Secret). Several at once for rotation; re-read when it changes.",
    )
    auth_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Client-certificate identities (common name or a subject alternative name, comma-separated) "
        "allowed to call the RPCs that change state; needs --tls-client-ca.",
    )
    auth_open: bool = Field(
        False,
        description="Let any client call the RPCs that change state, on any address (authorization done by a mesh "
        "in front, e.g. Istio). Without tokens or an allow-list they are open on a loopback address only, and a "
        "server on any other address that hosts them refuses to start.",
    )
    # --- The Ray Serve runner (`--runner ray`; docs/ray.md). Ignored by the grpc runner. ---
    runner: Literal["grpc", "ray"] = Field(
        "grpc",
        description="grpc: this process hosts the services (grpc.aio); ray: deploy the same services as a Ray Serve "
        "application behind Ray Serve's gRPC proxy, same protos and --host/--port for clients (docs/ray.md).",
    )
    ray_address: str | None = Field(
        None,
        description="Ray: deploy to this running cluster (e.g. 'auto' or ray://HEAD:10001) instead of starting a "
        "local Ray instance; its network is the cluster's.",
    )
    ray_network: Literal["netns", "host"] = Field(
        "netns",
        description="Ray (local instance): netns starts Ray in a private network namespace whose only interface is "
        "loopback (needs root) and forwards --host:--port to Serve's gRPC proxy inside it, so no Ray port is "
        "reachable from the network; host runs Ray beside this process with node IP and Serve's HTTP host set to "
        "--host, but Ray 2.60's gRPC proxy and core processes still listen on all interfaces: firewall them.",
    )
    ray_num_cpus: int | None = Field(None, ge=1, description="Ray (local instance): CPUs it schedules; default: usable CPUs.")
    ray_object_store_mb: int = Field(512, ge=64, description="Ray (local instance): object store size in MiB.")
    ray_topology: Literal["fused", "split"] = Field(
        "fused",
        description="Ray: fused runs decode, the engine (@serve.batch) and postprocessing in each ingress replica; "
        "split sends decoded tensors through deployment handles to one inference deployment per model "
        "(@serve.batch there), so decoding and inference scale separately (docs/ray.md has the cost).",
    )
    ray_min_replicas: int = Field(1, ge=0, description="Ray: autoscaling floor of the ingress deployment.")
    ray_max_replicas: int = Field(1, ge=1, description="Ray: autoscaling ceiling of the ingress deployment.")
    ray_inference_min_replicas: int = Field(1, ge=0, description="Ray, split topology: floor per inference deployment.")
    ray_inference_max_replicas: int = Field(1, ge=1, description="Ray, split topology: ceiling per inference deployment.")
    ray_target_ongoing_requests: float = Field(
        8.0, gt=0, description="Ray: autoscaling target of ongoing requests per replica."
    )
    ray_max_ongoing_requests: int = Field(
        32, ge=1,
        description="Ray: requests one replica takes at once; @serve.batch can only batch what a replica holds "
        "(~32 batched well here).",
    )
    ray_num_cpus_per_replica: float = Field(1.0, ge=0, description="Ray: num_cpus of each ingress replica.")
    ray_inference_num_cpus: float = Field(1.0, ge=0, description="Ray, split topology: num_cpus of each inference replica.")
    ray_num_gpus: float = Field(
        0.0, ge=0, description="Ray: num_gpus of each replica that runs an engine (fused: ingress; split: inference)."
    )
    ray_http_port: int = Field(
        8000, ge=0, le=65535, description="Ray: Serve's HTTP proxy port (GET /metrics, /healthz); inside the namespace with netns."
    )
    ray_config_out: Path | None = Field(
        None, description="Ray: also write the Serve config YAML (for `serve run` / `serve deploy` / KubeRay) here."
    )
    ray_config_only: bool = Field(False, description="Ray: write --ray-config-out and exit without starting anything.")
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Jobs: Redis, the Celery broker and result backend (docs/jobs.md)."
    )
    jobs_namespace: str = Field(
        "vision", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$",
        description="Jobs: prefix of the queues and Redis keys; the workers must use the same.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def jobs_config(self):  # noqa: ANN201 - vision.config.jobs.JobsConfig
        from vision.config.jobs import JobsConfig

        return JobsConfig(redis_url=self.redis_url, namespace=self.jobs_namespace)

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

    @field_validator("auth_allow", mode="before")
    @classmethod
    def _split_allow(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
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
    def _ray_replica_bounds(self) -> "ServeSettings":
        if self.ray_min_replicas > self.ray_max_replicas:
            raise ValueError("ray_min_replicas must be at most ray_max_replicas")
        if self.ray_inference_min_replicas > self.ray_inference_max_replicas:
            raise ValueError("ray_inference_min_replicas must be at most ray_inference_max_replicas")
        if self.ray_config_only and self.ray_config_out is None:
            raise ValueError("ray_config_only needs ray_config_out (where to write the Serve config)")
        return self

    @model_validator(mode="after")
    def _security_fits_together(self) -> "ServeSettings":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.auth_allow and self.tls_client_ca is None:
            raise ValueError("auth_allow names client certificates, which only mutual TLS asks for: set tls_client_ca")
        if self.auth_open and (self.auth_tokens is not None or self.auth_allow):
            raise ValueError("auth_open lets anyone in: it cannot go with auth_tokens or auth_allow")
        if (self.triton_tls_cert is None) != (self.triton_tls_key is None):
            raise ValueError("triton_tls_cert and triton_tls_key go together")
        if (self.triton_tls_cert or self.triton_tls_server_name) and self.triton_tls_ca is None:
            raise ValueError("triton_tls_cert and triton_tls_server_name need triton_tls_ca (TLS to Triton)")
        if self.health_port is not None and self.health_port == self.port != 0:
            raise ValueError("health_port must differ from port")
        if self.runner == "ray" and (self.tls_cert or self.auth_tokens or self.auth_allow or self.health_port is not None):
            raise ValueError("TLS, authorization and health_port belong to the grpc runner; with --runner ray put "
                             "them in front of Ray Serve's gRPC proxy (docs/ray.md)")
        return self

    @model_validator(mode="after")
    def _request_fits_one_image(self) -> "ServeSettings":
        if self.max_request_bytes < self.max_image_bytes:
            raise ValueError("max_request_bytes must be at least max_image_bytes")
        if self.max_queue_images < self.max_images_per_request:
            # Otherwise a full-size request could never be queued and would get "retry" forever.
            raise ValueError("max_queue_images must be at least max_images_per_request")
        return self
