"""TorchServe as a peer for `python -m loadtest.modes`: the same model file, payload and limits, over gRPC.

What the harness does here, and why:
- `export_model`: rebuilds the served model from the same `--model` spec through the project's loading code
  (bundled or seeded-random weights, as `vision serve` would) and saves its state dict: the one file the
  peer gets, so both sides run identical tensors.
- `archive`: `torch-model-archiver --archive-format no-archive` with loadtest/torchserve_handler.py and a
  `vision_peer.json` (architecture, threads, batch, top-k, the checkout's services/ path for vision.media.imaging).
  No zip: a 100 MB ResNet-50 state dict would only be packed and unpacked again.
- `TorchServe`: starts TorchServe 0.12 from its own virtualenv (loadtest/torchserve_setup.sh) with every
  address on 127.0.0.1 and free ports, one worker, batchSize = --max-batch-size, the model registered from
  config.properties; stops it with `torchserve --stop` (its pid file lives in our temp dir) and, failing
  that, signals the process group it was started in.
- `grpc_stubs`: TorchServe's own `proto/inference.proto`, taken from its frontend jar and compiled with
  grpcio-tools into a temp dir at run time (nothing generated is committed).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VENV = REPO / ".venv-torchserve"
HANDLER = Path(__file__).resolve().parent / "torchserve_handler.py"
MODEL_NAME = "vision_peer"


def venv_path() -> Path:
    """TorchServe's virtualenv: $VISION_TORCHSERVE_VENV, else .venv-torchserve in the checkout."""
    return Path(os.environ.get("VISION_TORCHSERVE_VENV") or DEFAULT_VENV)


def missing_reason(venv: Path | None = None) -> str | None:
    """Why the peer cannot run here (None when it can): the benchmark is optional, so callers skip with this."""
    venv = venv or venv_path()
    if not (venv / "bin" / "torchserve").is_file() or not (venv / "bin" / "torch-model-archiver").is_file():
        return f"no TorchServe virtualenv at {venv} (create it with loadtest/torchserve_setup.sh, ~75 s)"
    if not _which("java"):
        return "no java on PATH (TorchServe's frontend needs Java 11+)"
    return None


def _which(name: str) -> str | None:
    from shutil import which

    return which(name)


