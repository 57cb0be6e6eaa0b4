"""DELF extraction: an image pyramid's feature maps and attention scores → keypoints and local descriptors.

Pure numpy (no gRPC, no model). Defaults are the reference DELF configuration of tensorflow/models
research/delf, checked 2026-11 with the search tool against `delf/python/examples/delf_config_example.pbtxt`,
`delf/protos/delf_config.proto` and `delf/python/feature_extractor.py` / `examples/extractor.py`:

- pyramid scales 0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0 of the input (`image_scales`), the image's
  longer side first capped at 1024 (`max_image_size`: -1 = no cap by default, 1024 in the reference's
  DELG configs such as `delg/r50delg_gld_config.pbtxt`; here a per-model setting a request may only lower);
- per level, every feature-map cell scoring ≥ `score_threshold` (100 for trained attention, the
  reference's; a per-model setting) is a candidate; its location is the centre of its receptive box
  (`CalculateReceptiveBoxes`, `CalculateKeypointCenters`), mapped back to the original image;
- across levels the `max_feature_num` = 1000 best scores are kept. The reference runs NMS with
  `iou_threshold` 1.0, i.e. none; `nms_iou` < 1 turns on its box NMS over the receptive boxes;
- descriptors: L2-normalised, PCA to 40 dimensions (`pca_dim`; whitening off, `use_whitening`), L2-normalised
  again (`DelfFeaturePostProcessing`, `ApplyPcaAndWhitening`); without a fitted PCA they keep the map's
  width;
- a keypoint's scale is 1 / its level's scale (`feature_scales`): its receptive box spans
  receptive_field × scale original pixels;
- images smaller than 10 px return no features (`_MIN_HEIGHT`/`_MIN_WIDTH` of `extractor.py`); here, so
  does an image that stays smaller than the layer's receptive field at the largest level of its pyramid
  (its longer side after the cap × the largest scale: a 120-px thumbnail for ResNet-50 layer3's 267 px with
  the default pyramid up to 2×): every cell would see the whole image and mostly padding around it.

Scores without trained attention (a plain backbone such as the embedded EfficientNet-Lite0): each cell's
feature L2 norm — a common attention-free proxy for how strongly a cell responds — times the fraction of
its receptive box inside the image (`fallback_scores`: pretrained backbones answer zero padding with large
activations, and plain norms put a fifth of the keypoints on image borders). The default threshold is then
0: the best `max_keypoints` are kept.

Locations: (x, y) in pixels of the original (EXIF-upright) image, x = column, (0, 0) the centre of the
top-left pixel. The reference divides a level's coordinates by the nominal scale; here each axis uses its
exact resize factor and pixel centres, ((x_level + 0.5) · W / W_level − 0.5), which differs by at most a
few pixels and is exact for the image the model saw.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vision.core.errors import ConfigurationError, InvalidArgument, ResourceExhausted
from vision.core.wire import MAX_MESSAGE_BYTES
from vision.media.views import ViewSpec, capped_size
from vision.models.card import DELF as TASK
from vision.models.signature import ATTENTION, FeatureLayer, Signature
from vision.tasks.features import l2_normalize

if TYPE_CHECKING:
    from vision.models.card import ModelCard
    from vision.tasks.contract import ViewOutputs


REFERENCE_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
MAX_KEYPOINTS = 1000
REFERENCE_SCORE_THRESHOLD = 100.0
# With the L2-norm fallback every cell competes; the top `max_keypoints` by norm are kept.
FALLBACK_SCORE_THRESHOLD = 0.0
MAX_IMAGE_SIDE = 1024
PCA_DIM = 40
# Images (after the cap) with a side under this give no features (reference extractor.py _MIN_HEIGHT/_WIDTH).
MIN_IMAGE_SIDE = 10
# Request bounds: pyramid levels, keypoints, and the largest level relative to the cap (2 = the reference's
# largest scale at the cap), which bounds the memory of one forward pass.
MAX_SCALES = 12
MAX_KEYPOINTS_LIMIT = 10_000
MAX_LEVEL_FACTOR = 2.0
# vision.runners.server sends at most 64 MiB per response; what a request could need is checked before any work
# (1000 keypoints of 1024-d descriptors without PCA are 4 MiB per image).
MAX_RESPONSE_BYTES = MAX_MESSAGE_BYTES
# Per keypoint on the wire besides its descriptor: four floats and their field tags.
_KEYPOINT_BYTES = 24
# Any image down to 1 px is accepted: under the platform's decode minimum it gets no forward pass and no
# features, as the reference extractor answers images under 10 px.
TINY_SIDE = 1


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DelfFeatures:
    """An image's DELF features: N keypoints, best score first."""

    width: int
    height: int
    # (N, 2) float32: x (column), y (row) in original-image pixels.
    locations: np.ndarray
    # (N,) float32: 1 / the pyramid scale the keypoint was found at (relative to the original image).
    scales: np.ndarray
    # (N,) float32: attention score (or feature L2 norm for models without attention).
    scores: np.ndarray
    # (N, D) float32, L2-normalised rows.
    descriptors: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls, width: int, height: int, dim: int) -> "DelfFeatures":
        return cls(
            width, height, np.zeros((0, 2), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32),
            np.zeros((0, dim), np.float32),
        )


