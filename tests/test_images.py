"""The images, built by scripts/build-images.sh and run under podman as the chart runs them: user 10001, a
read-only root filesystem, tmpfs where the chart mounts emptyDirs, reached only through published loopback
ports (or, to reach a Triton on the host's loopback, the host's network), answers checked with the real client.

The slim and mlflow images are built and tested in every run (CI installs podman); the full image's tests
(about 10 min to build, 6.5 GB) run with VISION_IMAGE_TESTS=full. Without podman every test here is skipped, saying why.
Numbers (sizes, cold start, RSS) print as `[image numbers]` lines; VISION_IMAGE_NUMBERS=FILE.json keeps them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import classify_request
from vision.v1 import classification_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = "localhost/vision-test"
TAG = "ci"
SLIM = f"{REPOSITORY}:{TAG}-slim"
MODEL = "efficientnet_lite0"
SLIM_LIMIT_MB = 400
NUMBERS = os.environ.get("VISION_IMAGE_NUMBERS")

pytestmark = pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed (Debian: apt-get install podman buildah runc debootstrap); .ci/run installs it")


def record_number(key: str, value: object) -> None:
    print(f"[image numbers] {key}: {value}")
    if NUMBERS:
        path = Path(NUMBERS)
        data = json.loads(path.read_text()) if path.is_file() else {}
        data[key] = value
        path.write_text(json.dumps(data, indent=2))


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(ROOT / ".tools" / "containers.conf"))}
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def build(target: str) -> str:
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-images.sh"), "--targets", target, "--repository", REPOSITORY, "--tag", TAG],
        capture_output=True, text=True, timeout=3000, cwd=ROOT,
    )
    assert result.returncode == 0, f"build-images.sh --targets {target} failed:\n{result.stdout}\n{result.stderr}"
    record_number(f"{target}: build (cached layers count) s", round(time.monotonic() - started))
    (line,) = [line for line in result.stdout.splitlines() if line.startswith(f"{target}:")]
    return line


@pytest.fixture(scope="session")
def slim_image() -> str:
    line = build("slim")
    size_mb = int(re.search(r"(\d+) MB", line).group(1))
    record_number("slim: image size MB", size_mb)
    return SLIM


@pytest.fixture(scope="session")
def exported_repository(tmp_path_factory) -> Path:
    """A Triton repository with the embedded default, exported by `vision export-triton` (here, on the host,
    with the full venv; the full image's test does the same inside that image)."""
    repository = tmp_path_factory.mktemp("image-models") / "repository"
    done = subprocess.run(
        [sys.executable, "-m", "vision.cli", "export-triton", "--model", MODEL, "--repository", str(repository)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    # The container's user 10001 reads it through a bind mount.
    for path in [repository, *repository.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    for parent in list(repository.parents)[:3]:
        parent.chmod(parent.stat().st_mode | 0o005)
    return repository


class Container:
    """One container of ours, by name: started detached, stopped with SIGTERM, always removed."""

    def __init__(self, image: str, *args: str, run_args: tuple[str, ...] = (), publish: tuple[int, ...] = (50051, 9464),
                 user: str = "10001:10001") -> None:
        self.name = f"vision-test-{uuid.uuid4().hex[:8]}"
        ports = [f"-p127.0.0.1::{p}" for p in publish]
        podman("run", "-d", "--name", self.name, "--user", user, "--read-only",
               "--tmpfs", "/tmp:rw,U", "--tmpfs", "/var/cache/vision:rw,U", *ports, *run_args, image, *args)

    def port(self, inside: int) -> str:
        out = podman("port", self.name, str(inside)).stdout.strip().splitlines()[0]
        return out.replace("0.0.0.0", "127.0.0.1")

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def wait_serving(self, address: str, timeout: float = 180) -> float:
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            state = podman("inspect", "--format", "{{.State.Status}}", self.name).stdout.strip()
            if state != "running":
                raise AssertionError(f"container exited ({state}):\n{self.logs()}")
            try:
                with grpc.insecure_channel(address) as channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service="vision.v1.Classification"), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - started
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not SERVING within {timeout}s:\n{self.logs()}")

    def rss_mib(self) -> float:
        stats = podman("stats", "--no-stream", "--format", "{{.MemUsage}}", self.name).stdout.strip()
        value, unit = re.match(r"([\d.]+)\s*([kMG]i?B)", stats).groups()
        return float(value) * {"kB": 1 / 1024, "MB": 1, "MiB": 1, "GB": 1024, "GiB": 1024}[unit]

    def stop(self) -> int:
        """SIGTERM (podman stop), then the exit status."""
        podman("stop", "--time", "30", self.name, timeout=60)
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout.strip())

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False)


class Pod:
    """A podman pod: its containers share one network namespace (localhost), as a Kubernetes pod's do, and
    the host reaches them only through the ports published on 127.0.0.1 when the pod is made."""

    def __init__(self, *publish: int) -> None:
        self.name = f"vision-test-pod-{uuid.uuid4().hex[:8]}"
        podman("pod", "create", "--name", self.name, *[f"-p127.0.0.1::{p}" for p in publish])
        self.infra = podman("pod", "inspect", "--format", "{{.InfraContainerID}}", self.name).stdout.strip()

    def port(self, inside: int) -> str:
        out = podman("port", self.infra, str(inside)).stdout.strip().splitlines()[0]
        return out.replace("0.0.0.0", "127.0.0.1")

    def remove(self) -> None:
        podman("pod", "rm", "--force", "--time", "0", self.name, check=False, timeout=120)


def classify_top1(address: str, image: bytes) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = classification_pb2_grpc.ClassificationStub(channel).Classify(classify_request(image, top_k=1), timeout=60)
    return reply.results[0].predictions[0].index


def test_slim_is_small(slim_image):
    size = int(podman("image", "inspect", "--format", "{{.Size}}", slim_image).stdout) / 1e6
    assert size <= SLIM_LIMIT_MB, f"slim is {size:.0f} MB"
    # No torch, scipy, scikit-image, MLflow or Celery in it: a service in front of Triton imports none.
    done = podman("run", "--rm", "--entrypoint", "/opt/venv/bin/python", slim_image, "-c",
                  "import importlib.util as u; print([m for m in ('torch','scipy','skimage','mlflow','celery','sklearn') if u.find_spec(m)])")
    assert done.stdout.strip() == "[]", done.stdout


def test_slim_serves_an_exported_onnx_file_and_drains_on_sigterm(slim_image, exported_repository, photos):
    onnx = f"/models/{MODEL}/1/model.onnx"
    container = Container(slim_image, "serve", "--host", "0.0.0.0", "--model", f"arch={MODEL},onnx={onnx}",
                          run_args=("-v", f"{exported_repository}:/models:ro"))
    try:
        address = container.port(50051)
        cold_start = container.wait_serving(address)
        record_number("slim on ONNX: container start to SERVING s", round(cold_start, 2))
        assert classify_top1(address, photos["coffee.jpg"]) == 967
        # DELF extraction runs here; matching needs scipy and scikit-image, which slim leaves out: it says so.
        from vision.v1 import common_pb2, delf_pb2, delf_pb2_grpc

        with grpc.insecure_channel(address) as channel:
            delf = delf_pb2_grpc.DelfStub(channel)
            extracted = delf.Extract(delf_pb2.DelfExtractRequest(
                images=[common_pb2.Image(id="coffee", content=photos["coffee.jpg"])]), timeout=120)
            assert len(extracted.results[0].features.keypoints) > 0
            with pytest.raises(grpc.RpcError) as err:
                image = delf_pb2.DelfMatchInput(image=common_pb2.Image(content=photos["coffee.jpg"]))
                delf.Match(delf_pb2.DelfMatchRequest(a=image, b=image), timeout=120)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "full image" in err.value.details()
        assert classify_top1(address, photos["coffee.jpg"]) == 967  # and it goes on serving
        import urllib.request

        with urllib.request.urlopen(f"http://{container.port(9464)}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        assert 'vision_requests_total{code="OK",method="Classify",service="vision.v1.Classification"}' in text
        record_number("slim on ONNX: RSS in the container MiB", round(container.rss_mib()))
        assert container.stop() == 0
        assert "stopped" in container.logs()
    finally:
        container.remove()


def test_slim_without_a_model_source_says_what_to_give_in_one_line(slim_image):
    done = podman("run", "--rm", "--user", "10001:10001", "--read-only", "--tmpfs", "/tmp:rw,U",
                  "--tmpfs", "/var/cache/vision:rw,U", slim_image, check=False, timeout=180)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("vision serve:")]
    assert "onnx=" in line and "--backend triton" in line and "full image" in line


def test_slim_in_front_of_a_local_triton(slim_image, exported_repository, photos, tmp_path):
    from vision.triton import TritonProcess, setup_runtime

    triton = TritonProcess(exported_repository, runtime=setup_runtime(), log_path=tmp_path / "triton.log").start()
    # The host's loopback (where Triton listens) is reachable from the host's network namespace only.
    port = _free_port()
    container = Container(slim_image, "serve", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
                          "--backend", "triton", "--triton-url", triton.grpc_address,
                          run_args=("--network", "host"), publish=())
    try:
        address = f"127.0.0.1:{port}"
        container.wait_serving(address)
        assert classify_top1(address, photos["coffee.jpg"]) == 967
        assert container.stop() == 0
    finally:
        container.remove()
        triton.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_dev_cpu_charts_workloads_run_under_podman_kube_play(slim_image, exported_repository, photos, tmp_path):
    """values-dev-cpu.yaml rendered with the built image, played by `podman kube play`: each Deployment's own
    command, args, env (its ConfigMap), volumes, security context and probe ports. Two changes, both values:
    the slim image with the exported ONNX file on the model store (the full image's first-start export is the
    full tests'), and every container port given a free hostPort on 127.0.0.1 (kube play would otherwise
    publish the container ports themselves, on every interface)."""
    import yaml
    from chart_tools import CHART, RELEASE, helm

    rendered = helm(
        "template", RELEASE, str(CHART), "-f", str(CHART / "values-dev-cpu.yaml"),
        "--set", f"image.repository={REPOSITORY}", "--set", f"image.tag={TAG}", "--set", "serviceDefaults.image=slim",
        "--set", "modelStore.enabled=true",
        "--set-json", f'models=[{{"arch":"{MODEL}","onnx":"/models/{MODEL}/1/model.onnx"}}]',
    )
    assert rendered.returncode == 0, rendered.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    (claim,) = [d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"]
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in deployments} >= {"classification", "tagging"}
    probes: dict[str, tuple[str, str]] = {}
    for dep in deployments:
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        probe = container["readinessProbe"]["grpc"]
        # podman 4.3 publishes every containerPort, on all interfaces unless told: each gets a free loopback one.
        for port in container["ports"]:
            port["hostPort"], port["hostIP"] = _free_port(), "127.0.0.1"
        host_port = next(p["hostPort"] for p in container["ports"] if p["containerPort"] == probe["port"])
        probes[dep["metadata"]["labels"]["app.kubernetes.io/component"]] = (f"127.0.0.1:{host_port}", probe["service"])
    played = [d for d in docs if d["kind"] in ("ConfigMap", "Deployment")]
    manifest = tmp_path / "dev-cpu.yaml"
    manifest.write_text(yaml.safe_dump_all(played))
    # The model store: the claim is a podman volume of that name, holding the exported repository.
    podman("volume", "rm", "--force", claim, check=False)
    podman("volume", "create", claim)
    mountpoint = Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", claim).stdout.strip())
    shutil.copytree(exported_repository, mountpoint, dirs_exist_ok=True)
    try:
        done = podman("kube", "play", str(manifest), timeout=300, check=False)
        assert done.returncode == 0, done.stderr
        for component, (address, service) in probes.items():
            deadline = time.monotonic() + 180
            while True:
                try:
                    with grpc.insecure_channel(address) as channel:
                        status = health_pb2_grpc.HealthStub(channel).Check(
                            health_pb2.HealthCheckRequest(service=service), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, f"{component} not SERVING on {address}:\n" + \
                    podman("pod", "logs", f"{RELEASE}-vision-platform-{component}-pod", check=False).stderr
                time.sleep(0.5)
        states = podman("pod", "ps", "--format", "{{.Name}} {{.Status}}").stdout
        for component in probes:
            assert re.search(rf"{RELEASE}-vision-platform-{component}\S* Running", states), states
        assert classify_top1(probes["classification"][0], photos["coffee.jpg"]) == 967
    finally:
        podman("kube", "down", str(manifest), timeout=120, check=False)
        podman("volume", "rm", "--force", claim, check=False)


# --------------------------------------------------------------------------------------
# The full image (VISION_IMAGE_TESTS=full: ~10 min to build, 6.5 GB)
# --------------------------------------------------------------------------------------

FULL = f"{REPOSITORY}:{TAG}"
full_only = pytest.mark.skipif(os.environ.get("VISION_IMAGE_TESTS") != "full",
                               reason="the full image's tests are opt-in: VISION_IMAGE_TESTS=full (a 10-minute, 6.5 GB build)")


@pytest.fixture(scope="session")
def full_image() -> str:
    line = build("full")
    record_number("full: image size MB", int(re.search(r"(\d+) MB", line).group(1)))
    return FULL


def debian_service_image(name: str, packages: str, user: str, entrypoint: str) -> str:
    """A server from Debian's package on the same base (no registry is reachable for redis:7 or postgres:16)."""
    image = f"{REPOSITORY}-{name}:{TAG}"
    base = "localhost/vision-base:bookworm"
    if podman("image", "exists", base, check=False).returncode != 0:
        base = "python:3.11.11-slim-bookworm"
    containerfile = (f"FROM {base}\nRUN apt-get update -qq && apt-get install -y -qq --no-install-recommends {packages} "
                     f"&& rm -rf /var/lib/apt/lists/*\nUSER {user}\nENTRYPOINT {entrypoint}\n")
    done = subprocess.run(["podman", "build", "--quiet", "-t", image, "-"], input=containerfile, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "CONTAINERS_CONF": str(ROOT / ".tools" / "containers.conf")})
    assert done.returncode == 0, done.stderr
    return image


@pytest.fixture(scope="session")
def redis_image(slim_image) -> str:
    return debian_service_image("redis", "redis-server", "redis", '["redis-server"]')


@pytest.fixture(scope="session")
def postgres_image(slim_image) -> str:
    """PostgreSQL 15, a fresh trust-auth cluster in the container's /tmp (the chart's StatefulSet keeps a PVC)."""
    start = ("initdb -D /tmp/pgdata -U postgres --auth=trust --encoding=UTF8 --locale=C >/dev/null && exec postgres -D /tmp/pgdata "
             "-c listen_addresses=0.0.0.0 -c unix_socket_directories=/tmp")
    return debian_service_image("postgres", "postgresql-15", "postgres",
                                json.dumps(["/bin/sh", "-c", f"PATH=/usr/lib/postgresql/15/bin:$PATH; {start}"]))


@full_only
def test_full_serves_the_embedded_default_after_its_first_start_export(full_image, photos):
    container = Container(full_image)  # the image's own command: serve --host 0.0.0.0
    try:
        address = container.port(50051)
        cold_start = container.wait_serving(address, timeout=600)
        record_number("full: container start to SERVING, first-start ONNX export included, s", round(cold_start, 1))
        assert classify_top1(address, photos["coffee.jpg"]) == 967
        record_number("full: RSS in the container MiB", round(container.rss_mib()))
        assert container.stop() == 0
    finally:
        container.remove()


@full_only
@pytest.mark.timeout(1500)
def test_full_worker_runs_a_download_and_a_fine_tune_submitted_from_the_host(full_image, redis_image, tmp_path):
    from test_jobs_helpers import Site

    from training.shapes import generate, url_line

    redis = Container(redis_image, "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no",
                      publish=(6379,))
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 10001, 10001)
    site = Site()
    containers = [redis]
    try:
        redis_url = f"redis://{redis.port(6379)}/0"
        namespace = f"img{uuid.uuid4().hex[:6]}"
        jobs_port = _free_port()
        # The Jobs service and the worker on the host's network: the site they fetch from is on its loopback.
        common = ("--network", "host", "-v", f"{data}:/data")
        containers.append(Container(full_image, "serve", "--services", "jobs", "--host", "127.0.0.1", "--port", str(jobs_port),
                                    "--metrics-port", "0", "--redis-url", redis_url, "--jobs-namespace", namespace,
                                    run_args=common, publish=()))
        containers.append(Container(full_image, "worker", "--queues", "download,train", "--redis-url", redis_url,
                                    "--namespace", namespace, "--allow-private-addresses", "127.0.0.0/8",
                                    "--registry-uri", "sqlite:////data/registry.db", "--registry-artifact-root", "/data/artifacts",
                                    "--work-dir", "/data/work", "--host", "127.0.0.1", "--metrics-port", "0",
                                    run_args=common, publish=()))
        lines = []
        for sample in generate(64, seed=0):
            site.files[f"/shapes/{sample.name}"] = (sample.png(), "image/png")
            lines.append(url_line(site.url(f"/shapes/{sample.name}"), sample.labels))
        (tmp_path / "urls.txt").write_text("\n".join(lines) + "\n")
        target = ("--target", f"127.0.0.1:{jobs_port}")
        _wait_jobs_serving(f"127.0.0.1:{jobs_port}")
        for submit in (("submit-download", "--urls", str(tmp_path / "urls.txt"), "--out", "/data/set"),
                       ("submit-finetune", "--task", "tagging", "--data", "/data/set", "--base", "efficientnet_lite0",
                        "--name", "image-shapes", "--epochs", "1", "--workers", "0")):
            done = _vision("jobs", *target, *submit)
            assert done.returncode == 0, done.stderr
            waited = _vision("jobs", *target, "wait", done.stdout.split()[-1], "--max-wait", "900", timeout=960)
            assert waited.returncode == 0, waited.stdout + waited.stderr + "\n".join(c.logs()[-3000:] for c in containers)
        assert (data / "registry.db").is_file()
    finally:
        site.close()
        for container in reversed(containers):
            container.remove()


