"""DELF costs on this machine: CPU milliseconds per image for the full pyramid and for each of its levels
alone, the pyramid's cost over the sum of its levels, and Match latency with 1000 keypoints per side.

    python -m loadtest.delf --rounds 3          # starts its own server (EfficientNet-Lite0 + a DELF ResNet-50)
    python -m loadtest.delf --target 127.0.0.1:50051 --metrics-url http://127.0.0.1:9464/metrics --model efficientnet_lite0

One client sends requests back to back, one image per request (scikit-image's motorcycle_left resized to a
1024-px longer side, or --image). Per round and model: --requests Extracts with the full reference pyramid,
then --requests per level with that scale only; CPU time is the server process's own
(`process_cpu_seconds_total` scraped before and after), wall time the client's. Then Match of two feature
sets of 1000 keypoints (the stereo pair, extracted first: the matching alone) and Match of the two images
(extraction included). Medians over rounds; each round measures pyramid and levels back to back, so a
noisy neighbour hits both sides of the ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from vision.client.channel import open_channel
from vision.tasks.delf import REFERENCE_SCALES
from vision.v1 import common_pb2, delf_pb2, delf_pb2_grpc

from loadtest.harness import SpawnedServer, read_image

DEFAULT_MODELS = ("efficientnet_lite0", "arch=delf_resnet50,weights=random,delf_score_threshold=0,name=delf_resnet50")


def cpu_seconds(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:  # loopback only
        for line in resp.read().decode().splitlines():
            if line.startswith("process_cpu_seconds_total "):
                return float(line.split()[1])
    return float("nan")


def default_images() -> tuple[bytes, bytes]:
    """The stereo pair, resized so the longer side is 1024 px (the default cap: the pyramid runs at 256 ... 2048)."""
    import skimage.data
    from PIL import Image

    out = []
    for name in ("motorcycle_left.png", "motorcycle_right.png"):
        img = Image.open(Path(skimage.data.__file__).parent / name).convert("RGB")
        img = img.resize((1024, round(1024 * img.height / img.width)), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out[0], out[1]


@dataclass
class Round:
    model: str
    # label ("pyramid", "0.25", ...) -> (wall ms, server CPU ms) per image
    extract: dict[str, tuple[float, float]] = field(default_factory=dict)
    match_features: tuple[float, float] = (float("nan"), float("nan"))
    match_images: tuple[float, float] = (float("nan"), float("nan"))

    @property
    def ratio_cpu(self) -> float:
        return self.extract["pyramid"][1] / sum(v[1] for k, v in self.extract.items() if k != "pyramid")

    @property
    def ratio_wall(self) -> float:
        return self.extract["pyramid"][0] / sum(v[0] for k, v in self.extract.items() if k != "pyramid")


def _timed(metrics_url: str, calls: int, fn) -> tuple[float, float]:  # noqa: ANN001
    cpu0, wall0 = cpu_seconds(metrics_url), time.perf_counter()
    for _ in range(calls):
        fn()
    wall, cpu = time.perf_counter() - wall0, cpu_seconds(metrics_url) - cpu0
    return 1000 * wall / calls, 1000 * cpu / calls


def one_round(stub: delf_pb2_grpc.DelfStub, metrics_url: str, model: str, left: bytes, right: bytes, requests: int, timeout: float) -> Round:
    selector = common_pb2.ModelSelector(name=model)

    def extract(content: bytes, scales: tuple[float, ...]) -> delf_pb2.DelfExtractResponse:
        return stub.Extract(
            delf_pb2.DelfExtractRequest(model=selector, images=[common_pb2.Image(content=content)],
                                        options=delf_pb2.DelfExtractOptions(scales=scales)),
            timeout=timeout,
        )

    result = Round(model)
    extract(left, REFERENCE_SCALES)  # warm-up: the engine's first run of each shape is slower
    result.extract["pyramid"] = _timed(metrics_url, requests, lambda: extract(left, REFERENCE_SCALES))
    for scale in REFERENCE_SCALES:
        extract(left, (scale,))
        result.extract[f"{scale:g}"] = _timed(metrics_url, requests, lambda s=scale: extract(left, (s,)))
    a = extract(left, REFERENCE_SCALES).results[0].features
    b = extract(right, REFERENCE_SCALES).results[0].features
    assert len(a.keypoints) == len(b.keypoints) == 1000, "Match latency is measured with 1000 keypoints per side"
    by_features = delf_pb2.DelfMatchRequest(a=delf_pb2.DelfMatchInput(features=a), b=delf_pb2.DelfMatchInput(features=b))
    result.match_features = _timed(metrics_url, max(requests, 5), lambda: stub.Match(by_features, timeout=timeout))
    by_images = delf_pb2.DelfMatchRequest(
        model=selector, a=delf_pb2.DelfMatchInput(image=common_pb2.Image(content=left)),
        b=delf_pb2.DelfMatchInput(image=common_pb2.Image(content=right)),
    )
    result.match_images = _timed(metrics_url, requests, lambda: stub.Match(by_images, timeout=timeout))
    return result


def _median(values: list[float]) -> float:
    return statistics.median(values)


def report(rounds: list[Round]) -> dict:
    out: dict = {}
    for model in dict.fromkeys(r.model for r in rounds):
        mine = [r for r in rounds if r.model == model]
        labels = list(mine[0].extract)
        out[model] = {
            "extract_ms": {k: {"wall": _median([r.extract[k][0] for r in mine]), "cpu": _median([r.extract[k][1] for r in mine])} for k in labels},
            "sum_of_levels_ms": {
                "wall": _median([sum(v[0] for k, v in r.extract.items() if k != "pyramid") for r in mine]),
                "cpu": _median([sum(v[1] for k, v in r.extract.items() if k != "pyramid") for r in mine]),
            },
            "pyramid_over_levels": {"cpu": [round(r.ratio_cpu, 3) for r in mine], "wall": [round(r.ratio_wall, 3) for r in mine],
                                    "cpu_median": _median([r.ratio_cpu for r in mine]), "wall_median": _median([r.ratio_wall for r in mine])},
            "match_1000x1000_features_ms": {"wall": _median([r.match_features[0] for r in mine]), "cpu": _median([r.match_features[1] for r in mine])},
            "match_two_images_ms": {"wall": _median([r.match_images[0] for r in mine]), "cpu": _median([r.match_images[1] for r in mine])},
        }
    return out


def print_report(summary: dict, rounds: int) -> None:
    for model, s in summary.items():
        print(f"\n{model} (median of {rounds} rounds; wall ms / server CPU ms per image)")
        for label, v in s["extract_ms"].items():
            name = "full pyramid" if label == "pyramid" else f"level {label}"
            print(f"  {name:14} {v['wall']:9.1f} {v['cpu']:9.1f}")
        lv = s["sum_of_levels_ms"]
        print(f"  {'sum of levels':14} {lv['wall']:9.1f} {lv['cpu']:9.1f}")
        r = s["pyramid_over_levels"]
        print(f"  pyramid / sum of levels: CPU {r['cpu_median']:.3f} {r['cpu']}, wall {r['wall_median']:.3f} {r['wall']}")
        m, i = s["match_1000x1000_features_ms"], s["match_two_images_ms"]
        print(f"  Match, 1000 x 1000 keypoints given: {m['wall']:.1f} ms wall, {m['cpu']:.1f} ms CPU")
        print(f"  Match, two images (extraction included): {i['wall']:.1f} ms wall, {i['cpu']:.1f} ms CPU")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.delf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="running server (default: start one on free loopback ports)")
    parser.add_argument("--metrics-url", help="with --target: its /metrics URL (for the server's CPU time)")
    parser.add_argument("--model", action="append", help="served model name (repeatable; default: every model of the spawned server)")
    parser.add_argument("--serve-model", action="append", metavar="SPEC",
                        help=f"model specs of the spawned server (default: {' and '.join(DEFAULT_MODELS)})")
    parser.add_argument("--image", type=Path, nargs=2, metavar=("A", "B"), help="two images of one scene (default: the stereo pair at 1024 px)")
    parser.add_argument("--requests", type=int, default=3, help="requests per measurement (default 3)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    if args.image:
        left, right = (read_image("loadtest.delf", p) for p in args.image)
        if left is None or right is None:
            return 2
    else:
        left, right = default_images()
    server = None
    if args.target:
        if not args.metrics_url:
            parser.error("--target needs --metrics-url (the server's CPU time comes from its /metrics)")
        target, metrics_url = args.target, args.metrics_url
        models = args.model or [""]
    else:
        specs = args.serve_model or list(DEFAULT_MODELS)
        serve_args = ["--services", "delf", "--max-batch-size", "8"]
        for spec in specs:
            serve_args += ["--model", spec]
        server = SpawnedServer(serve_args)
        target, metrics_url = server.target, server.metrics_url
        models = args.model or [s.split("name=")[1].split(",")[0] if "name=" in s else s.split(",")[0].removeprefix("arch=") for s in specs]
    rounds: list[Round] = []
    try:
        with open_channel(target) as channel:
            stub = delf_pb2_grpc.DelfStub(channel)
            for n in range(args.rounds):
                for model in models:
                    started = time.perf_counter()
                    rounds.append(one_round(stub, metrics_url, model, left, right, args.requests, args.timeout))
                    r = rounds[-1]
                    print(f"round {n + 1} {model or 'default'}: pyramid {r.extract['pyramid'][1]:.0f} ms CPU, levels "
                          f"{sum(v[1] for k, v in r.extract.items() if k != 'pyramid'):.0f} ms CPU, ratio {r.ratio_cpu:.3f}; "
                          f"match {r.match_features[0]:.0f} ms ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    except grpc.RpcError as exc:
        print(f"loadtest.delf: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    finally:
        if server is not None:
            server.close()
    summary = report(rounds)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_report(summary, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