# --------------------------------------------------------------------------------------
# PCA of descriptors (an artifact stored with the model; `vision fit-delf-pca` writes it)
# --------------------------------------------------------------------------------------

_PCA_KEYS = ("mean", "components", "variances", "whiten", "meta")


@dataclass(frozen=True, eq=False)
class DescriptorPca:
    """Projection of L2-normalised descriptors onto their `dim` principal axes, optionally whitened
    (divided by the axes' standard deviations), as the reference's `ApplyPcaAndWhitening`."""

    # (D,) mean of the fitted descriptors.
    mean: np.ndarray
    # (K, D): principal axes as rows, largest variance first.
    components: np.ndarray
    # (K,): variance along each axis.
    variances: np.ndarray
    whiten: bool = False
    # What it was fitted on (model, layer, images, descriptors); informative.
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def input_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def apply(self, descriptors: np.ndarray) -> np.ndarray:
        projected = (descriptors - self.mean) @ self.components.T
        if self.whiten:
            projected /= np.sqrt(self.variances + 1e-12)
        return projected.astype(np.float32, copy=False)

    def save(self, path: Path) -> None:
        with open(path, "wb") as out:  # np.savez would append ".npz" to a name without it
            np.savez(
                out, mean=self.mean, components=self.components, variances=self.variances,
                whiten=np.array(self.whiten), meta=json.dumps(self.meta),
            )

    @classmethod
    def load(cls, path: Path) -> "DescriptorPca":
        if not Path(path).is_file():
            raise ConfigurationError(f"DELF PCA file {path} does not exist (write one with `vision fit-delf-pca`)")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in _PCA_KEYS if k not in data]
                if missing:
                    raise ConfigurationError(f"DELF PCA file {path} lacks {missing}; was it written by `vision fit-delf-pca`?")
                mean = data["mean"].astype(np.float32)
                components = data["components"].astype(np.float32)
                variances = data["variances"].astype(np.float32)
                whiten, meta = bool(data["whiten"]), json.loads(str(data["meta"]))
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"DELF PCA file {path} is not readable: {exc}") from None
        if (
            mean.ndim != 1 or components.ndim != 2 or components.shape[1] != mean.shape[0]
            or variances.shape != (components.shape[0],) or not components.shape[0]
            or not all(np.isfinite(a).all() for a in (mean, components, variances)) or (variances < 0).any()
        ):
            raise ConfigurationError(
                f"DELF PCA file {path} is inconsistent: mean {mean.shape}, components {components.shape}, "
                f"variances {variances.shape}"
            )
        return cls(mean, components, variances, whiten, meta, str(path))


