"""`vision serve --runner ray` end to end: a real local Ray (2 CPUs) in its own network namespace, Serve's gRPC
proxy carrying vision.v1, and the same gRPC client code as the other end-to-end tests.

The server under test is the real CLI in a child process; the tests reach it only through 127.0.0.1. They
need root (a private network namespace); without it they are skipped with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ServerProcess, classify_request, metric_value, scrape
from vision.v1 import classification_pb2_grpc, common_pb2, features_pb2_grpc, tagging_pb2, tagging_pb2_grpc

pytest.importorskip("ray")

REPLICA = "ray::ServeReplica:vision:VisionIngress"


def _can_unshare() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare(1) is missing"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    return None if probe.returncode == 0 else f"no private network namespace here: {probe.stderr.decode().strip()}"


_NO_NETNS = _can_unshare()
needs_netns = pytest.mark.skipif(_NO_NETNS is not None, reason=_NO_NETNS or "")


def descendants(pid: int) -> dict[int, str]:
    """pid → command line of every process below `pid`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, str] = {}
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            try:
                found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            stack.append(child)
    return found


def replica_pids(server: ServerProcess) -> list[int]:
    return [pid for pid, cmd in descendants(server.proc.pid).items() if cmd.startswith(REPLICA)]


def alive(pid: int) -> bool:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("ray") / "serve.log"
    config = log.parent / "serve-vision.yaml"
    proc = ServerProcess(
        ["--runner", "ray", "--ray-num-cpus", "2", "--threads", "2", "--grace-seconds", "10",
         "--max-batch-size", "8", "--ray-config-out", str(config), "--services", "classification,tagging,features"],
        log,
    )
    proc.wait_ready(timeout=240)
    proc.config_path = config  # type: ignore[attr-defined]
    yield proc
    proc.stop(timeout=90)


