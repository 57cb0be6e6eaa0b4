"""Training data for fine-tune jobs: the three input layouts, the train/validation split, the transforms.

Layouts (`load_data` picks by what the path is; vision.labels.datasets reads them, as `vision eval-tags` does):
- **a download job's output** (the folder, or its `images.txt`): `name<TAB>idx:conf idx:conf ...` per line,
  names relative to the folder; a label counts when its confidence is at least 0.5 (a bare `idx` is 1);
  label names from `--labels FILE` (`index<TAB>name`), else the folder's `labels.txt`, else `label<i>`;
- **a NUS-WIDE-style JSON** `{"labels": [...], "samples": [{"image": PATH, "labels": [...]}]}`, or the folder
  holding it as `dataset.json` (what `python -m training.shapes DIR` writes);
- **a folder per class**, ROOT/<class>/<image> (any other folder): one class per image (classification,
  retrieval); for tagging an image's labels are the folders holding identical copies of it.

A set with nothing to tell apart (`check_learnable`: every image with the same labels, or one class) fails
the job rather than train a model that is trivially perfect on its own validation split.

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
from vision.media.imaging import image_files

FOLDER_PER_CLASS = "a folder per class"


@dataclass(frozen=True)
class LabelledSet:
    labels: tuple[str, ...]
    items: tuple[tuple[Path, tuple[int, ...]], ...]  # (image, label indices); one index for single-label data
    source: str
    layout: str = ""  # how `source` was read, for messages: "a folder per class", vision.labels.datasets' layouts

    def fingerprint(self) -> str:
        """sha256 over the image names, their sizes and their labels: lineage of a registered version."""
        h = hashlib.sha256()
        for path, labels in self.items:
            h.update(f"{path.name}\t{path.stat().st_size}\t{','.join(map(str, labels))}\n".encode())
        h.update("\n".join(self.labels).encode())
        return "sha256:" + h.hexdigest()[:32]


def _class_folders(root: Path) -> LabelledSet:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise JobFailed(f"{root}: no class folders (expected ROOT/<class>/<image>)")
    items = []
    for index, name in enumerate(classes):
        items.extend((file, (index,)) for file in image_files(root / name))
    if not items:
        raise JobFailed(f"{root}: no images in its class folders")
    return LabelledSet(tuple(classes), tuple(items), str(root), FOLDER_PER_CLASS)


def load_data(path: Path, *, task: str, labels_file: Path | None = None) -> LabelledSet:
    from vision.labels.datasets import DatasetError, load_tag_dataset, resolve_dataset

    if not path.exists():
        raise JobFailed(f"training data {path} does not exist")
    try:
        source = resolve_dataset(path)
        if source.is_dir() and task != "tagging":
            data = _class_folders(source)
        else:
            ds = load_tag_dataset(source, labels_file=labels_file)
            data = LabelledSet(
                tuple(ds.labels),
                tuple((s.path, tuple(sorted(s.labels))) for s in ds.samples),
                ds.source,
                ds.layout,
            )
    except DatasetError as exc:
        raise JobFailed(str(exc)) from None
    if task != "tagging":
        multi = [p for p, labels in data.items if len(labels) != 1]
        if multi:
            raise JobFailed(
                f"{task} needs exactly one class per image; {multi[0]} has {len(dict(data.items)[multi[0]])}"
            )
    return data


def check_learnable(data: LabelledSet, task: str) -> None:
    """Refuse a set with nothing to tell apart: every image with the same labels (tagging) or one class.

    Such a set trains a model that is trivially perfect on its own validation split (mAP and F1 of 1.0),
    which would then be registered and promoted; the usual cause is a folder read in the wrong layout.
    """
    used = sorted({labels for _, labels in data.items})
    if len(used) > 1:
        return
    names = [data.labels[i] for i in used[0]] if used else []
    read = f"read {data.source} as {data.layout or 'given'}"
    if task == "tagging":
        if not names:
            found = f"no labels on any of its {len(data.items)} images"
        else:
            quoted = ", ".join(repr(n) for n in names)
            found = f"{len(names)} label{'s' if len(names) > 1 else ''} {quoted} on all {len(data.items)} images"
        raise JobFailed(
            f"{read}: {found}, so there is nothing to learn. Give a set whose images differ in their labels: "
            "a NUS-WIDE JSON (such as training.shapes' dataset.json, or the folder holding it), a download "
            "job's images.txt (or its folder), or a folder per label (ROOT/<label>/<image>, an image copied "
            "into each label folder it belongs to)"
        )
    raise JobFailed(
        f"{read}: 1 class {names[0]!r} for all {len(data.items)} images; {task} needs images of at least "
        "2 classes: give a folder per class (ROOT/<class>/<image>), or a NUS-WIDE JSON or a download job's "
        "images.txt with one label per image"
    )


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
    return image_files(folder, recursive=True)
