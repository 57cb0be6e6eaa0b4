"""Features: one global descriptor per image, for retrieval, deduplication and clustering.

Recipes (pure numpy over the model's named outputs; no protobuf):

- `center`: the pooled `embedding` of the centre crop.
- `ten_crop`: the mean `embedding` of torchvision's ten crops (corners + centre, and their mirror), as
  Tencent ML-Images' extractor; the ten crops go through the engine as one batch.
- `spoc` (sum), `avg`, `mac` (max), `gem` (generalised mean, Radenović et al.): pooling of a feature map
  at full resolution (aspect kept, shorter side capped).
- `rmac`: regional MAC (Tolias et al., ICLR 2016): max-pooled square regions at 3 scales overlapping by
  about 40 %, each L2-normalised, summed with the global MAC.
- `crow`: cross-dimensional weighting (Kalantidis et al., ECCV 2016 workshops): spatial weights from the
  channel-summed activations, channel weights from per-channel sparsity (IDF-like).

With several `scales`, a pooled recipe extracts at each scale and aggregates the per-scale descriptors
with a generalised mean (p = the GeM exponent for `gem`, else 1), as Radenović et al.'s multi-scale test.
Every descriptor is L2-normalised; an optional PCA-whitening (`Whitening`) is applied after, followed by
another L2 normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vision.core.errors import ConfigurationError, InvalidArgument
from vision.media.views import CENTER, TEN_CROP, ViewSpec
from vision.models.card import FEATURES as TASK
from vision.models.signature import EMBEDDING

if TYPE_CHECKING:
    from vision.models.card import ModelCard
    from vision.tasks.contract import ViewOutputs

CROP_RECIPES = ("center", "ten_crop")
POOLED_RECIPES = ("spoc", "avg", "mac", "gem", "rmac", "crow")
RECIPES = CROP_RECIPES + POOLED_RECIPES
DEFAULT_GEM_P = 3.0
# GeM clamps activations from below: a p-th power of a negative value is undefined (Radenović et al.).
GEM_EPS = 1e-6
# R-MAC: scales of regions, and the overlap of neighbouring regions it aims for (Tolias et al.).
RMAC_LEVELS = 3
RMAC_OVERLAP = 0.4
MAX_SCALES = 5


# --------------------------------------------------------------------------------------
# Pooling of one feature map (C, H, W) -> (C,)
# --------------------------------------------------------------------------------------


def spoc(fmap: np.ndarray) -> np.ndarray:
    """Sum pooling (Babenko & Lempitsky, SPoC)."""
    return fmap.sum(axis=(1, 2))


def avg(fmap: np.ndarray) -> np.ndarray:
    return fmap.mean(axis=(1, 2))


def mac(fmap: np.ndarray) -> np.ndarray:
    """Maximum activation of convolutions: the max over positions per channel."""
    return fmap.max(axis=(1, 2))


def gem(fmap: np.ndarray, p: float = DEFAULT_GEM_P) -> np.ndarray:
    """Generalised mean: (mean of x^p)^(1/p) per channel, x clamped at GEM_EPS; p=1 is AVG, p→∞ is MAX."""
    clamped = np.maximum(fmap, GEM_EPS, dtype=np.float32)
    # Scaled by the channel max before the power so that large p neither overflows nor underflows float32.
    peak = clamped.max(axis=(1, 2), keepdims=True)
    return (peak[:, 0, 0] * np.mean(_power(clamped / peak, p), axis=(1, 2)) ** (1.0 / p)).astype(np.float32)


def _power(x: np.ndarray, p: float) -> np.ndarray:
    """x ** p; small integer exponents (GeM's usual 3) by repeated multiplication, 5x faster than pow."""
    if float(p).is_integer() and 1 <= p <= 8:
        result = x.copy()
        for _ in range(int(p) - 1):
            result *= x
        return result
    return np.power(x, p)


def rmac_regions(height: int, width: int, levels: int = RMAC_LEVELS) -> list[tuple[int, int, int]]:
    """Square regions (top, left, side) of R-MAC on a height x width map.

    Level l (1..levels) uses squares of side floor(2·min(H, W) / (l + 1)), l per short side; along the
    long side the count is l plus an extra m chosen once so that neighbouring regions overlap as close to
    40 % as possible, spread evenly from edge to edge (Tolias et al., section 3).
    """
    short, long_ = min(height, width), max(height, width)
    extra = 0
    if long_ > short:
        # Overlap of two regions of side `short` when m+1 of them cover the long side, for m = 1..6.
        def overlap(m: int) -> float:
            step = (long_ - short) / m
            return (short - step) / short

        extra = min(range(1, 7), key=lambda m: abs(overlap(m) - RMAC_OVERLAP))
    regions = []
    for level in range(1, levels + 1):
        side = math.floor(2 * short / (level + 1))
        if side < 1:
            continue
        count_h = level + (extra if height > width else 0)
        count_w = level + (extra if width > height else 0)
        tops = _spread(height, side, count_h)
        lefts = _spread(width, side, count_w)
        regions.extend((top, left, side) for top in tops for left in lefts)
    return regions


def _spread(length: int, side: int, count: int) -> list[int]:
    """`count` starts of windows of `side` spread evenly over `length`, first at 0, last at length - side."""
    if count == 1:
        return [0]
    step = (length - side) / (count - 1)
    return [min(int(math.floor(i * step)), length - side) for i in range(count)]


def rmac(fmap: np.ndarray, levels: int = RMAC_LEVELS) -> np.ndarray:
    """Sum of the L2-normalised MAC of the whole map and of every R-MAC region."""
    total = _l2(mac(fmap))
    for top, left, side in rmac_regions(fmap.shape[1], fmap.shape[2], levels):
        total = total + _l2(mac(fmap[:, top : top + side, left : left + side]))
    return total


def crow(fmap: np.ndarray) -> np.ndarray:
    """CroW with the paper's defaults (a = 2, b = 2 for the spatial weights)."""
    fmap = np.maximum(fmap, 0.0)  # CroW is defined on ReLU activations
    summed = fmap.sum(axis=0)
    norm = np.sqrt((summed**2).sum())
    spatial = np.sqrt(summed / norm) if norm > 0 else np.zeros_like(summed)
    nonzero = (fmap > 0).reshape(fmap.shape[0], -1).mean(axis=1)
    total = nonzero.sum()
    channel = np.where(nonzero > 0, np.log(total / np.maximum(nonzero, 1e-12)), 0.0) if total > 0 else np.zeros_like(nonzero)
    return (channel * (fmap * spatial).sum(axis=(1, 2))).astype(np.float32)


def _l2(vectors: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norm, 1e-12)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Unit L2 norm along the last axis (zero vectors stay zero)."""
    return _l2(np.asarray(vectors, dtype=np.float32)).astype(np.float32)


# --------------------------------------------------------------------------------------
# Whitening
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Whitening:
    """x -> projection[:dim] @ (x - mean), then L2. Rows of `projection` are ordered by decreasing
    eigenvalue, so truncating keeps the strongest directions."""

    name: str
    mean: np.ndarray
    projection: np.ndarray
    eigenvalues: np.ndarray
    # "pca" (from a set of descriptors) or "learned" (Radenović et al.'s from matching pairs).
    kind: str = "pca"

    @property
    def input_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def max_dim(self) -> int:
        return int(self.projection.shape[0])

    def apply(self, vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
        rows = self.projection[: dim or self.max_dim]
        return l2_normalize((vectors - self.mean) @ rows.T)

    def save(self, path: Path) -> None:
        np.savez(path, mean=self.mean, projection=self.projection, eigenvalues=self.eigenvalues, kind=self.kind)

    @classmethod
    def load(cls, path: Path) -> Whitening:
        try:
            with np.load(path, allow_pickle=False) as data:
                mean, projection = data["mean"].astype(np.float32), data["projection"].astype(np.float32)
                eigenvalues, kind = data["eigenvalues"].astype(np.float32), str(data["kind"])
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigurationError(f"whitening file {path} is not a whitening (.npz with mean, projection, eigenvalues): {exc}") from None
        if projection.ndim != 2 or projection.shape[1] != mean.shape[0]:
            raise ConfigurationError(f"whitening file {path}: projection {projection.shape} does not fit mean {mean.shape}")
        return cls(path.stem, mean, projection, eigenvalues, kind)


def fit_pca_whitening(name: str, descriptors: np.ndarray, dim: int | None = None) -> Whitening:
    """PCA-whitening from L2-normalised descriptors (n, d): scikit-learn's PCA with whiten=True, kept as
    mean + projection (components divided by the square root of their variance)."""
    from sklearn.decomposition import PCA

    descriptors = np.asarray(descriptors, dtype=np.float64)
    n, d = descriptors.shape
    limit = min(n - 1, d)
    if limit < 1:
        raise InvalidArgument(f"fitting a whitening needs at least 2 descriptors, got {n}")
    dim = min(dim or limit, limit)
    pca = PCA(n_components=dim, whiten=True, svd_solver="full").fit(descriptors)
    variance = np.maximum(pca.explained_variance_, 1e-12)
    projection = pca.components_ / np.sqrt(variance)[:, None]
    return Whitening(name, pca.mean_.astype(np.float32), projection.astype(np.float32), variance.astype(np.float32), "pca")


def fit_learned_whitening(name: str, descriptors: np.ndarray, pairs: Sequence[tuple[int, int]], dim: int | None = None) -> Whitening:
    """Radenović et al.'s learned whitening: whiten the covariance of matching-pair differences (so what
    varies between two views of one object is suppressed), then rotate to the principal directions of the
    whole set in that space."""
    x = np.asarray(descriptors, dtype=np.float64)
    if not pairs:
        raise InvalidArgument("learned whitening needs matching pairs")
    first, second = (np.asarray(side) for side in zip(*pairs, strict=True))
    mean = x[first].mean(axis=0)
    diffs = x[first] - x[second]
    within = diffs.T @ diffs / len(diffs) + 1e-6 * np.eye(x.shape[1])  # ridge: fewer pairs than dimensions
    to_white = np.linalg.inv(np.linalg.cholesky(within))
    whitened = (x - mean) @ to_white.T
    eigenvalues, eigenvectors = np.linalg.eigh(whitened.T @ whitened / len(x))
    order = np.argsort(eigenvalues)[::-1]
    projection = eigenvectors[:, order].T @ to_white
    dim = min(dim or projection.shape[0], projection.shape[0])
    return Whitening(name, mean.astype(np.float32), projection[:dim].astype(np.float32), eigenvalues[order][:dim].astype(np.float32), "learned")


def whitenings_of(card: "ModelCard") -> dict[str, Whitening]:
    """The whitenings loaded with `card`'s weights, by name (empty when none)."""
    return card.artifacts.get(TASK) or {}


