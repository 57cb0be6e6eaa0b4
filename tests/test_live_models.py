"""The live model set through a real gRPC server: versions added, made default and retired under load.

The server runs in this test's event loop (so the test can drive the repository the registry's publisher
will drive), and real grpc.aio clients call it over loopback.
"""

from __future__ import annotations

import asyncio
import collections
import time

import grpc
import pytest

from conftest import classify_request, metric_value, scrape
from vision.serving.loading import load_repository, publish
from vision.runners.server import Endpoints, serve
from vision.config.settings import ModelConfig, ServeSettings
from vision.v1 import classification_pb2_grpc

NAME = "lite"


@pytest.fixture
async def live_server(tmp_path):
    """`lite` version 1 (the real ImageNet weights) on the embedded default engine."""
    settings = ServeSettings(
        port=0, metrics_port=0, onnx_cache=tmp_path / "cache", models=[ModelConfig(arch="efficientnet_lite0", name=NAME)]
    )
    repository = load_repository(settings)
    ready: asyncio.Future[Endpoints] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(settings, repository=repository, on_ready=ready.set_result, stop=stop))
    endpoints = await asyncio.wait_for(ready, 120)
    yield settings, repository, endpoints
    stop.set()
    await asyncio.wait_for(task, 60)


async def test_versions_swap_under_load_with_zero_errors(live_server, photos):
    settings, repository, endpoints = live_server
    answered: list[tuple[float, str, int]] = []  # (time, version, top-1 class)
    errors: collections.Counter[str] = collections.Counter()
    stop_load = asyncio.Event()

    async def client() -> None:
        async with grpc.aio.insecure_channel(endpoints.grpc_address) as channel:
            stub = classification_pb2_grpc.ClassificationStub(channel)
            while not stop_load.is_set():
                try:
                    reply = await stub.Classify(classify_request(photos["coffee.jpg"], top_k=1, model=NAME), timeout=30)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    continue
                answered.append((time.monotonic(), reply.model.version, reply.results[0].predictions[0].index))

    clients = [asyncio.ensure_future(client()) for _ in range(6)]
    await asyncio.sleep(1.0)
    # Version 2: other weights (seeded random), loaded and exported while version 1 keeps serving.
    loading_started = time.monotonic()
    await publish(repository, ModelConfig(arch="efficientnet_lite0", name=NAME, version="2", weights="random"), settings)
    loaded_at = time.monotonic()
    served_while_loading = [a for a in answered if loading_started <= a[0] <= loaded_at]
    assert served_while_loading, "loading a version stalled the versions already serving"
    assert repository.default_version(NAME) == "2"  # the newest, as no default was set
    repository.set_default(NAME, "1")
    switched_back = time.monotonic()
    await asyncio.sleep(1.5)
    repository.set_default(NAME, "2")
    switched = time.monotonic()
    await repository.retire(NAME, "1")
    retired = time.monotonic()
    await asyncio.sleep(1.0)
    stop_load.set()
    await asyncio.gather(*clients)

    assert not errors, f"requests failed during the swap: {dict(errors)}"
    by_version = {version: {top for _, v, top in answered if v == version} for version in ("1", "2")}
    assert by_version["1"] == {967}, "version 1 is the real ImageNet model: espresso"
    assert by_version["2"] and 967 not in by_version["2"]
    # Each request was answered by the version that was the default when it arrived (a request in flight
    # across a switch may finish on the version it started with, so allow one request time of slack).
    slack = 0.5
    while_one = [v for t, v, _ in answered if switched_back + slack < t < switched]
    assert while_one and set(while_one) == {"1"}
    after = [v for t, v, _ in answered if t > switched + slack]
    assert after and set(after) == {"2"}
    assert [a for a in answered if a[0] > retired], "nothing was served after the retirement"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async with grpc.aio.insecure_channel(endpoints.grpc_address) as channel:
            await classification_pb2_grpc.ClassificationStub(channel).Classify(
                classify_request(photos["coffee.jpg"], model=NAME, version="1"), timeout=30
            )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "available: 2" in info.value.details()
    metrics_text = scrape(endpoints.metrics_url)
    assert metric_value(metrics_text, "vision_model_info", model=NAME, version="1") == 0
    assert f'model="{NAME}",version="1"' not in metrics_text, "a retired version's series must be removed"
    assert metric_value(metrics_text, "vision_model_info", model=NAME, version="2", weights_sha256="random") == 1


async def test_a_request_in_flight_finishes_on_the_version_being_retired(live_server, photos):
    settings, repository, endpoints = live_server
    await publish(repository, ModelConfig(arch="efficientnet_lite0", name=NAME, version="2", weights="random"), settings)
    repository.set_default(NAME, "1")
    version_one = repository.get(NAME, "1")
    async with grpc.aio.insecure_channel(endpoints.grpc_address) as channel:
        stub = classification_pb2_grpc.ClassificationStub(channel)
        # 32 images: long enough to be in flight when the retirement starts.
        big = asyncio.ensure_future(stub.Classify(classify_request(*[photos["chelsea.jpg"]] * 32, model=NAME), timeout=60))
        while version_one.leases == 0:
            await asyncio.sleep(0.002)
        retirement = asyncio.ensure_future(repository.retire(NAME, "1"))
        await asyncio.sleep(0.01)
        assert not retirement.done(), "the retirement must wait for the request holding version 1"
        assert version_one.backend.is_ready(), "the backend must stay open while a request uses it"
        reply = await big
        await retirement
    assert reply.model.version == "1" and len(reply.results) == 32
    assert not version_one.backend.is_ready()
    assert repository.get(NAME).card.version == "2"
