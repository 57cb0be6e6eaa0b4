"""Views: how one decoded image becomes the model input tensors a task needs.

- `center`: resize the shorter side, centre crop (Classification, Tagging, centre descriptors).
- `ten_crop`: torchvision's `ten_crop` geometry on the resized image: the four corner crops and the centre
  crop, then the same five of the horizontally flipped image (Tencent ML-Images' feature extractor).
- `full`: the whole image with its aspect ratio, downscaled (never upscaled) to fit the caps, at one or
  more scales (pooled descriptors at full resolution, DELF's image pyramid).

Pure functions of a PIL image and a preset; no model, no gRPC. Each view is a float32 (3, H, W) array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from vision.core.errors import InvalidArgument
from vision.media.imaging import Preset, preprocess, resized_size

ViewKind = Literal["center", "ten_crop", "full"]


@dataclass(frozen=True)
class ViewSpec:
    kind: ViewKind = "center"
    # `full` only: one view per scale of the capped image, in this order.
    scales: tuple[float, ...] = (1.0,)
    # `full` only: the capped image's shorter / longer side is at most this (0: no cap).
    max_shorter: int = 0
    max_longer: int = 0
    # Images with a side under the platform's decode minimum (DecodeLimits.min_side) are refused, unless the
    # spec accepts them down to this side (0: it does not): they are then decoded, so a corrupt one is still
    # refused, and get no views, so no forward pass; the task's postprocess answers them without outputs
    # (DELF: no features, as the reference extractor gives images under 10 px).
    min_side: int = 0

    def __post_init__(self) -> None:
        if self.min_side < 0:
            raise ValueError(f"min_side must be 0 or more, got {self.min_side}")
        if not self.scales or any(not (0 < s <= 8) or not math.isfinite(s) for s in self.scales):
            raise InvalidArgument(f"scales must be between 0 and 8 (exclusive of 0), got {list(self.scales)}")
        if self.kind != "full" and self.scales != (1.0,):
            raise InvalidArgument(f"the {self.kind} view has a single scale")

    def min_decode_side(self, preset: Preset) -> int | None:
        """The smallest shorter side the decoder may downsample to (JPEG draft) without losing detail that
        the views use; None when every pixel may matter."""
        if self.kind in ("center", "ten_crop"):
            return preset.resize_shorter
        if self.max_shorter:
            return math.ceil(self.max_shorter * max(1.0, *self.scales))
        return None


CENTER = ViewSpec()
TEN_CROP = ViewSpec("ten_crop")


def make_views(img: Image.Image, preset: Preset, spec: ViewSpec) -> list[np.ndarray]:
    """The model inputs of `img` for `spec`, each float32 (3, H, W), in the spec's order."""
    if spec.kind == "center":
        return [preprocess(img, preset)]
    if spec.kind == "ten_crop":
        return ten_crop(img, preset)
    return full_views(img, preset, spec)


def ten_crop(img: Image.Image, preset: Preset) -> list[np.ndarray]:
    """torchvision `Resize(resize_shorter)` then `TenCrop(crop_size)`: top-left, top-right, bottom-left,
    bottom-right, centre, then the same five of the horizontal mirror."""
    width, height = resized_size(img.size, preset.resize_shorter)
    resized = np.asarray(img.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)
    size = preset.crop_size
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    corners = ((0, 0), (0, width - size), (height - size, 0), (height - size, width - size), (top, left))
    crops = []
    for source in (resized, resized[:, ::-1]):
        crops.extend(preset.normalise(source[y : y + size, x : x + size]) for y, x in corners)
    return crops


def capped_size(size: tuple[int, int], max_shorter: int, max_longer: int) -> tuple[int, int]:
    """(width, height) downscaled, aspect kept, so the shorter side is <= max_shorter and the longer side
    <= max_longer (0 = no cap); never upscaled."""
    width, height = size
    factor = 1.0
    if max_shorter:
        factor = min(factor, max_shorter / min(width, height))
    if max_longer:
        factor = min(factor, max_longer / max(width, height))
    return max(1, round(width * factor)), max(1, round(height * factor))


def full_views(img: Image.Image, preset: Preset, spec: ViewSpec) -> list[np.ndarray]:
    base_w, base_h = capped_size(img.size, spec.max_shorter, spec.max_longer)
    views = []
    for scale in spec.scales:
        size = (max(1, round(base_w * scale)), max(1, round(base_h * scale)))
        scaled = img if size == img.size else img.resize(size, Image.Resampling.BILINEAR)
        views.append(preset.normalise(np.asarray(scaled, dtype=np.uint8)))
    return views