def fit_pca(descriptors: np.ndarray, dim: int = PCA_DIM, *, whiten: bool = False, **meta: Any) -> DescriptorPca:
    """PCA of (N, D) L2-normalised descriptors: the top `dim` eigenvectors of their covariance."""
    n, d = descriptors.shape
    if not 1 <= dim <= d:
        raise ValueError(f"PCA dimension must be between 1 and the descriptor width {d}, got {dim}")
    if n <= dim:
        raise ValueError(f"{n} descriptors cannot fit a {dim}-dimensional PCA; extract from more images")
    data = descriptors.astype(np.float64)
    mean = data.mean(axis=0)
    covariance = np.cov(data - mean, rowvar=False)
    values, vectors = np.linalg.eigh(covariance)  # ascending
    order = np.argsort(values)[::-1][:dim]
    components = vectors[:, order].T
    # A deterministic sign per axis (eigh's is arbitrary): the largest-magnitude coefficient positive.
    signs = np.sign(components[np.arange(dim), np.abs(components).argmax(axis=1)])
    components *= signs[:, None]
    return DescriptorPca(
        mean.astype(np.float32), components.astype(np.float32), np.clip(values[order], 0, None).astype(np.float32),
        whiten, {"descriptors": n, "input_dim": d, "dim": dim, **meta},
    )


# --------------------------------------------------------------------------------------
# Per served model
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DelfModel:
    """How a served model extracts DELF features (built once at load; ModelCard.delf)."""

    layer: FeatureLayer
    # Name of the attention output, or None: scores are the features' L2 norms.
    attention: str | None
    score_threshold: float
    max_image_side: int = MAX_IMAGE_SIDE
    pca: DescriptorPca | None = None

    @property
    def scoring(self) -> str:
        return "attention" if self.attention else "l2_norm"

    @property
    def descriptor_dim(self) -> int:
        return self.pca.dim if self.pca is not None else self.layer.channels

    def output_dim(self, options: "ExtractOptions") -> int:
        return self.layer.channels if options.skip_pca else self.descriptor_dim


def default_layer(signature: Signature) -> FeatureLayer | None:
    """The map DELF reads by default: the one beside an attention output (same stride), else the
    shallowest stride-16 map with known receptive field (the paper's conv4_x: ResNet layer3,
    EfficientNet-Lite0 blocks.4)."""
    usable = [layer for layer in signature.layers if layer.receptive_field and layer.name != ATTENTION]
    if signature.is_map(ATTENTION):
        stride = signature.layer(ATTENTION).stride
        usable = [layer for layer in usable if layer.stride == stride]
    else:
        usable = [layer for layer in usable if layer.stride == 16]
    return usable[0] if usable else None


def load_delf_model(
    model: str,
    signature: Signature,
    *,
    layer: str | None = None,
    score_threshold: float | None = None,
    max_image_side: int | None = None,
    pca: Path | None = None,
) -> DelfModel | None:
    """The DELF record of a served model, or None when the model cannot extract DELF features (and no
    DELF setting asked it to). Bad settings are ConfigurationErrors naming the model."""
    asked = any(v is not None for v in (layer, score_threshold, max_image_side, pca))
    if layer is not None:
        if not signature.is_map(layer) or layer == ATTENTION:
            maps = [m.name for m in signature.layers if m.name != ATTENTION]
            raise ConfigurationError(f"model {model!r}: delf_layer {layer!r} is not one of its feature maps {maps}")
        chosen: FeatureLayer | None = signature.layer(layer)
        if not chosen.receptive_field:  # type: ignore[union-attr]
            raise ConfigurationError(f"model {model!r}: layer {layer!r} declares no receptive field; DELF needs one")
    else:
        chosen = default_layer(signature)
    if chosen is None:
        if asked:
            raise ConfigurationError(f"model {model!r} has no feature map DELF can use (stride 16 with a receptive field)")
        return None
    attention = None
    if signature.is_map(ATTENTION) and signature.layer(ATTENTION).stride == chosen.stride:
        attention = ATTENTION
    if score_threshold is None:
        score_threshold = REFERENCE_SCORE_THRESHOLD if attention else FALLBACK_SCORE_THRESHOLD
    if not math.isfinite(score_threshold):
        raise ConfigurationError(f"model {model!r}: delf_score_threshold must be a finite number")
    if max_image_side is not None and max_image_side * MAX_LEVEL_FACTOR < chosen.receptive_field:
        raise ConfigurationError(
            f"model {model!r}: delf_max_side {max_image_side} is under half the {chosen.receptive_field}-px receptive "
            f"field of {chosen.name!r}; even the largest pyramid level (2x) could give no keypoints"
        )
    fitted = DescriptorPca.load(pca) if pca is not None else None
    if fitted is not None and fitted.input_dim != chosen.channels:
        raise ConfigurationError(
            f"model {model!r}: PCA file {pca} was fitted on {fitted.input_dim}-d descriptors, but layer "
            f"{chosen.name!r} has {chosen.channels} channels"
        )
    return DelfModel(chosen, attention, float(score_threshold), max_image_side or MAX_IMAGE_SIDE, fitted)


