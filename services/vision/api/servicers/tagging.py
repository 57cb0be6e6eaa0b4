"""vision.v1.Tagging: multi-label tags with per-label thresholds and a label hierarchy (vision.tasks.tagging)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from vision.api.codec import encoded_images
from vision.api.rpc import rpc_method
from vision.api.servicers.common import list_models_response, model_info
from vision.models.card import ModelCard
from vision.serving.dataplane import DataPlane
from vision.tasks.contract import EncodedImage, TaskCall
from vision.tasks.tagging import TAGGING, Tag, TagOptions
from vision.v1 import common_pb2, tagging_pb2, tagging_pb2_grpc

SERVICE = "vision.v1.Tagging"


def _response(card: ModelCard, images: Sequence[EncodedImage], rows: list[list[Tag]]) -> tagging_pb2.TagResponse:
    response = tagging_pb2.TagResponse(model=model_info(card))
    for image, tags in zip(images, rows, strict=True):
        result = response.results.add(image_id=image.id)
        for t in tags:
            result.tags.add(
                index=t.index, label=t.label, wnid=t.wnid, score=t.score, from_hierarchy=t.from_hierarchy, depth=t.depth
            )
    return response


class TaggingServicer(tagging_pb2_grpc.TaggingServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane

    @rpc_method(SERVICE, "Tag")
    async def Tag(self, request: tagging_pb2.TagRequest, context: grpc.aio.ServicerContext) -> tagging_pb2.TagResponse:
        options = TagOptions(
            threshold=request.threshold if request.HasField("threshold") else None,
            max_tags=request.max_tags if request.HasField("max_tags") else None,
            min_score=request.min_score if request.HasField("min_score") else None,
        )
        call = TaskCall(request.model.name, request.model.version, encoded_images(request.images), options)
        return await self._dataplane.execute(TAGGING, call, SERVICE, _response)

    @rpc_method(SERVICE, "ListModels")
    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        return list_models_response(self._dataplane.repository.list(TAGGING.name))
