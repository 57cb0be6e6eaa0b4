"""vision.v1.Classification: softmax top-k over a model's labels (vision.tasks.classification)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from vision.api.codec import encoded_images
from vision.api.rpc import rpc_method
from vision.api.servicers.common import list_models_response, model_info
from vision.models.card import ModelCard
from vision.serving.dataplane import DataPlane
from vision.tasks.classification import CLASSIFICATION, DEFAULT_TOP_K, TopK
from vision.tasks.contract import EncodedImage, TaskCall
from vision.v1 import classification_pb2, classification_pb2_grpc, common_pb2

SERVICE = "vision.v1.Classification"


def _response(card: ModelCard, images: Sequence[EncodedImage], top: TopK) -> classification_pb2.ClassifyResponse:
    labels = card.labels
    response = classification_pb2.ClassifyResponse(model=model_info(card))
    for image, idx_row, score_row in zip(images, top.indices.tolist(), top.scores.tolist(), strict=True):
        result = response.results.add(image_id=image.id)
        for idx, score in zip(idx_row, score_row, strict=True):
            result.predictions.add(index=idx, label=labels[idx], score=score)
    return response


class ClassificationServicer(classification_pb2_grpc.ClassificationServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane

    @rpc_method(SERVICE, "Classify")
    async def Classify(
        self, request: classification_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> classification_pb2.ClassifyResponse:
        call = TaskCall(
            request.model.name,
            request.model.version,
            encoded_images(request.images),
            request.top_k if request.HasField("top_k") else DEFAULT_TOP_K,
        )
        return await self._dataplane.execute(CLASSIFICATION, call, SERVICE, _response)

    @rpc_method(SERVICE, "ListModels")
    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        return list_models_response(self._dataplane.repository.list(CLASSIFICATION.name))