# --------------------------------------------------------------------------------------
# Request options
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractOptions:
    """Per-request knobs; None = the model's setting. Invalid values raise InvalidArgument naming them."""

    scales: tuple[float, ...] = REFERENCE_SCALES
    max_keypoints: int = MAX_KEYPOINTS
    score_threshold: float | None = None
    max_image_side: int | None = None
    # Box NMS over receptive boxes; 1.0 = off (the reference).
    nms_iou: float = 1.0
    # Descriptors before the model's PCA (to fit one).
    skip_pca: bool = False

    def __post_init__(self) -> None:
        if not 1 <= len(self.scales) <= MAX_SCALES:
            raise InvalidArgument(f"scales: give between 1 and {MAX_SCALES} pyramid scales, got {len(self.scales)}")
        if any(not math.isfinite(s) or not 0 < s <= 4 for s in self.scales):
            raise InvalidArgument(f"scales: each scale must be in (0, 4], got {list(self.scales)}")
        if not 1 <= self.max_keypoints <= MAX_KEYPOINTS_LIMIT:
            raise InvalidArgument(f"max_keypoints must be between 1 and {MAX_KEYPOINTS_LIMIT}, got {self.max_keypoints}")
        if self.score_threshold is not None and not math.isfinite(self.score_threshold):
            raise InvalidArgument(f"score_threshold must be a finite number, got {self.score_threshold}")
        if self.max_image_side is not None and self.max_image_side < MIN_IMAGE_SIDE:
            raise InvalidArgument(f"max_image_side must be at least {MIN_IMAGE_SIDE}, got {self.max_image_side}")
        if not 0 < self.nms_iou <= 1:  # also false for NaN
            raise InvalidArgument(f"nms_iou must be in (0, 1] (1 = no suppression), got {self.nms_iou}")


@dataclass(frozen=True)
class ExtractParams:
    options: ExtractOptions
    # How many images the request carries: bounds the size of its answer before any work.
    images: int


def delf_of(card: "ModelCard") -> DelfModel:
    model = card.artifacts.get(TASK)
    if model is None:  # the repository only hands out DELF-capable models for this task
        raise InvalidArgument(f"model {card.name!r} cannot extract DELF features")
    return model


def check_response_size(model: DelfModel, images: int, options: ExtractOptions) -> None:
    """Refuse, before any work, a request whose answer could exceed what the server may send."""
    dim = model.output_dim(options)
    worst = images * options.max_keypoints * (4 * dim + _KEYPOINT_BYTES)
    if worst > MAX_RESPONSE_BYTES:
        raise ResourceExhausted(
            f"{images} images of up to {options.max_keypoints} keypoints with {dim}-d descriptors could need "
            f"{worst / 2**20:.0f} MiB, over the {MAX_RESPONSE_BYTES // 2**20} MiB response limit; send fewer images "
            "per request, lower max_keypoints, or serve the model with a PCA (delf_pca)"
        )


def image_side(model: DelfModel, options: ExtractOptions) -> int:
    """The cap of the longer side for a request: the model's, or the request's when lower."""
    if options.max_image_side is not None and options.max_image_side > model.max_image_side:
        raise InvalidArgument(
            f"max_image_side {options.max_image_side} is over this model's cap of {model.max_image_side}"
        )
    return options.max_image_side or model.max_image_side


