"""A generated multi-label image set with known labels: coloured shapes on textured backgrounds.

    python -m training.shapes OUT --count 400 --seed 0      # OUT/images/*.png, OUT/labels.txt, OUT/dataset.json

Every image (64-96 px a side) shows one to three shapes (circle, square, triangle), each red, green or blue,
on a low-saturation textured background (noise, stripes or blotches), so colour labels come only from
the shapes. An image's labels are the shape kinds and the colours it shows: 6 labels, 1-5 per image.
Written as a NUS-WIDE-style JSON (`dataset.json`, what fine-tune jobs and `vision eval-tags` read) and,
for the download job, as a URL list (`urls_for(base_url)`: `URL<TAB>idx:1 idx:1 ...`).
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
LABELS = (*SHAPES, *COLOURS)


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[int, ...]
    image: Image.Image

    def png(self) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, format="PNG")
        return buf.getvalue()


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    base = rng.uniform(90, 200, size=3)
    # Low saturation: every channel near one grey level, so no background reads as red/green/blue.
    base = base.mean() + (base - base.mean()) * 0.15
    kind = rng.integers(3)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == 0:  # noise
        field = rng.normal(0, 18, size=(height, width))
    elif kind == 1:  # stripes at a random angle
        angle, period = rng.uniform(0, np.pi), rng.uniform(5, 14)
        field = 25 * np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period)
    else:  # blotches: smoothed noise
        small = rng.normal(0, 40, size=(max(2, height // 12), max(2, width // 12)))
        field = np.asarray(
            Image.fromarray(small.astype(np.float32)).resize((width, height), Image.Resampling.BICUBIC)
        )
    pixels = np.clip(
        base[None, None, :] + field[..., None] + rng.normal(0, 6, size=(height, width, 3)), 0, 255
    )
    return Image.fromarray(pixels.astype(np.uint8))


def _draw(
    draw: ImageDraw.ImageDraw,
    shape: str,
    box: tuple[float, float, float, float],
    colour: tuple[int, int, int],
    rng: np.random.Generator,
) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        jitter = rng.uniform(-0.15, 0.15) * (x1 - x0)
        draw.polygon([((x0 + x1) / 2 + jitter, y0), (x1, y1), (x0, y1)], fill=colour)


def make_sample(rng: np.random.Generator, name: str) -> Sample:
    width, height = (int(v) for v in rng.integers(64, 97, size=2))
    img = _background(rng, width, height)
    draw = ImageDraw.Draw(img)
    labels: set[int] = set()
    count = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    side = min(width, height)
    placed: list[tuple[float, float, float]] = []
    for _ in range(count):
        size = rng.uniform(0.32, 0.48) * side
        for _attempt in range(20):  # keep shapes mostly apart, so each stays recognisable
            cx, cy = rng.uniform(size / 2, width - size / 2), rng.uniform(size / 2, height - size / 2)
            if all((cx - px) ** 2 + (cy - py) ** 2 > ((size + ps) * 0.45) ** 2 for px, py, ps in placed):
                break
        placed.append((cx, cy, size))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour_name = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        colour = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in COLOURS[colour_name])
        _draw(draw, shape, (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2), colour, rng)  # type: ignore[arg-type]
        labels |= {LABELS.index(shape), LABELS.index(colour_name)}
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return Sample(name, tuple(sorted(labels)), img)


def generate(count: int, seed: int = 0, prefix: str = "img") -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [make_sample(rng, f"{prefix}{i:05d}.png") for i in range(count)]


def write_labels(path: Path) -> Path:
    """The label file serving reads (`index<TAB>name` per line)."""
    path.write_text("".join(f"{i}\t{name}\n" for i, name in enumerate(LABELS)))
    return path


def write_dataset(out: Path, samples: list[Sample]) -> Path:
    """OUT/images/<name>, OUT/labels.txt and OUT/dataset.json (NUS-WIDE style); returns the JSON path."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    for s in samples:
        (out / "images" / s.name).write_bytes(s.png())
    write_labels(out / "labels.txt")
    doc = {
        "labels": list(LABELS),
        "samples": [{"image": f"images/{s.name}", "labels": list(s.labels)} for s in samples],
    }
    path = out / "dataset.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def url_line(url: str, labels: tuple[int, ...]) -> str:
    """One line of an ML-Images URL list: URL<TAB>idx:conf idx:conf ..."""
    return url + "\t" + " ".join(f"{i}:1" for i in labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.shapes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_dataset(args.out, generate(args.count, args.seed))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
