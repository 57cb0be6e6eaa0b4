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
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

from vision.config.settings import available_cpus

from loadtest.harness import (
    LoadtestError,
    RunResult,
    SpawnedServer,
    error_summary,
    raw_model,
    raw_run,
    read_image,
    service_run,
)


def print_result(result: RunResult) -> None:
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
    parser.add_argument("--images-per-request", type=int, default=1, help="images in each Classify request (default 1)")
    parser.add_argument("--model", default="", help="model name (default: the server's default)")
    parser.add_argument("--weights", type=Path, help="weights file for the raw baseline (default: bundled)")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="raw baseline batch size; match the server's --max-batch-size (default 16)"
    )
    parser.add_argument(
        "--threads", type=int, default=available_cpus(), help="raw baseline engine threads (default: available CPUs, %(default)s here)"
    )
    parser.add_argument("--no-raw", action="store_true", help="skip the in-process baseline")
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="repeat the whole raw + service sequence this many times and report the median of each round's "
        "ratios: on a shared, noisy machine neighbours' load then hits both sides alike (default 1)",
    )
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `vision serve` argument when spawning")
    parser.add_argument("--json", type=Path, help="also write all results here")
    args = parser.parse_args(argv)

    image = read_image(parser.prog, args.image)
    if image is None:
        return 2
    spawned = None if args.target else SpawnedServer(args.serve_arg)
    target = args.target or spawned.target  # type: ignore[union-attr]
    results: list[RunResult] = []
    ratios: dict[str, list[float]] = {}
    try:
        forward = preset = None
        if not args.no_raw:
            try:
                forward, preset, info = raw_model(target, args.model, args.weights, args.threads)
            except LoadtestError as exc:
                print(f"{parser.prog}: {exc}", file=sys.stderr)
                return 2
            print(f"raw baseline: {info.name}:{info.version} ({info.architecture}, engine {info.backend}, {args.threads} threads)")
        for round_no in range(1, args.rounds + 1):
            if args.rounds > 1:
                print(f"round {round_no}/{args.rounds}")
            raw: dict[int, RunResult] = {}
            if forward is not None:
                for bs in sorted({1, args.batch_size}):
                    raw[bs] = raw_run(forward, preset, image, bs, args.duration, args.warmup)
                    print_result(raw[bs])
                    results.append(raw[bs])
            for c in [int(x) for x in args.concurrency.split(",")]:
                result = asyncio.run(service_run(target, image, c, args.duration, args.warmup, args.images_per_request, args.model))
                print_result(result)
                results.append(result)
                if raw and c == 1 and 1 in raw:
                    delta = result.p50_ms - raw[1].p50_ms
                    ratios.setdefault("c=1 p50 - raw batch-1 p50 (ms)", []).append(delta)
                    print(f"           c=1 p50 - raw batch-1 p50 = {delta:+.1f} ms")
                if raw and c > 1:
                    ratio = result.images_per_second / raw[args.batch_size].images_per_second
                    ratios.setdefault(f"c={c} service/raw-b{args.batch_size} throughput", []).append(ratio)
                    print(f"           service/raw-b{args.batch_size} throughput = {ratio:.2f}")
        if args.rounds > 1:
            for name, values in ratios.items():
                print(f"median over {len(values)} rounds: {name} = {statistics.median(values):.2f}  (rounds: "
                      + ", ".join(f"{v:.2f}" for v in values) + ")")
    finally:
        if spawned is not None:
            spawned.close()
            if spawned.rss_samples:
                rss = [r for _, r in spawned.rss_samples]
                print(f"server RSS MiB: first {rss[0]:.0f}, max {max(rss):.0f}, last {rss[-1]:.0f}, median {statistics.median(rss):.0f}")
    if args.json:
        payload = {"results": [asdict(r) for r in results], "rss_mib": spawned.rss_samples if spawned else []}
        args.json.write_text(json.dumps(payload, indent=2))
    return error_summary(parser.prog, results)


if __name__ == "__main__":
    sys.exit(main())
