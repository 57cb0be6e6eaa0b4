"""Pieces shared by the load-test CLIs: closed-loop gRPC clients, the raw baseline, a spawned server."""


from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from vision.client.channel import Target, open_channel
from vision.v1 import classification_pb2, classification_pb2_grpc, common_pb2


class LoadtestError(Exception):
    """A load test cannot run as asked (unknown model, ...); the message says why."""


# Backoff after a failed RPC: 10 ms, doubling on each consecutive error up to 200 ms, so a dead or refusing
# target is not hammered in a tight loop (and the error counts stay meaningful).
ERROR_BACKOFF_S = 0.01
ERROR_BACKOFF_MAX_S = 0.2


@dataclass
class RunResult:
    mode: str
    concurrency: int
    images_per_second: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    errors: dict[str, int] = field(default_factory=dict)


def _percentiles(latencies: list[float]) -> tuple[float, float, float]:
    if not latencies:
        return (float("nan"),) * 3
    arr = np.asarray(latencies) * 1000
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return float(p50), float(p90), float(p99)


def read_image(prog: str, path: Path) -> bytes | None:
    """The payload image's bytes, or None after printing `PROG: cannot read PATH: reason`."""
    try:
        return path.read_bytes()
    except OSError as exc:
        print(f"{prog}: cannot read --image {path}: {exc.strerror or exc}", file=sys.stderr)
        return None


def error_summary(prog: str, results: list[RunResult]) -> int:
    """0 when no run had errors; else 1 after printing one line with the failed runs and error codes."""
    failed = [r for r in results if r.errors]
    if not failed:
        return 0
    codes: Counter[str] = Counter()
    for r in failed:
        codes.update(r.errors)
    detail = ", ".join(f"{k}={v}" for k, v in codes.most_common())
    print(f"{prog}: {len(failed)} of {len(results)} runs had errors ({detail})", file=sys.stderr, flush=True)
    return 1


async def service_run(target: Target, image: bytes, concurrency: int, duration: float, warmup: float, images_per_request: int, model: str) -> RunResult:
    """Closed-loop Classify clients (`images_per_request` copies of `image` per request)."""
    request = classification_pb2.ClassifyRequest(
        model=common_pb2.ModelSelector(name=model),
        images=[common_pb2.Image(id=str(i), content=image) for i in range(images_per_request)],
        top_k=5,
    )

    def classify(channel: grpc.aio.Channel, _image: bytes):  # noqa: ANN202 - timeout -> awaitable
        stub = classification_pb2_grpc.ClassificationStub(channel)
        return lambda timeout: stub.Classify(request, timeout=timeout)

    return await closed_run(target, classify, image, concurrency, duration, warmup, "service", images_per_call=images_per_request)


async def closed_run(target: Target, make_call, image: bytes, concurrency: int, duration: float, warmup: float,  # noqa: ANN001
                     mode: str, *, images_per_call: int = 1) -> RunResult:
    """`concurrency` clients, each sending its next request when the last one answered, for any one-image RPC:
    `make_call(channel, image)` returns `timeout -> awaitable` (the open loop's call factories, TorchServe's
    Predictions included), so every server is driven by the same client code."""
    # A few channels, so client-side HTTP/2 framing is not a single serial bottleneck.
    channels = [open_channel(target, aio=True) for _ in range(min(4, concurrency))]
    calls = [make_call(ch, image) for ch in channels]
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration

    async def client(i: int) -> None:
        call = calls[i % len(calls)]
        consecutive_errors = 0
        while (now := time.perf_counter()) < stop_at:
            try:
                await call(60)
            except grpc.aio.AioRpcError as exc:
                if now >= measure_from:
                    errors[exc.code().name] += 1
                consecutive_errors += 1
                delay = min(ERROR_BACKOFF_MAX_S, ERROR_BACKOFF_S * 2 ** (consecutive_errors - 1))
                await asyncio.sleep(min(delay, max(0.0, stop_at - time.perf_counter())))
                continue
            consecutive_errors = 0
            if now >= measure_from:
                latencies.append(time.perf_counter() - now)

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    for ch in channels:
        await ch.close()
    p50, p90, p99 = _percentiles(latencies)
    return RunResult(mode, concurrency, len(latencies) * images_per_call / duration, p50, p90, p99, len(latencies), dict(errors))


