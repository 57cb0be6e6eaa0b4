"""DELF extraction as pure numpy: keypoint locations from receptive fields, selection, descriptors, PCA,
options, images without views. The model-facing parts run through the server in test_delf_e2e.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from vision.core.errors import ConfigurationError, InvalidArgument, ResourceExhausted
from vision.media.imaging import get_preset
from vision.media.views import ViewSpec, full_views
from vision.models import get_architecture
from vision.models.card import ModelCard
from vision.models.signature import FeatureLayer, Signature
from vision.tasks.contract import ViewOutputs
from vision.tasks.delf import (
    FALLBACK_SCORE_THRESHOLD,
    REFERENCE_SCALES,
    REFERENCE_SCORE_THRESHOLD,
    DelfExtraction,
    DelfModel,
    DescriptorPca,
    ExtractOptions,
    ExtractParams,
    box_nms,
    delf_of,
    extract_image,
    fallback_scores,
    fit_pca,
    inside_fraction,
    level_sizes,
    load_delf_model,
)

LAYER3 = FeatureLayer("layer3", 8, 16, receptive_field=267, padding=133)


def attention_model(**kwargs: object) -> DelfModel:
    return DelfModel(LAYER3, "attention", **{"score_threshold": 0.0, **kwargs})  # type: ignore[arg-type]


def maps_for(size: tuple[int, int], scales: tuple[float, ...], layer: FeatureLayer = LAYER3, seed: int = 0, side: int = 1024):
    """Random feature maps and zero attention of the right shape for each level."""
    rng = np.random.default_rng(seed)
    maps, scores = [], []
    for w, h in level_sizes(size, side, scales):
        shape = (math.ceil(h / layer.stride), math.ceil(w / layer.stride))
        maps.append(rng.standard_normal((layer.channels, *shape)).astype(np.float32))
        scores.append(np.zeros((1, *shape), np.float32))
    return maps, scores


# --------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, scale, cell", [
    ((640, 480), 1.0, (3, 5)),
    ((1000, 700), 0.3536, (1, 2)),
    ((641, 479), 0.7071, (10, 4)),
    ((2000, 1500), 2.0, (60, 90)),  # capped to 1024 first: coordinates still in the 2000 x 1500 original
    ((300, 900), 1.4142, (50, 7)),
])
def test_a_keypoint_is_its_cells_receptive_centre_in_original_pixels(size, scale, cell):
    maps, scores = maps_for(size, (scale,))
    row, col = cell
    scores[0][0, row, col] = 5.0
    features = extract_image(attention_model(), ExtractOptions(scales=(scale,), max_keypoints=1), size, maps, scores)
    (lw, lh), = level_sizes(size, 1024, (scale,))
    # Receptive box of the cell at the level: [16 i - 133, 16 i + 133] -> centre 16 i; pixel centres map back.
    expected_x = (16 * col + 0.5) * size[0] / lw - 0.5
    expected_y = (16 * row + 0.5) * size[1] / lh - 0.5
    np.testing.assert_allclose(features.locations[0], [expected_x, expected_y], rtol=1e-5)
    assert features.scores[0] == 5.0
    np.testing.assert_allclose(features.scales[0], max(size) / max(lw, lh), rtol=1e-6)
    assert (features.width, features.height) == size


@pytest.mark.parametrize("size", [(640, 480), (333, 777), (1500, 90), (2049, 1023), (12, 900)])
@pytest.mark.parametrize("side", [1024, 500])
def test_level_sizes_are_the_views_sizes(size, side):
    img = Image.new("RGB", size)
    spec = ViewSpec("full", REFERENCE_SCALES, max_longer=side)
    views = full_views(img, get_preset("torchvision"), spec)
    assert [(v.shape[2], v.shape[1]) for v in views] == level_sizes(size, side, REFERENCE_SCALES)


def test_a_map_that_does_not_fit_its_level_is_a_bug_not_a_wrong_answer():
    maps, scores = maps_for((640, 480), (1.0,))
    with pytest.raises(RuntimeError, match="disagree"):
        extract_image(attention_model(), ExtractOptions(scales=(1.0,)), (480, 640), maps, scores)


# --------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------


def test_threshold_then_the_best_across_levels_best_first():
    size, scales = (640, 480), (0.5, 1.0)
    maps, scores = maps_for(size, scales)
    rng = np.random.default_rng(1)
    for s in scores:
        s[:] = rng.uniform(0, 200, s.shape)
    model = attention_model(score_threshold=REFERENCE_SCORE_THRESHOLD)
    features = extract_image(model, ExtractOptions(scales=scales, max_keypoints=50), size, maps, scores)
    every = np.concatenate([s.ravel() for s in scores])
    assert len(features) == 50
    np.testing.assert_allclose(features.scores, np.sort(every)[::-1][:50])
    assert (features.scores >= 100).all() and (np.diff(features.scores) <= 0).all()
    # Keypoints of both levels compete; each carries its level's scale.
    assert set(np.round(features.scales, 3)) <= {2.0, 1.0}
    few = extract_image(model, ExtractOptions(scales=scales, score_threshold=199.9), size, maps, scores)
    assert len(few) == int((every >= 199.9).sum())
    none = extract_image(model, ExtractOptions(scales=scales, score_threshold=1e9), size, maps, scores)
    assert len(none) == 0 and none.descriptors.shape == (0, 8)


def test_descriptors_are_the_cells_features_l2_normalised():
    size = (320, 320)
    maps, scores = maps_for(size, (1.0,))
    scores[0][0, 7, 3] = 9.0
    features = extract_image(attention_model(), ExtractOptions(scales=(1.0,), max_keypoints=1), size, maps, scores)
    vector = maps[0][:, 7, 3]
    np.testing.assert_allclose(features.descriptors[0], vector / np.linalg.norm(vector), rtol=1e-5)


def test_without_attention_scores_are_norms_discounted_by_padding():
    layer = FeatureLayer("blocks.4", 4, 16, receptive_field=339, padding=169)
    model = DelfModel(layer, None, FALLBACK_SCORE_THRESHOLD)
    size = (512, 384)
    maps, _ = maps_for(size, (1.0,), layer)
    maps[0][:] = 1.0
    scores = fallback_scores(layer, maps[0], *size)
    # Equal features: the score is the inside fraction alone, highest in the middle, lowest at corners.
    np.testing.assert_allclose(scores, 2.0 * np.outer(inside_fraction(layer, 24, 384), inside_fraction(layer, 32, 512)))
    assert scores[0, 0] < scores[0, 16] < scores[12, 16]
    frac = inside_fraction(layer, 32, 512)
    assert frac[0] == pytest.approx(170 / 339) and frac[16] == pytest.approx(339 / 339)
    maps[0][:, 5, 9] = 10.0
    best = extract_image(model, ExtractOptions(scales=(1.0,), max_keypoints=1), size, maps, None)
    np.testing.assert_allclose(best.locations[0], [16 * 9, 16 * 5])


def test_images_smaller_than_the_receptive_field_at_every_level_or_10_px_give_no_features():
    model = attention_model()
    # 133 px at the largest scale 2: 266 < 267; 2000 x 9 capped to 1024 x 5: under 10 px.
    for size, scales in (((133, 100), REFERENCE_SCALES), ((2000, 9), REFERENCE_SCALES), ((1024, 768), (0.25,))):
        maps, scores = maps_for(size, scales)
        for s in scores:
            s[:] = 1.0
        features = extract_image(model, ExtractOptions(scales=scales), size, maps, scores)
        assert len(features) == 0 and (features.width, features.height) == size
    for size, scales in (((134, 100), REFERENCE_SCALES), ((1024, 768), (0.25, 0.5))):
        maps, scores = maps_for(size, scales)
        features = extract_image(model, ExtractOptions(scales=scales), size, maps, scores)
        assert len(features) > 0


def test_nms_over_receptive_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5]], dtype=float)
    order = np.array([0, 1, 2, 3])
    assert box_nms(boxes, order, 0.5, 10).tolist() == [0, 2]
    assert box_nms(boxes, order, 1.0, 10).tolist() == [0, 1, 2, 3]
    assert box_nms(boxes, order, 0.5, 1).tolist() == [0]
    size = (640, 480)
    maps, scores = maps_for(size, (1.0,))
    scores[0][:] = np.random.default_rng(2).uniform(0, 1, scores[0].shape)
    all_of_them = extract_image(attention_model(), ExtractOptions(scales=(1.0,), max_keypoints=5000), size, maps, scores)
    sparse = extract_image(attention_model(), ExtractOptions(scales=(1.0,), max_keypoints=5000, nms_iou=0.5), size, maps, scores)
    assert len(all_of_them) == 40 * 30 and 0 < len(sparse) < len(all_of_them)
    assert sparse.scores[0] == all_of_them.scores[0]  # the best survives
    # Every kept pair of 267-px receptive boxes overlaps by IoU <= 0.5.
    overlap = np.clip(267 - np.abs(sparse.locations[:, None] - sparse.locations[None]), 0, None).prod(axis=2)
    iou = overlap / (2 * 267**2 - overlap)
    assert iou[~np.eye(len(sparse), dtype=bool)].max() <= 0.5


# --------------------------------------------------------------------------------------
# PCA
# --------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_pca_follows_the_reference_and_descriptors_stay_unit_length(tmp_path):
    rng = np.random.default_rng(0)
    data = _unit(rng.standard_normal((500, 8)) * np.array([8, 5, 3, 1, 0.5, 0.2, 0.1, 0.05]))
    pca = fit_pca(data.astype(np.float32), 3, model="m")
    assert pca.dim == 3 and pca.input_dim == 8 and pca.meta["descriptors"] == 500
    assert (np.diff(pca.variances) <= 0).all()
    # The axes are the eigenvectors of the covariance, largest first (abs: a sign is a convention).
    values, vectors = np.linalg.eigh(np.cov(data, rowvar=False))
    np.testing.assert_allclose(np.abs(pca.components), np.abs(vectors[:, ::-1][:, :3].T), atol=1e-4)
    np.testing.assert_allclose(pca.apply(data[:5]), (data[:5] - pca.mean) @ pca.components.T, rtol=1e-4, atol=1e-5)
    whitened = DescriptorPca(pca.mean, pca.components, pca.variances, whiten=True)
    np.testing.assert_allclose(np.var(whitened.apply(data.astype(np.float32)), axis=0), 1.0, rtol=0.02)
    path = tmp_path / "pca.npz"
    pca.save(path)
    loaded = DescriptorPca.load(path)
    np.testing.assert_array_equal(loaded.components, pca.components)
    assert loaded.meta["model"] == "m" and not loaded.whiten
    # Served: L2-normalise, project, L2-normalise again.
    layer = FeatureLayer("layer3", 8, 16, receptive_field=267, padding=133)
    model = DelfModel(layer, "attention", 0.0, pca=loaded)
    maps, scores = maps_for((400, 300), (1.0,), layer)
    scores[0][0, 2, 2] = 1.0
    features = extract_image(model, ExtractOptions(scales=(1.0,), max_keypoints=3), (400, 300), maps, scores)
    raw = _unit(maps[0][:, 2, 2][None])
    np.testing.assert_allclose(features.descriptors[0], _unit(loaded.apply(raw))[0], rtol=1e-5)
    assert features.descriptors.shape == (3, 3)
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, rtol=1e-5)
    skipped = extract_image(model, ExtractOptions(scales=(1.0,), max_keypoints=3, skip_pca=True), (400, 300), maps, scores)
    np.testing.assert_allclose(skipped.descriptors[0], raw[0], rtol=1e-5)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"not a zip", "not readable"),
    ({"mean": np.zeros(3)}, "lacks"),
    ({"mean": np.zeros(3), "components": np.zeros((2, 4)), "variances": np.ones(2)}, "inconsistent"),
])
def test_bad_pca_files_stop_start_up_naming_the_file(tmp_path, content, message):
    path = tmp_path / "pca.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        np.savez(path, whiten=np.array(False), meta="{}", **content)
    with pytest.raises(ConfigurationError, match=message) as info:
        DescriptorPca.load(path)
    assert str(path) in str(info.value)


def test_fit_refuses_too_few_descriptors():
    with pytest.raises(ValueError, match="cannot fit"):
        fit_pca(np.zeros((8, 8), np.float32), 8)
    with pytest.raises(ValueError, match="between 1"):
        fit_pca(np.zeros((100, 8), np.float32), 9)


# --------------------------------------------------------------------------------------
# Per-model records and options
# --------------------------------------------------------------------------------------


def test_every_model_gets_the_paper_layer_and_the_right_scoring(tmp_path):
    delf = load_delf_model("d", get_architecture("delf_resnet50").signature(0))
    assert (delf.layer.name, delf.attention, delf.score_threshold, delf.scoring) == ("layer3", "attention", 100.0, "attention")
    lite = load_delf_model("e", get_architecture("efficientnet_lite0").signature(1000))
    assert (lite.layer.name, lite.attention, lite.score_threshold, lite.scoring) == ("blocks.4", None, 0.0, "l2_norm")
    r50 = load_delf_model("r", get_architecture("resnet50").signature(1000), score_threshold=3.5, max_image_side=512)
    with pytest.raises(ConfigurationError, match="under half the 267-px receptive field"):
        load_delf_model("r", get_architecture("resnet50").signature(1000), max_image_side=133)
    assert (r50.layer.name, r50.score_threshold, r50.max_image_side, r50.descriptor_dim) == ("layer3", 3.5, 512, 1024)
    with pytest.raises(ConfigurationError, match="not one of its feature maps"):
        load_delf_model("r", get_architecture("resnet50").signature(1000), layer="layer9")
    deep = load_delf_model("r", get_architecture("resnet50").signature(1000), layer="layer4")
    assert deep.layer.stride == 32
    stride32 = Signature(num_classes=0, embedding_dim=4, layers=(FeatureLayer("deep", 4, 32, 99, 49),))
    assert load_delf_model("x", stride32) is None
    with pytest.raises(ConfigurationError, match="no feature map"):
        load_delf_model("x", stride32, score_threshold=1.0)
    pca = tmp_path / "pca.npz"
    fit_pca(_unit(np.random.default_rng(0).standard_normal((100, 16))).astype(np.float32), 4).save(pca)
    with pytest.raises(ConfigurationError, match="16-d descriptors"):
        load_delf_model("e", get_architecture("efficientnet_lite0").signature(1000), pca=pca)


@pytest.mark.parametrize("kwargs, message", [
    ({"scales": ()}, "scales"),
    ({"scales": tuple([1.0] * 13)}, "scales"),
    ({"scales": (0.0,)}, "scales"),
    ({"scales": (float("nan"),)}, "scales"),
    ({"scales": (5.0,)}, "scales"),
    ({"max_keypoints": 0}, "max_keypoints"),
    ({"max_keypoints": 10_001}, "max_keypoints"),
    ({"score_threshold": float("inf")}, "score_threshold"),
    ({"max_image_side": 9}, "max_image_side"),
    ({"nms_iou": 0.0}, "nms_iou"),
    ({"nms_iou": float("nan")}, "nms_iou"),
])
def test_bad_options_name_the_parameter(kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        ExtractOptions(**kwargs)


def delf_card() -> ModelCard:
    """ResNet-50 DELF (layer3: 1024 channels, 267-px receptive field, trained attention), no PCA."""
    signature = get_architecture("delf_resnet50").signature(0)
    return ModelCard(
        name="m", version="1", architecture="delf_resnet50", task="features", labels=(), preset=get_preset("delf"),
        backend="onnxruntime", signature=signature, artifacts={"delf": load_delf_model("m", signature)},
    )


def test_a_request_may_lower_the_cap_not_raise_it_and_levels_stay_bounded():
    card = delf_card()
    task = DelfExtraction()
    task.validate(card, ExtractParams(ExtractOptions(max_image_side=512), 1))
    spec = task.views(card, ExtractParams(ExtractOptions(max_image_side=512), 1))
    # Images down to 1 px decode (under the platform minimum they get no views): DELF answers them empty.
    assert (spec.kind, spec.max_longer, spec.min_side) == ("full", 512, 1)
    assert task.outputs(card, ExtractParams(ExtractOptions(), 1)) == ("layer3", "attention")
    with pytest.raises(InvalidArgument, match="over this model's cap of 1024"):
        task.validate(card, ExtractParams(ExtractOptions(max_image_side=2048), 1))
    with pytest.raises(InvalidArgument, match="largest pyramid level"):
        task.validate(card, ExtractParams(ExtractOptions(scales=(3.0,)), 1))
    task.validate(card, ExtractParams(ExtractOptions(scales=(0.25,)), 1))  # runs; gives no keypoints (256 < 267 px)
    task.validate(card, ExtractParams(ExtractOptions(scales=(3.0,), max_image_side=600), 1))


def test_a_response_that_could_exceed_the_limit_is_refused_at_validation():
    card, task = delf_card(), DelfExtraction()
    # 1000 keypoints of 1024 floats and 24 bytes of location: 4.12 MB per image; 16 fit in 64 MiB, 17 do not.
    task.validate(card, ExtractParams(ExtractOptions(), 16))
    with pytest.raises(ResourceExhausted, match="17 images of up to 1000 keypoints with 1024-d descriptors"):
        task.validate(card, ExtractParams(ExtractOptions(), 17))
    task.validate(card, ExtractParams(ExtractOptions(max_keypoints=500), 32))


def test_images_without_views_get_empty_features_of_their_size():
    card, task = delf_card(), DelfExtraction()
    model = delf_of(card)
    params = task.validate(card, ExtractParams(ExtractOptions(scales=(1.0, 0.5), max_image_side=512, score_threshold=0.0), 3))
    size = (600, 400)
    maps, scores = maps_for(size, params.options.scales, layer=model.layer, side=512)
    # The middle image's two levels, each its own shape group (as the data plane groups them).
    groups = [([i], {"layer3": maps[i][None], "attention": scores[i][None]}) for i in range(2)]
    outputs = ViewOutputs([0, 2, 0], groups, [(5, 3), size, (1, 1)])
    tiny, found, one = task.postprocess(card, outputs, params)
    expected = extract_image(model, params.options, size, maps, scores)
    assert len(found) == len(expected) > 0
    np.testing.assert_array_equal(found.locations, expected.locations)
    for empty, (width, height) in ((tiny, (5, 3)), (one, (1, 1))):
        assert (empty.width, empty.height, len(empty)) == (width, height, 0)
        assert empty.descriptors.shape == (0, 1024) and empty.locations.shape == (0, 2)


def test_a_view_spec_refuses_a_negative_minimum_side():
    assert ViewSpec("full", min_side=1).min_side == 1 and ViewSpec().min_side == 0
    with pytest.raises(ValueError, match="min_side"):
        ViewSpec("full", min_side=-1)
