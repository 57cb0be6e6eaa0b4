"""scripts/gpu-check.sh's dry run (--device cpu): every step of the GPU check, on the CPU, must pass here so
that the GPU run on a lent machine tests the device and not the script. Numbers from a GPU go in the README."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_the_gpu_check_dry_run_passes_on_the_cpu(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("the fine-tune step starts redis-server, which is not installed (.ci/run installs it)")
    numbers = tmp_path / "gpu-check.json"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--device", "cpu", "--json", str(numbers)],
                          capture_output=True, text=True, timeout=560, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[gpu-check] passed" in done.stdout
    results = json.loads(numbers.read_text())
    assert float(results["parity: max |logits DEVICE - logits CPU|"]) <= 1e-3
    assert int(results["delf: keypoints of one pyramid (rocket.jpg), s"].split(",")[0]) > 0
    assert results["fine-tune: one tagging epoch on cpu, submit to registered (s)"] > 0
