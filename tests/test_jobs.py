"""The Jobs gRPC service and `vision jobs` CLI through real `vision serve` processes and a real Redis:
health follows Redis (other services unaffected), validation, NOT_FOUND, cancel of a queued job, watch,
state that survives a restart of the service."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ServerProcess, metric_value, scrape
from test_jobs_helpers import free_port, jobs_server, namespace, redis_url, run_cli, stub, wait_job  # noqa: F401
from vision.v1 import jobs_pb2

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            .status
        )


def _wait_health(address: str, service: str, status: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while _health(address, service) != status:
        assert time.monotonic() < deadline, f"{service} never became {status}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def service(tmp_path_factory, namespace):
    server = jobs_server(tmp_path_factory.mktemp("jobs"), namespace)
    yield server
    server.stop()


def test_jobs_health_follows_redis_and_leaves_the_model_services_alone(tmp_path, photos):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    redis_cmd = [
        "redis-server",
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    own = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    try:
        server = ServerProcess(
            [
                "--services",
                "classification,jobs",
                "--redis-url",
                f"redis://127.0.0.1:{port}/0",
                "--jobs-namespace",
                "healthtest",
            ],
            tmp_path / "serve.log",
        ).wait_ready()
        _wait_health(server.address, "vision.v1.Jobs", SERVING)
        own.terminate()
        own.wait(timeout=10)
        _wait_health(server.address, "vision.v1.Jobs", NOT_SERVING)
        assert _health(server.address, "vision.v1.Classification") == SERVING
        assert _health(server.address, "") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub(server.address).SubmitDownload(
                jobs_pb2.SubmitDownloadRequest(urls=b"http://example.com/a.jpg", out_dir=str(tmp_path)),
                timeout=10,
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (
            f"Redis at redis://127.0.0.1:{port}/0" in info.value.details()
            and "unreachable" in info.value.details()
        )
        assert "jobs: NOT_SERVING: the jobs backend (Redis at" in server.log()
        from vision.v1 import classification_pb2, classification_pb2_grpc, common_pb2

        with grpc.insecure_channel(server.address) as channel:
            response = classification_pb2_grpc.ClassificationStub(channel).Classify(
                classification_pb2.ClassifyRequest(images=[common_pb2.Image(content=photos["coffee.jpg"])]),
                timeout=60,
            )
        assert response.results[0].predictions[0].index == 967
        own = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_health(server.address, "vision.v1.Jobs", SERVING)
        assert _health(server.address, "") == SERVING
    finally:
        if server is not None:
            server.stop()
        own.terminate()
        own.wait(timeout=10)


def test_a_jobs_only_process_starts_without_models_even_without_redis(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    server = ServerProcess(
        ["--services", "jobs", "--redis-url", f"redis://127.0.0.1:{closed}/0"], tmp_path / "s.log"
    ).wait_ready(60)
    try:
        assert _health(server.address, "vision.v1.Jobs") == NOT_SERVING
    finally:
        server.stop()


@pytest.mark.parametrize(
    "request_, fragment",
    [
        (jobs_pb2.SubmitDownloadRequest(out_dir="/tmp/x"), "give the URL list"),
        (
            jobs_pb2.SubmitDownloadRequest(urls=b"http://a/b.jpg", out_dir="relative/dir"),
            "must be an absolute path",
        ),
        (jobs_pb2.SubmitDownloadRequest(urls=b"# nothing\n\n", out_dir="/tmp/x"), "has no URLs"),
        (
            jobs_pb2.SubmitDownloadRequest(
                urls=b"http://a/b.jpg", out_dir="/tmp/x", options=jobs_pb2.DownloadOptions(concurrency=1000)
            ),
            "concurrency 1000 is out of range",
        ),
        (
            jobs_pb2.SubmitFinetuneRequest(
                task="segmentation", data="/d", base="efficientnet_lite0", name="m"
            ),
            "task 'segmentation'",
        ),
        (jobs_pb2.SubmitFinetuneRequest(task="tagging", data="/d", base="", name="m"), "base is required"),
        (
            jobs_pb2.SubmitFinetuneRequest(task="tagging", data="/d", base="models:/x", name="m"),
            "base 'models:/x'",
        ),
        (
            jobs_pb2.SubmitFinetuneRequest(
                task="tagging", data="/d", base="efficientnet_lite0", name="bad name"
            ),
            "name 'bad name'",
        ),
        (
            jobs_pb2.SubmitFinetuneRequest(
                task="tagging", data="/d", base="efficientnet_lite0", name="m", promote_to="latest"
            ),
            "alias",
        ),
        (
            jobs_pb2.SubmitFinetuneRequest(
                task="tagging",
                data="/d",
                base="efficientnet_lite0",
                name="m",
                options=jobs_pb2.FinetuneOptions(epochs=0),
            ),
            "epochs 0 is out of range",
        ),
    ],
)
def test_bad_submissions_are_invalid_argument(service, request_, fragment):
    jobs = stub(service.address)
    method = (
        jobs.SubmitDownload if isinstance(request_, jobs_pb2.SubmitDownloadRequest) else jobs.SubmitFinetune
    )
    with pytest.raises(grpc.RpcError) as info:
        method(request_, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.details(), (
        info.value.details()
    )


def test_unknown_job_is_not_found(service):
    jobs = stub(service.address)
    for call in (
        lambda: jobs.GetJob(jobs_pb2.GetJobRequest(id="0" * 32), timeout=10),
        lambda: jobs.CancelJob(jobs_pb2.CancelJobRequest(id="nope"), timeout=10),
        lambda: list(jobs.WatchJob(jobs_pb2.WatchJobRequest(id="0" * 32), timeout=10)),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_queued_job_is_cancelled_at_once_and_its_state_survives_a_restart(
    service, tmp_path_factory, namespace, tmp_path
):
    # No train worker consumes this namespace's train queue: the job stays queued.
    jobs = stub(service.address)
    request = jobs_pb2.SubmitFinetuneRequest(
        task="tagging",
        data=str(tmp_path),
        base="efficientnet_lite0",
        name="never",
        options=jobs_pb2.FinetuneOptions(epochs=2, seed=3),
    )
    job = jobs.SubmitFinetune(request, timeout=10).job
    assert job.state == jobs_pb2.JOB_STATE_QUEUED and len(job.id) == 32
    assert job.params["task"] == "tagging" and '"epochs": 2' in job.params["options"]
    listed = jobs.ListJobs(
        jobs_pb2.ListJobsRequest(kind=jobs_pb2.JOB_KIND_FINETUNE, states=[jobs_pb2.JOB_STATE_QUEUED]),
        timeout=10,
    )
    assert job.id in [j.id for j in listed.jobs]
    # A queued job sends no further events: `wait --max-wait` still gives up on time.
    started = time.monotonic()
    gave_up = run_cli("jobs", "--target", service.address, "wait", job.id, "--max-wait", "1.5")
    assert gave_up.returncode == 4 and "still queued" in gave_up.stderr, gave_up.stdout + gave_up.stderr
    assert time.monotonic() - started < 15

    # The Jobs service restarts: the job is still there (it lives in Redis).
    restarted = jobs_server(tmp_path_factory.mktemp("again"), namespace)
    try:
        again = stub(restarted.address).GetJob(jobs_pb2.GetJobRequest(id=job.id), timeout=10)
        assert (again.id, again.state, again.params["name"]) == (job.id, jobs_pb2.JOB_STATE_QUEUED, "never")
        events = stub(restarted.address).WatchJob(jobs_pb2.WatchJobRequest(id=job.id), timeout=30)
        first = next(events)
        assert first.job.state == jobs_pb2.JOB_STATE_QUEUED and not first.final
        cancelled = run_cli("jobs", "--target", restarted.address, "cancel", job.id)
        assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout, (
            cancelled.stdout + cancelled.stderr
        )
        last = next(events)
        assert last.final and last.job.state == jobs_pb2.JOB_STATE_CANCELLED
        assert last.job.message == "cancelled before it started" and last.job.cancel_requested
    finally:
        restarted.stop()
    with pytest.raises(grpc.RpcError) as info:
        jobs.CancelJob(jobs_pb2.CancelJobRequest(id=job.id), timeout=10)
    assert (
        info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already ended" in info.value.details()
    )
    waited = run_cli("jobs", "--target", service.address, "wait", job.id)
    assert waited.returncode == 3 and "cancelled" in waited.stdout
    status = run_cli("jobs", "--target", service.address, "status", job.id)
    assert status.returncode == 0 and "CANCELLED" in status.stdout and "param  name: never" in status.stdout
    listing = run_cli("jobs", "--target", service.address, "list", "--state", "cancelled")
    assert job.id in listing.stdout
    text = scrape(service.metrics_url)
    assert (
        metric_value(
            text,
            "vision_requests_total",
            service="vision.v1.Jobs",
            method="CancelJob",
            code="FAILED_PRECONDITION",
        )
        >= 1
    )


def test_cli_help_explains_the_commands():
    out = run_cli("jobs", "--help").stdout
    for command in ("submit-download", "submit-finetune", "status", "list", "cancel", "watch", "wait"):
        assert command in out
    worker = run_cli("worker", "--help").stdout
    assert (
        "--allow-private-addresses" in worker
        and "--queues" in worker
        and "VISION_DOWNLOAD_ALLOW_PRIVATE_ADDRESSES" in worker
    )


# -- the job lease (vision.jobs.runtime.Lease) against the real Redis


@pytest.fixture
def lease_key(redis_url, namespace):  # noqa: F811 (the fixtures imported above)
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    key = f"{namespace}:job:{time.monotonic_ns()}:lease"
    yield client, key
    client.delete(key)


def test_a_lease_admits_one_runner_until_it_is_released(lease_key):
    from vision.jobs.runtime import Lease

    client, key = lease_key
    first, second = Lease(client, key), Lease(client, key)
    assert first.acquire()
    assert client.get(key) == first.token and first.token.startswith(f"{socket.gethostname()}:")
    assert not second.acquire(), "a second delivery waits while the runner is alive"
    first.release()
    assert second.acquire()
    second.release()
    assert client.get(key) is None


def test_a_lease_held_by_a_dead_process_of_this_host_is_taken_over_at_once(lease_key):
    from vision.jobs.runtime import Lease

    client, key = lease_key
    with subprocess.Popen(["sleep", "60"]) as alive:
        try:
            client.set(key, f"{socket.gethostname()}:{alive.pid}:cafe", px=60_000)
            assert not Lease(client, key).acquire(), "a live holder keeps its lease"
        finally:
            alive.kill()
    client.set(key, f"{socket.gethostname()}:{alive.pid}:cafe", px=60_000)  # now reaped: the pid is gone
    taker = Lease(client, key)
    assert taker.acquire()
    assert client.get(key) == taker.token
    taker.release()
    # A holder on another host is only known dead when its lease expires.
    client.set(key, "elsewhere:1:cafe", px=60_000)
    assert not Lease(client, key).acquire()


def test_a_lease_is_renewed_while_held_and_lost_once_taken_over(lease_key):
    from vision.jobs.runtime import Lease

    client, key = lease_key
    lease = Lease(client, key, ttl_s=0.3)
    assert lease.acquire()
    try:
        time.sleep(1.0)  # over three TTLs: only renewal keeps it
        assert client.get(key) == lease.token and not lease.lost.is_set()
        client.set(key, "elsewhere:1:cafe", px=60_000)  # another runner took it over after a stall
        assert lease.lost.wait(10), "the renewal noticed"
    finally:
        lease.release()
    assert client.get(key) == "elsewhere:1:cafe", "release leaves another runner's lease alone"
