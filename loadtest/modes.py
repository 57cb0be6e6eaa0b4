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
  raw-torch   the same model in eager torch in this process: channels_last, inference_mode, --threads,
              batch 1 and --max-batch-size, decode + preprocess + forward + top-5 (the peer handler's code)
  standalone-torch  `vision serve --backend torch` (the service on the peer's engine)
  torchserve  TorchServe 0.12 over its gRPC Predictions API, serving the same state dict with
              loadtest/torchserve_handler.py (vision.media.imaging decode, channels_last, --threads torch
              threads, batchSize = --max-batch-size, one worker); needs loadtest/torchserve_setup.sh's
              virtualenv and Java, skipped with the reason otherwise

Fairness: every mode serves the same weights (--model; ONNX Runtime modes its ONNX export, torch modes
and TorchServe the same state dict) with --threads engine threads and --max-batch-size, receives the same
image (server-side decode), the same RPC mix, rates, deadline and arrival seed. Each mode is swept from
the lowest rate up (open loop, HDR percentiles, see loadtest.openloop), or with --concurrency N driven by N
closed-loop clients sending 1-image classify requests (TorchServe: Predictions). The report gives each
mode's ratio to its own raw engine (ONNX Runtime modes to raw, torch modes to raw-torch) and to
TorchServe. TorchServe only classifies: give it --mix classify=1 (or --concurrency) for a like-for-like
comparison. Writes OUT/report.json, OUT/throughput_vs_offered.png, OUT/latency_cdf.png,
OUT/latency_over_time.png (open loop) or OUT/modes.png (closed loop: img/s per mode with both ratios).
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

from vision.config.settings import available_cpus

from loadtest.harness import RunResult, SpawnedServer, closed_run, raw_model, raw_run, read_image
from loadtest.openloop import RPCS, OpenLoopResult, knee, parse_mix, sweep

MODES = ("raw", "standalone", "triton", "ray", "ray-split", "raw-torch", "standalone-torch", "torchserve")
DEFAULT_MODES = tuple(m for m in MODES if m != "ray-split")
# Which engine each mode runs, and the raw in-process baseline of that engine its ratio is taken to.
ENGINE = {"raw": "onnxruntime", "standalone": "onnxruntime", "triton": "onnxruntime (triton python backend)",
          "ray": "onnxruntime", "ray-split": "onnxruntime", "raw-torch": "torch", "standalone-torch": "torch",
          "torchserve": "torch"}
RAW_OF = {mode: ("raw-torch" if ENGINE[mode] == "torch" else "raw") for mode in ENGINE}
RAW_MODES = ("raw", "raw-torch")


def _server_args(mode: str, threads: int, batch: int, model: str = "efficientnet_lite0") -> list[str]:
    common = ["--model", model, "--threads", str(threads), "--decode-workers", str(threads), "--max-batch-size", str(batch)]
    if mode == "standalone":
        return ["--backend", "onnxruntime", *common]
    if mode == "standalone-torch":
        return ["--backend", "torch", *common]
    if mode in ("ray", "ray-split"):
        topology = "split" if mode == "ray-split" else "fused"
        return ["--runner", "ray", "--ray-topology", topology, "--ray-num-cpus", str(max(2, threads)), *common]
    raise ValueError(mode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.modes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, required=True, help="image sent in every request")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, from {', '.join(MODES)} (default all but ray-split)")
    parser.add_argument("--model", default="efficientnet_lite0",
                        help="`vision serve --model` spec every mode serves (default efficientnet_lite0, its bundled weights; "
                        "e.g. arch=resnet50,weights=random)")
    parser.add_argument("--concurrency", type=int,
                        help="closed loop instead of the open-loop sweep: this many clients, 1-image classify requests")
    parser.add_argument("--rates", default="20,40,60,80,100,120,140", help="offered requests/s, swept upwards")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per rate (default 10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per rate (default 3)")
    parser.add_argument("--mix", default="classify=70,tag=20,extract=10", help="RPC weights (default classify=70,tag=20,extract=10)")
    parser.add_argument("--deadline-ms", type=float, default=2000.0, help="per-request gRPC deadline (default 2000)")
    parser.add_argument("--arrivals", choices=["poisson", "constant"], default="poisson")
    parser.add_argument("--threads", type=int, default=available_cpus(), help="engine threads everywhere (default: usable CPUs)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="max batch everywhere (default 16)")
    parser.add_argument("--torchserve-batch-delay-ms", type=int, default=0,
                        help="TorchServe's maxBatchDelay (default 0: like the service's batcher, no waiting for a full batch)")
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
    mix = {"classify": 1.0} if args.concurrency else parse_mix(args.mix)
    rates = [float(r) for r in args.rates.split(",")]
    load = dict(duration=args.duration, warmup=args.warmup, mix=mix, deadline_s=args.deadline_ms / 1000, arrivals=args.arrivals)
    runs: dict[str, list[OpenLoopResult]] = {}
    closed: dict[str, RunResult] = {}
    raw: dict[str, dict[str, float]] = {}
    raw_runs: dict[str, dict[str, RunResult]] = {}
    settings: dict[str, object] = {
        "machine": _machine(), "model": args.model, "threads": args.threads, "max_batch_size": args.max_batch_size,
        "load": f"closed loop, {args.concurrency} clients, 1-image classify" if args.concurrency else "open loop",
        "mix": mix, "rates": None if args.concurrency else rates, "duration_s": args.duration, "warmup_s": args.warmup,
        "deadline_ms": args.deadline_ms, "arrivals": None if args.concurrency else args.arrivals, "image_bytes": len(image),
        "modes": {}, "skipped": {},
    }
    mode_settings: dict[str, str] = settings["modes"]  # type: ignore[assignment]

    def loadavg(mode: str) -> None:
        # Other tenants of a shared machine show up here: a 1-minute load above the cores in use means a
        # mode was measured against a neighbour, and its number should be taken from another round.
        try:
            settings["loadavg_1min_before"][mode] = float(Path("/proc/loadavg").read_text().split()[0])  # type: ignore[index]
        except OSError:
            pass

    settings["loadavg_1min_before"] = {}

    def drive(mode: str, target: str, rpcs: dict | None = None) -> None:
        print(f"== {mode} ({target})", flush=True)
        loadavg(mode)
        if args.concurrency:
            call = (rpcs or RPCS)["classify"]
            result = asyncio.run(closed_run(target, call, image, args.concurrency, args.duration, args.warmup, mode))
            closed[mode] = result
            errs = ", ".join(f"{k}={v}" for k, v in result.errors.items()) or "0"
            print(f"{mode}: {result.images_per_second:.1f} img/s at {args.concurrency} clients, p50 {result.p50_ms:.1f} "
                  f"p99 {result.p99_ms:.1f} ms, errors {errs}", flush=True)
        else:
            runs[mode] = asyncio.run(sweep(target, image, rates, mode=mode, rpcs=rpcs, **load))

    def raw_baseline(mode: str, forward, preset) -> None:  # noqa: ANN001
        loadavg(mode)
        raw[mode], raw_runs[mode] = {}, {}
        for bs in sorted({1, args.max_batch_size}):
            result = raw_run(forward, preset, image, bs, args.duration, args.warmup)
            raw[mode][f"b{bs}"] = result.images_per_second
            raw_runs[mode][f"b{bs}"] = result
            print(f"{mode} b{bs}: {result.images_per_second:.1f} img/s (p50 {result.p50_ms:.1f} ms per batch)", flush=True)

    with ExitStack() as stack:
        if "raw" in modes or "standalone" in modes:
            server_args = _server_args("standalone", args.threads, args.max_batch_size, args.model)
            server = SpawnedServer(server_args)
            stack.callback(server.close)
            if "raw" in modes:
                forward, preset, info = raw_model(server.target, "", None, args.threads)
                raw_baseline("raw", forward, preset)
                mode_settings["raw"] = (f"{info.backend} in-process, {args.threads} threads, batch 1 and {args.max_batch_size}, "
                                        "vision.media.imaging decode + preprocess + forward, no gRPC")
                del forward
            if "standalone" in modes:
                mode_settings["standalone"] = "vision serve " + " ".join(server_args)
                drive("standalone", server.target)
            server.close()
            stack.pop_all()
        if "triton" in modes:
            _triton(args, drive, settings)
        for mode in ("ray", "ray-split"):
            if mode in modes:
                server_args = _server_args(mode, args.threads, args.max_batch_size, args.model)
                mode_settings[mode] = "vision serve " + " ".join(server_args)
                server = SpawnedServer(server_args)
                try:
                    drive(mode, server.target)
                finally:
                    server.close()
        if any(m in modes for m in ("raw-torch", "standalone-torch", "torchserve")):
            _torch_modes(args, modes, image, drive, raw_baseline, settings)

    report = _report(runs, closed, raw, settings)
    report["raw_runs"] = {mode: {bs: asdict(r) for bs, r in by_bs.items()} for mode, by_bs in raw_runs.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    from loadtest.report import plot, plot_summary

    if runs:
        for path in plot(runs, args.out, title=f"{args.mix}, {args.arrivals} arrivals"):
            print(f"wrote {path}")
    if closed:
        model = args.model.replace("arch=", "").split(",")[0]
        path = plot_summary(report["summary"], args.out / "modes.png",
                            title=f"{model}, {args.concurrency} clients, {args.threads} threads, max batch {args.max_batch_size}")
        print(f"wrote {path}")
    print(f"wrote {args.out / 'report.json'}")
    return 0


def _torch_modes(args: argparse.Namespace, modes: list[str], image: bytes, drive, raw_baseline, settings: dict) -> None:  # noqa: ANN001
    """raw-torch, standalone-torch and torchserve: the same state dict, exported once from --model."""
    import torch

    from loadtest import torchserve as ts
    from loadtest.torchserve_handler import PeerModel

    mode_settings = settings["modes"]
    with tempfile.TemporaryDirectory(prefix="modes-torch-") as tmp:
        work = Path(tmp)
        peer = ts.export_model(args.model, work / "model")
        settings["torch_model"] = {"arch": peer.arch, "num_classes": peer.num_classes, "preset": peer.preset,
                                   "weights": peer.weights, "torch": torch.__version__}
        if "raw-torch" in modes:
            model = PeerModel(peer.arch, peer.num_classes, peer.state_dict, threads=args.threads, preset=peer.preset)
            raw_baseline("raw-torch", lambda batch: model.postprocess(model.infer(batch)), model.preset)
            # The engine alone (one decoded batch reused, forward only): the ceiling a torch server on these
            # cores could reach if decoding cost nothing; what any server loses beyond it is decode and plumbing.
            batch = model.preprocess([image] * args.max_batch_size)
            model.infer(batch)
            passes, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < args.duration / 2:
                model.infer(batch)
                passes += 1
            forward_only = passes * args.max_batch_size / (time.perf_counter() - t0)
            settings["torch_forward_only_images_per_second"] = round(forward_only, 1)
            print(f"raw-torch forward only, batch {args.max_batch_size}: {forward_only:.1f} img/s", flush=True)
            mode_settings["raw-torch"] = (f"eager torch {torch.__version__} in-process, channels_last, inference_mode, "
                                          f"{args.threads} threads, batch 1 and {args.max_batch_size}, vision.media.imaging decode + "
                                          "preprocess + forward + softmax top-5 (loadtest/torchserve_handler.PeerModel)")
            del model
        if "standalone-torch" in modes:
            server_args = _server_args("standalone-torch", args.threads, args.max_batch_size, args.model)
            mode_settings["standalone-torch"] = "vision serve " + " ".join(server_args)
            server = SpawnedServer(server_args)
            try:
                drive("standalone-torch", server.target)
            finally:
                server.close()
        if "torchserve" in modes:
            reason = ts.missing_reason()
            if reason:
                print(f"== torchserve: skipped: {reason}", flush=True)
                settings["skipped"]["torchserve"] = reason
                return
            if not args.concurrency and set(settings["mix"]) != {"classify"}:
                print("== torchserve: note: it only classifies; its open loop sends the mix's share of every RPC as "
                      "Predictions (use --mix classify=1 to compare like for like)", flush=True)
            ts.archive(peer, work / "store", threads=args.threads, batch_size=args.max_batch_size)
            pb2, pb2_grpc = ts.grpc_stubs(out_dir=work)
            call = ts.predictions_call(pb2, pb2_grpc)
            with ts.TorchServe(work / "store", work, batch_size=args.max_batch_size,
                               max_batch_delay_ms=args.torchserve_batch_delay_ms) as server:
                server.wait_ready(image)
                mode_settings["torchserve"] = (
                    f"TorchServe 0.12.0 (its own venv, torch {peer_torch_version(ts)}), gRPC Predictions, 1 worker, "
                    f"batchSize {args.max_batch_size}, maxBatchDelay {args.torchserve_batch_delay_ms} ms, "
                    f"{args.threads} torch threads, channels_last, handler loadtest/torchserve_handler.py "
                    "(vision.media.imaging decode), async_logging, all addresses on 127.0.0.1")
                drive("torchserve", server.target, rpcs={name: call for name in RPCS})
                stats = ts.batch_stats(work)
                if stats:
                    settings["torchserve_mean_batch"] = round(stats[1] / stats[0], 2)
                    print(f"torchserve: {stats[1]} images in {stats[0]} batches (mean {stats[1] / stats[0]:.2f})", flush=True)
                handler_ms = ts.prediction_ms(work)
                if handler_ms:
                    # TorchServe's own PredictionTime: the handler's time per batch (decode + forward + top-k).
                    settings["torchserve_handler_ms_per_batch"] = round(handler_ms, 1)
                    print(f"torchserve: handler {handler_ms:.1f} ms per batch (its PredictionTime metric)", flush=True)


def peer_torch_version(ts) -> str:  # noqa: ANN001 - the loadtest.torchserve module
    """torch's version inside TorchServe's venv (read from its dist-info, without importing it)."""
    found = sorted(ts.venv_path().glob("lib/python3*/site-packages/torch-*.dist-info"))
    return found[0].name.split("-")[1].removesuffix(".dist") if found else "?"


def _triton(args: argparse.Namespace, drive, settings: dict) -> None:  # noqa: ANN001
    from vision.triton import TritonProcess, setup_runtime

    with tempfile.TemporaryDirectory(prefix="modes-triton-") as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        subprocess.run([sys.executable, "-m", "vision.cli", "export-triton", "--model", args.model, "--repository",
                        str(repo), "--max-batch-size", str(args.max_batch_size)], check=True, capture_output=True)
        with TritonProcess(repo, runtime=setup_runtime(), log_path=Path(tmp) / "triton.log") as triton:
            server_args = ["--backend", "triton", "--model", args.model, "--triton-url", triton.grpc_address,
                           "--decode-workers", str(args.threads)]
            settings["modes"]["triton"] = " ".join(server_args) + f" (tritonserver python backend, max_batch_size {args.max_batch_size})"
            server = SpawnedServer(server_args)
            try:
                drive("triton", server.target)
            finally:
                server.close()


def _report(runs: dict[str, list[OpenLoopResult]], closed: dict[str, RunResult], raw: dict[str, dict[str, float]],
            settings: dict) -> dict:
    """Print the comparison table and return the JSON report: per mode its engine, img/s (closed loop) or
    knee (open loop), latency, ratio to its own raw engine's batched img/s and to TorchServe's."""
    rows = summary_rows(runs, closed, raw)
    print()
    print(format_table(rows, open_loop=bool(runs)))
    return {"settings": settings, "raw_images_per_second": raw, "summary": rows,
            "runs": {mode: [asdict(r) for r in results] for mode, results in runs.items()},
            "closed_loop": {mode: asdict(r) for mode, r in closed.items()}}


def summary_rows(runs: dict[str, list[OpenLoopResult]], closed: dict[str, RunResult], raw: dict[str, dict[str, float]]) -> list[dict]:
    """One row per mode. Raw baselines count at their best batch size (what an engine can do without a
    server); a server's throughput is its closed-loop img/s, or in the open loop the rate answered at its
    knee. `ratio_to_raw` divides by the raw baseline of the mode's own engine, `vs_torchserve` by
    TorchServe's throughput in the same run."""
    rows: list[dict] = []
    for mode in RAW_MODES:
        if raw.get(mode):
            best = max(raw[mode], key=raw[mode].get)
            rows.append({"mode": mode, "engine": ENGINE[mode], "images_per_second": raw[mode][best], "batch": int(best[1:]),
                         "p50_ms": None, "p99_ms": None, "ratio_to_raw": 1.0})
    for mode, result in closed.items():
        rows.append({"mode": mode, "engine": ENGINE[mode], "images_per_second": result.images_per_second,
                     "p50_ms": result.p50_ms, "p99_ms": result.p99_ms, "errors": result.errors})
    for mode, results in runs.items():
        best = knee(results)
        lat = best.latency_ms if best else {}
        rows.append({"mode": mode, "engine": ENGINE[mode], "images_per_second": best.achieved_rps if best else None,
                     "knee_rps": best.offered_rps if best else None, "max_achieved_rps": max((r.achieved_rps for r in results), default=0.0),
                     "p50_ms": lat.get("p50"), "p99_ms": lat.get("p99"), "p99.9_ms": lat.get("p99.9"),
                     "client_bound_runs": sum(r.client_bound for r in results)})
    by_mode = {row["mode"]: row for row in rows}
    peer = by_mode.get("torchserve", {}).get("images_per_second")
    for row in rows:
        base = by_mode.get(RAW_OF[row["mode"]], {}).get("images_per_second")
        ips = row["images_per_second"]
        row["ratio_to_raw"] = ips / base if ips is not None and base else None
        row["vs_torchserve"] = ips / peer if ips is not None and peer else None
    return rows


def format_table(rows: list[dict], *, open_loop: bool = False) -> str:
    """The summary as a Markdown table (what docs/benchmarks.md quotes)."""
    def num(value: float | None, fmt: str = ".1f") -> str:
        return "–" if value is None else format(value, fmt)

    what = "img/s (knee, answered)" if open_loop else "img/s"
    lines = [f"| mode | engine | {what} | p50 / p99 ms | ratio to its raw engine | vs TorchServe |", "|---|---|---|---|---|---|"]
    for row in rows:
        name = f"{row['mode']} (batch {row['batch']})" if "batch" in row else row["mode"]
        latency = "–" if row["p50_ms"] is None else f"{row['p50_ms']:.1f} / {row['p99_ms']:.1f}"
        base = RAW_OF[row["mode"]]
        ratio = "1.00" if row["mode"] == base else (f"{num(row['ratio_to_raw'], '.2f')} (of {base})" if row["ratio_to_raw"] else "–")
        lines.append(f"| {name} | {row['engine']} | {num(row['images_per_second'])} | {latency} | {ratio} | "
                     f"{num(row['vs_torchserve'], '.2f')} |")
    return "\n".join(lines)


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
