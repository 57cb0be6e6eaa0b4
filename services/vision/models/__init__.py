"""Model architectures, weights loading and label sets: one registry used by serving and training."""

from vision.models.registry import ArchitectureDefaults, create_model, get_architecture, list_architectures, register_model

__all__ = ["ArchitectureDefaults", "create_model", "get_architecture", "list_architectures", "register_model"]
