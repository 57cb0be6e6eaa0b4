"""One run, same model and payload: TorchBackend vs OnnxRuntimeBackend vs Triton vs raw ONNX Runtime.

    python -m loadtest.compare_backends --image coffee.jpg --concurrency 1,4,16 --duration 15

Starts each configuration in turn on free loopback ports (for Triton: exports the model with
`vision export-triton`, starts the local tritonserver, then `vision serve --backend triton`), drives it
with the closed-loop client, and reads the server's own stage histograms to say where the time goes:
decode and preprocess per image, queue wait and inference per batch, server-side RPC time; the rest of
the client-observed latency is gRPC serialization, transport and client overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from vision.config.settings import available_cpus

from loadtest.harness import (
    RunResult,
    SpawnedServer,
    error_summary,
    raw_model,
    raw_run,
    read_image,
    scrape_sums,
    service_run,
    stage_breakdown,
)


def _row(label: str, r: RunResult, stages: dict[str, float] | None) -> str:
    s = stages or {}
    fmt = lambda key: f"{s[key]:.1f}" if key in s and s[key] == s[key] else "–"  # noqa: E731 - NaN check
    return (
        f"| {label} | {r.concurrency} | {r.images_per_second:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
        f"{fmt('decode')} | {fmt('preprocess')} | {fmt('queue')} | {fmt('inference')} | {fmt('mean_batch')} | "
        f"{fmt('server_request')} | {sum(r.errors.values())} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.compare_backends", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, required=True, help="image sent in every request")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per run (default 15)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each run (default 3)")
    parser.add_argument(
        "--backends", default="torch,onnxruntime,triton,triton-shm",
        help="comma-separated configurations (default torch,onnxruntime,triton,triton-shm)",
    )
    parser.add_argument(
        "--threads", type=int, default=available_cpus(),
        help="engine threads of each server and the raw baseline (default: available CPUs, %(default)s here)",
    )
    parser.add_argument("--json", type=Path, help="also write all results here")
    args = parser.parse_args(argv)
    image = read_image(parser.prog, args.image)
    if image is None:
        return 2
    all_runs: list[RunResult] = []
    levels = [int(c) for c in args.concurrency.split(",")]
    rows: list[str] = []
    results: list[dict] = []

    def drive(label: str, server: SpawnedServer) -> None:
        for c in levels:
            before = scrape_sums(server.metrics_url)
            r = asyncio.run(service_run(server.target, image, c, args.duration, args.warmup, 1, ""))
            all_runs.append(r)
            stages = stage_breakdown(before, scrape_sums(server.metrics_url))
            rows.append(_row(label, r, stages))
            results.append({"label": label, **asdict(r), "stages": stages})
            print(rows[-1], flush=True)

    def triton_batch(triton, before: dict) -> float:
        after = triton.model_stats("efficientnet_lite0")
        runs = int(after["execution_count"]) - int(before["execution_count"])
        return (int(after["inference_count"]) - int(before["inference_count"])) / runs if runs else float("nan")

    backends = args.backends.split(",")
    for backend in [b for b in backends if not b.startswith("triton")]:
        server = SpawnedServer(["--backend", backend, "--threads", str(args.threads)])
        try:
            if backend == "onnxruntime":
                forward, preset, _ = raw_model(server.target, "", None, args.threads)
                for bs in sorted({1, 16}):
                    r = raw_run(forward, preset, image, bs, args.duration, args.warmup)
                    rows.append(_row(f"raw ONNX Runtime b{bs}", r, None))
                    results.append({"label": f"raw-ort-b{bs}", **asdict(r)})
                    print(rows[-1], flush=True)
                del forward
            drive(f"service → {backend}", server)
        finally:
            server.close()
    triton_modes = [b for b in backends if b.startswith("triton")]
    if triton_modes:
        from vision.triton import TritonProcess, setup_runtime

        with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
            repo = Path(tmp) / "repo"
            repo.mkdir()
            subprocess.run([sys.executable, "-m", "vision.cli", "export-triton", "--model", "efficientnet_lite0",
                            "--repository", str(repo)], check=True, capture_output=True)
            with TritonProcess(repo, runtime=setup_runtime(), log_path=Path(tmp) / "triton.log") as triton:
                for mode in triton_modes:
                    extra = ["--triton-shm-mb", "16"] if mode == "triton-shm" else []
                    server = SpawnedServer(["--backend", "triton", "--triton-url", triton.grpc_address, *extra])
                    try:
                        before = triton.model_stats("efficientnet_lite0")
                        drive(f"service → Triton{' (shm)' if extra else ''}", server)
                        print(f"  Triton's own mean executed batch over these runs: {triton_batch(triton, before):.1f}")
                    finally:
                        server.close()

    print()
    print("| configuration | clients | img/s | p50 ms | p99 ms | decode ms | preprocess ms | queue ms | inference ms/batch | mean batch | server RPC ms | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return error_summary(parser.prog, all_runs)


if __name__ == "__main__":
    sys.exit(main())
