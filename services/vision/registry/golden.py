"""Golden outputs and the promotion gate.

At registration a few real photos are run through the version's own ONNX export with the same decode and
preprocessing the services use, and what came out is stored with the version: the images themselves
(`golden/NN-name.png`, so the gate needs nothing but the artifacts), every vector output
(`golden/outputs.npz`: logits when the model has a head, embedding always), and what a caller would see
(`golden/golden.json`: top-1 per image and, for a model that can tag, the tag set).

The gate runs the same images through the loaded version (any engine: onnxruntime, torch, Triton) and
passes only when every image gives the recorded answer:
- top-1 equal (a different top-1 is forgiven only when the recorded scores of the two classes are within
  the tolerance: a tie), and every recorded output within `tolerance` (max |new - recorded|, relative to
  the output's scale, at least 1);
- tag sets equal, except a tag whose score is within `tag_margin` of its threshold (a borderline tag can
  flip with float rounding between engines).
Engines running the same weights agree to about 1e-5 here; the default tolerance is 1e-3.

A version in another precision (an int8 export registered `--expect-like` its float version) cannot meet
that tolerance by design. Its golden set carries `min_top1_agreement` instead: the gate then passes when the
share of golden images whose top-1 equals the recorded float top-1 reaches it (0.99 by default: with a
handful of golden images, every one), and reports top-5 overlap and softmax KL divergence alongside.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vision.core.errors import ConfigurationError
from vision.models.signature import EMBEDDING, LOGITS
from vision.tasks.tagging import tagger_of

if TYPE_CHECKING:
    from vision.media.imaging import Preset
    from vision.models.card import ModelCard
    from vision.serving.repository import ServedModel
    from vision.tasks.tagging import Tagger

GOLDEN_DIR = "golden"
GOLDEN_JSON = "golden.json"
GOLDEN_OUTPUTS = "outputs.npz"
DEFAULT_TOLERANCE = 1e-3
DEFAULT_TAG_MARGIN = 1e-3
# scikit-image's sample photos with known ImageNet answers (espresso, tabby, missile, moped): the default
# golden set when registering. scikit-image is a dev dependency; --golden FILE works without it.
DEFAULT_PHOTOS = ("coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png")
# Stored downscaled (shorter side) as PNG: every preset resizes to 256 or less before cropping, and PNG
# decodes the same everywhere (JPEG decoders may differ in the last bit).
STORED_SHORTER_SIDE = 320


class GateFailed(ConfigurationError):
    """A version whose answers on its golden images differ from the recorded ones: it must not serve."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        shown = "; ".join(self.problems[:4]) + (f"; ... ({len(self.problems)} problems)" if len(self.problems) > 4 else "")
        super().__init__(f"golden outputs differ: {shown}")


@dataclass
class Golden:
    """The golden set of one version."""

    images: list[tuple[str, bytes]]
    # Output name -> (n_images, ...) float32, as recorded.
    outputs: dict[str, np.ndarray]
    top1: list[int] | None = None
    # Per image: (label index, score) of each tag, for models that can tag.
    tags: list[list[tuple[int, float]]] | None = None
    tolerance: float = DEFAULT_TOLERANCE
    tag_margin: float = DEFAULT_TAG_MARGIN
    # Where the expected outputs come from: "self" (this version's export) or "NAME/VERSION" (expect_like).
    reference: str = "self"
    # Set for a version in a lower precision than its reference: top-1 agreement replaces the tolerance.
    min_top1_agreement: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, root: Path) -> list[Path]:
        """Write under `root/golden/`; returns the files written."""
        folder = root / GOLDEN_DIR
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        names = []
        for i, (name, data) in enumerate(self.images):
            path = folder / f"{i:02d}-{Path(name).stem}.png"
            path.write_bytes(data)
            names.append(path.name)
            written.append(path)
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v, dtype=np.float32) for k, v in self.outputs.items()})
        (folder / GOLDEN_OUTPUTS).write_bytes(buf.getvalue())
        written.append(folder / GOLDEN_OUTPUTS)
        doc = {
            "images": names,
            "outputs": sorted(self.outputs),
            "top1": self.top1,
            "tags": [[[i, s] for i, s in row] for row in self.tags] if self.tags is not None else None,
            "tolerance": self.tolerance,
            "tag_margin": self.tag_margin,
            "reference": self.reference,
            **({"min_top1_agreement": self.min_top1_agreement} if self.min_top1_agreement is not None else {}),
            **self.meta,
        }
        (folder / GOLDEN_JSON).write_text(json.dumps(doc, indent=2) + "\n")
        written.append(folder / GOLDEN_JSON)
        return written

    @classmethod
    def load(cls, root: Path) -> "Golden":
        folder = root / GOLDEN_DIR
        try:
            doc = json.loads((folder / GOLDEN_JSON).read_text())
            with np.load(folder / GOLDEN_OUTPUTS) as npz:
                outputs = {k: npz[k] for k in npz.files}
            # Stored as NN-name.png; the name without the position prefix is the image's name.
            images = [(name.split("-", 1)[-1], (folder / name).read_bytes()) for name in doc["images"]]
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigurationError(f"golden set under {folder} is unreadable: {exc}") from None
        known = ("images", "outputs", "top1", "tags", "tolerance", "tag_margin", "reference", "min_top1_agreement")
        extra = {k: v for k, v in doc.items() if k not in known}
        return cls(
            images=images,
            outputs=outputs,
            top1=doc.get("top1"),
            tags=[[(int(i), float(s)) for i, s in row] for row in doc["tags"]] if doc.get("tags") is not None else None,
            tolerance=float(doc.get("tolerance", DEFAULT_TOLERANCE)),
            tag_margin=float(doc.get("tag_margin", DEFAULT_TAG_MARGIN)),
            reference=str(doc.get("reference", "self")),
            min_top1_agreement=float(doc["min_top1_agreement"]) if doc.get("min_top1_agreement") is not None else None,
            meta=extra,
        )


