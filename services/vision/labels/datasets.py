"""Labelled image sets for `vision eval-tags` and fine-tune jobs: reading them, and turning Tagging responses
into matrices.

Three layouts (`load_tag_dataset` picks by path; `resolve_dataset` is the rule for folders):

* **A folder with one subfolder per label**: ``ROOT/<label>/<image>``. An image's true labels are the
  folders it appears in: files with identical content under several label folders are one sample with all
  those labels (copy or hard-link an image into every folder it belongs to). Only image files directly
  inside a label folder count (.jpg .jpeg .png .webp .bmp .gif); hidden files and folders are skipped.
* **NUS-WIDE-style JSON**::

      {"labels": ["espresso", "n02121808", ...],
       "samples": [{"image": "photos/coffee.png", "labels": ["espresso", 3]}, ...]}

  ``labels`` as `vision.labels.vocab.load_nuswide_json` reads it; a sample's ``image`` (``file_name`` is accepted
  too) is a path relative to the JSON file, and its ``labels`` are names from ``labels`` or indices into it.
* **A download job's image list** (``images.txt``): ``name<TAB>idx:conf idx:conf ...`` per line, names relative
  to the file's folder; a label counts when its confidence is at least 0.5 (a bare ``idx`` is 1). Label names
  from the given label file (``index<TAB>name``), else the folder's ``labels.txt``, else ``label<i>``.

A folder that holds a ``dataset.json`` or an ``images.txt`` is read as that file, not as a folder per label:
its subfolders (``images/``) hold the images, not labels.

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
from vision.media.imaging import IMAGE_SUFFIXES, image_files


class DatasetError(ValueError):
    """A dataset folder, JSON file or image list is unusable; the message says where and why."""


FOLDER_PER_LABEL, NUSWIDE_JSON, IMAGE_LIST = "a folder per label", "a NUS-WIDE JSON", "a download job's image list"
# The files that make a folder that one file (a NUS-WIDE JSON, a download job's list), not a folder per label.
DATASET_FILES = ("dataset.json", "images.txt")


@dataclass(frozen=True)
class Sample:
    path: Path
    labels: frozenset[int]


@dataclass(frozen=True)
class TagDataset:
    labels: tuple[str, ...]
    samples: tuple[Sample, ...]
    source: str
    layout: str = ""  # how `source` was read: FOLDER_PER_LABEL, NUSWIDE_JSON or IMAGE_LIST

    def truth(self) -> np.ndarray:
        """(n_samples, n_labels) bool."""
        y = np.zeros((len(self.samples), len(self.labels)), dtype=bool)
        for row, sample in enumerate(self.samples):
            y[row, sorted(sample.labels)] = True
        return y


def resolve_dataset(path: Path) -> Path:
    """The path a dataset is read from: a folder holding one of DATASET_FILES is that file; any other as given."""
    if not path.is_dir():
        return path
    found = [path / name for name in DATASET_FILES if (path / name).is_file()]
    if len(found) > 1:
        raise DatasetError(f"{path} holds both {found[0].name} and {found[1].name}: give the one to read")
    return found[0] if found else path


def load_tag_dataset(path: Path, *, labels_file: Path | None = None) -> TagDataset:
    """`path` in any of the three layouts; `labels_file` names an image list's labels (ignored otherwise)."""
    path = resolve_dataset(path)
    if path.is_dir():
        return _load_folder(path)
    if path.is_file():
        return _load_image_list(path, labels_file) if path.suffix == ".txt" else _load_json(path)
    raise DatasetError(f"{path} does not exist")


def _load_folder(root: Path) -> TagDataset:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(f"{root}: no label subfolders (expected ROOT/<label>/<image>)")
    by_digest: dict[str, tuple[Path, set[int]]] = {}
    for column, folder in enumerate(folders):
        for file in image_files(folder):
            digest = sha256_file(file)
            by_digest.setdefault(digest, (file, set()))[1].add(column)
    if not by_digest:
        raise DatasetError(f"{root}: no images in its label subfolders ({', '.join(IMAGE_SUFFIXES)})")
    samples = tuple(Sample(file, frozenset(cols)) for file, cols in by_digest.values())
    return TagDataset(tuple(f.name for f in folders), samples, str(root), FOLDER_PER_LABEL)


def _label_names(labels_file: Path | None, folder: Path, n: int) -> tuple[str, ...]:
    from vision.labels.vocab import VocabularyError, load_vocabulary

    for candidate in (labels_file, folder / "labels.txt"):
        if candidate is not None and candidate.is_file():
            try:
                vocab = load_vocabulary(candidate)
            except VocabularyError as exc:
                raise DatasetError(f"label file {candidate}: {exc}") from None
            names = tuple(label.name for label in vocab)
            if len(names) < n:
                raise DatasetError(
                    f"label file {candidate} names {len(names)} labels but the data uses index {n - 1}"
                )
            return names
    return tuple(f"label{i}" for i in range(n))


def _load_image_list(path: Path, labels_file: Path | None) -> TagDataset:
    folder = path.parent
    samples: list[Sample] = []
    top = -1
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, _, rest = line.partition("\t")
        labels = []
        for token in rest.split():
            idx, _, conf = token.partition(":")
            try:
                if float(conf or 1) >= 0.5:
                    labels.append(int(idx))
            except ValueError:
                raise DatasetError(f"{path} line {number}: bad label {token!r}") from None
        if any(label < 0 for label in labels):
            raise DatasetError(f"{path} line {number}: label indices start at 0")
        samples.append(Sample(folder / name, frozenset(labels)))
        top = max([top, *labels])
    if not samples:
        raise DatasetError(f"{path} lists no images")
    missing = [s.path for s in samples if not s.path.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} images of {path} are missing, e.g. {missing[0]}")
    return TagDataset(_label_names(labels_file, folder, top + 1), tuple(samples), str(path), IMAGE_LIST)


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
    return TagDataset(tuple(labels), tuple(samples), str(path), NUSWIDE_JSON)


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