@pytest.fixture(scope="module")
def ray_channel(ray_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(ray_server.address, options=[("grpc.max_send_message_length", 1 << 30)]) as ch:
        yield ch


@needs_netns
def test_coffee_is_espresso_through_the_ray_proxy(ray_channel, photos):
    classifier = classification_pb2_grpc.ClassificationStub(ray_channel)
    response = classifier.Classify(classify_request(photos["coffee.png"], top_k=5), timeout=60)
    assert (response.model.name, response.model.version) == ("efficientnet_lite0", "1")
    top = response.results[0].predictions[0]
    assert (top.index, top.label) == (967, "espresso") and top.score > 0.7
    response = classifier.Classify(classify_request(photos["chelsea.png"], photos["coffee.jpg"], top_k=1), timeout=60)
    assert [r.image_id for r in response.results] == ["img0", "img1"]
    assert response.results[0].predictions[0].index in range(281, 286) and response.results[1].predictions[0].index == 967


@needs_netns
def test_every_service_keeps_its_own_methods(ray_server, ray_channel, photos):
    """Four services have a ListModels and two an Extract: each call reaches its own service's method."""
    tags = tagging_pb2_grpc.TaggingStub(ray_channel).Tag(
        tagging_pb2.TagRequest(images=[common_pb2.Image(id="c", content=photos["coffee.jpg"])]), timeout=60
    )
    assert any(t.label == "espresso" for t in tags.results[0].tags)
    assert any(t.from_hierarchy and t.label == "beverage" for t in tags.results[0].tags)
    classification = classification_pb2_grpc.ClassificationStub(ray_channel).ListModels(common_pb2.ListModelsRequest(), timeout=30)
    tagging = tagging_pb2_grpc.TaggingStub(ray_channel).ListModels(common_pb2.ListModelsRequest(), timeout=30)
    features = features_pb2_grpc.FeaturesStub(ray_channel).ListModels(common_pb2.ListModelsRequest(), timeout=30)
    assert [m.name for m in classification.models] == [m.name for m in tagging.models] == ["efficientnet_lite0"]
    assert "gem" in features.models[0].recipes  # a ListFeatureModelsResponse
    assert features.models[0].model.name == "efficientnet_lite0"
    deadline = time.monotonic() + 20  # each answered by its own servicer (replicas push metrics every 2 s)
    while True:
        text = scrape(ray_server.metrics_url)
        counts = [metric_value(text, "vision_requests_total", service=s, method="ListModels", code="OK")
                  for s in ("vision.v1.Classification", "vision.v1.Tagging", "vision.v1.Features")]
        if all(counts) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert all(c >= 1 for c in counts), counts


@needs_netns
def test_bad_input_keeps_its_status_through_the_proxy(ray_channel, photos):
    classifier = classification_pb2_grpc.ClassificationStub(ray_channel)
    cases = [
        (classify_request(photos["coffee.jpg"], b"not an image at all"), grpc.StatusCode.INVALID_ARGUMENT, "image 1 (id 'img1')"),
        (classify_request(), grpc.StatusCode.INVALID_ARGUMENT, "no images"),
        (classify_request(photos["coffee.jpg"], model="nope"), grpc.StatusCode.NOT_FOUND, "efficientnet_lite0"),
        (classify_request(photos["coffee.jpg"], top_k=5000), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    ]
    for request, code, needle in cases:
        with pytest.raises(grpc.RpcError) as err:
            classifier.Classify(request, timeout=60)
        assert err.value.code() == code, err.value.details()
        assert needle in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # a service this application does not host
        from vision.v1 import delf_pb2_grpc

        delf_pb2_grpc.DelfStub(ray_channel).ListModels(common_pb2.ListModelsRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert classifier.Classify(classify_request(photos["coffee.jpg"]), timeout=60).results[0].predictions[0].index == 967


@needs_netns
def test_health_and_reflection_through_the_proxy(ray_channel):
    health = health_pb2_grpc.HealthStub(ray_channel)
    for service in ("", "vision.v1.Classification", "vision.v1.Tagging", "vision.v1.Features"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="vision.v1.Delf"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    database = ProtoReflectionDescriptorDatabase(ray_channel)
    services = set(database.get_services())
    assert {"vision.v1.Classification", "vision.v1.Tagging", "vision.v1.Features", "grpc.health.v1.Health"} <= services
    assert "vision.v1.Delf" not in services and not any(s.startswith("ray.") for s in services)
    assert database.FindFileContainingSymbol("vision.v1.Classification").name.endswith("classification.proto")


@needs_netns
def test_concurrent_clients_are_batched_and_metrics_keep_our_names(ray_server, ray_channel, photos):
    classifier = classification_pb2_grpc.ClassificationStub(ray_channel)
    request = classify_request(photos["coffee.jpg"], top_k=1)
    before = scrape(ray_server.metrics_url)

    def client(_: int) -> list[int]:
        return [classifier.Classify(request, timeout=60).results[0].predictions[0].index for _ in range(6)]

    with ThreadPoolExecutor(16) as pool:
        answers = [i for batch in pool.map(client, range(16)) for i in batch]
    assert answers == [967] * 96
    deadline = time.monotonic() + 20  # replicas push their metrics every 2 s
    while True:
        text = scrape(ray_server.metrics_url)
        passes = metric_value(text, "vision_inference_batch_size_count") - metric_value(before, "vision_inference_batch_size_count")
        images = metric_value(text, "vision_inference_batch_size_sum") - metric_value(before, "vision_inference_batch_size_sum")
        if images >= 96 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert images >= 96 and passes > 0
    assert images / passes > 1.5, f"{images} images in {passes} forward passes: not batched"
    ok = metric_value(text, "vision_requests_total", service="vision.v1.Classification", method="Classify", code="OK")
    assert ok >= 96 and 'replica="VisionIngress#' in text
    assert metric_value(text, "vision_model_info", model="efficientnet_lite0", backend="onnxruntime") == 1
    assert re.search(r"^ray_\w+", text, re.M), "Ray's own metrics are exported alongside ours"


@needs_netns
def test_nothing_started_listens_beyond_loopback(ray_server):
    """Ray's processes live in a network namespace with only `lo`; in ours the server holds only its two
    loopback listeners."""
    tree = descendants(ray_server.proc.pid) | {ray_server.proc.pid: "vision serve"}
    assert any("raylet" in cmd for cmd in tree.values()) and replica_pids(ray_server)
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    ours = [line for line in listening if any(f"pid={pid}," in line for pid in tree)]
    assert len(ours) == 2, ours  # gRPC and metrics
    for line in ours:
        local = line.split()[3]
        assert local.startswith("127.0.0.1:"), line
        assert not local.startswith(("0.0.0.0:", "*:", "[::]:")), line
    own_ns = os.readlink("/proc/self/ns/net")
    raylet = next(pid for pid, cmd in tree.items() if "raylet" in cmd)
    assert os.readlink(f"/proc/{raylet}/ns/net") != own_ns
    inside = subprocess.run(
        ["nsenter", f"--net=/proc/{raylet}/ns/net", "ip", "-o", "link"], capture_output=True, text=True, check=True
    ).stdout
    assert [line.split(":")[1].strip() for line in inside.splitlines()] == ["lo"]


@needs_netns
def test_serve_config_written_for_serve_run(ray_server):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(ray_server.config_path.read_text())
    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks
    app = config["applications"][0]
    assert app["import_path"] == "vision.runners.ray.app:build_app"
    assert config["grpc_options"]["port"] == int(ray_server.address.rsplit(":", 1)[1])
    assert config["http_options"]["host"] == "127.0.0.1"
    (ingress,) = app["deployments"]
    assert ingress["user_config"] == {"max_batch_size": 8, "max_wait_ms": 0.0}


@needs_netns
def test_killed_replica_is_replaced_and_requests_resume(ray_server, ray_channel, photos):
    classifier = classification_pb2_grpc.ClassificationStub(ray_channel)
    request = classify_request(photos["coffee.jpg"], top_k=1)
    (victim,) = replica_pids(ray_server)
    os.kill(victim, signal.SIGKILL)
    started = time.monotonic()
    errors: list[str] = []
    while True:
        try:
            answer = classifier.Classify(request, timeout=10)
            break
        except grpc.RpcError as exc:
            errors.append(exc.code().name)
            assert time.monotonic() - started < 120, f"no answer 120 s after the kill; errors {errors[-5:]}"
            time.sleep(0.5)
    assert answer.results[0].predictions[0].index == 967
    (replacement,) = replica_pids(ray_server)
    assert replacement != victim and not alive(victim)
    for _ in range(5):  # and it keeps answering
        assert classifier.Classify(request, timeout=30).results[0].predictions[0].index == 967


@needs_netns
def test_sigterm_drains_in_flight_requests_and_leaves_no_ray_process(ray_server, ray_channel, photos):
    classifier = classification_pb2_grpc.ClassificationStub(ray_channel)
    request = classify_request(*[photos["coffee.jpg"]] * 8, top_k=1)
    classifier.Classify(request, timeout=60)
    tree = descendants(ray_server.proc.pid)
    assert any("gcs_server" in cmd for cmd in tree.values())
    results: list[object] = []

    def call() -> None:
        try:
            results.append(classifier.Classify(request, timeout=60).results[7].predictions[0].index)
        except grpc.RpcError as exc:
            results.append(exc.code().name)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # in flight, most of them queued behind each other
    ray_server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(90)
    assert results == [967] * 6
    assert ray_server.proc.wait(timeout=90) == 0
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [cmd[:60] for pid, cmd in tree.items() if alive(pid)] == []


SERVE_RUN_SCRIPT = """
ip link set lo up
serve run {config} > {log} 2>&1 &
echo "serve-run-pid $!"
for i in $(seq 1 150); do
  if vision classify --target 127.0.0.1:{port} --timeout 10 {image} > {out} 2>&1; then echo classified; break; fi
  sleep 1
done
sleep 600
"""


@needs_netns
def test_written_config_runs_with_serve_run_split_topology(tmp_path, photos):
    """The YAML `--ray-config-only` writes, deployed by Ray's own `serve run` (in a network namespace of the
    test's own) with the split topology, answers the same `vision classify` client."""
    config, image = tmp_path / "serve.yaml", tmp_path / "coffee.png"
    image.write_bytes(photos["coffee.png"])
    bin_dir = Path(sys.executable).parent
    written = subprocess.run(
        [sys.executable, "-m", "vision.cli", "serve", "--runner", "ray", "--ray-config-only", "--ray-config-out", str(config),
         "--ray-topology", "split", "--services", "classification", "--port", "50051", "--max-batch-size", "4"],
        capture_output=True, text=True, timeout=60,
    )
    assert written.returncode == 0, written.stderr
    script = SERVE_RUN_SCRIPT.format(config=config, log=tmp_path / "serve-run.log", port=50051, image=image, out=tmp_path / "out")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.Popen(["unshare", "-n", "sh", "-c", script], stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    tree: dict[int, str] = {}
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().strip() for _ in range(2)]
        assert lines[1] == "classified", (tmp_path / "serve-run.log").read_text()[-3000:]
        out = (tmp_path / "out").read_text()
        assert "967  espresso" in out.splitlines()[2], out
        tree = descendants(proc.pid)
        assert any(cmd.startswith("ray::ServeReplica:vision:VisionInference-efficientnet_lite0-1") for cmd in tree.values())
    finally:
        tree |= descendants(proc.pid)
        # `serve run` took minutes to stop on SIGINT here; the processes this test started are killed by PID.
        for pid in [*tree, proc.pid]:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait(timeout=30)
