"""The GPU check (scripts/gpu-check.sh runs it): every GPU path of the platform once, with numbers.

    python scripts/gpu_check.py --device cuda      # on a machine with an NVIDIA GPU
    python scripts/gpu_check.py --device cpu       # the dry run: the same steps on the CPU (CI runs it)

Steps, each printed as `[gpu-check] ...` and, with --json, kept in one file:
1. parity: the embedded default built on DEVICE and on the CPU; logits on real photos within 1e-3.
2. serving: `vision serve --backend torch --device DEVICE` and `--device cpu` side by side: top-5 equal,
   scores within 1e-3; then 16 closed-loop Classify clients on each, one after the other (throughput ratio).
3. DELF: an Extract (the full image pyramid, one forward per level) through the DEVICE server.
4. fine-tune: one epoch of the tagging fine-tune on DEVICE, as a real job: Redis (`redis-server` on a free
   loopback port unless --redis-url), `vision serve --services jobs`, `vision worker --device DEVICE`, a
   SQLite registry in a temporary folder, a generated multi-label set (training.shapes).
5. peak GPU memory of the processes on DEVICE (nvidia-smi), and of this process (torch).
Everything listens on 127.0.0.1 only; every process started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ("coffee", "chelsea", "astronaut", "rocket")
TOLERANCE = 1e-3


def say(key: str, value: object, results: dict) -> None:
    results[key] = value
    print(f"[gpu-check] {key}: {value}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """A process of ours, stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(log, "wb"), env={**os.environ, **(env or {})})

    def address(self, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line and self.proc.poll() is not None:
                raise SystemExit(f"gpu-check: {self.proc.args[:4]} exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if m := re.search(r"gRPC listening on (\S+)", line):
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep its pipe drained
                return m.group(1)
        raise SystemExit(f"gpu-check: no address from {self.proc.args[:4]} in {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def photos() -> dict[str, bytes]:
    import io

    import skimage.data
    from PIL import Image

    out = {}
    for name in PHOTOS:
        buf = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(buf, "JPEG", quality=95)
        out[name] = buf.getvalue()
    return out


def parity(device: str, images: dict[str, bytes], results: dict) -> None:
    import numpy as np
    import torch

    from vision.config.settings import ModelConfig, ServeSettings
    from vision.media.imaging import load_image
    from vision.serving.loading import build_torch_module, model_card

    config = ModelConfig(arch="efficientnet_lite0", backend="torch")
    card, weights = model_card(config, ServeSettings(backend="torch"))
    batch = np.stack([load_image(data, card.preset) for data in images.values()])
    outputs = {}
    for where in ("cpu", device):
        module = build_torch_module(config, card, weights).eval().to(where)
        with torch.inference_mode():
            out = module(torch.from_numpy(batch).to(where))
        logits = out["logits"] if isinstance(out, dict) else out[0]
        outputs[where] = logits.float().cpu().numpy()
    diff = float(np.abs(outputs[device] - outputs["cpu"]).max())
    say("parity: max |logits DEVICE - logits CPU|", f"{diff:.2e}", results)
    if diff > TOLERANCE:
        raise SystemExit(f"gpu-check: logits on {device} differ from the CPU's by {diff} > {TOLERANCE}")


def top5(address: str, image: bytes) -> list[tuple[int, float]]:
    import grpc

    from vision.v1 import classification_pb2, classification_pb2_grpc, common_pb2

    with grpc.insecure_channel(address) as channel:
        reply = classification_pb2_grpc.ClassificationStub(channel).Classify(
            classification_pb2.ClassifyRequest(images=[common_pb2.Image(id="x", content=image)], top_k=5), timeout=120)
    return [(p.index, p.score) for p in reply.results[0].predictions]


def serving(device: str, images: dict[str, bytes], work: Path, results: dict, duration: float) -> None:
    from loadtest.harness import service_run

    servers = {}
    try:
        for where in dict.fromkeys((device, "cpu")):
            child = Child([sys.executable, "-m", "vision.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                           "--metrics-port", "0", "--backend", "torch", "--device", where,
                           "--services", "classification,delf"], work / f"serve-{where}.log")
            servers[where] = (child, child.address())
        for name, data in images.items():
            got, want = top5(servers[device][1], data), top5(servers["cpu"][1], data)
            if [i for i, _ in got] != [i for i, _ in want] or max(abs(a[1] - b[1]) for a, b in zip(got, want)) > TOLERANCE:
                raise SystemExit(f"gpu-check: {name}: top-5 on {device} {got} differs from the CPU's {want}")
        say("serving: top-5 equal to the CPU's, scores within 1e-3", f"{len(images)} photos", results)
        rates = {}
        for where, (_, address) in servers.items():
            run = asyncio.run(service_run(address, images["coffee"], 16, duration, 3.0, 1, ""))
            if run.errors:
                raise SystemExit(f"gpu-check: {where} server errors under load: {run.errors}")
            rates[where] = run.images_per_second
            say(f"serving: 16 clients, torch on {where} (img/s)", round(run.images_per_second, 1), results)
        say(f"serving: {device} / cpu throughput", round(rates[device] / rates["cpu"], 2), results)
        delf(servers[device][1], images, results)
        say("peak GPU memory of the servers (MiB)", gpu_memory_mib([c.proc.pid for c, _ in servers.values()]), results)
    finally:
        for child, _ in servers.values():
            child.stop()


def delf(address: str, images: dict[str, bytes], results: dict) -> None:
    import grpc

    from vision.v1 import common_pb2, delf_pb2, delf_pb2_grpc

    started = time.perf_counter()
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        reply = delf_pb2_grpc.DelfStub(channel).Extract(
            delf_pb2.DelfExtractRequest(images=[common_pb2.Image(id="rocket", content=images["rocket"])]), timeout=300)
    keypoints = len(reply.results[0].features.keypoints)
    if keypoints == 0:
        raise SystemExit("gpu-check: the DELF pyramid returned no keypoints")
    say("delf: keypoints of one pyramid (rocket.jpg), s", f"{keypoints}, {time.perf_counter() - started:.2f}", results)


def gpu_memory_mib(pids: list[int]) -> str:
    if shutil.which("nvidia-smi") is None:
        return "n/a (no nvidia-smi)"
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    used = {int(p): int(m) for p, m in (line.split(",") for line in out.strip().splitlines() if line.strip())}
    return str(sum(used.get(pid, 0) for pid in pids))


def finetune(device: str, work: Path, results: dict, redis_url: str | None) -> None:
    from training.shapes import generate, write_dataset

    data = work / "shapes"
    write_dataset(data, generate(96, seed=0))
    children: list[Child] = []
    redis = None
    try:
        if redis_url is None:
            if shutil.which("redis-server") is None:
                raise SystemExit("gpu-check: the fine-tune step needs Redis: install redis-server or give --redis-url")
            port = free_port()
            redis = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            redis_url = f"redis://127.0.0.1:{port}/0"
            time.sleep(0.5)
        namespace = f"gpucheck{os.getpid()}"
        env = {"VISION_REGISTRY_URI": f"sqlite:///{work / 'registry.db'}", "VISION_REGISTRY_ARTIFACT_ROOT": str(work / "artifacts"),
               "VISION_JOBS_WORK_DIR": str(work / "jobs"), "VISION_JOBS_DATA_ROOT": str(work)}
        jobs = Child([sys.executable, "-m", "vision.cli", "serve", "--services", "jobs", "--host", "127.0.0.1", "--port", "0",
                      "--metrics-port", "0", "--redis-url", redis_url, "--jobs-namespace", namespace], work / "jobs.log", env)
        children.append(jobs)
        address = jobs.address()
        worker = Child([sys.executable, "-m", "vision.cli", "worker", "--queues", "train", "--redis-url", redis_url,
                        "--namespace", namespace, "--device", device, "--metrics-port", "0"], work / "worker.log", env)
        children.append(worker)
        started = time.perf_counter()
        submit = subprocess.run(
            [sys.executable, "-m", "vision.cli", "jobs", "--target", address, "submit-finetune", "--task", "tagging",
             "--data", str(data), "--base", "efficientnet_lite0", "--name", "gpu-check", "--epochs", "1",
             "--batch-size", "16", "--workers", "0", "--device", device],
            capture_output=True, text=True, timeout=120, env={**os.environ, **env})
        if submit.returncode != 0:
            raise SystemExit(f"gpu-check: submit-finetune failed: {submit.stderr}")
        job_id = submit.stdout.strip().splitlines()[-1]
        waited = subprocess.run([sys.executable, "-m", "vision.cli", "jobs", "--target", address, "wait", job_id, "--max-wait", "420"],
                                capture_output=True, text=True, timeout=450, env={**os.environ, **env})
        if waited.returncode != 0:
            raise SystemExit(f"gpu-check: the fine-tune did not succeed:\n{waited.stdout}{waited.stderr}\n{worker.log.read_text()[-3000:]}")
        say(f"fine-tune: one tagging epoch on {device}, submit to registered (s)", round(time.perf_counter() - started, 1), results)
        say("peak GPU memory of the worker (MiB)", gpu_memory_mib([worker.proc.pid]), results)
    finally:
        for child in reversed(children):
            child.stop()
        if redis is not None:
            redis.terminate()
            redis.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1, ... or cpu for the dry run (default cuda)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each 16-client run (default 10)")
    parser.add_argument("--redis-url", help="a Redis for the fine-tune step (default: start redis-server on loopback)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    import torch

    results: dict = {}
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("gpu-check: --device cuda but torch sees no CUDA device (use --device cpu for the dry run)", file=sys.stderr)
            return 2
        say("device", torch.cuda.get_device_name(args.device), results)
    else:
        say("device", f"cpu (dry run), torch {torch.__version__}", results)
    images = photos()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        steps = (lambda: parity(args.device, images, results),
                 lambda: serving(args.device, images, work, results, args.duration),
                 lambda: finetune(args.device, work, results, args.redis_url))
        for step in steps:
            step()
    if args.device.startswith("cuda"):
        say("peak GPU memory of this process (MiB)", round(torch.cuda.max_memory_allocated() / 2**20), results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print("[gpu-check] passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # loadtest/ and training/ from the checkout
    sys.exit(main())