def level_sizes(size: tuple[int, int], side: int, scales: Sequence[float]) -> list[tuple[int, int]]:
    """(width, height) of each pyramid level, exactly as `vision.media.views.full_views` cuts them."""
    base_w, base_h = capped_size(size, 0, side)
    return [(max(1, round(base_w * s)), max(1, round(base_h * s))) for s in scales]


# --------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------



def box_nms(boxes: np.ndarray, order: np.ndarray, iou: float, limit: int) -> np.ndarray:
    """Greedy NMS: walk `order` (best first), keep a box unless it overlaps a kept one by IoU > `iou`.
    `boxes` (N, 4) as x0, y0, x1, y1. Returns the kept indices, best first, at most `limit`."""
    x0, y0, x1, y1 = boxes.T
    area = (x1 - x0) * (y1 - y0)
    alive = np.ones(len(boxes), dtype=bool)
    kept: list[int] = []
    for i in order:
        if not alive[i]:
            continue
        kept.append(int(i))
        if len(kept) == limit:
            break
        w = np.clip(np.minimum(x1, x1[i]) - np.maximum(x0, x0[i]), 0, None)
        h = np.clip(np.minimum(y1, y1[i]) - np.maximum(y0, y0[i]), 0, None)
        inter = w * h
        overlap = inter / np.maximum(area + area[i] - inter, 1e-12)
        alive &= overlap <= iou
    return np.asarray(kept, dtype=np.int64)


def inside_fraction(layer: FeatureLayer, cells: int, side: int) -> np.ndarray:
    """Per cell along one axis of a `side`-pixel input: the fraction of its receptive box inside the image."""
    start = layer.stride * np.arange(cells) - layer.padding
    end = start + layer.receptive_field
    return np.clip(np.minimum(end, side) - np.maximum(start, 0), 0, None) / layer.receptive_field


