"""Real photos available offline, turned into image sets with a known split.

scikit-image (a dependency) and matplotlib (the loadtest extra) ship a few dozen real photos. Quantization
needs two sets of them that never share a source photo: one to calibrate activation ranges on, one to
measure agreement with the float model on. Each set is made of random crops, flips and colour changes of
its own source photos, so a few sources give hundreds of distinct images, and the same seed gives the
same files on every machine.

    vision sample-photos --split calibration --count 96 --out calib/
    vision sample-photos --split held-out --count 500 --out held-out/
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

Split = Literal["calibration", "held-out"]
SPLITS: tuple[Split, ...] = ("calibration", "held-out")

# Object photos go to the held-out side: their top-1 is meaningful, so agreement measures something (a
# texture's top-1 is a coin toss between similar classes in any precision). coffee and chelsea are
# held out because tests check the quantized model's answer on them.
_SOURCES: dict[Split, tuple[str, ...]] = {
    "held-out": (
        "skimage:coffee.png", "skimage:chelsea.png", "skimage:rocket.jpg", "skimage:motorcycle_left.png",
        "skimage:astronaut.png", "skimage:camera.png", "skimage:coins.png", "skimage:moon.png",
        "skimage:retina.jpg", "skimage:horse.png", "matplotlib:grace_hopper.jpg",
    ),
    "calibration": (
        "skimage:motorcycle_right.png", "skimage:hubble_deep_field.jpg", "skimage:ihc.png", "skimage:brick.png",
        "skimage:grass.png", "skimage:gravel.png", "skimage:color.png", "skimage:page.png", "skimage:cell.png",
        "skimage:clock_motion.png", "matplotlib:Minduka_Present_Blue_Pack.png",
    ),
}
# Shorter side of the written images: above every preset's resize (256 at most), so each set exercises the
# real resize, yet small enough that a set of 500 takes seconds to decode.
SHORTER_SIDE = 288


@dataclass(frozen=True)
class SourcePhoto:
    name: str
    image: Image.Image


def _locate(source: str) -> Path | None:
    package, _, name = source.partition(":")
    if package == "skimage":
        import skimage.data

        path = Path(skimage.data.__file__).parent / name
    else:
        try:
            import matplotlib
        except ImportError:  # the loadtest extra is not installed: its photos are simply not used
            return None
        path = Path(matplotlib.get_data_path()) / "sample_data" / name
    return path if path.is_file() else None


def source_photos(split: Split) -> list[SourcePhoto]:
    """The split's source photos that this installation has (as RGB)."""
    if split not in _SOURCES:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    photos = []
    for source in _SOURCES[split]:
        path = _locate(source)
        if path is not None:
            photos.append(SourcePhoto(Path(source.partition(":")[2]).stem, Image.open(path).convert("RGB")))
    if not photos:
        raise FileNotFoundError(f"none of the {split} source photos is installed (scikit-image's sample data)")
    return photos


def augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop (25-100 % of the area, aspect 3:4 to 4:3), a flip half of the time, and brightness,
    contrast and saturation each scaled by 0.6-1.4; the shorter side resized to SHORTER_SIDE."""
    width, height = img.size
    area = width * height * rng.uniform(0.25, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_w = int(min(width, round(np.sqrt(area * aspect))))
    crop_h = int(min(height, round(np.sqrt(area / aspect))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    out = img.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhancer(out).enhance(float(rng.uniform(0.6, 1.4)))
    scale = SHORTER_SIDE / min(out.size)
    return out.resize((max(1, round(out.width * scale)), max(1, round(out.height * scale))), Image.Resampling.BILINEAR)


def generate(split: Split, count: int, *, seed: int = 0) -> Iterator[tuple[str, Image.Image]]:
    """`count` augmented images of the split, cycling through its source photos: (file name, image)."""
    photos = source_photos(split)
    # The split is part of the seed: the two sets differ even where they would share an index.
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    for i in range(count):
        photo = photos[i % len(photos)]
        yield f"{i:04d}-{photo.name}.jpg", augment(photo.image, rng)


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_set(split: Split, count: int, out: Path, *, seed: int = 0) -> list[Path]:
    """Write the set as JPEG files under `out` (created); returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, img in generate(split, count, seed=seed):
        path = out / name
        path.write_bytes(jpeg_bytes(img))
        written.append(path)
    return written
