"""Protobuf ⇄ domain conversions that servers and clients share, defined once: request images, DELF
options and feature sets, descriptors. Server-only conversions (ModelInfo of a served card, responses)
stay with their servicers.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from vision.core.errors import InvalidArgument
from vision.tasks.contract import EncodedImage
from vision.tasks.delf import MAX_KEYPOINTS, REFERENCE_SCALES, DelfFeatures, ExtractOptions
from vision.tasks.delf_match import DISTANCE_THRESHOLD, MAX_TRIALS, RESIDUAL_THRESHOLD, MatchOptions
from vision.v1 import common_pb2, delf_pb2, features_pb2

# Keypoints a feature set passed back to Match may have (10x the largest Extract answer).
MAX_GIVEN_KEYPOINTS = 100_000


def encoded_images(images: Iterable[common_pb2.Image]) -> list[EncodedImage]:
    return [EncodedImage(id=img.id, content=img.content) for img in images]


def extract_options(msg: delf_pb2.DelfExtractOptions) -> ExtractOptions:
    return ExtractOptions(
        scales=tuple(msg.scales) or REFERENCE_SCALES,
        max_keypoints=msg.max_keypoints if msg.HasField("max_keypoints") else MAX_KEYPOINTS,
        score_threshold=msg.score_threshold if msg.HasField("score_threshold") else None,
        max_image_side=msg.max_image_side if msg.HasField("max_image_side") else None,
        nms_iou=msg.nms_iou if msg.HasField("nms_iou") else 1.0,
        skip_pca=msg.skip_pca,
    )


def match_options(msg: delf_pb2.DelfMatchOptions) -> MatchOptions:
    return MatchOptions(
        max_descriptor_distance=msg.max_descriptor_distance if msg.HasField("max_descriptor_distance") else DISTANCE_THRESHOLD,
        residual_threshold=msg.residual_threshold if msg.HasField("residual_threshold") else RESIDUAL_THRESHOLD,
        max_trials=msg.max_trials if msg.HasField("max_trials") else MAX_TRIALS,
    )


def features_message(features: DelfFeatures, model: common_pb2.ModelInfo | None = None) -> delf_pb2.DelfFeatures:
    """`features` on the wire, naming the `model` that extracted them (their descriptors compare only with
    that model's)."""
    msg = delf_pb2.DelfFeatures(
        image_width=features.width,
        image_height=features.height,
        descriptor_dim=features.descriptors.shape[1],
        descriptors=features.descriptors.astype("<f4", copy=False).tobytes(),
        model=model,
    )
    keypoints = msg.keypoints
    xs, ys = features.locations[:, 0].tolist(), features.locations[:, 1].tolist()
    for x, y, scale, score in zip(xs, ys, features.scales.tolist(), features.scores.tolist(), strict=True):
        keypoints.add(x=x, y=y, scale=scale, score=score)
    return msg


def features_from_message(msg: delf_pb2.DelfFeatures, where: str) -> DelfFeatures:
    """A feature set passed back by a client; InvalidArgument naming `where` when it is malformed."""
    n, dim = len(msg.keypoints), msg.descriptor_dim
    if n > MAX_GIVEN_KEYPOINTS:
        raise InvalidArgument(f"{where}: {n} keypoints, over the limit of {MAX_GIVEN_KEYPOINTS}")
    if n and not dim:
        raise InvalidArgument(f"{where}: descriptor_dim is 0 but there are {n} keypoints")
    if len(msg.descriptors) != n * dim * 4:
        raise InvalidArgument(
            f"{where}: descriptors has {len(msg.descriptors)} bytes; {n} keypoints x {dim} float32 values need {n * dim * 4}"
        )
    points = np.array([(k.x, k.y, k.scale, k.score) for k in msg.keypoints], dtype=np.float32).reshape(n, 4)
    descriptors = np.frombuffer(msg.descriptors, dtype="<f4").reshape(n, dim).astype(np.float32)
    if not (np.isfinite(points).all() and np.isfinite(descriptors).all()):
        raise InvalidArgument(f"{where}: keypoints and descriptors must be finite numbers")
    return DelfFeatures(msg.image_width, msg.image_height, points[:, :2].copy(), points[:, 2].copy(), points[:, 3].copy(), descriptors)


def decode_descriptor(descriptor: features_pb2.Descriptor) -> np.ndarray:
    """A descriptor's vector as float32, whichever encoding the server used."""
    if descriptor.values_f16:
        return np.frombuffer(descriptor.values_f16, dtype="<f2").astype(np.float32)
    return np.asarray(descriptor.values, dtype=np.float32)
