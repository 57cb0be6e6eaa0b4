"""A real OTLP trace receiver on loopback, for the tracing tests: the collector's TraceService over gRPC
(opentelemetry-proto's generated service), or OTLP/HTTP's POST /v1/traces with a protobuf body. Spans are
kept flat, with their resource's service.name, so tests can rebuild the trees they expect."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict = field(hash=False)
    links: tuple[tuple[str, str], ...]  # (trace id, span id)
    status_code: int
    start_ns: int
    end_ns: int


def _value(any_value) -> object:
    which = any_value.WhichOneof("value")
    return getattr(any_value, which) if which else None


def _spans(request: trace_service_pb2.ExportTraceServiceRequest) -> list[Span]:
    out = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope in resource_spans.scope_spans:
            for s in scope.spans:
                out.append(Span(
                    service=str(resource.get("service.name", "")),
                    name=s.name,
                    trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(),
                    parent_id=s.parent_span_id.hex(),
                    kind=s.kind,
                    attributes={a.key: _value(a.value) for a in s.attributes},
                    links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in s.links),
                    status_code=s.status.code,
                    start_ns=s.start_time_unix_nano,
                    end_ns=s.end_time_unix_nano,
                ))
    return out


_ID_KEYS = ("traceId", "spanId", "parentSpanId")


def _from_json(body: bytes) -> trace_service_pb2.ExportTraceServiceRequest:
    """OTLP/JSON, whose ids are hex strings where protobuf's JSON mapping expects base64."""
    import base64
    import json

    from google.protobuf import json_format

    def fix(node: object) -> object:
        if isinstance(node, dict):
            return {k: base64.b64encode(bytes.fromhex(v)).decode() if k in _ID_KEYS and isinstance(v, str) else fix(v)
                    for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    return json_format.ParseDict(fix(json.loads(body)), trace_service_pb2.ExportTraceServiceRequest(),
                                 ignore_unknown_fields=True)


class Receiver:
    """Collects every exported span; `endpoint` is what OTEL_EXPORTER_OTLP_ENDPOINT should say."""

    def __init__(self) -> None:
        self._spans: list[Span] = []
        self._lock = threading.Lock()
        self.exports = 0

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        spans = _spans(request)
        with self._lock:
            self._spans.extend(spans)
            self.exports += 1

    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    def wait_for(self, condition: Callable[[list[Span]], bool], timeout: float = 60.0) -> list[Span]:
        """The spans once `condition` holds on them; AssertionError listing what arrived when it does not."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            if condition(spans):
                return spans
            if time.monotonic() > deadline:
                shown = "\n".join(f"  {s.service} {s.name} trace={s.trace_id} parent={s.parent_id}" for s in spans[-60:])
                raise AssertionError(f"the spans wanted did not arrive in {timeout:.0f} s; got {len(spans)}:\n{shown}")
            time.sleep(0.1)

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans() if s.trace_id == trace_id]


class GrpcReceiver(Receiver):
    def __init__(self) -> None:
        super().__init__()
        receiver = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 (the generated name)
                receiver.add(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.stop(0)


class HttpReceiver(Receiver):
    def __init__(self) -> None:
        super().__init__()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                kind = self.headers.get("Content-Type", "")
                if self.path != "/v1/traces" or not kind.startswith(("application/x-protobuf", "application/json")):
                    receiver.refused.append((self.path, kind))
                    self.send_response(404)
                    self.end_headers()
                    return
                # OTLP/HTTP has a JSON encoding too (Triton's opentelemetry-cpp exporter sends it).
                receiver.add(_from_json(body) if kind.startswith("application/json")
                             else trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.refused: list[tuple[str, str | None]] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def traceparent(sampled: bool = True) -> tuple[str, str, str]:
    """A caller's own W3C trace context: (header value, trace id, parent span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


def exporting_env(receiver: Receiver, protocol: str = "grpc", **extra: str) -> dict[str, str]:
    """The standard variables that point a process's spans at `receiver`, exported every 100 ms."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        **extra,
    }
