"""Our gRPC services on Ray Serve's gRPC proxy, under their real names, so clients change nothing.

Ray's proxy routes an RPC to the ingress deployment's method named like the RPC's *last* path segment
(`/vision.v1.Tagging/ListModels` → method `ListModels`). Four of our services have a `ListModels` and two an
`Extract`, so the plain mapping would send `Tagging.ListModels` to whatever `ListModels` the deployment has.
The `add_*` functions here (listed in the Serve config's `grpc_options.grpc_servicer_functions`) register
each service with its method handlers keyed by an unambiguous alias (`/vision.v1.Tagging/TaggingListModels`)
and look incoming paths up through that alias; Ray's proxy then calls the deployment method
`TaggingListModels`. The wire paths, messages and reflection entries stay exactly those of vision.v1.

This module is imported by Ray's proxy processes: it imports only generated protobuf code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from vision.v1 import classification_pb2_grpc, delf_pb2_grpc, features_pb2_grpc, tagging_pb2_grpc

HEALTH = "grpc.health.v1.Health"


def ray_method_name(service: str, method: str) -> str:
    """The ingress deployment's method for one RPC: `vision.v1.Tagging`, `ListModels` → `TaggingListModels`."""
    return f"{service.rsplit('.', 1)[-1]}{method}"


class _Capture:
    """Stands in for a grpc server: records what a generated `add_*Servicer_to_server` registers."""

    def __init__(self) -> None:
        self.methods: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: tuple[Any, ...]) -> None:
        for handler in handlers:
            for path, method_handler in getattr(handler, "_method_handlers", {}).items():
                _, service, method = path.split("/")
                self.methods.setdefault(service, {})[method] = method_handler

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.methods.setdefault(service, {}).update(handlers)


def captured_methods(add: Callable[[Any, Any], None], servicer: Any) -> dict[str, dict[str, grpc.RpcMethodHandler]]:
    """service → method → handler, as the generated `add` function would register them on a server."""
    capture = _Capture()
    add(servicer, capture)
    return capture.methods


class AliasedHandler(grpc.GenericRpcHandler):
    """One service's handlers under alias keys. Ray's proxy rewrites the values of `_method_handlers`
    (keeping the keys) to route to replicas, and names the replica method after the key's last segment."""

    def __init__(self, service: str, methods: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service_name = service
        self._routes = {f"/{service}/{m}": f"/{service}/{ray_method_name(service, m)}" for m in methods}
        self._method_handlers = {self._routes[f"/{service}/{m}"]: h for m, h in methods.items()}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        alias = self._routes.get(handler_call_details.method)  # type: ignore[attr-defined]
        return self._method_handlers.get(alias) if alias is not None else None


class _AnyServicer:
    """A servicer whose every method is a placeholder (the proxy replaces them; `rpc_methods` reads names)."""

    def __getattr__(self, name: str) -> None:
        return None


# The generated `add_*Servicer_to_server` of each service Ray's proxy can carry, by `--services` name.
GENERATED = {
    "classification": classification_pb2_grpc.add_ClassificationServicer_to_server,
    "tagging": tagging_pb2_grpc.add_TaggingServicer_to_server,
    "features": features_pb2_grpc.add_FeaturesServicer_to_server,
    "delf": delf_pb2_grpc.add_DelfServicer_to_server,
    "health": health_pb2_grpc.add_HealthServicer_to_server,
}


def rpc_methods() -> list[tuple[str, str]]:
    """(service, method) of every RPC of every service above."""
    return [
        (service, method)
        for add in GENERATED.values()
        for service, methods in captured_methods(add, _AnyServicer()).items()
        for method in methods
    ]


def _add_aliased(add: Callable[[Any, Any], None], servicer: Any, server: Any) -> None:
    for service, methods in captured_methods(add, servicer).items():
        server.add_generic_rpc_handlers((AliasedHandler(service, methods),))


def add_classification(servicer: Any, server: Any) -> None:
    _add_aliased(GENERATED["classification"], servicer, server)


def add_tagging(servicer: Any, server: Any) -> None:
    _add_aliased(GENERATED["tagging"], servicer, server)


def add_features(servicer: Any, server: Any) -> None:
    _add_aliased(GENERATED["features"], servicer, server)


def add_delf(servicer: Any, server: Any) -> None:
    _add_aliased(GENERATED["delf"], servicer, server)


def add_health(servicer: Any, server: Any) -> None:
    """grpc.health.v1 through the proxy: answered by an ingress replica (so it says whether a replica with
    a ready model answers, not only whether the proxy is up)."""
    _add_aliased(GENERATED["health"], servicer, server)


def servicer_functions(services: list[str]) -> list[str]:
    """Import paths for the Serve config's `grpc_options.grpc_servicer_functions`: the hosted services
    (`--services` names) and health."""
    return [f"{__name__}.add_{name}" for name in carried(services)] + [f"{__name__}.add_health"]


def carried(services: list[str]) -> list[str]:
    """The `--services` names Ray's proxy can carry (a service added to vision.runners.hosting later needs an
    entry in GENERATED and an `add_<name>` here first)."""
    return [name for name in services if name in GENERATED and name != "health"]