def _jar(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages/ts/frontend/model-server.jar"))
    if not found:
        raise FileNotFoundError(f"TorchServe's frontend jar is not under {venv}")
    return found[0]


@dataclass(frozen=True)
class PeerModelSpec:
    arch: str
    num_classes: int
    preset: str
    state_dict: Path
    weights: str  # where the tensors came from: "bundled", "random (seed 0)" or a file


def export_model(spec: str, out_dir: Path) -> PeerModelSpec:
    """The served model of `spec` (a `vision serve --model` spec), rebuilt as `vision serve` builds it,
    saved as a plain state dict in `out_dir`."""
    import torch
    from vision.config.settings import ModelConfig, ServeSettings
    from vision.models import create_model
    from vision.serving.loading import model_card

    config = ModelConfig.parse_spec(spec)
    settings = ServeSettings(backend="torch", models=[config])
    card, weights = model_card(config, settings)
    # The same call as vision.serving.loading.build_torch_module, without the output taps: TorchServe gets the plain
    # network (logits), and with pretrained=False the spec's weights (or seeded random init) decide.
    module = create_model(config.arch, num_classes=card.signature.num_classes, weights=weights, pretrained=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "state_dict.pt"
    torch.save(module.state_dict(), path)
    origin = "random (seed 0)" if card.random_weights else (str(weights) if config.weights else f"bundled ({weights.name})")  # type: ignore[union-attr]
    return PeerModelSpec(config.arch, card.signature.num_classes, card.preset.name, path, origin)


def archive(model: PeerModelSpec, store: Path, *, threads: int, batch_size: int, top_k: int = 5, venv: Path | None = None) -> Path:
    """A no-archive model folder for TorchServe in `store` (the state dict, the handler, vision_peer.json)."""
    venv = venv or venv_path()
    store.mkdir(parents=True, exist_ok=True)
    extra = store.parent / "vision_peer.json"
    extra.write_text(json.dumps({
        "arch": model.arch, "num_classes": model.num_classes, "preset": model.preset, "state_dict": model.state_dict.name,
        "threads": threads, "batch_size": batch_size, "top_k": top_k, "services": str(REPO / "services"),
    }))
    subprocess.run(
        [str(venv / "bin" / "torch-model-archiver"), "--model-name", MODEL_NAME, "--version", "1.0",
         "--serialized-file", str(model.state_dict), "--handler", str(HANDLER), "--extra-files", str(extra),
         "--export-path", str(store), "--archive-format", "no-archive", "--force"],
        check=True, capture_output=True,
    )
    return store / MODEL_NAME


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_properties(store: Path, ports: dict[str, int], *, batch_size: int, max_batch_delay_ms: int) -> str:
    """TorchServe's config.properties: loopback only, no token auth, no system metrics, one worker with the
    service's max batch. maxBatchDelay is how long TorchServe waits to fill a batch: the service's batcher
    never waits (--max-wait-ms 0, it batches what queued during the previous pass), and TorchServe's
    aggregator with 0 ms would take whatever is queued too."""
    models = {MODEL_NAME: {"1.0": {
        "defaultVersion": True, "marName": MODEL_NAME, "minWorkers": 1, "maxWorkers": 1,
        "batchSize": batch_size, "maxBatchDelay": max_batch_delay_ms, "responseTimeout": 120,
    }}}
    lines = [
        f"inference_address=http://127.0.0.1:{ports['inference']}",
        f"management_address=http://127.0.0.1:{ports['management']}",
        f"metrics_address=http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_address=127.0.0.1",
        f"grpc_inference_port={ports['grpc']}",
        "grpc_management_address=127.0.0.1",
        f"grpc_management_port={ports['grpc_management']}",
        "disable_token_authorization=true",
        "enable_model_api=true",
        "disable_system_metrics=true",
        "default_workers_per_model=1",
        # Access logging off the request path, as the service logs nothing per request by default.
        "async_logging=true",
        f"model_store={store}",
        f"load_models={MODEL_NAME}",
        f"models={json.dumps(models)}",
    ]
    return "\n".join(lines) + "\n"


def grpc_stubs(venv: Path | None = None, out_dir: Path | None = None) -> tuple[ModuleType, ModuleType]:
    """(inference_pb2, inference_pb2_grpc) compiled from the inference.proto inside TorchServe's jar."""
    import google.rpc.status_pb2
    from grpc_tools import protoc

    jar = _jar(venv or venv_path())
    out = out_dir or Path(tempfile.mkdtemp(prefix="torchserve-proto-"))
    with zipfile.ZipFile(jar) as zf:
        (out / "inference.proto").write_bytes(zf.read("proto/inference.proto"))
    # Include paths: protobuf's well-known types (google/protobuf/empty.proto) ship with grpcio-tools,
    # google/rpc/status.proto with googleapis-common-protos.
    well_known = Path(protoc.__file__).parent / "_proto"
    googleapis = Path(google.rpc.status_pb2.__file__).parent.parent.parent
    rc = protoc.main(["protoc", f"-I{out}", f"-I{well_known}", f"-I{googleapis}", f"--python_out={out}",
                      f"--grpc_python_out={out}", str(out / "inference.proto")])
    if rc != 0:
        raise RuntimeError(f"protoc failed on TorchServe's inference.proto (exit {rc})")
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    return importlib.import_module("inference_pb2"), importlib.import_module("inference_pb2_grpc")


def predictions_call(pb2: ModuleType, pb2_grpc: ModuleType) -> Callable[[Any, bytes], Callable[[float], Any]]:
    """A call factory for the load generators: (grpc.aio channel, image) → (timeout → awaitable RPC)."""

    def factory(channel: Any, image: bytes) -> Callable[[float], Any]:  # noqa: ANN401 - grpc.aio.Channel
        stub = pb2_grpc.InferenceAPIsServiceStub(channel)
        request = pb2.PredictionsRequest(model_name=MODEL_NAME, input={"data": image})
        return lambda timeout: stub.Predictions(request, timeout=timeout)

    return factory


class TorchServe:
    """A TorchServe process serving the archived peer on 127.0.0.1; `with TorchServe(...) as ts: ts.target`."""

    def __init__(self, store: Path, work: Path, *, batch_size: int, max_batch_delay_ms: int, venv: Path | None = None,
                 start_timeout_s: float = 180.0) -> None:
        self.venv = venv or venv_path()
        self.work = work
        self.store = store
        self.ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc", "grpc_management")}
        self.target = f"127.0.0.1:{self.ports['grpc']}"
        self.config = work / "config.properties"
        self.config.write_text(config_properties(store, self.ports, batch_size=batch_size, max_batch_delay_ms=max_batch_delay_ms))
        self.log = work / "torchserve.log"
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        # TorchServe keeps its pid file in the temp dir and its logs under LOG_LOCATION: both ours, so
        # `torchserve --stop` can only ever stop this instance.
        self.env = {**os.environ, "TMPDIR": str(work), "TEMP": str(work), "LOG_LOCATION": str(work / "logs"),
                    "METRICS_LOCATION": str(work / "logs"), "PATH": f"{self.venv / 'bin'}:{os.environ.get('PATH', '')}"}

    def __enter__(self) -> "TorchServe":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        cmd = [str(self.venv / "bin" / "torchserve"), "--start", "--foreground", "--ncs", "--disable-token-auth",
               "--model-store", str(self.store), "--ts-config", str(self.config)]
        with open(self.log, "wb") as log:
            # A session of its own: on a failed --stop the whole group (launcher, JVM, worker) can be signalled.
            self.proc = subprocess.Popen(cmd, cwd=self.work, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_ready(self, image: bytes) -> None:
        """Until a Predictions call on the real payload answers (the worker has loaded and warmed the model)."""
        import grpc
        from vision.client.channel import open_channel

        pb2, pb2_grpc = grpc_stubs(self.venv)
        deadline = time.monotonic() + self.start_timeout_s
        with open_channel(self.target) as channel:
            stub = pb2_grpc.InferenceAPIsServiceStub(channel)
            request = pb2.PredictionsRequest(model_name=MODEL_NAME, input={"data": image})
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"torchserve exited ({self.proc.returncode}); see {self.log}")
                try:
                    answer = stub.Predictions(request, timeout=30)
                    self.first_answer = json.loads(answer.prediction)
                    return
                except grpc.RpcError as exc:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"torchserve not ready after {self.start_timeout_s:.0f} s ({exc.code().name}); see {self.log}") from None
                    time.sleep(1.0)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        subprocess.run([str(self.venv / "bin" / "torchserve"), "--stop"], cwd=self.work, env=self.env,
                       capture_output=True, timeout=60)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        # Whatever of the group is left (the launcher, a JVM or worker that ignored --stop): ours, by group id.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(2.0)
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)


def batch_stats(work: Path) -> tuple[int, int] | None:
    """(batches, images) from the handler's last "vision_peer: batches N images M" log line, if any."""
    import re

    last = None
    for path in [work / "torchserve.log", *sorted((work / "logs").glob("model_log*.log"))]:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for m in re.finditer(r"vision_peer: batches (\d+) images (\d+)", text):
            last = max(last or (0, 0), (int(m.group(1)), int(m.group(2))))
    return last


def prediction_ms(work: Path, skip: int = 2) -> float | None:
    """Mean of TorchServe's PredictionTime (ms the handler took per batch) from its logs, leaving out the
    first `skip` batches (readiness probe and warm-up)."""
    import re

    values: list[float] = []
    for path in [work / "torchserve.log"]:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        values += [float(v) for v in re.findall(r"MODEL_METRICS - PredictionTime\.ms:([0-9.]+)", text)]
    values = values[skip:]
    return sum(values) / len(values) if values else None
