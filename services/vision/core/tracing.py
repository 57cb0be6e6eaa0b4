"""OpenTelemetry tracing, off unless the standard `OTEL_*` variables name an OTLP endpoint.

Configured once per process (`configure`, from `vision serve` and `vision worker`) from the variables every
OpenTelemetry SDK reads: `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`, `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`
(`grpc` or `http/protobuf`), `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER` (`otlp`, `console`, `none`). The SDK itself ignores a bad value
with a warning and runs with a default; here a bad value stops start-up with a message naming it, as every
other flag does.

While tracing is off every helper below returns at once without touching OpenTelemetry, so the serving
path pays one global lookup per stage (measured in loadtest/tracing_cost.py).

Spans timed in another thread (decode and views in the decode pool, queue wait and inference in a batcher's
worker) are recorded after the fact with `record`, against the request's context captured on the event
loop with `capture`: contextvars do not follow work into an executor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import urllib.parse
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from vision.core.errors import ConfigurationError

log = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "http/protobuf")
EXPORTERS = ("otlp", "console", "none")
SAMPLERS = (
    "always_on", "always_off", "traceidratio",
    "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio",
)
_RATIO_SAMPLERS = ("traceidratio", "parentbased_traceidratio")

# The tracer while tracing is on; None is the fast path every helper checks first.
_tracer: Any = None
_provider: Any = None
_exporter_in_use: Any = None


@dataclass(frozen=True)
class TracingConfig:
    exporter: str
    endpoint: str | None
    protocol: str
    sampler: str
    sampler_arg: float | None
    service_name: str


def _first(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None


def _check_endpoint(name: str, value: str, protocol: str) -> str:
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigurationError(
            f"{name}={value!r} is not an OTLP endpoint: give a URL such as http://127.0.0.1:4317 "
            f"({'grpc' if protocol == 'grpc' else 'http/protobuf: http://127.0.0.1:4318'})"
        )
    try:
        port = parsed.port
    except ValueError:
        raise ConfigurationError(f"{name}={value!r} has a port that is not a number from 1 to 65535") from None
    if port == 0:
        raise ConfigurationError(f"{name}={value!r} has port 0; name the receiver's port")
    return value


def config_from_env(environ: Mapping[str, str], default_service: str) -> TracingConfig | None:
    """The tracing configuration the environment asks for, None when tracing is off (no endpoint, the SDK
    disabled, or exporter `none`); ConfigurationError naming the variable when a value is bad."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    if exporter not in EXPORTERS:
        raise ConfigurationError(f"OTEL_TRACES_EXPORTER={exporter!r} is not supported: use one of {', '.join(EXPORTERS)}")
    if exporter == "none":
        return None
    found = _first(environ, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
    protocol = found[1] if found else "grpc"
    if protocol not in PROTOCOLS:
        raise ConfigurationError(f"{found[0]}={protocol!r} is not supported: use grpc or http/protobuf")  # type: ignore[index]
    endpoint_var = _first(environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter == "otlp" and endpoint_var is None:
        return None  # off by default: nothing to send spans to
    endpoint = _check_endpoint(*endpoint_var, protocol) if endpoint_var else None
    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    if sampler not in SAMPLERS:
        raise ConfigurationError(f"OTEL_TRACES_SAMPLER={sampler!r} is not a sampler: use one of {', '.join(SAMPLERS)}")
    arg_text = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    sampler_arg = None
    if sampler in _RATIO_SAMPLERS:
        try:
            sampler_arg = float(arg_text) if arg_text else 1.0
        except ValueError:
            sampler_arg = -1.0
        if not 0.0 <= sampler_arg <= 1.0:
            raise ConfigurationError(f"OTEL_TRACES_SAMPLER_ARG={arg_text!r} is not a ratio from 0 to 1 for {sampler}")
    service = environ.get("OTEL_SERVICE_NAME", "").strip() or default_service
    return TracingConfig(exporter, endpoint, protocol, sampler, sampler_arg, service)


def _sampler(config: TracingConfig) -> Any:
    from opentelemetry.sdk.trace import sampling

    ratio = config.sampler_arg if config.sampler_arg is not None else 1.0
    return {
        "always_on": lambda: sampling.ALWAYS_ON,
        "always_off": lambda: sampling.ALWAYS_OFF,
        "traceidratio": lambda: sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": lambda: sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": lambda: sampling.ParentBased(sampling.TraceIdRatioBased(ratio)),
    }[config.sampler]()


def _exporter(config: TracingConfig) -> Any:
    if config.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    # The exporters read their endpoint, headers, certificates, compression and timeout from the same
    # variables, including the http/protobuf rule that a generic endpoint gets /v1/traces appended.
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]
    return OTLPSpanExporter()


def configure(default_service: str, environ: Mapping[str, str] | None = None) -> TracingConfig | None:
    """Turn tracing on when the environment asks for it (see the module docstring); idempotent. Returns the
    configuration in force, None when tracing stays off. ConfigurationError for a bad value."""
    global _tracer, _provider, _exporter_in_use
    config = config_from_env(os.environ if environ is None else environ, default_service)
    if config is None or _tracer is not None:
        return config
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: config.service_name}), sampler=_sampler(config), shutdown_on_exit=False
    )
    exporter = _exporter(config)
    # shutdown_on_exit off: an atexit flush to a collector that is down would hold the exit (see shutdown).
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider, _exporter_in_use = provider, exporter
    _tracer = provider.get_tracer("vision")
    log.info("tracing on: %s spans to %s (%s), sampler %s, service %s", config.exporter, config.endpoint or "stdout",
             config.protocol, config.sampler, config.service_name)
    return config


