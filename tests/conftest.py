"""Shared fixtures: real photos, and real `vision serve` processes on ephemeral 127.0.0.1 ports."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import skimage.data
from PIL import Image

from vision.v1 import classification_pb2, classification_pb2_grpc, common_pb2

SKIMAGE_DATA = Path(skimage.data.__file__).parent
ROOT = Path(__file__).resolve().parent.parent


# A small ML-Images hierarchy shared by the tagging tests: animal ── mammal ── cat, dog; plant ── tree;
# vehicle ── car (index, WordNet id, parent index or -1, name).
ML_IMAGES_TREE = [
    (0, "n00015388", -1, "animal"),
    (1, "n01861778", 0, "mammal"),
    (2, "n02121620", 1, "cat"),
    (3, "n02084071", 1, "dog"),
    (4, "n00017222", -1, "plant"),
    (5, "n13104059", 4, "tree"),
    (6, "n04524313", -1, "vehicle"),
    (7, "n02958343", 6, "car"),
]


def photo(name: str) -> Image.Image:
    """A scikit-image sample photo as RGB."""
    return Image.open(SKIMAGE_DATA / name).convert("RGB")


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """Encoded real photos with known ImageNet answers."""
    coffee, chelsea = photo("coffee.png"), photo("chelsea.png")
    return {
        "coffee.jpg": encode(coffee, "JPEG", quality=92),
        "coffee.png": encode(coffee, "PNG"),
        "chelsea.jpg": encode(chelsea, "JPEG", quality=92),
        "chelsea.png": encode(chelsea, "PNG"),
        "rocket.jpg": (SKIMAGE_DATA / "rocket.jpg").read_bytes(),
        "motorcycle.png": encode(photo("motorcycle_left.png"), "PNG"),
    }


class ServerProcess:
    """`vision serve` in a child process; addresses parsed from its start-up lines."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vision.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, **(env or {})},
        )
        self.address = ""
        self.metrics_url = ""
        self.announced = ""  # the start-up lines on stdout

    def wait_ready(self, timeout: float = 120.0) -> "ServerProcess":
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while not (self.address and self.metrics_url):
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server did not start; log:\n{self.log()}")
            line = self.proc.stdout.readline().decode()
            self.announced += line
            if not line:
                self.proc.wait(timeout=10)
                raise RuntimeError(f"server exited with {self.proc.returncode}; log:\n{self.log()}")
            if m := re.search(r"gRPC listening on (\S+)", line):
                self.address = m.group(1)
            if m := re.search(r"metrics at (\S+)", line):
                self.metrics_url = m.group(1)
        return self

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh ONNX export cache per test session (inherited by every server the tests start)."""
    path = tmp_path_factory.mktemp("onnx-cache")
    os.environ["VISION_ONNX_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The embedded default (EfficientNet-Lite0, real ImageNet weights), shared by the whole session."""
    log = tmp_path_factory.mktemp("server") / "serve.log"
    proc = ServerProcess(
        ["--max-image-bytes", "3000000", "--max-images-per-request", "32", "--max-request-bytes", "40000000"], log
    ).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 1 << 30)]) as ch:
        yield ch


@pytest.fixture(scope="session")
def classifier(channel: grpc.Channel) -> classification_pb2_grpc.ClassificationStub:
    return classification_pb2_grpc.ClassificationStub(channel)


def classify_request(*contents: bytes, top_k: int | None = 5, model: str = "", version: str = "") -> classification_pb2.ClassifyRequest:
    request = classification_pb2.ClassifyRequest(
        model=common_pb2.ModelSelector(name=model, version=version),
        images=[common_pb2.Image(id=f"img{i}", content=c) for i, c in enumerate(contents)],
    )
    if top_k is not None:
        request.top_k = top_k
    return request


def scrape(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:  # loopback only
        return resp.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def random_state() -> np.random.Generator:
    return np.random.default_rng(1234)
