"""`vision serve`: its flags (one per ServeSettings field) and its entry, which validates the settings and
runs the services on the chosen runner (vision.runners.server, or Ray Serve with --runner ray)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import typing


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    serve = sub.add_parser(
        "serve",
        help="run the gRPC server (all services, one process; --runner ray: a Ray Serve application, docs/ray.md)",
    )
    _add_settings_flags(serve)
    serve.set_defaults(func=run)


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ServeSettings field, so flags, env vars and validation share one definition."""
    from vision.config.settings import ModelConfig, ServeSettings

    for name, field in ServeSettings.model_fields.items():
        if name == "models":
            continue
        flag = "--" + name.replace("_", "-")
        env = "VISION_" + name.upper()
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description or ''} [env {env}; default {default}]"
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind = {int: int, float: float}.get(field.annotation, str)  # type: ignore[call-overload]
        parser.add_argument(flag, dest=name, type=kind, choices=choices, default=None, help=help_text)
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="SPEC",
        help="Serve a model (repeatable): an architecture name, or key=value pairs, e.g. "
        "'arch=resnet50,weights=/w/r50.pt,version=2,labels=/w/labels.txt,name=r50'. "
        f"Keys: {', '.join(ModelConfig.model_fields)} (see docs/tagging.md for the tagging ones). "
        "Or a model registry URI: models:/NAME@ALIAS serves the version the alias points to and follows it "
        "(--registry-* flags; docs/registry.md), models:/NAME/VERSION pins one. "
        "[env VISION_MODELS as a JSON list; default efficientnet_lite0]",
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT: 0 after a clean stop, 2 for an invalid configuration, 1 when it cannot start."""
    from pydantic import ValidationError

    from vision.config.settings import ModelConfig, ServeSettings
    from vision.core.errors import ConfigurationError

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "func", "models") and v is not None}
    try:
        if args.models:
            overrides["models"] = [ModelConfig.parse_spec(spec) for spec in args.models]
        settings = ServeSettings(**overrides)
    except (ValidationError, ConfigurationError) as exc:
        print(f"vision serve: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    from vision.core import tracing

    try:
        tracing.configure(tracing.service_name(settings.services))
    except ConfigurationError as exc:
        print(f"vision serve: invalid tracing configuration: {exc}", file=sys.stderr)
        return 2
    tracing.configure_logging(settings.log_level)
    from vision.runners.server import Endpoints, serve

    def announce(endpoints: Endpoints) -> None:
        names = ", ".join(m.registry or f"{m.served_name}:{m.version}" for m in settings.models)
        if settings.services == ["jobs"]:
            names = "none: jobs only"
        security = ", TLS" + (" with client certificates" if settings.tls_client_ca else "") if endpoints.tls else ""
        print(f"vision serve: gRPC listening on {endpoints.grpc_address} (models: {names}{security})", flush=True)
        if endpoints.health_address:
            print(f"vision serve: plaintext health on {endpoints.health_address}", flush=True)
        print(f"vision serve: metrics at {endpoints.metrics_url}", flush=True)

    try:
        if settings.runner == "ray":
            from vision.runners.ray.runner import run as run_on_ray

            run_on_ray(settings, on_ready=announce)
        else:
            if "jobs" in settings.services:
                tracing.instrument_celery()  # a submit's context travels in the task's headers to the worker
            asyncio.run(serve(settings, on_ready=announce))
    except BrokenPipeError:
        raise  # an OSError, but of our own output: `vision.cli.main` ends the command quietly
    except (ConfigurationError, OSError) as exc:
        print(f"vision serve: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        tracing.shutdown()
    return 0
