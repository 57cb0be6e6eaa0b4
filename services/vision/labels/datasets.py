"""Labelled image sets for `vision eval-tags`: reading them, and turning Tagging responses into matrices.

Two layouts (`load_tag_dataset` picks by path):

* **A folder with one subfolder per label**: ``ROOT/<label>/<image>``. An image's true labels are the
  folders it appears in: files with identical content under several label folders are one sample with all
  those labels (copy or hard-link an image into every folder it belongs to). Only image files directly
  inside a label folder count (.jpg .jpeg .png .webp .bmp .gif); hidden files and folders are skipped.
* **NUS-WIDE-style JSON**::

      {"labels": ["espresso", "n02121808", ...],
       "samples": [{"image": "photos/coffee.png", "labels": ["espresso", 3]}, ...]}

  ``labels`` as `vision.labels.vocab.load_nuswide_json` reads it; a sample's ``image`` (``file_name`` is accepted
  too) is a path relative to the JSON file, and its ``labels`` are names from ``labels`` or indices into it.

A dataset label is matched to a model's tags by WordNet id (``n02121808``) or by name (case-insensitive); a
model label whose name repeats (ImageNet's two "crane"s) counts for the dataset label with the higher score.
Tags that match no dataset label are ignored: metrics are over the dataset's labels.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vision.core.files import sha256_file
from vision.media.imaging import IMAGE_SUFFIXES


class DatasetError(ValueError):
    """A dataset folder or JSON file is unusable; the message says where and why."""


@dataclass(frozen=True)
class Sample:
    path: Path
    labels: frozenset[int]


@dataclass(frozen=True)
class TagDataset:
    labels: tuple[str, ...]
    samples: tuple[Sample, ...]
    source: str

    def truth(self) -> np.ndarray:
        """(n_samples, n_labels) bool."""
        y = np.zeros((len(self.samples), len(self.labels)), dtype=bool)
        for row, sample in enumerate(self.samples):
            y[row, sorted(sample.labels)] = True
        return y


def load_tag_dataset(path: Path) -> TagDataset:
    if path.is_dir():
        return _load_folder(path)
    if path.is_file():
        return _load_json(path)
    raise DatasetError(f"{path} does not exist")


def _load_folder(root: Path) -> TagDataset:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(f"{root}: no label subfolders (expected ROOT/<label>/<image>)")
    by_digest: dict[str, tuple[Path, set[int]]] = {}
    for column, folder in enumerate(folders):
        for file in sorted(folder.iterdir()):
            if not file.is_file() or file.name.startswith(".") or file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            digest = sha256_file(file)
            by_digest.setdefault(digest, (file, set()))[1].add(column)
    if not by_digest:
        raise DatasetError(f"{root}: no images in its label subfolders ({', '.join(IMAGE_SUFFIXES)})")
    samples = tuple(Sample(file, frozenset(cols)) for file, cols in by_digest.values())
    return TagDataset(tuple(f.name for f in folders), samples, str(root))


def _load_json(path: Path) -> TagDataset:
    from vision.labels.vocab import VocabularyError, load_nuswide_json

    try:
        labels = load_nuswide_json(path).names
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except VocabularyError as exc:
        raise DatasetError(str(exc)) from None
    column = {name: i for i, name in enumerate(labels)}
    raw = document.get("samples")
    if not isinstance(raw, list) or not raw:
        raise DatasetError(
            f'{path}: "samples" must be a non-empty list of {{"image": PATH, "labels": [...]}}'
        )
    samples = []
    for i, entry in enumerate(raw):
        where = f'{path}: "samples"[{i}]'
        if not isinstance(entry, dict):
            raise DatasetError(f'{where}: expected an object {{"image": PATH, "labels": [...]}}')
        image = entry.get("image", entry.get("file_name"))
        if not isinstance(image, str) or not image:
            raise DatasetError(f'{where}: "image" must be a path (relative to the JSON file)')
        file = path.parent / image
        if not file.is_file():
            raise DatasetError(f"{where}: image {file} does not exist")
        names = entry.get("labels", [])
        if not isinstance(names, list):
            raise DatasetError(f'{where}: "labels" must be a list of label names or indices')
        columns = set()
        for name in names:
            if isinstance(name, bool) or not isinstance(name, (str, int)):
                raise DatasetError(f"{where}: label {name!r} must be a name or an index")
            if isinstance(name, int):
                if not 0 <= name < len(labels):
                    raise DatasetError(f"{where}: label index {name} is out of range 0..{len(labels) - 1}")
                columns.add(name)
            elif name in column:
                columns.add(column[name])
            else:
                raise DatasetError(f'{where}: label {name!r} is not in "labels"')
        samples.append(Sample(file, frozenset(columns)))
    return TagDataset(tuple(labels), tuple(samples), str(path))


class LabelMatcher:
    """Dataset columns of returned tags, by WordNet id or case-insensitive name."""

    def __init__(self, labels: Iterable[str]) -> None:
        self._column: dict[str, int] = {}
        for i, label in enumerate(labels):
            self._column.setdefault(label.casefold(), i)
        self.seen: set[int] = set()

    def column(self, label: str, wnid: str) -> int | None:
        col = self._column.get(wnid.casefold()) if wnid else None
        if col is None:
            col = self._column.get(label.casefold())
        if col is not None:
            self.seen.add(col)
        return col

    def fill(self, row: np.ndarray, tags: Iterable[object], *, scores: bool) -> None:
        """Set `row`'s matched columns to the tag score (max over matches) or to True."""
        for tag in tags:
            col = self.column(tag.label, tag.wnid)  # type: ignore[attr-defined]
            if col is None:
                continue
            row[col] = max(row[col], tag.score) if scores else True  # type: ignore[attr-defined]
