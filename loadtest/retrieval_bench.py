"""A retrieval benchmark that runs anywhere: real photos under known transformations, Oxford-format truth.

    python -m loadtest.retrieval_bench OUT        # OUT/jpg (database), OUT/queries, OUT/gt (Oxford format)
    vision eval-retrieval --images OUT/jpg --queries OUT/queries --gt OUT/gt --recipe gem

Oxford and Paris cannot be fetched here. Each of scikit-image's photos becomes one query (a centre crop,
its bounding box the whole image); the database holds transformed copies of every photo: mild ones are
`good` (scale + crop, rotation, colour, JPEG quality), stronger ones `ok` (perspective, blur), a tiny
corner crop `junk` (ignored, as Oxford's junk). Every other photo's copies are distractors for a query,
and crops of photos that are not queries are extra distractors.
Deterministic: the same files every run.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

PHOTOS = (
    "astronaut.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg",
    "camera.png", "moon.png", "coins.png", "page.png", "clock_motion.png", "brick.png", "grass.png", "gravel.png",
    "text.png", "logo.png", "cell.png", "color.png",
)
LONG_SIDE = 320
# Photos that are never queried: only crops of them enter the database, as distractors.
DISTRACTOR_PHOTOS = ("chelsea.png", "coffee.png", "horse.png", "microaneurysms.png", "phantom.png", "chessboard_RGB.png")
DISTRACTORS_PER_PHOTO = 12


def _photos() -> dict[str, Image.Image]:
    import skimage.data

    root = Path(skimage.data.__file__).parent
    found = {}
    for name in PHOTOS:
        path = root / name
        if path.is_file():
            img = Image.open(path).convert("RGB")
            img.thumbnail((LONG_SIDE * 2, LONG_SIDE * 2))
            found[Path(name).stem] = img
    return found


def _distractor_photos(queried: set[str]) -> dict[str, Image.Image]:
    import skimage.data

    root = Path(skimage.data.__file__).parent
    found = {}
    for name in DISTRACTOR_PHOTOS:
        stem = Path(name).stem
        if (root / name).is_file() and stem not in queried:
            found[stem] = Image.open(root / name).convert("RGB")
    return found


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _fit(img: Image.Image) -> Image.Image:
    img = img.copy()
    img.thumbnail((LONG_SIDE, LONG_SIDE))
    return img


def _perspective(img: Image.Image, rng: np.random.Generator, amount: float) -> Image.Image:
    w, h = img.size
    jitter = rng.uniform(-amount, amount, 8) * np.array([w, h] * 4)
    corners = np.array([0, 0, w, 0, w, h, 0, h], dtype=float) + jitter
    # PIL's perspective transform maps output corners to these input points; solve for its 8 coefficients.
    rows, rhs = [], []
    for (x, y), (u, v) in zip([(0, 0), (w, 0), (w, h), (0, h)], corners.reshape(4, 2), strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    coeffs = np.linalg.solve(np.array(rows), np.array(rhs))
    return img.transform((w, h), Image.Transform.PERSPECTIVE, tuple(coeffs), Image.Resampling.BILINEAR)


def _region(img: Image.Image, rng: np.random.Generator, fraction: float) -> Image.Image:
    """A random crop covering `fraction` of each side: a partial view of the scene."""
    w, h = img.size
    cw, ch = int(fraction * w), int(fraction * h)
    left, top = int(rng.uniform(0, w - cw)), int(rng.uniform(0, h - ch))
    return img.crop((left, top, left + cw, top + ch))


def transforms(img: Image.Image, rng: np.random.Generator) -> dict[str, tuple[str, Image.Image]]:
    """name -> (ground-truth class, transformed image). `good`: the object is clearly visible; `ok`: it is
    partly visible or degraded; `junk`: too little of it to count either way (Oxford's definitions)."""
    w, h = img.size
    rotated = img.rotate(float(rng.uniform(20, 35)), resample=Image.Resampling.BILINEAR, expand=True)
    colour = ImageEnhance.Contrast(ImageEnhance.Color(ImageEnhance.Brightness(img).enhance(1.5)).enhance(0.3)).enhance(0.6)
    return {
        "crop": ("good", _region(img, rng, 0.6).resize((int(0.5 * w), int(0.5 * h)))),
        "rotate": ("good", rotated),
        "colour": ("good", Image.open(io.BytesIO(_jpeg(colour, quality=10))).convert("RGB")),
        "perspective": ("good", _perspective(img, rng, 0.2)),
        "part": ("ok", _region(img, rng, 0.4)),
        "blur": ("ok", _region(img, rng, 0.7).filter(ImageFilter.GaussianBlur(6))),
        "corner": ("junk", _region(img, rng, 0.15)),
    }


def generate(out: Path) -> dict[str, int]:
    """Write the benchmark under `out`; returns counts."""
    rng = np.random.default_rng(20261125)
    database, queries, gt = out / "jpg", out / "queries", out / "gt"
    for folder in (database, queries, gt):
        folder.mkdir(parents=True, exist_ok=True)
    n_db = 0
    photos = _photos()
    for stem, img in photos.items():
        w, h = img.size
        query = _fit(img.crop((w // 10, h // 10, w - w // 10, h - h // 10)))
        (queries / f"q_{stem}.jpg").write_bytes(_jpeg(query))
        lists: dict[str, list[str]] = {"good": [], "ok": [], "junk": []}
        for kind, (label, variant) in transforms(img, rng).items():
            name = f"{stem}_{kind}"
            (database / f"{name}.jpg").write_bytes(_jpeg(_fit(variant)))
            lists[label].append(name)
            n_db += 1
        qw, qh = query.size
        (gt / f"{stem}_query.txt").write_text(f"oxc1_q_{stem} 0 0 {qw} {qh}\n")
        for label, names in lists.items():
            (gt / f"{stem}_{label}.txt").write_text("".join(f"{n}\n" for n in names))
    for stem, img in _distractor_photos(set(photos)).items():
        for i in range(DISTRACTORS_PER_PHOTO):
            region = _region(img, rng, float(rng.uniform(0.3, 0.7)))
            (database / f"distractor_{stem}_{i}.jpg").write_bytes(_jpeg(_fit(region)))
            n_db += 1
    return {"queries": len(photos), "database": n_db}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.retrieval_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (jpg/, queries/, gt/)")
    args = parser.parse_args(argv)
    counts = generate(args.out)
    print(f"wrote {counts['queries']} queries and {counts['database']} database images under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
