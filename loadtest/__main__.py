"""Closed-loop gRPC load test with an in-process raw-model baseline, so one run prints service/raw ratios.

    python -m loadtest --image coffee.jpg --concurrency 1,4,16 --duration 20
    vision loadtest --target 127.0.0.1:50051 --image coffee.jpg --concurrency 16 --no-raw

Without --target it starts `vision serve` itself on free loopback ports (passing --serve-arg values) and
reports the server's RSS over the run. The raw baseline runs the same model with the same engine in this
process: decode + preprocess + forward on batches of --batch-size (and of 1), no gRPC, no queue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

from vision.v1 import classification_pb2, classification_pb2_grpc, common_pb2


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


async def _service_run(target: str, image: bytes, concurrency: int, duration: float, warmup: float, images_per_request: int, model: str) -> RunResult:
    request = classification_pb2.ClassifyRequest(
        model=common_pb2.ModelSelector(name=model),
        images=[common_pb2.Image(id=str(i), content=image) for i in range(images_per_request)],
        top_k=5,
    )
    options = [("grpc.max_send_message_length", 1 << 30)]
    # A few channels, so client-side HTTP/2 framing is not a single serial bottleneck.
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(min(4, concurrency))]
    stubs = [classification_pb2_grpc.ClassificationStub(ch) for ch in channels]
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration

    async def client(i: int) -> None:
        stub = stubs[i % len(stubs)]
        while (now := time.perf_counter()) < stop_at:
            try:
                await stub.Classify(request, timeout=60)
                ok = True
            except grpc.aio.AioRpcError as exc:
                ok = False
                if now >= measure_from:
                    errors[exc.code().name] += 1
            if now >= measure_from and ok:
                latencies.append(time.perf_counter() - now)

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    for ch in channels:
        await ch.close()
    p50, p90, p99 = _percentiles(latencies)
    return RunResult("service", concurrency, len(latencies) * images_per_request / duration, p50, p90, p99, len(latencies), dict(errors))


def _raw_model(target: str, model_name: str, weights: Path | None, threads: int):
    """The served model rebuilt in-process through the same loading code, engine, weights and preset."""
    from vision.backends.torch_backend import run_on_torch_thread
    from vision.repository import load_model
    from vision.settings import ModelConfig, ServeSettings

    with grpc.insecure_channel(target) as channel:
        infos = classification_pb2_grpc.ClassificationStub(channel).ListModels(common_pb2.ListModelsRequest(), timeout=30).models
    info = next((m for m in infos if m.name == model_name), infos[0]) if model_name else infos[0]
    settings = ServeSettings(
        backend=info.backend,
        threads=threads,
        models=[ModelConfig(arch=info.architecture, num_classes=info.num_labels, weights=weights, preset=info.preprocessing.preset)],
    )

    def load():  # noqa: ANN202
        import torch

        torch.set_num_threads(threads)
        return load_model(settings.models[0], settings)

    served = run_on_torch_thread(load)
    forward = served.backend.forward
    if info.backend == "torch":
        # torch must run on the thread that built it (see vision.backends.torch_backend).
        return (lambda batch: run_on_torch_thread(forward, batch)), served.card.preset, info
    return forward, served.card.preset, info


def _raw_run(forward, preset, image: bytes, batch_size: int, duration: float, warmup: float) -> RunResult:
    from vision.imaging import load_image

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


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        match = re.search(r"VmRSS:\s+(\d+) kB", fh.read())
    return int(match.group(1)) / 1024 if match else float("nan")


class _SpawnedServer:
    def __init__(self, serve_args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vision.cli", "serve", "--port", "0", "--metrics-port", "0", *serve_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.target = ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if m := re.search(rb"gRPC listening on (\S+)", line):
                self.target = m.group(1).decode()
            if b"metrics at" in line:
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
            self.rss_samples.append((time.perf_counter() - t0, _rss_mib(self.proc.pid)))

    def close(self) -> None:
        self._stop.set()
        self.proc.terminate()
        self.proc.wait(timeout=60)


def _print(result: RunResult) -> None:
    errs = ", ".join(f"{k}={v}" for k, v in result.errors.items()) or "0"
    print(
        f"{result.mode:>10} c={result.concurrency:<3d} {result.images_per_second:8.1f} img/s   "
        f"p50 {result.p50_ms:7.1f} ms  p90 {result.p90_ms:7.1f} ms  p99 {result.p99_ms:7.1f} ms   "
        f"requests {result.requests}  errors {errs}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vision loadtest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="running server (default: start one on free loopback ports)")
    parser.add_argument("--image", type=Path, required=True, help="image sent in every request")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated client counts (default 1,16)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per run (default 20)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each run (default 3)")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--model", default="", help="model name (default: the server's default)")
    parser.add_argument("--weights", type=Path, help="weights file for the raw baseline (default: bundled)")
    parser.add_argument("--batch-size", type=int, default=16, help="raw baseline batch size; match --max-batch-size")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="raw baseline engine threads")
    parser.add_argument("--no-raw", action="store_true", help="skip the in-process baseline")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `vision serve` argument when spawning")
    parser.add_argument("--json", type=Path, help="also write all results here")
    args = parser.parse_args(argv)

    image = args.image.read_bytes()
    spawned = None if args.target else _SpawnedServer(args.serve_arg)
    target = args.target or spawned.target  # type: ignore[union-attr]
    results: list[RunResult] = []
    try:
        raw: dict[int, RunResult] = {}
        if not args.no_raw:
            forward, preset, info = _raw_model(target, args.model, args.weights, args.threads)
            print(f"raw baseline: {info.name}:{info.version} ({info.architecture}, engine {info.backend}, {args.threads} threads)")
            for bs in sorted({1, args.batch_size}):
                raw[bs] = _raw_run(forward, preset, image, bs, args.duration, args.warmup)
                _print(raw[bs])
                results.append(raw[bs])
            del forward
        for c in [int(x) for x in args.concurrency.split(",")]:
            result = asyncio.run(_service_run(target, image, c, args.duration, args.warmup, args.images_per_request, args.model))
            _print(result)
            results.append(result)
            if raw and c == 1 and 1 in raw:
                print(f"           c=1 p50 - raw batch-1 p50 = {result.p50_ms - raw[1].p50_ms:+.1f} ms")
            if raw and c > 1:
                print(f"           service/raw-b{args.batch_size} throughput = {result.images_per_second / raw[args.batch_size].images_per_second:.2f}")
    finally:
        if spawned is not None:
            spawned.close()
            if spawned.rss_samples:
                rss = [r for _, r in spawned.rss_samples]
                print(f"server RSS MiB: first {rss[0]:.0f}, max {max(rss):.0f}, last {rss[-1]:.0f}, median {statistics.median(rss):.0f}")
    if args.json:
        payload = {"results": [asdict(r) for r in results], "rss_mib": spawned.rss_samples if spawned else []}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
