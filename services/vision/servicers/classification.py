"""vision.v1.Classification: softmax top-k over a model's labels."""

from __future__ import annotations

import grpc

from vision.backends import LOGITS
from vision.dataplane import DataPlane
from vision.errors import InvalidArgument
from vision.postprocess import softmax, top_k
from vision.rpc import rpc_method
from vision.servicers.common import encoded_images, list_models_response, model_info
from vision.v1 import classification_pb2, classification_pb2_grpc, common_pb2

SERVICE = "vision.v1.Classification"
TASK = "classification"
DEFAULT_TOP_K = 5


class ClassificationServicer(classification_pb2_grpc.ClassificationServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane

    @rpc_method(SERVICE, "Classify")
    async def Classify(
        self, request: classification_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> classification_pb2.ClassifyResponse:
        model = self._dataplane.repository.get(request.model.name, request.model.version, task=TASK)
        k = request.top_k if request.HasField("top_k") else DEFAULT_TOP_K
        if not 1 <= k <= model.card.num_labels:
            raise InvalidArgument(f"top_k must be between 1 and {model.card.num_labels} for model {model.card.name!r}, got {k}")
        images = encoded_images(request.images)
        outputs = await self._dataplane.run(model, images, SERVICE)
        indices, scores = top_k(softmax(outputs[LOGITS].astype("float32", copy=False)), k)
        labels = model.card.labels
        response = classification_pb2.ClassifyResponse(model=model_info(model.card))
        for image, idx_row, score_row in zip(images, indices.tolist(), scores.tolist(), strict=True):
            result = response.results.add(image_id=image.id)
            for idx, score in zip(idx_row, score_row, strict=True):
                result.predictions.add(index=idx, label=labels[idx], score=score)
        return response

    @rpc_method(SERVICE, "ListModels")
    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        return list_models_response(self._dataplane.repository.list(TASK))
