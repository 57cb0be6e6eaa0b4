"""Protobuf conversions shared by every servicer."""

from __future__ import annotations

from collections.abc import Iterable

from vision.models.card import ModelCard
from vision.serving.repository import ServedModel
from vision.serving.status import RegistryStatus
from vision.tasks.tagging import tagger_of
from vision.v1 import common_pb2


def model_info(card: ModelCard, *, full: bool = False, registry: RegistryStatus | None = None) -> common_pb2.ModelInfo:
    """Name and version always; `full` adds what ListModels describes (with the `registry` status of a
    model followed through the model registry)."""
    info = common_pb2.ModelInfo(name=card.name, version=card.version)
    if full:
        preset = card.preset
        info.architecture = card.architecture
        info.num_labels = card.num_labels
        info.backend = card.backend
        info.weights_sha256 = card.weights_sha256
        info.task = card.task
        info.num_tag_labels = len(tagger) if (tagger := tagger_of(card)) is not None else 0
        info.random_weights = card.random_weights
        info.precision = card.precision
        signature = card.signature
        for name in signature.outputs:
            if signature.is_map(name):
                layer = signature.layer(name)
                info.outputs.add(name=name, channels=layer.channels, stride=layer.stride)
            else:
                info.outputs.add(name=name, channels=signature.output_shape(name, 1, 1)[0])
        geometry = signature.geometry
        info.input_geometry.CopyFrom(
            common_pb2.InputGeometry(crop_size=geometry.crop_size, variable=geometry.variable, max_side=geometry.max_side)
        )
        info.metrics.update(dict(card.metrics))
        if registry is not None:
            r = registry
            info.registry.CopyFrom(common_pb2.RegistryStatus(
                uri=r.uri, alias=r.alias, alias_version=r.alias_version, serving_version=r.serving_version,
                refused_version=r.refused_version, refused_check=r.refused_check, refused_reason=r.refused_reason,
                checked_at=r.checked_at, error=r.error, run_id=r.run_id,
            ))
        info.preprocessing.CopyFrom(
            common_pb2.Preprocessing(
                preset=preset.name,
                resize_shorter=preset.resize_shorter,
                crop_size=preset.crop_size,
                mean=preset.mean,
                std=preset.std,
                channel_order=preset.channel_order,
            )
        )
    return info


def list_models_response(models: Iterable[ServedModel]) -> common_pb2.ListModelsResponse:
    return common_pb2.ListModelsResponse(models=[model_info(m.card, full=True, registry=m.registry) for m in models])
