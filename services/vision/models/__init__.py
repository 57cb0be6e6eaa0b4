"""Model architectures (builder registry, zoo), signatures, taps, weights, receptive fields, the DELF head, the model card, ONNX export and precision."""

from vision.models.registry import (
    ArchitectureDefaults,
    create_model,
    get_architecture,
    list_architectures,
    register_model,
    with_outputs,
)
from vision.models.signature import EMBEDDING, LOGITS, FeatureLayer, InputGeometry, Signature

# The builders of the platform's architectures register themselves on import (timm's way): importing the
# package is what fills the registry, and the registry itself imports none of its plug-ins. Cheap: the zoo
# imports torch only inside the builders.
from vision.models import zoo  # noqa: E402,F401  isort: skip

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
