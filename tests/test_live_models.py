"""The live model set through a real gRPC server: versions added, made default and retired under load.

The server runs in this test's event loop (so the test can drive the repository the registry's publisher
will drive), and real grpc.aio clients call it over loopback.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import pytest
from conftest import classify_request, metric_value, scrape
from vision.config.settings import ModelConfig, ServeSettings
from vision.runners.server import Endpoints, serve
from vision.serving.loading import load_repository, publish
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


@dataclass(frozen=True)
class Answer:
    sent: float  # stamped before the call is made: at or before the server saw the request
    answered: float  # stamped once the reply is in: at or after the server resolved the model
    version: str
    top: int


class Defaults:
    """The default version of a name over time, as this test changes it in-process. Each change is stamped
    just before it is made and just after it returns, so a request resolved (at some moment between its
    `sent` and `answered` stamps) can only have seen a version that was, or may have been, the default then."""

    def __init__(self, first: str) -> None:
        self._changes: list[tuple[float, float, str]] = [(-math.inf, -math.inf, first)]

    @contextmanager
    def change(self, version: str) -> Iterator[None]:
        started = time.monotonic()
        yield
        self._changes.append((started, time.monotonic(), version))

    def possible(self, answer: Answer) -> set[str]:
        # A version may be the default from the moment its change starts until the next change has returned.
        ends = [end for _, end, _ in self._changes[1:]] + [math.inf]
        return {v for (start, _, v), until in zip(self._changes, ends) if start <= answer.answered and answer.sent <= until}


async def test_versions_swap_under_load_with_zero_errors(live_server, photos):
    settings, repository, endpoints = live_server
    answers: list[Answer] = []
    progress = asyncio.Condition()
    errors: collections.Counter[str] = collections.Counter()
    stop_load = asyncio.Event()

    async def client() -> None:
        async with grpc.aio.insecure_channel(endpoints.grpc_address) as channel:
            stub = classification_pb2_grpc.ClassificationStub(channel)
            request = classify_request(photos["coffee.jpg"], top_k=1, model=NAME)
            while not stop_load.is_set():
                sent = time.monotonic()
                try:
                    reply = await stub.Classify(request, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    continue
                async with progress:
                    answers.append(Answer(sent, time.monotonic(), reply.model.version, reply.results[0].predictions[0].index))
                    progress.notify_all()

    async def answered_since(moment: float, what: str, count: int = 6) -> None:
        """Wait for `count` requests sent after `moment` to be answered (the load goes on meanwhile)."""
        async with progress:
            try:
                await asyncio.wait_for(progress.wait_for(lambda: sum(a.sent >= moment for a in answers) >= count), 120)
            except TimeoutError:
                pytest.fail(f"no {count} requests sent after {what} were answered; errors: {dict(errors)}")

    defaults = Defaults("1")
    clients = [asyncio.ensure_future(client()) for _ in range(6)]
    await answered_since(-math.inf, "the start")
    # Version 2: other weights (seeded random), loaded and exported while version 1 keeps serving. It is
    # the newest and no default is set, so it becomes the default when it is published.
    with defaults.change("2"):
        loading_started = time.monotonic()
        await publish(repository, ModelConfig(arch="efficientnet_lite0", name=NAME, version="2", weights="random"), settings)
        loaded = time.monotonic()
    assert [a for a in answers if loading_started <= a.sent and a.answered <= loaded], (
        "loading a version stalled the versions already serving"
    )
    assert repository.default_version(NAME) == "2"
    with defaults.change("1"):
        repository.set_default(NAME, "1")
    switched_back = time.monotonic()
    await answered_since(switched_back, "switching back to version 1")
    with defaults.change("2"):
        switching = time.monotonic()
        repository.set_default(NAME, "2")
    switched = time.monotonic()
    # Right away, while requests that resolved version 1 may still be running on it.
    await repository.retire(NAME, "1")
    retired = time.monotonic()
    await answered_since(retired, "the retirement")
    stop_load.set()
    await asyncio.gather(*clients)

    assert not errors, f"requests failed during the swap: {dict(errors)}"
    by_version = {version: {a.top for a in answers if a.version == version} for version in ("1", "2")}
    assert by_version["1"] == {967}, "version 1 is the real ImageNet model: espresso"
    assert by_version["2"] and 967 not in by_version["2"]
    # Each request was answered by a version that was the default while it was in flight: by the one it
    # resolved on arrival, even when a switch came before it finished.
    wrong = [a for a in answers if a.version not in defaults.possible(a)]
    assert not wrong, f"answered by a version that was not the default while they were in flight: {wrong[:5]}"
    # And the windows this test relies on were exercised: requests made and answered between the two
    # switches (version 1 only), and requests made after the switch to version 2 returned.
    assert {a.version for a in answers if a.sent >= switched_back and a.answered <= switching} == {"1"}
    assert {a.version for a in answers if a.sent >= switched} == {"2"}
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
        # Watched for as long as the request holds version 1 (not for a guessed time): the retirement,
        # started meanwhile, must wait and the backend stay open.
        watched = 0
        while True:
            await asyncio.sleep(0.002)
            if not version_one.leases:
                break
            watched += 1
            assert not retirement.done(), "the retirement must wait for the request holding version 1"
            assert version_one.backend.is_ready(), "the backend must stay open while a request uses it"
        assert watched, "the request must still hold version 1 once the retirement has started"
        reply = await big
        await retirement
    assert reply.model.version == "1" and len(reply.results) == 32
    assert not version_one.backend.is_ready()
    assert repository.get(NAME).card.version == "2"
