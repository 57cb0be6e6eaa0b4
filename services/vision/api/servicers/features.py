"""vision.v1.Features: global descriptors (vision.tasks.features)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from vision.api.codec import encoded_images
from vision.api.rpc import rpc_method
from vision.api.servicers.common import model_info
from vision.models.card import ModelCard
from vision.serving.dataplane import DataPlane
from vision.tasks.contract import EncodedImage, TaskCall
from vision.tasks.features import Descriptors, FeatureRequest, Features, whitenings_of
from vision.v1 import common_pb2, features_pb2, features_pb2_grpc

SERVICE = "vision.v1.Features"


def _response(card: ModelCard, images: Sequence[EncodedImage], result: Descriptors) -> features_pb2.ExtractResponse:
    recipe = result.recipe
    response = features_pb2.ExtractResponse(
        model=model_info(card),
        dim=result.vectors.shape[1],
        recipe=features_pb2.Recipe(
            name=recipe.name, layer=recipe.layer, gem_p=recipe.gem_p, scales=recipe.scales,
            whitening=recipe.whitening, dim=recipe.dim,
        ),
    )
    if recipe.float16:
        halves = result.vectors.astype("<f2")
        for image, row in zip(images, halves, strict=True):
            response.descriptors.add(image_id=image.id, values_f16=row.tobytes())
    else:
        for image, row in zip(images, result.vectors, strict=True):
            response.descriptors.add(image_id=image.id, values=row)
    return response


class FeaturesServicer(features_pb2_grpc.FeaturesServicer):
    def __init__(self, dataplane: DataPlane, task: Features) -> None:
        self._dataplane = dataplane
        self._task = task

    @rpc_method(SERVICE, "Extract")
    async def Extract(self, request: features_pb2.ExtractRequest, context: grpc.aio.ServicerContext) -> features_pb2.ExtractResponse:
        params = FeatureRequest(
            recipe=request.recipe,
            layer=request.layer,
            gem_p=request.gem_p if request.HasField("gem_p") else 0.0,
            scales=tuple(request.scales),
            whitening=request.whitening,
            dim=request.dim if request.HasField("dim") else 0,
            float16=request.float16,
        )
        call = TaskCall(request.model.name, request.model.version, encoded_images(request.images), params)
        return await self._dataplane.execute(self._task, call, SERVICE, _response)

    @rpc_method(SERVICE, "ListModels")
    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.ListFeatureModelsResponse:
        response = features_pb2.ListFeatureModelsResponse()
        for model in self._dataplane.repository.list(self._task.name):
            card = model.card
            entry = response.models.add(recipes=self._task.recipes(card), layers=[layer.name for layer in card.signature.layers])
            entry.model.CopyFrom(model_info(card, full=True, registry=model.registry))
            for w in whitenings_of(card).values():
                entry.whitenings.add(name=w.name, kind=w.kind, input_dim=w.input_dim, max_dim=w.max_dim)
        return response
