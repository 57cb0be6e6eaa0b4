"""One command, one run: every way of serving the model under the same open-loop load, each against raw.

    python -m loadtest.modes --image coffee.jpg --rates 20,40,60,80,100,120,140 --duration 10 \
        --mix classify=70,tag=20,extract=10 --out loadtest-report

Modes (`--modes`, in this order by default):
  raw         the model in this process: decode + preprocess + forward in a loop at batch 1 and at
              --max-batch-size, no gRPC (the ceiling every other mode is divided by)
  standalone  `vision serve` (grpc.aio, ONNX Runtime, in-process batcher)
  triton      `vision serve --backend triton` in front of a local tritonserver (python backend, same ONNX file)
  ray         `vision serve --runner ray` (Ray Serve gRPC proxy, @serve.batch, fused topology)
  ray-split   the same with --ray-topology split (decode and inference in separate deployments)

Fairness: every mode serves the same ONNX export of the same weights with --threads engine threads and
--max-batch-size, receives the same image (server-side decode), the same RPC mix, rates, deadline and
arrival seed. Each mode is swept from the lowest rate up (open loop, HDR percentiles, see
loadtest.openloop); the report gives the knee and each mode's ratio to raw batched img/s. Writes
OUT/report.json, OUT/throughput_vs_offered.png, OUT/latency_cdf.png, OUT/latency_over_time.png.

TorchServe as a peer is not part of this command yet (see docs/ray.md, "Load-test harness").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from loadtest.harness import SpawnedServer, raw_model, raw_run, read_image
from loadtest.openloop import OpenLoopResult, knee, parse_mix, sweep
from vision.settings import available_cpus

MODES = ("raw", "standalone", "triton", "ray", "ray-split")


def _server_args(mode: str, threads: int, batch: int) -> list[str]:
    common = ["--threads", str(threads), "--decode-workers", str(threads), "--max-batch-size", str(batch)]
    if mode == "standalone":
        return ["--backend", "onnxruntime", *common]
    if mode in ("ray", "ray-split"):
        topology = "split" if mode == "ray-split" else "fused"
        return ["--runner", "ray", "--ray-topology", topology, "--ray-num-cpus", str(max(2, threads)), *common]
    raise ValueError(mode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.modes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, required=True, help="image sent in every request")
    parser.add_argument("--modes", default=",".join(MODES[:-1]), help=f"comma-separated, from {', '.join(MODES)} (default all but ray-split)")
    parser.add_argument("--rates", default="20,40,60,80,100,120,140", help="offered requests/s, swept upwards")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per rate (default 10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per rate (default 3)")
    parser.add_argument("--mix", default="classify=70,tag=20,extract=10", help="RPC weights (default classify=70,tag=20,extract=10)")
    parser.add_argument("--deadline-ms", type=float, default=2000.0, help="per-request gRPC deadline (default 2000)")
    parser.add_argument("--arrivals", choices=["poisson", "constant"], default="poisson")
    parser.add_argument("--threads", type=int, default=available_cpus(), help="engine threads everywhere (default: usable CPUs)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="max batch everywhere (default 16)")
    parser.add_argument("--out", type=Path, default=Path("loadtest-report"), help="report folder (default ./loadtest-report)")
    args = parser.parse_args(argv)
    image = read_image(parser.prog, args.image)
    if image is None:
        return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"{parser.prog}: unknown modes {unknown}; known: {', '.join(MODES)}", file=sys.stderr)
        return 2
    mix = parse_mix(args.mix)
    rates = [float(r) for r in args.rates.split(",")]
    load = dict(duration=args.duration, warmup=args.warmup, mix=mix, deadline_s=args.deadline_ms / 1000, arrivals=args.arrivals)
    runs: dict[str, list[OpenLoopResult]] = {}
    raw: dict[str, float] = {}
    settings: dict[str, object] = {
        "machine": _machine(), "threads": args.threads, "max_batch_size": args.max_batch_size, "mix": mix,
        "rates": rates, "duration_s": args.duration, "warmup_s": args.warmup, "deadline_ms": args.deadline_ms,
        "arrivals": args.arrivals, "image_bytes": len(image), "modes": {},
    }

    def drive(mode: str, target: str) -> None:
        print(f"== {mode} ({target})", flush=True)
        runs[mode] = asyncio.run(sweep(target, image, rates, mode=mode, **load))

    with ExitStack() as stack:
        if "raw" in modes or "standalone" in modes:
            server = SpawnedServer(_server_args("standalone", args.threads, args.max_batch_size))
            stack.callback(server.close)
            if "raw" in modes:
                forward, preset, info = raw_model(server.target, "", None, args.threads)
                for bs in sorted({1, args.max_batch_size}):
                    result = raw_run(forward, preset, image, bs, args.duration, args.warmup)
                    raw[f"b{bs}"] = result.images_per_second
                    print(f"raw b{bs}: {result.images_per_second:.1f} img/s (p50 {result.p50_ms:.1f} ms)", flush=True)
                settings["modes"]["raw"] = f"{info.backend} in-process, {args.threads} threads, decode+preprocess+forward"  # type: ignore[index]
                del forward
            if "standalone" in modes:
                settings["modes"]["standalone"] = " ".join(_server_args("standalone", args.threads, args.max_batch_size))  # type: ignore[index]
                drive("standalone", server.target)
            server.close()
            stack.pop_all()
        if "triton" in modes:
            _triton(args, drive, settings)
        for mode in ("ray", "ray-split"):
            if mode in modes:
                server_args = _server_args(mode, args.threads, args.max_batch_size)
                settings["modes"][mode] = " ".join(server_args)  # type: ignore[index]
                server = SpawnedServer(server_args)
                try:
                    drive(mode, server.target)
                finally:
                    server.close()

    report = _report(runs, raw, settings)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    from loadtest.report import plot

    for path in plot(runs, args.out, title=f"{args.mix}, {args.arrivals} arrivals"):
        print(f"wrote {path}")
    print(f"wrote {args.out / 'report.json'}")
    return 0


def _triton(args: argparse.Namespace, drive, settings: dict) -> None:  # noqa: ANN001
    from vision.triton.runtime import TritonProcess, setup_runtime

    with tempfile.TemporaryDirectory(prefix="modes-triton-") as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        subprocess.run([sys.executable, "-m", "vision.cli", "export-triton", "--model", "efficientnet_lite0", "--repository",
                        str(repo), "--max-batch-size", str(args.max_batch_size)], check=True, capture_output=True)
        with TritonProcess(repo, runtime=setup_runtime(), log_path=Path(tmp) / "triton.log") as triton:
            server_args = ["--backend", "triton", "--triton-url", triton.grpc_address, "--decode-workers", str(args.threads)]
            settings["modes"]["triton"] = " ".join(server_args) + f" (tritonserver python backend, max_batch_size {args.max_batch_size})"
            server = SpawnedServer(server_args)
            try:
                drive("triton", server.target)
            finally:
                server.close()


def _report(runs: dict[str, list[OpenLoopResult]], raw: dict[str, float], settings: dict) -> dict:
    batched = max(raw.values()) if raw else None
    rows = []
    print()
    print("| mode | knee (req/s) | p50 / p99 / p99.9 at knee (ms) | max answered (req/s) | knee / raw | client-bound runs |")
    print("|---|---|---|---|---|---|")
    if raw:
        print(f"| raw (in-process, batch {max(raw, key=raw.get)[1:]}) | {batched:.1f} img/s | | | 1.00 | |")
    for mode, results in runs.items():
        best = knee(results)
        top = max((r.achieved_rps for r in results), default=0.0)
        ratio = (best.achieved_rps / batched) if best and batched else None
        flagged = sum(r.client_bound for r in results)
        lat = best.latency_ms if best else {}
        cells = f"{lat['p50']:.1f} / {lat['p99']:.1f} / {lat['p99.9']:.1f}" if best else "–"
        print(f"| {mode} | {best.offered_rps:.0f} |" if best else f"| {mode} | below {results[0].offered_rps:.0f} |", end="")
        print(f" {cells} | {top:.1f} | {f'{ratio:.2f}' if ratio is not None else '–'} | {flagged} |")
        rows.append({"mode": mode, "knee_rps": best.offered_rps if best else None, "knee_achieved_rps": best.achieved_rps if best else None,
                     "max_achieved_rps": top, "ratio_to_raw": ratio, "client_bound_runs": flagged})
    return {"settings": settings, "raw_images_per_second": raw, "summary": rows,
            "runs": {mode: [asdict(r) for r in results] for mode, results in runs.items()}}


def _machine() -> str:
    import os
    import platform

    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.node()}: {os.cpu_count()} CPUs ({model}), usable {available_cpus()}, {time.strftime('%Y-%m-%d')}"


if __name__ == "__main__":
    sys.exit(main())
