"""What a serving process hosts, in one place for both runners (`vision serve` in vision.runners.server, and
each Ray ingress replica in vision.runners.ray.deployments): which gRPC services (`SERVICES`), their servicers
over one `DataPlane` with the configured limits, and the health that follows from their models.

Adding a service is one entry in `SERVICES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from vision.api.servicers.classification import SERVICE as CLASSIFICATION
from vision.api.servicers.classification import ClassificationServicer
from vision.api.servicers.delf import SERVICE as DELF
from vision.api.servicers.delf import DelfServicer
from vision.api.servicers.features import SERVICE as FEATURES
from vision.api.servicers.features import FeaturesServicer
from vision.api.servicers.jobs import SERVICE as JOBS
from vision.api.servicers.jobs import add_to_server as add_jobs
from vision.api.servicers.tagging import SERVICE as TAGGING
from vision.api.servicers.tagging import TaggingServicer
from vision.config.settings import ServeSettings
from vision.media.imaging import DecodeLimits
from vision.models.card import DELF as DELF_TASK
from vision.models.card import FEATURES as FEATURES_TASK
from vision.serving.dataplane import DataPlane
from vision.serving.repository import ModelRepository
from vision.tasks.classification import CLASSIFICATION as CLASSIFICATION_TASK
from vision.tasks.features import Features
from vision.tasks.tagging import TAGGING as TAGGING_TASK
from vision.v1 import classification_pb2_grpc, delf_pb2_grpc, features_pb2_grpc, tagging_pb2_grpc

# The event loop shares the GIL with decode and postprocessing threads; Python hands the GIL over only
# every switch interval (5 ms by default), and a small RPC needs it a few dozen times. At 1 ms a 1-image
# Classify's max latency with 64-image threshold-0 Tags in flight fell from 328 to 146 ms (loadtest.stall).
SWITCH_INTERVAL_S = 0.001

# A readiness check: health SERVING while it returns True.
Probe = Callable[[], bool]


@dataclass(frozen=True)
class HostedService:
    # The `--services` name.
    name: str
    # Fully qualified gRPC name, as health checks and reflection use it.
    full_name: str
    # The model capability its default model must have (ModelCard.tasks); "" for a service without models
    # (Jobs), whose add_to_server returns its own readiness check.
    task: str
    # Adds the servicer; may return a readiness callable (health SERVING while it returns True) that
    # replaces the default model check.
    add_to_server: Callable[[DataPlane, grpc.aio.Server, ServeSettings], Probe | None]


SERVICES: tuple[HostedService, ...] = (
    HostedService(
        "classification", CLASSIFICATION, CLASSIFICATION_TASK.name,
        lambda dp, server, _: classification_pb2_grpc.add_ClassificationServicer_to_server(ClassificationServicer(dp), server),
    ),
    HostedService(
        "tagging", TAGGING, TAGGING_TASK.name,
        lambda dp, server, _: tagging_pb2_grpc.add_TaggingServicer_to_server(TaggingServicer(dp), server),
    ),
    HostedService(
        "features", FEATURES, FEATURES_TASK,
        lambda dp, server, settings: features_pb2_grpc.add_FeaturesServicer_to_server(
            FeaturesServicer(dp, Features(max_shorter=settings.features_max_shorter)), server
        ),
    ),
    HostedService(
        "delf", DELF, DELF_TASK,
        lambda dp, server, _: delf_pb2_grpc.add_DelfServicer_to_server(DelfServicer(dp), server),
    ),
    # Jobs (vision.jobs): ready while its Redis answers.
    HostedService("jobs", JOBS, "", lambda _, server, settings: add_jobs(server, settings.jobs_config())),
)


def hosted_services(names: Iterable[str]) -> tuple[HostedService, ...]:
    """The `SERVICES` named (`--services` names), in `SERVICES` order."""
    wanted = set(names)
    return tuple(svc for svc in SERVICES if svc.name in wanted)


HealthState = dict[str, int]
# Health-check name that is SERVING while the process runs, whatever its models do (liveness probes).
LIVENESS = "vision.liveness"


def health_state(
    repository: ModelRepository,
    hosted: tuple[HostedService, ...],
    probes: dict[str, Probe | None] | None = None,
) -> HealthState:
    """Per hosted service: SERVING when its default model is ready (or its probe says so), so one model that
    is down takes only its own services out of load balancing. The overall entry ("") is SERVING when every
    hosted service is; `LIVENESS` whenever the process runs."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    probes = probes or {}

    def ready(svc: HostedService) -> bool:
        probe = probes.get(svc.full_name)
        return probe() if probe is not None else repository.ready(svc.task)

    state = {svc.full_name: serving if ready(svc) else not_serving for svc in hosted}
    state[""] = serving if all(v == serving for v in state.values()) else not_serving
    # For liveness probes: the process answers. A model that is down must take its services out of load
    # balancing (readiness), not get the pod restarted, which would not bring a remote Triton back.
    state[LIVENESS] = serving
    return state


def data_plane(repository: ModelRepository, settings: ServeSettings) -> DataPlane:
    """The data plane over `repository` with the configured request and decode limits."""
    return DataPlane(
        repository,
        limits=DecodeLimits(settings.max_image_bytes, settings.max_image_pixels),
        max_images_per_request=settings.max_images_per_request,
        decode_workers=settings.decode_workers,
    )


@dataclass(frozen=True)
class Hosting:
    """The hosted services of one process, added to its server, over one data plane."""

    repository: ModelRepository
    services: tuple[HostedService, ...]
    dataplane: DataPlane
    # Per service's full name: the readiness check its add_to_server returned, if any.
    probes: dict[str, Probe | None]

    def health(self) -> HealthState:
        return health_state(self.repository, self.services, self.probes)

    def close(self) -> None:
        self.dataplane.close()


def host(
    repository: ModelRepository, settings: ServeSettings, server: Any, services: tuple[HostedService, ...]
) -> Hosting:
    """Build the data plane and add each of `services`' servicers to `server` (a `grpc.aio.Server`, or
    anything with its `add_generic_rpc_handlers`/`add_registered_method_handlers`)."""
    dataplane = data_plane(repository, settings)
    try:
        probes = {svc.full_name: svc.add_to_server(dataplane, server, settings) for svc in services}
    except BaseException:  # a servicer that cannot start (the Jobs store's Redis URL) leaves no pools behind
        dataplane.close()
        raise
    return Hosting(repository, services, dataplane, probes)
