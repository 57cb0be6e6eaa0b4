"""`vision ... | head`: a command whose reader goes away ends quietly (status 1, nothing on stderr), as Unix
tools do, instead of printing a BrokenPipeError traceback. Real `vision` processes; their stdout is a pipe
whose reader has closed (deterministic: every write fails) or closes after the first line (as `head -1`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

VISION = [sys.executable, "-m", "vision.cli"]


def run_into_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([*VISION, *args], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)


def test_a_server_command_into_a_closed_pipe_ends_quietly(server):
    result = run_into_closed_pipe("models", "--target", server.address)
    assert (result.returncode, result.stderr) == (1, "")


def test_an_offline_command_into_a_closed_pipe_does_its_work_and_ends_quietly(tmp_path: Path):
    result = run_into_closed_pipe("sample-photos", "--split", "held-out", "--count", "1", "--out", str(tmp_path))
    assert (result.returncode, result.stderr) == (1, "")
    assert len(list(tmp_path.glob("*.jpg"))) == 1


def test_help_into_a_closed_pipe_ends_quietly():
    # argparse itself drops a help text it cannot write (and exits 0): still nothing on stderr.
    result = run_into_closed_pipe("serve", "--help")
    assert result.stderr == ""


def test_head_reading_one_line_of_a_long_answer_ends_the_command_quietly(server, photos, tmp_path: Path):
    images = []
    for i in range(8):  # 8 x 1000 ranked classes: far more than a pipe holds, so the writer is still writing
        images.append(tmp_path / f"coffee{i}.jpg")
        images[-1].write_bytes(photos["coffee.jpg"])
    proc = subprocess.Popen(
        [*VISION, "classify", "--target", server.address, "--top-k", "1000", *map(str, images)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    assert first.startswith("model efficientnet_lite0 version ")
    assert stderr == ""


def test_a_command_whose_reader_stays_exits_0_with_all_its_output(server, photos, tmp_path: Path):
    image = tmp_path / "coffee.jpg"
    image.write_bytes(photos["coffee.jpg"])
    result = subprocess.run(
        [*VISION, "classify", "--target", server.address, "--top-k", "1000", str(image)],
        capture_output=True, text=True, timeout=120,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert len(result.stdout.splitlines()) == 1 + 1 + 1000  # model line, image id, 1000 ranked classes


def test_a_broken_pipe_that_is_not_stdout_is_an_error(monkeypatch):
    """Only a closed stdout ends a command quietly: a socket or a child's pipe that breaks is a real failure
    and must not vanish behind status 1."""
    from vision import cli

    def broken(argv):  # noqa: ANN001, ANN202 - stands in for a command whose connection broke
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_dispatch", broken)
    with pytest.raises(BrokenPipeError):
        cli.main(["models"])
