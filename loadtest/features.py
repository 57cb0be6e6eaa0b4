"""Features extraction speed per recipe, as a ratio to the raw model's forward pass measured in the same run.

    python -m loadtest.features --image coffee.jpg --duration 8 --rounds 3

Starts `vision serve` on free loopback ports (or uses --target), and per round: the raw baseline (decode +
centre crop + forward at batch 16, in this process, the served model rebuilt through the same loading
code and engine), then each recipe through the Features service at --concurrency clients, 1 image per
request. Also prints the issue's cost targets: ten_crop costs <= 10.5x center (ten forwards' pixels) and
three-scale GeM costs <= 2.2x single-scale GeM (the scales' pixels alone are 1.75x).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from vision.client.channel import open_channel
from vision.v1 import common_pb2, features_pb2, features_pb2_grpc

from loadtest.harness import SpawnedServer, raw_model, raw_run, read_image

RECIPES: dict[str, dict[str, object]] = {
    "center": {"recipe": "center"},
    "ten_crop": {"recipe": "ten_crop"},
    "spoc": {"recipe": "spoc"},
    "mac": {"recipe": "mac"},
    "gem": {"recipe": "gem"},
    "gem 3 scales": {"recipe": "gem", "scales": [1.0, 0.7071, 0.5]},
    "rmac": {"recipe": "rmac"},
    "crow": {"recipe": "crow"},
}


async def _extract_run(target: str, image: bytes, fields: dict[str, object], concurrency: int, duration: float, warmup: float) -> float:
    request = features_pb2.ExtractRequest(images=[common_pb2.Image(content=image)], **fields)  # type: ignore[arg-type]
    done = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration
    async with open_channel(target, aio=True) as channel:
        stub = features_pb2_grpc.FeaturesStub(channel)

        async def client() -> None:
            nonlocal done
            while (now := time.perf_counter()) < stop_at:
                await stub.Extract(request, timeout=60)
                if now >= measure_from:
                    done += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return done / duration


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.features", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="running server (default: start one on free loopback ports)")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per recipe (default 8)")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=4, help="clients per recipe (default 4)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="raw baseline engine threads (default 2)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    image = read_image("loadtest.features", args.image)
    if image is None:
        return 2
    server = None if args.target else SpawnedServer([])
    target = args.target or server.target  # type: ignore[union-attr]
    rows: list[dict[str, float]] = []
    try:
        forward, preset, info = raw_model(target, "", None, args.threads)
        print(f"raw baseline: {info.name}:{info.version} on {info.backend}, batch 16, {args.threads} threads")
        for round_ in range(1, args.rounds + 1):
            raw = raw_run(forward, preset, image, 16, args.duration, args.warmup).images_per_second
            row = {"raw": raw}
            for name, fields in RECIPES.items():
                row[name] = asyncio.run(_extract_run(target, image, fields, args.concurrency, args.duration, args.warmup))
            rows.append(row)
            print(f"round {round_}: raw forward {raw:.1f} img/s; " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k != "raw"))
    finally:
        if server is not None:
            server.close()
    print(f"\n{'recipe':>14} {'img/s (median)':>15} {'/ raw forward':>14}")
    for name in RECIPES:
        ips = statistics.median(r[name] for r in rows)
        ratio = statistics.median(r[name] / r["raw"] for r in rows)
        print(f"{name:>14} {ips:15.1f} {ratio:14.2f}")
    ten = statistics.median(r["center"] / r["ten_crop"] for r in rows)
    scales = statistics.median(r["gem"] / r["gem 3 scales"] for r in rows)
    print(f"\nten_crop costs {ten:.2f}x center (target <= 10.5); three scales cost {scales:.2f}x one (target <= 2.2)")
    if args.json:
        args.json.write_text(json.dumps({"rounds": rows, "ten_crop_cost": ten, "three_scale_cost": scales}, indent=2))
    return 0 if ten <= 10.5 and scales <= 2.2 else 1


if __name__ == "__main__":
    sys.exit(main())