def raw_model(target: str, model_name: str, weights: Path | None, threads: int):
    """The served model rebuilt in-process through the same loading code, engine, weights and preset."""
    from vision.backends.torch_backend import run_on_torch_thread
    from vision.config.settings import ModelConfig, ServeSettings
    from vision.serving.loading import load_model

    with open_channel(target) as channel:
        infos = classification_pb2_grpc.ClassificationStub(channel).ListModels(common_pb2.ListModelsRequest(), timeout=30).models
    if not infos:
        raise LoadtestError(f"{target} serves no classification models")
    info = next((m for m in infos if m.name == model_name), None) if model_name else infos[0]
    if info is None:
        names = ", ".join(sorted({m.name for m in infos}))
        raise LoadtestError(f"model {model_name!r} is not served by {target}; served models: {names}")
    settings = ServeSettings(
        backend=info.backend,
        threads=threads,
        models=[
            ModelConfig(
                arch=info.architecture,
                num_classes=info.num_labels,
                weights=weights or ("random" if info.random_weights else None),
                preset=info.preprocessing.preset,
            )
        ],
    )
    served = load_model(settings.models[0], settings)
    forward = served.backend.forward
    if info.backend == "torch":
        # torch must run on the thread that built it (see vision.backends.torch_backend).
        return (lambda batch: run_on_torch_thread(forward, batch)), served.card.preset, info
    return forward, served.card.preset, info


def raw_run(forward, preset, image: bytes, batch_size: int, duration: float, warmup: float) -> RunResult:
    from vision.media.imaging import load_image

    latencies: list[float] = []
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration
    while (now := time.perf_counter()) < stop_at:
        batch = np.stack([load_image(image, preset) for _ in range(batch_size)])
        forward(batch)
        if now >= measure_from:
            latencies.append(time.perf_counter() - now)
    p50, p90, p99 = _percentiles(latencies)
    return RunResult(f"raw-b{batch_size}", batch_size, len(latencies) * batch_size / duration, p50, p90, p99, len(latencies))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        match = re.search(r"VmRSS:\s+(\d+) kB", fh.read())
    return int(match.group(1)) / 1024 if match else float("nan")


def add_round_flags(parser: argparse.ArgumentParser, rounds: int = 6) -> None:
    """The flags of every benchmark that alternates servers round by round: the image, clients, seconds per
    run (measured and warm-up) and rounds."""
    parser.add_argument("--image", type=Path, required=True, help="image sent in every request")
    parser.add_argument("--concurrency", type=int, default=16, help="clients per run (default 16)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each run (default 2)")
    parser.add_argument("--rounds", type=int, default=rounds, help=f"alternating rounds (default {rounds})")


class SpawnedServer:
    def __init__(self, serve_args: list[str], env: dict[str, str] | None = None) -> None:
        """`vision serve` with `serve_args`; `env` is added to this process's environment (OTEL_*, or a
        PYTHONPATH that runs another tree's code)."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vision.cli", "serve", "--port", "0", "--metrics-port", "0", *serve_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **env} if env else None,
        )
        self.target = ""
        self.metrics_url = ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if m := re.search(rb"gRPC listening on (\S+)", line):
                self.target = m.group(1).decode()
            if m := re.search(rb"metrics at (\S+)", line):
                self.metrics_url = m.group(1).decode()
                break
        if not self.target:
            raise SystemExit(f"server failed to start (exit {self.proc.wait()})")
        self.rss_samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.wait(5.0):
            self.rss_samples.append((time.perf_counter() - t0, rss_mib(self.proc.pid)))

    def close(self) -> None:
        self._stop.set()
        self.proc.terminate()
        self.proc.wait(timeout=60)




def scrape_sums(metrics_url: str) -> dict[tuple[str, str], float]:
    """(metric, label-string) → value for the histogram _sum/_count series the breakdown needs."""
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=10) as resp:  # loopback only
        text = resp.read().decode()
    values: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith(("vision_stage_duration_seconds_", "vision_request_duration_seconds_", "vision_inference_batch_size_")):
            series, _, value = line.rpartition(" ")
            name, _, labels = series.partition("{")
            if name.endswith(("_sum", "_count")):
                values[(name, labels)] = values.get((name, labels), 0.0) + float(value)
    return values


def stage_breakdown(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> dict[str, float]:
    """Mean milliseconds per stage between two scrapes (decode/preprocess per image, queue/inference per
    batch, request = server-side RPC time) and the mean batch size."""
    def delta(name: str, needle: str) -> float:
        return sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == name and needle in k[1])

    out: dict[str, float] = {}
    for stage in ("decode", "preprocess", "queue", "inference"):
        n = delta("vision_stage_duration_seconds_count", f'stage="{stage}"')
        out[stage] = 1000 * delta("vision_stage_duration_seconds_sum", f'stage="{stage}"') / n if n else float("nan")
    n = delta("vision_request_duration_seconds_count", 'method="Classify"')
    out["server_request"] = 1000 * delta("vision_request_duration_seconds_sum", 'method="Classify"') / n if n else float("nan")
    n = delta("vision_inference_batch_size_count", "")
    out["mean_batch"] = delta("vision_inference_batch_size_sum", "") / n if n else float("nan")
    return out
