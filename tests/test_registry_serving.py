"""Live publishing from the model registry into running services (SQLite store; the store's PostgreSQL
behaviour is covered by test_registry.py).

In-process: `serve()` follows `models:/lite@production` in this test's event loop while 16 real gRPC
clients classify over loopback; the alias moves (promote, rollback) and every response must succeed and
name the version that produced it. Faults: a corrupted artifact and a head with shuffled rows are refused
while the old version keeps serving. Through real processes: `vision serve --model models:/...` and the
`vision registry` CLI, with the server's memory sampled while two versions overlap.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from conftest import ServerProcess, classify_request, metric_value, scrape
from test_registry_helpers import ARCH, exported, real_and_random_store, shuffled_head_weights, spec  # noqa: F401
from vision.runners.server import Endpoints, serve
from vision.config.settings import ModelConfig, ServeSettings
from vision.v1 import classification_pb2_grpc, common_pb2, features_pb2_grpc

NAME = "lite"
POLL_S = 0.25
CLIENTS = 16
# Where a run may write the measured numbers (docs/benchmarks.md, registry): VISION_REGISTRY_NUMBERS=path.json
NUMBERS = os.environ.get("VISION_REGISTRY_NUMBERS")


def record_number(key: str, value: object) -> None:
    print(f"[registry numbers] {key}: {value}")
    if NUMBERS:
        path = Path(NUMBERS)
        data = json.loads(path.read_text()) if path.is_file() else {}
        data[key] = value
        path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="module")
def registry(tmp_path_factory, exported):
    """lite 1 = bundled ImageNet weights (coffee -> 967 espresso), 2 = seeded random weights; @production -> 1."""
    root = tmp_path_factory.mktemp("registry-serving")
    return real_and_random_store(root, exported, NAME), root


@pytest.fixture(scope="module")
async def live(registry):
    store, root = registry
    settings = ServeSettings(
        port=0, metrics_port=0, models=[ModelConfig.parse_spec(f"models:/{NAME}@production")],
        registry_uri=store.uri, registry_artifact_root=store.artifact_root, registry_poll_s=POLL_S,
        registry_cache=root / "cache",
    )
    ready: asyncio.Future[Endpoints] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(settings, on_ready=ready.set_result, stop=stop))
    endpoints = await asyncio.wait_for(ready, 120)
    yield endpoints
    stop.set()
    await asyncio.wait_for(task, 60)


class Load:
    """CLIENTS grpc.aio clients classifying coffee back to back; answers and errors recorded."""

    def __init__(self, address: str, image: bytes) -> None:
        self.address, self.image = address, image
        # (answered at, version, top-1 class); started_at[i] is when answered[i]'s request was sent.
        self.answered: list[tuple[float, str, int]] = []
        self.started_at: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = classification_pb2_grpc.ClassificationStub(channel)
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    reply = await stub.Classify(classify_request(self.image, top_k=1, model=NAME), timeout=60)
                except grpc.aio.AioRpcError as exc:
                    self.errors[f"{exc.code().name}: {exc.details()}"] += 1
                    continue
                self.answered.append((time.monotonic(), reply.model.version, reply.results[0].predictions[0].index))
                self.started_at.append(started)

    def versions_sent_after(self, version: str, answered_at: float, until: float = float("inf")) -> set[str]:
        """Versions that answered the requests sent after the first answer from `version` came back (at
        `answered_at`: the alias had moved by then) and answered before `until` (when the next move began).
        What the contract promises, with no allowance for timing: a request resolves its model when it
        arrives, so one sent after the switch is answered by the new version; one in flight across a switch
        may be either, and is left out."""
        return {
            v for s, (t, v, _) in zip(self.started_at, self.answered, strict=True) if s > answered_at and t < until
        }

    async def __aenter__(self) -> "Load":
        self._tasks = [asyncio.ensure_future(self._client()) for _ in range(CLIENTS)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def answers_sent_after(self, since: float, count: int = CLIENTS, timeout: float = 120) -> None:
        """Waits until `count` requests sent after `since` have been answered: a fixed sleep proves nothing
        on a loaded machine, where a second may hold no answer at all."""
        deadline = time.monotonic() + timeout
        while sum(1 for s in self.started_at if s > since) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} requests sent after the switch were answered in {timeout}s")
            await asyncio.sleep(0.01)

    async def wait_for_version(self, version: str, since: float, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            first = next((t for t, v, _ in self.answered if v == version and t >= since), None)
            if first is not None:
                return first
            await asyncio.sleep(0.01)
        raise AssertionError(f"no answer from version {version} within {timeout}s")


async def list_models(address: str) -> common_pb2.ModelInfo:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await classification_pb2_grpc.ClassificationStub(channel).ListModels(common_pb2.ListModelsRequest(), timeout=10)
    (info,) = [m for m in reply.models if m.name == NAME]
    return info


async def wait_status(address: str, predicate, timeout: float = 60) -> common_pb2.ModelInfo:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        info = await list_models(address)
        if predicate(info.registry):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"registry status never matched: {info.registry}")
        await asyncio.sleep(0.05)


async def test_alias_move_and_rollback_under_load_with_zero_failures(live, registry, photos):
    store, _ = registry
    info = await list_models(live.grpc_address)
    assert (info.version, info.registry.uri, info.registry.alias, info.registry.serving_version) == (
        "1", f"models:/{NAME}@production", "production", "1")
    assert info.registry.run_id and not info.registry.refused_version
    # Every service's ListModels describes the followed entry, not only Classification's.
    async with grpc.aio.insecure_channel(live.grpc_address) as channel:
        features = await features_pb2_grpc.FeaturesStub(channel).ListModels(common_pb2.ListModelsRequest(), timeout=10)
    (entry,) = [m for m in features.models if m.model.name == NAME]
    assert entry.model.registry == info.registry
    async with Load(live.grpc_address, photos["coffee.jpg"]) as load:
        await asyncio.sleep(1.0)
        moved = time.monotonic()
        await asyncio.to_thread(store.promote, NAME, "2", "production")
        first_v2 = await load.wait_for_version("2", moved)
        await load.answers_sent_after(first_v2)
        rolled = time.monotonic()
        assert await asyncio.to_thread(store.rollback, NAME, "production") == ("2", "1")
        first_v1 = await load.wait_for_version("1", rolled)
        await load.answers_sent_after(first_v1)
    assert not load.errors, f"requests failed during the switches: {dict(load.errors)}"
    switch_s, rollback_s = first_v2 - moved, first_v1 - rolled
    record_number("in-process: alias move -> first answer by the new version (s)", round(switch_s, 3))
    record_number("in-process: rollback -> first answer by the old version (s)", round(rollback_s, 3))
    record_number("in-process: requests during the test / failed", f"{len(load.answered)} / 0")
    # Within the poll interval plus the load time (download, sha256, ONNX Runtime session, gate: ~1 s here).
    assert switch_s < POLL_S + 15 and rollback_s < POLL_S + 15
    by_version = {v: {top for _, ver, top in load.answered if ver == v} for v in ("1", "2")}
    assert by_version["1"] == {967} and by_version["2"] and 967 not in by_version["2"]
    # Once the new version answered, the old one answers nothing sent later.
    assert load.versions_sent_after("2", first_v2, until=rolled) == {"2"}
    assert load.versions_sent_after("1", first_v1) == {"1"}
    # The old version was retired after draining: it is gone from the live set.
    async with grpc.aio.insecure_channel(live.grpc_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await classification_pb2_grpc.ClassificationStub(channel).Classify(
                classify_request(photos["coffee.jpg"], model=NAME, version="2"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "available: 1" in err.value.details()
    text = scrape(live.metrics_url)
    assert metric_value(text, "vision_registry_switches_total", model=NAME, outcome="served") == 2
    assert metric_value(text, "vision_registry_serving_version", model=NAME) == 1
    assert metric_value(text, "vision_registry_alias_version", model=NAME, alias="production") == 1


async def test_a_corrupted_artifact_is_refused_and_the_old_version_keeps_serving(live, registry, exported, photos):
    store, _ = registry
    info = await asyncio.to_thread(store.register, NAME, ModelConfig.parse_spec(spec("random", exported)))
    weights = Path(info.source.removeprefix("file://")) / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0x01
    weights.write_bytes(bytes(data))
    serving = (await list_models(live.grpc_address)).version
    # Moved straight through MLflow (as from its UI), bypassing `vision registry promote`'s own checks.
    async with Load(live.grpc_address, photos["coffee.jpg"]) as load:
        await asyncio.to_thread(store.client.set_registered_model_alias, NAME, "production", info.version)
        status = (await wait_status(live.grpc_address, lambda r: r.refused_version == info.version)).registry
        await asyncio.sleep(2 * POLL_S)  # the refusal is not retried on the next polls
    assert status.refused_check == "sha256" and "weights.pt has sha256" in status.refused_reason
    assert (status.alias_version, status.serving_version) == (info.version, serving)
    assert not load.errors and {v for _, v, _ in load.answered} == {serving}
    text = scrape(live.metrics_url)
    assert metric_value(text, "vision_registry_refusals_total", model=NAME, check="sha256") == 1
    assert metric_value(text, "vision_registry_switches_total", model=NAME, outcome="refused") == 1


async def test_a_version_failing_its_golden_outputs_is_refused(live, registry, photos, tmp_path):
    """A head with shuffled rows, registered as expected to answer like version 1 (say, a botched checkpoint
    conversion): it loads fine, but its golden answers differ, so it never serves."""
    store, _ = registry
    config = ModelConfig(arch=ARCH, weights=shuffled_head_weights(tmp_path / "shuffled.pt"))
    info = await asyncio.to_thread(lambda: store.register(NAME, config, expect_like="1"))
    serving = (await list_models(live.grpc_address)).version
    async with Load(live.grpc_address, photos["coffee.jpg"]) as load:
        await asyncio.to_thread(store.client.set_registered_model_alias, NAME, "production", info.version)
        status = (await wait_status(live.grpc_address, lambda r: r.refused_version == info.version)).registry
    assert status.refused_check == "gate" and "top-1 is class" in status.refused_reason, status.refused_reason
    assert status.serving_version == serving
    assert not load.errors and {v for _, v, _ in load.answered} == {serving}
    async with grpc.aio.insecure_channel(live.grpc_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await classification_pb2_grpc.ClassificationStub(channel).Classify(
                classify_request(photos["coffee.jpg"], model=NAME, version=info.version), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, "a refused version is never published, not even by name"
    text = scrape(live.metrics_url)
    assert metric_value(text, "vision_registry_refusals_total", model=NAME, check="gate") == 1
    assert f'model="{NAME}",version="{info.version}"' not in text, "a refused version leaves no metric series"
    # Moving the alias back to the served version puts the model back in sync.
    await asyncio.to_thread(store.promote, NAME, serving, "production")
    await wait_status(live.grpc_address, lambda r: r.alias_version == serving)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_vision_serve_follows_an_alias_moved_by_the_cli(registry, tmp_path, photos):
    """Real processes: `vision serve --model models:/lite@production` and `vision registry promote`."""
    store, root = registry
    store.promote(NAME, "1", "production")
    env = {"VISION_REGISTRY_URI": store.uri, "VISION_REGISTRY_ARTIFACT_ROOT": store.artifact_root}
    server = ServerProcess(["--model", f"models:/{NAME}@production", "--registry-poll-s", "0.5",
                            "--registry-cache", str(tmp_path / "cache")], tmp_path / "serve.log", env=env).wait_ready()
    try:
        stub = classification_pb2_grpc.ClassificationStub(grpc.insecure_channel(server.address))
        assert stub.Classify(classify_request(photos["coffee.jpg"], top_k=1), timeout=30).model.version == "1"
        models = subprocess.run([sys.executable, "-m", "vision.cli", "models", "--target", server.address],
                                capture_output=True, text=True, timeout=60)
        assert f"registry models:/{NAME}@production: serving 1, alias at 1" in models.stdout
        samples: list[int] = []
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                samples.append(_rss_kib(server.proc.pid))
                time.sleep(0.01)

        for _ in range(20):  # steady state before the move
            stub.Classify(classify_request(photos["coffee.jpg"], top_k=1), timeout=30)
        before = _rss_kib(server.proc.pid)
        sampler = threading.Thread(target=sample)
        sampler.start()
        store.promote(NAME, "2", "production")
        moved = time.monotonic()
        while True:
            reply = stub.Classify(classify_request(photos["coffee.jpg"], top_k=1), timeout=30)
            if reply.model.version == "2":
                break
            assert time.monotonic() - moved < 30, "the server never switched to version 2"
        switched = time.monotonic() - moved
        time.sleep(1.0)
        sampling.set()
        sampler.join()
        after = _rss_kib(server.proc.pid)
        record_number("vision serve process: alias moved -> first answer by version 2 (s)", round(switched, 3))
        record_number("vision serve process: RSS before / peak while both versions are loaded / after (MiB)",
                      f"{before // 1024} / {max(samples) // 1024} / {after // 1024}")
        # Rollback through the CLI.
        result = subprocess.run(
            [sys.executable, "-m", "vision.cli", "registry", "rollback", NAME, "--alias", "production"],
            capture_output=True, text=True, timeout=120, env={**os.environ, **env},
        )
        assert result.returncode == 0 and "2 -> 1 (rolled back)" in result.stdout, result.stderr
        deadline = time.monotonic() + 30
        while stub.Classify(classify_request(photos["coffee.jpg"], top_k=1), timeout=30).model.version != "1":
            assert time.monotonic() < deadline, "the server never rolled back to version 1"
        time.sleep(1.0)
        after_rollback = _rss_kib(server.proc.pid)
        record_number("vision serve process: RSS after the rollback (MiB)", after_rollback // 1024)
        # A retired version's memory goes back to the OS (repository.release_memory, run by every retirement): two switches later the
        # process is about where it started, not one model larger per switch.
        assert after_rollback < before + 100 * 1024, (before, max(samples), after, after_rollback)
        log = server.log()
        assert "now serves version 2" in log and "retiring version 1" in log
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (f"models:/{NAME}@canary", "alias 'canary'"),
        ("models:/nope@production", "nope"),
        (f"models:/{NAME}/99", "version 99"),
    ],
)
def test_vision_serve_refuses_to_start_on_a_bad_registry_uri(registry, tmp_path, uri, message):
    store, _ = registry
    env = {**os.environ, "VISION_REGISTRY_URI": store.uri, "VISION_REGISTRY_ARTIFACT_ROOT": store.artifact_root}
    result = subprocess.run(
        [sys.executable, "-m", "vision.cli", "serve", "--port", "0", "--metrics-port", "0", "--model", uri,
         "--registry-cache", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_vision_serve_starts_from_its_cache_when_the_registry_is_down(registry, tmp_path, photos):
    """A restart while the registry is unreachable serves the version served last, checked against the sha256
    recorded at download; without a cached version the start still fails, with the reason."""
    store, _ = registry
    store.promote(NAME, "1", "production")
    cache = tmp_path / "cache"
    args = ["--model", f"models:/{NAME}@production", "--registry-cache", str(cache), "--services", "classification"]
    up = {"VISION_REGISTRY_URI": store.uri, "VISION_REGISTRY_ARTIFACT_ROOT": store.artifact_root}
    ServerProcess(args, tmp_path / "first.log", env=up).wait_ready().stop()
    assert json.loads((cache / NAME / "last-served.json").read_text())["version"] == "1"

    down = {"VISION_REGISTRY_URI": "postgresql://postgres@127.0.0.1:1/unreachable"}  # nothing listens on port 1
    server = ServerProcess(args, tmp_path / "down.log", env=down).wait_ready()
    try:
        stub = classification_pb2_grpc.ClassificationStub(grpc.insecure_channel(server.address))
        reply = stub.Classify(classify_request(photos["coffee.jpg"], top_k=1), timeout=30)
        assert reply.model.version == "1" and reply.results[0].predictions[0].index == 967
        (info,) = stub.ListModels(common_pb2.ListModelsRequest(), timeout=30).models
        assert info.registry.serving_version == "1" and "unreachable" in info.registry.error
    finally:
        server.stop()

    # A cached file changed on disk is refused, not served.
    (cache / NAME / "1" / "spec.json").write_text("{}")
    env = {**os.environ, **down}
    result = subprocess.run([sys.executable, "-m", "vision.cli", "serve", "--port", "0", "--metrics-port", "0", *args],
                            capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 1 and "cached version 1 cannot serve" in result.stderr, result.stderr[-2000:]
    result = subprocess.run([sys.executable, "-m", "vision.cli", "serve", "--port", "0", "--metrics-port", "0",
                             "--model", f"models:/{NAME}@production", "--registry-cache", str(tmp_path / "empty")],
                            capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 1 and "no version served before is cached" in result.stderr, result.stderr[-2000:]