def load_whitenings(directory: Path | None) -> dict[str, Whitening]:
    """Every `<name>.npz` of a model's whitening folder, by name."""
    if directory is None:
        return {}
    if not directory.is_dir():
        raise ConfigurationError(f"whitening folder {directory} does not exist")
    return {w.name: w for w in (Whitening.load(p) for p in sorted(directory.glob("*.npz")))}


# --------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A request's recipe with every parameter resolved (what the response reports)."""

    name: str
    layer: str = ""
    gem_p: float = 0.0
    scales: tuple[float, ...] = (1.0,)
    whitening: str = ""
    dim: int = 0
    float16: bool = False


@dataclass(frozen=True)
class FeatureRequest:
    """A request's parameters as sent (0 / empty = the default)."""

    recipe: str = "center"
    layer: str = ""
    gem_p: float = 0.0
    scales: tuple[float, ...] = ()
    whitening: str = ""
    dim: int = 0
    float16: bool = False


@dataclass(frozen=True)
class Descriptors:
    vectors: np.ndarray  # (n_images, dim) float32, unit L2 norm
    recipe: Recipe


@dataclass
class Features:
    """The data plane's view of feature extraction."""

    # Full-resolution views: the shorter side is downscaled to at most this (never upscaled).
    max_shorter: int = 512
    name: str = TASK

    def recipes(self, card: ModelCard) -> tuple[str, ...]:
        return RECIPES if card.signature.layers and card.signature.geometry.variable else CROP_RECIPES

    def resolve(self, card: ModelCard, request: FeatureRequest) -> Recipe:
        """The recipe with defaults filled in; INVALID_ARGUMENT naming what the model supports."""
        name = request.recipe or "center"
        available = self.recipes(card)
        if name not in available:
            raise InvalidArgument(f"unknown recipe {name!r} for model {card.name!r}; it supports: {', '.join(available)}")
        layers = [layer.name for layer in card.signature.layers]
        pooled = name in POOLED_RECIPES
        layer = ""
        if pooled:
            layer = request.layer or layers[-1]
            if layer not in layers:
                raise InvalidArgument(f"unknown layer {layer!r} for model {card.name!r}; its layers: {', '.join(layers)}")
        elif request.layer:
            raise InvalidArgument(f"recipe {name!r} reads the pooled embedding; layer applies to {', '.join(POOLED_RECIPES)}")
        gem_p = 0.0
        if name == "gem":
            gem_p = request.gem_p or DEFAULT_GEM_P
            if not 0.5 <= gem_p <= 64:
                raise InvalidArgument(f"gem_p must be between 0.5 and 64, got {gem_p}")
        elif request.gem_p:
            raise InvalidArgument(f"gem_p applies to recipe 'gem' only, not {name!r}")
        scales = tuple(request.scales) or (1.0,)
        if scales != (1.0,) and not pooled:
            raise InvalidArgument(f"scales apply to the pooled recipes ({', '.join(POOLED_RECIPES)}), not {name!r}")
        if len(scales) > MAX_SCALES or any(not (0.1 <= s <= 2.0) for s in scales):
            raise InvalidArgument(f"scales: at most {MAX_SCALES} values between 0.1 and 2, got {list(scales)}")
        dim = request.dim
        whitening = request.whitening
        if whitening:
            if whitening not in whitenings_of(card):
                known = ", ".join(sorted(whitenings_of(card))) or "none"
                raise InvalidArgument(f"unknown whitening {whitening!r} for model {card.name!r}; it has: {known}")
            w = whitenings_of(card)[whitening]
            if not 0 <= dim <= w.max_dim:
                raise InvalidArgument(f"dim must be between 1 and {w.max_dim} for whitening {whitening!r}, got {dim}")
            dim = dim or w.max_dim
        elif dim:
            raise InvalidArgument("dim applies after a whitening; name one (whitening=...) or leave dim unset")
        return Recipe(name, layer, gem_p, scales, whitening, dim, request.float16)

    def validate(self, card: ModelCard, request: FeatureRequest) -> Recipe:
        recipe = self.resolve(card, request)
        if recipe.whitening:
            expected = whitenings_of(card)[recipe.whitening].input_dim
            raw = self._raw_dim(card, recipe)
            if raw != expected:
                raise InvalidArgument(
                    f"whitening {recipe.whitening!r} was fitted on {expected}-d descriptors; recipe {recipe.name!r} "
                    f"gives {raw}-d ones"
                )
        return recipe

    @staticmethod
    def _raw_dim(card: ModelCard, recipe: Recipe) -> int:
        if recipe.name in CROP_RECIPES:
            return card.signature.embedding_dim
        return card.signature.layer(recipe.layer).channels

    def views(self, card: ModelCard, recipe: Recipe) -> ViewSpec:
        if recipe.name == "center":
            return CENTER
        if recipe.name == "ten_crop":
            return TEN_CROP
        return ViewSpec("full", recipe.scales, max_shorter=self.max_shorter, max_longer=card.signature.geometry.max_side)

    def outputs(self, card: ModelCard, recipe: Recipe) -> tuple[str, ...]:
        return (recipe.layer,) if recipe.layer else (EMBEDDING,)

    def postprocess(self, card: ModelCard, outputs: ViewOutputs, recipe: Recipe) -> Descriptors:
        if recipe.name == "center":
            vectors = outputs.stacked(EMBEDDING)
        elif recipe.name == "ten_crop":
            crops = outputs.stacked(EMBEDDING)
            vectors = crops.reshape(len(outputs.views_per_image), 10, -1).mean(axis=1)
        else:
            vectors = np.stack([self._pooled(maps, recipe) for maps in outputs.per_image(recipe.layer)])
        vectors = l2_normalize(vectors)
        if recipe.whitening:
            vectors = whitenings_of(card)[recipe.whitening].apply(vectors, recipe.dim)
        return Descriptors(vectors.astype(np.float32), recipe)

    @staticmethod
    def _pooled(maps: list[np.ndarray], recipe: Recipe) -> np.ndarray:
        pool = {"spoc": spoc, "avg": avg, "mac": mac, "rmac": rmac, "crow": crow}.get(recipe.name)
        per_scale = [
            (gem(m, recipe.gem_p) if recipe.name == "gem" else pool(m.astype(np.float32, copy=False)))  # type: ignore[misc]
            for m in maps
        ]
        if len(per_scale) == 1:
            return per_scale[0]
        # Multi-scale: a generalised mean of the per-scale descriptors, p as GeM's (1 otherwise), computed on
        # L2-normalised vectors so that no scale dominates by magnitude.
        p = recipe.gem_p or 1.0
        stacked = l2_normalize(np.stack(per_scale))
        if p == 1.0:
            return stacked.mean(axis=0)
        return np.mean(np.maximum(stacked, 0.0) ** p, axis=0) ** (1.0 / p)

