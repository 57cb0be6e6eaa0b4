"""`vision triton` / `python -m vision.triton`: set the local Triton runtime up and/or serve a repository."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from vision.triton.errors import TritonError, TritonRuntimeMissing
from vision.triton.process import TritonProcess
from vision.triton.runtime import VENV_ENV, default_venv, find_runtime, setup_runtime


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vision triton",
        description="Set up the local Triton runtime (a venv with nvidia-pytriton's tritonserver 2.51) and/or run "
        "tritonserver on 127.0.0.1 against a model repository, until interrupted.",
    )
    parser.add_argument(
        "--repository", type=Path, help="model repository directory (config.pbtxt + versions)"
    )
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (0 = any free; default 8001)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port (0 = any free; default 8000)")
    parser.add_argument(
        "--metrics-port", type=int, default=8002, help="Prometheus port (0 = any free; default 8002)"
    )
    parser.add_argument("--setup-only", action="store_true", help="create/verify the Triton venv and exit")
    parser.add_argument(
        "--no-setup",
        action="store_true",
        help="fail if the Triton venv is missing or outdated instead of setting it up first (by default a "
        "missing runtime is set up automatically: once, about 20 s, needs only the package registry)",
    )
    parser.add_argument(
        "--venv", type=Path, default=None, help=f"Triton venv (default {default_venv()}; env {VENV_ENV})"
    )
    parser.add_argument("--python", default=None, help="Python 3.8-3.13 for the venv (default: this one)")
    parser.add_argument(
        "--model-control-mode",
        choices=("explicit", "none"),
        default="explicit",
        help="explicit (default): load all at start, repository API enabled; none: load all, API disabled",
    )
    parser.add_argument("--log-file", type=Path, default=None, help="tritonserver log (default: a temp file)")
    parser.add_argument("--log-verbose", type=int, default=0)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    def say(msg: str) -> None:
        print(f"vision triton: {msg}", file=sys.stderr, flush=True)

    if args.setup_only:
        t0 = time.monotonic()
        try:
            runtime = setup_runtime(args.venv, python=args.python, log=say)
        except TritonError as exc:
            say(str(exc))
            return 1
        print(
            json.dumps(
                {
                    "venv": str(runtime.venv),
                    "tritonserver": str(runtime.tritonserver),
                    "seconds": round(time.monotonic() - t0, 1),
                }
            )
        )
        return 0
    if args.repository is None:
        parser.error("--repository is required unless --setup-only")
    try:
        runtime = find_runtime(args.venv)
    except TritonRuntimeMissing as exc:
        if args.no_setup:
            say(str(exc))
            return 1
        venv = Path(args.venv) if args.venv is not None else default_venv()
        say(f"Triton runtime not set up in {venv}; setting it up now (once, about 20 s, needs only the package registry)")
        t0 = time.monotonic()
        try:
            runtime = setup_runtime(args.venv, python=args.python, log=say)
        except TritonError as setup_exc:
            say(str(setup_exc))
            return 1
        say(f"runtime set up in {time.monotonic() - t0:.1f} s")
    server = TritonProcess(
        args.repository,
        runtime=runtime,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        model_control_mode=args.model_control_mode,
        log_path=args.log_file,
        log_verbose=args.log_verbose,
    )
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except TritonError as exc:
        say(str(exc))
        return 1
    print(f"vision triton: gRPC listening on {server.grpc_address}", flush=True)
    print(f"vision triton: HTTP at {server.http_url}", flush=True)
    print(f"vision triton: metrics at {server.metrics_url}", flush=True)
    print(
        f"vision triton: log at {server.log_path} (pid {server.pid}, ready in {server.started_s:.2f} s)",
        flush=True,
    )
    try:
        while not stopping and server.proc is not None and server.proc.poll() is None:
            time.sleep(0.2)
    finally:
        code = server.stop()
    if not stopping:
        say(f"tritonserver exited with code {code}; log {server.log_path}")
        return 1
    return 0