def default_images() -> list[tuple[str, bytes]]:
    """scikit-image's sample photos (a dev dependency): the golden images when none are given."""
    try:
        import skimage.data
    except ImportError:
        raise ConfigurationError(
            "no golden images given and scikit-image (whose sample photos are the default) is not installed: "
            "pass --golden FILE (repeatable) with a few real photos"
        ) from None
    folder = Path(skimage.data.__file__).parent
    return [(name, (folder / name).read_bytes()) for name in DEFAULT_PHOTOS]


def prepare_images(images: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Decode each image (EXIF applied, RGB), cap its shorter side, store as PNG. Refuses unreadable files."""
    from PIL import Image

    from vision.media.imaging import decode_image

    if not images:
        raise ConfigurationError("a golden set needs at least one image")
    prepared = []
    for name, data in images:
        try:
            img = decode_image(data)
        except Exception as exc:  # InvalidImage and friends: say which file
            raise ConfigurationError(f"golden image {name}: {exc}") from None
        shorter = min(img.size)
        if shorter > STORED_SHORTER_SIDE:
            scale = STORED_SHORTER_SIDE / shorter
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        prepared.append((name, buf.getvalue()))
    return prepared


def batch(images: Sequence[tuple[str, bytes]], preset: "Preset") -> np.ndarray:
    """The golden images as the services feed them: decoded, resized, centre-cropped, normalised."""
    from vision.media.imaging import load_image

    return np.stack([load_image(data, preset) for _, data in images]).astype(np.float32)


def gate_outputs(card: "ModelCard") -> tuple[str, ...]:
    """The vector outputs recorded and compared: logits (when the model has a head) and the embedding."""
    return tuple(name for name in (LOGITS, EMBEDDING) if name in card.signature.outputs)


def record(
    images: Sequence[tuple[str, bytes]], outputs: dict[str, np.ndarray], card: "ModelCard", *, tolerance: float = DEFAULT_TOLERANCE
) -> Golden:
    """The golden set of `card` from the outputs its export gave on `images` (already prepared)."""
    logits = outputs.get(LOGITS)
    top1 = [int(i) for i in np.argmax(logits, axis=1)] if logits is not None else None
    tags = _tags(tagger, logits) if logits is not None and (tagger := tagger_of(card)) is not None else None
    return Golden(images=list(images), outputs={k: np.asarray(v, np.float32) for k, v in outputs.items()}, top1=top1,
                  tags=tags, tolerance=tolerance)


def _tags(tagger: "Tagger", logits: np.ndarray) -> list[list[tuple[int, float]]]:
    return [[(t.index, float(t.score)) for t in row] for row in tagger.tag(np.asarray(logits, np.float32))]


def compare(golden: Golden, outputs: dict[str, np.ndarray], tagger: "Tagger | None" = None) -> list[str]:
    """Why `outputs` (of the golden images) do not match the golden set; empty when they do."""
    if golden.min_top1_agreement is not None:
        return _compare_agreement(golden, outputs)
    problems: list[str] = []  # outputs off tolerance
    answers: list[str] = []  # what a caller would see differ: top-1, tags (listed first)
    names = [name for name, _ in golden.images]
    for key, want in golden.outputs.items():
        got = outputs.get(key)
        if got is None:
            problems.append(f"output {key!r} is missing")
            continue
        got = np.asarray(got, dtype=np.float32)
        if got.shape != want.shape:
            problems.append(f"output {key!r} has shape {got.shape}, recorded {want.shape}")
            continue
        for i in range(want.shape[0]):
            scale = max(1.0, float(np.abs(want[i]).max()))
            diff = float(np.abs(got[i] - want[i]).max()) / scale
            if not np.isfinite(diff) or diff > golden.tolerance:
                problems.append(f"{names[i]}: {key} differs by {diff:.3g} (tolerance {golden.tolerance:g})")
    logits = outputs.get(LOGITS)
    if golden.top1 is not None and logits is not None and np.shape(logits)[0] == len(golden.top1):
        recorded = golden.outputs.get(LOGITS)
        for i, (want_top, row) in enumerate(zip(golden.top1, np.asarray(logits), strict=True)):
            got_top = int(np.argmax(row))
            if got_top == want_top:
                continue
            tie = recorded is not None and abs(float(recorded[i][got_top] - recorded[i][want_top])) <= golden.tolerance
            if not tie:
                answers.append(f"{names[i]}: top-1 is class {got_top}, recorded {want_top}")
    if golden.tags is not None and tagger is not None and logits is not None:
        thresholds = tagger.thresholds.per_label
        for i, (want_tags, got_tags) in enumerate(zip(golden.tags, _tags(tagger, logits), strict=True)):
            want_map, got_map = dict(want_tags), dict(got_tags)
            flipped = [
                idx for idx in set(want_map) ^ set(got_map)
                if (want_map.get(idx, got_map.get(idx, 0.0)) - float(thresholds[idx])) > golden.tag_margin
            ]
            if flipped:
                answers.append(f"{names[i]}: tag set differs in labels {sorted(flipped)[:8]}")
    return answers + problems


def _compare_agreement(golden: Golden, outputs: dict[str, np.ndarray]) -> list[str]:
    from vision.evaluation.agreement import agreement

    want, got = golden.outputs.get(LOGITS), outputs.get(LOGITS)
    if want is None:
        return ["an agreement gate needs recorded logits (the reference has no classifier head)"]
    if got is None or np.shape(got) != want.shape:
        return [f"output 'logits' is missing or has shape {np.shape(got)}, recorded {want.shape}"]
    if not np.isfinite(got).all():
        return ["logits are not finite"]
    result = agreement(want, np.asarray(got, np.float32), [name for name, _ in golden.images])
    if result.top1_agreement >= golden.min_top1_agreement:  # type: ignore[operator]
        return []
    changed = "; ".join(f"{name}: top-1 is class {new}, {golden.reference} says {old}" for name, old, new in result.changed[:4])
    return [f"{result.summary()} against {golden.reference}, below the required {golden.min_top1_agreement:.0%}: {changed}"]


async def gate(model: "ServedModel", golden: Golden) -> None:
    """Run the golden images through a started (not yet published) version; GateFailed when it disagrees."""
    import asyncio

    card = model.card
    wanted = tuple(k for k in golden.outputs if k in card.signature.outputs)
    missing = sorted(set(golden.outputs) - set(wanted))
    if missing:
        raise GateFailed([f"the model has no output {m!r}" for m in missing])
    inputs = await asyncio.to_thread(batch, golden.images, card.preset)
    try:
        outputs = await model.infer(inputs, wanted)
    except Exception as exc:  # any engine failure on the golden batch refuses the version
        raise GateFailed([f"inference on the golden images failed: {exc}"]) from None
    problems = compare(golden, dict(outputs), tagger_of(card))
    if problems:
        raise GateFailed(problems)


def check_with_onnx(onnx_path: Path, golden: Golden, card: "ModelCard") -> list[str]:
    """The gate run offline on the version's ONNX export with onnxruntime (`vision registry verify`)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [k for k in golden.outputs if k in {o.name for o in session.get_outputs()}]
    values = session.run(names, {session.get_inputs()[0].name: batch(golden.images, card.preset)})
    return compare(golden, dict(zip(names, values, strict=True)), tagger_of(card))


def run_onnx(onnx_path: Path, images: Sequence[tuple[str, bytes]], card: "ModelCard") -> dict[str, np.ndarray]:
    """The vector outputs of the ONNX export on `images` (what registration records)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = list(gate_outputs(card))
    values = session.run(names, {session.get_inputs()[0].name: batch(images, card.preset)})
    return dict(zip(names, values, strict=True))
