"""vision.core.files: atomic writes of files and directory trees."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from vision.core.files import atomic_path, atomic_write, replace


class Boom(Exception):
    pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    with atomic_write(target) as fh:
        fh.write(b"new")
        assert target.read_bytes() == b"old", "the target changes only when the block ends"
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["model.bin"]
    # A new file gets what open() would give it, not mkstemp's 0600 (Triton may run as another user).
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()


def test_text_mode_writes_utf8(tmp_path: Path) -> None:
    with atomic_write(tmp_path / "config.pbtxt", "w") as fh:
        fh.write("name: \"caf\u00e9\"\n")
    assert (tmp_path / "config.pbtxt").read_bytes() == "name: \"caf\u00e9\"\n".encode()


def test_a_failed_write_leaves_the_old_file_intact_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    target.write_text("{}\n")
    with pytest.raises(Boom), atomic_write(target, "w") as fh:
        fh.write("{\"half\": ")
        raise Boom()
    assert target.read_text() == "{}\n"
    assert os.listdir(tmp_path) == ["summary.json"]


def test_tmp_dir_holds_the_temporary_and_is_left_empty(tmp_path: Path) -> None:
    incoming, out = tmp_path / "incoming", tmp_path / "out"
    incoming.mkdir()
    out.mkdir()
    with atomic_write(out / "a.png", tmp_dir=incoming) as fh:
        fh.write(b"png")
        assert len(os.listdir(incoming)) == 1 and os.listdir(out) == []
    with pytest.raises(Boom), atomic_write(out / "b.png", tmp_dir=incoming) as fh:
        raise Boom()
    assert os.listdir(incoming) == [] and os.listdir(out) == ["a.png"]


def test_bad_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode must be 'wb' or 'w'"), atomic_write(tmp_path / "x", "a"):
        pass
    assert os.listdir(tmp_path) == []


def test_a_concurrent_reader_sees_the_old_file_or_the_new_one_never_part(tmp_path: Path) -> None:
    target = tmp_path / "weights.bin"
    size = 1 << 20
    target.write_bytes(b"\0" * size)
    done = threading.Event()
    seen: set[bytes] = set()
    bad: list[str] = []

    def read() -> None:
        while not done.is_set():
            data = target.read_bytes()
            if len(data) != size or data.count(data[:1]) != size:
                bad.append(f"{len(data)} bytes, starting {data[:1]!r}")
                return
            seen.add(data[:1])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for value in range(1, 41):
            with atomic_write(target) as fh:
                # Written in pieces, so a reader of a file being written in place would see a prefix.
                for _ in range(16):
                    fh.write(bytes([value]) * (size // 16))
    finally:
        done.set()
        reader.join()
    assert not bad, bad
    assert len(seen) > 1, "the reader saw the file change"


def test_atomic_path_for_a_library_that_writes_a_path(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old graph")
    with atomic_path(target) as staged:
        assert staged.name == "model.onnx" and not staged.exists()
        staged.write_bytes(b"new graph")
    assert target.read_bytes() == b"new graph"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_atomic_path_failure_or_nothing_written_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old graph")
    with pytest.raises(Boom), atomic_path(target) as staged:
        staged.write_bytes(b"graph that failed its parity check")
        raise Boom()
    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic_path(target):
        pass
    assert target.read_bytes() == b"old graph"
    assert os.listdir(tmp_path) == ["model.onnx"]


def _tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_atomic_path_replaces_a_directory_tree_whole(tmp_path: Path) -> None:
    target = tmp_path / "package"
    _tree(target, {"model.onnx": b"v1", "extra/labels.txt": b"a\n", "gone.txt": b"only in v1"})
    new = {"model.onnx": b"v2", "extra/labels.txt": b"a\nb\n"}
    with atomic_path(target) as staged:
        staged.mkdir()
        _tree(staged, new)
        assert _read_tree(target)["model.onnx"] == b"v1"
    assert _read_tree(target) == new
    assert os.listdir(tmp_path) == ["package"]
    # Into a place where nothing was.
    with atomic_path(tmp_path / "fresh") as staged:
        staged.mkdir()
        _tree(staged, new)
    assert _read_tree(tmp_path / "fresh") == new


def test_a_failed_tree_leaves_the_old_tree_intact(tmp_path: Path) -> None:
    target = tmp_path / "package"
    old = {"model.onnx": b"v1", "extra/labels.txt": b"a\n"}
    _tree(target, old)
    with pytest.raises(Boom), atomic_path(target) as staged:
        staged.mkdir()
        _tree(staged, {"model.onnx": b"half"})
        raise Boom()
    assert _read_tree(target) == old
    assert os.listdir(tmp_path) == ["package"]


def test_replace_moves_a_finished_tree_over_a_directory(tmp_path: Path) -> None:
    stage, repository = tmp_path / "stage", tmp_path / "repository"
    _tree(stage / "3", {"model.onnx": b"new"})
    _tree(repository / "3", {"model.onnx": b"old", "model.py": b"stub"})
    replace(stage / "3", repository / "3")
    assert _read_tree(repository / "3") == {"model.onnx": b"new"}
    assert os.listdir(stage) == [], "the replaced tree was set aside in the stage and deleted"
    with pytest.raises(IsADirectoryError):
        (stage / "file").write_bytes(b"x")
        replace(stage / "file", repository / "3")
    assert _read_tree(repository / "3") == {"model.onnx": b"new"}