def service_name(services: Sequence[str]) -> str:
    """The default `service.name` of a serving process: `vision` for the embedded all-in-one, else named by
    what it hosts (`vision-classification`), as one Deployment per service is in Kubernetes."""
    from_all = {"classification", "tagging", "features", "delf"}
    return "vision" if not services or set(services) >= from_all else "vision-" + "-".join(services)


def instrument_celery() -> None:
    """Celery's OpenTelemetry instrumentation, while tracing is on: a producer span per submitted task with the
    context in the task's headers, and on a worker a span per task run continuing it."""
    if _provider is None:
        return
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    instrumentor = CeleryInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=_provider)


def enabled() -> bool:
    return _tracer is not None


def provider() -> Any:
    """The SDK tracer provider (for the instrumentations), None while tracing is off."""
    return _provider


def shutdown(timeout_s: float = 3.0) -> None:
    """Export what is buffered, for at most `timeout_s`, and stop (at process exit; later spans are dropped).
    Bounded because a collector that is down must not hold up a SIGTERM: the SDK's flush and shutdown wait
    for the exporter's retries, up to OTEL_EXPORTER_OTLP_TIMEOUT (read as seconds by this SDK, 10 by default)
    for each batch, and its force_flush ignores its timeout (opentelemetry-python#4568). Past the bound the
    exporter is shut down, which ends its retries, and what was left is dropped."""
    global _tracer, _provider, _exporter_in_use
    provider, exporter = _provider, _exporter_in_use
    _tracer = _provider = _exporter_in_use = None
    if provider is None:
        return
    import threading

    stopping = threading.Thread(target=provider.shutdown, name="tracing-shutdown", daemon=True)
    stopping.start()
    stopping.join(timeout_s)
    if stopping.is_alive():
        log.warning("tracing: spans not exported within %.1f s of shutting down are dropped", timeout_s)
        exporter.shutdown()
        stopping.join(1.0)


def capture() -> Any:
    """The current context, to parent spans recorded in another thread; None while tracing is off or when
    no span is recording (an unsampled request costs its stages nothing)."""
    if _tracer is None:
        return None
    from opentelemetry import context, trace

    current = context.get_current()
    return current if trace.get_current_span(current).is_recording() else None


@contextlib.contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None, *, kind: str = "internal") -> Iterator[Any]:
    """A span around a block, child of the current one; yields it (None while tracing is off)."""
    if _tracer is None:
        yield None
        return
    from opentelemetry import trace

    with _tracer.start_as_current_span(name, kind=getattr(trace.SpanKind, kind.upper()), attributes=attributes) as current:
        yield current


def _link(target: Any) -> Any:
    from opentelemetry import trace

    if isinstance(target, trace.Span):
        return trace.Link(target.get_span_context())
    return trace.Link(trace.get_current_span(target).get_span_context())  # a captured context


def record(
    name: str,
    parent: Any,
    start_ns: int,
    end_ns: int,
    attributes: Mapping[str, Any] | None = None,
    links: Sequence[Any] = (),
) -> Any:
    """A finished span timed elsewhere, under `parent` (a `capture`d context), linked to `links` (spans or
    captured contexts); returned, so that others can link to it. None while tracing is off or without a parent."""
    if _tracer is None or parent is None:
        return None
    recorded = _tracer.start_span(
        name, context=parent, start_time=start_ns, attributes=attributes, links=[_link(t) for t in links if t is not None]
    )
    recorded.end(end_time=end_ns)
    return recorded


def inject(headers: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """`headers` with the current context's W3C `traceparent` (and `tracestate`), for an outgoing call."""
    if _tracer is not None:
        from opentelemetry import propagate

        propagate.inject(headers)
    return headers


def now_ns() -> int:
    return time.time_ns()


class TraceIdsFilter(logging.Filter):
    """Adds `trace_ids` to every record: ` trace_id=… span_id=…` while a span is active, else empty, so a
    log line can be found from its trace and back (the format ends with `%(trace_ids)s`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.trace_ids = ""
        if _tracer is not None:
            from opentelemetry import trace

            context = trace.get_current_span().get_span_context()
            if context.is_valid:
                record.trace_ids = f" trace_id={context.trace_id:032x} span_id={context.span_id:016x}"
        return True


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(trace_ids)s"


def configure_logging(level: int | str, log_format: str = LOG_FORMAT) -> None:
    """The processes' log format (ending with `%(trace_ids)s`): trace and span ids appended while a span is active."""
    logging.basicConfig(level=level, format=log_format)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, TraceIdsFilter) for f in handler.filters):
            handler.addFilter(TraceIdsFilter())
