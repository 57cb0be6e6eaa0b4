"""Live publishing from the model registry onto a real Triton (nvidia-pytriton's tritonserver 2.51, CPU).

The service runs in this test's event loop with `--backend triton` and follows `models:/lite@production`;
it writes each new version into Triton's repository (staging directory, then rename), adds it to the
config's explicit version policy, loads it through the repository API (explicit model control), gates it,
switches, and unloads the old version once it has drained. A version failing its gate is unloaded again.
"""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from test_registry_helpers import ARCH, exported, real_and_random_store, shuffled_head_weights  # noqa: F401
from test_registry_serving import CLIENTS, NAME, Load, list_models, record_number, wait_status
from vision.runners.server import Endpoints, serve
from vision.config.settings import ModelConfig, ServeSettings
from vision.triton.repository import served_versions

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tritonserver binary is Linux-only")
POLL_S = 0.25


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    from vision.triton import TritonProcess, setup_runtime

    root = tmp_path_factory.mktemp("registry-triton")
    repository = root / "model_repository"
    repository.mkdir()
    process = TritonProcess(repository, runtime=setup_runtime(), log_path=root / "triton.log").start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def registry(tmp_path_factory, exported):
    root = tmp_path_factory.mktemp("registry-triton-store")
    return real_and_random_store(root, exported, NAME), root


@pytest.fixture(scope="module")
async def live(registry, triton):
    store, root = registry
    settings = ServeSettings(
        port=0, metrics_port=0, backend="triton", triton_url=triton.grpc_address,
        triton_admin_url=f"127.0.0.1:{triton.http_port}", triton_repository=triton.repository,
        models=[ModelConfig.parse_spec(f"models:/{NAME}@production")],
        registry_uri=store.uri, registry_artifact_root=store.artifact_root, registry_poll_s=POLL_S,
        registry_cache=root / "cache",
    )
    ready: asyncio.Future[Endpoints] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(settings, on_ready=ready.set_result, stop=stop))
    endpoints = await asyncio.wait_for(ready, 300)
    yield endpoints
    stop.set()
    await asyncio.wait_for(task, 60)


async def test_alias_move_on_triton_loads_the_new_version_and_unloads_the_old(live, registry, triton, photos):
    store, _ = registry
    model_dir = triton.repository / NAME
    info = await list_models(live.grpc_address)
    assert (info.version, info.backend, info.registry.serving_version) == ("1", "triton", "1")
    assert served_versions(model_dir) == [1] and triton.admin.is_model_ready(NAME, 1)
    async with Load(live.grpc_address, photos["coffee.jpg"]) as load:
        await asyncio.sleep(1.0)
        moved = time.monotonic()
        await asyncio.to_thread(store.promote, NAME, "2", "production")
        first = await load.wait_for_version("2", moved, timeout=120)
        await load.answers_sent_after(first)
    assert not load.errors, f"requests failed during the switch: {dict(load.errors)}"
    record_number(f"Triton: alias move -> first answer by the new version (s), {CLIENTS} clients", round(first - moved, 3))
    record_number("Triton: requests during the switch / failed", f"{len(load.answered)} / 0")
    assert load.versions_sent_after("2", first) == {"2"}, "requests sent after the switch must get version 2"
    assert {top for _, v, top in load.answered if v == "1"} == {967}
    # The old version drained, then left Triton: policy, readiness and folder.
    deadline = time.monotonic() + 60
    while served_versions(model_dir) != [2] or (model_dir / "1").exists():
        assert time.monotonic() < deadline, f"version 1 was not retired from Triton: {served_versions(model_dir)}"
        await asyncio.sleep(0.1)
    assert not triton.admin.is_model_ready(NAME, 1) and triton.admin.is_model_ready(NAME, 2)
    assert [e for e in triton.admin.repository_index() if e.get("version") == "2" and e.get("state") == "READY"]


async def test_a_version_failing_its_gate_on_triton_is_unloaded_again(live, registry, triton, photos, tmp_path):
    store, _ = registry
    model_dir = triton.repository / NAME
    config = ModelConfig(arch=ARCH, weights=shuffled_head_weights(tmp_path / "shuffled.pt"))
    info = await asyncio.to_thread(lambda: store.register(NAME, config, expect_like="1"))
    serving = (await list_models(live.grpc_address)).version
    async with Load(live.grpc_address, photos["coffee.jpg"]) as load:
        await asyncio.to_thread(store.client.set_registered_model_alias, NAME, "production", info.version)
        status = (await wait_status(live.grpc_address, lambda r: r.refused_version == info.version, timeout=180)).registry
    assert status.refused_check == "gate" and "top-1 is class" in status.refused_reason
    assert not load.errors and {v for _, v, _ in load.answered} == {serving}
    deadline = time.monotonic() + 60
    while (model_dir / info.version).exists() or served_versions(model_dir) != [int(serving)]:
        assert time.monotonic() < deadline, "the refused version was left in Triton's repository"
        await asyncio.sleep(0.1)
    assert not triton.admin.is_model_ready(NAME, info.version) and triton.admin.is_model_ready(NAME, serving)
