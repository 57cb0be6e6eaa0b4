"""vision.media.imaging.image_files and IMAGE_SUFFIXES: the one listing of image folders every tool uses."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from vision.media.imaging import IMAGE_SUFFIXES, SUPPORTED_FORMATS, image_files


def test_the_suffixes_are_those_of_the_formats_the_decoder_accepts():
    extensions = Image.registered_extensions()
    assert {extensions[suffix] for suffix in IMAGE_SUFFIXES} == set(SUPPORTED_FORMATS)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("b.JPG", "a.png", "c.gif", "d.webp", "e.bmp", "f.jpeg", "notes.txt", "._a.png", "sub/g.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "folder.jpg").mkdir()
    return tmp_path


def test_images_directly_in_the_folder_sorted_without_hidden_files_or_folders(folder):
    names = [p.name for p in image_files(folder)]
    assert names == ["a.png", "b.JPG", "c.gif", "d.webp", "e.bmp", "f.jpeg"]


def test_recursive_includes_subfolders(folder):
    assert [p.relative_to(folder).as_posix() for p in image_files(folder, recursive=True)] == [
        "a.png", "b.JPG", "c.gif", "d.webp", "e.bmp", "f.jpeg", "sub/g.jpg"
    ]


def test_a_missing_folder_or_a_file_is_refused_by_name(folder):
    with pytest.raises(NotADirectoryError, match="nope is not a folder"):
        image_files(folder / "nope")
    with pytest.raises(NotADirectoryError, match="a.png is not a folder"):
        image_files(folder / "a.png")