def fallback_scores(layer: FeatureLayer, fmap: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scores without trained attention: each cell's feature L2 norm times the fraction of its receptive
    box that lies inside the (width x height) level. The discount removes the zero-padding artifact of
    pretrained backbones: on a blank image EfficientNet-Lite0's border cells have 2-3x the interior norm,
    so plain norms put ~20 % of keypoints on image borders, where unrelated images then match each other."""
    _, h, w = fmap.shape
    norms = np.sqrt(np.einsum("chw,chw->hw", fmap, fmap))
    return norms * np.outer(inside_fraction(layer, h, height), inside_fraction(layer, w, width))


def extract_image(
    model: DelfModel,
    options: ExtractOptions,
    size: tuple[int, int],
    maps: Sequence[np.ndarray],
    attention: Sequence[np.ndarray] | None,
) -> DelfFeatures:
    """One image's features from its per-level feature maps (C, h, w) and attention maps (1, h, w), in the
    order of `options.scales`."""
    width, height = size
    layer = model.layer
    side = image_side(model, options)
    sizes = level_sizes(size, side, options.scales)
    base_w, base_h = capped_size(size, 0, side)
    if min(base_w, base_h) < MIN_IMAGE_SIDE or max(base_w, base_h) * max(options.scales) < layer.receptive_field:
        return DelfFeatures.empty(width, height, model.output_dim(options))
    threshold = options.score_threshold if options.score_threshold is not None else model.score_threshold
    xs_all, ys_all, scores_all, level_all, cell_all, scale_all, half_all = [], [], [], [], [], [], []
    for level, ((lw, lh), fmap) in enumerate(zip(sizes, maps, strict=True)):
        channels, h, w = fmap.shape
        if (h, w) != (math.ceil(lh / layer.stride), math.ceil(lw / layer.stride)):
            raise RuntimeError(
                f"level {level}: a {lw}x{lh} input gave a {w}x{h} map of {layer.name!r} (stride {layer.stride}); "
                "the view and the task disagree on the level size"
            )
        score = attention[level][0] if attention is not None else fallback_scores(layer, fmap, lw, lh)
        cells = np.flatnonzero(score.ravel() >= threshold)
        if not len(cells):
            continue
        rows, cols = np.divmod(cells, w)
        fx, fy = width / lw, height / lh
        xs_all.append((layer.centre(cols) + 0.5) * fx - 0.5)
        ys_all.append((layer.centre(rows) + 0.5) * fy - 0.5)
        scores_all.append(score.ravel()[cells])
        level_all.append(np.full(len(cells), level))
        cell_all.append(cells)
        scale_all.append(np.full(len(cells), max(width, height) / max(lw, lh)))
        half_all.append(np.full(len(cells), layer.receptive_field / 2 * max(fx, fy)))
    if not scores_all:
        return DelfFeatures.empty(width, height, model.output_dim(options))
    xs, ys = np.concatenate(xs_all), np.concatenate(ys_all)
    scores = np.concatenate(scores_all).astype(np.float32)
    levels, cells = np.concatenate(level_all), np.concatenate(cell_all)
    # Best score first; ties keep pyramid and raster order (a stable sort).
    order = np.argsort(-scores, kind="stable")
    if options.nms_iou < 1.0:
        half = np.concatenate(half_all)
        boxes = np.stack([xs - half, ys - half, xs + half, ys + half], axis=1)
        chosen = box_nms(boxes, order, options.nms_iou, options.max_keypoints)
    else:
        chosen = order[: options.max_keypoints]
    descriptors = np.empty((len(chosen), layer.channels), dtype=np.float32)
    for level in np.unique(levels[chosen]):
        rows = np.flatnonzero(levels[chosen] == level)
        fmap = maps[level]
        descriptors[rows] = fmap.reshape(fmap.shape[0], -1)[:, cells[chosen[rows]]].T
    descriptors = l2_normalize(descriptors)
    if model.pca is not None and not options.skip_pca:
        descriptors = l2_normalize(model.pca.apply(descriptors))
    return DelfFeatures(
        width,
        height,
        np.stack([xs[chosen], ys[chosen]], axis=1).astype(np.float32),
        np.concatenate(scale_all)[chosen].astype(np.float32),
        scores[chosen],
        descriptors,
    )


class DelfExtraction:
    """The data plane's task: views = the pyramid, outputs = the DELF map (+ attention)."""

    name = TASK

    def validate(self, card: "ModelCard", params: ExtractParams) -> ExtractParams:
        model = delf_of(card)
        check_response_size(model, params.images, params.options)
        side = image_side(model, params.options)
        largest = side * max(params.options.scales)
        if largest > MAX_LEVEL_FACTOR * model.max_image_side:
            raise InvalidArgument(
                f"scales: the largest pyramid level would be {largest:.0f} px on its longer side, over this "
                f"model's limit of {MAX_LEVEL_FACTOR * model.max_image_side:.0f}; lower max_image_side or the scales"
            )
        return params

    def views(self, card: "ModelCard", params: ExtractParams) -> ViewSpec:
        side = image_side(delf_of(card), params.options)
        return ViewSpec("full", params.options.scales, max_longer=side, min_side=TINY_SIDE)

    def outputs(self, card: "ModelCard", params: ExtractParams) -> tuple[str, ...]:
        model = delf_of(card)
        return (model.layer.name, model.attention) if model.attention else (model.layer.name,)

    def postprocess(self, card: "ModelCard", outputs: "ViewOutputs", params: ExtractParams) -> list[DelfFeatures]:
        model = delf_of(card)
        maps = outputs.per_image(model.layer.name)
        scores = outputs.per_image(model.attention) if model.attention else [None] * len(maps)
        dim = model.output_dim(params.options)
        return [
            # No views: an image under the platform's decode minimum (`TINY_SIDE`).
            extract_image(model, params.options, size, image_maps, image_scores) if image_maps
            else DelfFeatures.empty(*size, dim)
            for size, image_maps, image_scores in zip(outputs.sizes, maps, scores, strict=True)
        ]


DELF_EXTRACTION = DelfExtraction()