def _vision(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vision.cli", *args], capture_output=True, text=True, timeout=timeout)


def _wait_jobs_serving(address: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(address) as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="vision.v1.Jobs"), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the Jobs service at {address} did not turn SERVING")


MLFLOW = f"{REPOSITORY}:{TAG}-mlflow"
MLFLOW_PORT = 5000


@pytest.fixture(scope="session")
def mlflow_image(slim_image) -> str:
    line = build("mlflow")
    record_number("mlflow: image size MB", int(re.search(r"(\d+) MB", line).group(1)))
    return MLFLOW


@pytest.fixture(scope="session")
def registry_pod(mlflow_image, postgres_image):
    """The chart's registry: PostgreSQL and the mlflow image's tracking server (started with the chart's
    arguments: PostgreSQL backend store, proxied artifacts), in one pod that publishes the tracking port and
    the gRPC port of a served container that may join it later."""
    pod = Pod(MLFLOW_PORT, 50051)
    try:
        Container(postgres_image, run_args=("--pod", pod.name), publish=(), user="postgres")
        _wait_port_in_pod(pod, postgres_image)
        Container(mlflow_image, "server", "--host", "0.0.0.0", "--port", str(MLFLOW_PORT),
                  "--backend-store-uri", "postgresql://postgres@127.0.0.1:5432/postgres",
                  "--artifacts-destination", "/models/mlflow-artifacts", "--serve-artifacts",
                  run_args=("--pod", pod.name, "--tmpfs", "/models:rw,U"), publish=())
        uri = f"http://{pod.port(MLFLOW_PORT)}"
        _wait_http_ok(f"{uri}/health", timeout=180, pod=pod)
        yield pod, uri
    finally:
        pod.remove()


def _wait_port_in_pod(pod: Pod, postgres_image: str, timeout: float = 120) -> None:
    """PostgreSQL accepts connections (pg_isready from inside the pod; its port is not published)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = podman("run", "--rm", "--pod", pod.name, "--user", "postgres", "--entrypoint", "/usr/bin/pg_isready",
                      postgres_image, "-h", "127.0.0.1", "-p", "5432", check=False)
        if done.returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"PostgreSQL in pod {pod.name} did not accept connections")


def _wait_http_ok(url: str, timeout: float, pod: Pod) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    logs = podman("pod", "logs", pod.name, check=False)
    raise AssertionError(f"{url} did not answer 200 within {timeout}s:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")


def _registry(uri: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return _vision("registry", "--registry-uri", uri, *args, timeout=timeout)


def test_mlflow_image_next_to_postgresql_registers_and_promotes_from_the_host(registry_pod, exported_repository, tmp_path):
    """`vision registry` on the host against the mlflow container (PostgreSQL store, proxied artifacts): the
    version's files travel through the server, and verify downloads them back through it."""
    _pod, uri = registry_pod
    spec = f"arch={MODEL},onnx={exported_repository / MODEL / '1' / 'model.onnx'}"
    started = time.monotonic()
    done = _registry(uri, "register", "img-lite", "--model", spec, "--json")
    assert done.returncode == 0, done.stderr
    record_number("mlflow: register over HTTP (ONNX given, golden outputs recorded) s", round(time.monotonic() - started, 1))
    assert json.loads(done.stdout)["version"] == "1"
    promoted = _registry(uri, "promote", "img-lite", "1", "--alias", "production")
    assert promoted.returncode == 0, promoted.stderr
    shown = json.loads(_registry(uri, "show", "img-lite", "--json").stdout)
    assert shown["aliases"] == {"production": "1"}, shown
    # verify: the package comes back through the server's artifact proxy, sha256s and the gate hold.
    verified = _registry(uri, "verify", "img-lite", "1")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # A bad request to a real server is one clear line, not a traceback.
    missing = _registry(uri, "promote", "img-lite", "9", "--alias", "production")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr and "9" in missing.stderr, missing.stderr


@full_only
@pytest.mark.timeout(1200)
def test_a_served_full_container_follows_production_in_the_mlflow_container(full_image, registry_pod, exported_repository, photos):
    """The full image serving `models:/NAME@production` from the tracking server in its pod switches to the
    version `promote` (on the host) points the alias at."""
    pod, uri = registry_pod
    spec = f"arch={MODEL},onnx={exported_repository / MODEL / '1' / 'model.onnx'}"
    for _ in range(2):
        done = _registry(uri, "register", "img-follow", "--model", spec)
        assert done.returncode == 0, done.stderr
    assert _registry(uri, "promote", "img-follow", "1", "--alias", "production").returncode == 0
    served = Container(full_image, "serve", "--host", "0.0.0.0", "--model", "models:/img-follow@production",
                       "--registry-uri", f"http://127.0.0.1:{MLFLOW_PORT}", "--registry-poll-s", "1",
                       run_args=("--pod", pod.name), publish=())
    address = pod.port(50051)
    served.wait_serving(address, timeout=300)
    assert _served_version(address, photos["coffee.jpg"]) == ("1", 967)
    assert _registry(uri, "promote", "img-follow", "2", "--alias", "production").returncode == 0
    moved = time.monotonic()
    while time.monotonic() - moved < 120:
        if _served_version(address, photos["coffee.jpg"]) == ("2", 967):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"still not serving version 2 after 120 s:\n{served.logs()[-3000:]}")
    record_number("mlflow: alias move -> the container answers with the new version, s", round(time.monotonic() - moved, 1))
    assert served.stop() == 0


def _served_version(address: str, image: bytes) -> tuple[str, int]:
    with grpc.insecure_channel(address) as channel:
        reply = classification_pb2_grpc.ClassificationStub(channel).Classify(classify_request(image, top_k=1), timeout=60)
    return reply.model.version, reply.results[0].predictions[0].index
