"""Training data for fine-tune jobs: the three input layouts, the train/validation split, the transforms.

Layouts (`load_data` picks by what the path is):
- **a download job's output** (the folder, or its `images.txt`): `name<TAB>idx:conf idx:conf ...` per line,
  names relative to the folder; a label counts when its confidence is at least 0.5 (a bare `idx` is 1);
  label names from `--labels FILE` (`index<TAB>name`), else the folder's `labels.txt`, else `label<i>`;
- **a folder per class**, ROOT/<class>/<image>: one class per image (classification, retrieval); for
  tagging an image's labels are the folders holding identical copies of it (vision.labels.datasets);
- **a NUS-WIDE-style JSON** `{"labels": [...], "samples": [{"image": PATH, "labels": [...]}]}`.

Images are decoded exactly as the services decode them (vision.media.imaging: EXIF, any mode to RGB), resized
and centre-cropped by the model's preset, then augmented: flip, colour jitter without hue (a colour can
be a label) and a small affine; the light variant only flips.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from vision.jobs.runtime import JobFailed
from vision.media.imaging import IMAGE_SUFFIXES


@dataclass(frozen=True)
class LabelledSet:
    labels: tuple[str, ...]
    items: tuple[tuple[Path, tuple[int, ...]], ...]  # (image, label indices); one index for single-label data
    source: str

    def fingerprint(self) -> str:
        """sha256 over the image names, their sizes and their labels: lineage of a registered version."""
        h = hashlib.sha256()
        for path, labels in self.items:
            h.update(f"{path.name}\t{path.stat().st_size}\t{','.join(map(str, labels))}\n".encode())
        h.update("\n".join(self.labels).encode())
        return "sha256:" + h.hexdigest()[:32]


def _label_names(labels_file: Path | None, folder: Path, n: int) -> tuple[str, ...]:
    from vision.labels.vocab import VocabularyError, load_vocabulary

    for candidate in (labels_file, folder / "labels.txt"):
        if candidate is not None and candidate.is_file():
            try:
                vocab = load_vocabulary(candidate)
            except VocabularyError as exc:
                raise JobFailed(f"label file {candidate}: {exc}") from None
            names = tuple(label.name for label in vocab)
            if len(names) < n:
                raise JobFailed(
                    f"label file {candidate} names {len(names)} labels but the data uses index {n - 1}"
                )
            return names
    return tuple(f"label{i}" for i in range(n))


def _image_list(path: Path, labels_file: Path | None) -> LabelledSet:
    folder = path.parent
    items: list[tuple[Path, tuple[int, ...]]] = []
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
                raise JobFailed(f"{path} line {number}: bad label {token!r}") from None
        items.append((folder / name, tuple(sorted(set(labels)))))
        top = max([top, *labels])
    if not items:
        raise JobFailed(f"{path} lists no images")
    return LabelledSet(_label_names(labels_file, folder, top + 1), tuple(items), str(path))


def _class_folders(root: Path) -> LabelledSet:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise JobFailed(f"{root}: no class folders (expected ROOT/<class>/<image>)")
    items = []
    for index, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith("."):
                items.append((file, (index,)))
    if not items:
        raise JobFailed(f"{root}: no images in its class folders")
    return LabelledSet(tuple(classes), tuple(items), str(root))


def load_data(path: Path, *, task: str, labels_file: Path | None = None) -> LabelledSet:
    from vision.labels.datasets import DatasetError, load_tag_dataset

    if not path.exists():
        raise JobFailed(f"training data {path} does not exist")
    if path.is_dir() and (path / "images.txt").is_file():
        data = _image_list(path / "images.txt", labels_file)
    elif path.is_file() and path.suffix == ".txt":
        data = _image_list(path, labels_file)
    elif path.is_file() or task == "tagging":
        try:
            ds = load_tag_dataset(path)
        except DatasetError as exc:
            raise JobFailed(str(exc)) from None
        data = LabelledSet(
            tuple(ds.labels), tuple((s.path, tuple(sorted(s.labels))) for s in ds.samples), ds.source
        )
    else:
        data = _class_folders(path)
    if task != "tagging":
        multi = [p for p, labels in data.items if len(labels) != 1]
        if multi:
            raise JobFailed(
                f"{task} needs exactly one class per image; {multi[0]} has {len(dict(data.items)[multi[0]])}"
            )
    missing = [p for p, _ in data.items if not p.is_file()]
    if missing:
        raise JobFailed(f"{len(missing)} images of {data.source} are missing, e.g. {missing[0]}")
    return data


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: a fixed permutation of the seed, so every attempt of a job splits alike."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction))) if n > 1 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class ImageDataset:
    """(tensor, target) pairs for a DataLoader. `target`: multi-hot float (multilabel) or the class index."""

    def __init__(
        self,
        items: list[tuple[Path, tuple[int, ...]]],
        num_labels: int,
        preset: Any,
        *,
        multilabel: bool,
        augment: str = "none",
    ) -> None:
        self.items = items
        self.num_labels = num_labels
        self.preset = preset
        self.multilabel = multilabel
        self.augment = augment
        self._transform: Any = None

    def __len__(self) -> int:
        return len(self.items)

    def _augmentation(self) -> Any:
        from torchvision.transforms import v2 as T

        if self.augment == "full":
            return T.Compose(
                [
                    T.RandomHorizontalFlip(),
                    T.ColorJitter(0.3, 0.3, 0.3, hue=0.0),
                    T.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1)),
                ]
            )
        if self.augment == "light":
            return T.RandomHorizontalFlip()
        return None

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        import torch
        from vision.media.imaging import decode_image, resize_center_crop

        path, labels = self.items[index]
        img = resize_center_crop(
            # As the services decode: JPEG draft down to the preset's size, so training sees serving's pixels.
            decode_image(path.read_bytes(), min_target_side=self.preset.resize_shorter),
            self.preset.resize_shorter,
            self.preset.crop_size,
        )
        if self.augment != "none":
            if self._transform is None:
                self._transform = self._augmentation()
            img = self._transform(img)
        x = torch.from_numpy(self.preset.normalise(np.asarray(img, dtype=np.uint8)))
        if self.multilabel:
            y = torch.zeros(self.num_labels, dtype=torch.float32)
            y[list(labels)] = 1.0
        else:
            y = torch.tensor(labels[0], dtype=torch.long)
        return x, y


def unlabeled_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise JobFailed(f"unlabeled folder {folder} does not exist")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
