"""A PNG of a run's curves (loss and metrics per epoch), drawn with Pillow: no plotting library needed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
)


def plot(
    path: Path, series: Mapping[str, Sequence[float]], *, title: str = "", width: int = 720, height: int = 360
) -> Path:
    """One panel per group: losses (left, own scale) and metrics in [0, 1] (right)."""
    losses = {k: v for k, v in series.items() if "loss" in k}
    others = {k: v for k, v in series.items() if "loss" not in k}
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 5), title, fill="black")
    panels = [(losses, "loss"), (others, "metrics")]
    panel_w = (width - 30) // 2
    for i, (group, name) in enumerate(panels):
        x0, y0, x1, y1 = 20 + i * (panel_w + 10), 30, 20 + i * (panel_w + 10) + panel_w - 10, height - 60
        draw.rectangle((x0, y0, x1, y1), outline=(180, 180, 180))
        draw.text((x0 + 4, y0 + 2), name, fill="black")
        values = [v for s in group.values() for v in s if v == v]
        if not values:
            continue
        low, high = (
            (0.0, 1.0)
            if name == "metrics" and min(values) >= 0 and max(values) <= 1
            else (min(values), max(values))
        )
        if high - low < 1e-9:
            high = low + 1.0
        draw.text((x0 + 4, y1 - 12), f"{low:.3g}", fill=(90, 90, 90))
        draw.text((x0 + 4, y0 + 14), f"{high:.3g}", fill=(90, 90, 90))
        for j, (key, s) in enumerate(sorted(group.items())):
            colour = COLOURS[j % len(COLOURS)]
            points = [
                (
                    x0 + 5 + (x1 - x0 - 10) * (k / max(1, len(s) - 1)),
                    y1 - 5 - (y1 - y0 - 25) * ((v - low) / (high - low)),
                )
                for k, v in enumerate(s)
                if v == v
            ]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for px, py in points:
                draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
            draw.text((x0 + 4 + (j % 2) * (panel_w // 2), y1 + 6 + (j // 2) * 12), key, fill=colour)
    img.save(path, format="PNG")
    return path
