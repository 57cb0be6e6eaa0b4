"""OpenTelemetry tracing through the real processes, into a real OTLP receiver on loopback (tests/otlp.py):
a caller's W3C context continued by `vision serve` (RPC → decode, views, queue, inference linked to its
batch, postprocess), a DELF pyramid's levels, both OTLP protocols, a Celery job joining the submitting call's
trace, trace ids in the log, and bad OTEL_* values refused at start."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
import pytest
from conftest import ServerProcess, classify_request, encode, photo
from otlp import GrpcReceiver, HttpReceiver, Span, exporting_env, traceparent
from test_jobs_helpers import Site, Worker, jobs_server, namespace, redis_url, stub, wait_job  # noqa: F401
from vision.core import tracing
from vision.core.errors import ConfigurationError
from vision.v1 import classification_pb2_grpc, common_pb2, delf_pb2, delf_pb2_grpc, jobs_pb2

SERVER_KIND, CLIENT_KIND, PRODUCER_KIND, CONSUMER_KIND = 2, 3, 4, 5  # opentelemetry.proto Span.SpanKind
ERROR = 2  # Status.STATUS_CODE_ERROR


@pytest.fixture(scope="module")
def receiver():
    r = GrpcReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def traced(tmp_path_factory, receiver):
    """The embedded default with tracing on, exporting over OTLP/gRPC."""
    log = tmp_path_factory.mktemp("traced") / "serve.log"
    proc = ServerProcess(
        ["--services", "classification,delf", "--log-level", "INFO"], log, env=exporting_env(receiver)
    ).wait_ready()
    yield proc
    proc.stop()


def _has(trace_id: str, *names: str):
    """A wait condition: every span named is in `trace_id` (the RPC span ends last, after its stages, so it
    can arrive in a later export than they do)."""
    return lambda spans: set(names) <= {s.name for s in spans if s.trace_id == trace_id}


def _children(spans: list[Span], parent: Span) -> dict[str, list[Span]]:
    out: dict[str, list[Span]] = {}
    for s in spans:
        if s.parent_id == parent.span_id and s.trace_id == parent.trace_id:
            out.setdefault(s.name, []).append(s)
    return out


def _classify(address: str, content: bytes, metadata: tuple = ()) -> object:
    with grpc.insecure_channel(address) as ch:
        return classification_pb2_grpc.ClassificationStub(ch).Classify(
            classify_request(content, content), timeout=60, metadata=metadata
        )


def test_a_callers_trace_continues_through_every_stage_of_a_classify(traced, receiver, photos):
    header, trace_id, caller_span = traceparent()
    response = _classify(traced.address, photos["coffee.jpg"], (("traceparent", header),))
    assert response.results[0].predictions[0].label == "espresso"
    spans = receiver.wait_for(_has(trace_id, "postprocess", "/vision.v1.Classification/Classify"))
    mine = [s for s in spans if s.trace_id == trace_id]
    (rpc,) = [s for s in mine if s.name == "/vision.v1.Classification/Classify"]
    assert rpc.parent_id == caller_span and rpc.kind == SERVER_KIND and rpc.service == "vision-classification-delf"
    stages = _children(mine, rpc)
    # Two images: each decoded and cut into its view; both crops in one forward pass (one shape).
    assert len(stages["decode"]) == 2 and len(stages["views"]) == 2
    assert sorted(s.attributes["vision.image.index"] for s in stages["decode"]) == [0, 1]
    assert all(s.attributes["vision.views"] == 1 for s in stages["views"])
    assert len(stages["queue"]) == 1 and len(stages["inference"]) == 1 and len(stages["postprocess"]) == 1
    (inference,) = stages["inference"]
    assert inference.attributes["vision.rows"] == 2 and inference.attributes["vision.model"]
    # The inference links to the batch span it ran in, which carries the batch's size and request count.
    ((batch_trace, batch_id),) = inference.links
    (batch,) = [s for s in spans if s.span_id == batch_id and s.trace_id == batch_trace]
    assert batch.name == "batch" and batch.attributes["vision.batch.size"] >= 2 and batch.attributes["vision.batch.requests"] >= 1
    # Stages in order, inside the RPC.
    queue, post = stages["queue"][0], stages["postprocess"][0]
    assert rpc.start_ns <= min(s.start_ns for s in stages["decode"])
    assert max(s.end_ns for s in stages["views"]) <= queue.end_ns + 1_000_000
    assert queue.end_ns <= inference.start_ns + 1_000_000 and inference.end_ns <= post.start_ns + 1_000_000
    assert post.end_ns <= rpc.end_ns


def test_a_call_without_context_starts_a_trace_and_an_unsampled_caller_is_not_traced(traced, receiver, photos):
    header, unsampled_trace, _ = traceparent(sampled=False)
    _classify(traced.address, photos["chelsea.jpg"], (("traceparent", header),))
    before = {s.trace_id for s in receiver.spans()}
    _classify(traced.address, photos["chelsea.jpg"])
    spans = receiver.wait_for(lambda spans: {"postprocess", "/vision.v1.Classification/Classify"} <= {
        s.name for s in spans if s.trace_id not in before})
    (new_rpc,) = [s for s in spans if s.trace_id not in before and s.name == "/vision.v1.Classification/Classify"]
    assert new_rpc.parent_id == ""  # a root: the server started the trace
    assert receiver.trace(unsampled_trace) == []  # parentbased_always_on follows the caller's "not sampled"


def test_a_bad_image_is_recorded_on_its_span_and_the_server_keeps_serving(traced, receiver, photos):
    header, trace_id, _ = traceparent()
    with pytest.raises(grpc.RpcError) as failed:
        _classify(traced.address, b"not an image", (("traceparent", header),))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    receiver.wait_for(lambda spans: any(s.trace_id == trace_id and s.kind == SERVER_KIND for s in spans))
    (rpc,) = [s for s in receiver.trace(trace_id) if s.name == "/vision.v1.Classification/Classify"]
    # The status code on the span; not an error status: by the gRPC semantic conventions a caller's mistake is
    # not a server span's failure (INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED... are).
    assert rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0] and rpc.status_code != ERROR
    assert _classify(traced.address, photos["coffee.jpg"]).results[0].predictions[0].label == "espresso"


def test_a_delf_pyramid_shows_one_inference_per_level(traced, receiver):
    header, trace_id, _ = traceparent()
    scales = [1.0, 0.7071, 0.5]
    request = delf_pb2.DelfExtractRequest(
        images=[common_pb2.Image(id="m", content=encode(photo("motorcycle_left.png"), "JPEG"))],
        options=delf_pb2.DelfExtractOptions(scales=scales),
    )
    with grpc.insecure_channel(traced.address, options=[("grpc.max_receive_message_length", 1 << 28)]) as ch:
        response = delf_pb2_grpc.DelfStub(ch).Extract(request, timeout=120, metadata=(("traceparent", header),))
    assert len(response.results[0].features.keypoints) > 0
    spans = receiver.wait_for(_has(trace_id, "postprocess", "/vision.v1.Delf/Extract"))
    (rpc,) = [s for s in spans if s.trace_id == trace_id and s.name == "/vision.v1.Delf/Extract"]
    stages = _children(spans, rpc)
    # Each level is its own input shape, so its own queue wait and forward pass.
    assert len(stages["inference"]) == len(scales) and len(stages["queue"]) == len(scales)
    assert stages["views"][0].attributes["vision.views"] == len(scales)


def test_http_protobuf_exports_the_same_spans(tmp_path, photos):
    http = HttpReceiver()
    proc = ServerProcess(["--services", "classification"], tmp_path / "serve.log",
                         env=exporting_env(http, "http/protobuf", OTEL_SERVICE_NAME="classify-http")).wait_ready()
    try:
        header, trace_id, _ = traceparent()
        _classify(proc.address, photos["coffee.jpg"], (("traceparent", header),))
        spans = http.wait_for(_has(trace_id, "postprocess", "/vision.v1.Classification/Classify"))
        names = {s.name for s in spans if s.trace_id == trace_id}
        assert {"/vision.v1.Classification/Classify", "decode", "views", "queue", "inference", "postprocess"} <= names
        assert {s.service for s in spans} == {"classify-http"}
    finally:
        proc.stop()
        http.close()


def test_an_unreachable_receiver_costs_no_answers(tmp_path, photos):
    """A collector that is down must not fail or stall requests, nor hold up a SIGTERM (the exporter retries
    for 10 s by default): spans are dropped, answers keep coming, the server stops within its grace."""
    dead = GrpcReceiver()
    dead.close()  # nothing listens on its port now
    proc = ServerProcess(["--services", "classification"], tmp_path / "serve.log",
                         env=exporting_env(dead)).wait_ready()
    try:
        for _ in range(5):
            header, _, _ = traceparent()
            assert _classify(proc.address, photos["coffee.jpg"], (("traceparent", header),)).results[0].predictions[0].label == "espresso"
        time.sleep(1)  # the exporter is retrying now
    finally:
        stopping = time.monotonic()
        code = proc.stop()
        # The server's 10 s grace for RPCs (none in flight) and tracing's 3 s bound, well under the 30 s kill.
        assert code == 0 and time.monotonic() - stopping < 20, proc.log()[-3000:]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "127.0.0.1:4317"}, "OTEL_EXPORTER_OTLP_ENDPOINT='127.0.0.1:4317' is not an OTLP endpoint"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:99999"}, "has a port that is not a number from 1 to 65535"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_TRACES_SAMPLER": "sometimes"},
         "OTEL_TRACES_SAMPLER='sometimes' is not a sampler"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_TRACES_SAMPLER": "traceidratio",
          "OTEL_TRACES_SAMPLER_ARG": "1.5"}, "OTEL_TRACES_SAMPLER_ARG='1.5' is not a ratio from 0 to 1"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
         "OTEL_EXPORTER_OTLP_PROTOCOL='http/json' is not supported: use grpc or http/protobuf"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin' is not supported"),
    ],
)
def test_bad_tracing_values_are_refused_with_the_variable_named(env, message):
    with pytest.raises(ConfigurationError, match=None) as refused:
        tracing.config_from_env(env, "vision")
    assert message in str(refused.value)


def test_tracing_is_off_by_default_and_the_standard_switches_turn_it_off():
    assert tracing.config_from_env({}, "vision") is None
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    assert tracing.config_from_env({**on, "OTEL_SDK_DISABLED": "true"}, "vision") is None
    assert tracing.config_from_env({**on, "OTEL_TRACES_EXPORTER": "none"}, "vision") is None
    config = tracing.config_from_env({**on, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}, "x")
    assert (config.protocol, config.sampler, config.sampler_arg, config.service_name) == ("grpc", "parentbased_traceidratio", 0.25, "x")


@pytest.mark.parametrize("command", [["serve", "--port", "0", "--metrics-port", "0"], ["worker", "--metrics-port", "0"]])
def test_serve_and_worker_stop_at_start_on_a_bad_value(command):
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_TRACES_SAMPLER": "often"}
    done = subprocess.run([sys.executable, "-m", "vision.cli", *command], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "invalid tracing configuration: OTEL_TRACES_SAMPLER='often' is not a sampler" in done.stderr


def test_a_download_job_joins_the_submitting_calls_trace(tmp_path, namespace, receiver):  # noqa: F811
    """Submit (the Jobs RPC) → Celery's publish → the worker's run of the task, one trace across three
    processes (the worker's pool process exports its own spans)."""
    env = exporting_env(receiver)
    worker = Worker(tmp_path / "worker.log", namespace, "--queues", "download", "--allow-private-addresses",
                    "127.0.0.0/8", env=env).wait_ready(("download",))
    server = ServerProcess(["--services", "jobs", "--redis-url", "redis://127.0.0.1:6379/0", "--jobs-namespace", namespace],
                           tmp_path / "serve.log", env=env).wait_ready()
    site = Site()
    try:
        site.files["/a.png"] = (encode(photo("coffee.png").resize((96, 64)), "PNG"), "image/png")
        header, trace_id, caller = traceparent()
        jobs = stub(server.address)
        submitted = jobs.SubmitDownload(
            jobs_pb2.SubmitDownloadRequest(urls=f"{site.url('/a.png')}\n".encode(), out_dir=str(tmp_path / "out")),
            timeout=30, metadata=(("traceparent", header),),
        )
        job = wait_job(jobs, submitted.job.id, 120)
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job
        spans = receiver.wait_for(lambda spans: {CONSUMER_KIND, PRODUCER_KIND, SERVER_KIND} <= {
            s.kind for s in spans if s.trace_id == trace_id})
        mine = {s.name: s for s in spans if s.trace_id == trace_id}
        rpc = mine["/vision.v1.Jobs/SubmitDownload"]
        (publish,) = [s for s in mine.values() if s.kind == PRODUCER_KIND]
        (run,) = [s for s in mine.values() if s.kind == CONSUMER_KIND]
        assert rpc.parent_id == caller and rpc.service == "vision-jobs"
        assert publish.parent_id == rpc.span_id and publish.service == "vision-jobs"
        assert run.parent_id == publish.span_id and run.service == "vision-worker"
        # The worker's log line from inside the task's span names the trace; lines outside any span do not.
        lines = worker.log().splitlines()
        (started,) = [line for line in lines if f"job {job.id} (download) attempt 1" in line]
        assert f"trace_id={trace_id}" in started and f"span_id={run.span_id}" in started
        assert all("trace_id=" not in line for line in lines if "ready" in line)
    finally:
        site.close()
        server.stop()
        worker.stop()
