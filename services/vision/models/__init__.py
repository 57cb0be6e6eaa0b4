"""Model architectures, weights loading, signatures and label sets: one registry used by serving and training."""

from vision.models.registry import (
    ArchitectureDefaults,
    create_model,
    get_architecture,
    list_architectures,
    register_model,
    with_outputs,
)
from vision.models.signature import EMBEDDING, LOGITS, FeatureLayer, InputGeometry, Signature

__all__ = [
    "EMBEDDING",
    "LOGITS",
    "ArchitectureDefaults",
    "FeatureLayer",
    "InputGeometry",
    "Signature",
    "create_model",
    "get_architecture",
    "list_architectures",
    "register_model",
    "with_outputs",
]
