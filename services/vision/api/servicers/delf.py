"""vision.v1.Delf: DELF keypoints and descriptors over an image pyramid (vision.tasks.delf), and matching
with RANSAC verification (vision.tasks.delf_match).

Protobuf ⇄ task conversion only: the data plane decodes (images under its decode minimum too, which get no
forward pass and zero keypoints), infers and hands the task each image's size.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import grpc

from vision.api.codec import (
    encoded_images,
    extract_options,
    features_from_message,
    features_message,
    match_options,
)
from vision.api.rpc import rpc_method
from vision.api.servicers.common import model_info
from vision.core import metrics
from vision.core.errors import InvalidArgument, InvalidImage
from vision.models.card import ModelCard
from vision.serving.dataplane import DataPlane
from vision.tasks.contract import EncodedImage, TaskCall
from vision.tasks.delf import (
    DELF_EXTRACTION,
    TASK,
    DelfFeatures,
    ExtractOptions,
    ExtractParams,
    delf_of,
)
from vision.tasks.delf_match import (
    MatchResult,
    match,
)
from vision.v1 import common_pb2, delf_pb2, delf_pb2_grpc

SERVICE = "vision.v1.Delf"
T = TypeVar("T")


# --------------------------------------------------------------------------------------
# Conversions (the ones clients share live in vision.api.codec)
# --------------------------------------------------------------------------------------


def _given_model(msg: delf_pb2.DelfFeatures) -> tuple[str, str] | None:
    return (msg.model.name, msg.model.version) if msg.HasField("model") and msg.model.name else None


def _match_response(result: MatchResult, a: DelfFeatures, b: DelfFeatures) -> delf_pb2.DelfMatchResponse:
    response = delf_pb2.DelfMatchResponse(
        inliers=result.inliers, putative_matches=len(result.putative), keypoints_a=len(a), keypoints_b=len(b)
    )
    pairs = result.inlier_pairs
    a_xy, b_xy = a.locations[pairs[:, 0]].tolist(), b.locations[pairs[:, 1]].tolist()
    for (i, j), (ax, ay), (bx, by) in zip(pairs.tolist(), a_xy, b_xy, strict=True):
        response.correspondences.add(a=i, b=j, a_x=ax, a_y=ay, b_x=bx, b_y=by)
    if result.transform is not None:
        response.transform.extend(result.transform[:2].ravel().tolist())
    return response


# --------------------------------------------------------------------------------------
# The servicer
# --------------------------------------------------------------------------------------


class DelfServicer(delf_pb2_grpc.DelfServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane

    async def _extract(
        self,
        model: tuple[str, str],
        images: Sequence[EncodedImage],
        options: ExtractOptions,
        finish: Callable[[ModelCard, list[DelfFeatures]], T],
    ) -> T:
        """Features of `images` in request order, then `finish(card, features)` in a worker thread."""

        def respond(card: ModelCard, _: object, features: list[DelfFeatures]) -> T:
            keypoints = metrics.DELF_KEYPOINTS.labels(model=card.name, version=card.version)
            for found in features:
                keypoints.observe(len(found))
            return finish(card, features)

        call = TaskCall(model[0], model[1], images, ExtractParams(options, len(images)))
        return await self._dataplane.execute(DELF_EXTRACTION, call, SERVICE, respond)

    @rpc_method(SERVICE, "Extract")
    async def Extract(self, request: delf_pb2.DelfExtractRequest, context: grpc.aio.ServicerContext) -> delf_pb2.DelfExtractResponse:
        images = encoded_images(request.images)
        options = extract_options(request.options)

        def finish(card: ModelCard, features: list[DelfFeatures]) -> delf_pb2.DelfExtractResponse:
            response = delf_pb2.DelfExtractResponse(model=model_info(card))
            for image, found in zip(images, features, strict=True):
                response.results.add(image_id=image.id, features=features_message(found, model_info(card)))
            return response

        return await self._extract((request.model.name, request.model.version), images, options, finish)

    @rpc_method(SERVICE, "Match")
    async def Match(self, request: delf_pb2.DelfMatchRequest, context: grpc.aio.ServicerContext) -> delf_pb2.DelfMatchResponse:
        options = match_options(request.options)
        extract = extract_options(request.extract_options)
        sources = {side: getattr(request, side).WhichOneof("source") for side in ("a", "b")}
        for side, source in sources.items():
            if source is None:
                raise InvalidArgument(f"{side}: give an image or features to match")
        given = {
            side: features_from_message(getattr(request, side).features, f"{side}.features")
            for side, source in sources.items() if source == "features"
        }
        named = {side: _given_model(getattr(request, side).features) for side in given}
        models = {m for m in named.values() if m is not None}
        if len(models) > 1:
            raise InvalidArgument(
                "a.features and b.features come from different models ("
                + " and ".join(f"{n} version {v}" for n, v in sorted(models)) + "); their descriptors are not comparable"
            )
        selected = (request.model.name, request.model.version)
        if not selected[0] and models:
            selected = next(iter(models))  # an image side is extracted with the model of the other side
        images = {side: getattr(request, side).image for side, source in sources.items() if source == "image"}

        def finish(card: ModelCard | None, extracted: list[DelfFeatures]) -> delf_pb2.DelfMatchResponse:
            features = dict(given)
            features.update(zip(images, extracted, strict=True))
            started = time.perf_counter()
            result = match(features["a"], features["b"], options)
            # Labelled by the model that extracted the features: the extracting model when a side was an
            # image, else the one the given features name (empty when they name none).
            labels = {"model": card.name, "version": card.version} if card is not None else {
                "model": selected[0], "version": selected[1]}
            metrics.STAGE_LATENCY.labels(stage="delf_match", **labels).observe(time.perf_counter() - started)
            metrics.DELF_INLIERS.labels(**labels).observe(result.inliers)
            response = _match_response(result, features["a"], features["b"])
            if card is not None:
                response.model.CopyFrom(model_info(card))
            elif models:
                response.model.CopyFrom(common_pb2.ModelInfo(name=selected[0], version=selected[1]))
            if request.return_features:
                for side in ("a", "b"):
                    msg = features_message(features[side], model_info(card)) if side in images else getattr(request, side).features
                    getattr(response, f"features_{side}").CopyFrom(msg)
            return response

        if not images:
            return await asyncio.to_thread(finish, None, [])

        def checked(card: ModelCard, extracted: list[DelfFeatures]) -> delf_pb2.DelfMatchResponse:
            for side, model in named.items():
                if model is not None and model != (card.name, card.version):
                    raise InvalidArgument(
                        f"{side}.features come from model {model[0]} version {model[1]}, the image side is extracted "
                        f"with {card.name} version {card.version}; their descriptors are not comparable"
                    )
            return finish(card, extracted)

        encoded = [EncodedImage(id=img.id, content=img.content) for img in images.values()]
        try:
            return await self._extract(selected, encoded, extract, checked)
        except InvalidImage as exc:
            if exc.index is None:
                raise
            side = list(images)[exc.index]
            image_id = f" (id {images[side].id!r})" if images[side].id else ""
            raise InvalidArgument(f"{side}.image{image_id}: {exc.reason}") from None

    @rpc_method(SERVICE, "ListModels")
    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> delf_pb2.DelfListModelsResponse:
        response = delf_pb2.DelfListModelsResponse()
        for served in self._dataplane.repository.list(TASK):
            card = served.card
            delf = delf_of(card)
            layer = delf.layer
            response.models.add(
                model=model_info(card, full=True, registry=served.registry),
                layer=layer.name,
                stride=layer.stride,
                receptive_field=layer.receptive_field,
                padding=layer.padding,
                scoring=delf.scoring,
                score_threshold=delf.score_threshold,
                max_image_side=delf.max_image_side,
                descriptor_dim=delf.descriptor_dim,
                pca_dim=delf.pca.dim if delf.pca is not None else 0,
                pca_whitening=bool(delf.pca is not None and delf.pca.whiten),
            )
        return response
